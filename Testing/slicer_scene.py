"""MRML helpers for tests of the Slicer module on slicer-core (no Slicer application): a scene as Slicer sets it
up, a volume node read from a file, a segment from a boolean mask. Import only where `slicer` is importable
(`pytest.importorskip("slicer")` first)."""

import slicer
import vtk
from vtk.util import numpy_support


def new_scene():
    scene = slicer.vtkMRMLScene()
    # What the Slicer application does at startup: the Segmentations module logic registers its nodes and the
    # segmentation converter rules with the scene.
    segmentations_logic = slicer.vtkSlicerSegmentationsModuleLogic()
    segmentations_logic.SetMRMLScene(scene)
    scene._fewshot_keepalive = segmentations_logic  # noqa: SLF001  (keep the logic alive with the scene)
    return scene


def load_volume(scene, path, name, labelmap=False):
    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode", name)
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    if labelmap:
        storage.SetCenterImage(False)
    assert storage.ReadData(node), f"cannot read {path}"
    node.SetAndObserveStorageNodeID(storage.GetID())
    return node


def add_segment_from_mask(seg, mask, ijk_to_ras, name, color):
    nk, nj, ni = mask.shape
    image = slicer.vtkOrientedImageData()
    image.SetDimensions(ni, nj, nk)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(nk, nj, ni)[:] = mask
    image.SetImageToWorldMatrix(ijk_to_ras)
    segment_id = seg.GetSegmentation().AddEmptySegment(name.replace(" ", "_"), name, list(color))
    assert slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(image, seg, segment_id)
    return segment_id
