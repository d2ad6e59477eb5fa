"""DICOM SEG out (`--out x.dcm`, batch `--out-format dicom-seg`) and in (a support's labels), on the real ct-b series,
an anonymised one (empty SOP/Study/Series UIDs in its datasets, the file meta keeps the instance UIDs).

Every SEG written here is validated with dicom3tools' `dciodvfy` (no "Error" line), read back with highdicom and
with plain pydicom (frame positions from its own per-frame functional groups), and compared with the `.seg.nrrd`
output of the same labels. ct-b's labels.nii.gz lies on a grid whose y axis runs the other way than the series':
the SEG must hold each labeled voxel at the same physical place as that file does.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from fewshotsam2 import cli
from fewshotsam2.io.dicom_seg import coded_property, read_dicom_seg, write_dicom_seg
from fewshotsam2.errors import InputError
from fewshotsam2.io.volume import Structure, read_labels, read_volume, structure_mask, write_labels

import highdicom  # noqa: E402  (the test extra and scripts/setup_env.sh install it)
import pydicom  # noqa: E402  (highdicom's dependency)

LIVER, SPLEEN = 5, 1
DCIODVFY = shutil.which("dciodvfy") or str(Path(sys.executable).parent / "dciodvfy")
MODEL = ["--untrained", "--image-size", "64", "--device", "cpu", "--slice-range", "off", "--quiet"]


@pytest.fixture(scope="module")
def ct_b(shared_dir):
    """The ct-b series, its labels (liver, spleen) resampled onto it, the labels file itself (flipped y)."""
    folder = shared_dir / "data" / "abdomen-ct" / "ct-b"
    image = read_volume(folder / "dicom")
    labels, _ = read_labels(folder / "labels.nii.gz", image)
    chosen = [Structure(LIVER, "liver", (0.85, 0.4, 0.3)), Structure(SPLEEN, "spleen", (0.6, 0.2, 0.6))]
    kept = labels.with_array(np.where(np.isin(labels.array, [LIVER, SPLEEN]), labels.array, 0).astype(np.uint8))
    raw = read_volume(folder / "labels.nii.gz")
    return {"dicom": folder / "dicom", "image": image, "labels": kept, "structures": chosen, "raw": raw}


@pytest.fixture(scope="module")
def seg_file(ct_b, tmp_path_factory):
    path = tmp_path_factory.mktemp("seg") / "ct-b.dcm"
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        write_labels(path, ct_b["labels"], ct_b["structures"], source=ct_b["dicom"], method="reverse", model="tiny")
    return path, [str(w.message) for w in said]


def _errors(path: Path) -> list[str]:
    run = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=120)
    lines = (run.stdout + run.stderr).splitlines()
    assert any("Segmentation" in ln for ln in lines), lines  # it recognised the IOD it checked
    return [ln for ln in lines if ln.startswith("Error")]


def _pydicom_masks(path: Path) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """Per segment label: [(frame's LPS position, bool frame)] read with pydicom alone (unpacked bits)."""
    ds = pydicom.dcmread(path)
    names = {int(s.SegmentNumber): str(s.SegmentLabel) for s in ds.SegmentSequence}
    frames = ds.pixel_array.reshape(-1, ds.Rows, ds.Columns)
    out: dict[str, list] = {n: [] for n in names.values()}
    for frame, group in zip(frames, ds.PerFrameFunctionalGroupsSequence):
        number = int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        position = np.array([float(v) for v in group.PlanePositionSequence[0].ImagePositionPatient])
        out[names[number]].append((position, frame.astype(bool)))
    return out


# ------------------------------------------------------------------------------------------ writing


def test_anonymised_series_is_referenced_by_its_file_meta_uids(ct_b, seg_file):
    path, said = seg_file
    anonymised = [m for m in said if "anonymised series" in m]
    assert len(anonymised) == 1 and "Media Storage SOP Instance" in anonymised[0]  # one warning says what was done
    seg = pydicom.dcmread(path)
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(ct_b["dicom"].iterdir())]
    assert all(not s.SOPInstanceUID and not s.SeriesInstanceUID and not s.StudyInstanceUID for s in sources)
    referenced = {str(i.ReferencedSOPInstanceUID) for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == {str(s.file_meta.MediaStorageSOPInstanceUID) for s in sources}
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert seg.StudyInstanceUID and seg.ReferencedSeriesSequence[0].SeriesInstanceUID
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and seg.SegmentationType == "BINARY"


def test_made_up_study_and_series_are_the_same_on_every_run(ct_b, seg_file, tmp_path):
    again = tmp_path / "again.dcm"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_dicom_seg(again, ct_b["labels"], ct_b["structures"], ct_b["dicom"])
    a, b = pydicom.dcmread(seg_file[0]), pydicom.dcmread(again)
    assert a.StudyInstanceUID == b.StudyInstanceUID
    assert a.ReferencedSeriesSequence[0].SeriesInstanceUID == b.ReferencedSeriesSequence[0].SeriesInstanceUID
    assert a.SOPInstanceUID != b.SOPInstanceUID and a.SeriesInstanceUID != b.SeriesInstanceUID  # a new SEG each time


def test_segments_carry_names_codes_colours_and_the_algorithm(seg_file):
    seg = pydicom.dcmread(seg_file[0])
    segments = {str(s.SegmentLabel): s for s in seg.SegmentSequence}
    assert list(segments) == ["liver", "spleen"]
    assert segments["liver"].SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"  # SCT liver
    assert segments["spleen"].SegmentedPropertyTypeCodeSequence[0].CodeValue == "78961009"
    assert segments["liver"].SegmentedPropertyCategoryCodeSequence[0].CodeValue == "91723000"  # anatomical structure
    assert segments["liver"].SegmentAlgorithmType == "AUTOMATIC"
    assert segments["liver"].SegmentAlgorithmName == "FewShotSAM2"
    assert "RecommendedDisplayCIELabValue" in segments["liver"]
    # names it does not know are Tissue; a side word does not hide the organ
    assert coded_property("kidney_right")[1].value == "64033007"
    assert coded_property("something else")[1].value == "85756007"


@pytest.mark.slow  # runs dciodvfy
def test_dciodvfy_finds_no_error(seg_file, ct_b, tmp_path):
    assert _errors(seg_file[0]) == []
    empty = tmp_path / "empty.dcm"  # an empty result: every frame kept
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_dicom_seg(empty, ct_b["labels"].with_array(np.zeros(ct_b["labels"].shape, np.uint8)),
                        ct_b["structures"], ct_b["dicom"])
    assert _errors(empty) == []


def test_round_trip_equals_the_seg_nrrd_output_on_the_same_physical_grid(ct_b, seg_file, tmp_path):
    path = seg_file[0]
    nrrd = tmp_path / "ct-b.seg.nrrd"
    write_labels(nrrd, ct_b["labels"], ct_b["structures"])
    from_nrrd, nrrd_structures = read_labels(nrrd, ct_b["image"])
    by_name = {s.name: structure_mask(from_nrrd, s) for s in nrrd_structures}
    assert set(by_name) == {"liver", "spleen"} and all(m.any() for m in by_name.values())
    # highdicom: its volume and affine
    seg = highdicom.seg.segread(str(path))
    vol = seg.get_volume(combine_segments=False)
    index_to_lps = np.asarray(vol.affine)  # (slice, row, column) -> LPS
    image = ct_b["image"]
    for n, name in enumerate(["liver", "spleen"]):
        ks, js, is_ = np.nonzero(np.asarray(vol.array)[..., n])
        lps = index_to_lps @ np.stack([ks, js, is_, np.ones_like(ks)]).astype(float)
        ijk = np.rint(np.linalg.inv(image.ijk_to_lps()) @ lps).astype(int)[:3]
        assert (vol.array[..., n] > 0).sum() == by_name[name].sum()
        assert by_name[name][ijk[2], ijk[1], ijk[0]].all()
    # pydicom alone: every frame at its position equals the .seg.nrrd's slice there
    frames = _pydicom_masks(path)
    for name, items in frames.items():
        assert sum(int(f.sum()) for _, f in items) == int(by_name[name].sum())
        for position, frame in items:
            k = int(round((np.linalg.inv(image.ijk_to_lps()) @ np.append(position, 1.0))[2]))
            np.testing.assert_array_equal(frame, by_name[name][k])
    # our reader (a SEG as support labels) gives the same masks with the names
    labels, structures = read_labels(path, image)
    assert [s.name for s in structures] == ["liver", "spleen"]
    for s in structures:
        np.testing.assert_array_equal(structure_mask(labels, s), by_name[s.name])


def test_flipped_y_labels_land_on_the_same_physical_voxels(ct_b, seg_file):
    """labels.nii.gz's y axis runs the other way than the series': each labeled voxel of that file, taken to LPS
    by its own geometry, must be labeled in the SEG frame at that position (pydicom's frame geometry)."""
    raw = ct_b["raw"]
    assert raw.direction[1, 1] * ct_b["image"].direction[1, 1] < 0  # the trap is there
    frames = {round(float(p[2]), 3): f for p, f in _pydicom_masks(seg_file[0])["liver"]}
    seg = pydicom.dcmread(seg_file[0], stop_before_pixels=True)
    shared = seg.SharedFunctionalGroupsSequence[0]
    row_spacing, col_spacing = (float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing)
    orientation = np.array([float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient])
    first = pydicom.dcmread(seg_file[0]).PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0]
    ks, js, is_ = np.nonzero(raw.array == LIVER)
    pick = np.random.default_rng(0).choice(len(ks), 500, replace=False)
    lps = (raw.ijk_to_lps() @ np.stack([is_[pick], js[pick], ks[pick], np.ones(500)]).astype(float))[:3]
    origin = np.array([float(v) for v in first.ImagePositionPatient])
    for point in lps.T:
        frame = frames[round(float(point[2]), 3)]
        column = int(round(np.dot(point - origin, orientation[:3]) / col_spacing))
        row = int(round(np.dot(point - origin, orientation[3:]) / row_spacing))
        assert frame[row, column]


def test_overlapping_segments_stay_whole(ct_b, tmp_path):
    image, labels = ct_b["image"], ct_b["labels"]
    liver = labels.array == LIVER
    grown = liver.copy()
    grown[:, :, 1:] |= liver[:, :, :-1]  # overlaps the liver by all but a column
    layered = labels.with_array(np.where(liver, 1, 0).astype(np.uint8))
    layered.layers = np.stack([np.where(liver, 1, 0), np.where(grown, 1, 0)]).astype(np.uint8)
    structures = [Structure(1, "liver", (1, 0, 0), layer=0), Structure(1, "liver grown", (0, 1, 0), layer=1)]
    path = tmp_path / "overlap.dcm"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_dicom_seg(path, layered, structures, ct_b["dicom"])
    back, read = read_labels(path, image)
    assert [s.name for s in read] == ["liver", "liver grown"] and back.layers is not None
    np.testing.assert_array_equal(structure_mask(back, read[0]), liver)
    np.testing.assert_array_equal(structure_mask(back, read[1]), grown)


def test_labels_off_the_series_grid_are_refused(ct_b, tmp_path):
    shifted = ct_b["labels"].with_array(ct_b["labels"].array)
    shifted.origin = (shifted.origin[0] + 5.0, shifted.origin[1], shifted.origin[2])
    with pytest.raises(InputError, match="not on the query series' grid"):
        write_dicom_seg(tmp_path / "x.dcm", shifted, ct_b["structures"], ct_b["dicom"])
    assert list(tmp_path.iterdir()) == []


def test_a_file_without_any_sop_instance_uid_is_refused(ct_b, tmp_path):
    folder = tmp_path / "series"
    folder.mkdir()
    for f in sorted(ct_b["dicom"].iterdir()):
        shutil.copy(f, folder / f.name)
    victim = sorted(folder.iterdir())[3]
    ds = pydicom.dcmread(victim)
    ds.file_meta.MediaStorageSOPInstanceUID = ""
    ds.save_as(victim)
    with pytest.raises(InputError, match=f"{victim.name}: has no SOPInstanceUID"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            write_dicom_seg(tmp_path / "x.dcm", ct_b["labels"], ct_b["structures"], folder)
    assert not (tmp_path / "x.dcm").exists()


# ------------------------------------------------------------------------------------------ a folder of two series


@pytest.fixture(scope="module")
def two_series(ct_b, tmp_path_factory):
    """ct-b's 20 anonymised files plus a second series (10 of them with their own UIDs, as a scanner writes them)."""
    folder = tmp_path_factory.mktemp("two") / "study"
    folder.mkdir()
    series_uid, study_uid = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    for n, f in enumerate(sorted(ct_b["dicom"].iterdir())):
        shutil.copy(f, folder / f.name)
        if n % 2 == 0:
            ds = pydicom.dcmread(f)
            uid = pydicom.uid.generate_uid()
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
            ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.SeriesNumber = series_uid, study_uid, 7
            ds.save_as(folder / f"b{n:02d}")
    return folder, series_uid


def test_a_query_with_several_series_references_the_chosen_one(ct_b, two_series, tmp_path, capsys, monkeypatch):
    folder, uid = two_series
    from fewshotsam2.io.volume import dicom_series_files

    numbers = {n: dicom_series_files(f"{folder}#{n}") for n in (1, 2)}
    named = next(n for n, files in numbers.items() if len(files) == 10)
    other = 3 - named
    assert dicom_series_files(f"{folder}#{uid}") == numbers[named]
    query = read_volume(f"{folder}#{named}")
    labels, _ = read_labels(ct_b["dicom"].parent / "labels.nii.gz", query)
    out = tmp_path / "b.dcm"
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        write_dicom_seg(out, labels.with_array(np.where(labels.array == LIVER, LIVER, 0).astype(np.uint8)),
                        ct_b["structures"][:1], f"{folder}#{named}")
    assert not [w for w in said if "anonymised" in str(w.message)]  # this series has its UIDs
    seg = pydicom.dcmread(out)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == uid and seg.StudyInstanceUID
    referenced = {str(i.ReferencedSOPInstanceUID) for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in numbers[named]}
    # the anonymised one of the same folder, by number
    out2 = tmp_path / "a.dcm"
    query2 = read_volume(f"{folder}#{other}")
    labels2, _ = read_labels(ct_b["dicom"].parent / "labels.nii.gz", query2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_dicom_seg(out2, labels2.with_array((labels2.array == LIVER).astype(np.uint8)),
                        [Structure(1, "liver", (1, 0, 0))], f"{folder}#{other}")
    assert len(pydicom.dcmread(out2).ReferencedSeriesSequence[0].ReferencedInstanceSequence) == 20


@pytest.mark.slow  # SAM2 runs (64 px), dciodvfy
def test_segment_writes_a_valid_seg_for_folder_hash_n(ct_b, two_series, tmp_path, capsys, monkeypatch, ct_a_paths,
                                                      seg_file):
    folder, uid = two_series
    out = tmp_path / "seg.dcm"
    rc = _main(["segment", "--query", f"{folder}#{uid}", "--support", *ct_a_paths, "--labels", "liver=5,spleen=1",
                "--out", str(out), *MODEL], monkeypatch)
    assert rc == 0 and out.is_file()
    assert _errors(out) == []
    seg = pydicom.dcmread(out)
    assert [str(s.SegmentLabel) for s in seg.SegmentSequence] == ["liver", "spleen"]
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == uid
    # a DICOM SEG as the support's labels, its segments chosen by name
    out2 = tmp_path / "from-seg.seg.nrrd"
    rc = _main(["segment", "--query", f"{folder}#{uid}", "--support", str(ct_b["dicom"]), str(seg_file[0]),
                "--labels", "spleen,liver", "--out", str(out2), *MODEL], monkeypatch)
    assert rc == 0
    _labels, structures = read_labels(out2, read_volume(f"{folder}#{uid}"))
    assert sorted(s.name for s in structures) == ["liver", "spleen"]


@pytest.mark.slow  # SAM2 runs (64 px), dciodvfy
def test_batch_writes_a_seg_per_dicom_query(ct_b, tmp_path, monkeypatch, ct_a_paths, engine64):
    import os

    queries = tmp_path / "queries"
    queries.mkdir()
    os.symlink(ct_b["dicom"], queries / "ct-b")
    out_dir = tmp_path / "segs"
    rc = _main(["batch", "--queries", str(queries), "--support", *ct_a_paths, "--labels", "liver=5",
                "--out-dir", str(out_dir), "--out-format", "dicom-seg", *MODEL], monkeypatch, engine64)
    assert rc == 0
    assert _errors(out_dir / "ct-b.dcm") == []
    labels, structures = read_labels(out_dir / "ct-b.dcm", ct_b["image"])
    assert [s.name for s in structures] == ["liver"]


def test_a_non_dicom_query_asked_for_dicom_seg_is_one_clear_error(tmp_path, ct_a_paths, capsys, monkeypatch):
    out = tmp_path / "x.dcm"
    rc = _main(["segment", "--query", ct_a_paths[0], "--support", *ct_a_paths, "--labels", "5", "--out", str(out),
                *MODEL], monkeypatch)
    err = capsys.readouterr().err
    assert rc == 2 and "needs a DICOM series as the query" in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_without_highdicom_a_seg_output_says_how_to_install_it(ct_b, tmp_path, ct_a_paths, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "highdicom", None)  # as if not installed: importing it raises ImportError
    out = tmp_path / "x.dcm"
    rc = _main(["segment", "--query", str(ct_b["dicom"]), "--support", *ct_a_paths, "--labels", "5", "--out",
                str(out), *MODEL], monkeypatch)
    err = capsys.readouterr().err
    assert rc == 2 and "pip install highdicom" in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_batch_refuses_a_seg_for_a_non_dicom_query_before_any_work(tmp_path, ct_a_paths, capsys, monkeypatch):
    manifest = tmp_path / "cohort.csv"
    manifest.write_text("query,support_image,support_labels,labels,output\n"
                        f"{ct_a_paths[0]},{ct_a_paths[0]},{ct_a_paths[1]},5,out/a.dcm\n")
    rc = _main(["batch", "--manifest", str(manifest), *MODEL], monkeypatch)
    err = capsys.readouterr().err
    assert rc == 2 and "a DICOM SEG needs a DICOM series as the query" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cohort.csv"]


def test_a_seg_as_support_labels_on_the_flipped_y_grid(ct_b, seg_file):
    """The SEG read against labels.nii.gz's own grid (y the other way): resampled by physical geometry, it gives
    back that file's liver and spleen voxels."""
    raw = ct_b["raw"]
    labels, structures = read_labels(seg_file[0], raw)
    assert labels.same_grid(raw) and [s.name for s in structures] == ["liver", "spleen"]
    for s, value in zip(structures, (LIVER, SPLEEN)):
        np.testing.assert_array_equal(structure_mask(labels, s), raw.array == value)


def test_empty_segments_are_written_and_left_out_when_read(ct_b, tmp_path):
    """An empty result is still a valid SEG (every frame kept); reading it as labels is one clear error. An empty
    segment beside a labeled one is left out with a warning, as an empty .seg.nrrd segment is."""
    labels = ct_b["labels"]
    liver_only = labels.with_array(np.where(labels.array == LIVER, LIVER, 0).astype(np.uint8))
    empty = labels.with_array(np.zeros(labels.shape, np.uint8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_dicom_seg(tmp_path / "one.dcm", liver_only, ct_b["structures"], ct_b["dicom"])
        write_dicom_seg(tmp_path / "none.dcm", empty, ct_b["structures"], ct_b["dicom"])
    with pytest.warns(UserWarning, match="segment 'spleen' is empty; ignored"):
        back, structures = read_labels(tmp_path / "one.dcm", ct_b["image"])
    assert [s.name for s in structures] == ["liver"]
    np.testing.assert_array_equal(structure_mask(back, structures[0]), labels.array == LIVER)
    with pytest.raises(InputError, match="none.dcm: the DICOM SEG has no labeled voxel"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            read_labels(tmp_path / "none.dcm", ct_b["image"])
    assert len(pydicom.dcmread(tmp_path / "none.dcm").PerFrameFunctionalGroupsSequence) == 2 * labels.shape[0]


def test_a_file_that_is_no_seg_is_refused(tmp_path, ct_b):
    bad = tmp_path / "image.dcm"
    shutil.copy(sorted(ct_b["dicom"].iterdir())[0], bad)
    with pytest.raises(InputError, match="cannot read as a DICOM SEG"):
        read_dicom_seg(bad)


# ------------------------------------------------------------------------------------------ helpers


@pytest.fixture(scope="module")
def ct_a_paths(shared_dir):
    folder = shared_dir / "data" / "abdomen-ct" / "ct-a"
    return [str(folder / "image.nii.gz"), str(folder / "labels.nii.gz")]


def _main(argv, monkeypatch, engine=None) -> int:
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # main() replaces it; restore after
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cli.main(argv, engine_factory=(lambda options: engine) if engine is not None else None)
