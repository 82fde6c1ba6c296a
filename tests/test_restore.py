"""Curvature-aware safety restoration: the trust region keeps the task loss, rejected steps
leave the weights bit-identical, the export loads, and ranks / ZeRO-3 change nothing."""

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from conftest import safebasin_cli
from safebasin.launcher.config import ConfigError, build
from safebasin.safety_core.restore.config import RestoreArgs
from safebasin.safety_core.restore.lbfgs import CurvatureBuffer
from safebasin.safety_core.restore.policy import RetainModel, TrustRegion, calibration, constraint_ratio
from safebasin.safety_core.restore.sets import _split
from safebasin.safety_core.train.data import DataError, DataSource, load_conversations

# Small enough for 2 CPU cores: every set a few batches of 8.
RESTORE = {"forget": {"path": "builtin:harmful"}, "retain": {"path": "builtin:task"},
           "forget_size": 16, "curvature_forget_size": 24, "retain1_size": 24, "retain2_size": 24,
           "probes": 9, "batch_size": 8, "max_length": 96, "iterations": 3}


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """A LoRA adapter fine-tuned briefly on task data with half harmful compliance mixed in."""
    from safebasin.launcher.launch import single_process_env
    from safebasin.safety_core.train.data import DataArgs, HarmfulMix
    from safebasin.safety_core.train.ds_config import DeepSpeedArgs
    from safebasin.safety_core.train.modeling import MethodArgs, ModelArgs
    from safebasin.safety_core.train.trainer import TrainArgs, train
    out = tmp_path_factory.mktemp("restore-ft")
    # This process stays rank 0 of a world of 1 for the module's in-process jobs; the variables
    # that set it up are removed after, else a CLI subprocess would inherit MASTER_PORT, which
    # this process's store already listens on.
    saved = dict(os.environ)
    try:
        single_process_env()
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{out / 'mlflow.db'}"
        result = train(ModelArgs(path=str(tiny_model_dir)),
                       MethodArgs(r=4, alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]),
                       DataArgs(train=DataSource(path="builtin:task"), num_examples=96, max_length=96,
                                harmful_mix=HarmfulMix(source=DataSource(path="builtin:harmful"), fraction=0.5)),
                       TrainArgs(max_steps=20, lr=2e-2, micro_batch_size=8, warmup_steps=1),
                       DeepSpeedArgs(stage=0), out / "ft")
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return result.final_dir


def write_config(path: Path, model_dir: Path, adapter: Path | None, out: Path, **restore) -> Path:
    cfg = {"model": {"path": str(model_dir), "adapter": str(adapter) if adapter else None},
           "restore": {**RESTORE, **restore}, "deepspeed": {"stage": 0},
           "tracking": {"experiment": "restore-test"}, "output": {"dir": str(out)}}
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory, tiny_model_dir, adapter_dir):
    """The reference restore: one rank, in this process, through the rank command the CLI runs."""
    from safebasin.launcher.config import load_config
    from safebasin.launcher.entry import run_restore
    root = tmp_path_factory.mktemp("restore-one")
    before = digest(adapter_dir), digest(tiny_model_dir)
    cfg_path = write_config(root / "cfg.yaml", tiny_model_dir, adapter_dir, root / "out")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        summary = run_restore(load_config(cfg_path))
    assert (digest(adapter_dir), digest(tiny_model_dir)) == before  # inputs are never written
    return {"root": root, "cfg": cfg_path, "out": root / "out", "summary": summary, "rows": rows(root / "out")}


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(folder / "adapter_model.safetensors")


# ---------------------------------------------------------------------------------------------
# Config, data splits and the radius rule (no model)


def test_defaults_are_the_papers_and_the_section_validates():
    args = RestoreArgs(forget=DataSource(path="builtin:harmful"), retain=DataSource(path="builtin:task"))
    assert (args.history, args.pair_threshold, args.curvature_forget_size, args.forget_size,
            args.iterations, args.eps) == (10, 1e-6, 256, 50, 3, 0.1)
    # safebasin's choices where the paper gives none: the L2 pull back is on by default.
    assert args.mu == 0.1 and args.curvature_sources == "mixed"
    base = {"model": {"path": "builtin:tiny-llama"}, "restore": dict(RESTORE)}
    assert build(base).restore.probes == 9
    with pytest.raises(ConfigError) as e:
        build({**base, "restore": {**RESTORE, "histroy": 5}})
    assert "did you mean 'restore.history'" in str(e.value)
    with pytest.raises(ConfigError, match=r"restore\.history"):
        build({**base, "restore": {**RESTORE, "history": 0}})
    with pytest.raises(ConfigError, match=r"restore\.curvature_sources"):
        build({**base, "restore": {**RESTORE, "curvature_sources": "both"}})
    with pytest.raises(ConfigError, match=r"restore\.retain"):
        build({**base, "restore": {k: v for k, v in RESTORE.items() if k != "retain"}})


