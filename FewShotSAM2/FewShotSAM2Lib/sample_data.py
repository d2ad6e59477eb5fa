"""The demo scans in Slicer's Sample Data module: a labeled support CT (ct-a) and a query CT (ct-b, DICOM).

The addresses and SHA256 checksums come from the core's table (`fewshotsam2.io.sample_data.DEMO_FILES`: the
TotalSegmentator example files at a pinned commit), so the command line and Slicer download the same bytes.
SampleData checks each download against its checksum.

Clicking a sample runs its `customDownloader` (SampleData's widget calls it instead of its own loading;
`FewShotSAM2SampleData` in the module file, as it needs the application):
- the query's 20 DICOM files go into a folder of their own inside Slicer's download cache, and one of them is
  loaded: the archetype reader then reads that folder only, not the whole shared cache;
- the support's label map becomes a segmentation whose segments are named and coloured ("liver", "spleen"), not
  `Label_5` / `Label_1` as Slicer's label-map import names them.
Scripted `SampleData.downloadSample(name)` ignores `customDownloader` and loads the plain lists (same files).
"""

from __future__ import annotations

import logging

CATEGORY = "FewShotSAM2"
SUPPORT_SAMPLE = "FewShotSAM2 support CT (ct-a, labeled)"
QUERY_SAMPLE = "FewShotSAM2 query CT (ct-b)"
QUERY_FOLDER = "FewShotSAM2-ct-b-dicom"  # inside Slicer's download cache: the query series and nothing else
# the demo's structures in the support's label map: value -> (segment name, colour)
STRUCTURE_COLORS = {"liver": (0.85, 0.45, 0.35), "spleen": (0.55, 0.2, 0.6)}


def demoStructures() -> list[tuple[int, str, tuple]]:
    """[(label value, name, colour)] of the demo's support labels, from the core's DEMO_LABELS ("liver=5,...")."""
    from fewshotsam2.io import sample_data

    out = []
    for item in sample_data.DEMO_LABELS.split(","):
        name, value = item.split("=")
        out.append((int(value), name.strip(), STRUCTURE_COLORS.get(name.strip(), (0.9, 0.9, 0.2))))
    return out


def namedSegmentation(scene, labelmapNode, name: str, structures=None):
    """A segmentation node with one named, coloured segment per (value, name, colour) of a label map volume node,
    on the label map's grid (no Qt: runs on slicer-core). Values absent from the label map give empty segments."""
    import slicer
    import vtk
    from vtk.util import numpy_support

    structures = demoStructures() if structures is None else structures
    labels = slicer.util.arrayFromVolume(labelmapNode)
    ijkToRAS = vtk.vtkMatrix4x4()
    labelmapNode.GetIJKToRASMatrix(ijkToRAS)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(labelmapNode)
    nk, nj, ni = labels.shape
    for value, segmentName, color in structures:
        image = slicer.vtkOrientedImageData()
        image.SetDimensions(ni, nj, nk)
        image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
        numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(nk, nj, ni)[:] = (labels == value)
        image.SetImageToWorldMatrix(ijkToRAS)
        segmentId = segmentation.GetSegmentation().AddEmptySegment(segmentName, segmentName, [float(c) for c in color])
        if not slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(image, segmentation, segmentId):
            raise RuntimeError(f"segment '{segmentName}' could not be made from '{labelmapNode.GetName()}'")
    if labelmapNode.GetParentTransformNode() is not None:
        segmentation.SetAndObserveTransformNodeID(labelmapNode.GetTransformNodeID())
    return segmentation


def sampleSources(downloadSupport=None, downloadQuery=None) -> list[dict]:
    """Keyword arguments of SampleDataLogic.registerCustomSampleDataSource for the two demo samples; the
    downloaders (FewShotSAM2SampleData's, in the module file: they need the application) become their
    customDownloader."""
    from fewshotsam2.io import sample_data

    files = list(sample_data.DEMO_FILES)
    byPath = {f.path: f for f in files}
    image, labels = byPath[sample_data.DEMO_SUPPORT_IMAGE], byPath[sample_data.DEMO_SUPPORT_LABELS]
    support = dict(
        category=CATEGORY,
        sampleName=SUPPORT_SAMPLE,
        uris=[image.url, labels.url],
        fileNames=["FewShotSAM2-ct-a.nii.gz", "FewShotSAM2-ct-a-labels.nii.gz"],
        nodeNames=["ct-a", "ct-a labels"],
        loadFileTypes=["VolumeFile", "SegmentationFile"],
        loadFiles=[True, True],
        checksums=[f"SHA256:{image.sha256}", f"SHA256:{labels.sha256}"],
        customDownloader=downloadSupport,
    )
    # the query is a 20-file DICOM series: every file is downloaded under its own (unique, UID-based) name, then
    # the last one is loaded as a volume: Slicer's archetype reader reads the files of the same series beside it
    # (downloadQuery puts them in a folder of their own; the plain lists, for scripts, use the cache folder)
    dicom = sorted((f for f in files if f.path.startswith(sample_data.DEMO_QUERY + "/")), key=lambda f: f.path)
    query = dict(
        category=CATEGORY,
        sampleName=QUERY_SAMPLE,
        uris=[f.url for f in dicom],
        fileNames=[f.path.rsplit("/", 1)[-1] for f in dicom],
        nodeNames=[None] * (len(dicom) - 1) + ["ct-b"],
        loadFileTypes=[None] * (len(dicom) - 1) + ["VolumeFile"],
        loadFiles=[False] * (len(dicom) - 1) + [True],
        checksums=[f"SHA256:{f.sha256}" for f in dicom],
        customDownloader=downloadQuery,
    )
    return [support, query]


def register(downloadSupport=None, downloadQuery=None) -> None:
    """Register the demo samples with Slicer's SampleData module (Slicer application only)."""
    try:
        import SampleData
    except ImportError:
        return  # SampleData module not loaded (e.g. Slicer started with --disable-modules)
    try:
        sources = sampleSources(downloadSupport, downloadQuery)
    except (ImportError, AttributeError, KeyError) as exc:
        logging.warning("FewShotSAM2: sample data not registered (%s)", exc)
        return
    for source in sources:
        SampleData.SampleDataLogic.registerCustomSampleDataSource(**source)
