"""FewShotSAM2: segment a structure in a 3D scan from one or a few labeled scans with SAM2, without training.

This file holds the classes 3D Slicer expects of a scripted module (module, parameter node, widget, logic,
self-test). The Slicer-side helpers live in `FewShotSAM2Lib/` (MRML <-> files, the segmentation process, the
dependency set-up, review); the computation lives in the core `fewshotsam2` (see docs/architecture.md), which
runs in its own process: Slicer's process never imports torch for a run.

The Logic needs only MRML and `slicer.util` (no Qt, no `slicer.app`), so it runs in Slicer's Python console and
in the `slicer-core` Python package alike:

    logic = FewShotSAM2Logic()
    seg = logic.segment(queryVolumeNode, [(supportVolumeNode, supportSegmentationNode, ["Segment_1"])],
                        method="reverse")

Outside the Slicer application (slicer-core: no `qt`, `ctk`, `slicer.ScriptedLoadableModule`, `slicer.app`) the
module still imports: the GUI classes are then defined on inert stand-in bases and must not be instantiated.
"""

import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Annotated, Any, Callable, Optional

import numpy as np
import vtk

import slicer
from slicer.util import VTKObservationMixin

try:  # The Slicer application: Qt, CTK and the scripted-module framework are available.
    import qt
    from slicer.i18n import tr as _
    from slicer.i18n import translate
    from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
    from slicer.ScriptedLoadableModule import (
        ScriptedLoadableModule,
        ScriptedLoadableModuleLogic,
        ScriptedLoadableModuleTest,
        ScriptedLoadableModuleWidget,
    )

    SLICER_APPLICATION = True
except ImportError:  # slicer-core (pip): MRML and slicer.util only. The Logic works; the GUI classes are inert.
    SLICER_APPLICATION = False

    def _(text):
        return text

    def translate(context, text):
        return text

    def parameterNodeWrapper(classtype):
        return classtype

    class _Annotation:
        def __init__(self, *args):
            self.args = args

    class Choice(_Annotation):
        def __init__(self, choices):
            super().__init__(choices)
            self.choices = list(choices)

    class WithinRange(_Annotation):
        def __init__(self, minimum, maximum):
            super().__init__(minimum, maximum)
            self.minimum, self.maximum = minimum, maximum

    class _OutsideSlicerApplication:
        """Stand-in base class for the GUI classes when the Slicer application is not running."""

        def __init__(self, parent=None, *args, **kwargs):
            self.parent = parent

    ScriptedLoadableModule = _OutsideSlicerApplication
    ScriptedLoadableModuleWidget = _OutsideSlicerApplication
    ScriptedLoadableModuleTest = _OutsideSlicerApplication

    class ScriptedLoadableModuleLogic:
        """Minimal stand-in of slicer.ScriptedLoadableModule.ScriptedLoadableModuleLogic (no parameter node)."""

        def __init__(self, parent=None):
            self.moduleName = self.__class__.__name__
            if self.moduleName.endswith("Logic"):
                self.moduleName = self.moduleName[: -len("Logic")]

        def getParameterNode(self):
            raise RuntimeError("the parameter node needs the Slicer application (slicer.mrmlScene)")


from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode  # noqa: E402  (MRML, also in slicer-core)

from FewShotSAM2Lib import choices, dependencies, mrml_io, process, refining, remote, review, slice_ranges  # noqa: E402
from FewShotSAM2Lib.choices import (  # noqa: E402  (re-exported: the GUI's choices)
    DEVICES,
    IMAGE_SIZES,
    INTENSITY_PRESETS,
    LPIPS_NETS,
    METHODS,
    MODEL_SIZES,
    MODEL_VERSIONS,
    SLICE_AXES,
)
from FewShotSAM2Lib.mrml_io import RAS_TO_LPS, nodeName  # noqa: E402
from fewshotsam2 import settings  # noqa: E402  (pure Python: the settings table)
from FewShotSAM2Lib.review import LOW_CONFIDENCE_LPIPS_QUANTILE, LOW_CONFIDENCE_PI  # noqa: E402, F401

README_URL = "https://github.com/fewshotsam2/SlicerFewShotSAM2#readme"

# Lib modules reloaded by the widget's Reload button, dependencies first
_LIB_MODULES = ("FewShotSAM2Lib.choices", "FewShotSAM2Lib.mrml_io", "FewShotSAM2Lib.review", "FewShotSAM2Lib.windows_job",
                "FewShotSAM2Lib.process",
                "FewShotSAM2Lib.slice_ranges", "FewShotSAM2Lib.dependencies", "FewShotSAM2Lib.sample_data",
                "FewShotSAM2Lib.remote")


#
# FewShotSAM2
#


class FewShotSAM2(ScriptedLoadableModule):
    """Module description shown by Slicer. Uses ScriptedLoadableModule base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("FewShotSAM2")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []  # torch is installed by the module (light-the-torch in PythonSlicer)
        self.parent.contributors = ["FewShotSAM2 contributors"]
        self.parent.helpText = _(
            """
Segment a structure in a new 3D scan (the <i>query</i>) from one or a few labeled scans (the <i>supports</i>)
with the SAM2 foundation model, without any training. Pick the query volume, add one or more supports
(a volume, its segmentation and the segments to copy; the query itself with a few labeled slices works too),
choose a method and click <b>Segment</b>. Review the result: the per-slice confidence and the list of
low-confidence slices show where to look first.
See the <a href="{url}">documentation</a>.
"""
        ).format(url=README_URL)
        self.parent.acknowledgementText = _(
            """
This module implements the methods of
Bai et al. 2024, "RevSAM2: Prompt SAM2 for Medical Image Segmentation via Reverse-Propagation without
Fine-tuning", <a href="https://arxiv.org/abs/2409.04298">arXiv:2409.04298</a> (reverse propagation), and
Zu et al. 2025, "Rethinking Few-Shot Medical Image Segmentation by SAM2: A Training-Free Framework with
Augmentative Prompting and Dynamic Matching", <a href="https://arxiv.org/abs/2503.04826">arXiv:2503.04826</a>
(LPIPS matching), on top of SAM2 (Meta AI, Apache-2.0).
"""
        )
        if SLICER_APPLICATION and not dependencies.pythonProblem():
            # after start-up: the SampleData module may be loaded after this one
            slicer.app.connect("startupCompleted()", _registerSampleData)


def _registerSampleData():
    """Register the demo scans (a labeled support CT and a query CT) with Slicer's SampleData module."""
    from FewShotSAM2Lib import sample_data

    sample_data.register(FewShotSAM2SampleData.downloadSupport, FewShotSAM2SampleData.downloadQuery)


class FewShotSAM2SampleData:
    """The demo samples' customDownloader functions (Slicer application only: SampleData, the scene's cache)."""

    @staticmethod
    def _download(logic, uri: str, folder: str, fileName: str, checksum: str) -> str:
        """SampleDataLogic.downloadFile, which returns the path even when the checksum failed (it removes the file)."""
        import os

        os.makedirs(folder, exist_ok=True)
        path = logic.downloadFile(uri, folder, fileName, checksum)
        if not os.path.isfile(path):
            raise RuntimeError(f"FewShotSAM2 sample data: {uri} could not be downloaded or failed its checksum")
        return path

    @staticmethod
    def downloadSupport(source):
        """ct-a and its labels as a segmentation whose segments are named liver / spleen (not Label_5 / Label_1)."""
        import SampleData

        from FewShotSAM2Lib import sample_data

        logic = SampleData.SampleDataLogic()
        cache = slicer.mrmlScene.GetCacheManager().GetRemoteCacheDirectory()
        imagePath, labelsPath = (FewShotSAM2SampleData._download(logic, uri, cache, name, checksum)
                                 for uri, name, checksum in zip(source.uris, source.fileNames, source.checksums))
        volume = slicer.util.loadVolume(imagePath, {"name": source.nodeNames[0]})
        labelmap = slicer.util.loadLabelVolume(labelsPath, {"name": source.nodeNames[1] + " (label map)"})
        try:
            segmentation = sample_data.namedSegmentation(slicer.mrmlScene, labelmap, source.nodeNames[1])
            segmentation.CreateDefaultDisplayNodes()
        finally:
            slicer.mrmlScene.RemoveNode(labelmap)
        slicer.util.setSliceViewerLayers(background=volume, fit=True)
        return [volume, segmentation]

    @staticmethod
    def downloadQuery(source):
        """The DICOM series into a folder of its own in the download cache, then one of its files loaded: the
        archetype reader reads that folder, not the whole shared cache."""
        import os

        import SampleData

        from FewShotSAM2Lib import sample_data

        logic = SampleData.SampleDataLogic()
        folder = os.path.join(slicer.mrmlScene.GetCacheManager().GetRemoteCacheDirectory(), sample_data.QUERY_FOLDER)
        paths = [FewShotSAM2SampleData._download(logic, uri, folder, name, checksum)
                 for uri, name, checksum in zip(source.uris, source.fileNames, source.checksums)]
        volume = slicer.util.loadVolume(paths[-1], {"name": source.nodeNames[-1]})
        slicer.util.setSliceViewerLayers(background=volume, fit=True)
        return [volume]


#
# FewShotSAM2ParameterNode
#


def _parameterNodeClass():
    """The module's parameter node: every setting the GUI shows comes from the core's settings table
    (fewshotsam2/settings.py: its `gui` name, type, choices or range, and the front ends' default), beside the
    GUI's own members below. Saved with the scene.

    queryVolume - the volume to segment.
    supportVolumes, supportSegmentations, supportSegmentIds - the supports, one entry per row (same length);
        supportSegmentIds[n] is the list of segment IDs of supportSegmentations[n] the user checked.
    outputSegmentation - where the result goes (None: a new segmentation node per run).
    sliceRangeMode - "auto" (each structure's estimated slice range), "off" (every slice) or "manual" (the ranges
        of the Slice range table).
    sliceRanges, sliceRangesVolume - the Slice range table (JSON, see FewShotSAM2Lib/slice_ranges.py) and the query
        it belongs to; written and read through FewShotSAM2Logic.storeSliceRanges / storedSliceRanges.
    """
    annotations = {
        "queryVolume": vtkMRMLScalarVolumeNode,
        "supportVolumes": list[vtkMRMLScalarVolumeNode],
        "supportSegmentations": list[vtkMRMLSegmentationNode],
        "supportSegmentIds": list[list[str]],
    }
    defaults = {}
    for row in settings.gui_settings():
        limit = WithinRange(*row.gui_range) if row.gui_range else Choice(row.gui_choices or row.choices)
        annotations[row.gui] = Annotated[row.kind, limit]
        defaults[row.gui] = row.gui_default
    annotations.update(sliceRangeMode=Annotated[str, Choice(choices.SLICE_RANGE_MODES)], sliceRanges=str,
                       sliceRangesVolume=vtkMRMLScalarVolumeNode, outputSegmentation=vtkMRMLSegmentationNode)
    defaults.update(sliceRangeMode="auto", sliceRanges="")
    namespace = {"__annotations__": annotations, "__doc__": _parameterNodeClass.__doc__, "__module__": __name__,
                 "__qualname__": "FewShotSAM2ParameterNode", **defaults}
    return parameterNodeWrapper(type("FewShotSAM2ParameterNode", (), namespace))


FewShotSAM2ParameterNode = _parameterNodeClass()


#
# Logic helpers (no Qt)
#


def _inputError(message):
    return mrml_io.inputError(message)


@dataclass
class FewShotSAM2Support:
    """One support as the Logic takes it: a volume, a segmentation and the segment IDs to use.

    segmentIds None means every segment of the segmentation (scripting); an empty list is refused.
    """

    volumeNode: Any
    segmentationNode: Any
    segmentIds: Optional[list] = None


