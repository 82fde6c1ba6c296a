"""safebasin at real shapes on one GPU: throughput, memory and MFU of anchored training and
restoration on published architectures with random bf16 weights (safety_core/train/architectures.py),
side by side with a plain PyTorch + PEFT loop and the Hugging Face Trainer.

    python benchmarks/gpu_scale.py [--out DIR] [--sections lora,full,restore,eval,kernel] [--reps N]
    python benchmarks/gpu_scale.py --smoke      # every section at toy sizes on the CPU (a test)
    python benchmarks/gpu_scale.py --roofline   # the anchor penalty's bytes and times; no device

Sections (GPU sizes; --smoke runs the same code on arch:toy-llama, sequence 64, 3 steps):
  lora     Llama-3.1-8B shape, LoRA r 16 on q/k/v/o, ZeRO-2, bf16, packing, sequence 2048, micro-batch 2;
           with gradient checkpointing: safebasin unanchored, anchored (random basis k = 64, and
           untruncated k = d_out), the plain loop, the HF Trainer (same DeepSpeed JSON); without it:
           safebasin, plain loop, HF Trainer. tokens/s, peak memory, MFU.
  full     Llama-3.2-1B shape, full parameters, ZeRO-3 on one rank, anchored (k = 64) vs unanchored.
  restore  restoration of the anchored 8B adapter of `lora`: s/iteration, peak memory, the printed
           curvature-history size.
  eval     `safebasin eval` of the 8B model with that adapter (eval.engine hf, and vllm where it imports).
  kernel   the full-form anchor penalty (forward + backward) at 4096 x 4096 and the 8B layer shapes,
           k = 64, bf16 weights with fp32 masters, against the measured stream bandwidth.

Every contender is its own process (peak memory per process: benchmarks/scale_sides/peak.py),
run in the order listed, round after round with --reps (interleaved); tokens/s of a run is the
median over its steps after the warm-up steps, a figure over rounds the median of runs. All
sides train on one token stream: rows of exactly `seq` tokens (packing on, every example
longer than a row and truncated to it), in safebasin's order. Results go to OUT/scale.json after
every contender (a run stopped by a time limit keeps what it measured) and a table at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
PEAK = BENCH / "scale_sides" / "peak.py"
SIDES = BENCH / "trainer_sides"
# In the order they run: the kernel first (seconds), then what the later sections build on.
SECTIONS = ("kernel", "lora", "full", "restore", "eval")
# Dense bf16 tensor-core peak (FLOP/s) by device-name fragment: the MFU denominator.
PEAK_BF16 = [("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12)]


@dataclass
class Scale:
    lora_arch: str
    full_arch: str
    seq: int
    micro: int
    steps: int
    warm: int                   # steps left out of the rate (allocator, first kernels, JIT)
    eval_prompts: int
    new_tokens: int
    restore_iterations: int
    kernel_shapes: list[tuple[int, int]] = field(default_factory=list)
    lora_r: int = 16
    k: int = 64
    timeout: int = 600          # seconds per process
    # The smoke run leaves out the contenders that only repeat code paths the others run.
    without_checkpointing: bool = True
    untruncated: bool = True
    full_unanchored: bool = True


GPU = Scale("llama-3.1-8b", "llama-3.2-1b", seq=2048, micro=2, steps=10, warm=4, eval_prompts=64,
            new_tokens=64, restore_iterations=2,
            kernel_shapes=[(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)])
SMOKE = Scale("toy-llama", "toy-llama", seq=64, micro=2, steps=3, warm=1, eval_prompts=4, new_tokens=4,
              restore_iterations=1, kernel_shapes=[(96, 64)], k=16, timeout=300,
              without_checkpointing=False, untruncated=False, full_unanchored=False)


# -- the cost model ------------------------------------------------------------------------

def arch(name: str) -> dict:
    from safebasin.safety_core.train.architectures import arch_config
    return arch_config(name)


def layer_shapes(cfg: dict) -> dict[str, tuple[int, int]]:
    """(d_out, d_in) of every linear module of one decoder layer."""
    h, hd = cfg["hidden_size"], cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    q, kv, f = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd, cfg["intermediate_size"]
    return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
            "gate_proj": (f, h), "up_proj": (f, h), "down_proj": (h, f)}


def linear_params(cfg: dict) -> int:
    """Weights that take part in matmuls: every decoder linear module and the output layer (the
    input embedding is a lookup)."""
    return (cfg["num_hidden_layers"] * sum(a * b for a, b in layer_shapes(cfg).values())
            + cfg["vocab_size"] * cfg["hidden_size"])


def flops_per_token(cfg: dict, seq: int, full: bool) -> float:
    """Model FLOPs per trained token (RESULTS.md, "MFU"): matmuls 2 N_lin forward, 2 N_lin for the
    input gradients and, for full parameters, 2 N_lin for the weight gradients (LoRA's adapter
    gradients are r/d of that and left out); causal attention 2 L seq d_attn forward (QK^T and
    AV over seq/2 keys on average), twice that backward. Recomputation under checkpointing is
    not model work and is not counted."""
    L = cfg["num_hidden_layers"]
    n_lin = linear_params(cfg)
    d_attn = cfg["num_attention_heads"] * (cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])
    attention = 2 * L * seq * d_attn
    return (6 if full else 4) * n_lin + 3 * attention


def penalty_bytes(d_out: int, d_in: int, k: int, master: int = 4, grad: int = 4) -> dict[str, int]:
    """Bytes one full-form anchor penalty step must move (fp32 masters W and W0 of `master` bytes,
    U fp32, the gradient written in `grad` bytes): the value pass reads W, W0 and U; the
    gradient needs U^T (W - W0) complete, a sum over every row, before any element of it, so a
    second pass reads W, W0 and U again and writes dW. The k x d_in partials and M are small."""
    n, u, small = d_out * d_in, d_out * k * 4, 2 * k * d_in * 4
    value = 2 * n * master + u
    gradient = 2 * n * master + u + n * grad + small
    return {"value": value, "gradient": gradient, "step": value + gradient}


def roofline_table(shapes: list[tuple[int, int]], k: int) -> list[str]:
    lines = ["| d_out x d_in | k | bytes per step (value + gradient) | at 4.8 TB/s (H200) | at 3.35 TB/s (H100) | "
             "FLOPs (2 GEMMs of 2 k d_out d_in) | FLOP per byte |", "|---|---|---|---|---|---|---|"]
    for d_out, d_in in shapes:
        b = penalty_bytes(d_out, d_in, k)["step"]
        f = 4 * k * d_out * d_in
        lines.append(f"| {d_out} x {d_in} | {k} | {b / 1e6:.1f} MB | {b / 4.8e12 * 1e6:.1f} us | "
                     f"{b / 3.35e12 * 1e6:.1f} us | {f / 1e9:.2f} GFLOP | {f / b:.1f} |")
    return lines


# -- fixtures --------------------------------------------------------------------------------

def write_data(path: Path, n: int, seq: int) -> Path:
    """n instruction records whose responses are longer than a row of `seq` tokens (the tiny
    tokenizer makes at least one token per word), so each example is truncated to exactly one
    full row and packing, padding and the baselines' batches all hold the same tokens."""
    import random
    rng = random.Random(0)
    words = ["anchor", "basin", "safety", "gradient", "restore", "curvature", "layer", "token", "update",
             "subspace", "the", "of", "and", "a", "model", "weights", "loss", "step"]
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"instruction": f"Write note {i}.",
                                "output": " ".join(rng.choice(words) for _ in range(seq + 64))}) + "\n")
    return path


