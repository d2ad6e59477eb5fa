"""DICOM SEG in and out (highdicom): results for PACS, and DICOM SEG files as support labels.

Writing: a binary DICOM Segmentation that references the query's DICOM series (its Study, Series and SOP Instance
UIDs and Frame of Reference), one frame per labeled source slice, one segment per structure with its name, a
coded property (SNOMED CT for the common organs, else "Tissue") and the algorithm (FewShotSAM2, version, method).
The frames' plane positions are the query volume's own geometry (checked against every source file first).

Anonymised series often have empty SOP Class/Instance UIDs and Study/Series Instance UIDs in the datasets while
the file meta keeps the Media Storage SOP Class/Instance UIDs (ct-b of the sample data is one). highdicom refuses
such sources; here the instances are referenced by their file meta UIDs and a missing Study/Series Instance UID is
made up once per series, deterministically from the instances' UIDs (so two runs over the same series give the same
study and series), with one warning saying what was done. A file with neither UID is refused.

highdicom and pydicom are optional (the `dicom` extra): imported only when a SEG is read or written.
"""

from __future__ import annotations

import re
import uuid
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from fewshotsam2 import __version__
from fewshotsam2.errors import InputError
from fewshotsam2.io.atomic import atomic_path
from fewshotsam2.io.volume import (Structure, Volume, _split_series, default_structure, dicom_series_files,
                                   structure_mask)

SUFFIXES = (".dcm",)
INSTALL_HINT = "pip install highdicom (or pip install 'fewshotsam2[dicom]')"
# mm: the query's geometry must put each slice where its source file says (files store positions as text)
POSITION_TOLERANCE = 1e-3
# SNOMED CT codes of common structures, by pydicom's code-dictionary keyword; a name matches after lower-casing,
# "_" and "-" to spaces, and dropping a side word (TotalSegmentator's "kidney_right" is a kidney; the segment's
# label keeps the side)
_SCT_BY_NAME = {
    "liver": "Liver", "spleen": "Spleen", "kidney": "Kidney", "stomach": "Stomach", "pancreas": "Pancreas",
    "gallbladder": "Gallbladder", "adrenal gland": "AdrenalGland", "lung": "Lung", "heart": "Heart",
    "aorta": "Aorta", "brain": "Brain", "grey matter": "GrayMatter", "gray matter": "GrayMatter",
    "white matter": "WhiteMatter", "csf": "CerebrospinalFluid", "cerebrospinal fluid": "CerebrospinalFluid",
    "prostate": "Prostate", "esophagus": "Esophagus", "oesophagus": "Esophagus", "duodenum": "Duodenum",
    "colon": "Colon", "small intestine": "SmallIntestine", "small bowel": "SmallIntestine",
    "inferior vena cava": "InferiorVenaCava", "portal vein": "PortalVein", "trachea": "Trachea",
    "thyroid": "Thyroid", "thyroid gland": "Thyroid", "vertebra": "Vertebra", "bone": "Bone", "muscle": "Muscle",
    "fat": "Fat", "skin": "Skin", "tumour": "Tumor", "tumor": "Tumor", "lesion": "Lesion",
}
_SIDE_WORDS = {"left", "right", "l", "r"}
_MORPHOLOGY = {"Tumor", "Lesion"}  # category "Morphologically Abnormal Structure"; tissues category "Tissue"
_TISSUES = {"GrayMatter", "WhiteMatter", "CerebrospinalFluid", "Bone", "Muscle", "Fat", "Tissue"}


def is_dicom_seg_path(path: object) -> bool:
    """Whether an output or label path names a DICOM SEG file (`.dcm`)."""
    return str(path).lower().endswith(SUFFIXES)


def _modules():
    try:
        import highdicom
        import pydicom
    except ImportError:
        raise InputError(f"DICOM SEG needs the highdicom package: {INSTALL_HINT}") from None
    return highdicom, pydicom


