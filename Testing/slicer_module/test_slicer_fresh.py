"""What breaks on a fresh Slicer (issue 20), run on slicer-core's real MRML: an output under a transform, a run that
outlives leaving the module, dependencies that follow the run's settings (the Automatic slice range needs lpips),
a support segment converted from a closed surface, re-running into an output shown in 3D, the query as a node
reference, the self-test's skip, the Slicer 5.8 guard. Where only the application could show it (Qt, Windows), the
Slicer / PythonQt source it was checked against is named in docs/slicer-api.md.
"""

import ast
import importlib.util
import subprocess
import sys
import time
import unittest
from pathlib import Path

import numpy as np
import pytest

import slicer  # noqa: E402  (slicer-core)
import vtk  # noqa: E402
from vtk.util import numpy_support  # noqa: E402

import FewShotSAM2 as module  # noqa: E402
from fewshotsam2 import cli  # noqa: E402
from fewshotsam2.errors import InputError  # noqa: E402
from FewShotSAM2Lib import dependencies, mrml_io, process, review  # noqa: E402
from conftest import source_segment  # noqa: E402

MODULE_DIR = Path(module.__file__).resolve().parent
LABELMAP = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
CLOSED_SURFACE = slicer.vtkSegmentationConverter.GetSegmentationClosedSurfaceRepresentationName()


# ---------------------------------------------------------------------------------------------- helpers


def new_scene():
    scene = slicer.vtkMRMLScene()
    logic = slicer.vtkSlicerSegmentationsModuleLogic()  # registers the segmentation nodes and converter rules
    logic.SetMRMLScene(scene)
    scene._fewshot_keepalive = logic  # noqa: SLF001
    return scene


def matrix(array):
    return mrml_io.numpyToVtkMatrix(np.asarray(array, dtype=float))


def ijk_to_ras(node):
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return mrml_io.vtkMatrixToNumpy(m)


def small_case(scene, name="query"):
    """A 24x20x8 volume (1.5 x 1.2 x 3 mm, flipped axes) with a bright ellipsoid, and a segmentation labeling it on
    two slices: the query is its own support."""
    k, j, i = np.mgrid[0:8, 0:20, 0:24]
    inside = ((i - 12) / 7.0) ** 2 + ((j - 10) / 6.0) ** 2 + ((k - 4) / 3.0) ** 2 <= 1.0
    voxels = (100 + 800 * inside).astype(np.int16)
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    slicer.util.updateVolumeFromArray(volume, voxels)
    volume.SetSpacing(1.5, 1.2, 3.0)
    volume.SetOrigin(10.0, -20.0, 30.0)
    volume.SetIJKToRASDirections([[-1, 0, 0], [0, -1, 0], [0, 0, 1]])
    labels = np.zeros(inside.shape, np.uint8)
    labels[3:5] = inside[3:5]
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name + " labels")
    seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    image = slicer.vtkOrientedImageData()
    image.SetDimensions(24, 20, 8)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(8, 20, 24)[:] = labels
    image.SetImageToWorldMatrix(matrix(ijk_to_ras(volume)))
    sid = seg.GetSegmentation().AddEmptySegment("blob", "blob", [0.9, 0.2, 0.1])
    assert slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(image, seg, sid)
    return volume, seg, sid, labels


def fake_result(prepared, labels):
    """What the process would have read back: a label map on the query's grid (the core's Volume)."""
    return process.ProcessResult(labels=prepared.query.with_array(labels.astype(np.uint16)),
                                 structures=prepared.structures)


# ---------------------------------------------------------------------------------------------- 3: transform


def test_output_under_a_transform_gets_the_query_geometry_once():
    """The output goes under the query's transform *before* its reference geometry is set from the query, so the
    geometry is the query's own IJK-to-RAS (vtkMRMLSegmentationNode::SetReferenceImageGeometryParameterFromVolumeNode
    multiplies in the transform between the two nodes' parents: set the other way round, it is applied twice)."""
    scene = new_scene()
    volume, seg, sid, labels = small_case(scene)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "moved")
    angle = np.deg2rad(25)
    moved = np.eye(4)
    moved[:3, :3] = [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
    moved[:3, 3] = [40.0, -15.0, 7.0]
    transform.SetMatrixTransformToParent(matrix(moved))
    for node in (volume, seg):
        node.SetAndObserveTransformNodeID(transform.GetID())

    logic = module.FewShotSAM2Logic()
    prepared = logic.prepare(volume, [(volume, seg, [sid])], "propagate")
    np.testing.assert_array_equal(prepared.supports[0].labels.volume.array, labels)
    output = logic.apply(prepared, fake_result(prepared, labels))

    assert output.GetTransformNodeID() == transform.GetID()
    geometry = output.GetSegmentation().GetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName())
    expected = slicer.vtkSegmentationConverter.SerializeImageGeometry(matrix(ijk_to_ras(volume)), volume.GetImageData())
    assert geometry == expected  # the local grid: Segment Editor edits on the query's voxels
    twice = slicer.vtkSegmentationConverter.SerializeImageGeometry(matrix(moved @ ijk_to_ras(volume)),
                                                                   volume.GetImageData())
    assert geometry != twice
    # and through world coordinates the result lies on the query's voxels
    out_id = output.GetSegmentation().GetNthSegmentID(0)
    np.testing.assert_array_equal(logic.segmentMaskOnVolume(output, out_id, volume), labels == 1)


