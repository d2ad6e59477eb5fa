"""FewShotSAM2: segment a structure in a 3D scan from one or a few labeled scans with SAM2, without training.

This file holds the classes 3D Slicer expects of a scripted module (module, parameter node, widget, logic,
self-test). The computation lives in the Qt-free, Slicer-free core `fewshotsam2` (see docs/architecture.md);
the Logic converts MRML nodes to the core's `Volume` and back, and calls `fewshotsam2.pipeline.segment`.

The Logic needs only MRML and `slicer.util` (no Qt, no `slicer.app`), so it runs in Slicer's Python console and
in the `slicer-core` Python package alike:

    logic = FewShotSAM2Logic()
    seg = logic.segment(queryVolumeNode, [(supportVolumeNode, supportSegmentationNode, ["Segment_1"])],
                        method="reverse")

Outside the Slicer application (slicer-core: no `qt`, `ctk`, `slicer.ScriptedLoadableModule`, `slicer.app`) the
module still imports: the GUI classes are then defined on inert stand-in bases and must not be instantiated.
"""

import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Annotated, Any, Callable, Optional

import numpy as np
import vtk
from vtk.util import numpy_support

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

# Choices offered in the GUI: the core's constants (pure Python, so the module loads even before the core's
# dependencies, torch and sam2, are installed). constants.display_name gives each choice's readable name.
from fewshotsam2.constants import AXES as SLICE_AXES  # noqa: E402
from fewshotsam2.constants import DEVICES, IMAGE_SIZES, LPIPS_NETS, METHODS  # noqa: E402
from fewshotsam2.constants import MODELS as MODEL_SIZES  # noqa: E402
from fewshotsam2.constants import PRESETS as INTENSITY_PRESETS  # noqa: E402
from fewshotsam2.constants import VERSIONS as MODEL_VERSIONS  # noqa: E402

# Below this reverse-propagation score pi (mean Dice on the supports) a slice is listed as low confidence.
LOW_CONFIDENCE_PI = 0.5
# For LPIPS matching the slices whose distance is in the top 10 % of the run are listed.
LOW_CONFIDENCE_LPIPS_QUANTILE = 0.9

# Where torch/sam2/lpips come from inside Slicer (see docs/slicer-api.md).
SAM2_REQUIREMENT = "sam2==1.1.0"
SAM2_RUNTIME_REQUIREMENTS = ("hydra-core>=1.3.2", "iopath>=0.1.10", "pillow", "tqdm")
LPIPS_REQUIREMENT = "lpips==0.1.4"
OTHER_REQUIREMENTS = ("scipy", "SimpleITK", "slicerio")
TORCH_VERSION_REQUIREMENT = ">=2.5.1"

README_URL = "https://github.com/fewshotsam2/SlicerFewShotSAM2#readme"


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
        self.parent.dependencies = []  # the PyTorch extension is optional (used to install torch when present)
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


#
# FewShotSAM2ParameterNode
#


@parameterNodeWrapper
class FewShotSAM2ParameterNode:
    """Every setting of the module, saved with the scene.

    queryVolume - the volume to segment.
    supportVolumes, supportSegmentations, supportSegmentIds - the supports, one entry per row (same length);
        supportSegmentIds[n] is a comma-separated list of segment IDs of supportSegmentations[n] (empty = all).
    method - "reverse" (RevSAM2), "lpips" (Zu et al.) or "propagate" (plain SAM2 propagation).
    modelSize, modelVersion, device - which SAM2 checkpoint and where it runs.
    imageSize, sliceAxis, intensityPreset, shots, topK, minScore, augmentations, lpipsNet - advanced settings.
    outputSegmentation - where the result goes (None: a new segmentation node is created).
    """

    queryVolume: vtkMRMLScalarVolumeNode
    supportVolumes: list[vtkMRMLScalarVolumeNode]
    supportSegmentations: list[vtkMRMLSegmentationNode]
    supportSegmentIds: list[str]
    method: Annotated[str, Choice(METHODS)] = "reverse"
    modelSize: Annotated[str, Choice(MODEL_SIZES)] = "tiny"
    modelVersion: Annotated[str, Choice(MODEL_VERSIONS)] = "2.1"
    device: Annotated[str, Choice(DEVICES)] = "auto"
    imageSize: Annotated[int, Choice(IMAGE_SIZES)] = 1024
    sliceAxis: Annotated[str, Choice(SLICE_AXES)] = "auto"
    intensityPreset: Annotated[str, Choice(INTENSITY_PRESETS)] = "auto"
    shots: Annotated[int, WithinRange(1, 50)] = 1
    topK: Annotated[int, WithinRange(1, 100)] = 5
    minScore: Annotated[float, WithinRange(0.0, 1.0)] = 0.0
    augmentations: Annotated[int, WithinRange(0, 20)] = 3
    lpipsNet: Annotated[str, Choice(LPIPS_NETS)] = "alex"
    outputSegmentation: vtkMRMLSegmentationNode


#
# Logic helpers (no Qt)
#


def _lib():
    """(errors, pipeline, volume) of the core, imported lazily: Slicer must be able to load this module before
    torch and sam2 are installed."""
    from fewshotsam2 import errors, pipeline, volume

    return errors, pipeline, volume


def _errors():
    from fewshotsam2 import errors

    return errors


def _inputError(message):
    from fewshotsam2.errors import InputError

    return InputError(message)


def _vtkMatrixToNumpy(matrix):
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def _numpyToVtkMatrix(array):
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])

_converterRulesChecked = False


def _ensureSegmentationConverterRules():
    """Register Slicer's segmentation converter rules if nobody did.

    In the Slicer application the Segmentations module logic registers them at startup
    (vtkSlicerSegmentationsModuleLogic::RegisterNodes), so this is a no-op there. With slicer-core alone they are
    missing and vtkSegmentation::DeepCopy cannot create binary labelmaps; the same four rules are registered here.
    """
    global _converterRulesChecked
    if _converterRulesChecked:
        return
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    if factory.ConstructRepresentationObjectByClass("vtkOrientedImageData") is None:
        for rule in (slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule, slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule,
                     slicer.vtkClosedSurfaceToFractionalLabelmapConversionRule, slicer.vtkFractionalLabelmapToClosedSurfaceConversionRule):
            factory.RegisterConverterRule(rule())
    _converterRulesChecked = True


def _nodeName(node):
    return node.GetName() if node is not None and node.GetName() else "(unnamed)"


@dataclass
class FewShotSAM2Support:
    """One support as the Logic takes it: a volume, a segmentation and the segment IDs to use (empty: all)."""

    volumeNode: Any
    segmentationNode: Any
    segmentIds: list = field(default_factory=list)


