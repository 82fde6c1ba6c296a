"""The prepared GPU check (run through benchmarks/gpu_check.sh): on one H100/H200, in at most 8
minutes, with one summary at the end.

1. kernels: every Triton kernel on CUDA tensors against the PyTorch reference (values and
   gradients, fp32 and bf16);
2. kernel benchmarks (benchmarks/kernel_bench.py) against the device's HBM roofline: anchor penalty
   (full form) >= 60% of peak bandwidth, fused multi-dot >= 1.5x faster than separate dots;
3. a bf16 ZeRO-2 anchored LoRA job on the model (default builtin:smollm2-135m-instruct; set
   GPU_CHECK_MODEL to a local folder otherwise), then a restoration of its adapter;
4. `safebasin eval` on 16 prompts (prompts/s, whole process);
5. benchmarks/gpu_rank_binding.py, when the repository has it;
6. benchmarks/gpu_scale.py (8B-shape LoRA against a plain loop and the HF Trainer, 1B full ZeRO-3,
   restoration, eval, the penalty kernel at 8B layer shapes) in the time left of the 8 minutes.

    python benchmarks/gpu_check.py [--out DIR] [--smoke]

--smoke runs sections 3-4 on the CPU with the tiny model in fp32 (what a CPU can check: the
configs and commands are valid); without it and without CUDA the check stops at once, exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
# gpu_check.sh stops everything at 480 s; the last section gets what is left, less this margin
# for the summary.
BUDGET, MARGIN = 480, 20
START = time.perf_counter()
BENCH = REPO / "benchmarks"
RESULTS: list[tuple[str, str, str]] = []  # (section, PASS/FAIL/INFO, detail)


def record(section: str, ok: bool | None, detail: str) -> None:
    status = "INFO" if ok is None else ("PASS" if ok else "FAIL")
    RESULTS.append((section, status, detail))
    print(f"[{status}] {section}: {detail}", flush=True)


def run(cmd: list[str], log: Path, timeout: int, env: dict | None = None) -> tuple[int, float, str]:
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=log.parent,
                              env={**os.environ, **(env or {})})
        code, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        code, out = 124, f"timed out after {timeout} s\n{e.stdout or ''}{e.stderr or ''}"
    log.write_text(out if isinstance(out, str) else out.decode(errors="replace"))
    return code, time.perf_counter() - t0, out if isinstance(out, str) else ""


# -- 1. kernels on CUDA tensors -----------------------------------------------------------------

def kernel_correctness() -> None:
    import torch
    from safebasin.kernels import anchor_penalty, anchor_penalty_full, lin_comb, multi_dot
    from timing import with_backend
    gen = torch.Generator().manual_seed(0)
    dev = torch.device("cuda")
    failures = []
    for dtype, rtol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
        def randn(*shape, scale=1.0):
            return (scale * torch.randn(*shape, generator=gen)).to(dev, dtype)
        d_out, d_in, r, k, P, n = 1031, 777, 8, 64, 1_000_003, 20
        U = torch.linalg.qr(torch.randn(d_out, k, generator=gen))[0].to(dev, dtype)
        c = torch.rand(k, generator=gen).to(dev, dtype)
        B, A = randn(d_out, r, scale=0.1), randn(r, d_in, scale=0.1)
        W0 = randn(d_out, d_out)
        W = W0 + randn(d_out, d_out, scale=0.01)
        basis, v = randn(n, P), randn(P)
        coeffs = torch.randn(n, generator=gen).to(dev)  # coefficients stay fp32, as the optimizer keeps them

        def lora():
            b, a = B.clone().requires_grad_(True), A.clone().requires_grad_(True)
            val = anchor_penalty(b, a, U, c)
            val.backward()
            return [val.detach().float(), b.grad.float(), a.grad.float()]

        def full():
            w = W.clone().requires_grad_(True)
            val = anchor_penalty_full(w, W0, U, c)
            val.backward()
            return [val.detach().float(), w.grad.float()]

        cases = {"anchor_penalty (LoRA)": lora, "anchor_penalty_full": full,
                 "multi_dot": lambda: [multi_dot(v, basis).float()],
                 "lin_comb": lambda: [lin_comb(coeffs, basis, v, -0.5).float()]}
        for name, fn in cases.items():
            got, want = with_backend("triton", fn)(), with_backend("torch", fn)()
            for g, w in zip(got, want):
                err = float((g - w).abs().max() / w.abs().max().clamp_min(1e-30))
                if not err <= rtol:
                    failures.append(f"{name} {dtype}: max rel. error {err:.2e} > {rtol:.0e}")
    record("kernels on CUDA (Triton vs torch, fp32+bf16, values+grads)", not failures,
           "; ".join(failures) or "4 kernels x 2 dtypes agree")


def kernel_benchmark(out: Path) -> None:
    code, secs, text = run([sys.executable, str(BENCH / "kernel_bench.py"), "--reps", "5"], out / "kernels.log", 240)
    if code != 0:
        record("kernel benchmarks", False, f"benchmarks/kernel_bench.py exit {code}; see {out / 'kernels.log'}")
        return
    share = re.search(r"^\s*full \[triton\].*?([\d.]+)% of HBM peak", text, re.M)
    lora = re.search(r"^\s*LoRA \[triton\].*?([\d.]+)% of HBM peak", text, re.M)
    md = re.search(r"multi_dot: .*?take ([\d.]+)x its time", text)
    if share:
        record("anchor penalty (full form) bandwidth", float(share[1]) >= 60,
               f"{share[1]}% of HBM peak (target >= 60%)" + (f"; LoRA form {lora[1]}% (latency-bound at this size)"
                                                            if lora else ""))
    else:
        record("anchor penalty bandwidth", False, "no '% of HBM peak' line: device not in PEAK_HBM?")
    if md:
        record("multi-dot vs separate dots", float(md[1]) >= 1.5, f"{md[1]}x faster (target >= 1.5x)")
    record("kernel benchmark time", None, f"{secs:.0f} s; full report in {out / 'kernels.log'}")


# -- 3-4. jobs ----------------------------------------------------------------------------------

def make_basis(model_path: str, out: Path) -> Path:
    """An anchor basis from a seeded perturbation of the model standing in for its aligned
    version: this checks that the job runs on the GPU, not the basis's safety content."""
    import torch
    from safebasin.safety_core.anchor.basis import extract_basis
    from transformers import AutoModelForCausalLM
    aligned, basis = out / "aligned", out / "basis"
    if not (aligned / "config.json").exists():
        m = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.002 * torch.randn(p.shape, generator=g))
        m.save_pretrained(aligned)
    if not (basis / "manifest.json").exists():
        extract_basis(str(aligned), model_path, basis, modules=["q_proj", "v_proj"], variant="projector", rank=8)
    return basis


