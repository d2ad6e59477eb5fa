"""The Logic's refine on real MRML (slicer-core): edit a slice of the output, refine in its own process, undo.

A synthetic blob volume (16 slices, 32 x 32) is its own support (one labeled slice); SAM2 random weights at 64 px:
the masks mean nothing, the plumbing is tested (changed slices found, the corrected slice written as drawn, the
feature cache filled by segment and read by refine, one-step replace and undo, bad edits refused)."""

from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
import vtk  # noqa: E402
from vtk.util import numpy_support  # noqa: E402

import FewShotSAM2 as module  # noqa: E402
from fewshotsam2.errors import InputError  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore:SAM2 runs with RANDOM WEIGHTS"), pytest.mark.slow]  # processes

RUN = dict(image_size=64, untrained=True, device="cpu", slice_range="off")


def _set_mask(seg, sid, mask, volume):
    nk, nj, ni = mask.shape
    image = slicer.vtkOrientedImageData()
    image.SetDimensions(ni, nj, nk)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(nk, nj, ni)[:] = mask
    m = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(m)
    image.SetImageToWorldMatrix(m)
    assert slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(image, seg, sid)


def _masks(node, volume):
    s = node.GetSegmentation()
    return {s.GetSegment(sid).GetName(): module.FewShotSAM2Logic.segmentMaskOnVolume(node, sid, volume)
            for sid in s.GetSegmentIDs()}


@pytest.fixture
def run(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSHOTSAM2_FEATURE_CACHE", str(tmp_path / "features"))  # the processes' feature cache
    scene = slicer.vtkMRMLScene()
    keep = slicer.vtkSlicerSegmentationsModuleLogic()
    keep.SetMRMLScene(scene)
    k, j, i = np.mgrid[0:16, 0:32, 0:32]
    inside = ((i - 16) / (6.0 + k / 4)) ** 2 + ((j - 16) / 6.0) ** 2 <= 1.0
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "blob volume")
    slicer.util.updateVolumeFromArray(volume, (100 + 800 * inside).astype(np.int16))
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "support")
    seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    sid = seg.GetSegmentation().AddEmptySegment("blob", "blob")
    labels = np.zeros(inside.shape, np.uint8)
    labels[8] = inside[8]
    _set_mask(seg, sid, labels, volume)
    logic = module.FewShotSAM2Logic()
    out = logic.segment(volume, [(volume, seg, [sid])], "propagate", **RUN)
    return dict(scene=scene, keep=keep, volume=volume, inside=inside, logic=logic, out=out)


def test_refine_from_an_edited_slice_then_undo(run):
    logic, out, volume, inside = run["logic"], run["out"], run["volume"], run["inside"]
    assert logic.refineRefusal(out) == ""  # the panel's Refine button is on (overlaps decided: one label per voxel)
    with pytest.raises(InputError, match="no slice of .* was changed"):
        logic.refine(out)
    before = _masks(out, volume)["blob"]
    edited = before.copy()
    edited[3] = inside[3]  # the user draws the blob on slice 3
    edited[3, :2] = True
    assert not np.array_equal(edited[3], before[3])
    (sid,) = out.GetSegmentation().GetSegmentIDs()
    _set_mask(out, sid, edited, volume)
    assert logic.refineCorrections(out) == {"blob": [3]}
    nodes = run["scene"].GetNumberOfNodes()
    stages = []
    job = logic.startRefine(out)
    assert job.corrections == {"blob": [3]}
    import time

    while not job.finished:
        job.poll()
        time.sleep(0.1)
    stages += [e for e in job.poll()]
    assert job.process.done["encoder_calls"] == 0 and job.process.done["cache_hits"] == 17  # 16 slices + support
    assert logic.finishRefine(job) is out
    assert run["scene"].GetNumberOfNodes() == nodes  # replaced in place, no new node
    after = _masks(out, volume)["blob"]
    np.testing.assert_array_equal(after[3], edited[3])  # written as drawn
    assert logic.canUndoRefine(out)
    logic.undoRefine(out)
    np.testing.assert_array_equal(_masks(out, volume)["blob"], edited)  # back to the user's edits
    assert not logic.canUndoRefine(out)
    with pytest.raises(InputError, match="no refine to undo"):
        logic.undoRefine(out)
    # the blocking form, with progress
    reports = []
    assert logic.refine(out, progressCallback=lambda *r: reports.append(r)) is out
    assert any("Refining slice" in stage for stage, _, _ in reports)


def test_refine_refuses_unknown_segments_and_other_nodes(run):
    logic, out, volume = run["logic"], run["out"], run["volume"]
    sid = out.GetSegmentation().AddEmptySegment("extra", "extra")
    mask = np.zeros(run["inside"].shape, np.uint8)
    mask[2, 5:9, 5:9] = 1
    _set_mask(out, sid, mask, volume)
    with pytest.raises(InputError, match="'extra' is not one of the run's structures"):
        logic.refineCorrections(out)
    other = run["scene"].AddNewNodeByClass("vtkMRMLSegmentationNode", "other")
    with pytest.raises(InputError, match="not the result of a FewShotSAM2 run"):
        logic.refine(other)
