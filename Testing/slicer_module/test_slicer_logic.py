"""The Slicer Logic (FewShotSAM2.py) end to end on real volumes, with slicer-core's MRML (no Slicer application).

The Logic runs each segmentation in its own process (the core's command line, `--progress json`), as it does in
Slicer. SAM2 runs with random weights (untrained=True) at small sizes on CPU: masks are meaningless, the plumbing
is what is tested - MRML <-> files, geometry, names/colours, progress lines, cancel, errors. Each SAM2 run is done
once per module (fixtures) and checked by several tests; every test that starts a process is marked slow.
"""

import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer")
import vtk  # noqa: E402
from vtk.util import numpy_support  # noqa: E402

import FewShotSAM2 as module  # noqa: E402
from fewshotsam2 import settings  # noqa: E402
from fewshotsam2.run import pipeline  # noqa: E402
from fewshotsam2.errors import Cancelled, InputError  # noqa: E402
from fewshotsam2.io.volume import Structure, Volume, read_volume  # noqa: E402

from FewShotSAM2Lib import dependencies, process, review  # noqa: E402
from slicer_scene import add_segment_from_mask, load_volume, new_scene  # noqa: E402,F401  (also used by other files)
from importlib.util import find_spec as importlib_find_spec  # noqa: E402

# slow tier: real-data pipelines and the segmentation process (module fixtures shared by several tests)
pytestmark = [pytest.mark.filterwarnings("ignore:SAM2 runs with RANDOM WEIGHTS"), pytest.mark.slow]

FAST = dict(image_size=256, untrained=True, device="cpu")
LIVER_COLOR = (0.85, 0.45, 0.35)
SPLEEN_COLOR = (0.55, 0.2, 0.6)


# ---------------------------------------------------------------------------------------------- helpers


def segmentation_from_labelmap(scene, labelmap_node, wanted, name="labels", reference=None):
    """A segmentation node with one segment per {label value: (segment name, colour)} of a label map node."""
    labels = slicer.util.arrayFromVolume(labelmap_node)
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    seg.SetReferenceImageGeometryParameterFromVolumeNode(reference or labelmap_node)
    ijk_to_ras = vtk.vtkMatrix4x4()
    labelmap_node.GetIJKToRASMatrix(ijk_to_ras)
    ids = {}
    for value, (segment_name, color) in wanted.items():
        ids[value] = add_segment_from_mask(seg, labels == value, ijk_to_ras, segment_name, color)
    return seg, ids


def ijk_to_ras(node):
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def segment_masks(seg_node, volume_node):
    """{segment name: boolean [k, j, i] mask on the volume's grid}."""
    segmentation = seg_node.GetSegmentation()
    return {
        segmentation.GetSegment(sid).GetName(): module.FewShotSAM2Logic.segmentMaskOnVolume(seg_node, sid, volume_node)
        for sid in segmentation.GetSegmentIDs()
    }


def scene_state(scene):
    """Node IDs with their modification times: equal states = nothing was added, removed or modified."""
    nodes = {}
    for i in range(scene.GetNumberOfNodes()):
        node = scene.GetNthNode(i)
        nodes[node.GetID()] = node.GetMTime()
    return nodes


def core_labels(label_volume: Volume, mapping: dict[int, int]) -> Volume:
    out = np.zeros(label_volume.array.shape, np.uint16)
    for source, target in mapping.items():
        out[label_volume.array == source] = target
    return label_volume.with_array(out)


def assert_output_geometry(output_node, query_node):
    """The output's binary labelmaps sit on the query's voxel grid (same IJK-to-RAS, same extent)."""
    segmentation = output_node.GetSegmentation()
    dims = query_node.GetImageData().GetDimensions()
    for sid in segmentation.GetSegmentIDs():
        image = segmentation.GetSegment(sid).GetRepresentation(
            slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
        )
        m = vtk.vtkMatrix4x4()
        image.GetImageToWorldMatrix(m)
        np.testing.assert_allclose([[m.GetElement(r, c) for c in range(4)] for r in range(4)], ijk_to_ras(query_node),
                                   atol=1e-9)
        assert image.GetExtent() == (0, dims[0] - 1, 0, dims[1] - 1, 0, dims[2] - 1)


# ---------------------------------------------------------------------------------------------- data


@pytest.fixture(scope="module")
def data(shared_dir):
    return shared_dir / "data"


@pytest.fixture(scope="module")
def ctb_nrrd(data, tmp_path_factory):
    """ct-b's DICOM series converted to NRRD with SimpleITK (slicer-core's archetype reader gets its slice
    spacing wrong)."""
    folder = data / "abdomen-ct" / "ct-b" / "dicom"
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    path = tmp_path_factory.mktemp("ctb") / "ct-b.nrrd"
    sitk.WriteImage(reader.Execute(), str(path))
    return path


@pytest.fixture(scope="module")
def ct_run(data, ctb_nrrd, tmp_path_factory):
    """ct-a (liver 5, spleen 1) -> ct-b with the Logic (its own process); the same inputs read from the files by
    the core, in this process."""
    scene = new_scene()
    support = load_volume(scene, data / "abdomen-ct" / "ct-a" / "image.nii.gz", "ct-a")
    support_labels = load_volume(scene, data / "abdomen-ct" / "ct-a" / "labels.nii.gz", "ct-a labels", labelmap=True)
    seg, ids = segmentation_from_labelmap(
        scene, support_labels, {5: ("liver", LIVER_COLOR), 1: ("spleen", SPLEEN_COLOR)}, "ct-a segmentation", support
    )
    query = load_volume(scene, ctb_nrrd, "ct-b")
    logic = module.FewShotSAM2Logic()
    prepared = logic.prepare(query, [(support, seg, [ids[5], ids[1]])], "propagate", **FAST)
    stages = []
    jobs_folder = tmp_path_factory.mktemp("jobs")
    tempdir, tempfile.tempdir = tempfile.tempdir, str(jobs_folder)  # the job folder goes where the test can see it
    try:
        t0 = time.perf_counter()
        output = logic.segment(query, [(support, seg, [ids[5], ids[1]])], "propagate",
                               progressCallback=lambda *report: stages.append(report), **FAST)
        seconds = time.perf_counter() - t0
    finally:
        tempfile.tempdir = tempdir

    # the core alone, on the same files
    core_query = read_volume(data / "abdomen-ct" / "ct-b" / "dicom")
    core_support = read_volume(data / "abdomen-ct" / "ct-a" / "image.nii.gz")
    core_support_labels = core_labels(read_volume(data / "abdomen-ct" / "ct-a" / "labels.nii.gz"), {5: 1, 1: 2})
    structures = [Structure(1, "liver", LIVER_COLOR), Structure(2, "spleen", SPLEEN_COLOR)]
    core = pipeline.segment(
        core_query,
        [pipeline.SupportCase(core_support, core_support_labels, "ct-a")],
        structures,
        pipeline.SegmentOptions(method="propagate", **FAST),
    )
    return dict(scene=scene, logic=logic, prepared=prepared, output=output, query=query, support=support, seg=seg,
                ids=ids, core=core, core_query=core_query, core_support=core_support, stages=stages,
                core_support_labels=core_support_labels, seconds=seconds, jobs_folder=jobs_folder)