def write_random_basis(out: Path, cfg: dict, modules: list[str], k: int | None, device: str) -> Path:
    """A basis folder (safebasin's format) of random orthonormal U (d_out x k; k = None: d_out,
    untruncated) and safelora-like weights c in (0, 1): cost does not depend on the content."""
    import torch
    from safebasin.safety_core.anchor.basis import FORMAT, MANIFEST
    from safetensors.torch import save_file
    if (out / MANIFEST).exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device=device).manual_seed(0)
    layers, shapes = {}, layer_shapes(cfg)
    for i in range(cfg["num_hidden_layers"]):
        tensors = {}
        for m in modules:
            d_out, d_in = shapes[m]
            kk = d_out if k is None else min(k, d_out)
            U = torch.linalg.qr(torch.randn(d_out, kk, generator=gen, device=device))[0]
            c = torch.rand(kk, generator=gen, device=device).sort(descending=True).values * 0.5
            name = f"model.layers.{i}.{'self_attn' if m.endswith(('q_proj', 'k_proj', 'v_proj', 'o_proj')) else 'mlp'}.{m}"
            tensors.update({f"{name}.U": U.cpu().contiguous(), f"{name}.c": c.cpu(), f"{name}.S": c.sqrt().cpu()})
            layers[name] = {"shape": [d_out, d_in], "k": kk, "rank": None, "captured_share": 1.0, "fro_norm": 1.0,
                            "c_max": float(c.max()), "c_median": float(c.median()), "c_sum": float(c.sum()),
                            "l2_gap": float((2 * c - c * c).abs().max()), "spectrum_complete": False,
                            "file": f"basis-{i + 1:05d}.safetensors"}
        save_file(tensors, str(out / f"basis-{i + 1:05d}.safetensors"))
    manifest = {"format": FORMAT, "variant": "safelora", "aligned": "random", "base": "random", "modules": modules,
                "selection": {"rank": k, "tol": None}, "files": sorted({v["file"] for v in layers.values()}),
                "layers": layers}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    release(device)
    return out


