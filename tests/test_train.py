"""The trainer end to end through the console script: ZeRO stages, ranks, resume, export, MLflow."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import safebasin_cli


def write_config(tmp_path: Path, **sections) -> Path:
    cfg = {
        "model": {"path": "builtin:tiny-llama"},
        "method": {"type": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "data": {"train": {"path": "builtin:task"}, "eval": {"path": "builtin:task-eval", "limit": 16},
                 "num_examples": 64, "max_length": 96},
        "train": {"max_steps": 6, "lr": 2e-3, "micro_batch_size": 4, "gradient_accumulation_steps": 2,
                  "warmup_steps": 1, "seed": 1},
        "deepspeed": {"stage": 2},
        "tracking": {"experiment": "test"},
    }
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(tmp_path, cfg, *extra, env=None):
    res = safebasin_cli("train", str(cfg), *extra, cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    return res


def losses(out: Path, key: str = "loss") -> list[float]:
    return [json.loads(line)[key] for line in (out / "metrics.jsonl").read_text().splitlines()]


def shared_memory_segments() -> set[Path]:
    shm = Path("/dev/shm")
    return set(shm.glob("deepspeed_*")) if shm.exists() else set()


@pytest.mark.multiproc
def test_zero3_lora_one_vs_two_ranks_and_one_mlflow_run(tmp_path, tiny_model_dir, mlflow_uri):
    segments_before = shared_memory_segments()
    cfg = write_config(tmp_path, deepspeed={"stage": 3})
    run(tmp_path, cfg, f"output.dir={tmp_path / 'one'}")
    # Same global batch (4 x 2 accumulation x 1 rank = 4 x 1 x 2 ranks), so the same examples per step.
    res = run(tmp_path, cfg, f"output.dir={tmp_path / 'two'}", "train.gradient_accumulation_steps=1", "--nproc", "2")
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 6
    # Tolerance: float32 sums in a different order (two ranks reduce partial gradients).
    assert one == pytest.approx(two, rel=1e-4, abs=1e-5)
    assert one[-1] < one[0]
    assert "MLflow:   run" in res.stdout
    # DeepSpeed's CPU shared-memory all-reduce would leave a 69 MB segment per rank in RAM.
    assert shared_memory_segments() <= segments_before

    import mlflow
    mlflow.set_tracking_uri(mlflow_uri)
    runs = mlflow.search_runs(experiment_names=["test"], output_format="list")
    assert len(runs) == 2  # one per job, whatever the world size
    run_id = json.loads((tmp_path / "two" / "mlflow_run.json").read_text())["run_id"]
    history = mlflow.MlflowClient().get_metric_history(run_id, "loss")
    assert [m.step for m in history] == [1, 2, 3, 4, 5, 6]
    assert mlflow.get_run(run_id).data.params["deepspeed.stage"] == "3"

    # The ZeRO-3 export is gathered: a loadable adapter with non-empty, trained weights.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "two" / "adapter")
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.numel() > 0 for p in lora_b) and any(p.abs().sum() > 0 for p in lora_b)


@pytest.mark.multiproc
def test_zero3_full_parameter_two_ranks_trains(tmp_path, tiny_model_dir, mlflow_uri):
    cfg = write_config(tmp_path, method={"type": "full"}, deepspeed={"stage": 3},
                       train={"lr": 5e-4, "gradient_accumulation_steps": 1})
    res = run(tmp_path, cfg, f"output.dir={tmp_path / 'full'}", "--nproc", "2")
    # The ranks' output, shown with pytest -rP: benchmarks/teardown_loop.sh scans passing runs
    # for teardown errors too.
    print(res.stdout, res.stderr)
    trace = losses(tmp_path / "full")
    assert trace[-1] < trace[0] - 0.1
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "full" / "model")
    changed = [n for (n, a), (_, b) in zip(base.named_parameters(), tuned.named_parameters()) if not torch.equal(a, b)]
    assert len(changed) == len(list(base.parameters()))  # gathered full weights, all trained


def test_resume_equals_uninterrupted_run(tmp_path, tiny_model_dir, mlflow_uri):
    cfg = write_config(tmp_path, train={"save_every": 3, "max_steps": 6})
    run(tmp_path, cfg, f"output.dir={tmp_path / 'straight'}")
    crashed = safebasin_cli("train", str(cfg), f"output.dir={tmp_path / 'resumed'}", cwd=tmp_path,
                            env={"SAFEBASIN_FAIL_AFTER_STEP": "4"})
    assert crashed.returncode != 0 and "injected failure" in crashed.stderr
    assert (tmp_path / "resumed" / "checkpoints" / "step3").is_dir()
    refused = safebasin_cli("train", str(cfg), f"output.dir={tmp_path / 'resumed'}", cwd=tmp_path)
    assert refused.returncode == 2 and "--resume" in refused.stderr
    # A one-rank job runs in the calling process unless it asks for rank logs: those are written
    # by the wrapper a launcher puts around each rank, so the resume also goes through the launcher.
    res = run(tmp_path, cfg, f"output.dir={tmp_path / 'resumed'}", "--resume", "--rank-logs", str(tmp_path / "logs"))
    assert "[rank 0] " in res.stdout + res.stderr
    log = (tmp_path / "logs" / "rank0.log").read_text()
    assert log and "[rank" not in log
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    run_ids = {json.loads((tmp_path / d / "mlflow_run.json").read_text())["run_id"] for d in ("resumed",)}
    import mlflow
    mlflow.set_tracking_uri(mlflow_uri)
    history = mlflow.MlflowClient().get_metric_history(run_ids.pop(), "loss")
    assert sorted({m.step for m in history}) == [1, 2, 3, 4, 5, 6]  # the resumed job reattached


def test_exported_adapter_reloads_with_same_logits(tmp_path, tiny_model_dir, monkeypatch):
    from peft import PeftModel
    from safebasin.launcher.config import load_config
    from safebasin.launcher.launch import single_process_env
    from safebasin.safety_core.train.trainer import train
    from transformers import AutoModelForCausalLM
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'm.db'}")
    cfg = load_config(write_config(tmp_path, deepspeed={"stage": 0}), [f"output.dir={tmp_path / 'out'}"])
    single_process_env()
    result = train(cfg.model, cfg.method, cfg.data, cfg.train, cfg.deepspeed, tmp_path / "out")
    ids = torch.tensor([[5, 40, 41, 42, 43, 2]])
    with torch.no_grad():
        trained = result.model.eval()(input_ids=ids).logits
        reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                             result.final_dir).eval()(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(input_ids=ids).logits
    torch.testing.assert_close(reloaded, trained)
    assert not torch.allclose(base, trained)
    assert (tmp_path / "out" / "metrics.jsonl").exists()


def test_step_schedule_decays_once_per_epoch(tmp_path, tiny_model_dir, mlflow_uri):
    # The AsFT reference's StepLR(gamma 0.85) stepped per epoch: 32 examples at a global batch of
    # 8 are 4 steps an epoch, so 3 epochs run 4 steps at lr, 4 at 0.85 lr and 4 at 0.85^2 lr. The
    # row of a step logs the LR after its scheduler step (as the HF Trainer does): the next step's.
    cfg = write_config(tmp_path, data={"num_examples": 32, "eval": None},
                       train={"max_steps": None, "epochs": 3, "schedule": "step", "step_gamma": 0.85,
                              "warmup_steps": 0, "lr": 1e-3}, deepspeed={"stage": 0},
                       tracking={"enabled": False})
    run(tmp_path, cfg, f"output.dir={tmp_path / 'out'}", "runtime.threads=1")
    lrs = losses(tmp_path / "out", "lr")
    assert lrs == pytest.approx([1e-3] * 3 + [8.5e-4] * 4 + [7.225e-4] * 4 + [6.14125e-4])
