"""Faults injected into real jobs, and what each one leaves (issue 25): a NaN loss stops the job
with its last good checkpoint as `latest` and the run FAILED with the NaN logged; a job killed
with its whole process group leaves no run RUNNING; the MLflow writer never holds a caller's
pipes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import safebasin_cli
from test_reliability import write_config


def _runs(uri: str, experiment: str):
    import mlflow
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client, (client.search_runs([exp.experiment_id]) if exp else [])


def test_nan_loss_stops_the_job_and_keeps_the_last_good_checkpoint(tmp_path, tiny_model_dir, mlflow_uri):
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", out=out, train={"max_steps": 8, "save_every": 2})
    res = safebasin_cli("train", str(cfg), cwd=tmp_path, env={"SAFEBASIN_NAN_AT_STEP": "5"})
    assert res.returncode != 0
    assert "step 5: loss nan" in res.stderr and "train.stop_on_nonfinite" in res.stderr, res.stderr[-3000:]
    # the checkpoint of step 4 stays `latest`: nothing was saved from the NaN weights
    assert (out / "checkpoints" / "latest").read_text().strip().endswith("4")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and rows[-1]["loss"] != rows[-1]["loss"]
    assert not (out / "adapter").exists() and not (out / "results.json").exists()
    client, (run,) = _runs(mlflow_uri, "reliability")
    assert run.info.status == "FAILED"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == [1, 2, 3, 4, 5] and history[-1].value != history[-1].value

    # the same fault with the stop turned off trains on (the user asked for it): NaN to the end
    off = safebasin_cli("train", str(cfg), "train.stop_on_nonfinite=false", f"output.dir={tmp_path / 'off'}",
                        cwd=tmp_path, env={"SAFEBASIN_NAN_AT_STEP": "5"})
    assert off.returncode == 0, off.stderr[-3000:]
    assert json.loads((tmp_path / "off" / "results.json").read_text())["metrics"]["loss"] != 0.0


def test_a_job_killed_with_its_process_group_leaves_no_run_running(tmp_path, tiny_model_dir, mlflow_uri):
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", out=out, train={"max_steps": 100000, "save_every": 0})
    env = {**os.environ, "SAFEBASIN_TRACKING_WRITER": "process"}
    proc = subprocess.Popen([sys.executable, "-m", "safebasin.launcher.cli", "train", str(cfg)], cwd=tmp_path,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 300
    # killed once training runs and the run is open (the writer wrote its run file)
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2 and (out / "mlflow_run.json").is_file()):
        assert proc.poll() is None and time.monotonic() < deadline, "the job never logged two steps"
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)  # what a scheduler's or launcher's group kill does
    proc.wait()
    client, (run,) = _runs(mlflow_uri, "reliability")
    deadline = time.monotonic() + 60
    while client.get_run(run.info.run_id).info.status == "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.5)  # the writer, in a session of its own, sees its input end and closes the run
    assert client.get_run(run.info.run_id).info.status == "KILLED"


def test_an_orphaned_run_is_closed_by_the_next_job(tmp_path, tiny_model_dir, mlflow_uri):
    """The writer killed too (an out-of-memory kill of everything): the run says RUNNING with an
    owner that is gone; the next job opening the store marks it KILLED."""
    import mlflow
    from safebasin.launcher.tracking import OWNER_HOST, OWNER_PID
    client = mlflow.MlflowClient(mlflow_uri)
    exp = client.create_experiment("reliability")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket
    orphan = client.create_run(exp, tags={OWNER_HOST: socket.gethostname(), OWNER_PID: str(dead.pid)}).info.run_id
    elsewhere = client.create_run(exp, tags={OWNER_HOST: "another-host", OWNER_PID: str(dead.pid)}).info.run_id
    alive = client.create_run(exp, tags={OWNER_HOST: socket.gethostname(), OWNER_PID: str(os.getpid())}).info.run_id
    res = safebasin_cli("train", str(write_config(tmp_path / "cfg.yaml", out=tmp_path / "run")), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert client.get_run(orphan).info.status == "KILLED"
    assert client.get_run(elsewhere).info.status == "RUNNING"  # its host's processes are not ours to judge
    assert client.get_run(alive).info.status == "RUNNING"


def test_the_writer_never_holds_the_callers_pipes(tmp_path, tiny_model_dir, mlflow_uri):
    """capture_output returns when the job exits, not when the MLflow writer does; the writer's
    own messages go to the job folder's log."""
    cfg = write_config(tmp_path / "cfg.yaml", out=tmp_path / "run")
    res = subprocess.run([sys.executable, "-m", "safebasin.launcher.cli", "train", str(cfg)], cwd=tmp_path,
                         env={**os.environ, "SAFEBASIN_TRACKING_WRITER": "process"}, capture_output=True, text=True,
                         timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "run" / "mlflow_writer.log").is_file()


def test_a_set_truncated_away_is_refused_with_its_numbers(tmp_path, tiny_model_dir, mlflow_uri):
    cfg = write_config(tmp_path / "cfg.yaml", out=tmp_path / "run")
    res = safebasin_cli("train", str(cfg), "data.max_length=12", cwd=tmp_path)
    assert res.returncode != 0
    assert "data.train: 16 of 16 examples lose their whole response at data.max_length=12" in res.stderr, \
        res.stderr[-3000:]
    ok = safebasin_cli("train", str(cfg), f"output.dir={tmp_path / 'ok'}", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert json.loads((tmp_path / "ok" / "results.json").read_text())["metrics"]["examples_dropped"] == 0
