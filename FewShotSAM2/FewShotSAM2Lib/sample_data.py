"""The demo scans in Slicer's Sample Data module: a labeled support CT (ct-a) and a query CT (ct-b, DICOM).

The addresses and SHA256 checksums come from the core's table (`fewshotsam2.sample_data.DEMO_FILES`: the
TotalSegmentator example files at a pinned commit), so the command line and Slicer download the same bytes.
SampleData checks each download against its checksum.
"""

from __future__ import annotations

import logging

CATEGORY = "FewShotSAM2"
SUPPORT_SAMPLE = "FewShotSAM2 support CT (ct-a, labeled)"
QUERY_SAMPLE = "FewShotSAM2 query CT (ct-b)"


def sampleSources() -> list[dict]:
    """Keyword arguments of SampleDataLogic.registerCustomSampleDataSource for the two demo samples."""
    from fewshotsam2 import sample_data

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
    )
    # the query is a 20-file DICOM series: every file is downloaded into Slicer's cache folder under its own
    # (unique, UID-based) name, then the last one is loaded as a volume: Slicer's archetype reader reads the
    # files of the same series beside it
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
    )
    return [support, query]


def register() -> None:
    """Register the demo samples with Slicer's SampleData module (Slicer application only)."""
    try:
        import SampleData
    except ImportError:
        return  # SampleData module not loaded (e.g. Slicer started with --disable-modules)
    try:
        sources = sampleSources()
    except (ImportError, AttributeError, KeyError) as exc:
        logging.warning("FewShotSAM2: sample data not registered (%s)", exc)
        return
    for source in sources:
        SampleData.SampleDataLogic.registerCustomSampleDataSource(**source)