# ---------------------------------------------------------------------------------------------- 4, 10: widget lifetime


def sleeping_job(tmp_path):
    """A real process standing in for a long run (the runner's own process handling, folder in tmp_path)."""
    runner = process.SegmentationProcess(parent=str(tmp_path))
    runner.process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    return module.FewShotSAM2Job(None, runner)


@pytest.mark.slow  # starts a process
def test_leaving_the_module_keeps_the_run_and_cleanup_stops_it(tmp_path):
    widget = module.FewShotSAM2Widget()  # slicer-core: the inert base; exit/cleanup touch no Qt
    widget.logic = module.FewShotSAM2Logic()
    job = sleeping_job(tmp_path)
    widget._job = job
    try:
        widget.exit()  # the user opens Data or Segment Editor
        time.sleep(0.2)
        assert widget._job is job and job.process.process.poll() is None and job.process.folder.is_dir()
        widget.cleanup()  # Slicer closes (or Reload)
        assert widget._job is None
        assert job.process.process.poll() is not None  # killed
        assert not job.process.folder.exists()
    finally:
        if job.process.process.poll() is None:
            job.process.process.kill()


class _PythonQtSignals:
    """slicer.app's connect/disconnect as PythonQt implements them (the application cannot run here):
    PythonQtStdDecorators::connect(sender, signal, callable) adds a handler, disconnect(sender, signal, callable)
    removes the first one whose callable compares equal (PythonQtSignalTarget::isSame: PyObject_RichCompareBool
    Py_EQ; bound methods of one object are equal)."""

    def __init__(self):
        self.handlers = []

    def connect(self, signal, callable_):
        self.handlers.append((signal, callable_))
        return True

    def disconnect(self, signal, callable_):
        for index, (s, c) in enumerate(self.handlers):
            if s == signal and c == callable_:
                del self.handlers[index]
                return True
        return False

    def emit(self, signal):
        for s, c in list(self.handlers):
            if s == signal:
                c()


@pytest.mark.slow  # starts a process
def test_reload_does_not_stack_quit_connections(monkeypatch, tmp_path):
    """Reload = the old widget's cleanup() (slicer.util.reloadScriptedModule), then a new widget's setup(): one
    aboutToQuit handler at any time, the newest widget's; quitting stops its run."""
    app = _PythonQtSignals()
    monkeypatch.setattr(slicer, "app", app, raising=False)
    monkeypatch.setattr(module, "SLICER_APPLICATION", True)
    widget = None
    for _reload in range(4):
        if widget is not None:
            widget.cleanup()
        widget = module.FewShotSAM2Widget()
        widget.logic = module.FewShotSAM2Logic()
        widget._connectApplication()
        widget._connectApplication()  # idempotent
        assert len(app.handlers) == 1 and app.handlers[0][1].__self__ is widget
    job = sleeping_job(tmp_path)
    widget._job = job
    app.emit("aboutToQuit()")
    assert job.process.process.poll() is not None and not job.process.folder.exists()
    widget.cleanup()
    assert app.handlers == []


# ---------------------------------------------------------------------------------------------- 1, 2: dependencies


def test_dependencies_follow_what_the_run_needs():
    lpips_line = "lpips==0.1.4 is not installed"
    with pytest.MonkeyPatch.context() as m:
        m.setitem(sys.modules, "lpips", None)  # lpips not installed (find_spec answers None, import fails)
        assert lpips_line not in dependencies.missingDependencies("reverse", "off")
        assert lpips_line not in dependencies.missingDependencies("propagate", "3:9")
        for method, slice_range in (("reverse", "auto"), ("propagate", "1=auto,off"), ("lpips", "off"), (None, "off")):
            assert lpips_line in dependencies.missingDependencies(method, slice_range), (method, slice_range)
    assert dependencies.missingDependencies("reverse", "auto") == []  # this environment has everything