def release(device: str) -> None:
    """Hand this process's cached GPU memory back: the sides run beside it, in processes of their own."""
    import torch
    if device == "cuda":
        torch.cuda.empty_cache()


# -- running sides -----------------------------------------------------------------------------

class Bench:
    def __init__(self, out: Path, scale: Scale, smoke: bool, budget: float | None = None):
        self.out, self.scale, self.smoke = out, scale, smoke
        # No contender starts past the budget, and none runs past it (a caller's time limit).
        self.deadline = None if budget is None else time.perf_counter() + budget
        self.results: dict[str, list[dict]] = {}
        self.notes: list[str] = []
        prior = out / "scale.json"
        if prior.exists():
            # A later call with the same --out adds to what an earlier one measured (a device
            # call cut short by its time limit, continued by another).
            saved = json.loads(prior.read_text())
            if saved["smoke"] != smoke:
                raise SystemExit(f"gpu_scale: {prior} holds a {'smoke' if saved['smoke'] else 'GPU'} run; "
                                 f"use another --out")
            self.results, self.notes = saved["results"], saved["notes"]
        self.env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        if smoke:
            self.env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        import importlib.util
        self.tracking = importlib.util.find_spec("mlflow") is not None and not smoke

    def save(self) -> None:
        (self.out / "scale.json").write_text(json.dumps({"scale": asdict(self.scale), "smoke": self.smoke,
                                                         "results": self.results, "notes": self.notes}, indent=1))

    def run(self, name: str, kind: str, target: str, args: list[str]) -> dict:
        """One process of a contender, under the peak-memory wrapper; its record is appended to
        results[name] and returned ({"exit", "wall", peaks...})."""
        d = self.out / f"{name}.{len(self.results.get(name, [])) + 1}"
        d.mkdir(parents=True, exist_ok=True)
        timeout = self.scale.timeout
        if self.deadline is not None:
            timeout = min(timeout, int(self.deadline - time.perf_counter()))
            if timeout < 30:
                rec = {"exit": None, "wall": 0.0, "dir": str(d), "error": "not run: the time budget is spent"}
                self.results.setdefault(name, []).append(rec)
                self.save()
                print(f"  {name}: not run (budget spent)", flush=True)
                return rec
        cmd = [sys.executable, str(PEAK), str(d / "peak.json"), kind, target, *[a.replace("{dir}", str(d)) for a in args]]
        t0 = time.perf_counter()
        with (d / "log.txt").open("w") as log:
            try:
                code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=d,
                                       timeout=timeout)
            except subprocess.TimeoutExpired:
                code = 124
        rec = {"exit": code, "wall": time.perf_counter() - t0, "dir": str(d)}
        if (d / "peak.json").exists():
            rec.update({k: v for k, v in json.loads((d / "peak.json").read_text()).items() if k != "exit"})
        if code != 0:  # a timed-out side was killed by subprocess.call (it starts no processes of its own)
            tail = (d / "log.txt").read_text(errors="replace")[-2000:]
            rec["error"] = "out of memory" if "out of memory" in tail.lower() else tail.strip().splitlines()[-1:]
        self.results.setdefault(name, []).append(rec)
        self.save()
        print(f"  {name}: exit {code}, {rec['wall']:.0f} s, peak {gib(peak_of(rec))}", flush=True)
        return rec

    def safebasin(self, name: str, command: str, cfg: dict) -> dict:
        import yaml
        path = self.out / f"{name}.yaml"
        cfg = {**cfg, "tracking": {"enabled": self.tracking, "experiment": "gpu-scale",
                                   "uri": f"sqlite:///{self.out / 'mlflow.db'}"}}
        path.write_text(yaml.safe_dump(cfg))
        rec = self.run(name, "module", "safebasin.launcher.cli", [command, str(path), "output.dir={dir}/run"])
        metrics = Path(rec["dir"]) / "run" / "metrics.jsonl"
        if rec["exit"] == 0 and metrics.exists():
            rows = [json.loads(x) for x in metrics.read_text().splitlines()]
            rec["rows"] = len(rows)
            if command == "train":
                rec["tokens_per_s"] = median_rate([r["step_seconds"] for r in rows], [r["tokens"] for r in rows],
                                                  self.scale.warm)
                rec["loss_last"] = rows[-1]["loss"]
            else:
                rec["seconds_per_iteration"] = statistics.median(r["seconds"] for r in rows)
        self.save()
        return rec

    def script(self, name: str, script: str, args: list[str]) -> dict:
        rec = self.run(name, "script", str(SIDES / script), [*args, "{dir}/result.json"])
        res = Path(rec["dir"]) / "result.json"
        if rec["exit"] == 0 and res.exists():
            r = json.loads(res.read_text())
            ends = r["step_ends"]
            rec["tokens_per_s"] = median_rate([b - a for a, b in zip(ends, ends[1:])], r["tokens"], self.scale.warm)
        self.save()
        return rec


