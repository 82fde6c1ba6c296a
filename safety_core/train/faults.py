"""Faults injected into real training jobs for the fault tests (tests/test_faults.py,
tests/test_multinode.py), read from the environment here and nowhere else, so a job's
behaviour under a fault is the production code's own:

- SAFEBASIN_NAN_AT_STEP=N: step N's loss becomes NaN (train.stop_on_nonfinite stops the job).
- SAFEBASIN_FAIL_AFTER_STEP=N (with SAFEBASIN_FAIL_RANK=R, default 0): rank R fails after step N,
  raising an error, or with SAFEBASIN_FAIL_MODE=hang it stops answering (sockets open, as a hung
  node), so its peers wait in their next collective until the collective timeout.
- SAFEBASIN_FAIL_IN_SAVE=N (with SAFEBASIN_FAIL_RANK=R): rank R's first checkpoint file of step
  N's save gets half its bytes, then with SAFEBASIN_FAIL_MODE=kill the rank SIGKILLs itself
  (a rank killed mid-write), with SAFEBASIN_FAIL_MODE=disk_full the write fails as torch.save
  fails on a full disk (the test also fills a real tmpfs where one can be mounted without root;
  the hook covers machines where none can).
"""

from __future__ import annotations

import errno
import io
import os
import signal
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Faults:
    nan_at_step: int = 0
    fail_after_step: int = 0
    fail_in_save: int = 0
    fail_rank: int = 0
    fail_mode: str = ""

    @classmethod
    def from_env(cls) -> "Faults":
        env = os.environ
        faults = cls(nan_at_step=int(env.get("SAFEBASIN_NAN_AT_STEP", "0")),
                     fail_after_step=int(env.get("SAFEBASIN_FAIL_AFTER_STEP", "0")),
                     fail_in_save=int(env.get("SAFEBASIN_FAIL_IN_SAVE", "0")),
                     fail_rank=int(env.get("SAFEBASIN_FAIL_RANK", "0")),
                     fail_mode=env.get("SAFEBASIN_FAIL_MODE", ""))
        if faults.fail_in_save and faults.fail_mode not in ("kill", "disk_full"):
            raise ValueError(f"SAFEBASIN_FAIL_IN_SAVE needs SAFEBASIN_FAIL_MODE=kill or disk_full, "
                             f"not {faults.fail_mode!r}")
        return faults

    def after_step(self, step: int, rank: int) -> None:
        """Called after optimizer step `step` (1-based) on every rank."""
        if self.fail_after_step != step or rank != self.fail_rank:
            return
        if self.fail_mode == "hang":
            # A hung node: the process stays, its connections stay open, and its peers see no
            # error until the collective timeout. A signal from its launcher still ends it.
            print(f"[safebasin] SAFEBASIN_FAIL_MODE=hang: rank {rank} stops after step {step}", flush=True)
            while True:
                time.sleep(3600)
        raise RuntimeError(f"SAFEBASIN_FAIL_AFTER_STEP={step}: injected failure on rank {rank}")

    def arm_save(self, engine, step: int, rank: int) -> None:
        """Before step `step`'s checkpoint save: make this rank's first file write of it fail."""
        if self.fail_in_save != step or rank != self.fail_rank:
            return
        ckpt_engine = engine.checkpoint_engine
        real_save = ckpt_engine.save
        mode = self.fail_mode

        def failing_save(state_dict, path: str):
            ckpt_engine.save = real_save  # one file fails, as one interrupted write would
            import torch
            buf = io.BytesIO()
            torch.save(state_dict, buf)
            data = buf.getvalue()
            with open(path, "wb") as f:
                f.write(data[:len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
            if mode == "kill":
                print(f"[safebasin] SAFEBASIN_FAIL_IN_SAVE={step}: rank {rank} killed while writing {path}",
                      flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            if os.path.exists("/dev/full"):
                torch.save(state_dict, "/dev/full")  # raises what torch.save raises on a full disk
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

        ckpt_engine.save = failing_save
