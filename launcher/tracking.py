"""MLflow tracking: one run per job, opened by global rank 0 only, reattached on resume.

Everything MLflow does happens in a writer off the job's critical path: opening the store and
the run (seconds for a fresh SQLite store) overlaps model loading, and metrics are queued and
written in batches (one `log_batch` per drain, not one SQLite transaction per metric per step).
`end()` drains the queue before it closes the run, so no row is lost; an error in the writer is
raised there (or when `run_id` is read), never dropped.

Where the writer runs: a process of its own (`python -m safebasin.launcher.tracking`), unless
this process has already imported mlflow (a test, the demo), in which case a thread
(`SAFEBASIN_TRACKING_WRITER=thread|process` chooses). Why a
process: importing mlflow and opening its store is ~2 s of pure-Python work that, on a thread,
holds the GIL against the job's own imports and model loading; a process does it on another
core, and the job never imports mlflow (`safebasin eval` of the tiny model, whole process:
11.2-12.4 s with the thread, 9.1-9.3 s with the process, measured side by side on a busy 2-core
machine; benchmarks/RESULTS.md has the quiet-machine figures).

(Over 300 lines: the job-side Tracker, the two channels and the writer that runs at their other
end speak one message protocol defined here; split apart, each half could change without the
other.)
"""

from __future__ import annotations

import json
import math
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

RUN_FILE = "mlflow_run.json"
WRITER_LOG = "mlflow_writer.log"  # the writer process's own messages (MLflow's warnings, errors)
# How long the writer waits for more rows before writing what it has: at most one batch per
# interval, so a fast loop costs one SQLite transaction per interval, not per step.
BATCH_INTERVAL_S = 0.5
MAX_BATCH = 1000  # MLflow caps a log_batch at 1000 metrics


class TrackingError(RuntimeError):
    pass


class Tracker:
    """Rank 0 gets a live MLflow run; other ranks get an inert tracker so callers never branch."""

    def __init__(self, config, out_dir: str | Path, *, active: bool, parent_run_id: str | None = None,
                 default_run_name: str | None = None, reattach: bool = False, writer: str | None = None):
        """`default_run_name` names the run when tracking.run_name is not set; `reattach`: a
        resumed job continues the run its output folder records; `writer`: "process" or
        "thread" (default: see the module docstring)."""
        self.nonfinite: dict[str, int] = {}  # key -> values logged that were NaN or inf
        self.active = active and config.tracking.enabled
        self._run_id: str | None = None
        self._opened = False
        self._error: str | None = None
        if not self.active:
            return
        from safebasin.launcher.config import flatten
        spec = {"uri": config.tracking.resolved_uri(), "experiment": config.tracking.experiment,
                "run_name": config.tracking.run_name or default_run_name, "parent_run_id": parent_run_id,
                "reattach": reattach, "out_dir": str(out_dir),
                "params": {k: ("" if v is None else str(v))[:6000]
                           for k, v in flatten(config.model_dump(mode="json", by_alias=True)).items()}}
        writer = writer or os.environ.get("SAFEBASIN_TRACKING_WRITER") or (
            "thread" if "mlflow" in sys.modules else "process")
        if writer not in ("thread", "process"):
            raise ValueError(f"SAFEBASIN_TRACKING_WRITER={writer!r}: allowed: thread, process")
        self._channel = _ThreadChannel(spec) if writer == "thread" else _ProcessChannel(spec)

    # -- the caller's side ------------------------------------------------------------------

    @property
    def run_id(self) -> str | None:
        if not self.active and not self._opened:
            return self._run_id
        self._await_open()
        self._raise_error()
        return self._run_id

    def log_metrics(self, row: dict, step: int | None = None) -> None:
        if not self.active:
            return
        # NaN and inf are logged too (MLflow stores them): a loss that turned NaN is a fact the
        # run must show, not a gap in its history. They are counted per key.
        clean = {k: float(v) for k, v in row.items()
                 if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        for k, v in clean.items():
            if not math.isfinite(v):
                self.nonfinite[k] = self.nonfinite.get(k, 0) + 1
        if clean:
            self._channel.send({"kind": "metrics", "row": clean, "step": step, "ts": int(time.time() * 1000)})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.active and Path(path).exists():
            self._channel.send({"kind": "artifact", "path": str(Path(path).resolve()), "artifact_path": artifact_path})

    def flush(self) -> None:
        """Wait until everything queued so far is written."""
        if self.active:
            self._await_open()
            self._channel.send({"kind": "flush"})
            self._await("flushed")
            self._raise_error()

    def end(self, status: str = "FINISHED") -> None:
        if not self.active:
            return
        self._await_open()
        self._channel.send({"kind": "end", "status": status})
        self._await("ended")
        self._channel.close()
        self.active = False
        if status == "FINISHED":
            self._raise_error()
        elif self._error is not None:
            # The job already failed: its own error is the one to raise, this one is reported.
            print(f"[safebasin] MLflow tracking also failed: {self._error}", file=sys.stderr)

    def _await_open(self) -> None:
        if not self._opened:
            self._opened = True
            reply = self._channel.receive()
            self._run_id = reply.get("run_id")
            self._error = self._error or reply.get("error")

    def _await(self, kind: str) -> None:
        while True:
            reply = self._channel.receive()
            self._error = self._error or reply.get("error")
            if reply.get("kind") == kind or reply.get("_lost"):
                return

    def _raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise TrackingError(f"MLflow tracking failed: {error}")


# -- the transports: the same writer behind a thread or a process ------------------------------

class _ThreadChannel:
    def __init__(self, spec: dict):
        self._inbox: queue.Queue = queue.Queue()
        self._replies: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=_Writer(spec, self._replies.put).run, args=(self._inbox.get,),
                                        name="safebasin-mlflow", daemon=True)
        self._thread.start()

    def send(self, message: dict) -> None:
        self._inbox.put(message)

    def receive(self) -> dict:
        return self._replies.get()

    def close(self) -> None:
        self._thread.join()


