"""One job on a replica: the same code path as the command line's `segment`, with the events handed back.

`run_job` is the one function the replica calls: the core's `Segmenter` on the stored files with the client's
settings, as `cli.run_segment` does, so a remote job gives exactly the local outputs.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import SimpleITK as sitk

from fewshotsam2.commands.extent_command import estimate  # torch and SimpleITK only when it runs
from fewshotsam2.errors import Cancelled, InputError
from fewshotsam2.options import OptionError, SegmentOptions
from fewshotsam2.protocol import DONE, EXIT_BAD_INPUT, EXIT_CANCELLED, PROGRESS, WARNING
from fewshotsam2.settings import flag

# the pipeline and the Segmenter (torch) are imported where a job runs: the `serve` command's own process imports
# this module (through app.py) to build the application and never runs a job

EventSink = Callable[[dict[str, Any]], None]
SEGMENT, EXTENT = "segment", "extent"  # the kinds of job: `segment` and `extent` (the slice-range estimate)


class EngineCache:
    """The replica's loaded model: reused while a job asks for the same engine settings (model, size, device).

    With a `feature_cache` (model/feature_cache.FeatureCache, on disk, shared by the replicas of this server) the
    engine keeps every slice it encodes: a later job with the same support (same pixels, model and size) reads
    that support's features instead of encoding them again. Cached features are lossless, so a job's result
    does not depend on which jobs ran before it."""

    def __init__(self, feature_cache=None) -> None:
        self.settings: Optional[dict] = None
        self.engine = None
        self.feature_cache = feature_cache

    def __call__(self, options):
        settings = options.engine_settings()
        if self.engine is None or settings != self.settings:
            from fewshotsam2.run import pipeline  # torch: see the note at the top

            self.engine, self.settings = None, None  # free the old model before building the new one
            self.engine = pipeline.make_engine(options)
            self.settings = settings
        self.engine.feature_cache = self.feature_cache
        return self.engine


def run_job(spec: dict[str, Any], emit: EventSink, stop: Callable[[], bool],
            engine_factory: Optional[Callable] = None) -> tuple[int, str]:
    """Run one segmentation in this process through the core's `Segmenter`, as `fewshotsam2 segment` does (same
    checks, reading, pipeline and atomic writes). `spec`: query, supports ([image, labels] pairs), labels (the
    --labels text), out, scores (or None) and options (flat settings, checked here by SegmentOptions).

    Every event `--progress json` would print goes to `emit` (progress, warning, done); `stop()` is asked at every
    progress step and True cancels the run (nothing is written). Returns (exit code, error message): 0 and "" on
    success, 2 and the one-line message for bad input, 130 when cancelled, 1 for anything else.
    """
    from fewshotsam2.run.segmenter import Segmenter  # torch: see the note at the top

    if spec.get("kind") == EXTENT:
        return run_extent_job(spec, emit, stop)

    def progress(stage: str, done: int, total: int) -> None:
        if stop():
            raise Cancelled()
        emit({"event": PROGRESS, "stage": stage, "done": int(done), "total": int(total)})

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")  # every job reports its own warnings, not just the first job
            warnings.showwarning = lambda message, *rest, **kw: emit({"event": WARNING, "message": str(message)})
            try:
                options = SegmentOptions.from_flat(**spec["options"])
            except TypeError as exc:
                raise InputError(f"unknown option: {exc}") from None
            segmenter = Segmenter(options, engine_factory=engine_factory)
            result = segmenter.segment_files(spec["query"], [tuple(p) for p in spec["supports"]], spec["labels"],
                                             out=spec["out"], scores=spec.get("scores"), progress=progress)
    except OptionError as exc:
        return EXIT_BAD_INPUT, f"{flag(exc.option)} {exc.problem}"
    except InputError as exc:
        return EXIT_BAD_INPUT, str(exc)
    except Cancelled:
        return EXIT_CANCELLED, "cancelled"
    except Exception as exc:  # noqa: BLE001  the replica survives a failing job and says why it failed
        return 1, f"{exc.__class__.__name__}: {exc}"
    # the done event of `segment --progress json`
    emit({"event": DONE, "device": str(getattr(segmenter.engine, "device", "")),
          "seconds": result.timings["total"], "slice_axis": int(result.slice_axis),
          "encoder_calls": int(result.encoder_calls),
          "cache_hits": int(getattr(segmenter.engine, "cache_hits", 0)),
          "voxels": result.voxels(),
          "slice_ranges": {s.name: result.slice_ranges.get(s.value) for s in result.structures}})
    return 0, ""


def run_extent_job(spec: dict[str, Any], emit: EventSink, stop: Callable[[], bool]) -> tuple[int, str]:
    """`fewshotsam2 extent` on the stored files (commands/extent_command.estimate, as the command runs it): the
    answer travels in the done event ({"extent": {axis, structures, n_slices}}), no file is written. The estimate
    (AlexNet LPIPS, seconds) has no progress steps: a cancel takes effect when it ends. Returns as run_job."""
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = lambda message, *rest, **kw: emit({"event": WARNING, "message": str(message)})
            try:
                options = SegmentOptions.from_flat(**spec["options"])
            except TypeError as exc:
                raise InputError(f"unknown option: {exc}") from None
            emit({"event": PROGRESS, "stage": "Estimating the slice ranges", "done": 0, "total": 1})
            result = estimate(spec["query"], [tuple(p) for p in spec["supports"]], spec["labels"], options)
    except OptionError as exc:
        return EXIT_BAD_INPUT, f"{flag(exc.option)} {exc.problem}"
    except InputError as exc:
        return EXIT_BAD_INPUT, str(exc)
    except Exception as exc:  # noqa: BLE001  the replica survives a failing job and says why it failed
        return 1, f"{exc.__class__.__name__}: {exc}"
    if stop():
        return EXIT_CANCELLED, "cancelled"
    emit({"event": DONE, "extent": result, "seconds": round(time.perf_counter() - t0, 3)})
    return 0, ""


def volume_voxels(path: str) -> int:
    """The number of voxels of a stored input, read from its header (a DICOM folder: files x rows x columns)."""
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