def test_backbone_weights_are_looked_for_where_torch_keeps_them(monkeypatch, tmp_path):
    import torch
    import torchvision

    monkeypatch.delenv(dependencies.LPIPS_WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert dependencies.torchHubCheckpoints() == Path(torch.hub.get_dir()) / "checkpoints"
    for net, weights in (("alex", torchvision.models.AlexNet_Weights), ("vgg", torchvision.models.VGG16_Weights),
                         ("squeeze", torchvision.models.SqueezeNet1_1_Weights)):
        assert weights.IMAGENET1K_V1.url.endswith("/" + dependencies.LPIPS_BACKBONE_WEIGHTS[net][0])
    assert dependencies.missingWeights("reverse", "off") == []
    assert dependencies.missingWeights("reverse", "auto") == ["alex"]
    assert dependencies.missingWeights(None) == ["alex"]
    assert dependencies.missingWeights("lpips", "auto", "vgg") == ["alex", "vgg"]
    assert dependencies.missingWeights("reverse", "auto", lpipsWeights="alexnet_features.pth") == []
    folder = dependencies.torchHubCheckpoints()
    folder.mkdir(parents=True)
    (folder / "alexnet-owt-7be5be79.pth").write_bytes(b"")
    assert dependencies.missingWeights("reverse", "auto") == []
    assert "233 MB" in dependencies.weightsLine(["alex"])


@pytest.mark.parametrize("missing", ["lpips", "slicerio"])
def test_estimate_with_a_missing_package_says_so_and_starts_nothing(missing, tmp_path):
    """Estimate checks what `fewshotsam2 extent` needs (lpips) and what writing its inputs needs here (slicerio:
    the .seg.nrrd labels) before anything is written or started."""
    scene = new_scene()
    volume, seg, sid, _labels = small_case(scene)
    logic = module.FewShotSAM2Logic()
    logic.temporaryFolder = str(tmp_path)
    with pytest.MonkeyPatch.context() as m:
        m.setitem(sys.modules, missing, None)
        with pytest.raises(InputError, match=f"cannot run yet: .*{missing}[=0-9.]* is not installed"):
            logic.startSliceRangeEstimate(volume, [(volume, seg, [sid])])
        # a segmentation with the Automatic slice range needs lpips too; with Off it does not
        prepared = logic.prepare(volume, [(volume, seg, [sid])], "propagate", slice_range="auto")
        with pytest.raises(InputError, match=f"{missing}[=0-9.]* is not installed"):
            logic.start(prepared)
    assert list(tmp_path.iterdir()) == []  # no job folder, no process


def _core_job(tmp_path):
    scene = new_scene()
    volume, seg, sid, _labels = small_case(scene)
    prepared = module.FewShotSAM2Logic().prepare(volume, [(volume, seg, [sid])], "propagate")
    return process.writeJobInputs(tmp_path, prepared.query, prepared.supports, prepared.structures)


def test_core_without_lpips_fails_with_one_clear_line(tmp_path, capsys):
    """The core itself: `extent` and `segment --slice-range auto` without lpips end with exit code 2 and one
    `fewshotsam2: error:` line that names lpips and the way out, never a ModuleNotFoundError traceback."""
    arguments = _core_job(tmp_path)
    out = tmp_path / "out.nrrd"
    with pytest.MonkeyPatch.context() as m:
        m.setitem(sys.modules, "lpips", None)
        assert cli.main(["extent", *arguments, "--json"]) == 2
        extent_err = capsys.readouterr().err
        assert cli.main(["segment", *arguments, "--method", "propagate", "--slice-range", "auto", "--untrained",
                         "--image-size", "64", "--device", "cpu", "--out", str(out)]) == 2
        segment_err = capsys.readouterr().err
    for err in (extent_err, segment_err):
        lines = [line for line in err.splitlines() if line.strip()]
        assert lines[-1].startswith("fewshotsam2: error: the Python package 'lpips' is not installed"), err
        assert "--slice-range off" in lines[-1] and "Traceback" not in err
    assert not out.exists()


# ---------------------------------------------------------------------------------------------- 9: MRML details


def test_closed_surface_segment_is_converted_on_the_support_grid():
    """A support segment whose source is a closed surface (label value 5 from an earlier labelmap life) is
    converted on the support volume's 1 mm grid, not the segmentation's 6 mm reference geometry, and read as its
    converted voxels (value 1), not compared with GetLabelValue() (which made it 'empty')."""
    scene = new_scene()
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "fine")
    slicer.util.updateVolumeFromArray(volume, np.zeros((40, 40, 40), np.int16))  # 1 mm, RAS = IJK
    coarse = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "coarse")
    slicer.util.updateVolumeFromArray(coarse, np.zeros((7, 7, 7), np.int16))
    coarse.SetSpacing(6.0, 6.0, 6.0)
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "ball")
    seg.SetReferenceImageGeometryParameterFromVolumeNode(coarse)
    seg.GetSegmentation().SetSourceRepresentationName(CLOSED_SURFACE)  # e.g. a model imported as a segment
    sphere = vtk.vtkSphereSource()
    sphere.SetCenter(20.0, 20.0, 20.0)
    sphere.SetRadius(9.0)
    sphere.SetThetaResolution(64)
    sphere.SetPhiResolution(64)
    sphere.Update()
    sid = seg.AddSegmentFromClosedSurfaceRepresentation(sphere.GetOutput(), "ball", [0.2, 0.8, 0.2])
    seg.GetSegmentation().GetSegment(sid).SetLabelValue(5)
    assert seg.GetSegmentation().GetSourceRepresentationName() == CLOSED_SURFACE
    # what Slicer's own conversion gives: the segmentation's 6 mm grid, voxels of value 1
    slicers = slicer.vtkOrientedImageData()
    assert slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(seg, sid, slicers, True)
    assert np.allclose(slicers.GetSpacing(), 6.0)
    assert set(np.unique(numpy_support.vtk_to_numpy(slicers.GetPointData().GetScalars()))) <= {0, 1}

    mask = mrml_io.segmentMaskOnVolume(seg, sid, volume)
    k, j, i = np.mgrid[0:40, 0:40, 0:40]
    distance = np.sqrt((i - 20.0) ** 2 + (j - 20.0) ** 2 + (k - 20.0) ** 2)
    assert mask[distance <= 8.0].all() and not mask[distance >= 10.0].any()
    assert abs(mask.sum() - 4 / 3 * np.pi * 9.0 ** 3) / mask.sum() < 0.1
    prepared = module.FewShotSAM2Logic().prepare(volume, [(volume, seg, [sid])], "propagate")
    np.testing.assert_array_equal(prepared.supports[0].labels.volume.array != 0, mask)


