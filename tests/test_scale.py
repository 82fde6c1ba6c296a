"""Correct at scale: the collectives of the anchor's ZeRO-3 step, resuming on another world size,
restoration's history memory, checkpoint defaults, anchor coverage and the device rule."""

import os
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from test_anchor import dense_terms


@contextmanager
def one_rank_group():
    """This process as rank 0 of a world of 1 (as the CLI's single-rank job sets it up); the
    variables are restored after."""
    from safebasin.launcher.launch import single_process_env
    from safebasin.safety_core.distributed import init_distributed
    saved = dict(os.environ)
    try:
        single_process_env()
        init_distributed(5)
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@contextmanager
def counted_collectives(monkeypatch):
    """Counts the calls of torch.distributed's collectives (each still runs)."""
    counts = {}
    for name in ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast"):
        real = getattr(dist, name)

        def counting(*args, _real=real, _name=name, **kwargs):
            counts[_name] = counts.get(_name, 0) + 1
            return _real(*args, **kwargs)
        monkeypatch.setattr(dist, name, counting)
    yield counts
    monkeypatch.undo()


@pytest.fixture(scope="module")
def safelora_basis(tmp_path_factory, aligned_pair) -> Path:
    from safebasin.safety_core.anchor.basis import extract_basis
    base, aligned = aligned_pair
    out = tmp_path_factory.mktemp("basis") / "safelora"
    extract_basis(str(aligned), str(base), out, modules="q_proj,v_proj,up_proj", variant="safelora", rank=6)
    return out


def test_zero3_full_parameter_anchor_is_one_all_reduce_per_step(aligned_pair, safelora_basis, monkeypatch):
    """safelora (c != 1) under ZeRO-3: penalty, outside share and energy of all six anchored
    layers come from one all-reduce, and equal the dense formula."""
    import deepspeed
    from safebasin.safety_core.anchor.basis import load_basis
    from safebasin.safety_core.anchor.regularizer import AnchorArgs, AnchorRegularizer
    from safebasin.safety_core import zero3
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig
    config = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
              "zero_force_ds_cpu_optimizer": False}
    with one_rank_group():
        keep = HfDeepSpeedConfig(config)
        model = AutoModelForCausalLM.from_pretrained(aligned_pair[0])
        engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=config)
        reg = AnchorRegularizer(AnchorArgs(basis=str(safelora_basis), **{"lambda": 0.5}), engine.module, config)
        assert reg.method == "full" and len(reg.layers) == 6
        ids = torch.randint(0, 100, (2, 12))
        for step in range(2):  # the second step's DeltaW is the first step's update
            engine.backward(engine(input_ids=ids, labels=ids).loss)
            if step == 0:
                reg.before_step(engine)
                engine.step()
                continue
            with counted_collectives(monkeypatch) as counts:
                metrics = reg.before_step(engine)
            basis = load_basis(safelora_basis)
            penalty, outside, energy = 0.0, 0.0, 0.0
            for layer in reg.layers:  # one rank: its fragment is the whole weight
                lb = basis.layer(basis.match(layer.name))
                delta = (zero3.local_fp32(layer.W) - layer.W0).view(layer.shape)
                p, o, e = dense_terms(delta, lb.U, lb.c)
                penalty, outside, energy = penalty + float(p), outside + o, energy + e
            engine.step()
        del keep
    assert counts == {"all_reduce": 1}
    assert energy > 0
    assert metrics["anchor_penalty"] == pytest.approx(penalty, rel=1e-4)
    assert metrics["anchor_outside_share"] == pytest.approx(outside / energy, rel=1e-4)
    assert penalty > 1.01 * outside  # c < 1 penalises inside span(U) too: the two numerators differ


RESTORE = {"forget": {"path": "builtin:harmful"}, "retain": {"path": "builtin:task"},
           "forget_size": 8, "curvature_forget_size": 8, "retain1_size": 8, "retain2_size": 8,
           "probes": 3, "batch_size": 4, "max_length": 64, "iterations": 1}


def restore_job(root: Path, model_dir: Path, **restore) -> dict:
    import yaml
    from safebasin.launcher.config import load_config
    from safebasin.launcher.entry import run_restore
    cfg = {"model": {"path": str(model_dir)}, "restore": {**RESTORE, **restore}, "deepspeed": {"stage": 0},
           "tracking": {"enabled": False}, "output": {"dir": str(root / "out")}}
    root.mkdir(parents=True, exist_ok=True)
    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    with one_rank_group():
        return run_restore(load_config(root / "cfg.yaml"))