class _ProcessChannel:
    """JSON lines both ways: messages on the writer's stdin, replies (open, flush, end) on its
    stdout. The writer closes the run as KILLED if this process dies without `end`."""

    def __init__(self, spec: dict):
        # A session of its own: a launcher that kills the job's process group leaves the writer
        # to see its input end and close the run as KILLED. Its stderr goes to a file, never to
        # the job's: a caller capturing the job's output would otherwise wait for the writer too.
        log = Path(spec["out_dir"]) / WRITER_LOG
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as err:
            self._proc = subprocess.Popen([sys.executable, "-m", "safebasin.launcher.tracking"],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                          text=True, bufsize=1, start_new_session=True)
        self._lost: str | None = None
        self.send(spec)

    def send(self, message: dict) -> None:
        if self._lost is not None:
            return
        try:
            self._proc.stdin.write(json.dumps(message) + "\n")
        except BrokenPipeError:
            self._lost = f"the MLflow writer process exited (status {self._proc.wait()})"

    def receive(self) -> dict:
        line = "" if self._lost else self._proc.stdout.readline()
        if not line:
            self._lost = self._lost or f"the MLflow writer process exited (status {self._proc.wait()})"
            return {"kind": "lost", "error": self._lost, "_lost": True}
        return json.loads(line)

    def close(self) -> None:
        # Everything is written once `ended` came back: the writer's own exit (interpreter and
        # mlflow shutdown, ~1 s) is not waited for; subprocess reaps it later.
        for pipe in (self._proc.stdin, self._proc.stdout):
            try:
                pipe.close()
            except BrokenPipeError:
                pass