def test_rerun_into_an_output_shown_in_3d_keeps_its_surface():
    scene = new_scene()
    volume, seg, sid, labels = small_case(scene)
    logic = module.FewShotSAM2Logic()
    prepared = logic.prepare(volume, [(volume, seg, [sid])], "propagate")
    output = logic.apply(prepared, fake_result(prepared, labels))
    assert not mrml_io.hasClosedSurface(output)
    logic.showIn3D(output)  # the Show 3D button
    assert mrml_io.hasClosedSurface(output)
    again = logic.prepare(volume, [(volume, seg, [sid])], "propagate", outputSegmentationNode=output)
    shrunk = labels.copy()
    shrunk[4] = 0
    assert logic.apply(again, fake_result(again, shrunk)) is output
    assert mrml_io.hasClosedSurface(output)
    surface = output.GetSegmentation().GetNthSegment(0).GetRepresentation(CLOSED_SURFACE)
    assert surface is not None and surface.GetNumberOfPoints() > 0
    np.testing.assert_array_equal(
        logic.segmentMaskOnVolume(output, output.GetSegmentation().GetNthSegmentID(0), volume), shrunk == 1)
    logic.showIn3D(output, False)
    assert not mrml_io.hasClosedSurface(output)


def test_output_refers_to_its_query_by_reference_across_a_scene_import(tmp_path):
    """The query is a node reference (renamed with the node on import), not an ID in an attribute."""
    scene = new_scene()
    volume, seg, sid, labels = small_case(scene)
    logic = module.FewShotSAM2Logic()
    prepared = logic.prepare(volume, [(volume, seg, [sid])], "propagate")
    output = logic.apply(prepared, fake_result(prepared, labels))
    assert logic.queryVolumeOf(output) is volume
    assert output.GetAttribute("FewShotSAM2.QueryVolumeID") is None
    scene.SetURL(str(tmp_path / "scene.mrml"))
    assert scene.Commit()

    target = new_scene()
    already = target.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "already here")
    assert already.GetID() == volume.GetID()  # the clash the import resolves by renaming
    target.SetURL(str(tmp_path / "scene.mrml"))
    assert target.Import()
    imported_output = target.GetFirstNodeByName(output.GetName())
    imported_query = target.GetFirstNodeByName("query")
    assert imported_query.GetID() != already.GetID()
    assert logic.queryVolumeOf(imported_output) is imported_query