def coded_property(name: str):
    """(category, type) codes of a structure name: SNOMED CT where the name is a known structure, else Tissue."""
    from pydicom.sr.codedict import codes

    words = [w for w in re.sub(r"[_\-]+", " ", name.strip().lower()).split() if w not in _SIDE_WORDS]
    keyword = _SCT_BY_NAME.get(" ".join(words)) or _SCT_BY_NAME.get(" ".join(words).rstrip("s"), "Tissue")
    kind = getattr(codes.SCT, keyword)
    if keyword in _MORPHOLOGY:
        category = codes.SCT.MorphologicallyAbnormalStructure
    elif keyword in _TISSUES:
        category = codes.SCT.Tissue
    else:
        category = codes.SCT.AnatomicalStructure
    return category, kind


# ---------------------------------------------------------------------------------------------- the sources


def _derived_uid(what: str, instance_uids: Sequence[str]) -> str:
    # the same series always gets the same made-up UID: 2.25 + a name-based (version 5) UUID of its instances' UIDs
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, chr(92).join(['fewshotsam2', what, *instance_uids])).int}"


def read_sources(files: Sequence[str]) -> list:
    """The source datasets (no pixel data) with their identity completed as the module docstring says."""
    _highdicom, pydicom = _modules()
    datasets = []
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception as exc:  # pydicom raises several kinds for a damaged file
            raise InputError(f"{f}: cannot read as DICOM ({type(exc).__name__}: {exc})") from None
        datasets.append(ds)
    done = []
    for ds, f in zip(datasets, files):
        meta = getattr(ds, "file_meta", None)
        for tag, meta_tag in (("SOPInstanceUID", "MediaStorageSOPInstanceUID"),
                              ("SOPClassUID", "MediaStorageSOPClassUID")):
            if not str(ds.get(tag, "") or "").strip():
                value = str(meta.get(meta_tag, "") or "").strip() if meta is not None else ""
                if not value:
                    raise InputError(f"{f}: has no {tag}, in the dataset or as {meta_tag} in its file meta; "
                                     "a DICOM SEG cannot reference it (give the series with its UIDs)")
                setattr(ds, tag, value)
                done.append(tag)
    uids = [str(ds.SOPInstanceUID) for ds in datasets]
    for tag, what in (("StudyInstanceUID", "study"), ("SeriesInstanceUID", "series")):
        present = {str(ds.get(tag, "") or "").strip() for ds in datasets} - {""}
        if len(present) > 1:
            raise InputError(f"{Path(files[0]).parent}: the files of this series name {len(present)} different "
                             f"{tag}s; give one series (FOLDER#N)")
        value = present.pop() if present else _derived_uid(what, uids)
        if any(str(ds.get(tag, "") or "").strip() != value for ds in datasets):
            done.append(tag)
        for ds in datasets:
            setattr(ds, tag, value)
    for ds in datasets:
        if not str(ds.get("FrameOfReferenceUID", "") or "").strip():
            raise InputError(f"{Path(files[0]).parent}: the series has no Frame of Reference UID; a DICOM SEG needs "
                             "one to place its frames")
        for tag in ("StudyID", "AccessionNumber", "PatientID", "PatientName", "PatientBirthDate", "PatientSex",
                    "ReferringPhysicianName", "StudyDate", "StudyTime"):
            if tag not in ds:  # type 2 attributes: present, may be empty
                setattr(ds, tag, "")
    if done:
        kinds = sorted(set(done))
        warnings.warn(
            f"{Path(files[0]).parent}: an anonymised series (empty {', '.join(kinds)}): the DICOM SEG references its "
            "instances by the file meta's Media Storage SOP Instance/Class UIDs"
            + (" and gives the study and series UIDs made up from them (the same on every run)"
               if {"StudyInstanceUID", "SeriesInstanceUID"} & set(kinds) else ""),
            stacklevel=3)
    return datasets


