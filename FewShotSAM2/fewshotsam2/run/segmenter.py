"""The ladder from settings to a result that every front end climbs (the command line, batch, the Slicer
module's process, scripts), after nnU-Net v2's predictor:

    segmenter = Segmenter(options)                                   # settings, checked when built
    segmenter.check_ready(out="x.seg.nrrd", inputs=[...])            # every check that needs no volume
    result = segmenter.segment_files("query/", [("img.nii.gz", "lab.nii.gz")], "liver=5", out="x.seg.nrrd")
    result = segmenter.segment(query, supports, structures)           # volumes (support_loader builds supports)

The model is built on first use and kept, so one Segmenter serves a cohort with one engine. Running out of
memory is one InputError saying what to change.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

from fewshotsam2.io.atomic import publish_together
from fewshotsam2.io.dicom_seg import check_query as check_seg_query
from fewshotsam2.matching.lpips_distance import shared_lpips
from fewshotsam2.model.device import pick_device
from fewshotsam2.model.checkpoints import cached_checkpoint, check_cache_folder
from fewshotsam2.errors import InputError, out_of_memory_as_input_error
from fewshotsam2.slicing.extent import check_named_weights
from fewshotsam2.supports.label_selection import LabelChoice
from fewshotsam2.options import SegmentOptions, check_overlap_output
from fewshotsam2.io.paths import check_output_file, refuse_overwriting_inputs
from fewshotsam2.run import pipeline
from fewshotsam2.run.pipeline import ProgressCallback, check_query, prepare, write_scores
from fewshotsam2.run.refine import refine as run_refine
from fewshotsam2.run.results import SegmentationResult
from fewshotsam2.supports.support_loader import SupportCase, SupportReader
from fewshotsam2.io.volume import Structure, Volume, check_output_path, read_volume, write_labels

Notify = Callable[[str], None]


class Segmenter:
    """Settings and (once built) a SAM2 engine; segments files or volumes.

    `engine`: an engine to use (tests, a program that keeps one loaded); `engine_factory(options)` builds one on
    first use instead of `pipeline.make_engine`. `notify(text)` receives the slice ranges and the memory/time
    estimate before each run's work starts.
    """

    def __init__(self, options: SegmentOptions, engine=None,
                 engine_factory: Optional[Callable[[SegmentOptions], object]] = None,
                 notify: Optional[Notify] = None) -> None:
        if not isinstance(options, SegmentOptions):
            raise TypeError(f"options must be a SegmentOptions, got {options!r}")
        self.options = options
        self._engine = engine
        self._engine_factory = engine_factory  # None: pipeline.make_engine, looked up when it is needed
        self.notify = notify

    @property
    def built(self) -> bool:
        return self._engine is not None

    @property
    def engine(self):
        """The SAM2 engine, built on first use (downloads the checkpoint the first time)."""
        if self._engine is None:
            with out_of_memory_as_input_error(self.options):
                self._engine = (self._engine_factory or pipeline.make_engine)(self.options)
        return self._engine

    # ------------------------------------------------------------------------------------------ checks

    def check_ready(self, out: Optional[str] = None, scores: Optional[str] = None,
                    inputs: Sequence[Optional[str]] = (), query: Optional[str] = None) -> None:
        """Every check that needs no volume, before any work: the outputs are writable and never an input, a DICOM
        SEG output has a DICOM series `query`, an `--overlap allow` output is a .seg.nrrd, the checkpoint can be found or downloaded, the LPIPS weights of an
        lpips run load."""
        options = self.options
        inputs = [*inputs, options.checkpoint, getattr(options.method_options, "weights", None),
                  options.extent_weights]
        refuse_overwriting_inputs([("--out", out), ("--scores", scores)], inputs)
        if out is not None:
            check_output_path(out)
            check_overlap_output(options.overlap, out)  # --overlap allow: a layered (.seg.nrrd) output only
        if scores is not None:
            if options.method == "propagate":
                raise InputError("--scores: --method propagate has no per-slice scores (reverse and lpips have); "
                                 "leave --scores out or choose another method")
            check_output_file(scores, ".csv")
        if out is not None and query is not None and str(out).lower().endswith(".dcm"):  # DICOM SEG (highdicom)
            check_seg_query(query)
        self.check_model_files()

    def check_model_files(self) -> None:
        """The checkpoint download has somewhere to go; the LPIPS weights of an lpips run load (now, not after
        every slice is encoded)."""
        options = self.options
        if not options.untrained and options.checkpoint is None:
            if cached_checkpoint(options.model, options.version, options.cache_dir) is None:
                check_cache_folder(options.cache_dir)
        if options.method == "lpips":
            o = options.method_options
            shared_lpips(o.net, o.weights, str(pick_device(options.device)))
        check_named_weights(options)  # AlexNet weights the user named for the slice range must load

    # ------------------------------------------------------------------------------------------ volumes

    def segment(self, query: Volume, supports: list[SupportCase], structures: list[Structure],
                progress: Optional[ProgressCallback] = None) -> SegmentationResult:
        """Segment `structures` in `query` from typed `supports` (`support_loader.load_supports`)."""
        progress = progress or (lambda stage, done, total: None)
        with out_of_memory_as_input_error(self.options):
            run = prepare(query, supports, structures, self.options)  # every input check before the model
            if not self.built:
                progress(f"Loading SAM2 {self.options.model}", 0, 0)
            engine = self.engine  # a checkpoint problem shows before the range estimate's seconds
            return run.execute(engine, progress, self.notify)

    def refine(self, query: Volume, supports: list[SupportCase], structures: list[Structure],
               previous_labels: Volume, corrections: Volume, progress: Optional[ProgressCallback] = None,
               slices=None, previous=None, stop_after_agreeing: int = 0, agreement: float = 0.99):
        """Refine a first run's label map from the user's corrected slices (refine.py): the same supports,
        structures and settings as that run; returns a `RefineResult`. `stop_after_agreeing` > 0: refine.py's
        opt-in approximation (default 0: sam2's semantics)."""
        with out_of_memory_as_input_error(self.options):
            return run_refine(query, supports, structures, self.options, previous_labels, corrections, progress,
                              self.engine, slices, previous, self.notify, stop_after_agreeing, agreement)

    # ------------------------------------------------------------------------------------------ files

    def read_inputs(self, query: str, supports: Sequence[tuple[str, str]],
                    labels: Union[str, Sequence[LabelChoice]],
                    reader: Optional[SupportReader] = None) -> tuple[Volume, list[SupportCase], list[Structure]]:
        """The query volume, the typed supports and the output structures, read from files."""
        volume = read_volume(query)
        check_query(volume)
        typed, structures = (reader or SupportReader()).load(supports, labels)
        return volume, typed, structures

    def segment_files(self, query: str, supports: Sequence[tuple[str, str]],
                      labels: Union[str, Sequence[LabelChoice]], out: Optional[str] = None,
                      scores: Optional[str] = None, progress: Optional[ProgressCallback] = None,
                      reader: Optional[SupportReader] = None) -> SegmentationResult:
        """Check, read, segment and (when `out` / `scores` are given) write, atomically: an output is complete or
        absent. `supports`: (image, labels) path pairs; `labels`: a `--labels` text."""
        self.check_ready(out, scores, inputs=[query, *(p for pair in supports for p in pair)], query=query)
        if progress is not None:  # reading a DICOM series takes seconds: say what happens until the first slice
            progress("Reading the volumes", 0, 0)
        volume, typed, structures = self.read_inputs(query, supports, labels, reader)
        result = self.segment(volume, typed, structures, progress)
        with publish_together():  # both outputs or neither (a full disk while writing the scores keeps no `out`)
            if out is not None:
                write_labels(out, result.labels, result.structures, source=query, method=self.options.method,
                             model=self.options.model)
            if scores is not None:
                write_scores(scores, result.scores, result.slice_ranges, result.structures)
        return result
