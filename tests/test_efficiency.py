"""Memory and speed features: packing, gradient checkpointing, attention choice, the tokenisation
cache, the own grad norm at ZeRO-0, thread defaults, and MLflow logging off the step's path."""

import json
import math
import os
import subprocess
import sys
import time
import warnings

import pytest
import torch
from safebasin.safety_core.nll import IGNORE_INDEX


def _examples(tokenizer, n=5, max_length=96):
    from safebasin.safety_core.train import data as data_lib
    from safebasin.safety_core.train.data import DataSource
    convs = data_lib.load_conversations(DataSource(path="builtin:task", limit=n))
    return data_lib.encode_all(tokenizer, convs, max_length), convs


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_row_equals_separate_examples(tiny_model_dir, attention):
    """Each example in a packed row gets the logits it gets alone (no attention across
    examples), and the packed loss is the padded batch's loss."""
    from safebasin.safety_core.train.modeling import (
        ModelArgs,
        load_model,
        load_tokenizer,
    )
    from safebasin.safety_core.train.packing import packed, padded
    args = ModelArgs(path=str(tiny_model_dir), attn_implementation=attention)
    tok, model = load_tokenizer(args), load_model(args).eval()
    examples, _ = _examples(tok)
    assert len({len(e["input_ids"]) for e in examples}) > 1  # mixed lengths: padding exists
    lengths = [len(e["input_ids"]) for e in examples]
    capacity = max(lengths) + min(lengths) + 1  # several rows, some holding two examples, padding
    pk, pd = packed(examples, capacity, tok.pad_token_id), padded(examples, tok.pad_token_id)
    rows = pk.inputs["input_ids"].shape[0]
    assert 1 < rows < len(examples) and pk.inputs["input_ids"].shape[1] <= capacity
    assert pk.real_tokens == pd.real_tokens == sum(lengths)
    assert pk.positions == pk.inputs["input_ids"].numel() and pd.positions == pd.inputs["input_ids"].numel()
    with torch.no_grad():
        out = model(**pk.inputs, use_cache=False)
        row, start, seen = 0, 0, 0
        for e, n in zip(examples, lengths):
            if start + n > capacity:
                row, start = row + 1, 0
            alone = model(input_ids=torch.tensor([e["input_ids"]])).logits[0]
            torch.testing.assert_close(out.logits[row, start:start + n], alone, atol=1e-5, rtol=1e-4)
            assert pk.inputs["labels"][row, start] == IGNORE_INDEX
            start, seen = start + n, seen + 1
        assert seen == len(examples) and row == rows - 1
        torch.testing.assert_close(out.loss, model(**pd.inputs).loss, atol=1e-5, rtol=1e-5)