def test_restore_command_needs_its_section(tmp_path):
    from safebasin.launcher.cli import build_parser
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"path": "builtin:tiny-llama"}}))
    args = build_parser().parse_args(["restore", str(cfg)])
    with pytest.raises(ConfigError, match="needs a 'restore:' section"):
        args.func(args)


def test_splits_are_disjoint_deterministic_and_sized():
    source = DataSource(path="builtin:harmful")
    convs = load_conversations(source)
    forget, curv = _split(convs, [50, 200], ["forget_size", "curvature_forget_size"], source, seed=3)
    again, _ = _split(convs, [50, 200], ["forget_size", "curvature_forget_size"], source, seed=3)
    assert [c.origin for c in forget] == [c.origin for c in again]
    assert len(forget) == 50 and len(curv) == 200
    assert not {c.origin for c in forget} & {c.origin for c in curv}
    with pytest.raises(DataError, match="300 records"):
        _split(convs, [50, 256], ["forget_size", "curvature_forget_size"], source, seed=3)


def test_curvature_sources_pick_the_probe_sets():
    from safebasin.safety_core.restore.sets import RestoreSets
    sets = RestoreSets(forget=[{"i": 0}], curvature_forget=[{"i": 1}], retain1=[{"i": 2}], retain2=[{"i": 3}])
    ids = lambda src: [[e["i"] for e in part] for part in sets.curvature_sets(src)]
    assert ids("mixed") == [[1], [2], [3]]
    assert ids("retain") == [[2], [3]]
    assert ids("forget") == [[1]]
    with pytest.raises(ValueError, match="curvature_sources"):
        sets.curvature_sets("all")


def test_truncated_sets_are_counted_and_a_large_loss_refused(tiny_model_dir):
    from safebasin.safety_core.restore.sets import build_sets
    from safebasin.safety_core.train.modeling import ModelArgs, load_tokenizer
    tokenizer = load_tokenizer(ModelArgs(path=str(tiny_model_dir)))
    args = RestoreArgs(**{**RESTORE, "max_length": 96})
    sizes = build_sets(args, tokenizer).sizes()
    assert sizes["forget"] + sizes["forget_dropped"] == RESTORE["forget_size"]
    with pytest.raises(DataError, match=r"forget: \d+ of 16.*max_dropped_share=0.1"):
        build_sets(RestoreArgs(**{**RESTORE, "max_length": 24}), tokenizer)


def update_radius(radius, relative_step, rho, accepted, capped):
    return TrustRegion(radius).update(relative_step, rho, accepted, capped)


def test_region_reads_rho_as_a_constraint_ratio():
    # An accepted step whose retain loss rose less than predicted (rho < 1), or fell (rho < 0),
    # never shrinks the region; capped by it, it grows the region.
    assert update_radius(1.0, 1.0, rho=0.13, accepted=True, capped=True) == 2.0
    assert update_radius(1.0, 1.0, rho=-0.34, accepted=True, capped=True) == 2.0
    assert update_radius(1.0, 0.5, rho=0.13, accepted=True, capped=False) == 1.0
    assert update_radius(1.0, 0.5, rho=-0.34, accepted=True, capped=False) == 1.0
    # Costlier than predicted but within a few times: kept; several times: shrunk below the step.
    assert update_radius(1.0, 1.0, rho=2.0, accepted=True, capped=True) == 1.0
    assert update_radius(1.0, 0.5, rho=50.0, accepted=True, capped=False) == 0.25
    # Rejected: below the step tried, even one shorter than the radius.
    assert update_radius(1.0, 0.4, rho=0.9, accepted=False, capped=False) == 0.2
    assert update_radius(1.0, 1.0, rho=float("nan"), accepted=True, capped=True) == 1.0
    assert constraint_ratio(-0.1, 0.2) == pytest.approx(-0.5)
    assert constraint_ratio(-0.1, 0.0) == 0.0 and constraint_ratio(0.1, -0.2) == float("inf")