@dataclass
class FewShotSAM2Run:
    """Everything `FewShotSAM2Logic.run` needs, made by `prepare` in the main thread; holds no MRML access."""

    query: Any  # fewshotsam2.volume.Volume
    supports: list  # [fewshotsam2.pipeline.SupportCase]
    structures: list  # [fewshotsam2.volume.Structure]
    options: Any  # fewshotsam2.pipeline.SegmentOptions
    # MRML side, used by `apply` only (main thread)
    queryVolumeNode: Any = None
    outputSegmentationNode: Any = None
    segmentMetadata: dict = field(default_factory=dict)  # structure name -> source vtkSegment (name, colour, terminology)


class FewShotSAM2BackgroundRun:
    """Runs `FewShotSAM2Logic.run` in a Python thread; the GUI polls it (no Qt here, MRML is not touched).

    `progress()` returns (stage, done, total) of the latest progress report; `requestCancel()` makes the next
    progress report raise `Cancelled`; when `finished` is set, `result` or `error` holds the outcome.
    """

    def __init__(self, logic, prepared):
        self._logic = logic
        self._prepared = prepared
        self._lock = threading.Lock()
        self._progress = ("Starting", 0, 0)
        self._cancel = threading.Event()
        self.finished = threading.Event()
        self.result = None
        self.error = None
        self.startTime = None
        self._thread = threading.Thread(target=self._work, name="FewShotSAM2", daemon=True)

    def start(self):
        self.startTime = time.time()
        self._thread.start()
        return self

    def _onProgress(self, stage, done, total):
        with self._lock:
            self._progress = (stage, int(done), int(total))
        if self._cancel.is_set():
            from fewshotsam2.errors import Cancelled

            raise Cancelled("cancelled by the user")

    def _work(self):
        try:
            self.result = self._logic.run(self._prepared, self._onProgress)
        except BaseException as exc:  # reported to the main thread, which shows it
            self.error = exc
            self.traceback = sys.exc_info()
        finally:
            self.finished.set()

    def progress(self):
        with self._lock:
            return self._progress

    def requestCancel(self):
        self._cancel.set()

    @property
    def cancelRequested(self):
        return self._cancel.is_set()

    def wait(self, timeout=None):
        self._thread.join(timeout)
        return self.finished.is_set()


#
# FewShotSAM2Logic
#