def jobs(out: Path, model: str, smoke: bool) -> None:
    from safebasin.safety_core.train.modeling import ModelArgs
    script = Path(sys.executable).with_name("safebasin")
    # Installed with --target (wheels carried to a bare machine) there is no console script
    # beside the interpreter; the module runs the same command.
    exe = [str(script)] if script.exists() else [sys.executable, "-m", "safebasin.launcher.cli"]
    path = ModelArgs(path=model).resolved_path()
    basis = make_basis(path, out)
    precision, dtype = ("fp32", "float32") if smoke else ("bf16", "bfloat16")
    import importlib.util
    tracking = importlib.util.find_spec("mlflow") is not None
    if not tracking:
        record("tracking", None, "mlflow is not installed here: the jobs run with tracking.enabled=false")
    common = {"tracking": {"experiment": "gpu-check", "uri": f"sqlite:///{out / 'mlflow.db'}", "enabled": tracking}}
    train_cfg = {"model": {"path": model, "dtype": dtype},
                 "method": {"type": "lora", "r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]},
                 "data": {"train": {"path": "builtin:task"}, "harmful_mix": {"source": {"path": "builtin:harmful"},
                                                                           "fraction": 0.1},
                          "num_examples": 256, "max_length": 256, "packing": True},
                 "train": {"max_steps": 6 if smoke else 40, "lr": 1e-4, "micro_batch_size": 8,
                           "precision": precision, "warmup_steps": 2},
                 "deepspeed": {"stage": 2},
                 "anchor": {"basis": str(basis), "lambda": 1.0},
                 "output": {"dir": str(out / "train")}, **common}
    (out / "train.yaml").write_text(yaml.safe_dump(train_cfg))
    code, secs, _ = run([*exe, "train", str(out / "train.yaml")], out / "train.log", 200)
    rows = [json.loads(x) for x in (out / "train" / "metrics.jsonl").read_text().splitlines()] \
        if (out / "train" / "metrics.jsonl").exists() else []
    ok = code == 0 and rows and all(r["loss"] == r["loss"] and "anchor_penalty" in r for r in rows)
    rate = sum(r["tokens"] for r in rows[5:]) / max(1e-9, sum(r["step_seconds"] for r in rows[5:])) if rows else 0
    record(f"{precision} ZeRO-2 anchored LoRA train on {model}", bool(ok),
           f"exit {code}, {len(rows)} steps, loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f}, "
           f"{rate:.0f} tokens/s, process {secs:.0f} s" if rows else f"exit {code}; see {out / 'train.log'}")
    if not ok:
        return
    restore_cfg = {"model": {"path": model, "adapter": str(out / "train" / "adapter"), "dtype": dtype},
                   "restore": {"forget": {"path": "builtin:harmful"}, "retain": {"path": "builtin:task"},
                               "forget_size": 32, "curvature_forget_size": 64, "retain1_size": 64,
                               "retain2_size": 64, "iterations": 2, "probes": 8, "batch_size": 8,
                               "max_length": 256},
                   "deepspeed": {"stage": 2}, "output": {"dir": str(out / "restore")}, **common}
    (out / "restore.yaml").write_text(yaml.safe_dump(restore_cfg))
    code, secs, _ = run([*exe, "restore", str(out / "restore.yaml")], out / "restore.log", 150)
    res = out / "restore" / "results.json"
    summary = json.loads(res.read_text()) if code == 0 and res.exists() else None
    record("restoration of that adapter", summary is not None,
           (f"forget loss {summary['initial']['forget_loss']:.3f} -> {summary['restored']['forget_loss']:.3f}, "
            f"{summary['accepted_steps']} steps accepted, process {secs:.0f} s") if summary
           else f"exit {code}; see {out / 'restore.log'}")
    eval_cfg = {"model": {"path": model, "adapter": str(out / "train" / "adapter"), "dtype": dtype},
                "eval": {"harmful": {"path": "builtin:harmful-heldout", "limit": 16}, "judge": {"name": "keyword"},
                         "max_new_tokens": 64, "batch_size": 16},
                "output": {"dir": str(out / "eval")}, **common}
    (out / "eval.yaml").write_text(yaml.safe_dump(eval_cfg))
    code, secs, _ = run([*exe, "eval", str(out / "eval.yaml")], out / "eval.log", 120)
    record("safebasin eval, 16 prompts", code == 0 and (out / "eval" / "results.json").exists(),
           f"exit {code}, {16 / secs:.2f} prompts/s whole process ({secs:.0f} s)")
    vllm_eval(out, eval_cfg, exe, smoke)


def vllm_eval(out: Path, hf_cfg: dict, exe: list[str], smoke: bool) -> None:
    """eval.engine=vllm on the same prompts and adapter: its greedy answers should match hf's
    (same prompts, prefilled tokens and stop ids; kernels differ, so a few may diverge late)."""
    import importlib.util
    if smoke or importlib.util.find_spec("vllm") is None:
        record("safebasin eval, eval.engine=vllm", None, "vllm not installed here (or --smoke); skipped")
        return
    cfg = {**hf_cfg, "eval": {**hf_cfg["eval"], "engine": "vllm"}, "output": {"dir": str(out / "eval_vllm")}}
    (out / "eval_vllm.yaml").write_text(yaml.safe_dump(cfg))
    code, secs, _ = run([*exe, "eval", str(out / "eval_vllm.yaml")], out / "eval_vllm.log", 180)
    records = out / "eval_vllm" / "eval_records.jsonl"
    if code != 0 or not records.exists():
        record("safebasin eval, eval.engine=vllm", False, f"exit {code}; see {out / 'eval_vllm.log'}")
        return
    def answers(path):
        return [json.loads(line)["response"] for line in path.read_text().splitlines()]
    mine, theirs = answers(records), answers(out / "eval" / "eval_records.jsonl")
    same = sum(a == b for a, b in zip(mine, theirs))
    record("safebasin eval, eval.engine=vllm", len(mine) == len(theirs),
           f"{16 / secs:.2f} prompts/s whole process ({secs:.0f} s); {same}/{len(mine)} answers identical to hf")


def rank_binding(out: Path) -> None:
    script = BENCH / "gpu_rank_binding.py"
    if not script.exists():
        record("rank binding", None, "benchmarks/gpu_rank_binding.py not in this checkout; skipped")
        return
    code, secs, text = run([sys.executable, str(script)], out / "rank_binding.log", 90)
    record("rank binding (benchmarks/gpu_rank_binding.py)", code == 0,
           f"exit {code} in {secs:.0f} s; last line: {text.strip().splitlines()[-1] if text.strip() else ''}")


def scale(out: Path) -> None:
    left = int(BUDGET - MARGIN - (time.perf_counter() - START))
    if left < 60:
        record("gpu_scale", None, f"not run: {left} s left of the check's {BUDGET} s")
        return
    code, secs, text = run([sys.executable, str(BENCH / "gpu_scale.py"), "--out", str(out / "scale"),
                            "--budget", str(left - 10)], out / "scale.log", left)
    skipped = re.search(r"(\d+) contender\(s\) not run", text)
    record("gpu_scale (8B LoRA sides, 1B ZeRO-3, restore, eval, penalty kernel)", code == 0,
           f"exit {code} in {secs:.0f} s" + (f", {skipped[1]} contender(s) left for want of time" if skipped else "")
           + f"; table {out / 'scale' / 'scale.md'}, figures {out / 'scale' / 'scale.json'}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="/tmp/safebasin-gpu-check")
    p.add_argument("--smoke", action="store_true", help="CPU: the job sections with the tiny model in fp32")
    args = p.parse_args()
    import torch
    if not args.smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA device is visible (torch.cuda.is_available() is False); this check "
              "needs one H100/H200. On a CPU, --smoke runs the job sections with the tiny model.",
              file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(BENCH))
    t0 = time.perf_counter()
    model = os.environ.get("GPU_CHECK_MODEL", "builtin:tiny-llama" if args.smoke else "builtin:smollm2-135m-instruct")
    sections = [("jobs", lambda: jobs(out, model, args.smoke))]
    if not args.smoke:
        device = torch.cuda.get_device_name(0)
        record("device", None, f"{device}, torch {torch.__version__}, CUDA {torch.version.cuda}")
        sections = [("kernels", kernel_correctness), ("kernel benchmarks", lambda: kernel_benchmark(out)),
                    *sections, ("rank binding", lambda: rank_binding(out)), ("gpu_scale", lambda: scale(out))]
    for name, fn in sections:
        try:
            fn()
        except Exception as e:  # one section's failure is reported and the others still run
            record(name, False, f"{type(e).__name__}: {e}")
    print(f"\n==== safebasin GPU check summary ({time.perf_counter() - t0:.0f} s, logs in {out}) ====")
    for section, status, detail in RESULTS:
        print(f"{status:4s}  {section}: {detail}")
    failed = sum(s == "FAIL" for _, s, _ in RESULTS)
    print(f"==== {failed} failed ====")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