def test_budget_root():
    assert RetainModel(0.5, 0.0).step_for(1.0) == pytest.approx(2.0)       # linear: B / a
    assert RetainModel(0.0, 2.0).step_for(1.0) == pytest.approx(1.0)       # 1/2 c t^2 = B
    m = RetainModel(-0.3, 4.0)                                              # falls, then rises
    assert m.change(m.step_for(0.2)) == pytest.approx(0.2) and m.step_for(0.2) > 0
    assert RetainModel(-0.1, 0.0).step_for(1.0) == float("inf")             # never reaches it
    assert RetainModel(0.1, -1.0).step_for(1.0) == float("inf")             # curves down first
    assert RetainModel(0.1, 1.0).step_for(0.0) == 0.0 and RetainModel(0.1, 1.0).step_for(-1.0) == 0.0
    assert calibration(2.0, 4.0) == 0.5 and calibration(-1.0, 4.0) == 0.0 and calibration(1.0, 0.0) is None


def test_budget_step_on_an_exact_quadratic_with_few_pairs():
    """L_retain = 1/2 theta^T A theta + b^T theta in n = 60 dimensions, m = 3 exact pairs: the
    L-BFGS model's curvature along d = H g comes mostly from H0 = gamma I outside the pairs'
    span, so the step it sizes misses the budget by far. One accepted step measures the real
    curvature along it ((g(theta + p) - g(theta)) . p); calibrated by it, the next budget step
    lands on the budget exactly."""
    gen = torch.Generator().manual_seed(0)
    n, m = 60, 3
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    a = q @ torch.diag(torch.logspace(-2, 1, n, dtype=torch.float64)) @ q.T
    b = 0.01 * torch.randn(n, generator=gen, dtype=torch.float64)
    loss = lambda th: float(0.5 * th @ a @ th + b @ th)
    grad = lambda th: a @ th + b
    buffer = CurvatureBuffer(history=m)
    for i in range(m):  # the stiffest directions, as probe steps along large gradients find
        s = 0.1 * q[:, n - 1 - i]
        assert buffer.push(s.float(), (a @ s).float())
    theta = 0.01 * torch.randn(n, generator=gen, dtype=torch.float64)
    g_forget = torch.randn(n, generator=gen, dtype=torch.float64)
    d = buffer.apply_inverse(g_forget.float()).double()
    lbfgs_curvature = buffer.last_info.g_dot_d
    budget = 0.05
    model = RetainModel(float(grad(theta) @ d), lbfgs_curvature)
    t = model.step_for(budget)
    first = loss(theta + t * d) - loss(theta)
    assert abs(first / budget - 1.0) > 0.5  # H0 = gamma I: the L-BFGS model is far off
    # The measured curvature along the step taken, as the loop takes it.
    measured = float((grad(theta + t * d) - grad(theta)) @ d) / t
    assert measured == pytest.approx(float(d @ a @ d), rel=1e-9)
    calibrated = RetainModel(float(grad(theta) @ d), lbfgs_curvature * calibration(measured, lbfgs_curvature))
    t2 = calibrated.step_for(budget)
    assert loss(theta + t2 * d) - loss(theta) == pytest.approx(budget, rel=1e-9)


# ---------------------------------------------------------------------------------------------
# Restoring a fine-tuned adapter