class FewShotSAM2Logic(ScriptedLoadableModuleLogic):
    """MRML <-> core conversions and the call of the core. No Qt; usable from scripts and slicer-core.

    `segment` = `prepare` (MRML nodes -> core inputs, main thread) + `run` (the core, any thread, no MRML)
    + `apply` (result -> segmentation node, main thread). A failure or a cancel in any step leaves the scene as
    it was: the output node is neither created nor modified until `apply`, which restores it if it fails.
    """

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)

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
        """Segment `queryVolumeNode` from the labeled `supports`; returns the output segmentation node.

        supports: list of (volume node, segmentation node, segment IDs) - segment IDs a list of str, or None /
            empty for all segments of that segmentation. Segments with the same name in different supports are
            the same structure; the first support that has it gives its name and colour.
        method: "reverse" | "lpips" | "propagate".
        outputSegmentationNode: written in place (its segments replaced); None creates a new node.
        progressCallback(stage, done, total): raise fewshotsam2.errors.Cancelled from it to stop.
        options: fields of fewshotsam2.pipeline.SegmentOptions (model, version, image_size, device,
            checkpoint, untrained, cache_dir, axis, preset, shots, top_k, min_score, keep_supports,
            augmentations, lpips_net, lpips_weights, seed, batch_size).
        The last result (fewshotsam2.pipeline.SegmentationResult) is kept in `self.lastResult`.
        """
        prepared = self.prepare(queryVolumeNode, supports, method, outputSegmentationNode, **options)
        result = self.run(prepared, progressCallback)
        return self.apply(prepared, result)

    # ------------------------------------------------------------------------------------------ prepare

    def prepare(self, queryVolumeNode, supports, method="reverse", outputSegmentationNode=None, **options):
        """Check the inputs and convert them into the core's inputs (main thread). Changes nothing."""
        errors, pipeline, volume = _lib()
        if queryVolumeNode is None:
            raise errors.InputError("No query volume: select the volume to segment.")
        if not queryVolumeNode.IsA("vtkMRMLScalarVolumeNode"):
            raise errors.InputError(f"The query '{_nodeName(queryVolumeNode)}' is not a scalar volume.")
        if outputSegmentationNode is not None and not outputSegmentationNode.IsA("vtkMRMLSegmentationNode"):
            raise errors.InputError(f"The output '{_nodeName(outputSegmentationNode)}' is not a segmentation node.")
        if queryVolumeNode.GetScene() is None:
            raise errors.InputError(f"The query volume '{_nodeName(queryVolumeNode)}' is not in a scene.")
        if outputSegmentationNode is not None and outputSegmentationNode.GetScene() is None:
            raise errors.InputError(f"The output segmentation '{_nodeName(outputSegmentationNode)}' is not in a scene.")
        if method not in METHODS:
            raise errors.InputError(f"Unknown method '{method}': choose one of {', '.join(METHODS)}.")
        try:
            segmentOptions = pipeline.SegmentOptions.from_flat(method=method, **options)  # validated here
        except TypeError as exc:
            raise errors.InputError(f"Unknown segmentation option: {exc}") from None
        supportList = self._normalizeSupports(supports)
        _ensureSegmentationConverterRules()

        query = self.volumeFromNode(queryVolumeNode, "query volume")

        structuresByName = {}
        metadata = {}
        cases = []
        for index, support in enumerate(supportList):
            where = f"Support {index + 1}"
            volumeNode, segmentationNode, segmentIds = support.volumeNode, support.segmentationNode, support.segmentIds
            if volumeNode is None:
                raise errors.InputError(f"{where}: no volume selected.")
            if segmentationNode is None:
                raise errors.InputError(f"{where}: no segmentation selected.")
            if not volumeNode.IsA("vtkMRMLScalarVolumeNode"):
                raise errors.InputError(f"{where}: '{_nodeName(volumeNode)}' is not a scalar volume.")
            if not segmentationNode.IsA("vtkMRMLSegmentationNode"):
                raise errors.InputError(f"{where}: '{_nodeName(segmentationNode)}' is not a segmentation.")
            segmentation = segmentationNode.GetSegmentation()
            if not segmentIds:
                segmentIds = list(segmentation.GetSegmentIDs())
                if not segmentIds:
                    raise errors.InputError(f"{where}: segmentation '{_nodeName(segmentationNode)}' has no segments.")
            image = self.volumeFromNode(volumeNode, f"{where} volume")
            labels = np.zeros(image.array.shape, dtype=np.uint16)
            for segmentId in segmentIds:
                segment = segmentation.GetSegment(segmentId)
                if segment is None:
                    raise errors.InputError(
                        f"{where}: segmentation '{_nodeName(segmentationNode)}' has no segment with ID '{segmentId}'."
                    )
                name = segment.GetName() or segmentId
                if name not in structuresByName:
                    color = tuple(float(c) for c in segment.GetColor())
                    structuresByName[name] = volume.Structure(len(structuresByName) + 1, name, color)
                    metadata[name] = segment
                mask = self.segmentMaskOnVolume(segmentationNode, segmentId, volumeNode)
                if not mask.any():
                    raise errors.InputError(
                        f"{where}: segment '{name}' of '{_nodeName(segmentationNode)}' is empty inside volume "
                        f"'{_nodeName(volumeNode)}'. Label at least one slice of it, or leave it out."
                    )
                # overlapping segments: the first listed keeps the voxel, as the core does for its output
                labels[mask & (labels == 0)] = structuresByName[name].value
            cases.append(pipeline.SupportCase(image=image, labels=image.with_array(labels), name=_nodeName(volumeNode)))

        return FewShotSAM2Run(
            query=query,
            supports=cases,
            structures=list(structuresByName.values()),
            options=segmentOptions,
            queryVolumeNode=queryVolumeNode,
            outputSegmentationNode=outputSegmentationNode,
            segmentMetadata=metadata,
        )

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
            if ids is None:
                ids = []
            elif isinstance(ids, str):
                ids = [s.strip() for s in ids.split(",") if s.strip()]
            else:
                ids = [str(s) for s in ids]
            out.append(FewShotSAM2Support(support.volumeNode, support.segmentationNode, ids))
        if not out:
            raise _inputError("No support: add at least one labeled volume (a volume, a segmentation and its segments).")
        return out

    # ------------------------------------------------------------------------------------------ run

    # One SAM2 model per Slicer session, shared by every Logic instance (the widget's and the console's), so a
    # checkpoint is loaded once. The lock serialises runs: a second run waits for the first to finish.
    _engine = None
    _engineKey = None
    _engineLock = threading.Lock()

    def run(self, prepared, progressCallback=None):
        """Run the core on the prepared inputs. Touches no MRML node, so it may run in a worker thread."""
        pipeline = _lib()[1]
        with FewShotSAM2Logic._engineLock:
            engine = self._engineFor(prepared.options, pipeline)
            return pipeline.segment(
                prepared.query, prepared.supports, prepared.structures, prepared.options, progressCallback, engine=engine
            )

    @staticmethod
    def _engineFor(options, pipeline):
        """The SAM2 engine for these options, kept between runs (call with _engineLock held)."""
        key = tuple(options.engine_settings().items())
        if FewShotSAM2Logic._engineKey != key:
            FewShotSAM2Logic._engine = None  # free the previous model before building the next
            FewShotSAM2Logic._engineKey = None
            FewShotSAM2Logic._engine = pipeline.make_engine(options)
            FewShotSAM2Logic._engineKey = key
        return FewShotSAM2Logic._engine

    @staticmethod
    def releaseModel():
        """Forget the cached SAM2 model (frees its memory once no run uses it)."""
        with FewShotSAM2Logic._engineLock:
            FewShotSAM2Logic._engine = None
            FewShotSAM2Logic._engineKey = None

    def startBackgroundRun(self, prepared):
        """Start `run` in a Python thread; poll the returned FewShotSAM2BackgroundRun from the main thread."""
        return FewShotSAM2BackgroundRun(self, prepared).start()

    # ------------------------------------------------------------------------------------------ apply

    def apply(self, prepared, result):
        """Write the core's result into the output segmentation node (main thread); returns the node.

        The segments are built completely before the scene is touched. A new node is added only then; an existing
        node gets its segments replaced in one step and is restored if anything fails.
        """
        errors = _errors()
        queryVolumeNode = prepared.queryVolumeNode
        if queryVolumeNode.GetScene() is None:
            raise errors.InputError("The query volume was removed from the scene during the run; nothing was written.")
        if prepared.outputSegmentationNode is not None and prepared.outputSegmentationNode.GetScene() is None:
            raise errors.InputError("The output segmentation was removed from the scene during the run; nothing was written.")
        labels = np.asarray(result.labels.array)
        queryShape = tuple(reversed(queryVolumeNode.GetImageData().GetDimensions()))
        if labels.shape != queryShape:
            raise RuntimeError(f"result shape {labels.shape} differs from the query volume's {queryShape}")

        _ensureSegmentationConverterRules()
        newSegmentation = self._segmentationFromLabels(labels, result.structures, queryVolumeNode, prepared.segmentMetadata)

        outputNode = prepared.outputSegmentationNode
        created = outputNode is None
        backup = None
        scene = queryVolumeNode.GetScene()
        try:
            if created:
                name = scene.GenerateUniqueName(f"{_nodeName(queryVolumeNode)} FewShotSAM2")
                outputNode = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
            else:
                backup = self._backupSegmentationNode(outputNode)
            wasModifying = outputNode.StartModify()
            try:
                outputNode.GetSegmentation().DeepCopy(newSegmentation)
                outputNode.SetReferenceImageGeometryParameterFromVolumeNode(queryVolumeNode)
                outputNode.SetAndObserveTransformNodeID(queryVolumeNode.GetTransformNodeID())
                outputNode.SetAttribute("FewShotSAM2.Method", str(prepared.options.method))
                outputNode.SetAttribute("FewShotSAM2.QueryVolumeID", queryVolumeNode.GetID() or "")
            finally:
                outputNode.EndModify(wasModifying)
            if outputNode.GetScene() is not None:
                outputNode.CreateDefaultDisplayNodes()
        except Exception:
            if created and outputNode is not None and outputNode.GetScene() is not None:
                displayNode = outputNode.GetDisplayNode()
                outputNode.GetScene().RemoveNode(outputNode)
                if displayNode is not None and displayNode.GetScene() is not None:
                    displayNode.GetScene().RemoveNode(displayNode)
            elif backup is not None:
                self._restoreSegmentationNode(outputNode, backup)
            raise
        self.lastResult = result
        return outputNode

    def _segmentationFromLabels(self, labels, structures, queryVolumeNode, metadata):
        """A vtkSegmentation (not in any node) with one binary-labelmap segment per structure, on the query grid."""
        ijkToRAS = vtk.vtkMatrix4x4()
        queryVolumeNode.GetIJKToRASMatrix(ijkToRAS)  # local frame: the output gets the query's parent transform
        segmentation = slicer.vtkSegmentation()
        segmentation.SetSourceRepresentationName(slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName())
        nk, nj, ni = labels.shape
        for structure in structures:
            image = slicer.vtkOrientedImageData()
            image.SetDimensions(ni, nj, nk)
            image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
            voxels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(nk, nj, ni)
            voxels[:] = labels == structure.value
            image.SetImageToWorldMatrix(ijkToRAS)
            segment = slicer.vtkSegment()
            source = metadata.get(structure.name)
            if source is not None:
                segment.DeepCopyMetadata(source)  # name, colour, terminology and other tags of the support's segment
            segment.SetLabelValue(1)  # the voxel value in `image` (DeepCopyMetadata copied the support's value)
            segment.SetName(structure.name)
            segment.SetColor(*[float(c) for c in structure.color])
            segment.AddRepresentation(slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName(), image)
            segmentation.AddSegment(segment, segmentation.GenerateUniqueSegmentID(structure.name))
        # The core's labels never overlap: share one labelmap layer between the segments, as Slicer's editor does.
        segmentation.CollapseBinaryLabelmaps(False)
        return segmentation

    @staticmethod
    def _backupSegmentationNode(node):
        segmentation = slicer.vtkSegmentation()
        segmentation.DeepCopy(node.GetSegmentation())
        role = node.GetReferenceImageGeometryReferenceRole()
        return {
            "segmentation": segmentation,
            "referenceID": node.GetNodeReferenceID(role),
            "transformID": node.GetTransformNodeID(),
            "attributes": {name: node.GetAttribute(name) for name in ("FewShotSAM2.Method", "FewShotSAM2.QueryVolumeID")},
        }

    @staticmethod
    def _restoreSegmentationNode(node, backup):
        wasModifying = node.StartModify()
        try:
            node.GetSegmentation().DeepCopy(backup["segmentation"])
            node.SetNodeReferenceID(node.GetReferenceImageGeometryReferenceRole(), backup["referenceID"])
            node.SetAndObserveTransformNodeID(backup["transformID"])
            for name, value in backup["attributes"].items():
                if value is None:
                    node.RemoveAttribute(name)
                else:
                    node.SetAttribute(name, value)
        finally:
            node.EndModify(wasModifying)

    # ------------------------------------------------------------------------------------------ geometry

    @staticmethod
    def ijkToWorldMatrix(volumeNode):
        """4x4 IJK -> world RAS of a volume, its parent transform included (refused if not linear)."""
        errors = _errors()
        ijkToRAS = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(ijkToRAS)
        matrix = _vtkMatrixToNumpy(ijkToRAS)
        transformNode = volumeNode.GetParentTransformNode()
        if transformNode is not None:
            if not transformNode.IsTransformToWorldLinear():
                raise errors.InputError(
                    f"Volume '{_nodeName(volumeNode)}' is under a non-linear transform: harden the transform "
                    "(Transforms module) or remove it before segmenting."
                )
            toWorld = vtk.vtkMatrix4x4()
            transformNode.GetMatrixTransformToWorld(toWorld)
            matrix = _vtkMatrixToNumpy(toWorld) @ matrix
        return matrix

    @classmethod
    def volumeFromNode(cls, volumeNode, what="volume"):
        """The core's Volume for a scalar volume node: the voxels ([k, j, i], copied) and the exact geometry.

        Any orientation is kept (direction = the IJK axes in LPS); a sheared voxel grid cannot be a Volume and
        is refused with a message. With no parent transform the node's own spacing/origin/directions are used
        as they are, so the geometry round-trips exactly.
        """
        from fewshotsam2 import errors, volume
        imageData = volumeNode.GetImageData()
        if imageData is None or min(imageData.GetDimensions()) < 1:
            raise errors.InputError(f"The {what} '{_nodeName(volumeNode)}' has no voxels.")
        if imageData.GetNumberOfScalarComponents() != 1:
            raise errors.InputError(
                f"The {what} '{_nodeName(volumeNode)}' has {imageData.GetNumberOfScalarComponents()} components per "
                "voxel (colour or vector image); convert it to a scalar volume first."
            )
        array = np.array(slicer.util.arrayFromVolume(volumeNode), copy=True)
        if array.ndim != 3:
            raise errors.InputError(f"The {what} '{_nodeName(volumeNode)}' is not a 3D scalar volume.")
        if volumeNode.GetParentTransformNode() is None:
            directionsRAS = vtk.vtkMatrix4x4()
            volumeNode.GetIJKToRASDirectionMatrix(directionsRAS)
            direction = _vtkMatrixToNumpy(directionsRAS)[:3, :3]
            direction[:2, :] *= -1.0  # RAS -> LPS
            spacing = tuple(float(s) for s in volumeNode.GetSpacing())
            originRAS = volumeNode.GetOrigin()
            origin = (-float(originRAS[0]), -float(originRAS[1]), float(originRAS[2]))
        else:
            matrixLPS = RAS_TO_LPS @ cls.ijkToWorldMatrix(volumeNode)
            axes = matrixLPS[:3, :3]
            spacing = tuple(float(s) for s in np.linalg.norm(axes, axis=0))
            if min(spacing) <= 0:
                raise errors.InputError(f"The {what} '{_nodeName(volumeNode)}' has a zero voxel spacing.")
            direction = axes / np.array(spacing)
            origin = tuple(float(v) for v in matrixLPS[:3, 3])
        if min(spacing) <= 0:
            raise errors.InputError(f"The {what} '{_nodeName(volumeNode)}' has a zero or negative voxel spacing.")
        if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
            raise errors.InputError(
                f"The {what} '{_nodeName(volumeNode)}' has a sheared (non-orthogonal) voxel grid, which SAM2 slices "
                "cannot represent. Resample it onto an orthogonal grid (Resample Scalar/Vector/DWI Volume) first."
            )
        return volume.Volume(array=array, spacing=spacing, origin=origin, direction=direction)

    @classmethod
    def segmentMaskOnVolume(cls, segmentationNode, segmentId, volumeNode):
        """Boolean [k, j, i] mask of one segment resampled (nearest neighbour) onto a volume's voxel grid.

        Works whatever the segmentation's own geometry, source representation or transforms: Slicer converts the
        segment to a binary labelmap in world coordinates, which is then resampled onto the volume's grid.
        """
        errors = _errors()
        labelmap = slicer.vtkOrientedImageData()
        if not slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(
            segmentationNode, segmentId, labelmap, True
        ):
            raise errors.InputError(
                f"Segment '{segmentId}' of '{_nodeName(segmentationNode)}' cannot be converted to a binary labelmap."
            )
        dims = volumeNode.GetImageData().GetDimensions()
        mask = np.zeros((dims[2], dims[1], dims[0]), dtype=bool)
        extent = labelmap.GetExtent()
        if extent[1] < extent[0] or extent[3] < extent[2] or extent[5] < extent[4] or labelmap.GetPointData().GetScalars() is None:
            return mask  # empty segment
        reference = slicer.vtkOrientedImageData()
        reference.SetExtent(0, dims[0] - 1, 0, dims[1] - 1, 0, dims[2] - 1)
        reference.SetImageToWorldMatrix(_numpyToVtkMatrix(cls.ijkToWorldMatrix(volumeNode)))
        resampled = slicer.vtkOrientedImageData()
        if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
            labelmap, reference, resampled, False, False, None, 0
        ):
            raise errors.InputError(
                f"Segment '{segmentId}' of '{_nodeName(segmentationNode)}' cannot be resampled onto volume "
                f"'{_nodeName(volumeNode)}'."
            )
        rext = resampled.GetExtent()
        if rext[1] < rext[0] or resampled.GetPointData().GetScalars() is None:
            return mask
        values = numpy_support.vtk_to_numpy(resampled.GetPointData().GetScalars())
        values = values.reshape(rext[5] - rext[4] + 1, rext[3] - rext[2] + 1, rext[1] - rext[0] + 1)
        # Shared labelmap layers hold several segments: this segment's voxels carry its label value.
        inside = values == segmentationNode.GetSegmentation().GetSegment(segmentId).GetLabelValue()
        # Place the resampled extent inside the volume's extent (they are equal unless the segment is smaller).
        lo = [max(rext[2 * a], 0) for a in range(3)]
        hi = [min(rext[2 * a + 1], dims[a] - 1) for a in range(3)]
        if any(h < lo_ for lo_, h in zip(lo, hi)):
            return mask
        mask[lo[2] : hi[2] + 1, lo[1] : hi[1] + 1, lo[0] : hi[0] + 1] = inside[
            lo[2] - rext[4] : hi[2] - rext[4] + 1,
            lo[1] - rext[2] : hi[1] - rext[2] + 1,
            lo[0] - rext[0] : hi[0] - rext[0] + 1,
        ]
        return mask

    # ------------------------------------------------------------------------------------------ review

    @staticmethod
    def confidenceKind(method):
        """What the per-slice score means for a method, or None if it has none."""
        return {"reverse": "pi (mean Dice on the supports, higher is better)",
                "lpips": "LPIPS distance to the matched support (lower is better)"}.get(method)

    @staticmethod
    def lowConfidenceSlices(result, method):
        """[(structure name, slice index, score)] of the slices to review first, worst first.

        reverse: pi below LOW_CONFIDENCE_PI; lpips: distance in the top (1 - LOW_CONFIDENCE_LPIPS_QUANTILE) of the run.
        """
        scores = list(result.scores or [])
        if not scores:
            return []
        if method == "reverse":
            low = [s for s in scores if s.score < LOW_CONFIDENCE_PI]
            low.sort(key=lambda s: s.score)
        elif method == "lpips":
            threshold = float(np.quantile([s.score for s in scores], LOW_CONFIDENCE_LPIPS_QUANTILE))
            low = [s for s in scores if s.score >= threshold and s.score > min(x.score for x in scores)]
            low.sort(key=lambda s: -s.score)
        else:
            return []
        return [(s.structure, int(s.slice_index), float(s.score)) for s in low]

    def sliceCenterRAS(self, volumeNode, sliceAxis, sliceIndex):
        """World RAS of the centre of one slice of a volume (slice index along the labels array axis sliceAxis)."""
        dims = volumeNode.GetImageData().GetDimensions()
        ijk = [(d - 1) / 2.0 for d in dims]
        ijk[2 - int(sliceAxis)] = float(sliceIndex)  # array axis a ([k, j, i]) is IJK axis 2 - a
        ras = self.ijkToWorldMatrix(volumeNode) @ np.array(ijk + [1.0])
        return [float(v) for v in ras[:3]]

    def jumpToSlice(self, volumeNode, sliceAxis, sliceIndex):
        """Centre all slice views on one slice of the volume."""
        r, a, s = self.sliceCenterRAS(volumeNode, sliceAxis, sliceIndex)
        slicer.vtkMRMLSliceNode.JumpAllSlices(volumeNode.GetScene(), r, a, s, slicer.vtkMRMLSliceNode.CenteredJumpSlice)

    def createConfidenceTable(self, result, method, scene, tableNode=None, chartNode=None, namePrefix="FewShotSAM2"):
        """A table (slice, one score column per structure) and a plot chart of the per-slice confidence.

        Returns (tableNode, chartNode), or (None, None) when the method gives no score.
        """
        kind = self.confidenceKind(method)
        if kind is None or not result.scores:
            return None, None
        structures = [s.name for s in result.structures]
        slices = sorted({int(s.slice_index) for s in result.scores})
        row = {k: i for i, k in enumerate(slices)}
        values = {name: np.full(len(slices), np.nan) for name in structures}
        for s in result.scores:
            if s.structure in values:
                values[s.structure][row[int(s.slice_index)]] = float(s.score)

        if tableNode is None:
            tableNode = scene.AddNewNodeByClass("vtkMRMLTableNode", scene.GenerateUniqueName(f"{namePrefix} confidence"))
        wasModifying = tableNode.StartModify()
        table = tableNode.GetTable()
        table.Initialize()
        sliceColumn = vtk.vtkIntArray()
        sliceColumn.SetName("slice")
        for k in slices:
            sliceColumn.InsertNextValue(k)
        table.AddColumn(sliceColumn)
        for name in structures:
            column = vtk.vtkDoubleArray()
            column.SetName(name)
            for v in values[name]:
                column.InsertNextValue(v)
            table.AddColumn(column)
        tableNode.Modified()
        tableNode.EndModify(wasModifying)

        if chartNode is None:
            chartNode = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", scene.GenerateUniqueName(f"{namePrefix} confidence chart"))
        for index in range(chartNode.GetNumberOfPlotSeriesNodes()):  # a reused chart: drop the previous run's series
            oldSeries = chartNode.GetNthPlotSeriesNode(index)
            if oldSeries is not None and oldSeries.GetScene() is scene:
                scene.RemoveNode(oldSeries)
        chartNode.RemoveAllPlotSeriesNodeIDs()
        chartNode.SetTitle("Per-slice confidence: " + kind)
        chartNode.SetXAxisTitle("slice")
        chartNode.SetYAxisTitle("pi" if method == "reverse" else "LPIPS distance")
        colors = {s.name: s.color for s in result.structures}
        for name in structures:
            series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", scene.GenerateUniqueName(f"{namePrefix} {name}"))
            series.SetAndObserveTableNodeID(tableNode.GetID())
            series.SetXColumnName("slice")
            series.SetYColumnName(name)
            series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
            series.SetColor(*[float(c) for c in colors[name]])
            chartNode.AddAndObservePlotSeriesNodeID(series.GetID())
        return tableNode, chartNode

    # ------------------------------------------------------------------------------------------ models

    @staticmethod
    def checkpointStatus(model="tiny", version="2.1", cache_dir=None):
        """(ready, text): whether the checkpoint is in the core's cache and a line for the GUI."""
        from fewshotsam2 import checkpoints

        path = checkpoints.cached_checkpoint(model, version, cache_dir)
        key = checkpoints.checkpoint_key(model, version)
        if path is None:
            return False, f"{key}: not downloaded"
        return True, f"{key}: ready ({path.stat().st_size / 1e6:.0f} MB, {path})"

    @staticmethod
    def downloadCheckpoint(model="tiny", version="2.1", cache_dir=None, progress=None):
        from fewshotsam2 import checkpoints

        return checkpoints.download_checkpoint(model, version, cache_dir, progress=progress)

    @staticmethod
    def importCheckpoint(path, model="tiny", version="2.1", cache_dir=None):
        from fewshotsam2 import checkpoints

        path = checkpoints.import_checkpoint(path, model, version, cache_dir)
        FewShotSAM2Logic.releaseModel()  # a model built from the previous file must not be reused
        return path

    @staticmethod
    def clearCheckpointCache(cache_dir=None):
        from fewshotsam2 import checkpoints

        removed = checkpoints.clear_cache(cache_dir)
        FewShotSAM2Logic.releaseModel()
        return removed

    # ------------------------------------------------------------------------------------------ dependencies

    @staticmethod
    def missingDependencies(method="reverse"):
        """Python packages the core needs that cannot be imported, as pip names (nothing is installed)."""
        import importlib.util

        wanted = [("torch", "torch"), ("torchvision", "torchvision"), ("sam2", SAM2_REQUIREMENT),
                  ("hydra", "hydra-core"), ("iopath", "iopath"), ("scipy", "scipy"), ("SimpleITK", "SimpleITK")]
        if method == "lpips":
            wanted.append(("lpips", LPIPS_REQUIREMENT))
        return [pipName for module, pipName in wanted if importlib.util.find_spec(module) is None]

    def installDependencies(self, method="reverse", confirm=None):
        """Install what `missingDependencies` lists, after `confirm(message) -> bool` agrees. Never silent.

        torch comes from the PyTorch extension's PyTorchUtils when present (it picks the CUDA build that fits
        the driver), else from pip. sam2 is installed without building its CUDA extension and without its
        dependency pins; its runtime dependencies follow. Returns True if Slicer should be restarted: a package
        whose module was already imported (numpy, torch, ...) got another version on disk.
        """
        missing = self.missingDependencies(method)
        if not missing:
            return False
        message = (
            "FewShotSAM2 needs these Python packages, which are not installed: " + ", ".join(missing) + ".\n\n"
            "They will be downloaded and installed now (several GB for PyTorch with CUDA; this can take minutes)."
        )
        if confirm is None or not confirm(message):
            raise RuntimeError("FewShotSAM2 cannot run without its Python packages: " + ", ".join(missing) + ".")
        versionsBefore = self._importedDistributionVersions()
        import importlib.util

        if importlib.util.find_spec("torch") is None or importlib.util.find_spec("torchvision") is None:
            self._installTorch()
        if importlib.util.find_spec("sam2") is None:
            os.environ["SAM2_BUILD_CUDA"] = "0"  # inherited by the pip process: no CUDA extension to compile
            slicer.util.pip_install(f"--no-build-isolation --no-deps {SAM2_REQUIREMENT}")
        self._pipEnsure(list(SAM2_RUNTIME_REQUIREMENTS) + list(OTHER_REQUIREMENTS))
        if method == "lpips" and importlib.util.find_spec("lpips") is None:
            slicer.util.pip_install(LPIPS_REQUIREMENT)
        importlib.invalidate_caches()
        still = self.missingDependencies(method)
        if still:
            raise RuntimeError("Installation finished but these packages still cannot be imported: " + ", ".join(still))
        versionsAfter = self._importedDistributionVersions()
        changed = sorted(name for name, version in versionsBefore.items() if versionsAfter.get(name) != version)
        if changed:
            logging.warning("FewShotSAM2: already imported packages were replaced (%s): restart Slicer", ", ".join(changed))
        return bool(changed)

    # distributions whose module may already be loaded in Slicer's Python and could be replaced by an install
    _WATCHED_DISTRIBUTIONS = {"numpy": "numpy", "scipy": "scipy", "PIL": "pillow", "torch": "torch",
                              "torchvision": "torchvision", "SimpleITK": "SimpleITK", "yaml": "PyYAML",
                              "packaging": "packaging", "tqdm": "tqdm"}

    @classmethod
    def _importedDistributionVersions(cls):
        """{distribution: installed version} for the watched packages whose module is already imported."""
        import importlib.metadata

        versions = {}
        for moduleName, distribution in cls._WATCHED_DISTRIBUTIONS.items():
            if moduleName in sys.modules:
                try:
                    versions[distribution] = importlib.metadata.version(distribution)
                except importlib.metadata.PackageNotFoundError:
                    pass
        return versions

    @staticmethod
    def _installTorch():
        try:
            import PyTorchUtils  # the PyTorch extension (EXTENSION_DEPENDS)
        except ImportError:
            PyTorchUtils = None
        if PyTorchUtils is not None:
            torchLogic = PyTorchUtils.PyTorchUtilsLogic()
            if not torchLogic.torchInstalled():
                # we asked already: no second confirmation
                torch = torchLogic.installTorch(askConfirmation=False, torchVersionRequirement=TORCH_VERSION_REQUIREMENT)
                if torch is None:
                    raise RuntimeError("PyTorch was not installed (PyTorch Util module).")
            return
        logging.info("FewShotSAM2: PyTorch extension not found, installing torch with pip (CPU/CUDA build as pip picks)")
        slicer.util.pip_install(f"torch{TORCH_VERSION_REQUIREMENT} torchvision")

    @staticmethod
    def _pipEnsure(requirements):
        """slicer.packaging.pip_ensure (Slicer >= 5.12: installs only what is missing) or slicer.util.pip_install."""
        try:
            import slicer.packaging as packaging
        except ImportError:
            packaging = None
        if packaging is not None and hasattr(packaging, "pip_ensure"):
            packaging.pip_ensure(list(requirements), prompt_install=False, prompt_restart=False, requester="FewShotSAM2")
        else:
            import importlib.metadata

            missing = []
            for requirement in requirements:
                name = requirement.split(">")[0].split("=")[0].split("<")[0].strip()
                try:
                    importlib.metadata.version(name)
                except importlib.metadata.PackageNotFoundError:
                    missing.append(requirement)
            if missing:
                slicer.util.pip_install(" ".join(f'"{r}"' if ">" in r or "<" in r else r for r in missing))