def median_rate(step_seconds: list[float], tokens: list[int], warm: int) -> float:
    warm = min(warm, len(step_seconds) - 1)
    return statistics.median(t / s for s, t in zip(step_seconds[warm:], tokens[warm:]))


def peak_of(rec: dict) -> int | None:
    return rec.get("cuda_peak_allocated") or rec.get("rss_peak")


def gib(b) -> str:
    return "-" if b is None else f"{b / 2**30:.2f} GiB"


# -- sections ------------------------------------------------------------------------------------

def train_cfg(b: Bench, arch_name: str, *, method: dict, stage: int, ckpt: bool, data: Path,
              anchor: dict | None = None) -> dict:
    s = b.scale
    cfg = {"model": {"path": f"arch:{arch_name}", "dtype": "float32" if b.smoke else "bfloat16"},
           "method": method,
           "data": {"train": {"path": str(data)}, "num_examples": s.micro * s.steps, "max_length": s.seq,
                    "packing": True, "cache_dir": str(b.out / "tokcache")},
           "train": {"seed": 0, "lr": 1e-4, "warmup_steps": 1, "max_steps": s.steps, "micro_batch_size": s.micro,
                     "precision": "fp32" if b.smoke else "bf16", "gradient_checkpointing": ckpt},
           "deepspeed": {"stage": stage}, "runtime": {"threads": 1} if b.smoke else {}}
    if anchor:
        cfg["anchor"] = anchor
    return cfg


def lora_method(s: Scale) -> dict:
    return {"type": "lora", "r": s.lora_r, "alpha": 2 * s.lora_r, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}