def _train(tmp_path, name, **overrides):
    import yaml
    from safebasin.launcher.config import load_config
    from safebasin.launcher.launch import single_process_env
    from safebasin.safety_core.train.trainer import train
    cfg = {"model": {"path": "builtin:tiny-llama"},
           "method": {"type": "lora", "r": 4, "alpha": 8},
           "data": {"train": {"path": "builtin:task"}, "num_examples": 32, "max_length": 96,
                    "cache_dir": str(tmp_path / "tok")},
           "train": {"max_steps": 3, "lr": 2e-3, "micro_batch_size": 4, "gradient_accumulation_steps": 2,
                     "seed": 1},
           "deepspeed": {"stage": 0}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cfg = load_config(path, [f"{k}={v}" for k, v in overrides.items()])
    single_process_env()
    out = tmp_path / name
    result = train(cfg.model, cfg.method, cfg.data, cfg.train, cfg.deepspeed, out)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return result, rows


def test_packing_and_checkpointing_train_the_same_steps(tmp_path, tiny_model_dir):
    _, plain = _train(tmp_path, "plain")
    result, fast = _train(tmp_path, "fast", **{"data.packing": "true", "train.gradient_checkpointing": "true"})
    base = result.model.get_base_model()
    assert base.is_activation_checkpointing if hasattr(base, "is_activation_checkpointing") \
        else base.is_gradient_checkpointing
    # ZeRO-0 fp32: DeepSpeed reports no norm, the trainer computes it.
    assert all(r["grad_norm"] is not None and r["grad_norm"] > 0 for r in plain + fast)
    share = [sum(r["padding_share"] for r in rows) / len(rows) for rows in (plain, fast)]
    assert 0 <= share[1] < share[0]
    assert [r["tokens"] for r in fast] == [r["tokens"] for r in plain]
    for key in ("loss", "grad_norm"):  # the same examples, the same loss and LoRA gradients
        assert [r[key] for r in fast] == pytest.approx([r[key] for r in plain], rel=1e-4), key


def test_tokenisation_is_cached_by_data_tokenizer_and_settings(tmp_path, tiny_model_dir):
    from safebasin.safety_core.train import data as data_lib
    from safebasin.safety_core.train.modeling import ModelArgs, load_tokenizer
    from safebasin.safety_core.train.tokenize_cache import encode_cached
    tok = load_tokenizer(ModelArgs(path=str(tiny_model_dir)))
    _, convs = _examples(tok, n=12)
    first, path = encode_cached(tok, convs, 64, cache_dir=str(tmp_path))
    assert first == data_lib.encode_all(tok, convs, 64) and path.exists()
    stamp = path.stat().st_mtime_ns
    again, same = encode_cached(tok, convs, 64, cache_dir=str(tmp_path))
    assert same == path and again == first and path.stat().st_mtime_ns == stamp  # read, not rewritten
    assert encode_cached(tok, convs, 32, cache_dir=str(tmp_path))[1] != path
    assert encode_cached(tok, convs[:-1], 64, cache_dir=str(tmp_path))[1] != path
    workers, other = encode_cached(tok, convs, 64, cache_dir=str(tmp_path / "w"), num_proc=2)
    assert workers == first and other.name == path.name
    tok.chat_template = tok.chat_template.replace("\n", " \n")
    assert encode_cached(tok, convs, 64, cache_dir=str(tmp_path))[1] != path


def test_attention_choice(tiny_model_dir):
    import importlib.util

    from safebasin.safety_core.train.modeling import ModelArgs, load_model
    ids = torch.tensor([[5, 40, 41, 42, 43, 2]])
    eager = load_model(ModelArgs(path=str(tiny_model_dir), attn_implementation="eager")).eval()
    sdpa = load_model(ModelArgs(path=str(tiny_model_dir))).eval()
    assert eager.config._attn_implementation == "eager" and sdpa.config._attn_implementation == "sdpa"
    with torch.no_grad():
        torch.testing.assert_close(eager(input_ids=ids).logits, sdpa(input_ids=ids).logits, atol=1e-5, rtol=1e-4)
    if importlib.util.find_spec("flash_attn") is None or not torch.cuda.is_available():
        with pytest.raises(ValueError, match="flash_attention_2.*(flash-attn|CUDA)"):
            load_model(ModelArgs(path=str(tiny_model_dir), attn_implementation="flash_attention_2"))


def test_thread_default_and_bf16_warning(monkeypatch):
    from safebasin.safety_core import runtime
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert runtime.default_threads() == max(1, runtime.usable_cores() // 2)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads()
    try:
        assert runtime.apply_threads(runtime.RuntimeArgs(threads=2)) == 2 == torch.get_num_threads()
        assert runtime.apply_threads(None) == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: False)
    monkeypatch.setattr(runtime, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert runtime.warn_slow_precision("bf16", on_cpu=True)
        assert not runtime.warn_slow_precision("bf16", on_cpu=True)  # once
        assert not runtime.warn_slow_precision("fp32", on_cpu=True)
    assert len(caught) == 1 and "bf16" in str(caught[0].message)


@pytest.mark.parametrize("writer", ["thread", "process"])
def test_tracker_logs_every_row_off_the_calling_thread(tmp_path, monkeypatch, writer):
    import mlflow
    from safebasin.launcher.config import JobConfig
    from safebasin.launcher.tracking import Tracker
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    cfg = JobConfig.model_validate({"model": {"path": "builtin:tiny-llama"}})
    tracker = Tracker(cfg, tmp_path / "out", active=True, writer=writer)
    for step in range(1, 201):
        tracker.log_metrics({"loss": 1.0 / step, "tokens_per_s": 10.0 * step, "note": "x"}, step)
    tracker.log_metrics({"loss": float("nan"), "grad_norm": float("inf")}, 201)  # logged, and counted
    assert tracker.nonfinite == {"loss": 1, "grad_norm": 1}
    (tmp_path / "a.txt").write_text("artifact")
    tracker.log_artifact(tmp_path / "a.txt")
    tracker.end()
    client = mlflow.MlflowClient(uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(tracker.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, 202))
    assert math.isnan(next(m.value for m in history if m.step == 201))
    assert [a.path for a in client.list_artifacts(tracker.run_id)] == ["a.txt"]
    assert json.loads((tmp_path / "out" / "mlflow_run.json").read_text())["run_id"] == tracker.run_id


@pytest.mark.parametrize("writer", ["thread", "process"])
def test_tracker_error_is_raised_not_dropped(tmp_path, monkeypatch, writer):
    from safebasin.launcher.config import JobConfig
    from safebasin.launcher.tracking import Tracker
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'file' / 'm.db'}")  # under a file
    tracker = Tracker(JobConfig.model_validate({"model": {"path": "builtin:tiny-llama"}}), tmp_path / "out",
                      active=True, writer=writer)
    tracker.log_metrics({"loss": 1.0}, 1)
    with pytest.raises(RuntimeError, match="MLflow tracking failed"):
        tracker.end()


def test_a_job_that_dies_leaves_its_run_killed_with_its_rows(tmp_path):
    """The writer process outlives a job killed without end(): what was logged is written and
    the run is closed as KILLED, not left RUNNING; the job never imported mlflow."""
    import mlflow
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    script = (
        "import os, sys\n"
        "from safebasin.launcher.config import JobConfig\n"
        "from safebasin.launcher.tracking import Tracker\n"
        "t = Tracker(JobConfig.model_validate({'model': {'path': 'builtin:tiny-llama'}}), sys.argv[1], active=True)\n"
        "for step in range(1, 6):\n"
        "    t.log_metrics({'loss': float(step)}, step)\n"
        "print(t.run_id, 'mlflow' in sys.modules, flush=True)\n"
        "os._exit(1)\n")
    res = subprocess.run([sys.executable, "-c", script, str(tmp_path / "out")], capture_output=True, text=True,
                         env={**os.environ, "MLFLOW_TRACKING_URI": uri}, timeout=120)
    run_id, imported = res.stdout.split()
    assert res.returncode == 1 and imported == "False", res.stderr
    client = mlflow.MlflowClient(uri)
    for _ in range(100):  # the writer finishes after the job is gone
        if client.get_run(run_id).info.status != "RUNNING":
            break
        time.sleep(0.2)
    assert client.get_run(run_id).info.status == "KILLED"
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2, 3, 4, 5]
