"""What launchers start on every rank: `python -m safebasin.launcher.ranklog ARGS` runs
`python -u -m safebasin.launcher.entry ARGS` as a child and copies its stdout and stderr with
every line prefixed `[rank R] `, so the interleaved output of many ranks and nodes stays
readable. With SAFEBASIN_RANK_LOG_DIR set, the unprefixed output also goes to DIR/rankR.log.

A separate process rather than a wrapper around sys.stdout: output written below Python
(NCCL and gloo errors, C++ warnings, a crash in native code) is prefixed as well, and nothing is
lost when the rank dies abruptly.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

ENTRY_MODULE = "safebasin.launcher.entry"
_LINE_END = re.compile(rb"(?<=[\r\n])")


def _die_with_parent() -> None:
    # Launchers stop a rank by signalling this wrapper; if it is SIGKILLed instead, the kernel
    # still ends the rank so it cannot linger holding its sockets and devices.
    if sys.platform.startswith("linux"):
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def _pump(src, dst, prefix: bytes, log) -> None:
    while True:
        chunk = os.read(src.fileno(), 65536)
        if not chunk:
            break
        # Other ranks write to the same terminal between our chunks, so a chunk that continues
        # a line (a progress bar, then a warning) is labelled again.
        at_line_start = True
        if log is not None:
            log.write(chunk)
            log.flush()
        out = bytearray()
        # Progress bars redraw with \r: a redrawn line gets its prefix again.
        for piece in _LINE_END.split(chunk):
            if not piece:
                continue
            if at_line_start and piece not in (b"\r", b"\n"):
                out += prefix
            out += piece
            at_line_start = piece.endswith((b"\n", b"\r"))
        dst.write(bytes(out))
        dst.flush()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    rank = os.environ.get("RANK", "?")
    log_dir = os.environ.get("SAFEBASIN_RANK_LOG_DIR")
    log = None
    if log_dir:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        log = open(Path(log_dir) / f"rank{rank}.log", "ab")
    child = subprocess.Popen([sys.executable, "-u", "-m", ENTRY_MODULE, *argv], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, preexec_fn=_die_with_parent)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: child.send_signal(signum))
    prefix = f"[rank {rank}] ".encode()
    pumps = [threading.Thread(target=_pump, args=(child.stdout, sys.stdout.buffer, prefix, log)),
             threading.Thread(target=_pump, args=(child.stderr, sys.stderr.buffer, prefix, log))]
    for t in pumps:
        t.start()
    code = child.wait()
    for t in pumps:
        t.join()
    if log is not None:
        log.close()
    # A rank killed by signal N reports 128 + N, as a shell would.
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    sys.exit(main())