def write_stream(b: Bench, cfg: dict, ckpt: bool) -> Path:
    """The token stream safebasin trains on, for the baseline sides (as benchmarks/trainer.py)."""
    sys.path.insert(0, str(BENCH))
    from trainer import write_stream as stream_of
    path = stream_of(cfg, b.out / f"stream{'_ckpt' if ckpt else ''}.json")
    spec = json.loads(path.read_text())
    spec.update(device="cpu" if b.smoke else "cuda", dtype=cfg["model"]["dtype"], gradient_checkpointing=ckpt)
    path.write_text(json.dumps(spec))
    return path


def hf_ds_json(b: Bench) -> Path:
    cfg = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    if b.smoke:
        cfg["optimizer"]["params"]["torch_adam"] = True  # FusedAdam needs CUDA
    path = b.out / "hf_zero2.json"
    path.write_text(json.dumps(cfg))
    return path


def section_lora(b: Bench, reps: int) -> None:
    s = b.scale
    cfg_arch = arch(s.lora_arch)
    data = write_data(b.out / "long.jsonl", s.micro * s.steps, s.seq)
    device = "cpu" if b.smoke else "cuda"
    modules = ["q_proj", "k_proj", "v_proj", "o_proj"]
    k64 = write_random_basis(b.out / f"basis_k{s.k}", cfg_arch, modules, s.k, device)
    kfull = write_random_basis(b.out / "basis_kfull", cfg_arch, modules, None, device) if s.untruncated else None
    method = lora_method(s)
    contenders = []
    for ckpt in (True, False) if s.without_checkpointing else (True,):
        tag = "ckpt" if ckpt else "nockpt"
        base = train_cfg(b, s.lora_arch, method=method, stage=2, ckpt=ckpt, data=data)
        stream = write_stream(b, base, ckpt)
        contenders.append(lambda c=base, n=f"lora_safebasin_{tag}": b.safebasin(n, "train", c))
        if ckpt:
            for label, basis in ((f"k{s.k}", k64), ("kfull", kfull))[:2 if s.untruncated else 1]:
                cfg = train_cfg(b, s.lora_arch, method=method, stage=2, ckpt=True, data=data,
                                anchor={"basis": str(basis), "lambda": 1.0})
                contenders.append(lambda c=cfg, n=f"lora_anchored_{label}_ckpt": b.safebasin(n, "train", c))
        contenders.append(lambda st=stream, n=f"lora_plain_{tag}": b.script(n, "plain_loop.py", [str(st)]))
        contenders.append(lambda st=stream, n=f"lora_hf_{tag}": b.script(n, "hf_trainer.py", [str(st), str(hf_ds_json(b))]))
    for _ in range(reps):
        for fn in contenders:
            fn()


def section_full(b: Bench, reps: int) -> None:
    s = b.scale
    data = write_data(b.out / "long.jsonl", s.micro * s.steps, s.seq)
    device = "cpu" if b.smoke else "cuda"
    basis = write_random_basis(b.out / f"basis_full_k{s.k}", arch(s.full_arch), ["q_proj", "v_proj"], s.k, device)
    method = {"type": "full"}
    plain = train_cfg(b, s.full_arch, method=method, stage=3, ckpt=True, data=data)
    anchored = train_cfg(b, s.full_arch, method=method, stage=3, ckpt=True, data=data,
                         anchor={"basis": str(basis), "lambda": 1.0})
    for _ in range(reps):
        if s.full_unanchored:
            b.safebasin("full_z3_unanchored", "train", plain)
        b.safebasin("full_z3_anchored", "train", anchored)


def adapter_dir(b: Bench) -> Path | None:
    runs = b.results.get(f"lora_anchored_k{b.scale.k}_ckpt", []) + b.results.get("lora_safebasin_ckpt", [])
    for rec in runs:
        path = Path(rec["dir"]) / "run" / "adapter"
        if rec["exit"] == 0 and path.exists():
            return path
    b.notes.append("restore/eval: no adapter from the lora section (run it first); skipped")
    return None