@dataclass
class PreparedSupport:
    """A support converted for the core: its image and its segments as a label map on the image's grid (one value
    per structure; overlapping segments in separate layers)."""

    image: Any  # fewshotsam2.io.volume.Volume
    labels: Any  # fewshotsam2.io.volume.LabelMap
    name: str = "support"


@dataclass
class FewShotSAM2Run:
    """Everything a run needs, made by `prepare` in the main thread (core volumes, no MRML access needed)."""

    query: Any  # fewshotsam2.io.volume.Volume
    supports: list  # [PreparedSupport]
    structures: list  # [fewshotsam2.io.volume.Structure]
    method: str
    options: dict  # validated settings under their flat names (fewshotsam2.options), see process.OPTION_FLAGS
    # MRML side, used by `apply` only (main thread)
    queryVolumeNode: Any = None
    outputSegmentationNode: Any = None
    segmentMetadata: dict = field(default_factory=dict)  # structure name -> source vtkSegment (name, colour, terminology)


class FewShotSAM2Job(process.ProcessJob):
    """A started run: the segmentation process and what it was started for. Poll it from the main thread."""

    def __init__(self, prepared: FewShotSAM2Run, segmentationProcess: process.SegmentationProcess):
        self.prepared = prepared
        self.process = segmentationProcess
        self.startTime = time.time()


class FewShotSAM2ExtentJob(FewShotSAM2Job):
    """A started slice-range estimate (`fewshotsam2 extent` in its own process); poll `finished` from the main
    thread, then `FewShotSAM2Logic.finishSliceRangeEstimate`, or `FewShotSAM2Logic.cancel` it."""


#
# FewShotSAM2Logic
#


