"""bf16 means what fp32 means: the config keys that name the precision, anchored training and
restoration in bf16 against fp32 on the CPU, and ZeRO-2 against ZeRO-3 in bf16.

Tolerances: bf16 keeps 8 bits of mantissa, so one bf16 forward differs from fp32 by ~0.4%
relative per rounding; the losses of a few steps agree within 2% and the anchor penalty, a
sum of squares of updates that Adam makes of size lr per element, within 5% once DeltaW is
taken from the fp32 masters. Taken from the bf16 module weights it is off by far more: each
update of ~lr is a fraction of the weights' last bf16 bit, so DeltaW is mostly rounding.
"""

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from safebasin.launcher.config import ConfigError, build
from test_anchor import cli

BASE = {"model": {"path": "builtin:tiny-llama"}, "train": {"max_steps": 1}}


def test_model_dtype_and_train_precision_follow_each_other_or_fail_naming_both():
    assert build({**BASE, "model": {"path": "builtin:tiny-llama", "dtype": "bfloat16"}}).train.precision == "bf16"
    assert build({**BASE, "train": {"max_steps": 1, "precision": "bf16"}}).model.dtype == "bfloat16"
    assert build(BASE).train.precision == "fp32" and build(BASE).model.dtype == "float32"
    with pytest.raises(ConfigError, match=r"model.dtype 'float32' and train.precision 'bf16' disagree"):
        build({"model": {"path": "builtin:tiny-llama", "dtype": "float32"},
               "train": {"max_steps": 1, "precision": "bf16"}})


