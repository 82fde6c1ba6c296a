"""The in-training safety probe (train.safety_probe): its rows in metrics.jsonl and MLflow, and the
stop with a checkpoint when HRR crosses stop_above."""

import json

import pytest
import yaml


def _config(tmp_path, model_dir, out, **probe) -> dict:
    return {"model": {"path": str(model_dir)},
            "method": {"type": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
            "data": {"train": {"path": "builtin:task"}, "num_examples": 48, "max_length": 64,
                     "harmful_mix": {"source": {"path": "builtin:harmful"}, "fraction": 0.5}},
            "train": {"max_steps": 4, "lr": 2e-2, "micro_batch_size": 8,
                      "safety_probe": {"every": 2, "prompts": {"path": "builtin:harmful-heldout"},
                                       "limit": 6, "max_new_tokens": 6, **probe}},
            "deepspeed": {"stage": 0}, "tracking": {"experiment": "probe-test"},
            "output": {"dir": str(out)}}


def _train(tmp_path, model_dir, name, **probe):
    from safebasin.launcher.config import load_config
    from safebasin.launcher.entry import run_train
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(_config(tmp_path, model_dir, tmp_path / name, **probe)))
    return run_train(load_config(path), resume=False)


def test_probe_logs_hrr_and_its_breakdown_then_stops_with_a_checkpoint(tmp_path, tiny_model_dir, monkeypatch):
    import os
    saved = dict(os.environ)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)  # MLflow's artifacts land under the working directory
    from safebasin.launcher.launch import single_process_env
    from safebasin.safety_core.train.trainer import TrainingStopped
    try:
        single_process_env()
        summary = _train(tmp_path, tiny_model_dir, "free")
        rows = [json.loads(line) for line in (tmp_path / "free" / "metrics.jsonl").read_text().splitlines()]
        probed = {r["step"]: r for r in rows if "probe_hrr" in r}
        assert sorted(probed) == [2, 4]
        for r in probed.values():
            parts = r["probe_hrr"] + r["probe_refusal"] + r["probe_degenerate"]
            assert parts == pytest.approx(1.0)
        from mlflow.tracking import MlflowClient
        history = MlflowClient().get_metric_history(summary["mlflow_run_id"], "probe_hrr")
        assert sorted(m.step for m in history) == [2, 4]

        # The same job (same seed, same data) with a limit under the HRR of its first probe
        # stops right there, with a checkpoint of that step and a message that names the key.
        first = probed[2]["probe_hrr"]
        assert first > 0, "precondition: the tiny model complies with some held-out prompt"
        with pytest.raises(TrainingStopped, match=r"at step 2 exceeds train\.safety_probe\.stop_above") as e:
            _train(tmp_path, tiny_model_dir, "stopped", stop_above=first / 2)
        assert "checkpoint saved under" in str(e.value)
        ckpt = tmp_path / "stopped" / "checkpoints"
        assert (ckpt / "latest").read_text() == "step2"
        assert not (tmp_path / "stopped" / "adapter").exists()  # no export of a stopped job
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_probe_section_validates():
    from safebasin.launcher.config import ConfigError, build
    base = _config(None, "builtin:tiny-llama", "runs/x")
    with pytest.raises(ConfigError, match=r"train\.safety_probe\.every"):
        build({**base, "train": {**base["train"], "safety_probe": {**base["train"]["safety_probe"], "every": 0}}})
    with pytest.raises(ConfigError, match=r"train\.safety_probe\.stop_above"):
        build({**base, "train": {**base["train"], "safety_probe": {**base["train"]["safety_probe"],
                                                                   "stop_above": 1.5}}})
