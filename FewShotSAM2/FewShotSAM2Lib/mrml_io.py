"""MRML nodes <-> the core's volumes and label maps, with the exact geometry. No Qt, no torch.

The core (`fewshotsam2.io.volume`) stores geometry in LPS (ITK); Slicer stores it in RAS. A volume node becomes a
`fewshotsam2.io.volume.Volume` (voxels copied, [k, j, i] order), a segment becomes a boolean mask on a volume's grid,
and a label map on the query's grid becomes a `vtkSegmentation` built off-scene and copied into a node in one step.
"""

from __future__ import annotations

import numpy as np
import vtk
from vtk.util import numpy_support

import slicer

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])

_converterRulesChecked = False


def inputError(message: str) -> Exception:
    from fewshotsam2.errors import InputError

    return InputError(message)


def nodeName(node) -> str:
    return node.GetName() if node is not None and node.GetName() else "(unnamed)"


def vtkMatrixToNumpy(matrix) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def numpyToVtkMatrix(array) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def ensureSegmentationConverterRules() -> None:
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


# ---------------------------------------------------------------------------------------------- volumes


def ijkToWorldMatrix(volumeNode) -> np.ndarray:
    """4x4 IJK -> world RAS of a volume, its parent transform included (refused if not linear)."""
    ijkToRAS = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(ijkToRAS)
    matrix = vtkMatrixToNumpy(ijkToRAS)
    transformNode = volumeNode.GetParentTransformNode()
    if transformNode is not None:
        if not transformNode.IsTransformToWorldLinear():
            raise inputError(
                f"Volume '{nodeName(volumeNode)}' is under a non-linear transform: harden the transform "
                "(Transforms module) or remove it before segmenting."
            )
        toWorld = vtk.vtkMatrix4x4()
        transformNode.GetMatrixTransformToWorld(toWorld)
        matrix = vtkMatrixToNumpy(toWorld) @ matrix
    return matrix


def volumeFromNode(volumeNode, what: str = "volume"):
    """The core's Volume for a scalar volume node: the voxels ([k, j, i], copied) and the exact geometry.

    Any orientation is kept (direction = the IJK axes in LPS); a sheared voxel grid cannot be a Volume and
    is refused with a message. With no parent transform the node's own spacing/origin/directions are used
    as they are, so the geometry round-trips exactly.
    """
    from fewshotsam2.io import volume

    imageData = volumeNode.GetImageData()
    if imageData is None or min(imageData.GetDimensions()) < 1:
        raise inputError(f"The {what} '{nodeName(volumeNode)}' has no voxels.")
    if imageData.GetNumberOfScalarComponents() != 1:
        raise inputError(
            f"The {what} '{nodeName(volumeNode)}' has {imageData.GetNumberOfScalarComponents()} components per "
            "voxel (colour or vector image); convert it to a scalar volume first."
        )
    array = np.array(slicer.util.arrayFromVolume(volumeNode), copy=True)
    if array.ndim != 3:
        raise inputError(f"The {what} '{nodeName(volumeNode)}' is not a 3D scalar volume.")
    if volumeNode.GetParentTransformNode() is None:
        directionsRAS = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASDirectionMatrix(directionsRAS)
        direction = vtkMatrixToNumpy(directionsRAS)[:3, :3]
        direction[:2, :] *= -1.0  # RAS -> LPS
        spacing = tuple(float(s) for s in volumeNode.GetSpacing())
        originRAS = volumeNode.GetOrigin()
        origin = (-float(originRAS[0]), -float(originRAS[1]), float(originRAS[2]))
    else:
        matrixLPS = RAS_TO_LPS @ ijkToWorldMatrix(volumeNode)
        axes = matrixLPS[:3, :3]
        spacing = tuple(float(s) for s in np.linalg.norm(axes, axis=0))
        direction = None  # the axes divided by the spacing, once it is known to be positive
        origin = tuple(float(v) for v in matrixLPS[:3, 3])
    if min(spacing) <= 0:
        raise inputError(f"The {what} '{nodeName(volumeNode)}' has a zero or negative voxel spacing.")
    if direction is None:
        direction = axes / np.array(spacing)
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
        raise inputError(
            f"The {what} '{nodeName(volumeNode)}' has a sheared (non-orthogonal) voxel grid, which SAM2 slices "
            "cannot represent. Resample it onto an orthogonal grid (Resample Scalar/Vector/DWI Volume) first."
        )
    return volume.Volume(array=array, spacing=spacing, origin=origin, direction=direction)


