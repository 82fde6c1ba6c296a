"""Faults injected into real jobs, and what each one leaves (issue 25; the table in docs/train.md,
Faults): a NaN loss stops the job with its last good checkpoint as `latest` and the run FAILED
with the NaN logged; a rank SIGKILLed while it writes a checkpoint, or a disk that fills during
a save, leaves the previous checkpoint `latest` (a resume from it replays the same steps); a rank
that hangs ends the job at the collective timeout with an error naming it; a damaged checkpoint
is refused naming its files, and `--resume-from` continues from the previous one; a job killed
with its whole process group leaves no run RUNNING; the MLflow writer never holds a caller's
pipes. The faults come from the SAFEBASIN_* hooks of safety_core/train/faults.py.
`pytest -m faults` runs the suite (a few minutes on two cores)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import safebasin_cli
from safebasin.safety_core.train import integrity
from test_reliability import digest, write_config

pytestmark = pytest.mark.faults
# Two ranks of one thread each: the two cores of a small machine.
TWO_RANKS = {"OMP_NUM_THREADS": "1"}


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


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _kept(out: Path) -> tuple[str, list[str]]:
    """(the tag `latest` names, the tags whose files match their manifest, newest first)."""
    ckpt = out / "checkpoints"
    return (ckpt / "latest").read_text(), integrity.intact_tags(ckpt)


@pytest.mark.multiproc
def test_a_rank_killed_while_saving_keeps_the_previous_checkpoint_and_resumes_exactly(tmp_path, tiny_model_dir,
                                                                                     mlflow_uri):
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", out=out, train={"max_steps": 6, "save_every": 2},
                       deepspeed={"stage": 2})
    straight = safebasin_cli("train", str(cfg), "--nproc", "2", f"output.dir={tmp_path / 'straight'}", cwd=tmp_path,
                             env=TWO_RANKS)
    assert straight.returncode == 0, straight.stdout[-3000:] + straight.stderr[-3000:]
    fault = {**TWO_RANKS, "SAFEBASIN_FAIL_IN_SAVE": "4", "SAFEBASIN_FAIL_RANK": "1", "SAFEBASIN_FAIL_MODE": "kill"}
    res = safebasin_cli("train", str(cfg), "--nproc", "2", cwd=tmp_path, env=fault)
    assert res.returncode != 0 and "rank 1 killed while writing" in res.stdout + res.stderr, res.stderr[-3000:]
    # Kept: step2 as `latest`, intact; rank 1's half-written shard of step4 is there, unlisted.
    assert _kept(out) == ("step2", ["step2"])
    shard = out / "checkpoints" / "step4" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    assert shard.is_file() and not (out / "checkpoints" / "step4" / integrity.MANIFEST).exists()
    before = _rows(out)
    assert [r["step"] for r in before] == [1, 2, 3, 4]

    res = safebasin_cli("train", str(cfg), "--nproc", "2", "--resume", cwd=tmp_path, env=TWO_RANKS)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    after = _rows(out)
    assert [r["step"] for r in after] == [1, 2, 3, 4, 5, 6]
    # Exact: steps 3 and 4 again from step2's weights, optimizer state and data position give
    # the same losses and gradient norms to the last bit, and so does the whole run against an
    # uninterrupted one (the same two ranks reduce in the same order).
    assert [(r["loss"], r["grad_norm"]) for r in after[:4]] == [(r["loss"], r["grad_norm"]) for r in before]
    assert [(r["loss"], r["grad_norm"]) for r in after] == [(r["loss"], r["grad_norm"])
                                                            for r in _rows(tmp_path / "straight")]
    assert _kept(out) == ("step6", ["step6", "step4"])


@pytest.mark.multiproc
def test_a_hung_rank_ends_the_job_at_the_timeout_naming_the_rank(tmp_path, tiny_model_dir, mlflow_uri):
    timeout_s = 30
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", out=out, train={"max_steps": 6, "save_every": 2},
                       deepspeed={"stage": 2, "timeout_minutes": timeout_s / 60})
    log = tmp_path / "job.log"
    env = {**os.environ, **TWO_RANKS, "SAFEBASIN_FAIL_AFTER_STEP": "3", "SAFEBASIN_FAIL_RANK": "1",
           "SAFEBASIN_FAIL_MODE": "hang"}
    with log.open("w") as f:  # a file, not a pipe: nobody reads a pipe while the test waits
        job = subprocess.Popen([sys.executable, "-m", "safebasin.launcher.cli", "train", str(cfg), "--nproc", "2"],
                               cwd=tmp_path, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        # rank 0 writes step 3's row, then waits in step 4 for rank 1, which sleeps after step 3
        while not ((out / "metrics.jsonl").is_file() and len(_rows(out)) >= 3):
            assert job.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.2)
        hung = time.monotonic()
        code = job.wait(timeout=timeout_s + 120)
        waited = time.monotonic() - hung
        time.sleep(2)
        left = _alive(job.pid)
    finally:
        _kill_group(job.pid)
    text = log.read_text()
    assert code != 0, text[-4000:]
    # Margin over the timeout: the failing rank's teardown and the launcher's exit on a loaded machine.
    assert timeout_s * 0.9 < waited < timeout_s + 60, (waited, text[-4000:])
    assert not left, "the hung rank outlived its job"
    assert "rank 1 on " in text and "(last entered step 3) stopped answering while rank 0 waited in step 4" in text, \
        text[-4000:]
    assert "collective timeout (30 s: deepspeed.timeout_minutes" in text
    # Kept: step2, the checkpoint before the hang; no results; the run FAILED.
    assert _kept(out) == ("step2", ["step2"]) and not (out / "results.json").exists()
    _, (run,) = _runs(mlflow_uri, "reliability")
    assert run.info.status == "FAILED"


def _alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # nothing left


def test_a_damaged_checkpoint_is_refused_and_the_previous_one_used_when_asked(tmp_path, tiny_model_dir, mlflow_uri):
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", out=out, train={"max_steps": 6, "save_every": 2},
                       deepspeed={"stage": 2})
    res = safebasin_cli("train", str(cfg), cwd=tmp_path, env={"SAFEBASIN_FAIL_AFTER_STEP": "5"})
    assert res.returncode != 0 and "injected failure" in res.stderr, res.stderr[-3000:]
    assert _kept(out) == ("step4", ["step4", "step2"])
    before = _rows(out)
    step4 = out / "checkpoints" / "step4"
    # A truncated shard (a copy cut short) and a corrupt one (same size, other bytes)
    shard = step4 / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[:size // 2])
    states = step4 / "mp_rank_00_model_states.pt"
    data = bytearray(states.read_bytes())
    data[len(data) // 2] ^= 0xFF
    states.write_bytes(bytes(data))
    kept = digest(out)

    res = safebasin_cli("train", str(cfg), "--resume", cwd=tmp_path)
    assert res.returncode == 2, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"checkpoint step4 in {out / 'checkpoints'} is damaged and is not loaded" in res.stderr
    assert f"zero_pp_rank_0_mp_rank_00_optim_states.pt has {size // 2} bytes, {size} were written" in res.stderr
    assert "mp_rank_00_model_states.pt has the size it was written with but other bytes" in res.stderr
    assert "--resume-from step2 continues from it" in res.stderr and "Traceback" not in res.stderr
    assert digest(out) == kept  # refused before anything was touched

    res = safebasin_cli("train", str(cfg), "--resume-from", "step2", cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "--resume-from step2: step4 moved aside" in res.stdout
    after = _rows(out)
    assert [r["step"] for r in after] == [1, 2, 3, 4, 5, 6]
    assert [(r["loss"], r["grad_norm"]) for r in after[:5]] == [(r["loss"], r["grad_norm"]) for r in before]
    # Kept: the damaged step4 under checkpoints/set-aside, byte for byte (nothing is deleted).
    (aside,) = (out / "checkpoints" / integrity.SET_ASIDE).iterdir()
    assert aside.name.startswith("step4-") and digest(aside) == {k[len("checkpoints/step4/"):]: v for k, v in
                                                                 kept.items() if k.startswith("checkpoints/step4/")}
    assert _kept(out) == ("step6", ["step6", "step4"]) and (out / "results.json").is_file()


def _tmpfs_works(where: Path) -> bool:
    """Whether a tmpfs can be mounted here without root: in a user and mount namespace of
    its own (unshare -rm), where the kernel allows unprivileged user namespaces."""
    where.mkdir()
    try:
        return subprocess.run(["unshare", "-rm", "mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)],
                              capture_output=True).returncode == 0
    except FileNotFoundError:  # no unshare on this system
        return False


def _train_on_small_tmpfs(tmp_path: Path, cfg: Path, out: Path, size_kib: int):
    """`safebasin train` with output.dir on a tmpfs of size_kib, mounted in a mount namespace of
    the job's own; what the job left there is copied out (the namespace ends with the job) and
    returned as (exit code, stderr, the copy)."""
    seen, log, code = tmp_path / "seen", tmp_path / "job.log", tmp_path / "job.rc"
    out.mkdir()
    script = ('mount -t tmpfs -o size="$1"k tmpfs "$2" || exit 99; "$3" -m safebasin.launcher.cli train "$4" 2> "$5"; '
              'echo $? > "$6"; cp -a "$2" "$7"')
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", str(size_kib), str(out), sys.executable,
                           str(cfg), str(log), str(code), str(seen)], cwd=tmp_path, timeout=500,
                          stdout=subprocess.DEVNULL)
    assert done.returncode == 0, log.read_text()[-3000:] if log.exists() else done
    return int(code.read_text()), log.read_text(), seen


@pytest.mark.parametrize("disk", ["tmpfs", "hook"])
def test_a_full_disk_fails_the_save_and_keeps_the_previous_checkpoint(disk, tmp_path, tiny_model_dir, mlflow_uri):
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", out=out, train={"max_steps": 6, "save_every": 2})
    if disk == "tmpfs":
        if not _tmpfs_works(tmp_path / "probe"):
            pytest.skip("no tmpfs without root here (unprivileged user namespaces are off): the hook case stands in")
        # Room for one checkpoint (the model's weights in fp32, plus LoRA and a few small
        # files), not for a second beside it: step2 is written, step4 runs out of space.
        weights = sum(p.stat().st_size for p in Path(tiny_model_dir).glob("*.safetensors"))
        code, stderr, kept_dir = _train_on_small_tmpfs(tmp_path, cfg, out, int(1.75 * weights) // 1024)
    else:
        res = safebasin_cli("train", str(cfg), cwd=tmp_path,
                            env={"SAFEBASIN_FAIL_IN_SAVE": "4", "SAFEBASIN_FAIL_MODE": "disk_full"})
        code, stderr, kept_dir = res.returncode, res.stderr, out
    assert code == 2, stderr[-3000:]
    assert f"rank 0: saving checkpoint step4 to {out / 'checkpoints'} failed: " in stderr, stderr[-3000:]
    assert "MiB free there. `latest` still names step2, the last complete one" in stderr and "Traceback" not in stderr
    # Kept: step2 as `latest`, intact; the partial step4 unlisted; no temporary `latest` left.
    assert _kept(kept_dir) == ("step2", ["step2"])
    assert not list((kept_dir / "checkpoints").glob(".latest*"))
    assert not (kept_dir / "checkpoints" / "step4" / integrity.MANIFEST).exists()
    assert [r["step"] for r in _rows(kept_dir)] == [1, 2, 3, 4] and not (kept_dir / "results.json").exists()
    _, (run,) = _runs(mlflow_uri, "reliability")
    assert run.info.status == "FAILED"
