"""One job on a replica: the same code path as the command line's `segment`, with the events handed back.

`run_job` is the one function the replica calls; it goes through `cli`'s segment command (argument check,
reading, pipeline, atomic writes) so a remote job gives exactly the local outputs. When the core's `Segmenter`
lands, only this function changes.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

from ..errors import Cancelled, InputError

EventSink = Callable[[dict[str, Any]], None]


class EngineCache:
    """The replica's loaded model: reused while a job asks for the same engine settings (model, size, device)."""

    def __init__(self) -> None:
        self.settings: Optional[dict] = None
        self.engine = None

    def __call__(self, options):
        settings = options.engine_settings()
        if self.engine is None or settings != self.settings:
            from ..pipeline import make_engine

            self.engine, self.settings = None, None  # free the old model before building the new one
            self.engine = make_engine(options)
            self.settings = settings
        return self.engine


def run_job(argv: list[str], emit: EventSink, stop: Callable[[], bool],
            engine_factory: Optional[Callable] = None) -> tuple[int, str]:
    """Run `fewshotsam2 segment` with `argv` (the words after `segment`), in this process.

    Every event `--progress json` would print goes to `emit` (progress, warning, done); `stop()` is asked at every
    event and True cancels the run (nothing is written). Returns (exit code, error message): 0 and "" on success,
    2 and the one-line message for bad input, 130 when cancelled, 1 for anything else.
    """
    from .. import cli
    from ..options import OptionError

    def events(event: dict[str, Any]) -> None:
        if event.get("event") != "done" and stop():
            raise Cancelled()
        emit(event)

    argv = ["segment", *argv, "--progress", "json"]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = cli.build_parser(argv).parse_args(argv)
    except SystemExit:
        lines = [line for line in err.getvalue().splitlines() if line.strip()]
        return 2, (lines[-1].split("error: ", 1)[-1] if lines else "bad arguments")
    args.engine_factory = engine_factory
    args.events = events
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")  # every job reports its own warnings, not just the first job
            return args.func(args), ""
    except OptionError as exc:
        return 2, f"{cli.flag(exc.option)} {exc.problem}"
    except InputError as exc:
        return 2, str(exc)
    except Cancelled:
        return 130, "cancelled"
    except Exception as exc:  # noqa: BLE001  the replica survives a failing job and says why it failed
        return 1, f"{exc.__class__.__name__}: {exc}"


def volume_voxels(path: str) -> int:
    """The number of voxels of a stored input, read from its header (a DICOM folder: files x rows x columns)."""
    import SimpleITK as sitk

    p = Path(path.split("#", 1)[0])
    first = min(p.iterdir()) if p.is_dir() else p
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(first))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return 0  # unreadable: the job itself says so, with the command line's message
    size = 1
    for s in reader.GetSize():
        size *= int(s)
    return size * (len(list(p.iterdir())) if p.is_dir() else 1)