# ---------------------------------------------------------------------------------------------- ct-a -> ct-b


@pytest.mark.slow
def test_ct_inputs_match_the_core_reading_the_files(ct_run):
    prepared = ct_run["prepared"]
    for mine, core in ((prepared.query, ct_run["core_query"]), (prepared.supports[0].image, ct_run["core_support"])):
        np.testing.assert_array_equal(mine.array, core.array)
        np.testing.assert_allclose(mine.spacing, core.spacing, rtol=1e-6)
        np.testing.assert_allclose(mine.origin, core.origin, atol=1e-3)
        np.testing.assert_allclose(mine.direction, core.direction, atol=1e-6)
    np.testing.assert_array_equal(prepared.supports[0].labels.volume.array, ct_run["core_support_labels"].array)
    assert [(s.value, s.name) for s in prepared.structures] == [(1, "liver"), (2, "spleen")]


@pytest.mark.slow
def test_ct_output_equals_the_core_voxel_by_voxel(ct_run):
    masks = segment_masks(ct_run["output"], ct_run["query"])
    core = ct_run["core"].labels.array
    assert set(masks) == {"liver", "spleen"}
    assert (core == 1).any() and (core == 2).any()
    np.testing.assert_array_equal(masks["liver"], core == 1)
    np.testing.assert_array_equal(masks["spleen"], core == 2)
    np.testing.assert_array_equal(ct_run["logic"].lastResult.labels.array, core)


@pytest.mark.slow
def test_ct_progress_lines_from_the_real_process(ct_run):
    """The progress callback saw the process's JSON lines: encoding then per-structure stages, counters that end
    complete; the final line says which device ran and how long it took; the job folder is gone."""
    stages = ct_run["stages"]
    assert stages[:2] == [("Reading the volumes", 0, 0), ("Loading SAM2 tiny", 0, 0)]  # before the first counter
    stages = stages[2:]

    def names(stage):  # propagate tracks several structures in one pass: "liver, spleen: Propagating slice 3/20"
        return stage.split(": ")[0].split(", ")

    assert "liver" in names(stages[0][0]) and "Propagating slice" in stages[0][0] and stages[0][1] == 0  # before any
    assert all(0 <= done <= total and total > 0 for _, done, total in stages)
    liver = [(done, total) for stage, done, total in stages if "liver" in names(stage) and "Propagating slice" in stage]
    assert [d for d, _ in liver] == sorted(d for d, _ in liver) and liver[-1][0] == liver[-1][1]
    assert any("spleen" in names(stage) for stage, _, _ in stages)
    last = stages[-1]
    assert "spleen" in names(last[0]) and last[1] == last[2]
    result = ct_run["logic"].lastResult
    assert result.device == "cpu" and 0 < result.seconds < ct_run["seconds"]
    assert result.encoder_calls == ct_run["core"].encoder_calls
    assert [(s.structure, s.slice_index) for s in result.scores] == [(s.structure, s.slice_index) for s in ct_run["core"].scores]
    assert list(ct_run["jobs_folder"].iterdir()) == []  # the temporary job folder was removed


@pytest.mark.slow
def test_ct_output_node_geometry_names_and_colours(ct_run):
    output, query = ct_run["output"], ct_run["query"]
    assert output.GetScene() is ct_run["scene"]
    assert output.GetName() == "ct-b FewShotSAM2"
    assert_output_geometry(output, query)
    assert output.GetNodeReference(output.GetReferenceImageGeometryReferenceRole()) is query
    segmentation = output.GetSegmentation()
    names = [segmentation.GetSegment(s).GetName() for s in segmentation.GetSegmentIDs()]
    assert names == ["liver", "spleen"]
    np.testing.assert_allclose(segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("liver")).GetColor(), LIVER_COLOR)
    np.testing.assert_allclose(segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("spleen")).GetColor(), SPLEEN_COLOR)
    assert output.GetDisplayNode() is not None


@pytest.mark.slow
def test_seg_nrrd_round_trip_with_slicer_and_slicerio(ct_run, tmp_path):
    import slicerio

    output, query, scene = ct_run["output"], ct_run["query"], ct_run["scene"]
    path = tmp_path / "result.seg.nrrd"
    writer = slicer.vtkMRMLSegmentationStorageNode()
    writer.SetFileName(str(path))
    assert writer.WriteData(output)
    expected = segment_masks(output, query)

    # slicer-core's own reader
    reread = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "reread")
    reader = slicer.vtkMRMLSegmentationStorageNode()
    reader.SetFileName(str(path))
    assert reader.ReadData(reread)
    got = segment_masks(reread, query)
    assert list(got) == list(expected)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])
        np.testing.assert_allclose(
            reread.GetSegmentation().GetSegment(reread.GetSegmentation().GetSegmentIdBySegmentName(name)).GetColor(),
            LIVER_COLOR if name == "liver" else SPLEEN_COLOR, atol=1e-6)
    scene.RemoveNode(reread)

    # slicerio (reads the NRRD without Slicer): segment names, colours, geometry and voxels
    seg = slicerio.read_segmentation(str(path))
    assert [s["name"] for s in seg["segments"]] == ["liver", "spleen"]
    np.testing.assert_allclose(seg["segments"][0]["color"], LIVER_COLOR, atol=1e-6)
    np.testing.assert_allclose(seg["segments"][1]["color"], SPLEEN_COLOR, atol=1e-6)
    voxels = np.asarray(seg["voxels"])  # [i, j, k]; a 4th axis would mean several layers
    assert voxels.ndim == 3, "the non-overlapping result should be written as one shared layer"
    ijk_to_lps = np.asarray(seg["ijkToLPS"], dtype=float)
    query_lps = module.RAS_TO_LPS @ ijk_to_ras(query)
    np.testing.assert_allclose(ijk_to_lps[:3, :3], query_lps[:3, :3], atol=1e-6)
    # the file may hold a cropped extent: its first voxel is this voxel of the query grid
    start = np.linalg.solve(query_lps[:3, :3], ijk_to_lps[:3, 3] - query_lps[:3, 3])
    np.testing.assert_allclose(start, np.rint(start), atol=1e-6)
    start = np.rint(start).astype(int)
    for segment_info in seg["segments"]:
        name = segment_info["name"]
        full = np.zeros(expected[name].shape[::-1], dtype=bool)  # [i, j, k]
        window = tuple(slice(start[a], start[a] + voxels.shape[a]) for a in range(3))
        full[window] = voxels == segment_info["labelValue"]
        np.testing.assert_array_equal(full.transpose(2, 1, 0), expected[name])


