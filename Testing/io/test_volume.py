"""volume.py on the real shared data: reading, geometry round trips, physical alignment, bad inputs, atomic writes."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from fewshotsam2.io import volume as volume_module
from fewshotsam2.errors import InputError
from fewshotsam2.io.volume import (
    Structure,
    Volume,
    check_output_path,
    label_values,
    read_labels,
    read_volume,
    write_labels,
)

# (image, labels) relative to shared/data: every labeled volume we have.
CASES = [
    ("abdomen-ct/ct-a/image.nii.gz", "abdomen-ct/ct-a/labels.nii.gz"),
    ("abdomen-ct/ct-b/dicom", "abdomen-ct/ct-b/labels.nii.gz"),
    ("abdomen-mr/image.nii.gz", "abdomen-mr/labels.nii.gz"),
    ("spleen-ct/image.nii.gz", "spleen-ct/labels.nii.gz"),
    ("brain-mr/ibsr-01/image.nii.gz", "brain-mr/ibsr-01/labels.nii.gz"),
    ("brain-mr/ibsr-03/image.nii.gz", "brain-mr/ibsr-03/labels.nii.gz"),
    ("brain-mr/ibsr-04/image.nii.gz", "brain-mr/ibsr-04/labels.nii.gz"),
    ("brain-mr/ibsr-05/image.nii.gz", "brain-mr/ibsr-05/labels.nii.gz"),
]
IDS = [c[0].split("/image")[0].replace("/dicom", "") for c in CASES]
# the four IBSR brains share one geometry (256 x 128 x 256 voxels, 8 M each): one in the fast tier, all in the slow
CASES = [pytest.param(c, marks=pytest.mark.slow) if c[0].startswith("brain-mr/ibsr-0") and "ibsr-01" not in c[0]
         else c for c in CASES]


def assert_same_geometry(a: Volume, b: Volume) -> None:
    assert a.shape == b.shape
    np.testing.assert_allclose(a.spacing, b.spacing, rtol=0, atol=1e-5)
    np.testing.assert_allclose(a.origin, b.origin, rtol=0, atol=1e-4)
    np.testing.assert_allclose(a.direction, b.direction, rtol=0, atol=1e-6)


def write_image(vol: Volume, path: Path) -> None:
    sitk.WriteImage(vol.to_sitk(), str(path), True)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_image_round_trip_keeps_array_and_geometry(case, shared_dir, tmp_path):
    vol = read_volume(shared_dir / "data" / case[0])
    assert vol.array.ndim == 3 and vol.direction.shape == (3, 3)
    for ext in (".nrrd", ".nii.gz"):
        out = tmp_path / f"image{ext}"
        write_image(vol, out)
        back = read_volume(out)
        assert back.array.dtype == vol.array.dtype
        assert np.array_equal(back.array, vol.array)
        assert_same_geometry(back, vol)
        assert back.same_grid(vol)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_label_round_trip_all_formats(case, shared_dir, tmp_path):
    image = read_volume(shared_dir / "data" / case[0])
    labels, structures = read_labels(shared_dir / "data" / case[1], image)
    assert labels.same_grid(image)
    values = label_values(labels)
    assert values and [s.value for s in structures] == values
    # Give the structures their own names and colours: the .seg.nrrd must carry them.
    named = [Structure(s.value, f"organ {s.value}", (0.1, 0.2 + 0.001 * s.value, 0.9)) for s in structures]
    for ext in (".nii.gz", ".nii", ".nrrd", ".seg.nrrd"):
        out = tmp_path / f"labels{ext}"
        write_labels(out, labels, named)
        back, back_structures = read_labels(out, image)
        assert np.array_equal(back.array, labels.array), ext
        assert_same_geometry(back, labels)
        assert [s.value for s in back_structures] == values
        if ext == ".seg.nrrd":
            assert [s.name for s in back_structures] == [s.name for s in named]
            np.testing.assert_allclose([s.color for s in back_structures], [s.color for s in named], atol=1e-6)
            # and slicerio itself (what Slicer's reader follows) sees the same segments and voxels
            seg = slicerio.read_segmentation(str(out))
            assert [s["name"] for s in seg["segments"]] == [s.name for s in named]
            mask = slicerio.segment_mask(seg, named[0].name)  # (i, j, k)
            assert np.array_equal(mask.transpose(2, 1, 0), labels.array == named[0].value)
            np.testing.assert_allclose(seg["ijkToLPS"], labels.ijk_to_lps(), atol=1e-4)
        else:
            assert back.array.dtype == np.uint8  # every shared label map fits in 8 bits
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]  # no temporary files left


def test_dicom_folder_geometry(shared_dir):
    vol = read_volume(shared_dir / "data" / "abdomen-ct/ct-b/dicom")
    assert vol.shape == (20, 512, 512)
    np.testing.assert_allclose(vol.spacing, (0.977, 0.977, 2.0), atol=1e-3)
    # HU values: rescale slope/intercept applied (air is about -1000)
    assert vol.array.min() <= -900 and vol.array.max() > 300


def test_ct_b_labels_are_aligned_by_physics_not_by_index(shared_dir):
    data = shared_dir / "data" / "abdomen-ct/ct-b"
    image = read_volume(data / "dicom")
    raw_img = sitk.ReadImage(str(data / "labels.nii.gz"))
    raw = Volume.from_sitk(raw_img)
    assert raw.shape == image.shape and not raw.same_grid(image)  # the trap: same shape, other grid
    aligned, structures = read_labels(data / "labels.nii.gz", image)
    assert aligned.same_grid(image)
    # The label grid's y axis runs the other way: aligning by physics flips the array along j.
    assert np.array_equal(aligned.array, raw.array[:, ::-1, :])
    assert not np.array_equal(aligned.array, raw.array)

    def centroid_lps(vol: Volume, value: int) -> np.ndarray:
        k, j, i = np.nonzero(vol.array == value)
        ijk1 = np.stack([i, j, k, np.ones_like(i)]).astype(float)
        return (vol.ijk_to_lps() @ ijk1)[:3].mean(axis=1)

    liver = 5
    assert liver in [s.value for s in structures]
    delta = np.abs(centroid_lps(aligned, liver) - centroid_lps(raw, liver))
    assert np.all(delta < np.array(image.spacing))  # within a voxel along each axis
    # and the liver lies on the patient's right of the spleen (LPS x grows toward the patient's left)
    assert centroid_lps(aligned, liver)[0] < centroid_lps(aligned, 1)[0]


def test_labels_on_another_grid_are_resampled_by_geometry(shared_dir):
    data = shared_dir / "data" / "abdomen-ct/ct-a"
    image = read_volume(data / "image.nii.gz")
    labels, _ = read_labels(data / "labels.nii.gz", image)
    # A reference grid at half the voxel size, shifted by half a coarse voxel: nearest neighbour must map
    # each fine voxel to the coarse voxel that contains it.
    fine = Volume(
        np.zeros(tuple(2 * s for s in image.shape), dtype=np.int16),
        tuple(s / 2 for s in image.spacing),
        tuple(np.array(image.origin) - image.direction @ (np.array(image.spacing) / 4)),
        image.direction,
    )
    resampled, structures = read_labels(data / "labels.nii.gz", fine)
    assert resampled.same_grid(fine)
    expected = labels.array.repeat(2, axis=0).repeat(2, axis=1).repeat(2, axis=2)
    assert np.array_equal(resampled.array, expected)
    assert [s.value for s in structures] == label_values(labels)


def test_labels_outside_the_image_are_refused(shared_dir, tmp_path):
    data = shared_dir / "data" / "abdomen-ct/ct-a"
    image = read_volume(data / "image.nii.gz")
    far = Volume(image.array, image.spacing, tuple(np.array(image.origin) + 5000.0), image.direction)
    with pytest.raises(InputError, match="do not overlap"):
        read_labels(data / "labels.nii.gz", far)


def test_overlapping_seg_nrrd_segments_keep_their_own_layer_and_value(shared_dir, tmp_path):
    from fewshotsam2.io.volume import output_structures, structure_mask

    image = read_volume(shared_dir / "data" / "abdomen-ct/ct-a/image.nii.gz")
    shape_ijk = image.shape[::-1]
    seg = slicerio.create_segmentation(shape_ijk, image.ijk_to_lps())
    a = np.zeros(shape_ijk, bool)
    a[10:30, 10:30, 5:15] = True
    b = np.zeros(shape_ijk, bool)
    b[20:25, 20:25, 10:12] = True  # nested in a -> slicerio puts it in a second layer with label value 1
    slicerio.add_segment(seg, a, {"id": "a", "name": "whole tumour", "color": [1.0, 0.0, 0.0]})
    slicerio.add_segment(seg, b, {"id": "b", "name": "core", "color": [0.0, 1.0, 0.0]})
    assert seg["voxels"].ndim == 4
    path = tmp_path / "overlap.seg.nrrd"
    slicerio.write_segmentation(str(path), seg)
    labels, structures = read_labels(path, image)
    # no renumbering: each segment keeps its layer and label value
    assert [(s.value, s.layer, s.name) for s in structures] == [(1, 0, "whole tumour"), (1, 1, "core")]
    assert structures[0].color == (1.0, 0.0, 0.0)
    # the nested segment survives, and so does the outer one under it
    assert np.array_equal(structure_mask(labels, structures[0]).transpose(2, 1, 0), a)
    assert np.array_equal(structure_mask(labels, structures[1]).transpose(2, 1, 0), b)
    # in one output label map the shared value cannot stay: the second moves to a free value, with a warning
    with pytest.warns(UserWarning, match="both have label value 1"):
        out = output_structures(structures, "overlap.seg.nrrd")
    assert [(s.value, s.name) for s in out] == [(1, "whole tumour"), (2, "core")]


def test_largest_dicom_series_is_taken_with_a_warning(shared_dir, tmp_path):
    folder = tmp_path / "dicom"
    shutil.copytree(shared_dir / "data" / "abdomen-ct/ct-b/dicom", folder)
    # a second, smaller series (3 slices) in the same folder
    small = sitk.Image(32, 32, 3, sitk.sitkInt16)
    small.SetSpacing((1.0, 1.0, 2.0))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for z in range(3):
        sl = small[:, :, z]
        sl.SetMetaData("0020|000e", "1.2.826.0.1.3680043.2.1125.999.1")  # series instance UID
        sl.SetMetaData("0020|000d", "1.2.826.0.1.3680043.2.1125.999.2")
        sl.SetMetaData("0008|0060", "CT")
        sl.SetMetaData("0020|0032", f"0\\0\\{2.0 * z}")
        sl.SetMetaData("0020|0037", "1\\0\\0\\0\\1\\0")
        sl.SetMetaData("0020|0013", str(z + 1))
        writer.SetFileName(str(folder / f"extra{z}.dcm"))
        writer.Execute(sl)
    assert len(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))) == 2
    with pytest.warns(UserWarning, match="2 DICOM series"):
        vol = read_volume(folder)
    assert vol.shape == (20, 512, 512)


# ------------------------------------------------------------------------------------------- bad inputs


def test_missing_path(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_volume(tmp_path / "nothing.nii.gz")
    image = Volume(np.zeros((3, 4, 5)), (1, 1, 1), (0, 0, 0), np.eye(3))
    with pytest.raises(InputError, match="no such file"):
        read_labels(tmp_path / "nothing.seg.nrrd", image)


def test_text_file_named_nifti(tmp_path):
    bad = tmp_path / "fake.nii.gz"
    bad.write_text("this is not an image\n")
    with pytest.raises(InputError, match="cannot read") as info:
        read_volume(bad)
    assert "\n" not in str(info.value)


def test_folder_without_dicom(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match="no DICOM series"):
        read_volume(tmp_path)


def test_2d_images_are_refused(tmp_path):
    flat = tmp_path / "flat.nrrd"
    sitk.WriteImage(sitk.Image(16, 16, sitk.sitkInt16), str(flat))
    with pytest.raises(InputError, match="2D"):
        read_volume(flat)
    single = tmp_path / "single.nii.gz"
    sitk.WriteImage(sitk.Image(16, 16, 1, sitk.sitkInt16), str(single))
    with pytest.raises(InputError, match="2D"):
        read_volume(single)


def test_4d_and_vector_images_are_refused(tmp_path):
    four = tmp_path / "four.nii.gz"
    sitk.WriteImage(sitk.Image([8, 8, 8, 3], sitk.sitkFloat32), str(four))
    with pytest.raises(InputError, match="4D"):
        read_volume(four)
    vector = tmp_path / "vector.nrrd"
    sitk.WriteImage(sitk.Image([8, 8, 8], sitk.sitkVectorFloat32, 3), str(vector))
    with pytest.raises(InputError, match="components"):
        read_volume(vector)


def test_nan_and_inf_intensities_are_refused(tmp_path):
    for bad_value in (np.nan, np.inf):
        array = np.zeros((4, 5, 6), np.float32)
        array[2, 2, 2] = bad_value
        path = tmp_path / "nan.nrrd"
        sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
        with pytest.raises(InputError, match="NaN or infinite"):
            read_volume(path)


def test_non_integer_labels_are_refused(tmp_path):
    array = np.zeros((4, 5, 6), np.float32)
    array[1, 1, 1] = 1.5
    image = Volume(np.zeros((4, 5, 6), np.int16), (1, 1, 1), (0, 0, 0), np.eye(3))
    path = tmp_path / "soft.nii.gz"
    sitk.WriteImage(image.with_array(array).to_sitk(), str(path))
    with pytest.raises(InputError, match="not integers"):
        read_labels(path, image)
    # integer-valued floats are fine labels
    array[1, 1, 1] = 2.0
    sitk.WriteImage(image.with_array(array).to_sitk(), str(path))
    labels, structures = read_labels(path, image)
    assert label_values(labels) == [2] and structures[0].name == "Label 2"
    assert np.issubdtype(labels.array.dtype, np.integer)


def test_check_output_path(tmp_path):
    for good in ("a.nii.gz", "a.nii", "a.nrrd", "a.seg.nrrd", "A.NII.GZ"):
        check_output_path(tmp_path / good)  # no error
    for bad, message in (
        ("a.mha", "unknown output format"),
        ("a.png", "unknown output format"),
        ("missing/a.nii.gz", "does not exist"),
    ):
        with pytest.raises(InputError, match=message):
            check_output_path(tmp_path / bad)
    a_file = tmp_path / "plain.txt"
    a_file.write_text("x")
    with pytest.raises(InputError, match="does not exist"):
        check_output_path(a_file / "a.nii.gz")  # parent is a file, not a folder
    (tmp_path / "dir.nii.gz").mkdir()
    with pytest.raises(InputError, match="is a folder"):
        check_output_path(tmp_path / "dir.nii.gz")


def test_unwritable_folder_is_refused(tmp_path, monkeypatch):
    # Tests may run as root, where chmod does not stop writes; so check the decision on os.access itself.
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == tmp_path else real_access(p, mode))
    with pytest.raises(InputError, match="not writable"):
        check_output_path(tmp_path / "out.nii.gz")


def _small_labels() -> tuple[Volume, list[Structure]]:
    array = np.zeros((4, 5, 6), np.uint8)
    array[1:3, 1:4, 2:5] = 3
    vol = Volume(array, (1.0, 2.0, 3.0), (10.0, -5.0, 7.0), np.diag([-1.0, -1.0, 1.0]))
    return vol, [Structure(3, "kidney", (0.5, 0.5, 0.1))]


@pytest.mark.parametrize("ext", [".nii.gz", ".nrrd", ".seg.nrrd"])
def test_failed_write_leaves_nothing_behind(ext, tmp_path, monkeypatch):
    labels, structures = _small_labels()
    target = tmp_path / f"out{ext}"

    def failing_replace(src, dst):
        assert Path(src).exists() and Path(src).name.startswith(".tmp-")  # the full temp file was written
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(volume_module.os, "replace", failing_replace)
    with pytest.raises(InputError, match="cannot write"):
        write_labels(target, labels, structures)
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    labels, structures = _small_labels()
    target = tmp_path / "out.nii.gz"
    write_labels(target, labels, structures)
    before = target.read_bytes()

    def broken_writer(*args, **kwargs):
        Path(args[1]).write_bytes(b"half")  # a half-written temp file, then the writer fails
        raise RuntimeError("ITK ERROR: write failed (simulated)")

    monkeypatch.setattr(volume_module.sitk, "WriteImage", broken_writer)
    with pytest.raises(InputError, match="cannot write"):
        write_labels(target, labels.with_array(labels.array * 0), structures)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.nii.gz"]


def test_write_refuses_unwritable_labels_before_touching_disk(tmp_path):
    labels, structures = _small_labels()
    too_big = labels.with_array(np.full(labels.shape, 3_000_000_000, np.int64))
    with pytest.raises(InputError, match="0..2147483647"):
        write_labels(tmp_path / "big.nrrd", too_big, structures)
    with pytest.raises(InputError, match="unknown output format"):
        write_labels(tmp_path / "out.png", labels, structures)
    assert list(tmp_path.iterdir()) == []


def test_write_dtype_and_unnamed_values(tmp_path):
    labels, structures = _small_labels()
    wide = labels.array.astype(np.int32)
    wide[0, 0, 0] = 300
    out = tmp_path / "wide.seg.nrrd"
    write_labels(out, labels.with_array(wide), structures)
    back, back_structures = read_labels(out, labels)
    assert np.array_equal(back.array, wide)
    assert [(s.value, s.name) for s in back_structures] == [(3, "kidney"), (300, "Label 300")]
    write_labels(tmp_path / "wide.nrrd", labels.with_array(wide), structures)
    assert sitk.ReadImage(str(tmp_path / "wide.nrrd")).GetPixelID() == sitk.sitkUInt16
    write_labels(tmp_path / "narrow.nrrd", labels, structures)
    assert sitk.ReadImage(str(tmp_path / "narrow.nrrd")).GetPixelID() == sitk.sitkUInt8


def test_volume_helpers():
    labels, _ = _small_labels()
    m = labels.ijk_to_lps()
    # voxel (i=1, j=2, k=3) -> origin + direction @ (spacing * ijk)
    expected = np.array(labels.origin) + labels.direction @ (np.array(labels.spacing) * [1, 2, 3])
    np.testing.assert_allclose((m @ [1, 2, 3, 1])[:3], expected)
    img = labels.to_sitk()
    np.testing.assert_allclose(img.TransformIndexToPhysicalPoint((1, 2, 3)), expected)
    assert Volume.from_sitk(img).same_grid(labels)
    moved = Volume(labels.array, labels.spacing, tuple(np.array(labels.origin) + 0.5), labels.direction)
    assert not moved.same_grid(labels)
    with pytest.raises(ValueError):
        labels.with_array(np.zeros((2, 2, 2)))