class FewShotSAM2Logic(ScriptedLoadableModuleLogic):
    """MRML <-> files and the segmentation process. No Qt; usable from scripts and slicer-core.

    `segment` = `prepare` (MRML nodes -> core volumes, main thread) + `start` (files in a temporary folder, the
    core's command line in its own process) + polling + `finish` (result file -> segmentation node, main thread).
    A failure or a cancel in any step leaves the scene as it was, and the temporary folder is removed in every case.
    """

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.lastResult = None
        self.python = None  # the interpreter of the segmentation process; None: process.pythonExecutable()
        # where job folders are made; the widget sets Slicer's temporary folder (the application's temporaryPath, which
        # the user chooses in Application Settings); None: the system's temporary folder
        self.temporaryFolder = None
        # refine from the user's edits (FewShotSAM2Lib.refining): per output node, its run as produced; undo backups
        self._refineStates = {}
        self._refineUndo = {}

    def getParameterNode(self):
        return FewShotSAM2ParameterNode(super().getParameterNode())

    # ------------------------------------------------------------------------------------------ entry point

    def segment(
        self,
        queryVolumeNode,
        supports,
        method="reverse",
        outputSegmentationNode=None,
        progressCallback: Optional[Callable[[str, int, int], None]] = None,
        **options,
    ):
        """Segment `queryVolumeNode` from the labeled `supports`; blocks, returns the output segmentation node.

        supports: list of (volume node, segmentation node, segment IDs) - segment IDs a list of str, or None for
            every segment of that segmentation. Segments with the same name in different supports are the same
            structure; the first support that has it gives its name and colour.
        method: "reverse" | "lpips" | "propagate".
        outputSegmentationNode: written in place (its segments replaced); None creates a new node.
        progressCallback(stage, done, total): called for each progress line of the process; raise
            fewshotsam2.errors.Cancelled from it to stop (the process is killed, nothing is written).
        options: model, version, image_size, device, checkpoint, untrained, cache_dir, batch_size, axis, preset,
            shots, top_k, min_score, keep_supports, augmentations, lpips_net, lpips_weights, seed, slice_range
            ("auto" | "off" | "FIRST:LAST"), slice_ranges ({segment name: (first, last) | "off" | "auto"}, e.g.
            from `estimateSliceRanges`; segments not named take slice_range).
        The result (labels, scores, device, seconds, warnings) is kept in `self.lastResult`.
        """
        prepared = self.prepare(queryVolumeNode, supports, method, outputSegmentationNode, **options)
        job = self.start(prepared)
        self._waitFor(job, progressCallback)
        return self.finish(job)

    def _waitFor(self, job, progressCallback=None) -> None:
        """Block until a started job's process ends, passing its progress lines on; any exception (a Cancelled
        raised by the callback, Ctrl-C) kills the process first."""
        try:
            while True:
                finished = job.finished  # read before polling, so that the last lines are not missed
                for event in job.poll():
                    if event["event"] == "progress" and progressCallback is not None:
                        progressCallback(str(event.get("stage", "")), int(event.get("done", 0)), int(event.get("total", 0)))
                if finished:
                    return
                time.sleep(0.1)
        except BaseException:
            self.cancel(job)
            raise

    # ------------------------------------------------------------------------------------------ prepare

    def prepare(self, queryVolumeNode, supports, method="reverse", outputSegmentationNode=None, **options):
        """Check the inputs and convert them into the core's volumes (main thread). Changes nothing."""
        from fewshotsam2.io import volume

        if queryVolumeNode is None:
            raise _inputError("No query volume: select the volume to segment.")
        self._checkScalarVolume(queryVolumeNode, "The query")
        if outputSegmentationNode is not None and not outputSegmentationNode.IsA("vtkMRMLSegmentationNode"):
            raise _inputError(f"The output '{nodeName(outputSegmentationNode)}' is not a segmentation node.")
        if queryVolumeNode.GetScene() is None:
            raise _inputError(f"The query volume '{nodeName(queryVolumeNode)}' is not in a scene.")
        if outputSegmentationNode is not None and outputSegmentationNode.GetScene() is None:
            raise _inputError(f"The output segmentation '{nodeName(outputSegmentationNode)}' is not in a scene.")
        if method not in METHODS:
            raise _inputError(f"Unknown method '{method}': choose one of {', '.join(METHODS)}.")
        from fewshotsam2.options import SegmentOptions  # pure Python: validating needs no torch

        sliceRanges = options.pop("slice_ranges", None)  # {segment name: (first, last) | "off" | "auto"}

        try:
            flat = SegmentOptions.from_flat(method=method, **options).to_flat()  # bad values: one-line OptionError
        except TypeError as exc:
            raise _inputError(f"Unknown segmentation option: {exc}") from None
        flat.pop("method")
        unknown = process.unknownOptions(flat)
        if unknown:  # a setting of the core that the process runner cannot pass yet
            raise _inputError(f"Unknown segmentation option: {', '.join(unknown)}.")
        supportList = self._normalizeSupports(supports)
        mrml_io.ensureSegmentationConverterRules()

        query = mrml_io.volumeFromNode(queryVolumeNode, "query volume")

        structuresByName = {}
        metadata = {}
        cases = []
        for index, support in enumerate(supportList):
            where = f"Support {index + 1}"
            volumeNode, segmentationNode, segmentIds = support.volumeNode, support.segmentationNode, support.segmentIds
            if volumeNode is None:
                raise _inputError(f"{where}: no volume selected.")
            if segmentationNode is None:
                raise _inputError(f"{where}: no segmentation selected.")
            self._checkScalarVolume(volumeNode, f"{where}:")
            if not segmentationNode.IsA("vtkMRMLSegmentationNode"):
                raise _inputError(f"{where}: '{nodeName(segmentationNode)}' is not a segmentation.")
            segmentation = segmentationNode.GetSegmentation()
            if segmentIds is None:
                segmentIds = list(segmentation.GetSegmentIDs())
                if not segmentIds:
                    raise _inputError(f"{where}: segmentation '{nodeName(segmentationNode)}' has no segments.")
            if not segmentIds:
                raise _inputError(f"{where}: no segment selected. Check the segments of '{nodeName(segmentationNode)}' to copy.")
            image = mrml_io.volumeFromNode(volumeNode, f"{where} volume")
            masks = []  # (structure, mask): every segment keeps its own voxels (overlaps go to separate layers)
            empty = []
            for segmentId in segmentIds:
                segment = segmentation.GetSegment(segmentId)
                if segment is None:
                    raise _inputError(f"{where}: segmentation '{nodeName(segmentationNode)}' has no segment with ID '{segmentId}'.")
                name = segment.GetName() or segmentId
                mask = mrml_io.segmentMaskOnVolume(segmentationNode, segmentId, volumeNode)
                if not mask.any():
                    empty.append(name)
                    continue
                if name not in structuresByName:
                    color = tuple(float(c) for c in segment.GetColor())
                    structuresByName[name] = volume.Structure(len(structuresByName) + 1, name, color)
                    metadata[name] = segment
                masks.append((structuresByName[name], mask))
            if empty:
                names = ", ".join(f"'{n}'" for n in empty)
                raise _inputError(
                    f"{where}: {'segment' if len(empty) == 1 else 'segments'} {names} of '{nodeName(segmentationNode)}' "
                    f"{'is' if len(empty) == 1 else 'are'} empty inside volume '{nodeName(volumeNode)}'. "
                    "Label at least one slice, or uncheck it."
                )
            # the core's one support rule (support_loader.py) reads each segment from its own layer
            cases.append(PreparedSupport(image=image, labels=volume.LabelMap.from_masks(image, masks),
                                         name=nodeName(volumeNode)))

        if sliceRanges:
            flat["slice_range"] = self._sliceRangeText(sliceRanges, structuresByName, flat.get("slice_range") or "auto")
            try:
                SegmentOptions.from_flat(method=method, **flat)
            except Exception as exc:
                raise _inputError(f"Slice range: {exc}") from None
        return FewShotSAM2Run(
            query=query,
            supports=cases,
            structures=list(structuresByName.values()),
            method=method,
            options=flat,
            queryVolumeNode=queryVolumeNode,
            outputSegmentationNode=outputSegmentationNode,
            segmentMetadata=metadata,
        )

    @staticmethod
    def _checkScalarVolume(node, what):
        if node.IsA("vtkMRMLLabelMapVolumeNode"):
            raise _inputError(f"{what} '{nodeName(node)}' is a label map volume; choose the scan itself (a scalar volume).")
        if not node.IsA("vtkMRMLScalarVolumeNode"):
            raise _inputError(f"{what} '{nodeName(node)}' is not a scalar volume.")

    @staticmethod
    def _normalizeSupports(supports):
        if supports is None:
            supports = []
        if isinstance(supports, FewShotSAM2Support) or (
            isinstance(supports, tuple) and supports and hasattr(supports[0], "IsA")
        ):
            supports = [supports]  # a single support given without the enclosing list
        out = []
        for item in supports:
            if isinstance(item, FewShotSAM2Support):
                support = item
            else:
                item = tuple(item)
                if len(item) == 2:
                    item = (item[0], item[1], None)
                if len(item) != 3:
                    raise _inputError("Each support is (volume node, segmentation node, segment IDs).")
                support = FewShotSAM2Support(item[0], item[1], item[2])
            ids = support.segmentIds
            if isinstance(ids, str):
                ids = [s.strip() for s in ids.split(",") if s.strip()]
            elif ids is not None:
                ids = [str(s) for s in ids]
            out.append(FewShotSAM2Support(support.volumeNode, support.segmentationNode, ids))
        if not out:
            raise _inputError("No support: add at least one labeled volume (a volume, a segmentation and its segments).")
        return out

    # ------------------------------------------------------------------------------------------ slice ranges

    def estimateSliceRanges(self, queryVolumeNode, supports, server=None, **options) -> dict:
        """Each structure's estimated slice range in the query (the core's `extent`, in a process of its own); blocks.

        options: axis, preset, extent_margin, lpips_weights. Returns {"axis": A, "ranges": {name: (first, last) or
        None when empty}}: inclusive indices along numpy axis A of the query's voxel array ([k, j, i]); see
        `sliceCenterRAS` / `jumpToSlice` to show one of them. The GUI runs the same steps without blocking:
        `startSliceRangeEstimate`, polling `job.finished`, `finishSliceRangeEstimate` (or `cancel`).
        `server`: a FewShotSAM2Lib.remote.Server to estimate on (`extent --server`), or None: here.
        """
        job = self.startSliceRangeEstimate(queryVolumeNode, supports, server=server, **options)
        self._waitFor(job)
        return self.finishSliceRangeEstimate(job)

    def startSliceRangeEstimate(self, queryVolumeNode, supports, server=None, **options) -> FewShotSAM2ExtentJob:
        """Check the inputs, write them to a new temporary folder and start `fewshotsam2 extent --json` on them;
        returns at once (options and `server` as for `estimateSliceRanges`). Bad input raises InputError before any
        process."""
        extentOptions = {k: options.pop(k) for k in process.EXTENT_OPTIONS if k in options}
        prepared = self.prepare(queryVolumeNode, supports, "propagate", None, **options)
        if server is not None:
            extentOptions.pop("lpips_weights", None)  # a file of this computer: the server uses its own
        # the estimate is AlexNet LPIPS: lpips and its weights, besides the packages of every run (on a server: only
        # what writing the job files needs here; the client process needs no torch)
        self.checkDependencies(None, lpipsWeights=extentOptions.get("lpips_weights"),
                               ownProcessOnly=self.python is not None or server is not None)
        extentProcess = process.SegmentationProcess(python=self.python, parent=self.temporaryFolder)
        extentProcess.server = server
        try:
            arguments = process.extentArguments(extentProcess.folder, prepared.query, prepared.supports,
                                                prepared.structures, extentOptions)
            extentProcess.startExtent(arguments)
        except BaseException:
            extentProcess.cleanup()
            raise
        return FewShotSAM2ExtentJob(prepared, extentProcess)

    def finishSliceRangeEstimate(self, job: FewShotSAM2ExtentJob) -> dict:
        """The finished estimate, as `estimateSliceRanges` returns it; the folder is removed in every case.

        Raises InputError (the core refused the input: one line), RuntimeError (the process failed) or Cancelled.
        """
        try:
            found = job.process.readExtent()
        finally:
            job.process.cleanup()
        ranges = {s["name"]: ((int(s["first"]), int(s["last"])) if s["first"] <= s["last"] else None)
                  for s in found["structures"]}
        return {"axis": int(found["axis"]), "ranges": ranges}

    @staticmethod
    def storeSliceRanges(parameterNode, volumeNode, axis: int, ranges: dict, notFound=()) -> None:
        """Save the Slice range table with the scene: `ranges` {structure name: (first, last)} along numpy `axis` of
        `volumeNode` (names in `notFound`: the estimate found nothing there) into the parameter node (the
        vtkMRMLScriptedModuleNode, or the FewShotSAM2ParameterNode wrapping it)."""
        node = getattr(parameterNode, "parameterNode", parameterNode)
        text = slice_ranges.tableToText(slice_ranges.SliceRangeTable(int(axis), dict(ranges), list(notFound)))
        with slicer.util.NodeModify(node):
            node.SetParameter(slice_ranges.TEXT_PARAMETER, text)
            # as parameterNodeWrapper's NodeSerializer writes a node parameter
            node.SetParameter(slice_ranges.VOLUME_PARAMETER, "")
            node.SetNodeReferenceID(slice_ranges.VOLUME_PARAMETER,
                                    volumeNode.GetID() if volumeNode is not None else None)

    @staticmethod
    def storedSliceRanges(parameterNode, volumeNode) -> Optional[slice_ranges.SliceRangeTable]:
        """The saved Slice range table if it belongs to `volumeNode` and fits its voxels, else None."""
        node = getattr(parameterNode, "parameterNode", parameterNode)
        if node is None or volumeNode is None or volumeNode.GetImageData() is None:
            return None
        stored = node.GetNodeReference(slice_ranges.VOLUME_PARAMETER)
        if stored is None or stored.GetID() != volumeNode.GetID():
            return None
        return slice_ranges.tableFromText(node.GetParameter(slice_ranges.TEXT_PARAMETER) or "",
                                          volumeNode.GetImageData().GetDimensions())

    @staticmethod
    def _sliceRangeText(sliceRanges: dict, structuresByName: dict, default: str) -> str:
        """{structure name: (first, last) | "off" | "auto"} -> the core's --slice-range, keyed by output value."""
        items = []
        for name, spec in sliceRanges.items():
            if name not in structuresByName:
                raise _inputError(f"Slice range given for '{name}', which is not a selected segment.")
            text = spec if isinstance(spec, str) else f"{int(spec[0])}:{int(spec[1])}"
            items.append(f"{structuresByName[name].value}={text}")
        return ",".join(items + [default])

    # ------------------------------------------------------------------------------------------ the process

    def start(self, prepared: FewShotSAM2Run, server=None) -> FewShotSAM2Job:
        """Write the inputs to a new temporary folder and start the segmentation process; returns at once.

        Raises InputError, before anything is written, when a Python package the run needs is missing.
        `server`: a FewShotSAM2Lib.remote.Server to run on (the process is then its client), or None: here.
        """
        options = prepared.options
        sliceRange = self._estimatedSliceRange(options.get("slice_range"), prepared.structures)
        self.checkDependencies(prepared.method, sliceRange, options.get("lpips_net") or "alex",
                               options.get("lpips_weights"), ownProcessOnly=self.python is not None or server is not None)
        segmentationProcess = process.SegmentationProcess(python=self.python, parent=self.temporaryFolder)
        segmentationProcess.server = server
        try:
            arguments = process.writeJobInputs(segmentationProcess.folder, prepared.query, prepared.supports,
                                               prepared.structures)
            arguments += ["--method", prepared.method] + process.optionArguments(prepared.options)
            segmentationProcess.start(arguments, scores=prepared.method != "propagate",
                                      layered=options.get("overlap") == "allow")
        except BaseException:
            segmentationProcess.cleanup()
            raise
        return FewShotSAM2Job(prepared, segmentationProcess)

    @staticmethod
    def _estimatedSliceRange(sliceRange, structures) -> str:
        """"auto" if the core will estimate the range of any structure (what needs lpips), else "off"; e.g. the
        Manual table names every structure, so its trailing default "auto" is never used."""
        from fewshotsam2.slicing.slice_range import resolve_slice_ranges

        if not sliceRange:
            return "off"
        try:
            ranges = resolve_slice_ranges(str(sliceRange), structures)
        except Exception:  # noqa: BLE001  (a bad range is the core's to report; count it as needing the estimate)
            return "auto" if dependencies.sliceRangeIsAuto(sliceRange) else "off"
        return "auto" if any(spec.kind == "auto" for spec in ranges.values()) else "off"

    def cancel(self, job: FewShotSAM2Job) -> None:
        """Kill the job's process (and its children) now and remove its folder. Nothing is written to the scene.
        Works for both kinds of job (a segmentation, a slice-range estimate)."""
        job.process.cancel()
        job.process.cleanup()

    def finish(self, job: FewShotSAM2Job):
        """Read the finished job's result into the output node (main thread); the folder is removed in every case.

        Raises InputError (the core refused the input: one line) or RuntimeError (the process failed) and then
        changes nothing.
        """
        try:
            result = job.process.readResult(job.prepared.structures)
            if not result.labels.same_grid(job.prepared.query):
                raise RuntimeError("the segmentation process wrote a result that is not on the query's voxel grid")
            node = self.apply(job.prepared, result)
            refining.remember(self._refineStates, node, job.prepared, result, job.process.done)  # for refine
            return node
        finally:
            job.process.cleanup()

    # ------------------------------------------------------------------------------------------ refine

    def refine(self, outputSegmentationNode, progressCallback: Optional[Callable[[str, int, int], None]] = None):
        """Refine the result of the last run in `outputSegmentationNode` from the slices the user changed in it since
        (Segment Editor); blocks, returns the node. Each changed slice becomes a SAM2 prompt and prediction re-runs
        from it (fewshotsam2 refine); the node's segments are replaced in one step, `undoRefine` puts them back.
        Raises InputError when no slice was changed. `refineCorrections` says which slices will be taken."""
        job = self.startRefine(outputSegmentationNode)
        self._waitFor(job, progressCallback)
        return self.finishRefine(job)

    def refineCorrections(self, outputSegmentationNode) -> dict:
        """{segment name: [slice indices along the run's slice axis]} changed since the run (what refine takes)."""
        return refining.corrections(self._refineStates, outputSegmentationNode)

    def startRefine(self, outputSegmentationNode) -> refining.RefineJob:
        """Start the refine process; returns at once (poll the job, then `finishRefine`, or `cancel`)."""
        return refining.startRefine(self._refineStates, outputSegmentationNode, self.python)

    def finishRefine(self, job: refining.RefineJob):
        return refining.finishRefine(self, self._refineStates, self._refineUndo, job)

    def lastRefinableNode(self):
        """The output segmentation of the most recent run of this Logic that is still in the scene (or None)."""
        return refining.lastNode(self._refineStates)

    def refineRefusal(self, outputSegmentationNode) -> str:
        """Why refine cannot take the run in the node ('' when it can): a result that keeps overlapping segments."""
        return refining.refusal(self._refineStates, outputSegmentationNode)

    def canUndoRefine(self, outputSegmentationNode) -> bool:
        return outputSegmentationNode is not None and outputSegmentationNode.GetID() in self._refineUndo

    def undoRefine(self, outputSegmentationNode) -> None:
        """Put back the segments the node had before its last refine."""
        refining.undoRefine(self._refineStates, self._refineUndo, outputSegmentationNode)

    # ------------------------------------------------------------------------------------------ apply

    def apply(self, prepared, result):
        """Write a result into the output segmentation node (main thread); returns the node.

        The segments are built completely before the scene is touched. A new node is added only then; an existing
        node gets its segments replaced in one step and is restored if anything fails.
        """
        queryVolumeNode = prepared.queryVolumeNode
        if queryVolumeNode.GetScene() is None:
            raise _inputError("The query volume was removed from the scene during the run; nothing was written.")
        if prepared.outputSegmentationNode is not None and prepared.outputSegmentationNode.GetScene() is None:
            raise _inputError("The output segmentation was removed from the scene during the run; nothing was written.")
        labels = np.asarray(result.labels.array)
        queryShape = tuple(reversed(queryVolumeNode.GetImageData().GetDimensions()))
        if labels.shape != queryShape:
            raise RuntimeError(f"result shape {labels.shape} differs from the query volume's {queryShape}")

        mrml_io.ensureSegmentationConverterRules()
        # --overlap allow: overlapping structures come in separate layers, each segment from its own layer
        layers = getattr(result.labels, "layers", None)
        newSegmentation = mrml_io.segmentationFromLabels(labels, result.structures if layers is not None
                                                         else prepared.structures, queryVolumeNode,
                                                         prepared.segmentMetadata, layers)

        outputNode = prepared.outputSegmentationNode
        created = outputNode is None
        backup = None
        scene = queryVolumeNode.GetScene()
        try:
            if created:
                name = scene.GenerateUniqueName(f"{nodeName(queryVolumeNode)} FewShotSAM2")
                outputNode = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
            else:
                backup = mrml_io.backupSegmentationNode(outputNode)
            # a 3D surface the user made (Show 3D) is made again for the new segments
            had3D = not created and mrml_io.hasClosedSurface(outputNode)
            wasModifying = outputNode.StartModify()
            try:
                outputNode.GetSegmentation().DeepCopy(newSegmentation)
                # the transform first: SetReferenceImageGeometryParameterFromVolumeNode expresses the volume's
                # geometry in the segmentation's frame (vtkMRMLSegmentationNode.cxx multiplies in the transform
                # between the two parents), so with the transform set after it the grid would be moved twice
                outputNode.SetAndObserveTransformNodeID(queryVolumeNode.GetTransformNodeID())
                outputNode.SetReferenceImageGeometryParameterFromVolumeNode(queryVolumeNode)
                outputNode.SetAttribute("FewShotSAM2.Method", str(prepared.method))
                # a node reference, not an ID in an attribute: references are renamed on scene import
                outputNode.SetNodeReferenceID(mrml_io.QUERY_REFERENCE_ROLE, queryVolumeNode.GetID())
                outputNode.RemoveAttribute("FewShotSAM2.QueryVolumeID")  # written by earlier versions
            finally:
                outputNode.EndModify(wasModifying)
            if outputNode.GetScene() is not None:
                outputNode.CreateDefaultDisplayNodes()
            if had3D:
                outputNode.CreateClosedSurfaceRepresentation()
        except Exception:
            if created and outputNode is not None and outputNode.GetScene() is not None:
                displayNode = outputNode.GetDisplayNode()
                outputNode.GetScene().RemoveNode(outputNode)
                if displayNode is not None and displayNode.GetScene() is not None:
                    displayNode.GetScene().RemoveNode(displayNode)
            elif backup is not None:
                mrml_io.restoreSegmentationNode(outputNode, backup)
            raise
        self.lastResult = result
        return outputNode

    @staticmethod
    def queryVolumeOf(segmentationNode):
        """The query volume a FewShotSAM2 result was made from (a node reference, saved with the scene), or None."""
        return segmentationNode.GetNodeReference(mrml_io.QUERY_REFERENCE_ROLE) if segmentationNode is not None else None

    @staticmethod
    def showIn3D(segmentationNode, show: bool = True) -> None:
        """Show (build the closed surface of) or hide a result in the 3D views, as Segment Editor's Show 3D does."""
        if show:
            segmentationNode.CreateClosedSurfaceRepresentation()
        else:
            segmentationNode.RemoveClosedSurfaceRepresentation()

    # ------------------------------------------------------------------------------------------ geometry, review

    ijkToWorldMatrix = staticmethod(mrml_io.ijkToWorldMatrix)
    volumeFromNode = staticmethod(mrml_io.volumeFromNode)
    segmentMaskOnVolume = staticmethod(mrml_io.segmentMaskOnVolume)
    confidenceKind = staticmethod(review.confidenceKind)
    lowConfidenceSlices = staticmethod(review.lowConfidenceSlices)
    sliceCenterRAS = staticmethod(review.sliceCenterRAS)
    jumpToSlice = staticmethod(review.jumpToSlice)
    createConfidenceTable = staticmethod(review.createConfidenceTable)
    markLowConfidenceSlices = staticmethod(review.markLowConfidenceSlices)

    # ------------------------------------------------------------------------------------------ models

    @staticmethod
    def checkpointStatus(model="tiny", version="2.1", cache_dir=None):
        """(ready, text): whether the checkpoint is in the core's cache and a line for the GUI."""
        from fewshotsam2.model import checkpoints

        path = checkpoints.cached_checkpoint(model, version, cache_dir)
        key = checkpoints.checkpoint_key(model, version)
        if path is None:
            note = choices.MODEL_NOTES.get(checkpoints.normalise_model_name(model))
            return False, f"{key}: not downloaded" + (f" ({note})" if note else "")
        return True, f"{key}: ready ({path.stat().st_size / 1e6:.0f} MB, {path})"

    @staticmethod
    def downloadCheckpoint(model="tiny", version="2.1", cache_dir=None, progress=None):
        from fewshotsam2.model import checkpoints

        return checkpoints.download_checkpoint(model, version, cache_dir, progress=progress)

    def importCheckpoint(self, path, model="tiny", version="2.1", cache_dir=None):
        """Check a checkpoint file (loaded into the matching SAM2 model) and copy it into the cache; returns the
        cached path. The check loads torch, so it runs in a process of its own."""
        from pathlib import Path

        output = process.runCore(
            "from fewshotsam2.model import checkpoints\n"
            "print(checkpoints.import_checkpoint(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] or None))",
            str(path), str(model), str(version), str(cache_dir or ""), python=self.python,
        )
        return Path(output.strip().splitlines()[-1])

    @staticmethod
    def clearCheckpointCache(cache_dir=None):
        from fewshotsam2.model import checkpoints

        return checkpoints.clear_cache(cache_dir)

    # ------------------------------------------------------------------------------------------ dependencies

    missingDependencies = staticmethod(dependencies.missingDependencies)  # (method, sliceRange, lpipsNet)
    missingWeights = staticmethod(dependencies.missingWeights)

    @staticmethod
    def checkDependencies(method="reverse", sliceRange="off", lpipsNet="alex", lpipsWeights=None,
                          ownProcessOnly=False) -> None:
        """InputError naming every missing package a run of `method` (None: the slice-range estimate) needs; a
        missing LPIPS backbone download is only logged (the core downloads it, or segments every slice).

        ownProcessOnly: another interpreter runs the core (`FewShotSAM2Logic.python` set): only what this process
        needs to write the job files (SimpleITK, slicerio) is checked here.
        """
        if ownProcessOnly:
            problems = dependencies.missingForJobFiles()
            if problems:
                raise _inputError("FewShotSAM2 cannot write the job files: " + "; ".join(problems) + ".")
            return
        problems = dependencies.missingDependencies(method, sliceRange, lpipsNet)
        if problems:
            raise _inputError("FewShotSAM2 cannot run yet: " + "; ".join(problems) + ". Install them from the "
                              "FewShotSAM2 module (Segment offers it) or with FewShotSAM2Logic.installDependencies.")
        weights = dependencies.missingWeights(method, sliceRange, lpipsNet, lpipsWeights)
        if weights:
            logging.warning("FewShotSAM2: %s; the run downloads them first", dependencies.weightsLine(weights))

    def installDependencies(self, method="reverse", confirm=None, sliceRange="off", lpipsNet="alex", lpipsWeights=None):
        """Install what `missingDependencies` lists and download what `missingWeights` lists after `confirm(message)`
        agrees; True if Slicer must restart."""
        return dependencies.installDependencies(method, confirm, sliceRange, lpipsNet, lpipsWeights, python=self.python)


