"""Trainer throughput side by side: `safebasin train` against a plain PyTorch + PEFT loop and the
Hugging Face Trainer with the same DeepSpeed JSON, on the same model, data order, batch and
length; anchored vs plain LoRA; packing vs padding; peak memory with and without gradient
checkpointing. Every contender is a separate process, one thread each, run round-robin
(A, B, C, A, B, C, ...) after a warm-up round; figures are medians over the rounds.

    python benchmarks/trainer.py [--model builtin:tiny-llama] [--steps 40] [--reps 3]
                                 [--parts zero0,zero2,anchor,packing,memory] [--out DIR]

tokens/s is wall-clock over steps after the first 5 (step ends, logging included), from each
side's own record of step ends: safebasin's metrics.jsonl `step_seconds`, the plain loop's and
the Trainer's timestamps. Whole-process time is the parent's wall clock around each process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SIDES = Path(__file__).resolve().parent / "trainer_sides"
WARM = 5  # steps left out of the steady-state rate (first forward, allocator, lazy imports)
# ../shared/data beside the repository, or SAFEBASIN_SHARED_DATA (as the tests resolve it).
ALPACA = Path(os.environ.get("SAFEBASIN_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
              ) / "instruction" / "alpaca_subset_1000.jsonl"


def base_config(model: str, steps: int, out: Path, stage: int, **extra) -> dict:
    cfg = {"model": {"path": model},
           "method": {"type": "lora", "r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]},
           "data": {"train": {"path": "builtin:task"}, "num_examples": 400, "max_length": 128,
                    "cache_dir": str(out / "tokcache")},
           "train": {"seed": 0, "lr": 1e-3, "warmup_steps": 2, "schedule": "cosine", "max_steps": steps,
                     "micro_batch_size": 8, "gradient_accumulation_steps": 1, "precision": "fp32"},
           "deepspeed": {"stage": stage},
           "runtime": {"threads": 1},
           "tracking": {"experiment": "bench", "uri": f"sqlite:///{out / 'mlflow.db'}"}}
    for dotted, value in extra.items():
        node = cfg
        *head, last = dotted.split(".")
        for k in head:
            node = node.setdefault(k, {})
        node[last] = value
    return cfg


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
            "TOKENIZERS_PARALLELISM": "false"}


def write_stream(cfg: dict, path: Path) -> Path:
    """The micro-batches safebasin trains on, tokenised, for the other sides."""
    from safebasin.launcher.config import build
    from safebasin.safety_core.train import data as data_lib
    from safebasin.safety_core.train.data import StepSampler
    from safebasin.safety_core.train.modeling import load_tokenizer
    job = build(cfg)
    tok = load_tokenizer(job.model)
    from safebasin.safety_core.train.mixture import training_set_with_report
    examples = data_lib.encode_all(tok, training_set_with_report(job.data)[0], job.data.max_length)
    t = job.train
    sampler = StepSampler(len(examples), t.micro_batch_size, t.gradient_accumulation_steps, 1, t.seed)
    steps = [[[examples[i] for i in mb] for mb in sampler.micro_batches(s, 0)] for s in range(t.max_steps)]
    spec = {"model": job.model.resolved_path(), "seed": t.seed, "lr": t.lr, "warmup": t.warmup_steps,
            "r": job.method.r, "alpha": job.method.alpha, "target_modules": job.method.target_modules,
            "pad_id": tok.pad_token_id, "threads": 1, "port": 29650, "steps": steps}
    path.write_text(json.dumps(spec))
    return path


def rate(step_seconds: list[float], tokens: list[int]) -> float:
    return sum(tokens[WARM:]) / sum(step_seconds[WARM:])


def quiet_rate(step_seconds: list[float], tokens: list[int]) -> float:
    """tokens/s at the 10th percentile of per-token step time: on a shared machine interference
    only adds time, so the fast tail is the loop's own cost (the median rate is the load's too)."""
    per_token = sorted(s / t for s, t in zip(step_seconds[WARM:], tokens[WARM:]))
    return 1.0 / per_token[len(per_token) // 10]


CPU_SECONDS: dict[str, float] = {}  # log path -> user + system CPU seconds of the process


def run_process(cmd: list[str], log: Path, memory: bool = False) -> tuple[float, int | None]:
    """Wall seconds of the whole process (and its peak RSS in KiB when asked). Its CPU seconds
    (user + system, children included) go to CPU_SECONDS: on a loaded machine they measure
    the work a process does, which the wall clock mixes with waiting for a core."""
    usage = log.with_suffix(".usage")
    cmd = ["/usr/bin/time", "-f", "%M %U %S", "-o", str(usage), *cmd]
    t0 = time.perf_counter()
    with log.open("w") as f:
        code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env(), cwd=log.parent)
    wall = time.perf_counter() - t0
    if code != 0:
        raise RuntimeError(f"{cmd[:4]} failed ({code}); see {log}")
    rss, user, system = usage.read_text().split()[-3:]
    CPU_SECONDS[str(log)] = float(user) + float(system)
    return wall, int(rss) if memory else None


class Contender:
    def __init__(self, name: str, make_cmd, read):
        self.name, self.make_cmd, self.read, self.n = name, make_cmd, read, 0
        self.rates, self.quiet, self.walls, self.cpus, self.mems, self.extra = [], [], [], [], [], []

    def __call__(self, root: Path, record: bool, memory: bool = False):
        self.n += 1
        d = root / f"{self.name}.{self.n}"
        # A run folder of this benchmark's own from an earlier invocation: safebasin refuses to
        # run over a finished result, so every run starts from an empty folder.
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        wall, mem = run_process(self.make_cmd(d), d / "log.txt", memory)
        r, extra = self.read(d)
        if record:
            self.rates.append(r)
            self.quiet.append(extra.pop("quiet"))
            self.walls.append(wall)
            self.cpus.append(CPU_SECONDS[str(d / "log.txt")])
            self.mems.append(mem)
            self.extra.append(extra)


def safebasin_side(name: str, cfg: dict, root: Path) -> Contender:
    path = root / f"{name}.yaml"
    import yaml
    path.write_text(yaml.safe_dump(cfg))
    exe = str(Path(sys.executable).with_name("safebasin"))

    def cmd(d: Path):
        return [exe, "train", str(path), f"output.dir={d / 'run'}"]

    def read(d: Path):
        rows = [json.loads(line) for line in (d / "run" / "metrics.jsonl").read_text().splitlines()]
        secs, toks = [r["step_seconds"] for r in rows], [r["tokens"] for r in rows]
        extra = {"padding_share": statistics.mean(r["padding_share"] for r in rows),
                 "losses": [r["loss"] for r in rows], "quiet": quiet_rate(secs, toks)}
        return rate(secs, toks), extra
    return Contender(name, cmd, read)


def script_side(name: str, script: str, args: list[str]) -> Contender:
    def cmd(d: Path):
        return [sys.executable, str(SIDES / script), *args, str(d / "result.json")]

    def read(d: Path):
        res = json.loads((d / "result.json").read_text())
        ends = res["step_ends"]
        secs = [b - a for a, b in zip(ends, ends[1:])]
        return rate(secs, res["tokens"]), {"losses": res["losses"], "quiet": quiet_rate(secs, res["tokens"])}
    return Contender(name, cmd, read)


def interleave(contenders: list[Contender], root: Path, reps: int, memory: bool = False) -> None:
    for c in contenders:  # warm-up round: caches, tokenisation, the MLflow store
        c(root, record=False)
    for rep in range(reps):
        for c in contenders:
            c(root, record=True, memory=memory)
            print(f"  {c.name} rep {rep + 1}: {c.rates[-1]:.0f} tok/s, process {c.walls[-1]:.1f} s", flush=True)


def med(xs):
    return statistics.median(xs)


def hf_ds_config(root: Path, stage: int) -> Path:
    cfg = json.loads((REPO / "ds_configs" / f"zero{stage}.json").read_text())
    cfg["optimizer"]["params"]["torch_adam"] = True  # FusedAdam needs CUDA
    path = root / f"hf_zero{stage}.json"
    path.write_text(json.dumps(cfg))
    return path


def part_throughput(stage: int, args, root: Path, lines: list[str]) -> None:
    cfg = base_config(args.model, args.steps, root, stage)
    stream = write_stream(cfg, root / f"stream{stage}.json")
    sides = [safebasin_side(f"safebasin_z{stage}", cfg, root), script_side("plain", "plain_loop.py", [str(stream)])]
    if not args.no_hf:
        sides.append(script_side(f"hf_trainer_z{stage}", "hf_trainer.py", [str(stream), str(hf_ds_config(root, stage))]))
    interleave(sides, root, args.reps)
    sb, plain = sides[0], sides[1]
    loss_gap = max(abs(a - b) for a, b in zip(sb.extra[0]["losses"], plain.extra[0]["losses"]))
    lines.append(f"| LoRA ZeRO-{stage} tokens/s, median of rounds | safebasin {med(sb.rates):.0f} | plain {med(plain.rates):.0f} | "
                 f"**{med(sb.rates) / med(plain.rates):.3f}** of plain (target >= 0.95) |")
    lines.append(f"| LoRA ZeRO-{stage} tokens/s, fast tail (p10 step) | safebasin {med(sb.quiet):.0f} | plain {med(plain.quiet):.0f} | "
                 f"**{med(sb.quiet) / med(plain.quiet):.3f}** of plain |")
    if len(sides) > 2:
        hf = sides[2]
        lines.append(f"| HF Trainer ZeRO-{stage} tokens/s | HF {med(hf.rates):.0f} | plain {med(plain.rates):.0f} | "
                     f"{med(hf.rates) / med(plain.rates):.3f} of plain; safebasin / HF = "
                     f"**{med(sb.rates) / med(hf.rates):.3f}** (target > 1); fast tail: HF {med(hf.quiet):.0f}, "
                     f"safebasin / HF {med(sb.quiet) / med(hf.quiet):.3f} |")
    lines.append(f"| whole process, {args.steps} steps, ZeRO-{stage} | safebasin {med(sb.walls):.1f} s | plain "
                 f"{med(plain.walls):.1f} s | **{med(sb.walls) - med(plain.walls):+.1f} s** (target <= +3 s) |")
    lines.append(f"| whole process CPU seconds (user+sys), ZeRO-{stage} | safebasin {med(sb.cpus):.1f} s | plain "
                 f"{med(plain.cpus):.1f} s | {med(sb.cpus) - med(plain.cpus):+.1f} s"
                 + (f"; HF Trainer {med(sides[2].cpus):.1f} s" if len(sides) > 2 else "") + " |")
    lines.append(f"| loss, max abs difference per step, safebasin vs plain, ZeRO-{stage} | | | {loss_gap:.2e} |")


def make_basis(model: str, root: Path) -> Path:
    """An anchor basis from a seeded perturbation of the model standing in for its aligned
    version (the benchmark measures cost, which does not depend on the basis's content)."""
    import torch
    from safebasin.safety_core.anchor.basis import extract_basis
    from safebasin.safety_core.train.tiny import resolve_builtin_model
    from transformers import AutoModelForCausalLM
    base = resolve_builtin_model(model)
    aligned = root / "aligned"
    if not (aligned / "config.json").exists():
        m = AutoModelForCausalLM.from_pretrained(base)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g))
        m.save_pretrained(aligned)
    out = root / "basis"
    if not (out / "manifest.json").exists():
        extract_basis(str(aligned), base, out, modules=["q_proj", "v_proj"], variant="projector", rank=8)
    return out


