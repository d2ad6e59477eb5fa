"""Volumes and label maps: reading, aligning labels to an image by physical geometry, writing atomically.

Geometry convention (docs/architecture.md): `Volume.array` is indexed [k, j, i] (SimpleITK's
GetArrayFromImage order); `spacing` and `origin` are in (i, j, k) order, millimetres, origin in LPS;
`direction` is 3x3 with *columns* = i, j, k axis directions in LPS.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import SimpleITK as sitk

from .atomic import atomic_path
from .errors import InputError

PathLike = Union[str, Path]

# Output formats, longest first so ".seg.nrrd" wins over ".nrrd" and ".nii.gz" over ".nii".
OUTPUT_EXTENSIONS = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd")

# Distinct colours (RGB 0..1) for label values without a colour of their own; value v gets PALETTE[(v-1) % len].
# Taken from 3D Slicer's GenericAnatomyColors first entries so results look familiar in Slicer.
PALETTE: tuple[tuple[float, float, float], ...] = (
    (0.502, 0.682, 0.502),  # tissue green
    (0.945, 0.839, 0.569),  # bone yellow
    (0.694, 0.478, 0.396),  # skin brown
    (0.435, 0.722, 0.824),  # blue
    (0.847, 0.396, 0.310),  # red
    (0.867, 0.510, 0.396),  # salmon
    (0.565, 0.933, 0.565),  # light green
    (0.753, 0.408, 0.690),  # purple
    (0.863, 0.961, 0.078),  # lime
    (0.306, 0.247, 0.000),  # dark olive
    (1.000, 0.980, 0.863),  # cream
    (0.902, 0.863, 0.275),  # mustard
)


@dataclass
class Structure:
    """One labeled structure: its voxel value in a label map, a display name and an RGB colour (0..1)."""

    value: int
    name: str
    color: tuple[float, float, float]


def default_structure(value: int) -> Structure:
    """A structure for a label value the file does not name: "Label N" and a palette colour.

    We do not guess anatomical names from the value: numbering schemes differ (value 1 is the spleen in
    TotalSegmentator, CSF in IBSR), and a wrong name is worse than a neutral one.
    """
    return Structure(int(value), f"Label {int(value)}", PALETTE[(int(value) - 1) % len(PALETTE)])


@dataclass(eq=False)  # arrays make field-wise == ambiguous; use same_grid / np.array_equal
class Volume:
    """A 3D image or label map with its physical geometry (see the module docstring for the convention)."""

    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray

    def __post_init__(self) -> None:
        self.spacing = tuple(float(s) for s in self.spacing)  # type: ignore[assignment]
        self.origin = tuple(float(o) for o in self.origin)  # type: ignore[assignment]
        self.direction = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    @classmethod
    def from_sitk(cls, img: sitk.Image) -> "Volume":
        if img.GetDimension() != 3:
            raise InputError(f"expected a 3D image, got {img.GetDimension()}D")
        return cls(
            array=sitk.GetArrayFromImage(img),
            spacing=img.GetSpacing(),
            origin=img.GetOrigin(),
            direction=np.array(img.GetDirection()).reshape(3, 3),
        )

    def to_sitk(self) -> sitk.Image:
        array = self.array.astype(np.uint8) if self.array.dtype == bool else self.array
        img = sitk.GetImageFromArray(np.ascontiguousarray(array), isVector=False)
        img.SetSpacing(self.spacing)
        img.SetOrigin(self.origin)
        img.SetDirection(tuple(float(v) for v in self.direction.reshape(-1)))
        return img

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape, (k, j, i) order."""
        return tuple(self.array.shape)  # type: ignore[return-value]

    def ijk_to_lps(self) -> np.ndarray:
        """4x4 matrix from voxel index (i, j, k, 1) to physical LPS millimetres."""
        m = np.eye(4)
        m[:3, :3] = self.direction @ np.diag(self.spacing)
        m[:3, 3] = self.origin
        return m

    def _corners_lps(self) -> np.ndarray:
        size_ijk = np.array(self.shape[::-1], dtype=float) - 1.0
        corners = np.array([[a, b, c, 1.0] for a in (0, 1) for b in (0, 1) for c in (0, 1)])
        corners[:, :3] *= size_ijk
        return (self.ijk_to_lps() @ corners.T).T[:, :3]

    def same_grid(self, other: "Volume", tol: float = 1e-4) -> bool:
        """True if both volumes have the same shape and voxel centres in the same physical places.

        Compares the 8 corner voxel centres; they must agree within `tol` x the grid's diagonal length (mm),
        at least `tol` mm. Relative, because files store geometry in float32 (NIfTI) and rounding grows with
        the distance from the origin.
        """
        if self.shape != other.shape:
            return False
        a, b = self._corners_lps(), other._corners_lps()
        diagonal = float(np.linalg.norm(a[0] - a[-1]))
        return bool(np.max(np.linalg.norm(a - b, axis=1)) <= tol * max(1.0, diagonal))

    def with_array(self, array: np.ndarray) -> "Volume":
        """A volume on the same grid holding another array (same shape required)."""
        if tuple(array.shape) != self.shape:
            raise ValueError(f"array shape {array.shape} does not match the volume shape {self.shape}")
        return Volume(array, self.spacing, self.origin, self.direction.copy())