@pytest.mark.slow
def test_output_written_in_place_replaces_segments(ct_run):
    """An existing output node keeps its identity; its old segments are replaced by the result's."""
    scene, logic, query = ct_run["scene"], ct_run["logic"], ct_run["query"]
    target = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "target")
    target.GetSegmentation().AddEmptySegment("old", "old")
    prepared = ct_run["prepared"]
    prepared_in_place = module.FewShotSAM2Run(prepared.query, prepared.supports, prepared.structures, prepared.method,
                                              prepared.options, query, target, prepared.segmentMetadata)
    before = scene.GetNumberOfNodes()
    out = logic.apply(prepared_in_place, logic.lastResult)
    assert out is target
    assert [out.GetSegmentation().GetSegment(s).GetName() for s in out.GetSegmentation().GetSegmentIDs()] == ["liver", "spleen"]
    assert scene.GetNumberOfNodes() == before + 1  # the display node only
    np.testing.assert_array_equal(segment_masks(out, query)["liver"], ct_run["core"].labels.array == 1)
    scene.RemoveNode(target)


@pytest.mark.slow
def test_apply_failure_leaves_the_scene_unchanged(ct_run):
    scene, logic, prepared = ct_run["scene"], ct_run["logic"], ct_run["prepared"]
    existing = ct_run["output"]
    before = scene_state(scene)
    # a result that does not fit the query (a bug in the core, say): refused before the scene is touched
    wrong = pipeline.SegmentationResult(labels=Volume(np.zeros((1, 2, 3), np.uint8), (1, 1, 1), (0, 0, 0), np.eye(3)),
                                        structures=prepared.structures)
    with pytest.raises(RuntimeError):
        logic.apply(prepared, wrong)
    in_place = module.FewShotSAM2Run(prepared.query, prepared.supports, prepared.structures, prepared.method,
                                     prepared.options, ct_run["query"], existing, prepared.segmentMetadata)
    with pytest.raises(RuntimeError):
        logic.apply(in_place, wrong)
    assert scene_state(scene) == before


# ---------------------------------------------------------------------------------------------- brain


@pytest.fixture(scope="module")
def brain_run(data):
    """ibsr-01 (white matter) -> ibsr-03 with the Logic; the core's own reading of the same files.

    The brain volumes are cut into 128 slices of 256x256, so one SAM2 run takes minutes on 2 CPU cores:
    instead of a second run, the test checks that the Logic hands the core exactly the inputs the core reads from
    the files (the core is deterministic, so equal inputs give equal outputs; the ct-a -> ct-b tests do run the
    core twice) and that the output node holds exactly the core's result.
    """
    scene = new_scene()
    folder = data / "brain-mr"
    support = load_volume(scene, folder / "ibsr-01" / "image.nii.gz", "ibsr-01")
    labels = load_volume(scene, folder / "ibsr-01" / "labels.nii.gz", "ibsr-01 labels", labelmap=True)
    wm_color = (0.9, 0.9, 0.75)
    seg, ids = segmentation_from_labelmap(scene, labels, {3: ("white matter", wm_color)}, "ibsr-01 segmentation", support)
    query = load_volume(scene, folder / "ibsr-03" / "image.nii.gz", "ibsr-03")
    logic = module.FewShotSAM2Logic()
    # 128 coronal slices: a small SAM2 input keeps this geometry test fast (the size changes no geometry)
    prepared = logic.prepare(query, [(support, seg, None)], "propagate", **dict(FAST, image_size=64))
    output = logic.segment(query, [(support, seg, None)], "propagate", **dict(FAST, image_size=64))
    core_query = read_volume(folder / "ibsr-03" / "image.nii.gz")
    core_support = pipeline.SupportCase(read_volume(folder / "ibsr-01" / "image.nii.gz"),
                                        core_labels(read_volume(folder / "ibsr-01" / "labels.nii.gz"), {3: 1}), "ibsr-01")
    return dict(scene=scene, logic=logic, prepared=prepared, output=output, query=query,
                core_query=core_query, core_support=core_support, color=wm_color)


@pytest.mark.slow
def test_brain_inputs_match_the_core_reading_the_files(brain_run):
    prepared = brain_run["prepared"]
    core_query, core_support = brain_run["core_query"], brain_run["core_support"]
    for mine, core in ((prepared.query, core_query), (prepared.supports[0].image, core_support.image)):
        np.testing.assert_array_equal(mine.array, core.array)
        assert mine.same_grid(core)
        np.testing.assert_allclose(mine.direction, core.direction, atol=1e-6)
    np.testing.assert_array_equal(prepared.supports[0].labels.volume.array, core_support.labels.array)
    assert [(s.value, s.name) for s in prepared.structures] == [(1, "white matter")]