def section_restore(b: Bench, reps: int) -> None:
    s = b.scale
    adapter = adapter_dir(b)
    if adapter is None:
        return
    dtype = "float32" if b.smoke else "bfloat16"
    cfg = {"model": {"path": f"arch:{s.lora_arch}", "adapter": str(adapter), "dtype": dtype},
           "restore": {"forget": {"path": "builtin:harmful"}, "retain": {"path": "builtin:task"},
                       "forget_size": 16, "curvature_forget_size": 16, "retain1_size": 16, "retain2_size": 16,
                       # Batches of 4 x 256 tokens: the fp32 8B base (32 GB) and its activations fit an H100.
                       "iterations": s.restore_iterations, "probes": 4, "batch_size": 4, "max_length": min(s.seq, 256)},
           "deepspeed": {"stage": 2}}
    for _ in range(reps):
        rec = b.safebasin("restore_lora", "restore", cfg)
        if rec["exit"] is None:
            continue
        log = (Path(rec["dir"]) / "log.txt").read_text(errors="replace")
        m = re.search(r"curvature history: .*= ([\d.]+) GiB per rank", log)
        rec["history_printed_gib"] = float(m[1]) if m else None
        b.save()


def section_eval(b: Bench, reps: int) -> None:
    import importlib.util
    s = b.scale
    adapter = adapter_dir(b)
    if adapter is None:
        return
    engines = ["hf"] + (["vllm"] if not b.smoke and importlib.util.find_spec("vllm") else [])
    if "vllm" not in engines:
        b.notes.append("eval.engine=vllm: vllm is not importable here (or --smoke); not run")
    for _ in range(reps):
        for engine in engines:
            cfg = {"model": {"path": f"arch:{s.lora_arch}", "adapter": str(adapter),
                             "dtype": "float32" if b.smoke else "bfloat16"},
                   "eval": {"harmful": {"path": "builtin:harmful-heldout", "limit": s.eval_prompts},
                            "judge": {"name": "keyword"}, "max_new_tokens": s.new_tokens, "batch_size": s.eval_prompts,
                            "engine": engine}}
            rec = b.safebasin(f"eval_{engine}", "eval", cfg)
            if rec["exit"] == 0:
                # Random weights rarely emit the end-of-sequence id: each answer runs its full length.
                rec["prompts_per_s_whole_process"] = s.eval_prompts / rec["wall"]
                rec["new_tokens_per_s_whole_process_at_most"] = s.eval_prompts * s.new_tokens / rec["wall"]
                b.save()


# Tile settings of the two Triton passes tried on the GPU, (block_m, block_n, programs of the
# moments pass), each with exact fp32 dots and with tf32x3; the first is the kernels' default.
# The device run picks; the code keeps one.
TILES = [(32, 64, 512), (64, 64, 1024), (32, 128, 1024), (64, 128, 2048), (128, 64, 2048)]