# ---------------------------------------------------------------------------------------------- 7: self-test skip


def test_self_test_skip_is_shown_not_raised(monkeypatch):
    """Reload and Test calls runTest() without a unittest runner: the SAM2 part's skipTest is shown as a message."""
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(dependencies.importlib.util, "find_spec",
                        lambda name, *a: None if name == "torch" else real_find_spec(name, *a))

    class Runner(unittest.TestCase):
        def runTest(self):
            pass

        def delayDisplay(self, message, *args, **kwargs):
            self.messages.append(message)

    runner = Runner()
    runner.messages = []
    module.FewShotSAM2Test._runOrShowSkip(runner, lambda: module.FewShotSAM2Test.test_FewShotSAM2_untrained(runner))
    assert any(m.startswith("Skipped") and "torch is not installed" in m for m in runner.messages), runner.messages


# ---------------------------------------------------------------------------------------------- 5: Slicer 5.8


def test_slicer_5_8_is_refused_with_a_message():
    problem = dependencies.pythonProblem((3, 9, 10))  # Slicer 5.8.x ships Python 3.9.10
    assert "3D Slicer 5.10 or later" in problem and "Python 3.9.10" in problem
    assert dependencies.pythonProblem((3, 12, 10)) is None  # Slicer 5.10 and 5.12
    assert dependencies.missingDependencies.__defaults__ is not None
    # the files Slicer 5.8 loads to show that message must parse with Python 3.9's grammar
    for path in [MODULE_DIR / "FewShotSAM2.py", *sorted((MODULE_DIR / "FewShotSAM2Lib").glob("*.py")),
                 MODULE_DIR / "fewshotsam2" / "constants.py"]:
        ast.parse(path.read_text(encoding="utf-8"), str(path), feature_version=(3, 9))


def test_widget_shows_the_slicer_requirement_before_building_the_panel():
    source = (MODULE_DIR / "FewShotSAM2.py").read_text(encoding="utf-8")
    tree = ast.parse(source)
    widget = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "FewShotSAM2Widget")
    setup = source_segment(source, next(n for n in widget.body if getattr(n, "name", "") == "setup"))
    assert setup.index("dependencies.pythonProblem()") < setup.index("slicer.util.loadUI")
    runTest = source_segment(source, next(
        n for n in next(c for c in tree.body if getattr(c, "name", "") == "FewShotSAM2Test").body
        if getattr(n, "name", "") == "runTest"))
    assert "pythonProblem()" in runTest and "_runOrShowSkip(self.test_FewShotSAM2_untrained)" in runTest


# ---------------------------------------------------------------------------------------------- 8, 10: process


def test_run_environment_and_job_folder(tmp_path):
    env = process.coreEnvironment()
    assert env["PYTHONIOENCODING"] == "utf-8"  # Windows would write the ANSI code page
    assert env["PYTORCH_ENABLE_MPS_FALLBACK"] == "1"
    assert env["PYTHONPATH"].split(process.os.pathsep)[0] == str(process.coreFolder())
    runner = process.SegmentationProcess(parent=str(tmp_path / "slicer-temp"))  # Slicer's temporary folder
    assert runner.folder.parent == tmp_path / "slicer-temp" and runner.folder.is_dir()
    (runner.folder / "result.nrrd").write_bytes(b"x")
    runner.cleanup()
    assert not runner.folder.exists()


def test_a_pip_installed_core_that_shadows_the_module_is_named(tmp_path, monkeypatch):
    assert process.coreMismatch() is None  # the tests import the module's own copy
    (tmp_path / "fewshotsam2").mkdir()
    (tmp_path / "fewshotsam2" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "fewshotsam2")  # find_spec answers from sys.modules otherwise
    problem = process.coreMismatch()
    assert problem and str(tmp_path / "fewshotsam2") in problem and "pip_uninstall('fewshotsam2')" in problem


def test_windows_process_flags_in_the_source():
    """Windows cannot run here: the flags are checked in the source (subprocess.CREATE_NO_WINDOW for the run, the
    checkpoint import and taskkill; a bounded wait; the Job Object; see docs/slicer-api.md)."""
    text = (MODULE_DIR / "FewShotSAM2Lib" / "process.py").read_text(encoding="utf-8")
    assert "subprocess.CREATE_NO_WINDOW" in text
    assert text.count("**_windowsNoWindow()") == 2 and 'kwargs.update(_windowsNoWindow())' in text
    assert "process.wait(timeout=KILL_WAIT_S)" in text and "timeout=KILL_WAIT_S" in text.split("taskkill")[1]
    assert "windows_job.killOnCloseJob(self.process)" in text
    job = (MODULE_DIR / "FewShotSAM2Lib" / "windows_job.py").read_text(encoding="utf-8")
    assert "JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE = 0x2000" in job
    from FewShotSAM2Lib import windows_job

    assert windows_job.killOnCloseJob(object()) is None if process.os.name != "nt" else True