@pytest.mark.slow
def test_brain_output_node_holds_the_core_result(brain_run):
    output, query = brain_run["output"], brain_run["query"]
    assert_output_geometry(output, query)
    masks = segment_masks(output, query)
    assert list(masks) == ["white matter"]
    np.testing.assert_array_equal(masks["white matter"], brain_run["logic"].lastResult.labels.array == 1)
    segment = output.GetSegmentation().GetNthSegment(0)
    np.testing.assert_allclose(segment.GetColor(), brain_run["color"])


# ---------------------------------------------------------------------------------------------- orientation


def permuted_copy(scene, node, name):
    """The same image stored with permuted and flipped axes: voxel (i, j, k) of the copy is voxel
    (n_i - 1 - k', ...) of the original, with IJK-to-RAS chosen so that every voxel keeps its physical place."""
    array = slicer.util.arrayFromVolume(node)  # [k, j, i]
    # new array axes: [k2, j2, i2] = [j, i (flipped), k (flipped)] of the original
    new = np.ascontiguousarray(np.flip(np.flip(array.transpose(1, 2, 0), axis=1), axis=2))
    m = ijk_to_ras(node)
    nk, nj, ni = array.shape
    # original index (i, j, k) as a function of the new index (i2, j2, k2): i = ni-1-j2, j = k2, k = nk-1-i2
    p = np.zeros((4, 4))
    p[0, 1], p[0, 3] = -1, ni - 1
    p[1, 2] = 1
    p[2, 0], p[2, 3] = -1, nk - 1
    p[3, 3] = 1
    new_ijk_to_ras = m @ p
    copy = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    slicer.util.updateVolumeFromArray(copy, new)
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, new_ijk_to_ras[r, c])
    copy.SetIJKToRASMatrix(matrix)
    return copy, (lambda a: np.flip(np.flip(a, axis=2), axis=1).transpose(2, 0, 1))  # copy array -> original array


@pytest.fixture(scope="module")
def mr_scene(data):
    """abdomen-mr with 3 labeled liver slices: the query is its own support."""
    scene = new_scene()
    folder = data / "abdomen-mr"
    volume = load_volume(scene, folder / "image.nii.gz", "abdomen-mr")
    labels = load_volume(scene, folder / "labels.nii.gz", "abdomen-mr labels", labelmap=True)
    liver = slicer.util.arrayFromVolume(labels) == 5
    rows = np.nonzero(liver.any(axis=(1, 2)))[0]
    keep = np.zeros_like(liver)
    for k in rows[[len(rows) // 4, len(rows) // 2, 3 * len(rows) // 4]]:
        keep[k] = liver[k]
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "few slices")
    seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    m = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(m)
    segment_id = add_segment_from_mask(seg, keep, m, "liver", LIVER_COLOR)
    return dict(scene=scene, volume=volume, seg=seg, segment_id=segment_id, labeled=keep)


@pytest.mark.slow
def test_permuted_flipped_query_gives_the_same_physical_result(mr_scene):
    scene, volume, seg, sid = mr_scene["scene"], mr_scene["volume"], mr_scene["seg"], mr_scene["segment_id"]
    copy, to_original = permuted_copy(scene, volume, "abdomen-mr permuted")
    # sanity: the copy holds the same voxels at the same physical places
    np.testing.assert_array_equal(to_original(slicer.util.arrayFromVolume(copy)), slicer.util.arrayFromVolume(volume))
    logic = module.FewShotSAM2Logic()
    plain = logic.segment(volume, [(volume, seg, [sid])], method="propagate", **FAST)
    plain_mask = segment_masks(plain, volume)["liver"]
    permuted = logic.segment(copy, [(copy, seg, [sid])], method="propagate", **FAST)
    assert_output_geometry(permuted, copy)
    permuted_mask = segment_masks(permuted, copy)["liver"]
    assert plain_mask.any()
    np.testing.assert_array_equal(to_original(permuted_mask), plain_mask)
    # and read on the plain volume's grid through Slicer's resampling
    np.testing.assert_array_equal(segment_masks(permuted, volume)["liver"], plain_mask)


def test_oblique_volume_round_trips_exactly(mr_scene):
    """An oblique (rotated) grid becomes a core Volume with the same geometry, to rounding."""
    scene, volume = mr_scene["scene"], mr_scene["volume"]
    oblique = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "oblique")
    slicer.util.updateVolumeFromArray(oblique, slicer.util.arrayFromVolume(volume))
    angle = np.deg2rad(20)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    m = np.eye(4)
    m[:3, :3] = rot @ np.diag([1.5, 2.0, 3.0])
    m[:3, 3] = [10, -20, 30]
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, m[r, c])
    oblique.SetIJKToRASMatrix(matrix)
    vol = module.FewShotSAM2Logic.volumeFromNode(oblique)
    np.testing.assert_allclose(vol.spacing, (1.5, 2.0, 3.0))
    np.testing.assert_allclose(module.RAS_TO_LPS @ m, vol.ijk_to_lps(), atol=1e-9)
    scene.RemoveNode(oblique)


def test_sheared_volume_is_refused(mr_scene):
    scene, volume = mr_scene["scene"], mr_scene["volume"]
    sheared = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "sheared")
    slicer.util.updateVolumeFromArray(sheared, slicer.util.arrayFromVolume(volume))
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 1, 0.5)  # the j axis leans on i
    sheared.SetIJKToRASMatrix(matrix)
    with pytest.raises(InputError, match="sheared"):
        module.FewShotSAM2Logic.volumeFromNode(sheared)
    scene.RemoveNode(sheared)


def test_linear_parent_transform_is_applied_and_kept(mr_scene):
    scene, volume = mr_scene["scene"], mr_scene["volume"]
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    m = vtk.vtkMatrix4x4()
    m.SetElement(0, 3, 25.0)
    transform.SetMatrixTransformToParent(m)
    volume.SetAndObserveTransformNodeID(transform.GetID())
    try:
        vol = module.FewShotSAM2Logic.volumeFromNode(volume)
        plain = ijk_to_ras(volume)
        plain[0, 3] += 25.0
        np.testing.assert_allclose(vol.ijk_to_lps(), module.RAS_TO_LPS @ plain, atol=1e-9)
    finally:
        volume.SetAndObserveTransformNodeID(None)
        scene.RemoveNode(transform)


# ---------------------------------------------------------------------------------------------- methods


