"""A terminal progress bar for `segment`'s `progress(stage, done, total)` callback (the command line's and the
Python API's default).

One tqdm bar per stage. A stage's bar starts at 0 when the stage starts, not when its first batch is done: the
pipeline reports `done=0` before encoding, and for a stage whose first report already counts work, the bar's
clock is set to when the previous stage ended, so rates are real slices per second from the first line.
"""

from __future__ import annotations

import contextlib
import sys
import time
import warnings
from typing import Callable, Iterator, Optional, TextIO

from fewshotsam2.protocol import JsonEvents


def stage_head(stage: str) -> str:
    """'liver: Forward prediction 3/20' -> 'liver: Forward prediction' (one bar per stage, not per count)."""
    head, _, tail = stage.rpartition(" ")
    return head if head and tail.count("/") == 1 and tail.replace("/", "").isdigit() else stage


class ProgressBar:
    """Callable as `progress(stage, done, total)`; call `close()` at the end (also usable as a context manager)."""

    def __init__(self, file: Optional[TextIO] = None, unit: str = "slice") -> None:
        self._file = file if file is not None else sys.stderr
        self._unit = unit
        self._bar = None
        self._stage: Optional[str] = None
        self._last = time.time()  # when the latest report came: the start of the next stage

    def __call__(self, stage: str, done: int, total: int) -> None:
        from tqdm import tqdm  # imported on first report: `import fewshotsam2` and `--help` stay fast

        if total <= 0:  # a stage with nothing to count (reading the volumes, loading SAM2) draws no bar
            return
        head = stage_head(stage)
        if head != self._stage:
            self.close()
            self._stage = head
            # smoothing=0: the rate is done / elapsed since the stage started, never one batch over a few microseconds
            self._bar = tqdm(total=total, desc=head, unit=self._unit, leave=False, file=self._file, smoothing=0,
                             dynamic_ncols=True)
            if done > 0:  # the stage began before this first report: when the previous one ended
                self._bar.start_t = self._bar.last_print_t = self._last
        self._bar.total = total
        self._bar.n = done
        self._bar.refresh()
        self._last = time.time()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            self._stage = None

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def run_output(progress: str = "bar", quiet: bool = False) -> Iterator[tuple[Optional[JsonEvents], Optional[Callable]]]:
    """Where a command's run reports, as (events, progress callback): JSON event lines on stdout (`--progress
    json`: whatever else would print there, a library's download notice, goes to stderr, and warnings become event
    lines), a progress bar on stderr, or nothing (`--quiet`). Everything changed is restored on the way out."""
    if progress == "json":
        events = JsonEvents(sys.stdout)
        with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
            warnings.showwarning = events.showwarning
            yield events, events
    elif quiet:
        yield None, None
    else:
        with ProgressBar() as bar:
            yield None, bar
