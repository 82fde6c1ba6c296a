"""Vector-free L-BFGS: cost of one direction against one backward pass, collectives and bytes
per direction against the classic two-loop, and memory per rank at 1 and 2 ranks.

    python benchmarks/lbfgs.py [--layers 4 --hidden 512 --vocab 8000 --history 10]

A random LlamaForCausalLM is built locally (no hub). The curvature pairs are random vectors of the
model's size: the two-loop costs the same whatever they hold. Two ranks are two gloo processes that
map the same shared-memory pairs and each keep only their shard.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
from safebasin.kernels import lin_comb, multi_dot
from safebasin.launcher.launch import free_port
from safebasin.safety_core.restore.lbfgs import CurvatureBuffer, shard_range
from timing import interleaved, timed


def rss_anon() -> int:
    """Private resident bytes: shared-memory pages mapped from the parent are not this rank's cost."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("RssAnon not in /proc/self/status")


def build_model(args):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         num_key_value_heads=args.hidden // 64, max_position_embeddings=args.seq,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).float()


def backward_run(model, args, batch: int | None = None):
    """One forward (not timed) and one timed backward on a batch x seq token batch."""
    ids = torch.randint(0, args.vocab, (batch or args.batch, args.seq), generator=torch.Generator().manual_seed(1))

    def run() -> float:
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        t0 = time.perf_counter()
        loss.backward()
        return time.perf_counter() - t0
    return run


def with_lora(model, r: int = 8):
    """The model wrapped in place with LoRA on q and v, and its trainable size."""
    from peft import LoraConfig, get_peft_model
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"]))
    return peft_model, sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


def make_pairs(numel: int, history: int) -> torch.Tensor:
    """Rows s_0, y_0, ..., s_{m-1}, y_{m-1}, g with <s_i, y_i> > 0."""
    gen = torch.Generator().manual_seed(2)
    rows = torch.randn(2 * history + 1, numel, generator=gen)
    rows[1:2 * history:2] = 0.5 * rows[0:2 * history:2] + 0.1 * rows[1:2 * history:2]
    return rows


def filled_buffer(rows: torch.Tensor, history: int, start: int, end: int) -> CurvatureBuffer:
    buf = CurvatureBuffer(history=history)
    for i in range(history):
        assert buf.push(rows[2 * i, start:end], rows[2 * i + 1, start:end])
    return buf


def direction_comm(buf: CurvatureBuffer, g: torch.Tensor) -> tuple[int, int]:
    """(all-reduce calls, floats) of one apply_inverse."""
    calls, floats = buf.stats.all_reduce_calls, buf.stats.floats_reduced
    buf.apply_inverse(g)
    return buf.stats.all_reduce_calls - calls, buf.stats.floats_reduced - floats