# ---------------------------------------------------------------------------------------------- Also: review


def test_low_confidence_colours_run_from_red_to_yellow():
    reverse = review.confidenceColors([0.1, 0.3, 0.45])  # pi: higher is better
    assert reverse[0] == (255, 90, 90) and reverse[-1] == (255, 220, 90)
    lpips = review.confidenceColors([0.9, 0.7], higherIsBetter=False)  # distance: lower is better
    assert lpips[0] == (255, 90, 90) and lpips[-1] == (255, 220, 90)
    assert review.confidenceColors([0.2]) == [(255, 155, 90)]


# ---------------------------------------------------------------------------------------------- 11: sample data


def test_sample_support_segments_are_named_liver_and_spleen(shared_dir):
    """The support sample's label map becomes segments "liver" and "spleen" (not Label_5 / Label_1), each exactly
    its label value's voxels; both samples load through their customDownloader (SampleData's widget calls it)."""
    from FewShotSAM2Lib import sample_data

    scene = new_scene()
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "ct-a labels (label map)")
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(shared_dir / "data" / "abdomen-ct" / "ct-a" / "labels.nii.gz"))
    storage.SetCenterImage(False)
    assert storage.ReadData(labelmap)
    segmentation = sample_data.namedSegmentation(scene, labelmap, "ct-a labels")
    segments = segmentation.GetSegmentation()
    names = [segments.GetNthSegment(n).GetName() for n in range(segments.GetNumberOfSegments())]
    assert names == ["liver", "spleen"]
    labels = slicer.util.arrayFromVolume(labelmap)
    for value, name in ((5, "liver"), (1, "spleen")):
        sid = segments.GetSegmentIdBySegmentName(name)
        np.testing.assert_array_equal(mrml_io.segmentMaskOnVolume(segmentation, sid, labelmap), labels == value)
    support, query = sample_data.sampleSources(module.FewShotSAM2SampleData.downloadSupport,
                                               module.FewShotSAM2SampleData.downloadQuery)
    assert support["customDownloader"] is module.FewShotSAM2SampleData.downloadSupport
    assert query["customDownloader"] is module.FewShotSAM2SampleData.downloadQuery
    source = (MODULE_DIR / "FewShotSAM2.py").read_text(encoding="utf-8")
    assert "sample_data.register(FewShotSAM2SampleData.downloadSupport, FewShotSAM2SampleData.downloadQuery)" in source
    assert "sample_data.QUERY_FOLDER" in source  # the series in a folder of its own


# ---------------------------------------------------------------------------------------------- 6: torch install


def test_torch_is_installed_in_a_pythonslicer_process_never_imported_here(monkeypatch):
    """light-the-torch runs as `PythonSlicer -m light_the_torch install ...` (slicer.util.executePythonModule, a
    process of its own), never PyTorchUtils.installTorch, which imports light_the_torch and torch into Slicer. The
    calls are recorded instead of downloading gigabytes; with torch 2.5.1+cu121 installed only torchvision is
    added, pinned to torch==2.5.1 (no local tag)."""
    calls = []
    for name in ("executePythonModule", "_executePythonModule"):  # 5.12 / 5.10
        monkeypatch.setattr(slicer.util, name, lambda module, args: calls.append(("run", module, list(args))),
                            raising=False)
    monkeypatch.setattr(dependencies, "_pipInstall", lambda args: calls.append(("pip", list(args))))
    real_find_spec, real_version = importlib.util.find_spec, dependencies._version
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "light_the_torch" else real_find_spec(name, *a))
    monkeypatch.setattr(dependencies, "_version", lambda name: "2.5.1+cu121" if name == "torch" else real_version(name))
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)  # even with the PyTorch extension it is not used
    dependencies.installTorch()
    assert calls == [("pip", [dependencies.LIGHT_THE_TORCH_REQUIREMENT]),
                     ("run", "light_the_torch", ["install", "torch==2.5.1", "torchvision"])]
    assert "light_the_torch" not in sys.modules  # nothing of it imported into this process
    calls.clear()
    monkeypatch.setattr(dependencies, "_version", lambda name: None if name == "torch" else real_version(name))
    monkeypatch.setattr(dependencies, "torchProblem", lambda: "torch is not installed")
    dependencies.installTorch()
    assert calls[-1] == ("run", "light_the_torch", ["install", "torch>=2.5.1,<3", "torchvision"])
    text = (MODULE_DIR / "FewShotSAM2Lib" / "dependencies.py").read_text(encoding="utf-8")
    assert "PyTorchUtilsLogic" not in text and "import light_the_torch" not in text