@pytest.fixture(scope="module")
def reverse_run(mr_scene):
    logic = module.FewShotSAM2Logic()
    v, seg, sid = mr_scene["volume"], mr_scene["seg"], mr_scene["segment_id"]
    output = logic.segment(v, [(v, seg, [sid])], method="reverse", top_k=2, **FAST)
    return logic, output


@pytest.mark.slow
def test_reverse_scores_table_and_low_confidence(reverse_run, mr_scene):
    logic, output = reverse_run
    result = logic.lastResult
    assert output.GetAttribute("FewShotSAM2.Method") == "reverse"
    assert result.scores and all(0.0 <= s.score <= 1.0 for s in result.scores)
    scene = mr_scene["scene"]
    table, chart = logic.createConfidenceTable(result, "reverse", scene)
    assert table.GetNumberOfColumns() == 2 and table.GetColumnName(1) == "liver"
    assert table.GetNumberOfRows() == len({s.slice_index for s in result.scores})
    assert chart.GetNumberOfPlotSeriesNodes() == 1
    nodes = scene.GetNumberOfNodes()
    again = logic.createConfidenceTable(result, "reverse", scene, tableNode=table, chartNode=chart)
    assert again == (table, chart) and scene.GetNumberOfNodes() == nodes  # a second run reuses, nothing piles up
    low = logic.lowConfidenceSlices(result, "reverse")
    assert all(score < review.LOW_CONFIDENCE_PI for _, _, score in low)
    assert [score for _, _, score in low] == sorted(score for _, _, score in low)
    # jumping to a slice centres the slice views on it
    slice_node = scene.AddNewNodeByClass("vtkMRMLSliceNode", "Red")
    slice_node.SetLayoutName("Red")
    index = result.scores[0].slice_index
    logic.jumpToSlice(mr_scene["volume"], result.slice_axis, index)
    ras = logic.sliceCenterRAS(mr_scene["volume"], result.slice_axis, index)
    m = slice_node.GetSliceToRAS()
    np.testing.assert_allclose([m.GetElement(r, 3) for r in range(3)], ras, atol=1e-6)


@pytest.mark.slow
def test_lpips_run(mr_scene, shared_dir):
    logic = module.FewShotSAM2Logic()
    v, seg, sid = mr_scene["volume"], mr_scene["seg"], mr_scene["segment_id"]
    output = logic.segment(v, [(v, seg, [sid])], method="lpips", augmentations=1,
                           lpips_weights=str(shared_dir / "weights" / "lpips" / "alexnet_features.pth"), **FAST)
    assert_output_geometry(output, v)
    result = logic.lastResult
    assert result.scores and all(s.score >= 0 for s in result.scores)
    np.testing.assert_array_equal(segment_masks(output, v)["liver"], result.labels.array == 1)
    table, chart = logic.createConfidenceTable(result, "lpips", mr_scene["scene"])
    assert table is not None and chart is not None
    low = logic.lowConfidenceSlices(result, "lpips")
    assert [score for _, _, score in low] == sorted((score for _, _, score in low), reverse=True)


# ---------------------------------------------------------------------------------------------- cancel, errors


def process_group_alive(pgid):
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
def test_cancel_mid_run_kills_the_process_and_leaves_nothing(mr_scene, tmp_path, monkeypatch):
    """Cancel while the process encodes: it and its process group are gone at once, its job folder too, and the
    scene is as it was (no new node, the picked output untouched)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    scene, v, seg, sid = mr_scene["scene"], mr_scene["volume"], mr_scene["seg"], mr_scene["segment_id"]
    existing = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "existing output")
    existing.GetSegmentation().AddEmptySegment("keep me", "keep me")
    logic = module.FewShotSAM2Logic()
    before = scene_state(scene)
    job = logic.start(logic.prepare(v, [(v, seg, [sid])], "propagate", existing, **FAST))
    assert job.process.folder.parent == tmp_path and job.process.folder.is_dir()
    deadline = time.time() + 120
    while job.progress[2] == 0 and not job.finished and time.time() < deadline:
        job.poll()
        time.sleep(0.05)
    stage, done, total = job.progress
    assert "Propagating slice" in stage and total > 0 and not job.finished  # mid-run
    pid = job.process.process.pid
    t0 = time.perf_counter()
    logic.cancel(job)
    assert time.perf_counter() - t0 < 5
    assert job.process.returncode == -signal.SIGKILL
    assert not process_group_alive(pid)  # the process group (pgid = pid) has no member left
    assert list(tmp_path.iterdir()) == []
    assert scene_state(scene) == before
    assert existing.GetSegmentation().GetSegmentIDs() == ("keep me",)
    scene.RemoveNode(existing)


@pytest.mark.slow
def test_cancel_from_the_progress_callback(mr_scene, tmp_path, monkeypatch):
    """Scripting: raising Cancelled from the progress callback stops the blocking segment() the same way."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    scene, v, seg, sid = mr_scene["scene"], mr_scene["volume"], mr_scene["seg"], mr_scene["segment_id"]
    before = scene_state(scene)
    stages = []

    def cancel_at_encoding(stage, done, total):
        stages.append((stage, done, total))
        if total:
            raise Cancelled("user")

    with pytest.raises(Cancelled):
        module.FewShotSAM2Logic().segment(v, [(v, seg, [sid])], method="propagate",
                                          progressCallback=cancel_at_encoding, **FAST)
    assert [s for s, _, _ in stages[:2]] == ["Reading the volumes", "Loading SAM2 tiny"]
    assert len(stages) == 3 and "Propagating slice" in stages[2][0]
    assert scene_state(scene) == before
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("case, message", [
    ("unreadable checkpoint", "not a valid PyTorch weights file"),
    ("bad image size", "multiple of 32"),
])
def test_failing_process_gives_one_readable_error_and_changes_nothing(mr_scene, tmp_path, monkeypatch, case, message):
    scene, v, seg, sid = mr_scene["scene"], mr_scene["volume"], mr_scene["seg"], mr_scene["segment_id"]
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(jobs))
    options = dict(FAST)
    if case == "unreadable checkpoint":
        bad = tmp_path / "sam2.1_hiera_tiny.pt"
        bad.write_bytes(b"this is not a checkpoint")
        options.update(untrained=False, checkpoint=str(bad))
    else:
        options.update(image_size=100)
    before = scene_state(scene)
    with pytest.raises(InputError) as error:
        module.FewShotSAM2Logic().segment(v, [(v, seg, [sid])], method="propagate", **options)
    text = str(error.value)
    assert message in text and "\n" not in text and "Traceback" not in text
    assert scene_state(scene) == before
    assert list(jobs.iterdir()) == []