class NaiveTwoLoop:
    """The classic two-loop over sharded vectors: each inner product is its own all-reduce
    (2m of them), plus one for the scalars the trust region needs. rho and gamma are cached
    at push time, as any implementation would."""

    def __init__(self, rows: torch.Tensor, history: int, world: int):
        self.s = [rows[2 * i].clone() for i in range(history)]
        self.y = [rows[2 * i + 1].clone() for i in range(history)]
        self.world = world
        self.calls = self.floats = 0
        sy = self._reduce(torch.stack([s @ y for s, y in zip(self.s, self.y)]))
        self.rho = (1.0 / sy).tolist()
        self.gamma = float(sy[-1] / self._reduce(self.y[-1] @ self.y[-1]))
        self.calls = self.floats = 0  # push-time reductions are not part of a direction

    def _reduce(self, t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(-1).clone()
        self.calls += 1
        self.floats += t.numel()
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def direction(self, g: torch.Tensor) -> torch.Tensor:
        q = g.clone()
        m = len(self.s)
        alpha = [0.0] * m
        for i in reversed(range(m)):
            alpha[i] = self.rho[i] * float(self._reduce(self.s[i] @ q))
            q.add_(self.y[i], alpha=-alpha[i])
        r = q.mul_(self.gamma)
        for i in range(m):
            beta = self.rho[i] * float(self._reduce(self.y[i] @ r))
            r.add_(self.s[i], alpha=alpha[i] - beta)
        self._reduce(torch.stack([g @ g, g @ r, r @ r]))
        return r

    def comm(self, g: torch.Tensor) -> tuple[int, int]:
        self.calls = self.floats = 0
        self.direction(g)
        return self.calls, self.floats


def rank_main(rank: int, world: int, port: int, rows: torch.Tensor, history: int, reps: int, queue) -> None:
    torch.set_num_threads(1)  # one core per rank on a 2-core machine
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        start, end = shard_range(rows.shape[1], rank, world)
        base = rss_anon()
        buf = filled_buffer(rows, history, start, end)
        grown = rss_anon() - base
        g = rows[-1, start:end]
        naive = NaiveTwoLoop(rows[:, start:end], history, world)
        best = interleaved({"vf": timed(lambda: buf.apply_inverse(g)), "naive": timed(lambda: naive.direction(g))},
                           reps)
        queue.put((rank, dict(numel=end - start, nbytes=buf.nbytes, rss=grown, t_vf=best["vf"],
                              t_naive=best["naive"], vf_comm=direction_comm(buf, g), naive_comm=naive.comm(g),
                              d_norm_sq=buf.last_info.d_norm_sq)))
    finally:
        dist.destroy_process_group()



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--history", type=int, default=10)
    parser.add_argument("--forget-examples", type=int, default=50,
                        help="|D_forget| (restore.forget_size): the gradient each direction preconditions")
    parser.add_argument("--reps", type=int, default=4)
    args = parser.parse_args()
    m = args.history
    t_start = time.perf_counter()

    # (a) one direction vs one backward, 1 rank: full parameters, then LoRA (r=8, q/v).
    model = build_model(args)
    numel = sum(p.numel() for p in model.parameters())
    rows = make_pairs(numel, m)
    base = rss_anon()
    buf = filled_buffer(rows, m, 0, numel)
    rss_one = rss_anon() - base
    g = rows[-1]
    naive = NaiveTwoLoop(rows, m, 1)
    coeffs = torch.randn(2 * m)
    full = interleaved({"backward": backward_run(model, args), "vf": timed(lambda: buf.apply_inverse(g)),
                        "naive": timed(lambda: naive.direction(g)),
                        # The floor for any two-loop over this buffer: the dots must finish before the
                        # combination starts, so it is read twice; a plain sum is one read at stream speed.
                        "pass": timed(lambda: rows[:2 * m].sum()),
                        # The two memory-bound pieces of apply_inverse, on their own.
                        "multi_dot": timed(lambda: multi_dot(g, rows[:2 * m])),
                        "lin_comb": timed(lambda: lin_comb(coeffs, rows[:2 * m], g, 0.5))}, args.reps)
    # What a restoration pays per direction: the gradient of L_forget over D_forget, one backward
    # over all its examples (at the paper's default of 50, a much larger batch than the one above).
    forget = interleaved({"backward": backward_run(model, args, args.forget_examples),
                          "vf": timed(lambda: buf.apply_inverse(g))}, max(2, args.reps // 2))
    vf_comm, naive_comm = direction_comm(buf, g), naive.comm(g)
    d_norm_one, nbytes_one = buf.last_info.d_norm_sq, buf.nbytes
    del buf, naive

    model.zero_grad(set_to_none=True)
    peft_model, n_lora = with_lora(model)
    lora_rows = make_pairs(n_lora, m)
    lora_buf = filled_buffer(lora_rows, m, 0, n_lora)
    lora_vf = timed(lambda: lora_buf.apply_inverse(lora_rows[-1]))
    lora = interleaved({"backward": backward_run(peft_model, args),
                        "vf": lambda: min(lora_vf() for _ in range(10))}, args.reps)
    del model, peft_model

    # (b), (c) two gloo ranks over the same shared flat vectors.
    import torch.multiprocessing as mp
    rows.share_memory_()
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(rank_main, args=(2, free_port(), rows, m, args.reps, queue), nprocs=2, join=True)
    ranks = dict(queue.get() for _ in range(2))
    # Sanity: the same direction at 2 ranks (fp32 dots over millions of terms, summed in another order).
    assert abs(ranks[0]["d_norm_sq"] - d_norm_one) <= 1e-3 * d_norm_one, "2-rank direction differs"
    assert all(r["vf_comm"] == vf_comm and r["naive_comm"] == naive_comm for r in ranks.values())

    mib = 2 ** 20
    pct = lambda t, ref: f"{100 * t / ref:6.2f}%"  # noqa: E731
    print(f"machine: {os.cpu_count()} CPU cores, no GPU, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads (1 per rank at 2 ranks); best of {args.reps} interleaved")
    print(f"model: Llama {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}: P = {numel:,} "
          f"(LoRA r=8 q,v: {n_lora:,}); batch {args.batch} x {args.seq} tokens; m = {m}")
    print("\n(a) one direction (apply_inverse, full buffer) vs one backward pass, 1 rank")
    print(f"  full-parameter: backward {full['backward'] * 1e3:8.1f} ms | vector-free {full['vf'] * 1e3:7.1f} ms "
          f"= {pct(full['vf'], full['backward'])} | classic two-loop {full['naive'] * 1e3:7.1f} ms "
          f"= {pct(full['naive'], full['backward'])}")
    print(f"  full-parameter, against the forget-set gradient ({args.forget_examples} x {args.seq} tokens): "
          f"backward {forget['backward'] * 1e3:8.1f} ms | vector-free {forget['vf'] * 1e3:7.1f} ms "
          f"= {pct(forget['vf'], forget['backward'])}")
    print(f"  LoRA          : backward {lora['backward'] * 1e3:8.1f} ms | vector-free {lora['vf'] * 1e3:7.2f} ms "
          f"= {pct(lora['vf'], lora['backward'])}")
    one_read = 2 * m * numel * 4
    moved = (2 * (2 * m + 1) + 1) * numel * 4  # multi_dot reads 2m+1 rows, lin_comb reads them and writes one
    stream = one_read / full["pass"]
    print(f"  vector-free moves {moved / 1e9:.2f} GB: {moved / full['vf'] / 1e9:.1f} GB/s; floor = 2 reads of the "
          f"buffer at stream speed ({stream / 1e9:.1f} GB/s): {2 * full['pass'] * 1e3:.1f} ms "
          f"= {pct(2 * full['pass'], full['backward'])}")
    print(f"  kernels (torch reference on CPU): multi_dot {full['multi_dot'] * 1e3:.1f} ms "
          f"({one_read / full['multi_dot'] / 1e9:.1f} GB/s), lin_comb {full['lin_comb'] * 1e3:.1f} ms "
          f"({one_read / full['lin_comb'] / 1e9:.1f} GB/s of buffer)")
    print("\n(b) collectives per direction (2 ranks, gloo)")
    print(f"  {'':18s}{'calls':>7s}{'floats':>8s}{'bytes':>7s}{'time':>10s}")
    for name, comm, key in (("vector-free", vf_comm, "t_vf"), ("classic two-loop", naive_comm, "t_naive")):
        t = max(r[key] for r in ranks.values())
        print(f"  {name:18s}{comm[0]:7d}{comm[1]:8d}{4 * comm[1]:7d}{t * 1e3:7.1f} ms")
    print(f"  classic / vector-free: {naive_comm[0] / vf_comm[0]:.0f}x collectives, "
          f"{naive_comm[1] / vf_comm[1]:.2f}x bytes, "
          f"{max(r['t_naive'] for r in ranks.values()) / max(r['t_vf'] for r in ranks.values()):.2f}x time; "
          f"a push reduces at most 4m-1 = {4 * m - 1} floats, once")
    print("\n(c) memory per rank (history storage, fp32)")
    print(f"  {'ranks':>6s}{'P_local':>13s}{'2 m P_local x 4 B':>20s}{'buffer':>13s}{'RssAnon growth':>16s}")
    for label, n, nbytes, rss in [("1", numel, nbytes_one, rss_one)] + [
            (f"2 (r{r})", ranks[r]["numel"], ranks[r]["nbytes"], ranks[r]["rss"]) for r in (0, 1)]:
        print(f"  {label:>6s}{n:13,d}{2 * m * n * 4 / mib:16.1f} MiB{nbytes / mib:9.1f} MiB{rss / mib:12.1f} MiB")
    print(f"  1 rank / 2 ranks: {nbytes_one / max(r['nbytes'] for r in ranks.values()):.2f}x")
    print(f"\ntotal wall time {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