def test_manual_ranges_for_every_structure_need_no_lpips():
    """The Manual table names every structure: its trailing default "auto" is unused, so lpips is not needed."""
    scene = new_scene()
    volume, seg, sid, _labels = small_case(scene)
    logic = module.FewShotSAM2Logic()
    manual = logic.prepare(volume, [(volume, seg, [sid])], "propagate", slice_range="auto",
                           slice_ranges={"blob": (2, 5)})
    assert manual.options["slice_range"] == "1=2:5,auto"
    assert logic._estimatedSliceRange(manual.options["slice_range"], manual.structures) == "off"
    for text, expected in (("auto", "auto"), ("off", "off"), ("1=auto,off", "auto"), ("blob=3:4,auto", "off"),
                           (None, "off")):
        assert logic._estimatedSliceRange(text, manual.structures) == expected, text


# ---------------------------------------------------------------------------------------------- 10: GUI (source)


def _widget_methods():
    source = (MODULE_DIR / "FewShotSAM2.py").read_text(encoding="utf-8")
    tree = ast.parse(source)
    widget = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "FewShotSAM2Widget")
    return {n.name: source_segment(source, n) for n in widget.body if isinstance(n, ast.FunctionDef)}


def test_gui_waits_are_modal_and_survive_a_scene_close():
    """The Qt side cannot run here: the download and installation dialogs are modal (createProgressDialog sets
    any QProgressDialog property it is given), the installation is announced, a scene closed while pip ran stops
    the start, and Estimate asks for what the estimate needs (docs/slicer-api.md)."""
    methods = _widget_methods()
    assert "windowModality=qt.Qt.WindowModal" in methods["onDownloadModel"]
    ensure = methods["_ensureDependencies"]
    assert "windowModality=qt.Qt.WindowModal" in ensure and "maximum=0" in ensure
    assert ensure.index("installDependencies(") < ensure.index("if self._parameterNode is None:")
    assert "self._ensureDependencies(None)" in methods["onEstimateRanges"]
    # Run on: server estimates there (extent --server): nothing to install here, the server is handed to the Logic
    assert "server is None and not self._ensureDependencies(None)" in methods["onEstimateRanges"]
    assert "server = self._remotePanel.server()" in methods["onEstimateRanges"]
    assert "server=server" in methods["onEstimateRanges"]
    assert methods["onEstimateRanges"].index("_ensureDependencies") < methods["onEstimateRanges"].index(
        "startSliceRangeEstimate")
    assert "self.logic.temporaryFolder = str(slicer.app.temporaryPath)" in methods["setup"]
    assert "self._showCoreMismatch()" in methods["setup"]
    assert "self.ui.show3DButton.connect(\"toggled(bool)\", self.onShow3D)" in methods["setup"]
    assert "review.confidenceColors(" in methods["_showResults"]


def test_low_confidence_slices_are_marked_in_the_slice_views():
    """One locked point per low-confidence slice, on that slice, at the structure's centre there (a point list is
    drawn only on the slice it lies on, so it marks exactly the slices to check)."""
    scene = new_scene()
    volume, seg, sid, labels = small_case(scene)
    logic = module.FewShotSAM2Logic()
    prepared = logic.prepare(volume, [(volume, seg, [sid])], "propagate")
    result = fake_result(prepared, labels)
    low = [("blob", 3, 0.21), ("blob", 6, 0.4)]  # slice 6 has no mask: its centre
    node = logic.markLowConfidenceSlices(result, low, volume, 0)
    assert node.GetNumberOfControlPoints() == 2
    to_ijk = np.linalg.inv(mrml_io.ijkToWorldMatrix(volume))
    points = []
    for n in range(2):
        ras = [0.0, 0.0, 0.0]
        node.GetNthControlPointPosition(n, ras)
        points.append(to_ijk @ np.array(ras + [1.0]))
        assert node.GetNthControlPointLocked(n)
    rows, cols = np.nonzero(labels[3] == 1)
    np.testing.assert_allclose(points[0][:3], [cols.mean(), rows.mean(), 3.0], atol=1e-9)  # (i, j, k)
    np.testing.assert_allclose(points[1][:3], [11.5, 9.5, 6.0], atol=1e-9)
    assert node.GetNthControlPointLabel(0) == "blob 3: 0.21"
    again = logic.markLowConfidenceSlices(result, low[:1], volume, 0, node)  # a re-run reuses the node
    assert again is node and node.GetNumberOfControlPoints() == 1
    assert logic.markLowConfidenceSlices(result, [], volume, 0, node) is node and node.GetNumberOfControlPoints() == 0