def section_kernel(b: Bench, reps: int) -> None:
    """The full-form penalty step (value and metrics pass, gradient pass) on fp32 masters, as the
    trainer holds them, against a plain read of the same number of bytes (the practical
    roofline), in this process: the public function (autograd, the default tiles), the PyTorch
    reference and, on a GPU, the two Triton passes alone at each of TILES."""
    import torch
    sys.path.insert(0, str(BENCH))
    from safebasin.kernels import anchor_penalty_full_metrics, backend
    from timing import interleaved, timed, with_backend
    device = torch.device("cpu" if b.smoke else "cuda")
    rows = []
    for d_out, d_in in b.scale.kernel_shapes:
        gen = torch.Generator(device=device).manual_seed(0)
        W0 = torch.randn(d_out, d_in, generator=gen, device=device)
        W = (W0 + 0.01 * torch.randn(d_out, d_in, generator=gen, device=device)).requires_grad_(True)
        U = torch.linalg.qr(torch.randn(d_out, b.scale.k, generator=gen, device=device))[0]
        c = torch.rand(b.scale.k, generator=gen, device=device)
        nbytes = penalty_bytes(d_out, d_in, b.scale.k)["step"]
        stream = torch.empty(nbytes // 4, device=device)

        def step():
            W.grad = None
            anchor_penalty_full_metrics(W, W0, U, c)[0].backward()
        runs = {"penalty": timed(step, device), "read": timed(lambda: stream.sum(), device)}
        errors: dict[str, float] = {}
        # On a GPU; on the CPU too under TRITON_INTERPRET=1 with the triton backend forced (a test).
        if backend.use_triton(W):
            from safebasin.kernels import triton_anchor as tri
            w, w0 = W.detach().reshape(-1), W0.reshape(-1)
            M, scale = torch.randn(b.scale.k, d_in, device=device), torch.tensor(2.0, device=device)
            runs["torch reference"] = timed(with_backend("torch", step), device)
            tiles = TILES[:1] if b.smoke else TILES
            ref_T = tri.fragment_moments(w, w0, 0, (d_out, d_in), U)[0]
            for precision in tri.FULL_PRECISIONS:
                for bm, bn, progs in tiles:
                    def passes(bm=bm, bn=bn, progs=progs, precision=precision):
                        T = tri.fragment_moments(w, w0, 0, (d_out, d_in), U, block_m=bm, block_n=bn, programs=progs,
                                                 precision=precision)[0]
                        tri.fragment_grad(w, w0, 0, (d_out, d_in), U, M, scale, 1.0, block_m=bm, block_n=bn,
                                          precision=precision)
                        return T
                    name = f"triton passes {precision} {bm}x{bn}/{progs}"
                    errors[name] = float((passes() - ref_T).abs().max() / ref_T.abs().max())
                    runs[name] = timed(passes, device)
        best = interleaved(runs, max(3, 5 * reps))
        row = {"shape": [d_out, d_in], "k": b.scale.k, "bytes": nbytes, "seconds": best["penalty"],
               "stream_seconds": best["read"], "share_of_stream": best["read"] / best["penalty"],
               "others": {name: {"seconds": t, "share_of_stream": best["read"] / t,
                                 "max_rel_diff_of_T_from_default": errors.get(name)}
                          for name, t in best.items() if name not in ("penalty", "read")}}
        rows.append(row)
        del W, W0, U, stream
    release(device.type)
    b.results["kernel"] = rows
    b.save()


# -- report ---------------------------------------------------------------------------------------

def med(recs: list[dict], key: str):
    vals = [r[key] for r in recs if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def report(b: Bench, device_name: str) -> list[str]:
    s, R = b.scale, b.results
    peak = next((p for key, p in PEAK_BF16 if key in device_name), None)
    lines = [f"device: {device_name}; scale: {asdict(s)}", "",
             "| contender | runs ok | tokens/s (median) | peak memory | MFU | / comparison |", "|---|---|---|---|---|---|"]

    def row(name: str, full: bool, arch_name: str, against: str | None = None) -> None:
        recs = R.get(name, [])
        if not recs:
            return
        rate = med(recs, "tokens_per_s")
        peaks = [peak_of(r) for r in recs if peak_of(r)]
        mfu = (f"{rate * flops_per_token(arch(arch_name), s.seq, full) / peak:.1%}" if rate and peak else "-")
        other = med(R.get(against, []), "tokens_per_s") if against else None
        ratio = f"{rate / other:.3f} of {against}" if rate and other else ""
        errors = "; ".join(str(r.get("error")) for r in recs if r["exit"] != 0)
        lines.append(f"| {name} | {sum(r['exit'] == 0 for r in recs)}/{len(recs)}{' (' + errors + ')' if errors else ''} | "
                     f"{rate:.0f} | {gib(max(peaks) if peaks else None)} | {mfu} | {ratio} |" if rate else
                     f"| {name} | {sum(r['exit'] == 0 for r in recs)}/{len(recs)} ({errors}) | - | "
                     f"{gib(max(peaks) if peaks else None)} | - | |")
    for tag in ("ckpt", "nockpt"):
        row(f"lora_safebasin_{tag}", False, s.lora_arch, f"lora_plain_{tag}")
        row(f"lora_plain_{tag}", False, s.lora_arch)
        row(f"lora_hf_{tag}", False, s.lora_arch, f"lora_safebasin_{tag}")
    for label in (f"k{s.k}", "kfull"):
        row(f"lora_anchored_{label}_ckpt", False, s.lora_arch, "lora_safebasin_ckpt")
    row("full_z3_unanchored", True, s.full_arch)
    row("full_z3_anchored", True, s.full_arch, "full_z3_unanchored")
    for rec in R.get("restore_lora", []):
        lines.append(f"| restore_lora | exit {rec['exit']} | {rec.get('seconds_per_iteration') or 0:.1f} s/iteration | "
                     f"{gib(peak_of(rec))} | | printed history {rec.get('history_printed_gib')} GiB |")
    for engine in ("hf", "vllm"):
        for rec in R.get(f"eval_{engine}", []):
            lines.append(f"| eval_{engine} ({s.eval_prompts} prompts, {s.new_tokens} new tokens) | exit {rec['exit']} | "
                         f"{rec.get('prompts_per_s_whole_process') or 0:.2f} prompts/s, "
                         f"<= {rec.get('new_tokens_per_s_whole_process_at_most') or 0:.0f} new tokens/s (whole process) | "
                         f"{gib(peak_of(rec))} | | |")
    for k in R.get("kernel", []):
        lines.append(f"| anchor penalty full {k['shape'][0]} x {k['shape'][1]}, k {k['k']} | | "
                     f"{k['seconds'] * 1e3:.3f} ms, {k['bytes'] / 1e6:.1f} MB | | | "
                     f"{k['share_of_stream']:.1%} of the measured stream read ({k['bytes'] / k['stream_seconds'] / 1e9:.0f} GB/s) |")
        for name, o in k["others"].items():
            diff = o.get("max_rel_diff_of_T_from_default")
            lines.append(f"| ... {name} | | {o['seconds'] * 1e3:.3f} ms | | | {o['share_of_stream']:.1%} of the stream read"
                         + (f"; U^T D max rel. diff from the default {diff:.1e}" if diff is not None else "") + " |")
    lines += [f"note: {n}" for n in b.notes]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="/tmp/safebasin-gpu-scale")
    p.add_argument("--sections", default=",".join(SECTIONS))
    p.add_argument("--reps", type=int, default=1, help="rounds of every contender, interleaved")
    p.add_argument("--budget", type=float, help="seconds: start no contender after, stop any at, this time")
    p.add_argument("--smoke", action="store_true", help="toy sizes on the CPU: checks that every section runs")
    p.add_argument("--roofline", action="store_true", help="print the anchor penalty's roofline table and exit")
    args = p.parse_args(argv)
    if args.roofline:
        print("\n".join(roofline_table(GPU.kernel_shapes, GPU.k)))
        return 0
    sections = [x for x in args.sections.split(",") if x]
    bad = [x for x in sections if x not in SECTIONS]
    if bad:
        p.error(f"--sections: unknown {bad}; allowed values: {list(SECTIONS)}")
    import torch
    if not args.smoke and not torch.cuda.is_available():
        print("gpu_scale: no CUDA device is visible; run with --smoke on a CPU", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    b = Bench(out, SMOKE if args.smoke else GPU, args.smoke, args.budget)
    device_name = torch.cuda.get_device_name(0) if not args.smoke else "CPU (smoke)"
    funcs = {"lora": section_lora, "full": section_full, "restore": section_restore, "eval": section_eval,
             "kernel": section_kernel}
    t0 = time.perf_counter()
    for name in sorted(sections, key=SECTIONS.index):
        print(f"== {name}", flush=True)
        funcs[name](b, args.reps)
    b.save()
    lines = report(b, device_name)
    (out / "scale.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    runs = [r for recs in b.results.values() for r in recs if "exit" in r]
    failed = sum(r["exit"] not in (0, None) for r in runs)
    skipped = sum(r["exit"] is None for r in runs)
    if skipped:
        print(f"gpu_scale: {skipped} contender(s) not run: the --budget was spent")
    print(f"gpu_scale: {time.perf_counter() - t0:.0f} s, {failed} process(es) failed; {out / 'scale.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