class _Writer:
    """Opens the run, then writes what arrives: metrics in batches, artifacts, flush and end."""

    def __init__(self, spec: dict, reply: Callable[[dict], None]):
        self.spec, self.reply = spec, reply

    def run(self, next_message: Callable[[], dict]) -> None:
        try:
            run_id = self._open()
        except Exception as e:  # noqa: BLE001  handed to the caller at run_id / flush / end, never dropped
            self.reply({"kind": "open", "error": f"{type(e).__name__}: {e}"})
            return self._drain(next_message, None)
        self.reply({"kind": "open", "run_id": run_id})
        while True:
            items = [next_message()]
            deadline = time.monotonic() + BATCH_INTERVAL_S
            # Gather what arrives within the interval, unless someone waits on a flush or end.
            while items[-1]["kind"] == "metrics":
                try:
                    items.append(next_message(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            self._handled = 0
            try:
                if self._write(items):
                    return
            except Exception as e:  # noqa: BLE001  handed to the caller at flush / end
                return self._drain(next_message, f"{type(e).__name__}: {e}", items[self._handled:])

    def _drain(self, next_message, error: str | None, pending: list[dict] = ()) -> None:
        """After an error: keep answering flush/end so the caller never waits forever."""
        pending = list(pending)
        while True:
            message = pending.pop(0) if pending else next_message()
            if message["kind"] == "flush":
                self.reply({"kind": "flushed", "error": error})
            elif message["kind"] == "end":
                self.reply({"kind": "ended", "error": error})
                return

    def _write(self, items: list[dict]) -> bool:
        from mlflow.entities import Metric
        metrics = [Metric(k, v, m["ts"], m["step"] or 0) for m in items if m["kind"] == "metrics"
                   for k, v in m["row"].items()]
        for i in range(0, len(metrics), MAX_BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + MAX_BATCH])
        for m in items:
            if m["kind"] == "artifact":
                if Path(m["path"]).is_dir():
                    self.client.log_artifacts(self.run_id, m["path"], m["artifact_path"])
                else:
                    self.client.log_artifact(self.run_id, m["path"], m["artifact_path"])
            elif m["kind"] == "flush":
                self.reply({"kind": "flushed"})
            elif m["kind"] == "end":
                self.client.set_terminated(self.run_id, status=m["status"])
                self.reply({"kind": "ended"})
                return True
            self._handled += 1  # a failure leaves this item and the rest to _drain
        return False

    def _open(self) -> str:
        import mlflow
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient
        spec = self.spec
        mlflow.set_tracking_uri(spec["uri"])
        self.client = client = MlflowClient()
        experiment = mlflow.set_experiment(spec["experiment"])
        _close_orphans(client, experiment.experiment_id)
        run_file = Path(spec["out_dir"]) / RUN_FILE
        # Only a resumed job continues the folder's run: any other job gets a run of its own, so
        # two jobs' metrics never mix in one run.
        previous = _previous_run(run_file, client) if spec["reattach"] else None
        if previous is not None:
            self.run_id = previous
            client.update_run(previous, status="RUNNING")
            for key, value in _owner_tags().items():
                client.set_tag(previous, key, value)
            return previous
        tags = {"mlflow.parentRunId": spec["parent_run_id"]} if spec["parent_run_id"] else {}
        self.run_id = client.create_run(experiment.experiment_id, run_name=spec["run_name"],
                                        tags={**tags, **_owner_tags()}).info.run_id
        params = [Param(k, v) for k, v in spec["params"].items()]
        for i in range(0, len(params), 100):  # MLflow caps a params batch at 100 entries
            client.log_batch(self.run_id, params=params[i:i + 100])
        run_file.parent.mkdir(parents=True, exist_ok=True)
        run_file.write_text(json.dumps({"run_id": self.run_id, "tracking_uri": mlflow.get_tracking_uri(),
                                        "experiment": spec["experiment"]}))
        return self.run_id


OWNER_HOST, OWNER_PID = "safebasin.owner_host", "safebasin.owner_pid"


def _owner_tags() -> dict[str, str]:
    """Which process ends the run: the one writing it (the writer process, or the job itself
    with the thread writer). When it is gone and the run still says RUNNING, nobody will end it."""
    return {OWNER_HOST: socket.gethostname(), OWNER_PID: str(os.getpid())}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def _close_orphans(client, experiment_id: str) -> list[str]:
    """Mark KILLED the experiment's RUNNING runs whose owner process on this host has died (a
    SIGKILL of the writer too, an out-of-memory kill): the next job that opens the store ends
    them. Runs owned by other hosts are left alone (their processes cannot be seen from here)."""
    host = socket.gethostname()
    closed = []
    runs = client.search_runs([experiment_id], filter_string=f"attributes.status = 'RUNNING' and "
                              f"tags.`{OWNER_HOST}` = '{host}'", max_results=1000)
    for run in runs:
        pid = run.data.tags.get(OWNER_PID, "")
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            client.set_terminated(run.info.run_id, status="KILLED")
            closed.append(run.info.run_id)
    if closed:
        print(f"[safebasin] MLflow: {len(closed)} run(s) whose process died without ending them marked "
              f"KILLED: {', '.join(closed)}", file=sys.stderr)
    return closed


def _previous_run(run_file: Path, client) -> str | None:
    """The run this output folder's job logged to, when it is in the current store: a resumed
    job continues it. One recorded in another store (the URI changed, or the database was
    removed) cannot be reattached; the job then gets a new run."""
    if not run_file.exists():
        return None
    import mlflow
    from mlflow.exceptions import MlflowException
    recorded = json.loads(run_file.read_text())
    current = mlflow.get_tracking_uri()
    if recorded.get("tracking_uri") == current:
        try:
            client.get_run(recorded["run_id"])
            return recorded["run_id"]
        except MlflowException:
            pass  # reported below
    print(f"[safebasin] MLflow run {recorded['run_id']} recorded in {run_file} is not in the store "
          f"{current}; starting a new run", file=sys.stderr)
    return None


def _writer_process() -> None:
    """The writer process: the spec on the first stdin line, then messages; replies on stdout.
    End of input without `end` (the job died) closes the run as KILLED."""
    inbox: queue.Queue = queue.Queue()
    out = sys.stdout
    sys.stdout = sys.stderr  # anything MLflow prints must not corrupt the reply stream

    def read() -> None:
        for line in sys.stdin:
            inbox.put(json.loads(line))
        inbox.put({"kind": "end", "status": "KILLED"})

    def reply(message: dict) -> None:
        try:
            out.write(json.dumps(message) + "\n")
            out.flush()
        except BrokenPipeError:
            pass  # the job is gone; the run is still closed

    spec = json.loads(sys.stdin.readline())
    threading.Thread(target=read, daemon=True).start()
    _Writer(spec, reply).run(lambda timeout=None: inbox.get(timeout=timeout))


if __name__ == "__main__":
    _writer_process()
