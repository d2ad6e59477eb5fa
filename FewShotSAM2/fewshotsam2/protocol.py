"""How a run talks to the program that started it: exit codes, the `--progress json` event lines, and the
variable naming the parent process. One table for both sides: the command line writes it, the Slicer module's
process runner (FewShotSAM2Lib/process.py) reads it. Pure Python: the Slicer side imports it without torch.

Event lines (one JSON object per line on stdout, flushed at once):
    {"event": "progress", "stage": str, "done": int, "total": int}
    {"event": "warning", "message": str}
    {"event": "done", ...}   the run's summary (device, seconds, encoder_calls, slice_axis, voxels, slice_ranges, range_reports)
    {"event": "submitted", "job": str, "server": str}   `segment --server` only: the job's id on the server, to
                             fetch it from another process with `--attach` if this one stops
"""

from __future__ import annotations

import json
import os
from typing import IO, Any, Optional

from fewshotsam2.errors import Cancelled

EXIT_OK = 0
EXIT_SOME_FAILED = 1  # batch: at least one case failed (the others were written)
EXIT_BAD_INPUT = 2  # one line on stderr, nothing written
EXIT_CANCELLED = 130  # Ctrl-C, a cancel, or the parent is gone
ERROR_PREFIX = "fewshotsam2: error:"  # the one line of a bad-input exit starts with this

PROGRESS, WARNING, DONE, SUBMITTED = "progress", "warning", "done", "submitted"
EVENTS = (PROGRESS, WARNING, DONE, SUBMITTED)

# the pid of the program that started the run: the run stops when it is gone (see `check_parent_alive`)
PARENT_PID_ENV = "FEWSHOTSAM2_PARENT_PID"


class JsonEvents:
    """Writes the event lines to `stream` (the real stdout of the run) and stops the run when its parent is gone.

    Use it as a progress callback: `events(stage, done, total)`.
    """

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def line(self, **fields: Any) -> None:
        self.stream.write(json.dumps(fields) + "\n")
        self.stream.flush()

    def __call__(self, stage: str, done: int, total: int) -> None:
        self.line(event=PROGRESS, stage=stage, done=int(done), total=int(total))
        check_parent_alive()

    def warning(self, message: str) -> None:
        self.line(event=WARNING, message=str(message))

    def done(self, **fields: Any) -> None:
        self.line(event=DONE, **fields)

    def showwarning(self, message, category, filename, lineno, file=None, line=None) -> None:
        """A `warnings.showwarning` replacement: the core's warnings become warning lines of the stream."""
        self.warning(str(message))


def parse_event(line: str) -> Optional[dict]:
    """One line of `--progress json` output as a dict with an "event" key, or None for anything else."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        event = json.loads(line)
    except ValueError:
        return None
    if not isinstance(event, dict) or event.get("event") not in EVENTS:
        return None
    return event


def check_parent_alive(environ: Optional[dict] = None) -> None:
    """Raise `Cancelled` when the program named in $FEWSHOTSAM2_PARENT_PID is gone: nobody reads the result.

    The Slicer module runs each segmentation in its own process group (so that Cancel can kill it with its
    children), which also means the run would outlive a killed Slicer. POSIX only (on Windows os.kill(pid, 0)
    would send Ctrl-C).
    """
    parent = (os.environ if environ is None else environ).get(PARENT_PID_ENV, "")
    if os.name != "posix" or not parent.isdigit():
        return
    try:
        os.kill(int(parent), 0)
    except ProcessLookupError:
        raise Cancelled(f"the program that started this run (pid {parent}, ${PARENT_PID_ENV}) is gone") from None
    except PermissionError:
        pass  # exists, owned by someone else