@pytest.mark.slow
def test_crashing_process_gives_a_runtime_error_and_changes_nothing(mr_scene, tmp_path, monkeypatch):
    """A process that dies without the core's error line (here: an interpreter that cannot import the core)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    scene, v, seg, sid = mr_scene["scene"], mr_scene["volume"], mr_scene["seg"], mr_scene["segment_id"]
    logic = module.FewShotSAM2Logic()
    fake = tmp_path.parent / "python-that-crashes"
    fake.write_text("#!/bin/sh\necho 'Traceback (most recent call last):' >&2\necho 'ImportError: no torch here' >&2\nexit 1\n")
    fake.chmod(0o755)
    logic.python = str(fake)
    before = scene_state(scene)
    with pytest.raises(RuntimeError, match="exit code 1: ImportError: no torch here"):
        logic.segment(v, [(v, seg, [sid])], method="propagate", **FAST)
    assert scene_state(scene) == before
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_run_stops_when_slicer_is_killed(tmp_path):
    """The segmentation has a process group of its own (for Cancel), so it would outlive a killed Slicer: it
    checks the pid it was given and stops at its next progress line once that process is gone."""
    script = tmp_path / "start.py"
    script.write_text(f"""
import sys, time
sys.path.insert(0, {os.path.dirname(module.__file__)!r})
import numpy as np, slicer
import FewShotSAM2 as module
scene = slicer.vtkMRMLScene()
keep = slicer.vtkSlicerSegmentationsModuleLogic()
keep.SetMRMLScene(scene)
volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "v")
slicer.util.updateVolumeFromArray(volume, np.random.default_rng(0).normal(0, 100, (600, 32, 32)).astype(np.int16))
from FewShotSAM2Lib import process
from fewshotsam2.io.volume import Structure
query = module.FewShotSAM2Logic.volumeFromNode(volume)
labels = np.zeros(query.shape, np.uint16)
labels[300, 10:20, 10:20] = 1
support = module.PreparedSupport(query, query.with_array(labels))
run = module.FewShotSAM2Run(query, [support], [Structure(1, "blob", (1, 0, 0))], "propagate",
                            dict(image_size=64, untrained=True, device="cpu", batch_size=1), volume)
job = module.FewShotSAM2Logic().start(run)
while job.progress[2] == 0:
    job.poll()
    time.sleep(0.05)
print(job.process.process.pid, flush=True)
time.sleep(600)
""")
    starter = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, encoding="utf-8",
                               env=dict(os.environ, OMP_NUM_THREADS="1", TMPDIR=str(tmp_path)))
    pid = int(starter.stdout.readline())
    assert process_group_alive(pid)
    starter.kill()  # "Slicer" dies without cleaning up
    starter.wait()
    killed = time.time()
    while process_group_alive(pid) and time.time() < killed + 15:  # the whole run takes minutes
        time.sleep(0.2)
    assert not process_group_alive(pid)


@pytest.mark.slow
def test_slicer_process_never_imports_torch(tmp_path):
    """A whole Logic run in a fresh interpreter: the segmentation happens, torch and sam2 stay out of it."""
    script = tmp_path / "run.py"
    script.write_text(f"""
import sys
sys.path.insert(0, {str(module.__file__.rsplit('/', 1)[0])!r})
import numpy as np, slicer
import FewShotSAM2 as module
scene = slicer.vtkMRMLScene()
logic_keepalive = slicer.vtkSlicerSegmentationsModuleLogic()
logic_keepalive.SetMRMLScene(scene)
k, j, i = np.mgrid[0:8, 0:32, 0:32]
inside = ((i - 16) / 8.0) ** 2 + ((j - 16) / 6.0) ** 2 <= 1.0
volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "v")
slicer.util.updateVolumeFromArray(volume, (100 + 800 * inside).astype(np.int16))
seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "s")
seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)
sid = seg.GetSegmentation().AddEmptySegment("blob", "blob")
labels = np.zeros(inside.shape, np.uint8)
labels[4] = inside[4]
from FewShotSAM2Lib import mrml_io
import vtk
from vtk.util import numpy_support
image = slicer.vtkOrientedImageData()
image.SetDimensions(32, 32, 8)
image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(8, 32, 32)[:] = labels
m = vtk.vtkMatrix4x4()
volume.GetIJKToRASMatrix(m)
image.SetImageToWorldMatrix(m)
assert slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(image, seg, sid)
out = module.FewShotSAM2Logic().segment(volume, [(volume, seg, [sid])], "propagate", image_size=64, untrained=True,
                                        device="cpu")