def _check_geometry(labels: "Volume", datasets: list, files: Sequence[str]) -> None:
    """Slice k of `labels` must lie where source file k says (same grid): otherwise the SEG would misplace it."""
    rows, cols = labels.shape[1], labels.shape[2]
    if len(datasets) != labels.shape[0]:
        raise InputError(f"the labels have {labels.shape[0]} slices, the DICOM series {len(datasets)} files: the "
                         "labels are not on this series' grid")
    m = labels.ijk_to_lps()
    for k, (ds, f) in enumerate(zip(datasets, files)):
        expected = m @ np.array([0.0, 0.0, k, 1.0])
        try:
            position = np.array([float(v) for v in ds.ImagePositionPatient])
            orientation = np.array([float(v) for v in ds.ImageOrientationPatient])
            size = (int(ds.Rows), int(ds.Columns))
        except (AttributeError, TypeError, ValueError):
            raise InputError(f"{f}: lacks Image Position/Orientation (Patient), Rows or Columns; cannot place "
                             "a DICOM SEG frame on it") from None
        direction = labels.direction
        if size != (rows, cols) or np.max(np.abs(position - expected[:3])) > POSITION_TOLERANCE \
                or np.max(np.abs(orientation - np.concatenate([direction[:, 0], direction[:, 1]]))) > 1e-4:
            raise InputError(f"{f}: slice {k} of the labels does not lie on this file's plane (the labels are not on "
                             "the query series' grid)")


# ---------------------------------------------------------------------------------------------- writing


def check_query(query: str | Path) -> None:
    """Before any work: a DICOM SEG output needs a DICOM series as the query, and highdicom."""
    folder, _choice = _split_series(query)
    if not folder.is_dir():
        raise InputError(f"a DICOM SEG output (.dcm) needs a DICOM series as the query (it references the source "
                         f"images); {query} is not a DICOM folder: write .nii.gz, .nrrd or .seg.nrrd instead")
    _modules()


