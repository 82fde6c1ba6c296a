"""Kernels: time and achieved bandwidth of the anchor penalty (LoRA and full form, forward +
backward) and of the two-loop recursion's fused multi-dot and linear combination, against
separate per-vector operations and, on a GPU, Triton against the PyTorch reference and the
dense formulation.

    python benchmarks/kernel_bench.py [--numel 16777216 --history 10 --reps 5]

On CPU only the PyTorch reference runs (Triton needs a GPU; its correctness on CPU is covered by
the interpreter tests in tests/test_kernels.py). Bytes are the traffic each implementation's
passes must move (analytic); bandwidth = bytes / best time.

Not named kernels.py: run as a script, this folder comes first on sys.path, and a kernels
module here would shadow Hugging Face's kernels package, which transformers imports.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from safebasin.kernels import anchor_penalty, anchor_penalty_full, lin_comb, multi_dot
from timing import interleaved, timed, with_backend

# Nominal HBM bandwidth (bytes/s) by device-name fragment, most specific first.
PEAK_HBM = [("H200", 4.8e12), ("H100 NVL", 3.9e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12),
            ("A100-SXM4-80GB", 2.04e12), ("A100 80GB PCIe", 1.94e12), ("A100", 1.555e12)]


def device_peak(device: torch.device) -> tuple[str, float | None]:
    if device.type != "cuda":
        return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, no GPU", None
    name = torch.cuda.get_device_name(device)
    return name, next((bw for key, bw in PEAK_HBM if key in name), None)


def backward_of(fn, *params):
    def run():
        for p in params:
            p.grad = None
        fn().backward()
    return run


def dense_penalty(DeltaW, U, c):
    I_C = torch.eye(U.shape[0], device=U.device) - U @ torch.diag(c) @ U.T
    return (I_C @ DeltaW).pow(2).sum()


def contenders(device, base: dict) -> dict:
    """base: {label: fn} run on the default backend (auto: Triton on a GPU, torch on CPU). On a
    GPU each is also run forced onto the torch reference."""
    if device.type != "cuda":
        return {f"{label} [torch]": fn for label, fn in base.items()}
    runs = {}
    for label, fn in base.items():
        runs[f"{label} [triton]"] = fn
        runs[f"{label} [torch]"] = with_backend("torch", fn)
    return runs


def report(title: str, best: dict, nbytes: dict, peak: float | None, stream: float) -> None:
    print(f"\n{title}")
    for label, t in best.items():
        moved = next(b for key, b in nbytes.items() if label.startswith(key))
        bw = moved / t
        share = f"{100 * bw / peak:5.1f}% of HBM peak" if peak else f"{100 * bw / stream:5.1f}% of measured stream"
        print(f"  {label:34s}{t * 1e3:10.3f} ms {moved / 1e6:9.1f} MB {bw / 1e9:8.1f} GB/s  {share}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=4096, help="d_out = d_in of the penalty weight")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--numel", type=int, default=1 << 24, help="P, the flat vector length")
    parser.add_argument("--history", type=int, default=10, help="m: 2m history rows")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--dense", action="store_true", help="also time the dense formulation on CPU (slow)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    t_start = time.perf_counter()
    name, peak = device_peak(device)
    gen = torch.Generator().manual_seed(0)
    randn = lambda *shape: torch.randn(*shape, generator=gen).to(device)  # noqa: E731
    d, r, k, P, n = args.d, args.r, args.k, args.numel, 2 * args.history

    # Stream bandwidth this device reaches with a plain read (sum) of 256 MiB: the practical roofline.
    big = randn(1 << 26)
    stream = big.numel() * 4 / interleaved({"sum": timed(lambda: big.sum(), device)}, args.reps)["sum"]
    del big
    print(f"device: {name}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"best of {args.reps} interleaved runs")
    print(f"measured stream read: {stream / 1e9:.1f} GB/s" + (f"; nominal HBM peak {peak / 1e12:.2f} TB/s" if peak else ""))

    # -- anchor penalty ------------------------------------------------------------------------
    U = torch.linalg.qr(torch.randn(d, k, generator=gen))[0].to(device)
    c = torch.rand(k, generator=gen).to(device)
    B = (0.01 * randn(d, r)).requires_grad_(True)
    A = (0.01 * randn(r, d)).requires_grad_(True)
    W0 = randn(d, d)
    W = (W0 + 0.01 * randn(d, d)).requires_grad_(True)
    lora = {"LoRA": backward_of(lambda: anchor_penalty(B, A, U, c), B, A)}
    full = {"full": backward_of(lambda: anchor_penalty_full(W, W0, U, c), W)}
    runs = {**contenders(device, lora), **contenders(device, full)}
    if device.type == "cuda" or args.dense:
        runs["LoRA [dense C]"] = backward_of(lambda: dense_penalty(B @ A, U, c), B, A)
        runs["full [dense C]"] = backward_of(lambda: dense_penalty(W - W0, U, c), W)
    best = interleaved({label: timed(fn, device) for label, fn in runs.items()}, args.reps)
    f32 = 4
    # Our passes: LoRA reads U and B three times, A twice, writes dB, dA; full reads W, W0 twice,
    # U twice, writes dW. The dense formulation needs at least C (d x d) written and read.
    nbytes = {"LoRA [dense": (d * d * 2 + 3 * d * r) * f32, "full [dense": (d * d * 5) * f32,
              "LoRA": (3 * d * k + 4 * d * r + 3 * r * d) * f32, "full": (5 * d * d + 2 * d * k) * f32}
    report(f"anchor penalty, forward + backward: {d} x {d}, r {r}, k {k}", best, nbytes, peak, stream)

    # -- two-loop pieces ------------------------------------------------------------------------
    basis = randn(n, P)
    v = randn(P)
    coeffs = randn(n)

    def separate_dots():
        return torch.stack([torch.dot(basis[i], v) for i in range(n)])

    def separate_axpys():
        out = 0.5 * v
        for i in range(n):
            out.add_(basis[i], alpha=float(coeffs[i]))
        return out

    base = {"multi_dot fused": lambda: multi_dot(v, basis),
            "lin_comb fused": lambda: lin_comb(coeffs, basis, v, 0.5)}
    runs = {**contenders(device, base), "multi_dot separate dots": separate_dots,
            "lin_comb separate axpys": separate_axpys,
            "lin_comb matmul + axpy (old ref)": lambda: coeffs @ basis + 0.5 * v}
    best = interleaved({label: timed(fn, device) for label, fn in runs.items()}, args.reps)
    nbytes = {"multi_dot fused": (n + 1) * P * f32, "multi_dot separate": 2 * n * P * f32,
              "lin_comb fused": (n + 2) * P * f32, "lin_comb separate": (2 + 3 * n) * P * f32,
              "lin_comb matmul": (n + 6) * P * f32}
    report(f"two-loop pieces: {n} history rows x P = {P:,} fp32", best, nbytes, peak, stream)
    fused_md = next(t for key, t in best.items() if key.startswith("multi_dot fused"))
    fused_lc = next(t for key, t in best.items() if key.startswith("lin_comb fused"))
    print(f"  multi_dot: separate dots move {2 * n / (n + 1):.2f}x the bytes of the fused pass "
          f"(2n / (n + 1), target >= 1.8x) and take {best['multi_dot separate dots'] / fused_md:.2f}x its time "
          f"(target >= 1.5x)")
    print(f"  lin_comb : separate axpys move {(2 + 3 * n) / (n + 2):.2f}x the bytes and take "
          f"{best['lin_comb separate axpys'] / fused_lc:.2f}x the time; the old reference took "
          f"{best['lin_comb matmul + axpy (old ref)'] / fused_lc:.2f}x")
    print(f"\ntotal wall time {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