def part_anchor(args, root: Path, lines: list[str]) -> None:
    basis = make_basis(args.model, root)
    plain = safebasin_side("lora_z2", base_config(args.model, args.steps, root, 2), root)
    anchored = safebasin_side("anchored_z2", base_config(args.model, args.steps, root, 2, **{
        "anchor.basis": str(basis), "anchor.lambda": 10.0}), root)
    interleave([plain, anchored], root, args.reps)
    lines.append(f"| anchored / plain LoRA tokens/s (ZeRO-2, both safebasin) | anchored {med(anchored.rates):.0f} | "
                 f"plain LoRA {med(plain.rates):.0f} | **{med(anchored.rates) / med(plain.rates):.3f}** (target >= 0.98); "
                 f"fast tail {med(anchored.quiet) / med(plain.quiet):.3f} |")


def part_packing(args, root: Path, lines: list[str]) -> None:
    data = {"data.train": {"path": str(ALPACA)}, "data.num_examples": 1000, "data.max_length": 512}
    padded = safebasin_side("alpaca_padded", base_config(args.model, args.steps, root, 0, **data), root)
    packed = safebasin_side("alpaca_packed", base_config(args.model, args.steps, root, 0, **data,
                                                          **{"data.packing": True}), root)
    interleave([padded, packed], root, args.reps)
    share = statistics.mean(e["padding_share"] for e in padded.extra)
    lines.append(f"| real tokens/s, Alpaca (mixed lengths, max 512, micro-batch 8), ZeRO-0 | packed "
                 f"{med(packed.rates):.0f} | padded {med(padded.rates):.0f} | **{med(packed.rates) / med(padded.rates):.2f}x**;"
                 f" padding share {share:.1%} padded, {statistics.mean(e['padding_share'] for e in packed.extra):.1%} packed |")