@pytest.fixture(scope="module")
def anchored(tmp_path_factory, aligned_pair, basis_dir):
    """anchored(method, stage, precision) -> rows of metrics.jsonl; each run once per module."""
    root = tmp_path_factory.mktemp("precision-runs")
    done = {}

    def run(method: str, stage: int, precision: str) -> list[dict]:
        key = (method, stage, precision)
        if key not in done:
            out = root / "-".join(map(str, key))
            cfg = {
                "model": {"path": str(aligned_pair[0])},
                "method": {"type": method, "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
                "data": {"train": {"path": "builtin:task"}, "num_examples": 32, "max_length": 96},
                "train": {"max_steps": 4, "lr": 2e-3 if method == "lora" else 5e-4, "micro_batch_size": 4,
                          "gradient_accumulation_steps": 2, "warmup_steps": 1, "seed": 1,
                          "precision": precision, "save_every": 0},
                "deepspeed": {"stage": stage},
                "anchor": {"basis": str(basis_dir), "lambda": 300.0},
                "tracking": {"enabled": False},
                "output": {"dir": str(out)},
            }
            path = root / f"{out.name}.yaml"
            path.write_text(yaml.safe_dump(cfg))
            assert cli("train", path) == 0
            done[key] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return done[key]
    return run


def relative_gap(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def basis_dir(tmp_path_factory, aligned_pair) -> Path:
    from safebasin.safety_core.anchor.basis import extract_basis
    base, aligned = aligned_pair
    out = tmp_path_factory.mktemp("basis") / "projector"
    extract_basis(str(aligned), str(base), out, modules="q_proj,v_proj,up_proj", variant="projector", rank=6)
    return out


def penalties(rows):
    return [r["anchor_penalty"] for r in rows[1:]]  # step 1: DeltaW = 0 under full parameters


def test_full_parameter_anchor_in_bf16_matches_fp32_and_zero2_matches_zero3(anchored):
    fp32 = anchored("full", 2, "fp32")
    bf16_z2, bf16_z3 = anchored("full", 2, "bf16"), anchored("full", 3, "bf16")
    print("penalty fp32", penalties(fp32), "bf16 z2", penalties(bf16_z2), "bf16 z3", penalties(bf16_z3))
    print("loss fp32", [r["loss"] for r in fp32], "bf16 z2", [r["loss"] for r in bf16_z2])
    assert relative_gap([r["loss"] for r in bf16_z2], [r["loss"] for r in fp32]) < 0.02
    assert relative_gap(penalties(bf16_z2), penalties(fp32)) < 0.05
    assert relative_gap(penalties(bf16_z3), penalties(fp32)) < 0.05
    assert relative_gap(penalties(bf16_z2), penalties(bf16_z3)) < 0.01
    # ZeRO-0 in bf16 has no per-parameter view of its fp32 masters: refused before any step.
    with pytest.raises(RuntimeError, match="use deepspeed.stage 1, 2 or 3, or train.precision fp32"):
        anchored("full", 0, "bf16")


def test_lora_anchor_in_bf16_matches_fp32(anchored):
    fp32, bf16 = anchored("lora", 2, "fp32"), anchored("lora", 2, "bf16")
    print("penalty fp32", penalties(fp32), "bf16", penalties(bf16))
    assert relative_gap([r["loss"] for r in bf16], [r["loss"] for r in fp32]) < 0.02
    assert relative_gap(penalties(bf16), penalties(fp32)) < 0.05


RESTORE = {"forget": {"path": "builtin:harmful"}, "retain": {"path": "builtin:task"},
           "forget_size": 8, "curvature_forget_size": 8, "retain1_size": 16, "retain2_size": 16,
           "probes": 6, "batch_size": 4, "max_length": 96, "iterations": 2}


def restored(root: Path, model_dir: Path, dtype: str, stage: int) -> tuple[list[dict], dict]:
    from safebasin.launcher.config import load_config
    from safebasin.launcher.entry import run_restore
    out = root / f"restore-{dtype}-{stage}"
    cfg = {"model": {"path": str(model_dir), "dtype": dtype}, "restore": RESTORE,
           "deepspeed": {"stage": stage}, "tracking": {"enabled": False}, "output": {"dir": str(out)}}
    (root / f"{out.name}.yaml").write_text(yaml.safe_dump(cfg))
    from safebasin.launcher.launch import single_process_env
    saved = dict(os.environ)
    try:  # this process as rank 0 of a world of 1, as the CLI's single-rank job sets it up
        single_process_env()
        summary = run_restore(load_config(root / f"{out.name}.yaml"))
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()], summary


def test_full_parameter_restoration_in_bf16_matches_fp32(tmp_path, tiny_model_dir):
    """The curvature pairs y = g1 - g0 are differences of nearby gradients: taken from bf16
    gradients, rounding dominates them. Measured on this model: from bf16 gradients the pairs'
    curvatures <s, y>/<s, s> were up to 10% off fp32 and the forget loss 2e-4 relative; computed
    in fp32 from the bf16-rounded weights, 0.3% and 4e-6 (what is left: the starting weights
    differ by their bf16 rounding; 7.5e-5 once steps were sized by the budget). ZeRO-3 in bf16 computes what ZeRO-0 does."""
    from safetensors.torch import load_file
    fp32, fp32_summary = restored(tmp_path, tiny_model_dir, "float32", 0)
    bf16, bf16_summary = restored(tmp_path, tiny_model_dir, "bfloat16", 0)
    zero3, zero3_summary = restored(tmp_path, tiny_model_dir, "bfloat16", 3)
    curv = bf16_summary["pairs"]["curvatures"]
    assert len(curv) == len(fp32_summary["pairs"]["curvatures"]) == RESTORE["probes"]
    assert relative_gap(curv, fp32_summary["pairs"]["curvatures"]) < 0.02
    assert [r["accepted"] for r in bf16] == [r["accepted"] for r in fp32]
    # The step lengths come from the budget and the curvature each precision measured, so the
    # starting points' rounding carries into the step (measured: 7.5e-5 on the forget loss).
    for key in ("forget_loss", "retain_loss"):
        assert relative_gap([r[key] for r in bf16], [r[key] for r in fp32]) < 2e-4, key
    assert relative_gap([r["predicted_retain_change"] for r in bf16],
                        [r["predicted_retain_change"] for r in fp32]) < 0.02
    assert relative_gap(zero3_summary["pairs"]["curvatures"], curv) < 1e-3
    for key in ("forget_loss", "retain_loss"):
        assert [r[key] for r in zero3] == pytest.approx([r[key] for r in bf16], rel=1e-5), key
    for out in ("restore-bfloat16-0", "restore-bfloat16-3"):  # exported from the fp32 weights it computed
        weights = load_file(tmp_path / out / "model" / "model.safetensors")
        assert {t.dtype for t in weights.values()} == {torch.float32}
