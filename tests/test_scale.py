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
