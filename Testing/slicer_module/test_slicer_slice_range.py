"""Slice ranges in the Slicer Logic on slicer-core's MRML: the estimate equals the core's `extent` on the same
files, runs in a process of its own that is polled and can be cancelled, a slice index maps to the right RAS
position, a per-structure range reaches the segmentation process, and the Slice range table is saved with the
scene (parameter node) and read back only for its own query."""

import json
import os
import signal
import time

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")

import FewShotSAM2 as module  # noqa: E402
from test_slicer_logic import (load_volume, new_scene, process_group_alive, segment_masks,  # noqa: E402
                               segmentation_from_labelmap)

pytestmark = [pytest.mark.filterwarnings("ignore:SAM2 runs with RANDOM WEIGHTS")]


@pytest.fixture(scope="module")
def ct(shared_dir, tmp_path_factory):
    """ct-a (liver 5, spleen 1) as support, ct-b (NRRD written by SimpleITK from its DICOM) as query."""
    import SimpleITK as sitk

    data = shared_dir / "data" / "abdomen-ct"
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(data / "ct-b" / "dicom")))
    ctb = tmp_path_factory.mktemp("ctb") / "ct-b.nrrd"
    sitk.WriteImage(reader.Execute(), str(ctb))
    scene = new_scene()
    support = load_volume(scene, data / "ct-a" / "image.nii.gz", "ct-a")
    labelmap = load_volume(scene, data / "ct-a" / "labels.nii.gz", "ct-a labels", labelmap=True)
    seg, ids = segmentation_from_labelmap(scene, labelmap, {5: ("liver", (1, 0, 0)), 1: ("spleen", (0, 0, 1))},
                                          "ct-a segmentation", support)
    query = load_volume(scene, ctb, "ct-b")
    weights = str(shared_dir / "weights" / "lpips" / "alexnet_features.pth")
    return dict(data=data, ctb=ctb, support=support, seg=seg, ids=ids, query=query, weights=weights,
                supports=[(support, seg, [ids[5], ids[1]])])


@pytest.mark.slow
def test_estimate_equals_the_core_command(ct, capsys):
    from fewshotsam2.cli import main

    """The GUI's path: start returns while the process runs, polling sees it end, finish reads it and removes the
    job folder. (The blocking estimateSliceRanges, the scripting path, is checked on IBSR below.)"""
    logic = module.FewShotSAM2Logic()
    job = logic.startSliceRangeEstimate(ct["query"], ct["supports"], lpips_weights=ct["weights"])
    folder = job.process.folder
    assert isinstance(job, module.FewShotSAM2ExtentJob)
    assert not job.finished  # python + torch + LPIPS take seconds to start: start() did not wait for them
    assert job.process.command[2:4] == ["fewshotsam2.cli", "extent"] and job.process.command[-1] == "--json"
    deadline = time.time() + 300
    while not job.finished:
        assert time.time() < deadline
        time.sleep(0.1)
    got = logic.finishSliceRangeEstimate(job)
    assert not folder.exists()
    capsys.readouterr()
    assert main(["extent", "--query", str(ct["ctb"]), "--support", str(ct["data"] / "ct-a" / "image.nii.gz"),
                 str(ct["data"] / "ct-a" / "labels.nii.gz"), "--labels", "5,1", "--json",
                 "--lpips-weights", ct["weights"]]) == 0
    core = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert got["axis"] == core["axis"]
    assert list(got["ranges"]) == ["liver", "spleen"]
    assert [got["ranges"][n] for n in ("liver", "spleen")] == [(s["first"], s["last"]) for s in core["structures"]]
    n = ct["query"].GetImageData().GetDimensions()[2 - got["axis"]]
    for first, last in got["ranges"].values():
        assert 0 <= first <= last < n


@pytest.mark.slow
def test_slice_index_to_ras_lands_on_that_slice(ct):
    import vtk

    node = ct["query"]
    dims = node.GetImageData().GetDimensions()
    rasToIJK = vtk.vtkMatrix4x4()
    node.GetRASToIJKMatrix(rasToIJK)
    for axis in (0, 1, 2):
        index = dims[2 - axis] // 3
        ras = module.FewShotSAM2Logic.sliceCenterRAS(node, axis, index)
        ijk = rasToIJK.MultiplyPoint(list(ras) + [1.0])
        assert abs(ijk[2 - axis] - index) < 1e-6


@pytest.mark.slow
def test_segment_with_a_range_per_structure_leaves_background_outside(ct):
    logic = module.FewShotSAM2Logic()
    output = logic.segment(ct["query"], ct["supports"], "propagate", image_size=64, untrained=True, device="cpu",
                           slice_ranges={"liver": (8, 11)}, slice_range="off")
    masks = segment_masks(output, ct["query"])  # [k, j, i] arrays of the query
    labels = logic.lastResult.labels.array
    from fewshotsam2.slicing.slices import SlicePlan

    axis = SlicePlan.for_volume(logic.lastResult.labels).array_axis
    liver = np.moveaxis(masks["liver"], axis, 0)
    assert not np.delete(liver, range(8, 12), axis=0).any()
    assert labels.shape == masks["liver"].shape