#
# FewShotSAM2Widget
#


class ProcessingState:
    """What the Segment/Cancel and Estimate/Cancel buttons do and show (one process at a time)."""

    IDLE = 0
    STARTING = 1
    RUNNING = 2
    APPLYING = 3
    ESTIMATING = 4  # a slice-range estimate runs (the Estimate button cancels it)


class FewShotSAM2RemotePanel:
    """The *Run on* section: this computer | server, with URL, token and a connection test (FewShotSAM2Lib.remote).
    Built in code and added to the module's layout, so the .ui file stays as it is."""

    def __init__(self, layout) -> None:
        import ctk  # the Slicer application's CTK (the Widget is the only Qt user)

        self._settings = slicer.app.userSettings()
        box = ctk.ctkCollapsibleButton()
        box.text = "Run on"
        box.collapsed = self._value("RunOn", "local") != "server"
        form = qt.QFormLayout(box)
        self.runOn = qt.QComboBox()
        self.runOn.addItem("this computer", "local")
        self.runOn.addItem("server", "server")
        self.runOn.toolTip = ("Where SAM2 runs: this computer, or a FewShotSAM2 server (`fewshotsam2 serve`, e.g. a "
                              "GPU machine of the department). The scans are uploaded to the server for the run.")
        self.url = qt.QLineEdit()
        self.url.placeholderText = "https://gpu-server.hospital.local:8000"
        self.token = qt.QLineEdit()
        self.token.setEchoMode(qt.QLineEdit.Password)
        self.token.toolTip = "Kept in Slicer's settings on this computer, never in the scene."
        self.testButton = qt.QPushButton("Test connection")
        self.status = qt.QLabel("")
        self.status.wordWrap = True
        form.addRow("Run on:", self.runOn)
        form.addRow("Server:", self.url)
        form.addRow("Token:", self.token)
        form.addRow(self.testButton, self.status)
        layout.addWidget(box)
        self.box = box
        self.runOn.currentIndex = max(0, self.runOn.findData(self._value("RunOn", "local")))
        self.url.text = self._value("ServerURL", "")
        self.token.text = self._value("ServerToken", "")
        self._showServerRows()
        self.runOn.connect("currentIndexChanged(int)", self._onChanged)
        self.url.connect("editingFinished()", self._onChanged)
        self.token.connect("editingFinished()", self._onChanged)
        self.testButton.connect("clicked(bool)", self.onTest)

    def _value(self, key: str, default: str) -> str:
        value = self._settings.value(remote.SETTINGS_GROUP + key, default)
        return str(value) if value is not None else default

    def _onChanged(self, *_args) -> None:
        self._settings.setValue(remote.SETTINGS_GROUP + "RunOn", self.runOn.currentData)
        self._settings.setValue(remote.SETTINGS_GROUP + "ServerURL", self.url.text.strip())
        self._settings.setValue(remote.SETTINGS_GROUP + "ServerToken", self.token.text.strip())
        self._showServerRows()

    def _showServerRows(self) -> None:
        remote = self.runOn.currentData == "server"
        for widget in (self.url, self.token, self.testButton, self.status):
            widget.enabled = remote

    def server(self) -> Optional[remote.Server]:
        """The chosen server, None for this computer (ValueError: the choice is incomplete)."""
        return remote.serverFromChoice(self.runOn.currentData, self.url.text, self.token.text)

    def onTest(self) -> None:
        try:
            server = self.server()
            self.status.text = "Runs here." if server is None else remote.checkServer(server)
        except Exception as exc:  # noqa: BLE001  shown to the user: unreachable, token, versions
            self.status.text = str(exc)