def test_restore_history_size_is_printed_and_a_history_that_cannot_fit_is_refused(tmp_path, tiny_model_dir, capsys):
    from safebasin.safety_core.restore.memory import HistoryMemoryError
    summary = restore_job(tmp_path / "cpu-bf16", tiny_model_dir, history=3, history_dtype="bf16", history_device="cpu")
    numel = summary["trainable_parameters"]
    out = capsys.readouterr().out
    assert f"curvature history: 2 x 3 pairs x {numel:,} parameters x 2 B (bf16) = " in out
    assert f"{2 * 3 * numel * 2 / 2**30:.3g} GiB per rank on cpu" in out
    assert summary["pairs"]["kept"] == 3
    # 10^9 pairs of a tiny model is petabytes: refused before any gradient, naming the knobs.
    with pytest.raises(HistoryMemoryError, match=r"restore.history \(now 1000000000\).*restore.history_dtype bf16"
                                                 r".*restore.history_device cpu"):
        restore_job(tmp_path / "huge", tiny_model_dir, history=10**9)
    assert not (tmp_path / "huge" / "out" / "metrics.jsonl").exists()


def test_half_precision_history_on_the_cpu_gives_the_fp32_direction():
    """bf16 storage rounds s and y (the Gram is taken from the rounded vectors, so the recursion
    stays consistent): the direction agrees with fp32 storage to bf16's ~3 digits."""
    from safebasin.safety_core.restore.lbfgs import CurvatureBuffer
    gen = torch.Generator().manual_seed(0)
    P = 4000
    A = torch.randn(P, generator=gen).abs() + 0.5  # a diagonal positive-definite Hessian
    buffers = [CurvatureBuffer(4), CurvatureBuffer(4, dtype=torch.bfloat16, device=torch.device("cpu"))]
    for _ in range(6):
        s = torch.randn(P, generator=gen)
        for b in buffers:
            b.push(s, A * s)
    g = torch.randn(P, generator=gen)
    fp32, bf16 = (b.apply_inverse(g) for b in buffers)
    assert buffers[1].nbytes == buffers[0].nbytes // 2 and bf16.dtype == torch.float32
    assert float((bf16 - fp32).norm() / fp32.norm()) < 1e-2


def test_default_training_saves_at_the_end_and_full_anchoring_reports_its_coverage(tmp_path, aligned_pair, capsys):
    import json
    import yaml
    from safebasin.safety_core.anchor.basis import extract_basis
    from safebasin.safety_core.train.trainer import TrainArgs
    from test_anchor import cli
    from transformers import AutoModelForCausalLM
    assert TrainArgs(max_steps=1).save_every == 500
    base, aligned = aligned_pair
    basis = tmp_path / "basis"
    extract_basis(str(aligned), str(base), basis, modules="q_proj,v_proj,up_proj", variant="projector", rank=4)
    out = tmp_path / "out"
    cfg = {"model": {"path": str(base)}, "method": {"type": "full"},
           "data": {"train": {"path": "builtin:task"}, "num_examples": 16, "max_length": 64},
           "train": {"max_steps": 2, "micro_batch_size": 4, "lr": 1e-4},  # save_every left at its default
           "anchor": {"basis": str(basis), "lambda": 1.0},
           "tracking": {"enabled": False}, "output": {"dir": str(out)}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert cli("train", tmp_path / "cfg.yaml") == 0
    assert (out / "checkpoints" / "latest").read_text() == "step2"
    model = AutoModelForCausalLM.from_pretrained(base)
    anchored = sum(p.numel() for n, p in model.named_parameters()
                   if any(m in n for m in ("q_proj", "v_proj", "up_proj")))
    total = sum(p.numel() for p in model.parameters())
    printed = capsys.readouterr().out
    assert f"hold {anchored:,} of {total:,} trainable parameters ({100 * anchored / total:.1f}%)" in printed
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["anchor_coverage"] == pytest.approx(anchored / total) and "anchor_coverage" not in rows[1]


def test_every_rank_command_binds_cuda_local_rank_first(monkeypatch):
    """The device rule on a node with 2 GPUs. This machine has none, so torch.cuda's
    is_available / device_count / set_device are replaced by a fake 2-GPU node for this rule
    only; benchmarks/gpu_rank_binding.py checks the real binding on a GPU."""
    from safebasin.launcher import entry
    from safebasin.safety_core import distributed
    from safebasin.safety_core.measure import judges
    bound = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", bound.append)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.rank_device() == torch.device("cuda", 1) and bound == [1]
    assert judges._device(None) == torch.device("cuda", 1)  # a judge's default device
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(RuntimeError, match=r"LOCAL_RANK=2 but only 2 GPU\(s\) are visible"):
        distributed.rank_device()
    monkeypatch.setenv("LOCAL_RANK", "1")
    # train, restore, eval, landscape: bound before the command runs (so before its first collective).
    for name in sorted(entry.RANK_COMMANDS):
        bound.clear()
        seen = []
        monkeypatch.setitem(entry.RANK_COMMANDS, name, lambda cfg, resume, seen=seen: seen.append(list(bound)))
        entry.run_rank_command(name, None, False)
        assert seen == [[1]], name
    bound.clear()
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    assert distributed.rank_device() == torch.device("cpu") and bound == []