# ---------------------------------------------------------------------------------------------- segments


def _labelmapName() -> str:
    return slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()


def _convertedOnVolumeGrid(segmentationNode, segmentId: str, volumeNode):
    """A segment that has no binary labelmap yet (e.g. a closed surface), converted on the volume's voxel grid.

    vtkSlicerSegmentationsModuleLogic::GetSegmentRepresentation would convert it on the segmentation's own
    reference geometry, which may be much coarser than the volume. Here a copy of the segment alone is converted
    with the volume's grid (expressed in the segmentation's frame) as the reference geometry; the labelmap is then
    returned in world coordinates. None when the segmentation's transform is not linear (the caller falls back).
    """
    toWorld = np.eye(4)
    transformNode = segmentationNode.GetParentTransformNode()
    if transformNode is not None:
        if not transformNode.IsTransformToWorldLinear():
            return None
        matrix = vtk.vtkMatrix4x4()
        transformNode.GetMatrixTransformToWorld(matrix)
        toWorld = vtkMatrixToNumpy(matrix)
    volumeToSegmentation = np.linalg.inv(toWorld) @ ijkToWorldMatrix(volumeNode)
    source = segmentationNode.GetSegmentation()
    copy = slicer.vtkSegmentation()
    copy.SetSourceRepresentationName(source.GetSourceRepresentationName())
    copy.CopyConversionParameters(source)
    copy.SetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName(),
        slicer.vtkSegmentationConverter.SerializeImageGeometry(numpyToVtkMatrix(volumeToSegmentation),
                                                               volumeNode.GetImageData()))
    segment = slicer.vtkSegment()
    segment.DeepCopy(source.GetSegment(segmentId))
    copy.AddSegment(segment, segmentId)
    if not copy.CreateRepresentation(_labelmapName()):
        return None
    converted = copy.GetSegment(segmentId).GetRepresentation(_labelmapName())
    if converted is None:
        return None
    labelmap = slicer.vtkOrientedImageData()
    labelmap.DeepCopy(converted)
    local = vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(local)
    labelmap.SetImageToWorldMatrix(numpyToVtkMatrix(toWorld @ vtkMatrixToNumpy(local)))
    return labelmap


def segmentMaskOnVolume(segmentationNode, segmentId: str, volumeNode) -> np.ndarray:
    """Boolean [k, j, i] mask of one segment resampled (nearest neighbour) onto a volume's voxel grid.

    Works whatever the segmentation's own geometry, source representation or transforms: the segment's binary
    labelmap in world coordinates (converted on the volume's own grid when the segmentation has none, e.g. a
    closed surface) is resampled onto the volume's grid.
    """
    segmentation = segmentationNode.GetSegmentation()
    labelmap = None
    # a stored labelmap may be a layer shared by several segments: this segment's voxels carry its label value;
    # a converted one is this segment alone, with the converter's value (1), whatever GetLabelValue says
    labelValue = None
    sourceIsLabelmap = segmentation.GetSourceRepresentationName() == _labelmapName()
    if not sourceIsLabelmap and segmentation.GetSegment(segmentId) is not None:
        labelmap = _convertedOnVolumeGrid(segmentationNode, segmentId, volumeNode)
    if labelmap is None:
        labelmap = slicer.vtkOrientedImageData()
        if not slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(
            segmentationNode, segmentId, labelmap, True
        ):
            raise inputError(f"Segment '{segmentId}' of '{nodeName(segmentationNode)}' cannot be converted to a binary labelmap.")
        if sourceIsLabelmap:
            labelValue = segmentation.GetSegment(segmentId).GetLabelValue()
    dims = volumeNode.GetImageData().GetDimensions()
    mask = np.zeros((dims[2], dims[1], dims[0]), dtype=bool)
    extent = labelmap.GetExtent()
    if extent[1] < extent[0] or extent[3] < extent[2] or extent[5] < extent[4] or labelmap.GetPointData().GetScalars() is None:
        return mask  # empty segment
    reference = slicer.vtkOrientedImageData()
    reference.SetExtent(0, dims[0] - 1, 0, dims[1] - 1, 0, dims[2] - 1)
    reference.SetImageToWorldMatrix(numpyToVtkMatrix(ijkToWorldMatrix(volumeNode)))
    resampled = slicer.vtkOrientedImageData()
    if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
        labelmap, reference, resampled, False, False, None, 0
    ):
        raise inputError(
            f"Segment '{segmentId}' of '{nodeName(segmentationNode)}' cannot be resampled onto volume '{nodeName(volumeNode)}'."
        )
    rext = resampled.GetExtent()
    if rext[1] < rext[0] or resampled.GetPointData().GetScalars() is None:
        return mask
    values = numpy_support.vtk_to_numpy(resampled.GetPointData().GetScalars())
    values = values.reshape(rext[5] - rext[4] + 1, rext[3] - rext[2] + 1, rext[1] - rext[0] + 1)
    inside = values != 0 if labelValue is None else values == labelValue
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