#
# FewShotSAM2Widget
#


class ProcessingState:
    """What the Segment/Cancel button does and shows."""

    IDLE = 0
    STARTING = 1
    RUNNING = 2
    CANCEL_REQUESTED = 3
    APPLYING = 4


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
        self._backgroundRun = None
        self._prepared = None
        self._pollTimer = None
        self._supportRows = []  # [(rowWidget, volumeSelector, segmentSelector)]
        self._updatingSupportRows = False
        self._lowConfidence = []
        self._lastSliceAxis = 0
        self._lastQueryVolumeNode = None

    # ------------------------------------------------------------------------------------------ setup

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/FewShotSAM2.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = FewShotSAM2Logic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.addSupportButton.connect("clicked(bool)", self.onAddSupport)
        self.ui.downloadModelButton.connect("clicked(bool)", self.onDownloadModel)
        self.ui.importModelButton.connect("clicked(bool)", self.onImportModel)
        self.ui.clearCacheButton.connect("clicked(bool)", self.onClearCache)
        self.ui.lowConfidenceTable.connect("cellClicked(int,int)", self.onLowConfidenceCellClicked)
        self.ui.showPlotButton.connect("clicked(bool)", self.onShowPlot)

        self.ui.progressBar.hide()
        self.ui.resultsCollapsibleButton.collapsed = True
        self.ui.advancedCollapsibleButton.collapsed = True

        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(self.POLL_INTERVAL_MS)
        self._pollTimer.connect("timeout()", self._onPoll)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        if self._backgroundRun is not None and not self._backgroundRun.finished.is_set():
            self._backgroundRun.requestCancel()
        if self._pollTimer is not None:
            self._pollTimer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        if self._backgroundRun is not None and not self._backgroundRun.finished.is_set():
            self._backgroundRun.requestCancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.queryVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.queryVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Widgets with a "SlicerParameterName" property in the .ui file are connected to the parameter node.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._rebuildSupportRows()
        self._onParameterNodeModified()

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        if self._parameterNode is not None and not self._updatingSupportRows:
            if len(self._supportRows) != len(self._parameterNode.supportVolumes):
                self._rebuildSupportRows()
            else:
                self._syncSupportRows()
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
                p.supportSegmentIds.append("")
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
                ids = [s for s in (p.supportSegmentIds[index] or "").split(",") if s]
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
        segmentSelector.toolTip = _("Support segmentation and the segments to copy (none checked = all).")
        segmentSelector.setCurrentNode(p.supportSegmentations[index])
        ids = [s for s in (p.supportSegmentIds[index] or "").split(",") if s]
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
                p.supportSegmentIds[index] = ",".join(segmentSelector.selectedSegmentIDs())
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
                # a helpful default: the first segmentation of the scene and its reference volume
                segmentationNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSegmentationNode")
                volumeNode = None
                if segmentationNode is not None:
                    volumeNode = segmentationNode.GetNodeReference(segmentationNode.GetReferenceImageGeometryReferenceRole())
                p.supportVolumes.append(volumeNode)
                p.supportSegmentations.append(segmentationNode)
                p.supportSegmentIds.append("")
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
            ids = [s for s in ((segmentIds[index] if index < len(segmentIds) else "") or "").split(",") if s]
            supports.append((volumeNode, segmentationNode, ids))
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
        except Exception as exc:  # the core cannot be imported yet (dependencies missing)
            ready, text = False, _("unknown (FewShotSAM2 Python packages not installed yet)")
            logging.debug(f"FewShotSAM2: checkpoint status unavailable: {exc}")
        self.ui.modelStatusLabel.text = text
        self.ui.modelStatusLabel.styleSheet = "color: green" if ready else "color: #b05000"
        self.ui.downloadModelButton.enabled = not ready and self._processingState == ProcessingState.IDLE

    def _updateSegmentButton(self):
        state = self._processingState
        button = self.ui.segmentButton
        if state == ProcessingState.IDLE:
            button.text = _("Segment")
            problems = []
            p = self._parameterNode
            if p is None or not p.queryVolume:
                problems.append(_("Select the query volume."))
            if p is None or not any(v and s for v, s, _ids in self._supportsFromParameterNode()):
                problems.append(_("Add a support: a volume, its segmentation and segments."))
            button.enabled = not problems
            button.toolTip = "\n".join(problems) if problems else _("Segment the query volume from the supports.")
        elif state == ProcessingState.STARTING:
            button.enabled = False
            button.toolTip = _("Preparing the inputs")
        elif state == ProcessingState.RUNNING:
            button.text = _("Cancel")
            button.enabled = True
            button.toolTip = _("Stop the segmentation; nothing is written")
        elif state == ProcessingState.CANCEL_REQUESTED:
            button.text = _("Cancelling...")
            button.enabled = False
        elif state == ProcessingState.APPLYING:
            button.enabled = False
            button.toolTip = _("Writing the result")
        busy = state != ProcessingState.IDLE
        for name in ("inputsCollapsibleButton", "methodCollapsibleButton", "modelCollapsibleButton",
                     "advancedCollapsibleButton", "outputsCollapsibleButton"):
            getattr(self.ui, name).enabled = not busy

    def _setProcessingState(self, state):
        self._processingState = state
        self._updateSegmentButton()
        self._updateModelStatus()

    # ------------------------------------------------------------------------------------------ segment

    def onSegmentButton(self):
        if self._processingState == ProcessingState.IDLE:
            self._startSegmentation()
        elif self._processingState == ProcessingState.RUNNING:
            self._backgroundRun.requestCancel()
            self._setProcessingState(ProcessingState.CANCEL_REQUESTED)
            self.ui.progressBar.setFormat(_("Cancelling..."))

    def _runOptions(self):
        p = self._parameterNode
        return dict(
            model=p.modelSize,
            version=p.modelVersion,
            device=p.device,
            image_size=int(p.imageSize),
            axis=p.sliceAxis,
            preset=p.intensityPreset,
            shots=int(p.shots),
            top_k=int(p.topK),
            min_score=float(p.minScore),
            augmentations=int(p.augmentations),
            lpips_net=p.lpipsNet,
        )

    def _ensureDependencies(self):
        method = self._parameterNode.method
        if not self.logic.missingDependencies(method):
            return True
        restart = self.logic.installDependencies(
            method, confirm=lambda message: slicer.util.confirmOkCancelDisplay(message, windowTitle="FewShotSAM2")
        )
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
            _("The SAM2 {model} checkpoint is not downloaded yet. Download it now?").format(model=p.modelSize),
            windowTitle="FewShotSAM2",
        ):
            return False
        return self.onDownloadModel()

    def _startSegmentation(self):
        self._setProcessingState(ProcessingState.STARTING)
        started = False
        try:
            if not self._ensureDependencies() or not self._ensureCheckpoint():
                return
            p = self._parameterNode
            with slicer.util.WaitCursor():
                self._prepared = self.logic.prepare(
                    p.queryVolume, self._supportsFromParameterNode(), p.method, p.outputSegmentation, **self._runOptions()
                )
                self._backgroundRun = self.logic.startBackgroundRun(self._prepared)
            started = True
        except Exception as exc:
            self._reportError(exc, _("Segmentation could not start"))
        finally:
            if not started:
                self._setProcessingState(ProcessingState.IDLE)
        if not started:
            return
        self.ui.progressBar.setRange(0, 0)
        self.ui.progressBar.setFormat(_("Starting"))
        self.ui.progressBar.show()
        self._setProcessingState(ProcessingState.RUNNING)
        self._pollTimer.start()

    @staticmethod
    def _reportError(exc, context, excInfo=None):
        """One readable message for the user; the traceback goes to the application log."""
        from fewshotsam2.errors import InputError

        if isinstance(exc, InputError):
            logging.warning(f"FewShotSAM2: {exc}")
            message = str(exc)
        else:
            logging.error(f"FewShotSAM2: {context}", exc_info=excInfo or (type(exc), exc, exc.__traceback__))
            first = (str(exc).splitlines() or [type(exc).__name__])[0]
            message = _("{context}: {error}\nSee the application log for details.").format(context=context, error=first)
        slicer.util.errorDisplay(message, windowTitle="FewShotSAM2")

    def _onPoll(self):
        run = self._backgroundRun
        if run is None:
            self._pollTimer.stop()
            return
        stage, done, total = run.progress()
        if not run.cancelRequested:
            if total > 0:
                self.ui.progressBar.setRange(0, total)
                self.ui.progressBar.setValue(done)
                counter = f"{done}/{total}"
                # the core's stages often carry the counter already ("Encoding slice 34/120")
                self.ui.progressBar.setFormat(stage if counter in stage else f"{stage} {counter}")
            else:
                self.ui.progressBar.setRange(0, 0)
                self.ui.progressBar.setFormat(stage)
        if not run.finished.is_set():
            return
        self._pollTimer.stop()
        self._backgroundRun = None
        self._onRunFinished(run)

    def _onRunFinished(self, run):
        from fewshotsam2.errors import Cancelled

        prepared, self._prepared = self._prepared, None
        try:
            if isinstance(run.error, Cancelled):
                slicer.util.showStatusMessage(_("FewShotSAM2: cancelled, nothing was changed."), 5000)
                return
            if run.error is not None:
                self._reportError(run.error, _("Segmentation failed"), getattr(run, "traceback", None))
                return
            self._setProcessingState(ProcessingState.APPLYING)
            try:
                with slicer.util.WaitCursor():
                    outputNode = self.logic.apply(prepared, run.result)
            except Exception as exc:
                self._reportError(exc, _("The result could not be written"))
                return
            with slicer.util.tryWithErrorDisplay(_("The result was written but could not be shown."), waitCursor=True):
                if self._parameterNode is not None:
                    self._parameterNode.outputSegmentation = outputNode  # the next run writes there again
                outputNode.GetDisplayNode().SetVisibility(True)
                slicer.util.setSliceViewerLayers(background=prepared.queryVolumeNode)
                self._showResults(prepared, run.result)
                elapsed = time.time() - run.startTime
                slicer.util.showStatusMessage(_("FewShotSAM2: done in {seconds:.0f} s.").format(seconds=elapsed), 5000)
        finally:
            self.ui.progressBar.hide()
            self._setProcessingState(ProcessingState.IDLE)

    # ------------------------------------------------------------------------------------------ results

    def _showResults(self, prepared, result):
        method = prepared.options.method
        self._lastSliceAxis = int(result.slice_axis)
        self._lastQueryVolumeNode = prepared.queryVolumeNode
        # reuse the previous run's table and chart (if the user did not delete them) instead of piling up nodes
        tableNode = getattr(self, "_tableNode", None)
        chartNode = getattr(self, "_chartNode", None)
        tableNode = tableNode if tableNode is not None and tableNode.GetScene() is slicer.mrmlScene else None
        chartNode = chartNode if chartNode is not None and chartNode.GetScene() is slicer.mrmlScene else None
        self._tableNode, self._chartNode = self.logic.createConfidenceTable(
            result, method, slicer.mrmlScene, tableNode=tableNode, chartNode=chartNode
        )
        self._lowConfidence = self.logic.lowConfidenceSlices(result, method)
        table = self.ui.lowConfidenceTable
        table.clearContents()
        table.setRowCount(len(self._lowConfidence))
        table.setColumnCount(3)
        table.setHorizontalHeaderLabels([_("Segment"), _("Slice"), _("Score")])
        for row, (name, sliceIndex, score) in enumerate(self._lowConfidence):
            for column, text in enumerate((name, str(sliceIndex), f"{score:.3f}")):
                item = qt.QTableWidgetItem(text)
                item.setFlags(qt.Qt.ItemIsSelectable | qt.Qt.ItemIsEnabled)
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

    def onShowPlot(self):
        if getattr(self, "_chartNode", None) is not None:
            slicer.modules.plots.logic().ShowChartInLayout(self._chartNode)

    def onLowConfidenceCellClicked(self, row, column):
        if 0 <= row < len(self._lowConfidence) and self._lastQueryVolumeNode is not None:
            _name, sliceIndex, _score = self._lowConfidence[row]
            self.logic.jumpToSlice(self._lastQueryVolumeNode, self._lastSliceAxis, sliceIndex)

    # ------------------------------------------------------------------------------------------ models

    def onDownloadModel(self):
        p = self._parameterNode
        progressDialog = slicer.util.createProgressDialog(
            windowTitle="FewShotSAM2", labelText=_("Downloading SAM2 {model}...").format(model=p.modelSize), maximum=100
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
    """Self-test: a small synthetic volume and segmentation, SAM2 tiny with random weights at 256 pixels."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_FewShotSAM2_untrained()

    def test_FewShotSAM2_untrained(self):
        self.delayDisplay("Starting the test")
        logic = FewShotSAM2Logic()
        missing = logic.missingDependencies("propagate")
        if missing:
            # The test does not install packages (slicer.packaging skips installs in testing mode as well).
            self.delayDisplay("Skipped: FewShotSAM2 Python packages not installed: " + ", ".join(missing))
            return

        # A 48x40x12 volume with a bright ellipsoid, 1.5 x 1.2 x 3 mm voxels, LPS-like (flipped) axes.
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
        labels[5:7] = inside[5:7]  # two labeled slices: the query is its own support
        slicer.util.updateSegmentBinaryLabelmapFromArray(labels, segmentationNode, segmentId, volumeNode)

        self.delayDisplay("Segmenting")
        output = logic.segment(
            volumeNode, [(volumeNode, segmentationNode, [segmentId])], method="propagate",
            image_size=256, untrained=True, device="cpu",
        )
        self.assertIsNotNone(output)
        self.assertEqual(output.GetSegmentation().GetNumberOfSegments(), 1)
        segment = output.GetSegmentation().GetNthSegment(0)
        self.assertEqual(segment.GetName(), "blob")
        self.assertTrue(np.allclose(segment.GetColor(), [0.9, 0.2, 0.1]))
        mask = logic.segmentMaskOnVolume(output, output.GetSegmentation().GetNthSegmentID(0), volumeNode)
        self.assertEqual(mask.shape, voxels.shape)
        geometry = slicer.vtkOrientedImageData()
        output.GetBinaryLabelmapRepresentation(output.GetSegmentation().GetNthSegmentID(0), geometry)
        expected, actual = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(expected)
        geometry.GetImageToWorldMatrix(actual)
        self.assertTrue(np.allclose(_vtkMatrixToNumpy(expected), _vtkMatrixToNumpy(actual)))
        self.delayDisplay("Test passed")