assert out.GetSegmentation().GetNumberOfSegments() == 1
print("torch" in sys.modules, "sam2" in sys.modules)
""")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, encoding="utf-8", timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["False", "False"]


@pytest.mark.parametrize(
    "case, message",
    [
        ("no query", "No query volume"),
        ("no supports", "No support"),
        ("missing segment", "has no segment with ID"),
        ("empty segment", "segment 'empty' of 'few slices' is empty inside volume 'abdomen-mr'"),
        ("no segment checked", "no segment selected"),
        ("label map as query", "is a label map volume"),
        ("no segmentation", "no segmentation selected"),
        ("bad method", "Unknown method"),
        ("bad option", "Unknown segmentation option"),
    ],
)
def test_bad_inputs_give_a_clear_error_and_change_nothing(mr_scene, case, message):
    scene, v, seg, sid = mr_scene["scene"], mr_scene["volume"], mr_scene["seg"], mr_scene["segment_id"]
    empty_id = seg.GetSegmentation().GetSegmentIdBySegmentName("empty")
    if not empty_id:
        empty_id = seg.GetSegmentation().AddEmptySegment("empty", "empty")
    before = scene_state(scene)
    args = dict(queryVolumeNode=v, supports=[(v, seg, [sid])], method="propagate")
    kwargs = dict(FAST)
    if case == "no query":
        args["queryVolumeNode"] = None
    elif case == "no supports":
        args["supports"] = []
    elif case == "missing segment":
        args["supports"] = [(v, seg, ["does-not-exist"])]
    elif case == "empty segment":
        args["supports"] = [(v, seg, [sid, empty_id])]
    elif case == "no segment checked":
        args["supports"] = [(v, seg, [])]
    elif case == "label map as query":
        labelmap = scene.GetFirstNodeByClass("vtkMRMLLabelMapVolumeNode")
        assert labelmap is not None
        args["queryVolumeNode"] = labelmap
    elif case == "no segmentation":
        args["supports"] = [(v, None, None)]
    elif case == "bad method":
        args["method"] = "magic"
    elif case == "bad option":
        kwargs["not_an_option"] = 1
    with pytest.raises(InputError, match=message):
        module.FewShotSAM2Logic().segment(**args, **kwargs)
    assert scene_state(scene) == before


def test_supports_with_shared_segment_names_are_one_structure(mr_scene, data):
    """Same segment name in two supports = one structure (first support's colour); prepare changes nothing."""
    scene, v, seg, sid = mr_scene["scene"], mr_scene["volume"], mr_scene["seg"], mr_scene["segment_id"]
    other = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "other support")
    m = vtk.vtkMatrix4x4()
    v.GetIJKToRASMatrix(m)
    labeled = mr_scene["labeled"]
    other_id = add_segment_from_mask(other, labeled, m, "liver", (0.1, 0.9, 0.1))
    kidney = np.zeros_like(labeled)
    kidney[10, 40:50, 40:50] = True
    kidney_id = add_segment_from_mask(other, kidney, m, "kidney", (0.2, 0.2, 0.9))
    before = scene_state(scene)
    prepared = module.FewShotSAM2Logic().prepare(v, [(v, seg, [sid]), (v, other, None)], "propagate", **FAST)
    assert scene_state(scene) == before
    assert [(s.value, s.name) for s in prepared.structures] == [(1, "liver"), (2, "kidney")]
    np.testing.assert_allclose(prepared.structures[0].color, LIVER_COLOR)
    labels = prepared.supports[1].labels
    assert [(st.value, st.name) for st in labels.structures] == [(1, "liver"), (2, "kidney")]
    # overlapping segments keep their own voxels (separate layers): the core reads each from its layer, as it
    # reads a .seg.nrrd on the command line (one support rule, support_loader.py)
    assert (kidney & labeled).any()
    assert labels.volume.layers is not None and labels.volume.layers.shape[0] == 2
    np.testing.assert_array_equal(labels.mask(labels.structures[1]), kidney)
    np.testing.assert_array_equal(labels.mask(labels.structures[0]), labeled)
    assert other_id and kidney_id
    scene.RemoveNode(other)


def test_support_forms_accepted_by_the_logic(mr_scene):
    """(volume, segmentation) = all segments; segment IDs as a list or a comma-separated string."""
    v, seg, sid = mr_scene["volume"], mr_scene["seg"], mr_scene["segment_id"]
    logic = module.FewShotSAM2Logic()
    by_list = logic.prepare(v, [(v, seg, [sid])], "propagate", **FAST)
    by_string = logic.prepare(v, [(v, seg, sid)], "propagate", **FAST)
    by_dataclass = logic.prepare(v, [module.FewShotSAM2Support(v, seg, [sid])], "propagate", **FAST)
    for prepared in (by_string, by_dataclass):
        np.testing.assert_array_equal(prepared.supports[0].labels.volume.array, by_list.supports[0].labels.volume.array)
    np.testing.assert_array_equal(by_list.supports[0].labels.volume.array == 1, mr_scene["labeled"])
    assert by_list.options["image_size"] == 256 and by_list.options["untrained"]


@pytest.mark.slow
def test_overlap_allow_gives_overlapping_segments(mr_scene):
    """--overlap allow in the Logic: the process writes a layered .seg.nrrd, the Logic reads each structure from its
    own layer, and the output node holds overlapping segments (separate labelmap layers) with every voxel."""
    from fewshotsam2.io.volume import structure_mask

    scene, v, seg, sid = mr_scene["scene"], mr_scene["volume"], mr_scene["seg"], mr_scene["segment_id"]
    other = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "inside the liver")
    m = vtk.vtkMatrix4x4()
    v.GetIJKToRASMatrix(m)
    inner = mr_scene["labeled"].copy()  # a second structure inside the first: they overlap wherever both are
    inner_id = add_segment_from_mask(other, inner, m, "inner", (0.2, 0.2, 0.9))
    logic = module.FewShotSAM2Logic()
    # the options as the panel gives them (FewShotSAM2Widget._runOptions): the parameter node's members through the
    # settings table, "Keep overlaps" chosen in the Overlapping structures menu
    panel = module.FewShotSAM2ParameterNode()
    panel.overlap = "allow"
    options = settings.from_gui(panel)
    options.pop("method")
    options.update(FAST, image_size=64, slice_range="off")
    prepared = logic.prepare(v, [(v, seg, [sid]), (v, other, [inner_id])], "propagate", **options)
    assert prepared.options["overlap"] == "allow"
    assert "--overlap allow" in " ".join(process.optionArguments(prepared.options))
    output = logic.segment(v, [(v, seg, [sid]), (v, other, [inner_id])], "propagate", **options)
    result = logic.lastResult
    assert result.labels.layers is not None and sorted(s.layer for s in result.structures) == [0, 1]
    masks = segment_masks(output, v)
    assert list(masks) == ["liver", "inner"]
    for s in result.structures:
        np.testing.assert_array_equal(masks[s.name], structure_mask(result.labels, s))
    # the same prompt twice: random weights or not, the two structures overlap, and both keep the overlap
    assert (masks["liver"] & masks["inner"]).any()
    assert output.GetSegmentation().GetNumberOfLayers() == 2
    # refine edits one label per voxel: it refuses such a result rather than flattening its overlaps
    with pytest.raises(InputError, match="overlap"):
        logic.refine(output)
    # the panel's Refine button is off for it and its tooltip says why (FewShotSAM2Widget._updateRefineButtons)
    assert logic.lastRefinableNode() is output
    assert "keeps overlapping segments" in logic.refineRefusal(output)
    with pytest.raises(InputError, match="keeps overlapping segments"):
        logic.refineCorrections(output)
    scene.RemoveNode(output)
    scene.RemoveNode(other)


