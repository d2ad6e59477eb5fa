"""Volumes and label maps: reading, aligning labels to an image by physical geometry, writing atomically.

Geometry convention (docs/architecture.md): `Volume.array` is indexed [k, j, i] (SimpleITK's
GetArrayFromImage order); `spacing` and `origin` are in (i, j, k) order, millimetres, origin in LPS;
`direction` is 3x3 with *columns* = i, j, k axis directions in LPS.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import os
import struct
import sys
import tempfile
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Optional, Union

import numpy as np
import SimpleITK as sitk

from fewshotsam2.io.atomic import IncompleteWrite, atomic_path, disk_problem, write_target
from fewshotsam2.errors import InputError
from fewshotsam2.io.paths import check_name_length

# slicerio is imported where a .seg.nrrd is read or written: the Slicer module reads volumes with this module in
# Slicer's own Python, where slicerio may not be installed yet (dependencies.missingForJobFiles)

PathLike = Union[str, Path]

# Output formats, longest first so ".seg.nrrd" wins over ".nrrd" and ".nii.gz" over ".nii".
OUTPUT_EXTENSIONS = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".dcm")  # .dcm: DICOM SEG (dicom_seg.py)

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
    layer: int = 0  # the .seg.nrrd layer holding the segment (overlapping segments live in separate layers)


class LabelMap(NamedTuple):
    """A label map on an image's grid and the structures it holds (what `read_labels` returns).

    `volume.array` holds the labels; a .seg.nrrd with overlapping segments also keeps `volume.layers`
    (layers, k, j, i), each segment in its own layer (`Structure.layer`), so nested segments survive. Unpacks as
    `(volume, structures)`.
    """

    volume: "Volume"
    structures: list[Structure]

    def mask(self, structure: Structure) -> np.ndarray:
        """The voxels of `structure` (bool, on the label map's grid), from its own layer."""
        return structure_mask(self.volume, structure)

    @classmethod
    def from_masks(cls, reference: "Volume", masks: list[tuple[Structure, np.ndarray]]) -> "LabelMap":
        """A label map on `reference`'s grid holding each (structure, bool mask) under its own value; masks that
        overlap go to separate layers (as Slicer's segmentations keep them), so no voxel is lost to another
        segment. Structure values must differ."""
        values = [s.value for s, _ in masks]
        if len(set(values)) != len(values):
            raise ValueError(f"structure values must differ, got {values}")
        dtype = np.min_scalar_type(max(values, default=1))
        layers: list[np.ndarray] = []
        placed = []
        for structure, mask in masks:
            mask = np.asarray(mask, dtype=bool)
            # the first layer this segment does not overlap (a new one if none)
            index = next((i for i, layer in enumerate(layers) if not (layer[mask] != 0).any()), len(layers))
            if index == len(layers):
                layers.append(np.zeros(reference.shape, dtype=dtype))
            layers[index][mask] = structure.value
            placed.append(Structure(structure.value, structure.name, structure.color, index))
        flat = layers[0].copy() if layers else np.zeros(reference.shape, dtype=dtype)
        for layer in layers[1:]:
            flat[layer > 0] = layer[layer > 0]
        volume = reference.with_array(flat)
        if len(layers) > 1:
            volume.layers = np.stack(layers)
        return cls(volume, placed)


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
    # label maps read from a .seg.nrrd with several layers: (layers, k, j, i), each segment in its own layer
    # with its own label value (see `structure_mask`); `array` then holds them flattened, later layers on top
    layers: Optional[np.ndarray] = None

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
        """A volume on the same grid holding another array (same shape required; no label layers)."""
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
    check_geometry(img.GetSpacing(), img.GetDirection(), name)


def check_geometry(spacing, direction, name: str) -> None:
    """Spacing finite and positive, direction finite: else slices would be cut along the wrong axis."""
    if not all(np.isfinite(s) and s > 0 for s in spacing):
        raise InputError(f"{name}: voxel spacing {tuple(float(s) for s in spacing)} is not a positive finite "
                         "number on every axis; fix the file's header")
    if not np.all(np.isfinite(np.asarray(direction, dtype=float))):
        raise InputError(f"{name}: the orientation (direction) holds NaN or infinite values; fix the file's header")


_NRRD_GEOMETRY_FIELDS = (b"spacings", b"space directions", b"thicknesses")


def _check_nrrd_raw(p: Path) -> None:
    """ITK reads a NaN in a NRRD `spacings` field as 1 mm (inf and 0 it refuses): refuse every non-finite value in
    the header's geometry fields before ITK reads the file."""
    try:
        with open(p, "rb") as f:
            head = f.read(65536)
    except OSError:
        return  # the reader reports it
    for raw in head.split(b"\n\n", 1)[0].splitlines():
        key, sep, value = raw.partition(b":")
        if not sep or key.strip().lower() not in _NRRD_GEOMETRY_FIELDS:
            continue
        for token in value.replace(b"(", b" ").replace(b")", b" ").replace(b",", b" ").split():
            if token.lower().lstrip(b"+-") in (b"nan", b"inf", b"infinity"):
                raise InputError(f"{p.name}: {key.decode(errors='replace').strip()} "
                                 f"'{value.decode(errors='replace').strip()}' holds a value that is not a finite "
                                 "number (voxel spacing must be positive and finite); fix the file's header")


def _series_tags(files: tuple[str, ...]) -> dict[str, str]:
    """SeriesInstanceUID, SeriesNumber and SeriesDescription of a series' first file ("" when missing)."""
    r = sitk.ImageFileReader()
    r.SetFileName(files[0])
    tags = {"uid": "0020|000e", "number": "0020|0011", "description": "0008|103e"}
    try:
        r.ReadImageInformation()
    except RuntimeError:
        return {k: "" for k in tags}
    return {k: (r.GetMetaData(t).strip() if r.HasMetaDataKey(t) else "") for k, t in tags.items()}


def _read_dicom_folder(folder: Path, choice: Optional[str] = None) -> sitk.Image:
    """One DICOM series of `folder`: `choice` is its SeriesInstanceUID or its number N in the listing (1 = first);
    without a choice the largest series, with a warning listing them all and how to choose (FOLDER#N)."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(_dicom_series_files(folder, choice))
    with _stderr_captured():  # GDCM's complaints about odd files would break the one-line error
        try:
            return reader.Execute()
        except RuntimeError as e:
            failure = _first_line(e)
    raise InputError(f"{folder}: cannot read the DICOM series: {failure}")


def dicom_series_files(path: PathLike) -> list[str]:
    """The files of the DICOM series `path` names (FOLDER, FOLDER#N or FOLDER#SERIES_UID), in the order
    `read_volume` stacks them: file k is slice k of the volume's array (`dicom_seg` references them)."""
    folder, choice = _split_series(path)
    if not folder.is_dir():
        raise InputError(f"{path}: not a DICOM series folder")
    with warnings.catch_warnings():  # read_volume already said which series a folder of several gives
        warnings.simplefilter("ignore")
        return list(_dicom_series_files(folder, choice))


def _dicom_series_files(folder: Path, choice: Optional[str] = None) -> tuple[str, ...]:
    reader = sitk.ImageSeriesReader()
    with _stderr_captured():  # GDCM complains on stderr about every file that is not DICOM
        try:
            series = reader.GetGDCMSeriesIDs(str(folder))
        except RuntimeError:
            series = ()
        if not series:
            raise InputError(f"{folder}: folder contains no DICOM series")
        files_per_series = {sid: reader.GetGDCMSeriesFileNames(str(folder), sid) for sid in series}
        tags = {sid: _series_tags(files_per_series[sid]) for sid in series}

    def describe(n: int, sid: str) -> str:
        t = tags[sid]
        uid = t["uid"] or sid or "no SeriesInstanceUID"
        extra = "".join(f", {k} {t[k]}" for k in ("number", "description") if t[k])
        return f"#{n}: {len(files_per_series[sid])} files, UID {uid}{extra}, first file {Path(files_per_series[sid][0]).name}"

    listing = "; ".join(describe(n, sid) for n, sid in enumerate(series, 1))
    if choice is not None:
        if choice.isdigit() and 1 <= int(choice) <= len(series):
            chosen = series[int(choice) - 1]
        else:
            matching = [sid for sid in series if choice and choice in (tags[sid]["uid"], sid)]
            if not matching:
                raise InputError(f"{folder}: no DICOM series {choice} here; series found: {listing}")
            chosen = matching[0]
    else:
        chosen = max(files_per_series, key=lambda sid: len(files_per_series[sid]))
        if len(series) > 1:
            warnings.warn(
                f"{folder}: {len(series)} DICOM series found ({listing}); using the largest, "
                f"#{series.index(chosen) + 1}; choose one with {folder}#N or {folder}#SERIES_UID",
                stacklevel=4,
            )
    return files_per_series[chosen]


def _first_line(e: BaseException) -> str:
    # ITK messages are multi-line with file/line noise; the last non-empty line says what went wrong.
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__


# NIfTI datatype code -> numpy dtype of the floating-point types (the ones that can hold NaN/inf)
_NIFTI_FLOATS = {16: "f4", 64: "f8"}


def _check_nifti_raw(p: Path) -> None:
    """What ITK's NIfTI reader does not say: a truncated file (it decodes what is there and pads), NaN/inf voxels
    (it turns them into 0), and a 4D file with one time point (it drops the 4th axis). Reads the raw bytes."""
    opener = gzip.open if p.name.lower().endswith(".gz") else open
    try:
        with opener(p, "rb") as f:
            data = f.read()
    except gzip.BadGzipFile:
        return  # not gzip at all: ITK says it cannot read it
    except (EOFError, zlib.error) as e:
        raise InputError(f"{p.name}: truncated or corrupt file ({e}); the file is incomplete, copy it again") from None
    except OSError as e:
        raise InputError(f"{p.name}: cannot read ({e.strerror or e})") from None
    if len(data) < 348:
        return  # ITK refuses it with its own message
    for endian in "<>":
        size = struct.unpack(endian + "i", data[:4])[0]
        if size in (348, 540):
            break
    else:
        return
    if size == 348:  # NIfTI-1
        dim = struct.unpack(endian + "8h", data[40:56])
        datatype, bitpix = struct.unpack(endian + "2h", data[70:74])
        offset = int(struct.unpack(endian + "f", data[108:112])[0])
    else:  # NIfTI-2
        datatype, bitpix = struct.unpack(endian + "2h", data[12:16])
        dim = struct.unpack(endian + "8q", data[16:80])
        offset = int(struct.unpack(endian + "q", data[168:176])[0])
    ndim = int(dim[0])
    if not 1 <= ndim <= 7 or offset < size:
        return  # an odd header (or a .hdr/.img pair): ITK's own checks apply
    n = int(np.prod([max(int(d), 1) for d in dim[1:ndim + 1]], dtype=np.int64))
    expected = offset + n * (int(bitpix) // 8)
    if len(data) < expected:
        raise InputError(f"{p.name}: truncated file: the header promises {n} voxels ({expected} bytes), the file has "
                         f"{len(data)} bytes; it is incomplete, copy it again")
    if ndim >= 4 and all(int(d) <= 1 for d in dim[4:ndim + 1]):
        warnings.warn(f"{p.name}: a {ndim}D file with one time point; read as the 3D volume it holds", stacklevel=4)
    if datatype in _NIFTI_FLOATS:
        values = np.frombuffer(data, dtype=endian + _NIFTI_FLOATS[datatype], count=n, offset=offset)
        if not np.all(np.isfinite(values)):
            raise InputError(f"{p.name}: contains NaN or infinite intensities")


@contextlib.contextmanager
def _stderr_captured() -> Iterator[Callable[[], str]]:
    """Collect what C++ readers print straight to the stderr file descriptor (MetaImage, ITK warnings), so that
    a bad file gives one line; yields a function returning the text."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        text: list[str] = []
        try:
            yield lambda: "".join(text)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        sink.seek(0)
        text.append(sink.read(20000).decode("utf-8", errors="replace"))


def _split_series(path: PathLike) -> tuple[Path, Optional[str]]:
    """`folder#SeriesInstanceUID` or `folder#N` picks one DICOM series of a folder; a path that exists is taken
    as it is."""
    text = os.fspath(path)
    if "#" in text and not os.path.exists(text):
        folder, uid = text.split("#", 1)
        return Path(folder), uid.strip()
    return Path(text), None


def _read_image(path: PathLike) -> sitk.Image:
    if not os.fspath(path).strip():
        raise InputError("an empty path was given; name a file or a DICOM folder")
    p, series_uid = _split_series(path)
    if not p.exists():
        raise InputError(f"{p}: no such file or folder")
    if series_uid is not None and not p.is_dir():
        raise InputError(f"{path}: '#' chooses a DICOM series (FOLDER#N or FOLDER#SERIES_UID), but {p} is not a "
                         "folder")
    if p.is_dir():
        img = _read_dicom_folder(p, series_uid)
    else:
        if p.name.lower().endswith((".nii", ".nii.gz")):
            _check_nifti_raw(p)
        elif p.name.lower().endswith((".nrrd", ".nhdr")):
            _check_nrrd_raw(p)
        with _stderr_captured() as said:
            try:
                img = sitk.ReadImage(str(p))
            except RuntimeError as e:
                failure = _first_line(e)
            else:
                failure = None
        if failure is not None:
            if "not read completely" in said():  # MetaImage prints why on stderr; its exception only says "Reason"
                raise InputError(f"{p.name}: truncated file ({' '.join(said().split())[-120:]}); it is incomplete, "
                                 "copy it again")
            raise InputError(f"{p.name}: cannot read as an image ({failure})")
        if img.GetDimension() == 4 and img.GetSize()[3] == 1:
            warnings.warn(f"{p.name}: a 4D image with one time point; read as the 3D volume it holds", stacklevel=3)
            img = sitk.Extract(img, list(img.GetSize()[:3]) + [0], [0, 0, 0, 0])
    _check_image(img, p)
    return img


def read_volume(path: PathLike) -> Volume:
    """Read a 3D scan: NIfTI, NRRD, MHA/MHD file or a DICOM series folder (largest series if several).

    Keeps the native pixel type and values. Raises InputError for a missing path, an unreadable file,
    a 2D image (including a single-slice 3D image), 4D or vector images, and NaN/inf intensities.
    """
    img = _read_image(path)
    name = _split_series(path)[0].name
    if img.GetPixelID() in (sitk.sitkComplexFloat32, sitk.sitkComplexFloat64):
        raise InputError(f"{name}: complex-valued image; expected a scalar 3D scan")
    vol = Volume.from_sitk(img)
    if np.issubdtype(vol.array.dtype, np.floating) and not np.all(np.isfinite(vol.array)):
        raise InputError(f"{name}: contains NaN or infinite intensities")
    return vol


def read_volume_header(path: PathLike) -> Volume:
    """A scan's shape and geometry without its voxels (the array is a zero-size broadcast of the right shape):
    what a batch checks every query's `--slice-range` with before any work. DICOM folders are read whole."""
    p, _ = _split_series(path)
    if p.is_dir() or not p.is_file():
        return read_volume(path)
    if p.name.lower().endswith((".nrrd", ".nhdr")):
        _check_nrrd_raw(p)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    with _stderr_captured():
        try:
            reader.ReadImageInformation()
        except RuntimeError as e:
            raise InputError(f"{p.name}: cannot read as an image ({_first_line(e)})") from None
    size = reader.GetSize()
    if len(size) != 3:
        return read_volume(path)  # the full reader says what is wrong (or reads a 4D one-time-point file)
    check_geometry(reader.GetSpacing(), reader.GetDirection(), p.name)
    return Volume(np.broadcast_to(np.uint8(0), size[::-1]), reader.GetSpacing(), reader.GetOrigin(),
                  np.array(reader.GetDirection()).reshape(3, 3))


# Label values are kept exact up to this (int32); larger ones are refused rather than wrapped.
MAX_LABEL_VALUE = 2**31 - 1
# More distinct values than this is an intensity image given as a label map, not a label map.
MAX_DISTINCT_LABELS = 1000


def _as_label_array(array: np.ndarray, name: str) -> np.ndarray:
    """Integer-valued, non-negative labels as uint8/uint16/int32 (smallest that fits), values kept exact."""
    not_labels = f"{name}: looks like an image, not a label map"
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
            raise InputError(f"{not_labels} (values are not integers); give the label map (0 = background)")
    elif not (np.issubdtype(array.dtype, np.integer) or array.dtype == bool):
        raise InputError(f"{name}: unsupported label pixel type {array.dtype}")
    if array.size and array.min() < 0:
        raise InputError(f"{not_labels} (negative values, min {array.min():g}); give the label map (0 = background)")
    top = int(array.max()) if array.size else 0
    if top > MAX_LABEL_VALUE:
        raise InputError(f"{name}: label value {top} is above {MAX_LABEL_VALUE} (2^31 - 1), the largest label value "
                         "kept exactly; renumber the labels")
    dtype = np.uint8 if top < 256 else np.uint16 if top < 65536 else np.int32
    out = array.astype(dtype, copy=False)
    distinct = (np.count_nonzero(np.bincount(out.ravel())) if top < 65536 else np.unique(out).size) if out.size else 0
    if distinct > MAX_DISTINCT_LABELS:
        raise InputError(f"{not_labels} ({distinct} distinct values); give the label map (0 = background)")
    return out


def _seg_nrrd_names(path: Path) -> dict[int, str]:
    """Segment names as UTF-8 from the raw header (pynrrd decodes headers as ASCII and drops other characters;
    Slicer writes the names as UTF-8 bytes)."""
    names = {}
    with open(path, "rb") as f:
        for raw in f:
            line = raw.rstrip(b"\r\n")
            if not line:
                break  # end of the header
            key, sep, value = line.partition(b":=")
            if sep and key.startswith(b"Segment") and key.endswith(b"_Name") and key[7:-5].isdigit():
                names[int(key[7:-5])] = value.decode("utf-8", errors="replace")
    return names


def _read_seg_nrrd(path: Path) -> tuple[Volume, list[Structure]]:
    """A Slicer .seg.nrrd: every segment keeps its own layer and label value, and its name (UTF-8).

    One layer: the label map as stored. Several layers (overlapping segments): `Volume.layers` holds them all,
    so nested segments survive (see `structure_mask`); `array` holds them flattened, later layers on top.
    """
    import slicerio

    try:
        seg = slicerio.read_segmentation(str(path))
        utf8_names = _seg_nrrd_names(path)
    except Exception as e:  # slicerio raises IOError, nrrd errors, KeyError on odd headers
        raise InputError(f"{path.name}: cannot read the segmentation ({_first_line(e)})") from None
    voxels = np.asarray(seg["voxels"])
    if voxels.ndim == 3:
        voxels = voxels[np.newaxis]
    if voxels.ndim != 4:
        raise InputError(f"{path.name}: segmentation has {voxels.ndim} dimensions; expected 3D")
    voxels = _as_label_array(voxels, path.name)
    layers = np.ascontiguousarray(voxels.transpose(0, 3, 2, 1))  # slicerio gives (layer, i, j, k); we store (k, j, i)
    structures: list[Structure] = []
    for index, s in enumerate(seg.get("segments", [])):
        layer, value = int(s.get("layer", 0)), int(s.get("labelValue", 1))
        name = utf8_names.get(index, str(s.get("name", s.get("id", f"Label {value}"))))
        if not 0 <= layer < layers.shape[0] or value < 1 or not (layers[layer] == value).any():
            warnings.warn(f"{path.name}: segment '{name}' is empty; ignored", stacklevel=3)
            continue
        color = tuple(float(c) for c in s.get("color", PALETTE[(value - 1) % len(PALETTE)]))[:3]
        structures.append(Structure(value, name, color, layer))  # type: ignore[arg-type]
    flat = layers[0].copy()
    for layer in layers[1:]:
        flat[layer > 0] = layer[layer > 0]
    m = np.asarray(seg["ijkToLPS"], dtype=float)
    spacing = np.linalg.norm(m[:3, :3], axis=0)
    if not np.all(np.isfinite(m)) or not np.all(spacing > 0):
        raise InputError(f"{path.name}: a space direction is zero or not a finite number "
                         f"(spacing {tuple(round(float(x), 4) for x in spacing)}); fix the segmentation's header")
    vol = Volume(flat, tuple(spacing), tuple(m[:3, 3]), m[:3, :3] / spacing,
                 layers=layers if layers.shape[0] > 1 else None)
    return vol, structures


def read_seg_nrrd(path: PathLike) -> LabelMap:
    """A Slicer .seg.nrrd as stored (its own grid, no resampling): each segment with its layer and label value
    (overlapping segments, e.g. a `--overlap allow` result, in separate layers: `Volume.layers`)."""
    return LabelMap(*_read_seg_nrrd(Path(path)))


def structure_mask(labels: Volume, structure: Structure) -> np.ndarray:
    """The voxels of `structure` in `labels` (bool, shaped like `labels.array`): from its own layer when the
    label map has several (an overlapping .seg.nrrd), else where the label value is the structure's."""
    if labels.layers is not None:
        return labels.layers[structure.layer] == structure.value
    return labels.array == structure.value


def output_structures(chosen: list[Structure], source: str = "the support labels") -> list[Structure]:
    """The chosen support structures as the output's structures: one layer, one distinct value each.

    Segments of different layers may share a label value (Slicer gives each layer's first segment value 1);
    the output holds one value per structure, so a repeated value moves to the next free one, with a warning.
    """
    taken = {s.value for s in chosen}
    out, used = [], set()
    for s in chosen:
        value = s.value
        if value in used:
            value = max(taken | used) + 1
            warnings.warn(f"{source}: segments '{s.name}' and '{next(o.name for o in out if o.value == s.value)}' "
                          f"both have label value {s.value} (in different layers); in the output '{s.name}' is "
                          f"value {value}", stacklevel=2)
        used.add(value)
        out.append(Structure(value, s.name, s.color))
    return out


def _resample_to(labels: Volume, reference: Volume) -> Volume:
    """Nearest-neighbour resampling of `labels` (and of each of its layers) onto `reference`'s grid."""
    if labels.layers is not None:
        out = _resample_to(labels.with_array(labels.array), reference)
        out.layers = np.stack([_resample_to(labels.with_array(layer), reference).array for layer in labels.layers])
        return out
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
) -> LabelMap:
    """Read a label map (any integer-valued image, a Slicer .seg.nrrd or a DICOM SEG .dcm) aligned to `reference`'s
    grid.

    A label grid that differs from the reference is resampled onto it by physical geometry (nearest
    neighbour, outside = 0); arrays are never matched by index. Structures: the segment names and colours
    of a .seg.nrrd or DICOM SEG; otherwise `names[value]` if given, else "Label N", and a palette colour.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file or folder")
    if p.name.lower().endswith(".seg.nrrd"):
        labels, structures = _read_seg_nrrd(p)
    elif p.is_file() and p.name.lower().endswith(".dcm"):  # a DICOM SEG: segments with their names
        from fewshotsam2.io.dicom_seg import read_dicom_seg  # a cycle: dicom_seg builds on this module

        labels, structures = read_dicom_seg(p)
    else:
        img = _read_image(p)
        labels = Volume.from_sitk(img)
        labels.array = _as_label_array(labels.array, p.name)
        structures = [default_structure(v) for v in label_values(labels)]
    if names:
        structures = [Structure(s.value, names.get(s.value, s.name), s.color) for s in structures]

    if not labels.same_grid(reference):
        labels = _resample_to(labels, reference)
        if labels.layers is None:
            present = set(label_values(labels))
            kept = [s for s in structures if s.value in present]
        else:
            kept = [s for s in structures if structure_mask(labels, s).any()]
        if structures and not kept:
            raise InputError(f"{p.name}: the labels do not overlap the image in physical space (check the files)")
        lost = [s.name if labels.layers is not None else s.value for s in structures if s not in kept]
        if lost:
            what = "segments" if labels.layers is not None else "label values"
            warnings.warn(f"{p.name}: {what} {lost} lie outside the image and were dropped", stacklevel=2)
        structures = kept
    return LabelMap(labels, structures)


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
    p = write_target(p)  # a symlink is written through: its target's folder must take the file
    folder = p.parent if str(p.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"{p}: output folder {folder} does not exist")
    check_name_length(p)
    if p.is_dir():
        raise InputError(f"{p}: is a folder; give a file name")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"{p}: output folder {folder} is not writable")


def _write_seg_nrrd(path: str, labels: Volume, structures: list[Structure], array: np.ndarray) -> None:
    import slicerio

    # pynrrd writes ASCII headers only: names go in as placeholders, then the header gets the UTF-8 names
    # (what Slicer writes and reads back)
    def placeholder(i: int) -> str:
        return f"fewshotsam2-name-{i}"

    layered = labels.layers is not None
    segments = [
        {
            "id": f"Segment_{i + 1}" if layered else f"Segment_{s.value}",  # values repeat across layers
            "name": placeholder(i),
            "color": [float(c) for c in s.color],
            "labelValue": int(s.value),
            "layer": int(s.layer) if layered else 0,
        }
        for i, s in enumerate(structures)
    ]
    # slicerio writes (i, j, k) in Fortran order, layers first
    voxels = labels.layers.transpose(0, 3, 2, 1) if layered else np.asarray(array).transpose(2, 1, 0)
    segmentation = {
        "voxels": voxels,
        "ijkToLPS": labels.ijk_to_lps(),
        "segments": segments,
        "containedRepresentationNames": ["Binary labelmap"],
        "masterRepresentation": "Binary labelmap",
    }
    slicerio.write_segmentation(path, segmentation)
    with open(path, "rb") as f:
        data = f.read()
    end = data.index(b"\n\n") + 1
    header = data[:end]
    for i, s in enumerate(structures):
        name = " ".join(s.name.splitlines())  # a header line cannot hold a line break
        header = header.replace(f":={placeholder(i)}\n".encode(), f":={name}\n".encode("utf-8"), 1)
    with open(path, "wb") as f:
        f.write(header + data[end:])


def write_labels(path: PathLike, labels: Volume, structures: list[Structure], source: Optional[PathLike] = None,
                 **seg_info: str) -> None:
    """Write a label map as .nii.gz / .nii / .nrrd (uint8, uint16 or int32: the smallest that holds the values)
    or Slicer .seg.nrrd (segment names in UTF-8), or a DICOM SEG (.dcm) referencing `source`, the DICOM series
    the labels lie on (`dicom_seg.write_dicom_seg`; `seg_info`: its method and model).

    Atomic: writes a short temporary name in the target folder (lower-case extension, so ITK picks the writer
    whatever the case of `path`) and renames it over `path`; on failure or interruption the temporary file is
    removed and nothing is left behind.
    Label values present in `labels` without a Structure get "Label N" and a palette colour.
    """
    check_output_path(path)
    p = Path(path)
    ext = _output_extension(p)
    if ext == ".dcm":
        from fewshotsam2.io.dicom_seg import write_dicom_seg  # a cycle: dicom_seg builds on this module

        if source is None:
            raise InputError(f"{p.name}: a DICOM SEG output needs the DICOM series it segments (the query)")
        write_dicom_seg(p, labels, structures, source, **seg_info)
        return
    arr = np.asarray(labels.array)
    if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
        arr = _as_label_array(arr, p.name)
    top = int(arr.max()) if arr.size else 0
    if (arr.size and int(arr.min()) < 0) or top > MAX_LABEL_VALUE:
        raise InputError(f"{p.name}: label values must be in 0..{MAX_LABEL_VALUE} to be written")
    arr = arr.astype(np.uint8 if top < 256 else np.uint16 if top < 65536 else np.int32, copy=False)
    out = labels.with_array(arr)
    if labels.layers is not None:  # overlapping segments, each in its own layer: only a .seg.nrrd holds them
        if ext != ".seg.nrrd":
            raise InputError(f"{p.name}: overlapping segments (several layers) can only be written as .seg.nrrd")
        out.layers = np.asarray(labels.layers).astype(arr.dtype, copy=False)
        all_structures = list(structures)
    else:
        by_value = {s.value: s for s in structures}
        for v in label_values(out):
            by_value.setdefault(v, default_structure(v))
        all_structures = [by_value[v] for v in sorted(by_value)]

    try:
        # ITK's writers also print their complaints on stderr: the error below is the one line
        expected = arr if out.layers is None else out.layers  # a layered .seg.nrrd holds (layer, k, j, i)
        with _stderr_captured(), atomic_path(p, verify=lambda tmp: _check_written(tmp, expected)) as tmp:
            # same extension, lower case: ITK picks the writer by it
            if ext == ".seg.nrrd":
                _write_seg_nrrd(str(tmp), out, all_structures, arr)
            else:
                sitk.WriteImage(out.to_sitk(), str(tmp), useCompression=(ext != ".nii"))
    except (OSError, RuntimeError, ValueError) as e:
        raise InputError(f"{p}: cannot write ({disk_problem(e, write_target(p).parent)}); nothing was written") \
            from None


def _check_written(tmp: Path, expected: np.ndarray) -> None:
    """Read a written label map back: ITK does not report a full disk, it leaves a short file (a 0-byte .nrrd, a
    cut .nii, a .nii.gz that fails its CRC). The voxels must be the ones written."""
    try:
        image = sitk.ReadImage(str(tmp))  # kept alive: the view below is into its buffer
        back = sitk.GetArrayViewFromImage(image)
    except RuntimeError as e:
        raise IncompleteWrite(errno.EIO, f"the written file does not read back ({_first_line(e)})") from None
    if expected.ndim == 4 and back.ndim == 4:  # layers: ITK reads them as the components of each voxel
        back = np.moveaxis(back, -1, 0)
    if back.shape != expected.shape or not np.array_equal(back, expected):
        raise IncompleteWrite(errno.EIO, "the written file does not read back as the labels written")