def part_memory(args, root: Path, lines: list[str]) -> None:
    data = {"data.train": {"path": str(ALPACA)}, "data.num_examples": 1000, "data.max_length": 512,
            "train.micro_batch_size": 16}
    plain = safebasin_side("mem_plain", base_config(args.model, 12, root, 0, **data), root)
    ckpt = safebasin_side("mem_ckpt", base_config(args.model, 12, root, 0, **data,
                                                   **{"train.gradient_checkpointing": True}), root)
    interleave([plain, ckpt], root, 1, memory=True)
    lines.append(f"| peak RSS, micro-batch 16 x up to 512 tokens, ZeRO-0 | checkpointing {ckpt.mems[0] / 1024:.0f} MiB | "
                 f"without {plain.mems[0] / 1024:.0f} MiB | {(ckpt.mems[0] - plain.mems[0]) / 1024:+.0f} MiB; "
                 f"tokens/s {ckpt.rates[0]:.0f} vs {plain.rates[0]:.0f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin:tiny-llama")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--parts", default="zero0,zero2,anchor,packing,memory")
    p.add_argument("--no-hf", action="store_true", help="leave out the Hugging Face Trainer side")
    p.add_argument("--out", default="/tmp/safebasin-bench-trainer")
    args = p.parse_args()
    root = Path(args.out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    lines = ["| measure | A | B | ratio |", "|---|---|---|---|"]
    for part in args.parts.split(","):
        print(f"== {part}", flush=True)
        if part in ("zero0", "zero2"):
            part_throughput(int(part[-1]), args, root, lines)
        else:
            {"anchor": part_anchor, "packing": part_packing, "memory": part_memory}[part](args, root, lines)
        print("\n".join(lines), flush=True)
    (root / "table.md").write_text("\n".join(lines) + "\n")
    print(f"\nmodel {args.model}, {args.steps} steps, {args.reps} rounds; table in {root / 'table.md'}")


if __name__ == "__main__":
    main()