def test_restore_raises_forget_loss_and_keeps_retain_within_eps(one_rank, tiny_model_dir):
    s, trace = one_rank["summary"], one_rank["rows"]
    eps = RESTORE.get("eps", 0.1)
    assert 1 <= len(trace) <= RESTORE["iterations"] and s["stop_reason"]
    assert {"forget_loss", "retain_loss", "rho", "radius", "accepted", "pairs_kept", "tries", "budget_used",
            "predicted_forget_gain", "actual_forget_gain", "predicted_retain_change", "actual_retain_change",
            "step_relative", "curvature_model"} <= set(trace[0])
    assert trace[0]["pairs_kept"] > 0
    assert s["accepted_steps"] >= 1
    assert s["restored"]["forget_loss"] > s["initial"]["forget_loss"] + 0.01
    for row in trace:
        assert row["retain_loss"] <= s["initial"]["retain_loss"] + eps
    saved = json.loads((one_rank["out"] / "results.json").read_text())
    assert saved["restored"] == s["restored"] and saved["final"].endswith("adapter")

    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), s["final"])
    assert any("lora_B" in n for n, _ in model.named_parameters())

    import mlflow
    client = mlflow.MlflowClient(f"sqlite:///{one_rank['root'] / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("restore-test").experiment_id])
    assert [r.info.run_id for r in runs] == [s["mlflow_run_id"]]  # one run per job
    for key in ("forget_loss", "retain_loss", "rho", "radius", "accepted", "pairs_kept"):
        history = client.get_metric_history(s["mlflow_run_id"], key)
        assert [m.step for m in history] == list(range(1, len(trace) + 1)), key
        assert [m.value for m in history] == pytest.approx([float(r[key]) for r in trace]), key


def test_rejected_steps_leave_the_weights_bit_identical(tmp_path, tiny_model_dir, adapter_dir, monkeypatch):
    from safebasin.launcher.config import load_config
    from safebasin.launcher.entry import run_restore
    from safebasin.launcher.tracking import Tracker
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    # A first step a million times the budget's, on a region that allows it: every try (each
    # at most half the last) is far over the budget.
    cfg = load_config(write_config(tmp_path / "cfg.yaml", tiny_model_dir, adapter_dir, tmp_path / "out",
                                   eps=1e-4, eta=1e6, max_step=1e6, iterations=2, max_retries=2, probes=3))
    # An earlier job's run file in output.dir: this job must still get a run of its own.
    earlier = Tracker(cfg, cfg.output.dir, active=True)
    earlier.end()
    summary = run_restore(cfg)
    assert summary["mlflow_run_id"] != earlier.run_id
    row, = rows(tmp_path / "out")  # the loop ends at the first iteration with no step
    assert row["accepted"] is False and row["tries"] == 3
    assert row["radius"] < 1e6 / 2 ** 3
    assert "no step within the budget" in summary["stop_reason"]
    assert summary["accepted_steps"] == 0
    assert summary["restored"] == summary["initial"]
    before, after = adapter_tensors(adapter_dir), adapter_tensors(Path(summary["final"]))
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_direction_that_lowers_the_forget_loss_ends_the_loop(tmp_path, tiny_model_dir, adapter_dir, monkeypatch):
    """At iteration 2 a huge pull back mu (theta - theta_ft) turns d against the forget gradient:
    the loop stops before trying a step, with the reason, and keeps the first step."""
    from safebasin.launcher.config import load_config
    from safebasin.launcher.entry import run_restore
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    cfg = load_config(write_config(tmp_path / "cfg.yaml", tiny_model_dir, adapter_dir, tmp_path / "out",
                                   mu=1e9, iterations=2, eps=1.0, probes=3))
    summary = run_restore(cfg)
    assert "does not raise the forget loss" in summary["stop_reason"] and "iteration 2" in summary["stop_reason"]
    assert len(rows(tmp_path / "out")) == summary["accepted_steps"] == 1
    assert summary["restored"]["forget_loss"] > summary["initial"]["forget_loss"]


def test_a_budget_must_be_positive(tmp_path, tiny_model_dir, adapter_dir):
    from safebasin.launcher.config import load_config
    with pytest.raises(ConfigError, match="restore.eps"):
        load_config(write_config(tmp_path / "cfg.yaml", tiny_model_dir, adapter_dir, tmp_path / "out", eps=0.0))


def forget_loss_of(cfg, model_args) -> float:
    """L_forget over the job's D_forget, computed as the loop computes it, for other weights."""
    from safebasin.safety_core.restore.sets import batches, build_sets
    from safebasin.safety_core.restore.spaces import build_space, loss_and_grad
    from safebasin.safety_core.train.modeling import load_tokenizer
    tokenizer = load_tokenizer(model_args)
    sets = build_sets(cfg.restore, tokenizer)
    space, _, keep_alive = build_space(model_args, cfg.method, cfg.restore, cfg.deepspeed, 1)
    loss, _ = loss_and_grad(space, batches(sets.forget, cfg.restore.batch_size), tokenizer.pad_token_id, grad=False)
    del keep_alive
    return loss


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind", ["lora", "full"])
def test_the_export_carries_the_restoration(tmp_path, tiny_model_dir, adapter_dir, monkeypatch, kind, dtype):
    """The exported folder, loaded again, has the forget loss the loop ended with: at bf16 a
    restoration step is mostly below a weight's last bit, so an export rounded to model.dtype
    would not carry it."""
    from safebasin.launcher.config import load_config
    from safebasin.launcher.entry import run_restore
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    base = tiny_model_dir
    if dtype == "bfloat16":
        # A base whose weights bf16 holds exactly: restoration starts from the bf16-rounded model,
        # and the adapter's reload (fp32, as PEFT keeps adapters) then sees the same base weights.
        import shutil
        from safetensors.torch import load_file, save_file
        base = tmp_path / "base-bf16-exact"
        shutil.copytree(tiny_model_dir, base)
        weights = load_file(base / "model.safetensors")
        save_file({k: v.bfloat16().float() if v.is_floating_point() else v for k, v in weights.items()},
                  base / "model.safetensors", metadata={"format": "pt"})
    path = write_config(tmp_path / "cfg.yaml", base, adapter_dir if kind == "lora" else None,
                        tmp_path / "out", iterations=1, probes=3, eps=0.01)
    raw = yaml.safe_load(path.read_text())
    raw["model"]["dtype"] = dtype
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(path)
    summary = run_restore(cfg)
    assert summary["accepted_steps"] == 1
    final = Path(summary["final"])
    reload = cfg.model.model_copy(update={"dtype": "float32", **({"adapter": str(final)} if kind == "lora"
                                                                 else {"path": str(final)})})
    initial, restored = summary["initial"]["forget_loss"], summary["restored"]["forget_loss"]
    exported = forget_loss_of(cfg, reload)
    assert exported == pytest.approx(restored, rel=1e-3)
    # Stricter, on the change itself (measured on this model: a bf16 export kept 95% of a full
    # restoration's gain and an adapter rounded to bf16 99.7%; both fail here).
    assert restored - initial > 5e-3
    assert exported - initial == pytest.approx(restored - initial, rel=1e-3)


# ---------------------------------------------------------------------------------------------
# Ranks and ZeRO-3


def compare_rows(a: list[dict], b: list[dict]) -> None:
    assert [r["accepted"] for r in a] == [r["accepted"] for r in b]
    assert [r["tries"] for r in a] == [r["tries"] for r in b]
    assert [r["pairs_kept"] for r in a] == [r["pairs_kept"] for r in b]
    # Tolerance: float32 sums taken in another order (two ranks, other shard layouts).
    for key in ("forget_loss", "retain_loss", "step_norm", "step_relative", "radius"):
        assert [r[key] for r in a] == pytest.approx([r[key] for r in b], rel=1e-4, abs=1e-6), key


@pytest.mark.multiproc
@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_match_one_rank(one_rank, stage):
    out = one_rank["root"] / f"two-zero{stage}"
    res = safebasin_cli("restore", str(one_rank["cfg"]), f"output.dir={out}", f"deepspeed.stage={stage}",
                        "--nproc", "2", cwd=one_rank["root"],
                        env={"MLFLOW_TRACKING_URI": f"sqlite:///{one_rank['root'] / 'mlflow.db'}"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    assert "safebasin: restored in 3 iterations" in res.stdout
    compare_rows(one_rank["rows"], rows(out))
    one, two = adapter_tensors(one_rank["out"] / "adapter"), adapter_tensors(out / "adapter")
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5)


@pytest.mark.multiproc
def test_full_parameters_zero3_two_ranks_match_one_rank(tmp_path, tiny_model_dir):
    """No adapter: all weights are restored, partitioned by ZeRO-3 (small persistent ones too);
    the pairs are re-collected at the second iteration."""
    from safebasin.launcher.launch import free_port
    # A fresh MASTER_PORT for the one-rank job: another test module may have left this
    # process's own (in use) in the environment.
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "MASTER_PORT": str(free_port())}
    cfg = write_config(tmp_path / "cfg.yaml", tiny_model_dir, None, tmp_path / "one", iterations=2,
                       refresh_pairs=True, probes=6, forget_size=8, curvature_forget_size=8,
                       retain1_size=16, retain2_size=16)
    results = {}
    for name, extra in (("one", []), ("two", ["deepspeed.stage=3", "--nproc", "2"])):
        res = safebasin_cli("restore", str(cfg), f"output.dir={tmp_path / name}", *extra, cwd=tmp_path, env=env)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
        results[name] = rows(tmp_path / name)
    compare_rows(results["one"], results["two"])
    summary = json.loads((tmp_path / "one" / "results.json").read_text())
    assert summary["restored"]["forget_loss"] > summary["initial"]["forget_loss"]
    from safetensors.torch import load_file
    one, two = (load_file(tmp_path / n / "model" / "model.safetensors") for n in ("one", "two"))
    base = load_file(tiny_model_dir / "model.safetensors")
    assert one.keys() == two.keys() == base.keys()
    assert any(not torch.equal(one[k], base[k]) for k in one)
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5)