@pytest.mark.slow
def test_a_range_for_an_unselected_segment_is_refused(ct):
    from fewshotsam2.errors import InputError

    with pytest.raises(InputError, match="kidney"):
        module.FewShotSAM2Logic().prepare(ct["query"], ct["supports"], "propagate", untrained=True,
                                          slice_ranges={"kidney": (1, 2)})


@pytest.mark.slow
def test_estimate_equals_the_core_command_on_a_non_trivial_range(shared_dir, capsys):
    """IBSR 01 -> 03: slices run along numpy axis 1 and CSF's range is a strict part of the volume."""
    from fewshotsam2.cli import main

    data = shared_dir / "data" / "brain-mr"
    weights = str(shared_dir / "weights" / "lpips" / "alexnet_features.pth")
    scene = new_scene()
    support = load_volume(scene, data / "ibsr-01" / "image.nii.gz", "ibsr-01")
    labelmap = load_volume(scene, data / "ibsr-01" / "labels.nii.gz", "ibsr-01 labels", labelmap=True)
    seg, ids = segmentation_from_labelmap(scene, labelmap, {1: ("csf", (0, 0, 1)), 3: ("wm", (1, 1, 1))},
                                          "ibsr-01 segmentation", support)
    query = load_volume(scene, data / "ibsr-03" / "image.nii.gz", "ibsr-03")
    got = module.FewShotSAM2Logic().estimateSliceRanges(query, [(support, seg, [ids[1], ids[3]])],
                                                        lpips_weights=weights)
    capsys.readouterr()
    assert main(["extent", "--query", str(data / "ibsr-03" / "image.nii.gz"), "--support",
                 str(data / "ibsr-01" / "image.nii.gz"), str(data / "ibsr-01" / "labels.nii.gz"), "--labels", "1,3",
                 "--json", "--lpips-weights", weights]) == 0
    core = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert got["axis"] == core["axis"]
    assert [got["ranges"][n] for n in ("csf", "wm")] == [(s["first"], s["last"]) for s in core["structures"]]
    n = query.GetImageData().GetDimensions()[2 - got["axis"]]
    assert got["ranges"]["csf"][1] - got["ranges"]["csf"][0] + 1 < n  # a real restriction, not the whole volume


@pytest.mark.slow
@pytest.mark.skipif(os.name != "posix", reason="process groups are POSIX")
def test_cancelled_estimate_stops_the_process_and_gives_nothing(ct):
    from fewshotsam2.errors import Cancelled

    logic = module.FewShotSAM2Logic()
    job = logic.startSliceRangeEstimate(ct["query"], ct["supports"], lpips_weights=ct["weights"])
    pid, folder = job.process.process.pid, job.process.folder
    time.sleep(1.0)
    assert not job.finished and process_group_alive(pid)
    logic.cancel(job)
    assert not process_group_alive(pid)
    assert not folder.exists()
    assert job.finished and job.process.returncode == -signal.SIGKILL
    with pytest.raises(Cancelled):
        logic.finishSliceRangeEstimate(job)


@pytest.mark.slow
def test_failed_estimate_gives_the_core_error_line(ct, tmp_path):
    """The core refuses the input (exit 2) after the process started: one line, as InputError; folder removed."""
    from fewshotsam2.errors import InputError

    logic = module.FewShotSAM2Logic()
    missing = tmp_path / "no-such-weights.pth"
    job = logic.startSliceRangeEstimate(ct["query"], ct["supports"], lpips_weights=str(missing))
    folder = job.process.folder
    while not job.finished:
        time.sleep(0.1)
    with pytest.raises(InputError) as info:
        logic.finishSliceRangeEstimate(job)
    assert str(missing) in str(info.value) and "\n" not in str(info.value)
    assert not folder.exists()


def test_bad_input_is_refused_before_any_process(tmp_path, monkeypatch):
    import tempfile

    from fewshotsam2.errors import InputError

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where a job folder would be made
    scene = new_scene()
    query = _small_volume(scene, "query", (6, 5, 4))
    with pytest.raises(InputError, match="No support"):
        module.FewShotSAM2Logic().startSliceRangeEstimate(query, [])
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------- the saved table


def _small_volume(scene, name, shape_kji, folder=None):
    """A scalar volume node with a [k, j, i] voxel array of this shape (written to folder/name.nrrd if given)."""
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    slicer.util.updateVolumeFromArray(node, np.arange(np.prod(shape_kji), dtype=np.int16).reshape(shape_kji))
    if folder is not None:
        storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
        storage.SetFileName(str(folder / f"{name}.nrrd"))
        assert storage.WriteData(node)
        node.SetAndObserveStorageNodeID(storage.GetID())
    return node


def _parameter_node(scene):
    node = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", "FewShotSAM2")
    node.SetAttribute("ModuleName", "FewShotSAM2")
    return node