def test_low_confidence_mark_of_a_kept_overlap_comes_from_its_own_layer():
    """A "Keep overlaps" result (overlap 'allow'): a structure covered on a slice by another one listed after it
    is marked at its own centre there (its layer), not at the slice centre of the flattened label map."""
    from fewshotsam2.io.volume import LabelMap, Structure

    scene = new_scene()
    volume, seg, sid, labels = small_case(scene)
    logic = module.FewShotSAM2Logic()
    prepared = logic.prepare(volume, [(volume, seg, [sid])], "propagate", overlap="allow")
    blob = labels == 1
    blob[3, :, :10] = False  # off-centre on slice 3, so its centre differs from the covering structure's
    cover = np.zeros_like(blob)
    cover[3] = True  # the whole of slice 3: covers the blob there
    layered = LabelMap.from_masks(prepared.query, [(Structure(1, "blob", (0.9, 0.2, 0.1)), blob),
                                                     (Structure(2, "cover", (0.1, 0.2, 0.9)), cover)])
    assert layered.volume.layers is not None and not (layered.volume.array[3] == 1).any()
    result = process.ProcessResult(labels=layered.volume, structures=layered.structures)
    node = logic.markLowConfidenceSlices(result, [("blob", 3, 0.2)], volume, 0)
    ras = [0.0, 0.0, 0.0]
    node.GetNthControlPointPosition(0, ras)
    point = np.linalg.inv(mrml_io.ijkToWorldMatrix(volume)) @ np.array(ras + [1.0])
    rows, cols = np.nonzero(blob[3])
    np.testing.assert_allclose(point[:3], [cols.mean(), rows.mean(), 3.0], atol=1e-9)  # (i, j, k)


def test_another_interpreter_is_checked_only_for_what_slicer_writes(tmp_path):
    """With FewShotSAM2Logic.python set, the core's packages live in that interpreter: here only SimpleITK and
    slicerio (writing the job files) are checked."""
    scene = new_scene()
    volume, seg, sid, _labels = small_case(scene)
    logic = module.FewShotSAM2Logic()
    logic.python = sys.executable
    logic.temporaryFolder = str(tmp_path)
    prepared = logic.prepare(volume, [(volume, seg, [sid])], "propagate", slice_range="auto")
    with pytest.MonkeyPatch.context() as m:
        m.setitem(sys.modules, "slicerio", None)
        with pytest.raises(InputError, match="cannot write the job files: slicerio is not installed"):
            logic.start(prepared)
    with pytest.MonkeyPatch.context() as m:
        m.setitem(sys.modules, "lpips", None)  # lpips is the other interpreter's business
        logic.checkDependencies("propagate", "auto", ownProcessOnly=True)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------- 1: the GUI's default run


@pytest.mark.slow  # the segmentation process (SAM2 random weights at 64 px, AlexNet LPIPS for the range)
def test_the_panels_default_run_goes_through(shared_dir, monkeypatch):
    """The panel's defaults (reverse, slice range Automatic), which the Logic's own default (off) used to hide:
    the dependency check passes, the range is estimated (no "estimation is off" warning) and the result is
    written. Random weights at 64 px: the masks mean nothing, the plumbing does."""
    weights = shared_dir / "weights" / "lpips" / "alexnet_features.pth"
    monkeypatch.setenv("FEWSHOTSAM2_LPIPS_WEIGHTS", str(weights))  # offline: the AlexNet backbone from the file
    hints = module.FewShotSAM2ParameterNode.__annotations__
    assert "sliceRangeMode" in hints and module.FewShotSAM2ParameterNode.sliceRangeMode == "auto"
    assert module.FewShotSAM2ParameterNode.method == "reverse"
    scene = new_scene()
    volume, seg, sid, labels = small_case(scene)
    logic = module.FewShotSAM2Logic()
    assert logic.missingDependencies("reverse", "auto") == [] and logic.missingWeights("reverse", "auto") == []
    output = logic.segment(volume, [(volume, seg, [sid])], method="reverse", slice_range="auto", top_k=2,
                           image_size=64, untrained=True, device="cpu")
    assert output.GetSegmentation().GetNumberOfSegments() == 1
    assert not any("estimation is off" in w for w in logic.lastResult.warnings), logic.lastResult.warnings
    assert logic.lastResult.labels.array.shape == labels.shape
