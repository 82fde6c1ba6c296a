"""Progress reporting that reads well wherever the output goes: a tqdm bar on a terminal, and
plain lines when stderr is a file or a pipe (a job log, a rank log, CI), where a bar's
carriage-return redraws would pile up into one unreadable line.

Plain lines: with `every`, one line every `every` steps (training: `train.log_every`, by default
about ten lines per job); without it, one line when the loop ends and one at most every
`PLAIN_SECONDS` while a long loop runs.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TextIO

PLAIN_SECONDS = 30.0


def library_bars_off() -> None:
    """Off a terminal, silence the bars that huggingface_hub, transformers and datasets draw
    themselves (weight loading, shard writing, downloads, dataset maps): the same redraws. The
    environment carries the setting to ranks this process starts; a user's own setting wins."""
    if sys.stderr.isatty():
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    # Libraries imported already read the environment at import time.
    if "huggingface_hub" in sys.modules and os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1":
        sys.modules["huggingface_hub"].utils.disable_progress_bars()
    if "transformers" in sys.modules and os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1":
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    if "datasets" in sys.modules and os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] == "1":
        sys.modules["datasets"].disable_progress_bars()


class Progress:
    """update(n), set_postfix(**values), close(): a tqdm bar or plain lines, or nothing when
    disabled (ranks other than 0)."""

    def __init__(self, total: int | None, desc: str, *, initial: int = 0, every: int | None = None,
                 disable: bool = False, unit: str = "it", leave: bool = True, stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        self.total, self.desc, self.n, self.unit, self.every = total, desc, initial, unit, every
        self.disabled = disable
        self.postfix: dict = {}
        self.bar = None
        self.t0 = self.t_line = time.perf_counter()
        self.n_line = initial
        if not disable and self.stream.isatty():
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=leave, file=self.stream)

    def set_postfix(self, **values) -> None:
        self.postfix = values
        if self.bar is not None:
            self.bar.set_postfix(**values)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif not self.disabled:
            due = (self.n % self.every == 0) if self.every else \
                time.perf_counter() - self.t_line >= PLAIN_SECONDS
            if due:
                self._line()

    def _line(self) -> None:
        self.n_line, self.t_line = self.n, time.perf_counter()
        total = f"/{self.total}" if self.total else ""
        extra = "".join(f", {k} {v}" for k, v in self.postfix.items())
        print(f"[safebasin] {self.desc}: {self.n}{total} {self.unit}{extra} "
              f"({self.t_line - self.t0:.1f}s)", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif not self.disabled and self.n != self.n_line:
            self._line()


def track(items: Iterable, desc: str, *, total: int | None = None, disable: bool = False,
          unit: str = "it", leave: bool = True) -> Iterator:
    """Iterate over items with a Progress (plain mode: a line at the end)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    progress = Progress(total, desc, disable=disable, unit=unit, leave=leave)
    for item in items:
        yield item
        progress.update()
    progress.close()