class FewShotSAM2Widget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The GUI. Uses ScriptedLoadableModuleWidget base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    POLL_INTERVAL_MS = 100

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._processingState = ProcessingState.IDLE
        self._job = None  # the running segmentation (FewShotSAM2Job)
        self._rangeJob = None  # the running slice-range estimate (FewShotSAM2ExtentJob)
        self._pollTimer = None
        self._supportRows = []  # [(rowWidget, volumeSelector, segmentSelector)]
        self._updatingSupportRows = False
        self._lowConfidence = []
        self._lastSliceAxis = 0
        self._lastQueryVolumeNode = None
        self._tableNode = None
        self._chartNode = None
        self._shownWarnings = 0
        self._rangeRows = []  # [(structure name, first spin box, last spin box)] of the Slice range table
        self._rangeVolume = None  # the query the table's ranges are of, and their numpy axis
        self._rangeAxis = 0
        self._rangeNotFound = []  # names of the rows the estimate found nothing for
        self._unsupported = None  # why this Slicer cannot run the module (Slicer 5.8), shown instead of the panel
        self._quitConnected = False
        self._lastOutputNode = None
        self._markupsNode = None  # the low-confidence slices' marks (a point list), reused across runs

    # ------------------------------------------------------------------------------------------ setup

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        self._unsupported = dependencies.pythonProblem()
        if self._unsupported:  # Slicer 5.8 (Python 3.9): say which Slicer is needed instead of failing later
            label = qt.QLabel(self._unsupported)
            label.wordWrap = True
            label.styleSheet = "color: #b05000"
            self.layout.addWidget(label)
            self.layout.addStretch(1)
            logging.error("FewShotSAM2: %s", self._unsupported)
            return
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/FewShotSAM2.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = FewShotSAM2Logic()
        self.logic.temporaryFolder = str(slicer.app.temporaryPath) or None  # qSlicerCoreApplication::temporaryPath

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self._connectApplication()  # closing Slicer stops a running segmentation

        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.addSupportButton.connect("clicked(bool)", self.onAddSupport)
        self.ui.downloadModelButton.connect("clicked(bool)", self.onDownloadModel)
        self.ui.importModelButton.connect("clicked(bool)", self.onImportModel)
        self.ui.clearCacheButton.connect("clicked(bool)", self.onClearCache)
        self.ui.lowConfidenceTable.connect("cellClicked(int,int)", self.onLowConfidenceCellClicked)
        self.ui.showPlotButton.connect("clicked(bool)", self.onShowPlot)
        self.ui.estimateRangeButton.connect("clicked(bool)", self.onEstimateRanges)
        self.ui.show3DButton.connect("toggled(bool)", self.onShow3D)

        self._remotePanel = FewShotSAM2RemotePanel(self.layout)  # Run on: this computer | server

        self.ui.progressBar.hide()
        self.ui.statusLabel.text = ""
        self.ui.resultsCollapsibleButton.collapsed = True
        self.ui.advancedCollapsibleButton.collapsed = True

        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(self.POLL_INTERVAL_MS)
        self._pollTimer.connect("timeout()", self._onPoll)
        self._setupRefine()

        self.initializeParameterNode()
        self._showCoreMismatch()

    def _connectApplication(self) -> None:
        """aboutToQuit -> stop a run. Made once per widget and undone in cleanup(): Reload makes a new widget
        (slicer.util.reloadScriptedModule calls the old one's cleanup() first), so connections do not pile up."""
        if SLICER_APPLICATION and not self._quitConnected:
            slicer.app.connect("aboutToQuit()", self._onAboutToQuit)
            self._quitConnected = True

    def _disconnectApplication(self) -> None:
        if SLICER_APPLICATION and self._quitConnected:
            slicer.app.disconnect("aboutToQuit()", self._onAboutToQuit)  # PythonQt: same signal, same callable
        self._quitConnected = False

    def _onAboutToQuit(self) -> None:
        self._cancelJobs()

    def cleanup(self) -> None:
        """Called when the application closes, and on Reload before the new widget is made: the run stops here."""
        self._cancelJobs()
        self._disconnectApplication()
        self.removeObservers()

    def onReload(self) -> None:
        """Reload the Lib modules too (Slicer's Reload reloads only this file)."""
        import importlib

        self._stopRun()
        for name in _LIB_MODULES:
            if name in sys.modules:
                importlib.reload(sys.modules[name])
        ScriptedLoadableModuleWidget.onReload(self)

    def enter(self) -> None:
        """Called each time the user opens this module: show the current state (a run may have gone on meanwhile)."""
        if self._unsupported:
            return
        self.initializeParameterNode()
        self._setProcessingState(self._processingState)

    def exit(self) -> None:
        """Called each time the user opens a different module (Data, Segment Editor, ...): a run goes on (the
        timer keeps polling it, its result is applied); only cleanup(), a scene close and quitting stop it."""
        if self._unsupported:
            return
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def _cancelJobs(self) -> tuple:
        """Kill a running segmentation or slice-range process (nothing is written) and remove its folder; touches
        no widget (also called while the widget is being destroyed). Returns the (job, rangeJob) it stopped."""
        job, self._job = self._job, None
        rangeJob, self._rangeJob = self._rangeJob, None
        if self._pollTimer is not None:
            self._pollTimer.stop()
        for running in (job, rangeJob):
            if running is not None:
                self.logic.cancel(running)
        return job, rangeJob

    def _stopRun(self) -> None:
        """Stop a running process (`_cancelJobs`) and show that it stopped."""
        job, rangeJob = self._cancelJobs()
        if job is not None:
            slicer.util.showStatusMessage(_("FewShotSAM2: segmentation stopped, nothing was changed."), 5000)
        if rangeJob is not None:
            self._setStatus(_("Slice range estimate stopped; the table is unchanged."))
            slicer.util.showStatusMessage(_("FewShotSAM2: slice range estimate stopped, the table is unchanged."), 5000)
        if job is not None or rangeJob is not None:
            self.ui.progressBar.hide()
            self._setProcessingState(ProcessingState.IDLE)

    def onSceneStartClose(self, caller, event) -> None:
        self._stopRun()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.queryVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode and not firstVolumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.queryVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Widgets with a "SlicerParameterName" property in the .ui file are connected to the parameter node.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self._showReadableChoices()
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._rebuildSupportRows()
        self._restoreRangeTable()
        self._onParameterNodeModified()

    def _showReadableChoices(self) -> None:
        """Readable item texts in the combo boxes (connectGui fills them with the raw values; it reads and writes
        the current index, so the texts can be changed)."""
        for parameter, (widgetName, values) in choices.COMBO_BOXES.items():
            comboBox = getattr(self.ui, widgetName)
            for index, value in enumerate(values):
                if index < comboBox.count:
                    comboBox.setItemText(index, choices.displayName(parameter, value))

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if p is not None:
            # the image size follows the model (MedSAM2: 512) unless the user chose another one
            previous, self._shownModel = getattr(self, "_shownModel", p.modelSize), p.modelSize
            size = choices.imageSizeForModel(previous, p.modelSize, p.imageSize)
            if size != p.imageSize:
                p.imageSize = size  # modifies the node: this method runs again, with the model unchanged
                return
        if self._parameterNode is not None and not self._updatingSupportRows:
            if len(self._supportRows) != len(self._parameterNode.supportVolumes):
                self._rebuildSupportRows()
            else:
                self._syncSupportRows()
        if self._parameterNode is not None and self._parameterNode.queryVolume is not self._rangeVolume:
            self._restoreRangeTable()  # another query: its saved table, or none (never another query's ranges)
        self._updateMethodWidgets()
        self._updateModelStatus()
        self._updateSegmentButton()

    # ------------------------------------------------------------------------------------------ supports

    def _rebuildSupportRows(self):
        """One row per support in the parameter node: volume selector, segmentation + segments, remove button."""
        for rowWidget, _volumeSelector, _segmentSelector in self._supportRows:
            rowWidget.setParent(None)
            rowWidget.deleteLater()
        self._supportRows = []
        if self._parameterNode is None:
            return
        p = self._parameterNode
        count = len(p.supportVolumes)
        self._updatingSupportRows = True
        try:
            # keep the three lists the same length (a scene saved by hand could differ)
            while len(p.supportSegmentations) < count:
                p.supportSegmentations.append(None)
            while len(p.supportSegmentIds) < count:
                p.supportSegmentIds.append([])
            for index in range(count):
                self._addSupportRowWidget(index)
        finally:
            self._updatingSupportRows = False

    def _syncSupportRows(self):
        """Show the parameter node's supports in the existing rows (e.g. after an undo or a scene import)."""
        p = self._parameterNode
        self._updatingSupportRows = True
        try:
            for index, (_rowWidget, volumeSelector, segmentSelector) in enumerate(self._supportRows):
                if index >= len(p.supportSegmentations) or index >= len(p.supportSegmentIds):
                    break
                if volumeSelector.currentNode() is not p.supportVolumes[index]:
                    volumeSelector.setCurrentNode(p.supportVolumes[index])
                if segmentSelector.currentNode() is not p.supportSegmentations[index]:
                    segmentSelector.setCurrentNode(p.supportSegmentations[index])
                ids = list(p.supportSegmentIds[index] or [])
                if list(segmentSelector.selectedSegmentIDs()) != ids:
                    segmentSelector.setSelectedSegmentIDs(ids)
        finally:
            self._updatingSupportRows = False

    def _addSupportRowWidget(self, index):
        p = self._parameterNode
        rowWidget = qt.QFrame()
        rowWidget.setFrameShape(qt.QFrame.StyledPanel)
        rowLayout = qt.QHBoxLayout(rowWidget)
        rowLayout.setContentsMargins(2, 2, 2, 2)

        volumeSelector = slicer.qMRMLNodeComboBox()
        volumeSelector.nodeTypes = ["vtkMRMLScalarVolumeNode"]
        volumeSelector.showChildNodeTypes = False  # scans only: no label map volumes (a subclass)
        volumeSelector.addEnabled = False
        volumeSelector.removeEnabled = False
        volumeSelector.noneEnabled = True
        volumeSelector.setMRMLScene(slicer.mrmlScene)
        volumeSelector.toolTip = _("Support volume: a scan with the structure labeled (may be the query volume itself).")
        volumeSelector.setCurrentNode(p.supportVolumes[index])

        segmentSelector = slicer.qMRMLSegmentSelectorWidget()
        segmentSelector.setMRMLScene(slicer.mrmlScene)
        segmentSelector.multiSelection = True
        segmentSelector.noneEnabled = True
        segmentSelector.horizontalLayout = False
        segmentSelector.toolTip = _("Support segmentation and the segments to copy: check each segment you want.")
        segmentSelector.setCurrentNode(p.supportSegmentations[index])
        ids = list(p.supportSegmentIds[index] or [])
        if ids:
            segmentSelector.setSelectedSegmentIDs(ids)

        removeButton = qt.QToolButton()
        removeButton.text = "\u2715"
        removeButton.toolTip = _("Remove this support")

        rowLayout.addWidget(volumeSelector, 1)
        rowLayout.addWidget(segmentSelector, 2)
        rowLayout.addWidget(removeButton)
        self.ui.supportsRowsWidget.layout().addWidget(rowWidget)

        volumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", lambda node, w=rowWidget: self._onSupportRowChanged(w))
        segmentSelector.connect("currentNodeChanged(vtkMRMLNode*)", lambda node, w=rowWidget: self._onSupportRowChanged(w))
        segmentSelector.connect("segmentSelectionChanged(QStringList)", lambda ids, w=rowWidget: self._onSupportRowChanged(w))
        removeButton.connect("clicked(bool)", lambda checked, w=rowWidget: self._onRemoveSupport(w))
        self._supportRows.append((rowWidget, volumeSelector, segmentSelector))

    def _rowIndex(self, rowWidget):
        for index, (widget, _volumeSelector, _segmentSelector) in enumerate(self._supportRows):
            if widget is rowWidget:
                return index
        return -1

    def _onSupportRowChanged(self, rowWidget):
        if self._updatingSupportRows or self._parameterNode is None:
            return
        index = self._rowIndex(rowWidget)
        if index < 0:
            return
        _rowWidget, volumeSelector, segmentSelector = self._supportRows[index]
        p = self._parameterNode
        self._updatingSupportRows = True
        try:
            with slicer.util.NodeModify(p.parameterNode):
                p.supportVolumes[index] = volumeSelector.currentNode()
                p.supportSegmentations[index] = segmentSelector.currentNode()
                p.supportSegmentIds[index] = [str(s) for s in segmentSelector.selectedSegmentIDs()]
        finally:
            self._updatingSupportRows = False
        self._updateSegmentButton()

    def onAddSupport(self):
        if self._parameterNode is None:
            return
        p = self._parameterNode
        self._updatingSupportRows = True
        try:
            with slicer.util.NodeModify(p.parameterNode):
                # a helpful default: the first segmentation of the scene and its reference volume; no segment is
                # checked for the user (a TotalSegmentator result holds ~100 structures)
                segmentationNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSegmentationNode")
                volumeNode = None
                if segmentationNode is not None:
                    volumeNode = segmentationNode.GetNodeReference(segmentationNode.GetReferenceImageGeometryReferenceRole())
                    if volumeNode is not None and (volumeNode.IsA("vtkMRMLLabelMapVolumeNode")
                                                   or not volumeNode.IsA("vtkMRMLScalarVolumeNode")):
                        volumeNode = None
                p.supportVolumes.append(volumeNode)
                p.supportSegmentations.append(segmentationNode)
                p.supportSegmentIds.append([])
        finally:
            self._updatingSupportRows = False
        self._addSupportRowWidget(len(p.supportVolumes) - 1)
        self._updateSegmentButton()

    def _onRemoveSupport(self, rowWidget):
        index = self._rowIndex(rowWidget)
        if index < 0 or self._parameterNode is None:
            return
        p = self._parameterNode
        self._updatingSupportRows = True
        try:
            with slicer.util.NodeModify(p.parameterNode):
                del p.supportVolumes[index]
                del p.supportSegmentations[index]
                del p.supportSegmentIds[index]
        finally:
            self._updatingSupportRows = False
        self._rebuildSupportRows()
        self._updateSegmentButton()

    def _supportsFromParameterNode(self):
        p = self._parameterNode
        supports = []
        segmentations, segmentIds = list(p.supportSegmentations), list(p.supportSegmentIds)
        for index, volumeNode in enumerate(p.supportVolumes):
            segmentationNode = segmentations[index] if index < len(segmentations) else None
            ids = [str(s) for s in (segmentIds[index] if index < len(segmentIds) else [])]
            supports.append((volumeNode, segmentationNode, ids))  # a list, never None: no "nothing checked = all"
        return supports

    # ------------------------------------------------------------------------------------------ GUI state

    def _updateMethodWidgets(self):
        method = self._parameterNode.method if self._parameterNode else "reverse"
        self.ui.topKSpinBox.enabled = method == "reverse"
        self.ui.minScoreSpinBox.enabled = method == "reverse"
        self.ui.augmentationsSpinBox.enabled = method == "lpips"
        self.ui.lpipsNetComboBox.enabled = method == "lpips"

    def _updateModelStatus(self):
        if self._parameterNode is None:
            return
        try:
            ready, text = self.logic.checkpointStatus(self._parameterNode.modelSize, self._parameterNode.modelVersion)
        except Exception as exc:
            ready, text = False, _("unknown ({error})").format(error=exc)
        self.ui.modelStatusLabel.text = text
        self.ui.modelStatusLabel.styleSheet = "color: green" if ready else "color: #b05000"
        self.ui.downloadModelButton.enabled = not ready and self._processingState == ProcessingState.IDLE

    def _inputProblems(self):
        problems = []
        p = self._parameterNode
        if p is None or not p.queryVolume:
            problems.append(_("Select the query volume."))
        supports = self._supportsFromParameterNode() if p is not None else []
        if not supports:
            problems.append(_("Add a support: a volume, its segmentation and segments."))
        for index, (volumeNode, segmentationNode, ids) in enumerate(supports):
            if not volumeNode or not segmentationNode:
                problems.append(_("Support {n}: select its volume and segmentation.").format(n=index + 1))
            elif not ids:
                problems.append(_("Support {n}: check the segments to copy.").format(n=index + 1))
        return problems

    def _updateSegmentButton(self):
        state = self._processingState
        button = self.ui.segmentButton
        if state == ProcessingState.IDLE:
            button.text = _("Segment")
            problems = self._inputProblems()
            button.enabled = not problems
            button.toolTip = "\n".join(problems) if problems else _("Segment the query volume from the supports.")
        elif state == ProcessingState.STARTING:
            button.enabled = False
            button.toolTip = _("Preparing the inputs")
        elif state == ProcessingState.RUNNING:
            button.text = _("Cancel")
            button.enabled = True
            button.toolTip = _("Stop the segmentation now; nothing is written")
        elif state == ProcessingState.APPLYING:
            button.enabled = False
            button.toolTip = _("Writing the result")
        elif state == ProcessingState.ESTIMATING:
            button.text = _("Segment")
            button.enabled = False
            button.toolTip = _("Estimating the slice ranges: wait, or cancel the estimate.")
        busy = state != ProcessingState.IDLE
        for name in ("inputsCollapsibleButton", "methodCollapsibleButton", "modelCollapsibleButton",
                     "advancedCollapsibleButton", "outputsCollapsibleButton"):
            getattr(self.ui, name).enabled = not busy
        self._updateEstimateButton()

    def _updateEstimateButton(self):
        """Estimate / Cancel (while an estimate runs); nothing to do while a segmentation runs."""
        state = self._processingState
        button = self.ui.estimateRangeButton
        estimating = state == ProcessingState.ESTIMATING
        # the table and mode are what the estimate replaces: not editable meanwhile
        self.ui.sliceRangeTable.enabled = not estimating
        self.ui.sliceRangeModeComboBox.enabled = not estimating
        if estimating:
            button.text = _("Cancel estimate")
            button.enabled = True
            button.toolTip = _("Stop the estimate now; the table stays as it was.")
        elif state == ProcessingState.IDLE:
            button.text = _("Estimate")
            problems = self._inputProblems()
            button.enabled = not problems
            button.toolTip = "\n".join(problems) if problems else _(
                "Estimate each structure's slice range in the query from the supports, and show it below to check "
                "and edit (editing switches to Manual).")
        else:
            button.text = _("Estimate")
            button.enabled = False
            button.toolTip = _("A segmentation is running.")

    def _setProcessingState(self, state):
        self._processingState = state
        self._updateSegmentButton()
        self._updateModelStatus()
        self._updateRefineButtons()

    def _setStatus(self, text, warning=False):
        self.ui.statusLabel.text = text
        self.ui.statusLabel.styleSheet = "color: #b05000" if warning else ""

    # ------------------------------------------------------------------------------------------ segment

    def onSegmentButton(self):
        if self._processingState == ProcessingState.IDLE:
            self._startSegmentation()
        elif self._processingState == ProcessingState.RUNNING:
            self._stopRun()  # kills the process at once

    def _runOptions(self):
        options = settings.from_gui(self._parameterNode)  # every GUI setting under the core's name
        options.pop("method")  # the Logic takes it as its own argument
        return dict(options, **self._sliceRangeOptions())

    # ------------------------------------------------------------------------------------------ slice range

    def _sliceRangeOptions(self):
        p = self._parameterNode
        if p.sliceRangeMode != "manual":
            return dict(slice_range=p.sliceRangeMode)
        if not self._rangeRows or self._rangeVolume is not p.queryVolume:
            raise _inputError(_("Manual slice range: press Estimate for this query volume first."))
        return dict(slice_range="auto", slice_ranges={n: (f.value, l.value) for n, f, l in self._rangeRows})

    def onEstimateRanges(self):
        """Start the slice-range estimate in its own process (polled by the timer), or cancel the running one."""
        if self._processingState == ProcessingState.ESTIMATING:
            self._stopRun()  # kills the process at once; the table stays as it was
            return
        if self._processingState != ProcessingState.IDLE:
            return
        try:
            server = self._remotePanel.server()  # Run on: server estimates there too (no torch or lpips needed here)
            if server is None and not self._ensureDependencies(None):
                return
        except Exception as exc:
            self._reportError(exc, _("Slice ranges could not be estimated"))
            return
        p = self._parameterNode
        try:
            with slicer.util.WaitCursor():  # only the inputs are written here (a second or so); the estimate runs apart
                self._rangeJob = self.logic.startSliceRangeEstimate(p.queryVolume, self._supportsFromParameterNode(),
                                                                    server=server, axis=p.sliceAxis,
                                                                    preset=p.intensityPreset)
        except Exception as exc:
            self._reportError(exc, _("Slice ranges could not be estimated"))
            return
        self._startPolling(_("Estimating the slice ranges..."), _("Estimating the slice ranges"),
                           ProcessingState.ESTIMATING)

    def _onRangePoll(self):
        job = self._rangeJob
        self.ui.progressBar.setFormat(_("Estimating the slice ranges ({seconds:.0f} s)").format(
            seconds=time.time() - job.startTime))
        if not job.finished:
            return
        self._pollTimer.stop()
        self._rangeJob = None
        try:
            try:
                found = self.logic.finishSliceRangeEstimate(job)
                volumeNode = job.prepared.queryVolumeNode
                if volumeNode.GetScene() is None or volumeNode.GetImageData() is None:
                    raise _inputError(_("The query volume was removed while its slice ranges were estimated."))
            except Exception as exc:
                self._setStatus(_("The slice ranges could not be estimated; the table is unchanged."), warning=True)
                self._reportError(exc, _("Slice ranges could not be estimated"))
                return
            self._fillRangeTable(volumeNode, found["axis"], found["ranges"])
            self._storeRangeTable()
            self._setStatus(_("Slice ranges estimated in {seconds:.0f} s; check or edit them in the table.").format(
                seconds=time.time() - job.startTime))
        finally:
            self.ui.progressBar.hide()
            self._setProcessingState(ProcessingState.IDLE)

    def _fillRangeTable(self, volumeNode, axis, ranges, notFound=()):
        """One row per structure: its name, first/last spin boxes, and buttons that centre the views on either end.

        ranges: {name: (first, last) | None (the estimate found nothing)}; names in notFound are marked so too.
        """
        self._rangeVolume, self._rangeAxis, self._rangeRows = volumeNode, axis, []
        self._rangeNotFound = [name for name, found in ranges.items() if found is None or name in notFound]
        n = volumeNode.GetImageData().GetDimensions()[2 - axis]
        table = self.ui.sliceRangeTable
        table.setRowCount(len(ranges))
        for row, (name, found) in enumerate(ranges.items()):
            # an empty estimate: the supports place it outside the query; offer the whole volume to edit
            label = _("{name} (not found)").format(name=name) if name in self._rangeNotFound else name
            table.setItem(row, 0, qt.QTableWidgetItem(label))
            spins = []
            for column, value in ((1, (found or (0, n - 1))[0]), (2, (found or (0, n - 1))[1])):
                spin = qt.QSpinBox()
                spin.setRange(0, n - 1)
                spin.setValue(value)
                spin.connect("valueChanged(int)", self._onRangeEdited)
                table.setCellWidget(row, column, spin)
                spins.append(spin)
            for column, spin, text in ((3, spins[0], _("Go to first")), (4, spins[1], _("Go to last"))):
                button = qt.QPushButton(text)
                button.connect("clicked()", lambda s=spin: self.logic.jumpToSlice(self._rangeVolume, self._rangeAxis, s.value))
                table.setCellWidget(row, column, button)
            self._rangeRows.append((name, spins[0], spins[1]))

    def _onRangeEdited(self, _value=None):
        if self._parameterNode is None:
            return
        with slicer.util.NodeModify(self._parameterNode.parameterNode):
            if self._parameterNode.sliceRangeMode != "manual":
                self._parameterNode.sliceRangeMode = "manual"  # an edited range is used as edited
            self._storeRangeTable()

    def _storeRangeTable(self):
        """The table as shown goes into the parameter node: saved with the scene, shown again on return."""
        if self._parameterNode is None or self._rangeVolume is None:
            return
        self.logic.storeSliceRanges(self._parameterNode.parameterNode, self._rangeVolume, self._rangeAxis,
                                    {name: (first.value, last.value) for name, first, last in self._rangeRows},
                                    self._rangeNotFound)

    def _restoreRangeTable(self):
        """Show the table saved in the parameter node if it belongs to the current query, else an empty table."""
        p = self._parameterNode
        stored = self.logic.storedSliceRanges(p.parameterNode, p.queryVolume) if p is not None else None
        if stored is None:
            self._rangeVolume, self._rangeRows, self._rangeNotFound = None, [], []
            self.ui.sliceRangeTable.setRowCount(0)
            return
        self._fillRangeTable(p.queryVolume, stored.axis, stored.ranges, stored.notFound)

    def _ensureDependencies(self, method="run"):
        """Offer to install what the run (method "run": the panel's method and slice range; None: the slice-range
        estimate) needs. False when the user declined, a restart is needed, or the scene was closed meanwhile."""
        p = self._parameterNode
        if method == "run":
            method, sliceRange = p.method, p.sliceRangeMode if p.sliceRangeMode != "manual" else "off"
        else:
            sliceRange = "off"
        lpipsNet = p.lpipsNet
        if not self.logic.missingDependencies(method, sliceRange, lpipsNet) and not self.logic.missingWeights(
                method, sliceRange, lpipsNet):
            return True
        dialog = None

        def confirm(message):
            nonlocal dialog
            if not slicer.util.confirmOkCancelDisplay(message, windowTitle="FewShotSAM2"):
                return False
            # pip runs in a process of its own but blocks Slicer meanwhile: say so in a modal busy dialog
            dialog = slicer.util.createProgressDialog(
                windowTitle="FewShotSAM2", maximum=0, windowModality=qt.Qt.WindowModal,
                labelText=_("Installing FewShotSAM2's Python packages and downloading weights.\n"
                            "This can take several minutes; Slicer is busy meanwhile (progress in the Python console)."))
            dialog.setCancelButton(None)
            slicer.app.processEvents()
            return True

        try:
            with slicer.util.WaitCursor():
                restart = self.logic.installDependencies(method, confirm=confirm, sliceRange=sliceRange,
                                                         lpipsNet=lpipsNet)
        finally:
            if dialog is not None:
                dialog.close()
        if self._parameterNode is None:  # the scene was closed while pip ran (it processes events)
            return False
        if restart:
            if slicer.util.confirmYesNoDisplay(
                _("Python packages that Slicer had already loaded were updated; FewShotSAM2 needs a restart of Slicer to use them. Restart now?"),
                windowTitle="FewShotSAM2",
            ):
                slicer.util.restart()
            return False
        return True

    def _ensureCheckpoint(self):
        p = self._parameterNode
        ready, _text = self.logic.checkpointStatus(p.modelSize, p.modelVersion)
        if ready:
            return True
        if not slicer.util.confirmOkCancelDisplay(
            _("The SAM2 {model} checkpoint is not downloaded yet. Download it now?").format(
                model=choices.displayName("modelSize", p.modelSize)),
            windowTitle="FewShotSAM2",
        ):
            return False
        return self.onDownloadModel()

    def _confirmReplacingOutput(self):
        """A segmentation picked as output has its segments replaced: ask first if it has any."""
        output = self._parameterNode.outputSegmentation
        if output is None or output.GetSegmentation().GetNumberOfSegments() == 0:
            return True
        return slicer.util.confirmOkCancelDisplay(
            _("The {n} segments of '{name}' will be replaced by the result. Continue?\n"
              "(Choose 'Create new segmentation' as output to keep them.)").format(
                n=output.GetSegmentation().GetNumberOfSegments(), name=output.GetName()),
            windowTitle="FewShotSAM2",
        )

    def _startSegmentation(self):
        self._setProcessingState(ProcessingState.STARTING)
        started = False
        try:
            server = self._remotePanel.server()  # None: this computer (no model or torch needed here otherwise)
            if not self._confirmReplacingOutput() or (
                    server is None and (not self._ensureDependencies() or not self._ensureCheckpoint())):
                return
            p = self._parameterNode
            with slicer.util.WaitCursor():
                prepared = self.logic.prepare(
                    p.queryVolume, self._supportsFromParameterNode(), p.method, p.outputSegmentation, **self._runOptions()
                )
                self._job = self.logic.start(prepared, server=server)
            started = True
        except Exception as exc:
            self._reportError(exc, _("Segmentation could not start"))
        finally:
            if not started:
                self._setProcessingState(ProcessingState.IDLE)
        if not started:
            return
        self._shownWarnings = 0
        self._startPolling(_("Starting the segmentation process..."), _("Starting"), ProcessingState.RUNNING)

    def _startPolling(self, status: str, barText: str, state) -> None:
        """A process has started: say so, show a busy bar, and poll it from the timer."""
        self._setStatus(status)
        self.ui.progressBar.setRange(0, 0)
        self.ui.progressBar.setFormat(barText)
        self.ui.progressBar.show()
        self._setProcessingState(state)
        self._pollTimer.start()

    @staticmethod
    def _reportError(exc, context):
        """One readable message for the user; details go to the application log."""
        from fewshotsam2.errors import InputError

        if isinstance(exc, InputError):
            logging.warning(f"FewShotSAM2: {exc}")
            message = str(exc)
        else:
            logging.error(f"FewShotSAM2: {context}", exc_info=(type(exc), exc, exc.__traceback__))
            first = (str(exc).splitlines() or [type(exc).__name__])[0]
            message = _("{context}: {error}\nSee the application log for details.").format(context=context, error=first)
        slicer.util.errorDisplay(message, windowTitle="FewShotSAM2")

    def _onPoll(self):
        if self._rangeJob is not None:
            self._onRangePoll()
            return
        job = self._job
        if job is None:
            self._pollTimer.stop()
            return
        finished = job.finished  # before polling: every line the process wrote is then read
        job.poll()
        stage, done, total = job.progress
        if total > 0:
            self.ui.progressBar.setRange(0, total)
            self.ui.progressBar.setValue(done)
            counter = f"{done}/{total}"
            # the core's stages often carry the counter already ("Encoding slice 34/120")
            self.ui.progressBar.setFormat(stage if counter in stage else f"{stage} {counter}")
        else:
            self.ui.progressBar.setRange(0, 0)
            self.ui.progressBar.setFormat(stage)
        if len(job.warnings) != self._shownWarnings:
            self._shownWarnings = len(job.warnings)
            self._setStatus(_("Warnings:") + "\n" + "\n".join(f"- {w}" for w in job.warnings), warning=True)
        if not finished:
            return
        self._pollTimer.stop()
        self._job = None
        (self._onRefineFinished if isinstance(job, refining.RefineJob) else self._onRunFinished)(job)

    def _onRunFinished(self, job):
        prepared = job.prepared
        self._setProcessingState(ProcessingState.APPLYING)
        try:
            try:
                with slicer.util.WaitCursor():
                    outputNode = self.logic.finish(job)
            except Exception as exc:
                self._setStatus(_("The segmentation failed; nothing was changed."), warning=True)
                self._reportError(exc, _("Segmentation failed"))
                return
            result = self.logic.lastResult
            self._lastOutputNode = outputNode
            with slicer.util.tryWithErrorDisplay(_("The result was written but could not be shown."), waitCursor=True):
                outputNode.GetDisplayNode().SetVisibility(True)
                self._updateShow3DButton()
                slicer.util.setSliceViewerLayers(background=prepared.queryVolumeNode)
                self._showResults(prepared, result)
            # wall time as the user waited (process start and model loading included), and the segmentation's own
            status = _("Done in {seconds:.0f} s on {device} (segmentation {run:.0f} s): '{name}'.").format(
                seconds=time.time() - job.startTime, device=result.device or "?", run=result.seconds,
                name=outputNode.GetName())
            if getattr(result, "range_notes", None):  # a structure reached an end of its slice range
                status += "\n" + _("Slice ranges:") + " " + "; ".join(result.range_notes)
            if result.warnings:
                status += "\n" + _("Warnings:") + "\n" + "\n".join(f"- {w}" for w in result.warnings)
            self._setStatus(status, warning=bool(result.warnings))
            slicer.util.showStatusMessage("FewShotSAM2: " + status.splitlines()[0], 5000)
        finally:
            self.ui.progressBar.hide()
            self._setProcessingState(ProcessingState.IDLE)

    # ------------------------------------------------------------------------------------------ refine
    # "Refine from my edits" and "Undo refine" under Results: made here (not in the .ui) to stay one block; the
    # Logic does the work (FewShotSAM2Lib/refining.py), the run is polled and cancelled as a segmentation is.

    def _setupRefine(self) -> None:
        self.refineButton = qt.QPushButton(_("Refine from my edits"))
        self._refineToolTip = _("Correct slices of the result with Segment Editor, then re-propagate from them: "
                                "each changed slice becomes a prompt, the structure is predicted again from it "
                                "in both directions. Structures you did not edit stay as they are.")
        self.refineButton.toolTip = self._refineToolTip
        self.undoRefineButton = qt.QPushButton(_("Undo refine"))
        self.undoRefineButton.toolTip = _("Put back the segmentation as it was before the last refine.")
        row = qt.QHBoxLayout()
        row.addWidget(self.refineButton)
        row.addWidget(self.undoRefineButton)
        self.ui.resultsCollapsibleButton.layout().addLayout(row)
        self.refineButton.connect("clicked(bool)", self.onRefine)
        self.undoRefineButton.connect("clicked(bool)", self.onUndoRefine)
        self._updateRefineButtons()

    def _updateRefineButtons(self) -> None:
        if not hasattr(self, "refineButton"):
            return
        node = self.logic.lastRefinableNode()
        idle = self._processingState == ProcessingState.IDLE
        refused = self.logic.refineRefusal(node)  # a "keep overlaps" result: the button says why it is off
        self.refineButton.enabled = idle and node is not None and not refused
        self.refineButton.toolTip = refused or self._refineToolTip
        self.undoRefineButton.enabled = idle and self.logic.canUndoRefine(node)

    def onRefine(self) -> None:
        node = self.logic.lastRefinableNode()
        try:
            corrections = self.logic.refineCorrections(node)
            if not corrections:
                self._setStatus(_("No slice of '{name}' was changed since the run: nothing to refine.").format(
                    name=node.GetName()))
                return
            taken = "; ".join(f"{name}: {', '.join(map(str, s))}" for name, s in corrections.items())
            with slicer.util.WaitCursor():
                self._job = self.logic.startRefine(node)
        except Exception as exc:
            self._reportError(exc, _("Refine failed"))
            return
        self._shownWarnings = 0
        self._startPolling(_("Refining '{name}' from your corrected slices ({taken}).").format(name=node.GetName(),
                                                                                                taken=taken),
                           _("Starting the refine"), ProcessingState.RUNNING)

    def _onRefineFinished(self, job) -> None:
        self._setProcessingState(ProcessingState.APPLYING)
        try:
            try:
                with slicer.util.WaitCursor():
                    node = self.logic.finishRefine(job)
            except Exception as exc:
                self._setStatus(_("The refine failed; nothing was changed."), warning=True)
                self._reportError(exc, _("Refine failed"))
                return
            taken = "; ".join(f"{name}: {', '.join(map(str, s))}" for name, s in job.corrections.items())
            self._setStatus(_("Refined '{name}' from slices {taken}. Undo refine puts the previous version back.")
                            .format(name=node.GetName(), taken=taken))
        finally:
            self.ui.progressBar.hide()
            self._setProcessingState(ProcessingState.IDLE)

    def onUndoRefine(self) -> None:
        node = self.logic.lastRefinableNode()
        with slicer.util.tryWithErrorDisplay(_("Undo refine failed."), waitCursor=True):
            self.logic.undoRefine(node)
            self._setStatus(_("The segmentation is back to its version before the refine."))
        self._updateRefineButtons()

    # ------------------------------------------------------------------------------------------ results

    def _showResults(self, prepared, result):
        method = prepared.method
        self._lastSliceAxis = int(result.slice_axis)
        self._lastQueryVolumeNode = prepared.queryVolumeNode
        # reuse the previous run's table and chart (if the user did not delete them) instead of piling up nodes
        tableNode = self._tableNode if self._tableNode is not None and self._tableNode.GetScene() is slicer.mrmlScene else None
        chartNode = self._chartNode if self._chartNode is not None and self._chartNode.GetScene() is slicer.mrmlScene else None
        if chartNode is not None and self.logic.confidenceKind(method) is None:
            review.removePlotSeries(chartNode, slicer.mrmlScene)  # no scores this time: no stale series either
        self._tableNode, self._chartNode = self.logic.createConfidenceTable(
            result, method, slicer.mrmlScene, tableNode=tableNode, chartNode=chartNode
        )
        self._lowConfidence = self.logic.lowConfidenceSlices(result, method)
        # the same slices marked where the user looks: a point on each, seen when scrolling through the query
        self._markupsNode = self.logic.markLowConfidenceSlices(result, self._lowConfidence, prepared.queryVolumeNode,
                                                               self._lastSliceAxis, self._markupsNode)
        table = self.ui.lowConfidenceTable
        table.clearContents()
        table.setRowCount(len(self._lowConfidence))
        table.setColumnCount(3)
        table.setHorizontalHeaderLabels([_("Segment"), _("Slice"), _("Score")])
        colors = review.confidenceColors([score for _name, _index, score in self._lowConfidence],
                                         higherIsBetter=method != "lpips")
        for row, (name, sliceIndex, score) in enumerate(self._lowConfidence):
            for column, text in enumerate((name, str(sliceIndex), f"{score:.3f}")):
                item = qt.QTableWidgetItem(text)
                item.setFlags(qt.Qt.ItemIsSelectable | qt.Qt.ItemIsEnabled)
                if column == 2:  # red = least confident, yellow = the best of the low ones
                    item.setBackground(qt.QBrush(qt.QColor(*colors[row])))
                table.setItem(row, column, item)
        kind = self.logic.confidenceKind(method)
        if kind is None:
            self.ui.resultsSummaryLabel.text = _("This method gives no per-slice confidence.")
        else:
            self.ui.resultsSummaryLabel.text = _("{n} low-confidence slices ({kind}). Click one to jump there.").format(
                n=len(self._lowConfidence), kind=kind
            )
        self.ui.showPlotButton.enabled = self._chartNode is not None
        self.ui.resultsCollapsibleButton.collapsed = False

    def _updateShow3DButton(self):
        node = self._lastOutputNode if self._lastOutputNode is not None and self._lastOutputNode.GetScene() else None
        self.ui.show3DButton.enabled = node is not None
        wasBlocked = self.ui.show3DButton.blockSignals(True)
        self.ui.show3DButton.checked = node is not None and mrml_io.hasClosedSurface(node)
        self.ui.show3DButton.blockSignals(wasBlocked)

    def onShow3D(self, show):
        node = self._lastOutputNode
        if node is None or node.GetScene() is None:
            self._updateShow3DButton()
            return
        with slicer.util.tryWithErrorDisplay(_("The 3D surface could not be made."), waitCursor=True):
            self.logic.showIn3D(node, bool(show))

    def _showCoreMismatch(self):
        """Slicer appends module paths to sys.path last: a pip-installed fewshotsam2 would then be imported here
        while the run process (PYTHONPATH first) uses the module's own copy. Say so rather than run two versions."""
        problem = process.coreMismatch()
        if problem:
            logging.warning("FewShotSAM2: %s", problem)
            self._setStatus(problem, warning=True)

    def onShowPlot(self):
        if self._chartNode is not None:
            slicer.modules.plots.logic().ShowChartInLayout(self._chartNode)

    def onLowConfidenceCellClicked(self, row, column):
        if 0 <= row < len(self._lowConfidence) and self._lastQueryVolumeNode is not None:
            _name, sliceIndex, _score = self._lowConfidence[row]
            self.logic.jumpToSlice(self._lastQueryVolumeNode, self._lastSliceAxis, sliceIndex)

    # ------------------------------------------------------------------------------------------ models

    def onDownloadModel(self):
        p = self._parameterNode
        progressDialog = slicer.util.createProgressDialog(
            windowTitle="FewShotSAM2",
            labelText=_("Downloading SAM2 {model}...").format(model=choices.displayName("modelSize", p.modelSize)),
            maximum=100,
            windowModality=qt.Qt.WindowModal,  # QProgressDialog is not modal by itself: no edits mid-download
        )
        from fewshotsam2.errors import Cancelled

        def onProgress(done, total):
            if total > 0:
                progressDialog.setValue(int(100 * done / total))
                progressDialog.setLabelText(f"{done / 1e6:.0f} / {total / 1e6:.0f} MB")
            slicer.app.processEvents()
            if progressDialog.wasCanceled:
                raise Cancelled("download cancelled")

        ok = False
        try:
            self.logic.downloadCheckpoint(p.modelSize, p.modelVersion, progress=onProgress)
            ok = True
        except Cancelled:
            slicer.util.showStatusMessage(_("Download cancelled."), 3000)
        except Exception as exc:  # InputError carries the URL and where to put the file by hand
            logging.error("FewShotSAM2: checkpoint download failed", exc_info=True)
            slicer.util.errorDisplay(_("Download failed: {error}").format(error=exc), windowTitle="FewShotSAM2")
        finally:
            progressDialog.close()
            self._updateModelStatus()
        return ok

    def onImportModel(self):
        p = self._parameterNode
        path = qt.QFileDialog.getOpenFileName(
            self.parent, _("Import a SAM2 checkpoint"), "", _("PyTorch checkpoint (*.pt *.pth);;All files (*)")
        )
        if not path:
            return
        with slicer.util.tryWithErrorDisplay(_("The checkpoint could not be imported."), waitCursor=True):
            self.logic.importCheckpoint(path, p.modelSize, p.modelVersion)
        self._updateModelStatus()

    def onClearCache(self):
        if not slicer.util.confirmOkCancelDisplay(_("Delete all downloaded SAM2 checkpoints?"), windowTitle="FewShotSAM2"):
            return
        with slicer.util.tryWithErrorDisplay(_("The cache could not be cleared."), waitCursor=True):
            removed = self.logic.clearCheckpointCache()
            slicer.util.showStatusMessage(_("Removed {n} files.").format(n=removed), 3000)
        self._updateModelStatus()