def write_dicom_seg(
    path: str | Path,
    labels: "Volume",
    structures: Sequence["Structure"],
    query: str | Path,
    method: str = "",
    model: str = "",
) -> None:
    """Write `labels` (on the query's grid: the pipeline's output) as a binary DICOM SEG referencing the DICOM
    series `query` (FOLDER, FOLDER#N or FOLDER#SERIES_UID). Temporary name, renamed when complete."""
    highdicom, pydicom = _modules()
    from pydicom.sr.codedict import codes

    check_query(query)
    files = dicom_series_files(query)
    datasets = read_sources(files)
    _check_geometry(labels, datasets, files)
    algorithm = highdicom.AlgorithmIdentificationSequence(
        name="FewShotSAM2", family=codes.cid7162.ArtificialIntelligence, version=str(__version__),
        parameters={k: v for k, v in (("method", method), ("model", model)) if v} or None)
    descriptions, masks = [], []
    for number, s in enumerate(structures, 1):
        category, kind = coded_property(s.name)
        r, g, b = (int(round(255 * min(max(float(c), 0.0), 1.0))) for c in s.color)
        descriptions.append(highdicom.seg.SegmentDescription(
            segment_number=number, segment_label=s.name[:64] or f"Segment {number}",
            segmented_property_category=category, segmented_property_type=kind,
            algorithm_type=highdicom.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            display_color=highdicom.color.CIELabColor.from_rgb(r, g, b)))
        masks.append(structure_mask(labels, s))
    # (frames, rows, columns, segments); frame k = source file k = slice k of the query array
    pixels = np.stack(masks, axis=-1).astype(np.uint8) if masks else np.zeros(labels.shape + (0,), np.uint8)
    if not pixels.any():
        # highdicom cannot write a SEG without a frame; an empty result is kept as a SEG with every frame
        omit = False
    else:
        omit = True
    direction = labels.direction
    first = datasets[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # highdicom's notes on attributes it copies
        seg = highdicom.seg.Segmentation(
            source_images=datasets,
            pixel_array=pixels,
            segmentation_type=highdicom.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=highdicom.UID(),
            series_number=_series_number(first),
            sop_instance_uid=highdicom.UID(),
            instance_number=1,
            manufacturer="FewShotSAM2",
            manufacturer_model_name="FewShotSAM2",
            software_versions=str(__version__),
            device_serial_number="0",
            content_description=f"FewShotSAM2 {method}".strip()[:64],
            content_label="FEWSHOTSAM2",
            plane_orientation=highdicom.PlaneOrientationSequence(
                "PATIENT", [float(v) for v in np.concatenate([direction[:, 0], direction[:, 1]])]),
            pixel_measures=highdicom.PixelMeasuresSequence(
                pixel_spacing=[labels.spacing[1], labels.spacing[0]],  # DICOM: (between rows, between columns)
                slice_thickness=float(first.get("SliceThickness") or labels.spacing[2]),
                spacing_between_slices=labels.spacing[2]),
            plane_positions=[highdicom.PlanePositionSequence(
                "PATIENT", [float(v) for v in (labels.ijk_to_lps() @ np.array([0.0, 0.0, k, 1.0]))[:3]])
                for k in range(labels.shape[0])],
            omit_empty_frames=omit,
        )
    with atomic_path(Path(path)) as tmp:
        seg.save_as(str(tmp))


def _series_number(ds) -> int:
    try:
        return int(ds.get("SeriesNumber") or 0) + 1000  # beside the source's number, as many viewers do for derived
    except (TypeError, ValueError):
        return 1000


# ---------------------------------------------------------------------------------------------- reading


def read_dicom_seg(path: str | Path) -> tuple["Volume", list["Structure"]]:
    """A DICOM SEG file as a label map on its own frames' grid, with its segments' names and colours.

    Segment n becomes label value n. Overlapping segments are kept in layers (as `.seg.nrrd`), so each segment's
    mask stays whole. The grid spans the SEG's frames (highdicom's `get_volume`); `volume.read_labels` resamples
    it to the image by physical geometry like any label map.
    """
    highdicom, pydicom = _modules()
    p = Path(path)
    try:
        seg = highdicom.seg.segread(str(p))
    except Exception as exc:  # not DICOM, not a SEG, damaged
        raise InputError(f"{p.name}: cannot read as a DICOM SEG ({type(exc).__name__}: {_short(exc)})") from None
    numbers = [int(d.SegmentNumber) for d in seg.SegmentSequence]
    if not numbers:
        raise InputError(f"{p.name}: the DICOM SEG has no segments")
    try:
        vol = seg.get_volume(combine_segments=False, allow_missing_positions=True)
    except Exception as exc:
        raise InputError(f"{p.name}: cannot place the DICOM SEG's frames on a regular grid ({_short(exc)})") from None
    array = np.asarray(vol.array)  # (slices, rows, columns, segments), in highdicom's volume order
    affine = np.asarray(vol.affine, dtype=float)
    if affine.shape != (4, 4):
        raise InputError(f"{p.name}: the DICOM SEG's frames do not form a 3D grid")
    # highdicom's affine maps (slice, row, column) indices to LPS; ours maps (i=column, j=row, k=slice)
    columns = affine[:3, [2, 1, 0]]
    spacing = np.linalg.norm(columns, axis=0)
    if np.any(spacing <= 0):
        raise InputError(f"{p.name}: the DICOM SEG's frames do not form a 3D grid")
    direction = columns / spacing
    masks = [array[..., n] > 0 for n in range(array.shape[-1])]
    structures = []
    for n, d in enumerate(seg.SegmentSequence, 1):
        color = default_structure(n).color
        if "RecommendedDisplayCIELabValue" in d:
            rgb = highdicom.color.CIELabColor.from_dicom_value(list(d.RecommendedDisplayCIELabValue)).to_rgb()
            color = tuple(float(c) / 255.0 for c in rgb)
        structures.append(Structure(n, str(getattr(d, "SegmentLabel", "") or f"Segment {n}"), color))
    # empty segments are left out with a warning, as for a .seg.nrrd
    for n in range(len(structures) - 1, -1, -1):
        if not masks[n].any():
            warnings.warn(f"{p.name}: segment '{structures[n].name}' is empty; ignored", stacklevel=3)
            del masks[n], structures[n]
    if not structures:
        raise InputError(f"{p.name}: the DICOM SEG has no labeled voxel")
    overlap = np.sum(masks, axis=0) > 1 if masks else None
    flat = np.zeros(array.shape[:3], dtype=np.uint16 if len(masks) > 255 else np.uint8)
    layers = None
    if overlap is not None and overlap.any():
        layers = np.stack([np.where(m, s.value, 0) for s, m in zip(structures, masks)]).astype(flat.dtype)
        for i in range(len(structures)):
            structures[i] = Structure(structures[i].value, structures[i].name, structures[i].color, layer=i)
    for s, m in zip(structures, masks):
        flat[m] = s.value  # later segments on top, as .seg.nrrd layers flatten
    out = Volume(flat, tuple(spacing), tuple(affine[:3, 3]), direction, layers=layers)
    return out, structures


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:200] if text else type(exc).__name__