def segmentationFromLabels(labels: np.ndarray, structures, queryVolumeNode, metadata: dict, layers=None):
    """A vtkSegmentation (not in any node) with one binary-labelmap segment per structure, on the query grid.

    metadata: structure name -> the support's vtkSegment whose name, colour and terminology are copied.
    layers: (layers, k, j, i) label layers (an `--overlap allow` result): each structure's voxels are those of its
    own layer (`structure.layer`) holding its value, so overlapping structures keep every voxel.
    """
    ijkToRAS = vtk.vtkMatrix4x4()
    queryVolumeNode.GetIJKToRASMatrix(ijkToRAS)  # local frame: the output gets the query's parent transform
    labelmapName = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
    segmentation = slicer.vtkSegmentation()
    segmentation.SetSourceRepresentationName(labelmapName)
    nk, nj, ni = labels.shape
    for structure in structures:
        image = slicer.vtkOrientedImageData()
        image.SetDimensions(ni, nj, nk)
        image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
        voxels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(nk, nj, ni)
        voxels[:] = (labels if layers is None else layers[structure.layer]) == structure.value
        image.SetImageToWorldMatrix(ijkToRAS)
        segment = slicer.vtkSegment()
        source = metadata.get(structure.name)
        if source is not None:
            segment.DeepCopyMetadata(source)  # name, colour, terminology and other tags of the support's segment
        segment.SetLabelValue(1)  # the voxel value in `image` (DeepCopyMetadata copied the support's value)
        segment.SetName(structure.name)
        segment.SetColor(*[float(c) for c in structure.color])
        segment.AddRepresentation(labelmapName, image)
        segmentation.AddSegment(segment, segmentation.GenerateUniqueSegmentID(structure.name))
    # Segments that do not overlap share one labelmap layer, as Slicer's editor does; with forceToSingleLayer off,
    # overlapping ones (--overlap allow) go to separate layers and keep their voxels (vtkSegmentation.cxx).
    segmentation.CollapseBinaryLabelmaps(False)
    return segmentation


OUTPUT_ATTRIBUTES = ("FewShotSAM2.Method", "FewShotSAM2.QueryVolumeID")  # the second: written by earlier versions
QUERY_REFERENCE_ROLE = "FewShotSAM2.QueryVolume"  # output segmentation -> the query volume it was made from


def hasClosedSurface(segmentationNode) -> bool:
    """Whether the segmentation holds a closed surface (Show 3D was on)."""
    name = slicer.vtkSegmentationConverter.GetSegmentationClosedSurfaceRepresentationName()
    segmentation = segmentationNode.GetSegmentation()
    return segmentation is not None and bool(segmentation.ContainsRepresentation(name))


def backupSegmentationNode(node) -> dict:
    segmentation = slicer.vtkSegmentation()
    segmentation.DeepCopy(node.GetSegmentation())
    role = node.GetReferenceImageGeometryReferenceRole()
    return {
        "segmentation": segmentation,
        "referenceID": node.GetNodeReferenceID(role),
        "transformID": node.GetTransformNodeID(),
        "attributes": {name: node.GetAttribute(name) for name in OUTPUT_ATTRIBUTES},
        "queryID": node.GetNodeReferenceID(QUERY_REFERENCE_ROLE),
    }


def restoreSegmentationNode(node, backup: dict) -> None:
    wasModifying = node.StartModify()
    try:
        node.GetSegmentation().DeepCopy(backup["segmentation"])
        node.SetNodeReferenceID(node.GetReferenceImageGeometryReferenceRole(), backup["referenceID"])
        node.SetAndObserveTransformNodeID(backup["transformID"])
        node.SetNodeReferenceID(QUERY_REFERENCE_ROLE, backup["queryID"])
        for name, value in backup["attributes"].items():
            if value is None:
                node.RemoveAttribute(name)
            else:
                node.SetAttribute(name, value)
    finally:
        node.EndModify(wasModifying)