#
# FewShotSAM2Test
#


class FewShotSAM2Test(ScriptedLoadableModuleTest):
    """Self-test on a small synthetic volume and segmentation.

    test_FewShotSAM2_files (no torch needed): MRML -> the job files the process reads, exactly, and the progress
    protocol. test_FewShotSAM2_untrained: the real out-of-process run, SAM2 tiny with random weights at 64 pixels;
    skipped (not passed) when torch or sam2 is not installed.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        problem = dependencies.pythonProblem()
        if problem:
            self.delayDisplay("Skipped: " + problem)
            return
        self.setUp()
        self.test_FewShotSAM2_files()
        self.setUp()
        self._runOrShowSkip(self.test_FewShotSAM2_untrained)

    def _runOrShowSkip(self, test):
        """Run one test; a skipTest is shown with its reason instead of raised. Slicer's Reload and Test calls
        runTest() directly, without a unittest runner, so a raised SkipTest would read "Reload and Test failed"
        (ScriptedLoadableModuleWidget.onReloadAndTest: tryWithErrorDisplay)."""
        import unittest

        try:
            test()
        except unittest.SkipTest as exc:
            logging.warning("FewShotSAM2 self-test: %s skipped: %s", test.__name__, exc)
            self.delayDisplay(f"Skipped {test.__name__}: {exc}")

    def _syntheticCase(self):
        """A 48x40x12 volume with a bright ellipsoid (1.5 x 1.2 x 3 mm voxels, flipped axes) and a segmentation
        labeling it on two slices: the query is its own support."""
        k, j, i = np.mgrid[0:12, 0:40, 0:48]
        inside = ((i - 24) / 12.0) ** 2 + ((j - 20) / 9.0) ** 2 + ((k - 6) / 5.0) ** 2 <= 1.0
        voxels = (100 + 800 * inside + np.random.default_rng(0).normal(0, 20, inside.shape)).astype(np.int16)
        volumeNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "FewShotSAM2TestVolume")
        slicer.util.updateVolumeFromArray(volumeNode, voxels)
        volumeNode.SetSpacing(1.5, 1.2, 3.0)
        volumeNode.SetOrigin(10.0, -20.0, 30.0)
        volumeNode.SetIJKToRASDirections([[-1, 0, 0], [0, -1, 0], [0, 0, 1]])

        segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "FewShotSAM2TestLabels")
        segmentationNode.CreateDefaultDisplayNodes()
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        segmentId = segmentationNode.GetSegmentation().AddEmptySegment("blob", "blob", [0.9, 0.2, 0.1])
        labels = np.zeros(inside.shape, np.uint8)
        labels[5:7] = inside[5:7]
        slicer.util.updateSegmentBinaryLabelmapFromArray(labels, segmentationNode, segmentId, volumeNode)
        return volumeNode, segmentationNode, segmentId, voxels, labels

    def test_FewShotSAM2_files(self):
        import importlib.util
        import shutil
        import tempfile
        from pathlib import Path

        from fewshotsam2.io.volume import read_labels, read_volume

        self.delayDisplay("MRML to the segmentation process's files")
        volumeNode, segmentationNode, segmentId, voxels, labels = self._syntheticCase()
        logic = FewShotSAM2Logic()
        prepared = logic.prepare(volumeNode, [(volumeNode, segmentationNode, [segmentId])], "propagate",
                                 image_size=64, untrained=True, device="cpu")
        np.testing.assert_array_equal(prepared.supports[0].labels.volume.array, labels)
        self.assertEqual(prepared.options["image_size"], 64)
        folder = Path(tempfile.mkdtemp(prefix="FewShotSAM2-selftest-"))
        try:
            if importlib.util.find_spec("slicerio") is not None:  # .seg.nrrd labels need it
                arguments = process.writeJobInputs(folder, prepared.query, prepared.supports, prepared.structures)
                self.assertEqual(arguments[-2:], ["--labels", "value:1"])  # by value (process.writeJobInputs)
                query = read_volume(folder / process.QUERY_FILE)
                np.testing.assert_array_equal(query.array, voxels)
                self.assertTrue(query.same_grid(prepared.query))
                supportLabels, structures = read_labels(folder / "support-1-labels.seg.nrrd", query)
                np.testing.assert_array_equal(supportLabels.array, labels)
                self.assertEqual([(s.value, s.name) for s in structures], [(1, "blob")])
            else:
                process.writeImage(folder / process.QUERY_FILE, prepared.query)
                np.testing.assert_array_equal(read_volume(folder / process.QUERY_FILE).array, voxels)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        event = process.parseProgressLine('{"event": "progress", "stage": "Encoding slice 3/12", "done": 3, "total": 12}')
        self.assertEqual((event["stage"], event["done"], event["total"]), ("Encoding slice 3/12", 3, 12))
        self.assertIsNone(process.parseProgressLine("not a progress line"))
        self.delayDisplay("Test passed")

    def test_FewShotSAM2_untrained(self):
        self.delayDisplay("Starting the test")
        logic = FewShotSAM2Logic()
        missing = logic.missingDependencies("propagate")
        if missing:
            # the test does not install packages
            self.skipTest("FewShotSAM2 Python packages not installed: " + "; ".join(missing))
        volumeNode, segmentationNode, segmentId, voxels, labels = self._syntheticCase()

        self.delayDisplay("Segmenting in a separate process")
        stages = []
        output = logic.segment(
            volumeNode, [(volumeNode, segmentationNode, [segmentId])], method="propagate",
            progressCallback=lambda stage, done, total: stages.append((stage, done, total)),
            image_size=64, untrained=True, device="cpu",
        )
        self.assertIsNotNone(output)
        self.assertTrue(stages and stages[-1][1] == stages[-1][2])
        self.assertEqual(logic.lastResult.device, "cpu")
        self.assertEqual(output.GetSegmentation().GetNumberOfSegments(), 1)
        segment = output.GetSegmentation().GetNthSegment(0)
        self.assertEqual(segment.GetName(), "blob")
        self.assertTrue(np.allclose(segment.GetColor(), [0.9, 0.2, 0.1]))
        mask = logic.segmentMaskOnVolume(output, output.GetSegmentation().GetNthSegmentID(0), volumeNode)
        self.assertEqual(mask.shape, voxels.shape)
        np.testing.assert_array_equal(mask, logic.lastResult.labels.array == 1)
        geometry = slicer.vtkOrientedImageData()
        output.GetBinaryLabelmapRepresentation(output.GetSegmentation().GetNthSegmentID(0), geometry)
        expected, actual = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(expected)
        geometry.GetImageToWorldMatrix(actual)
        self.assertTrue(np.allclose(mrml_io.vtkMatrixToNumpy(expected), mrml_io.vtkMatrixToNumpy(actual)))
        self.delayDisplay("Test passed")