def test_table_is_saved_with_the_scene_and_read_back_for_its_query(tmp_path):
    """Store -> save the scene (.mrml + .nrrd) -> open it in a new scene: the same table, for that query only."""
    logic = module.FewShotSAM2Logic
    scene = new_scene()
    query = _small_volume(scene, "query", (30, 8, 6), tmp_path)  # 30 slices along numpy axis 0
    other = _small_volume(scene, "other", (30, 8, 6), tmp_path)
    parameters = _parameter_node(scene)
    ranges = {"liver": (3, 17), "spleen, left \"x\" <b>": (0, 29), "kidney": (0, 29)}
    logic.storeSliceRanges(parameters, query, 0, ranges, notFound=["kidney"])
    scene.SetURL(str(tmp_path / "scene.mrml"))
    assert scene.Commit()

    reopened = new_scene()
    reopened.SetURL(str(tmp_path / "scene.mrml"))
    assert reopened.Connect()
    parameters2 = reopened.GetFirstNodeByClass("vtkMRMLScriptedModuleNode")
    query2 = reopened.GetFirstNodeByName("query")
    table = logic.storedSliceRanges(parameters2, query2)
    assert table is not None
    assert table.axis == 0 and table.ranges == ranges and list(table.ranges) == list(ranges)  # rows keep their order
    assert table.notFound == ["kidney"]
    assert logic.storedSliceRanges(parameters2, reopened.GetFirstNodeByName("other")) is None  # another query
    assert logic.storedSliceRanges(parameters2, None) is None


def test_table_follows_its_query_when_a_scene_is_imported_and_ids_are_renamed(tmp_path):
    """The query is a node reference, not an ID inside the text: importing into a scene that already holds a
    node with that ID renames the query, and the table still belongs to it (and not to the node already there)."""
    logic = module.FewShotSAM2Logic
    scene = new_scene()
    query = _small_volume(scene, "query", (5, 12, 6), tmp_path)
    logic.storeSliceRanges(_parameter_node(scene), query, 1, {"csf": (2, 9)})
    scene.SetURL(str(tmp_path / "scene.mrml"))
    assert scene.Commit()

    target = new_scene()
    already = _small_volume(target, "already here", (5, 12, 6))
    assert already.GetID() == query.GetID()  # the clash the import has to resolve
    target.SetURL(str(tmp_path / "scene.mrml"))
    assert target.Import()
    imported = target.GetFirstNodeByName("query")
    assert imported.GetID() != already.GetID()
    parameters = target.GetFirstNodeByClass("vtkMRMLScriptedModuleNode")
    assert logic.storedSliceRanges(parameters, imported).ranges == {"csf": (2, 9)}
    assert logic.storedSliceRanges(parameters, already) is None


def test_table_is_replaced_on_store_and_the_wrapper_is_accepted():
    """A second store (a new estimate, an edit) replaces the first; a wrapper object with .parameterNode (as
    FewShotSAM2ParameterNode has) is accepted in place of the node."""
    logic = module.FewShotSAM2Logic
    scene = new_scene()
    first, second = _small_volume(scene, "a", (10, 4, 4)), _small_volume(scene, "b", (4, 4, 10))
    parameters = _parameter_node(scene)
    logic.storeSliceRanges(parameters, first, 0, {"liver": (1, 2)})
    wrapper = type("Wrapper", (), {"parameterNode": parameters})()
    logic.storeSliceRanges(wrapper, second, 2, {"liver": (4, 9)})
    assert logic.storedSliceRanges(parameters, first) is None
    assert logic.storedSliceRanges(wrapper, second).ranges == {"liver": (4, 9)}
    assert parameters.GetParameter("sliceRangesVolume") == ""  # the wrapper's NodeSerializer marker
    assert parameters.GetNodeReferenceID("sliceRangesVolume") == second.GetID()


def test_a_table_that_does_not_fit_its_query_is_not_used():
    """Ranges outside the volume (its voxels changed since, or the text was edited by hand) give no table."""
    logic = module.FewShotSAM2Logic
    scene = new_scene()
    query = _small_volume(scene, "query", (10, 4, 4))
    parameters = _parameter_node(scene)
    logic.storeSliceRanges(parameters, query, 0, {"liver": (1, 9)})
    assert logic.storedSliceRanges(parameters, query).ranges == {"liver": (1, 9)}
    slicer.util.updateVolumeFromArray(query, np.zeros((8, 4, 4), np.int16))  # now 8 slices: 9 is outside
    assert logic.storedSliceRanges(parameters, query) is None
    for text in ("", "not json", '{"axis": 3, "ranges": {}}', '{"axis": 0, "ranges": {"a": [5, 2]}}',
                 '{"axis": 0, "ranges": {"a": [0.5, 2]}}', '{"axis": 0, "ranges": {"a": [1]}}', '{"ranges": {}}',
                 '{"axis": true, "ranges": {}}', '[1, 2]'):
        parameters.SetParameter("sliceRanges", text)
        assert logic.storedSliceRanges(parameters, query) is None, text
    parameters.SetParameter("sliceRanges", '{"axis": 0, "ranges": {"a": [0, 7]}, "notFound": ["a", "b"]}')
    table = logic.storedSliceRanges(parameters, query)
    assert table.ranges == {"a": (0, 7)} and table.notFound == ["a"]  # a name without a row is dropped