@pytest.mark.slow
def test_supports_with_different_structures_run_through_the_process(mr_scene):
    """Support 1 labels the liver, support 2 only a kidney: the process gets both and segments each structure
    from the supports that have it (the command line accepts a label missing from some of several supports)."""
    scene, v, seg, sid = mr_scene["scene"], mr_scene["volume"], mr_scene["seg"], mr_scene["segment_id"]
    other = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "kidney only")
    m = vtk.vtkMatrix4x4()
    v.GetIJKToRASMatrix(m)
    kidney = np.zeros_like(mr_scene["labeled"])
    kidney[10, 40:50, 40:50] = True
    kidney_id = add_segment_from_mask(other, kidney, m, "kidney", (0.2, 0.2, 0.9))
    logic = module.FewShotSAM2Logic()
    output = logic.segment(v, [(v, seg, [sid]), (v, other, [kidney_id])], "propagate", **dict(FAST, image_size=64))
    names = [output.GetSegmentation().GetSegment(i).GetName() for i in output.GetSegmentation().GetSegmentIDs()]
    assert names == ["liver", "kidney"]
    # the core's warnings reach the Logic (and the GUI): here only the random-weights one, no empty segment
    assert [w for w in logic.lastResult.warnings if "RANDOM WEIGHTS" not in w] == []
    assert any("RANDOM WEIGHTS" in w for w in logic.lastResult.warnings)
    masks = segment_masks(output, v)
    np.testing.assert_array_equal(masks["liver"], logic.lastResult.labels.array == 1)
    np.testing.assert_array_equal(masks["kidney"], logic.lastResult.labels.array == 2)
    scene.RemoveNode(output)
    scene.RemoveNode(other)


@pytest.mark.slow
def test_module_self_test_body_runs_on_slicer_core(monkeypatch):
    """Slicer's self-test (FewShotSAM2Test) needs slicer.mrmlScene and slicer.modules; give it a scene and a
    stand-in for the one slicer.util helper that needs slicer.modules, and run its body."""
    import unittest

    scene = new_scene()
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)

    def update_segment(narray, segmentation_node, segment_id, reference_volume_node):
        m = vtk.vtkMatrix4x4()
        reference_volume_node.GetIJKToRASMatrix(m)
        image = slicer.vtkOrientedImageData()
        nk, nj, ni = narray.shape
        image.SetDimensions(ni, nj, nk)
        image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
        numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(nk, nj, ni)[:] = narray > 0
        image.SetImageToWorldMatrix(m)
        assert slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(image, segmentation_node, segment_id)

    monkeypatch.setattr(slicer.util, "updateSegmentBinaryLabelmapFromArray", update_segment)

    class Runner(unittest.TestCase):
        _syntheticCase = module.FewShotSAM2Test._syntheticCase

        def runTest(self):
            pass

        def delayDisplay(self, message, *args, **kwargs):
            self.messages.append(message)

    runner = Runner()
    for body in (module.FewShotSAM2Test.test_FewShotSAM2_files, module.FewShotSAM2Test.test_FewShotSAM2_untrained):
        runner.messages = []
        scene.Clear(0)
        body(runner)
        assert runner.messages[-1] == "Test passed", runner.messages


def test_module_self_test_skips_without_torch(monkeypatch):
    """Without torch or sam2 the self-test's SAM2 part is skipped with the reason, not passed silently."""
    import unittest

    monkeypatch.setattr(dependencies.importlib.util, "find_spec",
                        lambda name, *a: None if name == "torch" else importlib_find_spec(name, *a))

    class Runner(unittest.TestCase):
        def runTest(self):
            pass

        def delayDisplay(self, message, *args, **kwargs):
            pass

    with pytest.raises(unittest.SkipTest, match="torch is not installed"):
        module.FewShotSAM2Test.test_FewShotSAM2_untrained(Runner())


def test_dependencies_are_checked_without_importing_them():
    assert dependencies.missingDependencies("lpips") == []  # this environment has everything
    assert dependencies.sam2Problem() is None and dependencies.torchProblem() is None
    code = ("import sys; sys.path.insert(0, %r); from FewShotSAM2Lib import dependencies as d; "
            "assert d.missingDependencies('lpips') == []; print('torch' in sys.modules, 'sam2' in sys.modules)"
            % str(os.path.dirname(module.__file__)))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, encoding="utf-8", timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["False", "False"]


def test_single_support_without_list(mr_scene):
    v, seg, sid = mr_scene["volume"], mr_scene["seg"], mr_scene["segment_id"]
    prepared = module.FewShotSAM2Logic().prepare(v, (v, seg, [sid]), "propagate", **FAST)
    assert len(prepared.supports) == 1
    np.testing.assert_array_equal(prepared.supports[0].labels.volume.array == 1, mr_scene["labeled"])


def test_model_cache_status_import_and_clear(tmp_path, monkeypatch):
    """The GUI's model box: status line, Import file... (validated by the core), Clear cache."""
    import torch

    from fewshotsam2.model import checkpoints
    from fewshotsam2.model.engine import build_sam2_model

    cache = tmp_path / "cache"
    monkeypatch.setenv(checkpoints.CACHE_ENV, str(cache))
    logic = module.FewShotSAM2Logic()
    ready, text = logic.checkpointStatus("tiny", "2.1")
    assert not ready and "sam2.1_hiera_tiny" in text and "not downloaded" in text

    bogus = tmp_path / "bogus.pt"
    bogus.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError) as error:  # checked in a process of its own: one line back
        logic.importCheckpoint(str(bogus), "tiny", "2.1")
    assert "bogus.pt" in str(error.value) and "\n" not in str(error.value)
    assert not logic.checkpointStatus("tiny", "2.1")[0]

    torch.manual_seed(1)
    weights = tmp_path / "my_tiny.pt"
    torch.save({"model": build_sam2_model(checkpoints.checkpoint_info("tiny", "2.1")).state_dict()}, weights)
    path = logic.importCheckpoint(str(weights), "tiny", "2.1")
    assert path.parent == cache
    ready, text = logic.checkpointStatus("tiny", "2.1")
    assert ready and "ready" in text
    assert logic.clearCheckpointCache() >= 1
    assert not logic.checkpointStatus("tiny", "2.1")[0]