# ---------------------------------------------------------------------------------------------- reading


def _check_image(img: sitk.Image, path: PathLike) -> None:
    """Refuse what the pipeline cannot segment: not 3D, vector pixels, a single slice."""
    name = Path(path).name
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{name}: has {img.GetNumberOfComponentsPerPixel()} components per voxel (vector/colour image); "
            "expected a scalar 3D scan"
        )
    dim = img.GetDimension()
    if dim == 2 or (dim == 3 and min(img.GetSize()) < 2):
        raise InputError(f"{name}: is a 2D image (size {img.GetSize()}); expected a 3D scan with several slices (for DICOM, give the series folder)")
    if dim != 3:
        raise InputError(f"{name}: is a {dim}D image (size {img.GetSize()}); expected a single 3D scan")


def _read_dicom_folder(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    try:
        series = reader.GetGDCMSeriesIDs(str(folder))
    except RuntimeError:
        series = ()
    if not series:
        raise InputError(f"{folder}: folder contains no DICOM series")
    files_per_series = {sid: reader.GetGDCMSeriesFileNames(str(folder), sid) for sid in series}
    chosen = max(files_per_series, key=lambda sid: len(files_per_series[sid]))
    if len(series) > 1:
        warnings.warn(
            f"{folder}: {len(series)} DICOM series found; using the largest ({len(files_per_series[chosen])} files, "
            f"series {chosen})",
            stacklevel=3,
        )
    reader.SetFileNames(files_per_series[chosen])
    try:
        return reader.Execute()
    except RuntimeError as e:
        raise InputError(f"{folder}: cannot read the DICOM series: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    # ITK messages are multi-line with file/line noise; the last non-empty line says what went wrong.
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__


def _read_image(path: PathLike) -> sitk.Image:
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file or folder")
    if p.is_dir():
        img = _read_dicom_folder(p)
    else:
        try:
            img = sitk.ReadImage(str(p))
        except RuntimeError as e:
            raise InputError(f"{p.name}: cannot read as an image ({_first_line(e)})") from None
    _check_image(img, p)
    return img


def read_volume(path: PathLike) -> Volume:
    """Read a 3D scan: NIfTI, NRRD, MHA/MHD file or a DICOM series folder (largest series if several).

    Keeps the native pixel type and values. Raises InputError for a missing path, an unreadable file,
    a 2D image (including a single-slice 3D image), 4D or vector images, and NaN/inf intensities.
    """
    img = _read_image(path)
    if img.GetPixelID() in (sitk.sitkComplexFloat32, sitk.sitkComplexFloat64):
        raise InputError(f"{Path(path).name}: complex-valued image; expected a scalar 3D scan")
    vol = Volume.from_sitk(img)
    if np.issubdtype(vol.array.dtype, np.floating) and not np.all(np.isfinite(vol.array)):
        raise InputError(f"{Path(path).name}: contains NaN or infinite intensities")
    return vol


def _as_label_array(array: np.ndarray, name: str) -> np.ndarray:
    """Integer-valued, non-negative labels as uint8/uint16/int32 (smallest that fits)."""
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
            raise InputError(f"{name}: label values are not integers; expected a label map (0 = background)")
    elif not (np.issubdtype(array.dtype, np.integer) or array.dtype == bool):
        raise InputError(f"{name}: unsupported label pixel type {array.dtype}")
    if array.size and array.min() < 0:
        raise InputError(f"{name}: negative label values; expected a label map (0 = background)")
    top = int(array.max()) if array.size else 0
    dtype = np.uint8 if top < 256 else np.uint16 if top < 65536 else np.int32
    return array.astype(dtype, copy=False)


def _read_seg_nrrd(path: Path) -> tuple[Volume, list[Structure]]:
    """A Slicer .seg.nrrd: every segment becomes its own label value.

    Segments in several layers (overlapping segments) may share label values; then values are renumbered
    1..N in segment order. A voxel can hold one value only, so where segments overlap the later segment
    wins (documented choice: the pipeline segments one value per voxel).
    """
    import slicerio  # imported here: only .seg.nrrd needs it

    try:
        seg = slicerio.read_segmentation(str(path))
    except Exception as e:  # slicerio raises IOError, nrrd errors, KeyError on odd headers
        raise InputError(f"{path.name}: cannot read the segmentation ({_first_line(e)})") from None
    voxels = np.asarray(seg["voxels"])
    if voxels.ndim == 3:
        voxels = voxels[np.newaxis]
    if voxels.ndim != 4:
        raise InputError(f"{path.name}: segmentation has {voxels.ndim} dimensions; expected 3D")
    segments = list(seg.get("segments", []))
    keys = [(int(s.get("layer", 0)), int(s.get("labelValue", 1))) for s in segments]
    values = [lv for _, lv in keys]
    renumber = len(set(values)) != len(values) or any(v < 1 for v in values)
    out_values = list(range(1, len(segments) + 1)) if renumber else values
    shape_ijk = voxels.shape[1:]
    labels_ijk = np.zeros(shape_ijk, dtype=np.uint8 if max(out_values, default=0) < 256 else np.uint16)
    structures: list[Structure] = []
    for s, (layer, lv), out in zip(segments, keys, out_values):
        mask = voxels[layer] == lv
        if not mask.any():
            warnings.warn(f"{path.name}: segment '{s.get('name', s.get('id'))}' is empty; ignored", stacklevel=3)
            continue
        labels_ijk[mask] = out
        color = tuple(float(c) for c in s.get("color", PALETTE[(out - 1) % len(PALETTE)]))[:3]
        structures.append(Structure(int(out), str(s.get("name", s.get("id", f"Label {out}"))), color))  # type: ignore[arg-type]
    m = np.asarray(seg["ijkToLPS"], dtype=float)
    spacing = np.linalg.norm(m[:3, :3], axis=0)
    vol = Volume(
        array=np.ascontiguousarray(labels_ijk.transpose(2, 1, 0)),  # slicerio gives (i, j, k); we store (k, j, i)
        spacing=tuple(spacing),
        origin=tuple(m[:3, 3]),
        direction=m[:3, :3] / spacing,
    )
    # Overlaps were flattened: a later segment may have erased an earlier one entirely.
    present = set(label_values(vol))
    structures = [st for st in structures if st.value in present]
    return vol, structures


def _resample_to(labels: Volume, reference: Volume) -> Volume:
    """Nearest-neighbour resampling of `labels` onto `reference`'s grid by physical position."""
    img = labels.to_sitk()
    out = sitk.Resample(
        img,
        list(reference.shape[::-1]),
        sitk.Transform(),  # identity: both grids live in the same LPS space
        sitk.sitkNearestNeighbor,
        reference.origin,
        reference.spacing,
        tuple(float(v) for v in reference.direction.reshape(-1)),
        0,
        img.GetPixelID(),
    )
    return reference.with_array(sitk.GetArrayFromImage(out))


def read_labels(
    path: PathLike, reference: Volume, names: Optional[dict[int, str]] = None
) -> tuple[Volume, list[Structure]]:
    """Read a label map (any integer-valued image, or a Slicer .seg.nrrd) aligned to `reference`'s grid.

    A label grid that differs from the reference is resampled onto it by physical geometry (nearest
    neighbour, outside = 0); arrays are never matched by index. Structures: the segment names and colours
    of a .seg.nrrd; otherwise `names[value]` if given, else "Label N", and a palette colour.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file or folder")
    if p.name.lower().endswith(".seg.nrrd"):
        labels, structures = _read_seg_nrrd(p)
    else:
        img = _read_image(p)
        labels = Volume.from_sitk(img)
        labels.array = _as_label_array(labels.array, p.name)
        structures = [default_structure(v) for v in label_values(labels)]
    if names:
        structures = [Structure(s.value, names.get(s.value, s.name), s.color) for s in structures]

    if not labels.same_grid(reference):
        before = label_values(labels)
        labels = _resample_to(labels, reference)
        after = label_values(labels)
        if before and not after:
            raise InputError(f"{p.name}: the labels do not overlap the image in physical space (check the files)")
        lost = sorted(set(before) - set(after))
        if lost:
            warnings.warn(f"{p.name}: label values {lost} lie outside the image and were dropped", stacklevel=2)
        structures = [s for s in structures if s.value in after]
    return labels, structures


def label_values(labels: Volume) -> list[int]:
    """The nonzero label values present, ascending."""
    values = np.unique(labels.array)
    return [int(v) for v in values if v != 0]


# ---------------------------------------------------------------------------------------------- writing


def _output_extension(path: PathLike) -> Optional[str]:
    name = Path(path).name.lower()
    return next((ext for ext in OUTPUT_EXTENSIONS if name.endswith(ext) and len(name) > len(ext)), None)


def check_output_path(path: PathLike) -> None:
    """Raise InputError unless `path` can be written: known extension, existing writable folder.

    The command line calls this before any work so a bad output path fails in a second, not after a run.
    """
    p = Path(path)
    if _output_extension(p) is None:
        raise InputError(f"{p.name}: unknown output format; use one of {', '.join(OUTPUT_EXTENSIONS)}")
    folder = p.parent if str(p.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"{p}: output folder {folder} does not exist")
    if p.is_dir():
        raise InputError(f"{p}: is a folder; give a file name")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"{p}: output folder {folder} is not writable")


def _write_seg_nrrd(path: str, labels: Volume, structures: list[Structure], array: np.ndarray) -> None:
    import slicerio

    segments = [
        {
            "id": f"Segment_{s.value}",
            "name": s.name,
            "color": [float(c) for c in s.color],
            "labelValue": int(s.value),
            "layer": 0,
        }
        for s in structures
    ]
    segmentation = {
        "voxels": np.asarray(array).transpose(2, 1, 0),  # slicerio writes (i, j, k) in Fortran order
        "ijkToLPS": labels.ijk_to_lps(),
        "segments": segments,
        "containedRepresentationNames": ["Binary labelmap"],
        "masterRepresentation": "Binary labelmap",
    }
    slicerio.write_segmentation(path, segmentation)


def write_labels(path: PathLike, labels: Volume, structures: list[Structure]) -> None:
    """Write a label map as .nii.gz / .nii / .nrrd (uint8 if max < 256 else uint16) or Slicer .seg.nrrd.

    Atomic: writes a temporary file in the target folder (same extension, so ITK picks the writer) and
    renames it over `path`; on failure the temporary file is removed and nothing is left behind.
    Label values present in `labels` without a Structure get "Label N" and a palette colour.
    """
    check_output_path(path)
    p = Path(path)
    ext = _output_extension(p)
    arr = np.asarray(labels.array)
    if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
        arr = _as_label_array(arr, p.name)
    top = int(arr.max()) if arr.size else 0
    if (arr.size and int(arr.min()) < 0) or top >= 65536:
        raise InputError(f"{p.name}: label values must be in 0..65535 to be written")
    arr = arr.astype(np.uint8 if top < 256 else np.uint16, copy=False)
    out = labels.with_array(arr)

    by_value = {s.value: s for s in structures}
    for v in label_values(out):
        by_value.setdefault(v, default_structure(v))
    all_structures = [by_value[v] for v in sorted(by_value)]

    try:
        with atomic_path(p) as tmp:  # same extension: ITK picks the writer by it
            if ext == ".seg.nrrd":
                _write_seg_nrrd(str(tmp), out, all_structures, arr)
            else:
                sitk.WriteImage(out.to_sitk(), str(tmp), useCompression=(ext != ".nii"))
    except (OSError, RuntimeError, ValueError) as e:
        raise InputError(f"{p}: cannot write ({_first_line(e)})") from None
