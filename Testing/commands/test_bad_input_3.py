"""The third bad-input battery (issue 21): full disks, batch resume, the batch summary, stale temporaries,
symlinked outputs, non-finite geometry, environment variables; each through the command line as a user runs it.

Every case: the exit code, the first words of the one error line, the inputs byte-identical after the run and no
output or temporary file left. A full disk is a real 64 KiB tmpfs where this process may mount one (root on
Linux), and always also a write wrapper that makes the writer fail as a full disk makes it (ITK's writers leave
a short file and report nothing; Python's raise ENOSPC).
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from test_bad_input import (ERROR, assert_refused, data, no_engine, real_engine, refused,  # noqa: F401
                             main_in_process, segment_argv)
from conftest import _missing as missing  # skipped off CI, a failure under CI=true
from conftest import folder_state
from fewshotsam2.io import volume
from fewshotsam2.io.volume import read_volume

FORMATS = (".nrrd", ".nii", ".nii.gz", ".seg.nrrd")


# ------------------------------------------------------------------------------------------------ a full disk

def _try_tmpfs(folder: Path, size: str) -> bool:
    if sys.platform != "linux" or os.geteuid() != 0:
        return False
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    return r.returncode == 0


@pytest.fixture
def full_disk(tmp_path):
    """A 64 KiB tmpfs filled to the last byte by a filler file; skipped where mounting is not allowed
    (the write-wrapper tests below cover the same code everywhere)."""
    folder = tmp_path / "small"
    folder.mkdir()
    if not _try_tmpfs(folder, "64k"):
        # skipped only off CI (a developer without root); CI runs as root on Linux, where a missing mount fails
        missing("cannot mount a tmpfs here (needs root on Linux); the write-wrapper tests cover a full disk")
    try:
        fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(fd, b"\0" * 1024):  # to the last byte: even a tiny compressed label map does not fit
                pass
        except OSError:
            pass
        finally:
            os.close(fd)
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)


def _left(folder: Path, keep=("filler",)) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


@pytest.mark.parametrize("ext", FORMATS)
def test_full_tmpfs_gives_exit_2_and_no_file(data, full_disk, tmp_path, capsys, monkeypatch, real_engine, ext):
    before = folder_state(data["dir"])
    out = full_disk / f"x{ext}"
    rc, out_text, err = main_in_process(segment_argv(data["query"], data["support"], data["labels"], out), capsys,
                                monkeypatch)
    assert rc == 2, err
    assert err.splitlines()[-1].startswith(f"{ERROR}{out}: cannot write (no space left on the device"), err
    assert "wrote" not in out_text
    assert _left(full_disk) == []
    assert folder_state(data["dir"]) == before


@pytest.mark.parametrize("ext", (".nrrd", ".nii", ".nii.gz"))
@pytest.mark.parametrize("cut", ("empty", "half"))
def test_writer_that_silently_truncates_is_caught(data, tmp_path, capsys, monkeypatch, real_engine, ext, cut):
    """ITK's writer on a full disk: a short file and no error. The read-back finds it; nothing is published, and
    an older file at --out stays as it was."""
    real_write = sitk.WriteImage

    def short_write(image, path, *args, **kwargs):
        real_write(image, path, *args, **kwargs)
        size = os.path.getsize(path)
        os.truncate(path, 0 if cut == "empty" else size // 2)

    monkeypatch.setattr(volume.sitk, "WriteImage", short_write)
    out = tmp_path / "out" / f"x{ext}"
    out.parent.mkdir()
    out.write_bytes(b"an older result")
    before = folder_state(data["dir"])
    rc, out_text, err = main_in_process(segment_argv(data["query"], data["support"], data["labels"], out), capsys,
                                monkeypatch)
    assert rc == 2, err
    assert err.splitlines()[-1].startswith(f"{ERROR}{out}: cannot write ("), err
    assert out.read_bytes() == b"an older result"
    assert _left(out.parent, keep=("x" + ext,)) == []
    assert folder_state(data["dir"]) == before


def test_scores_on_a_full_disk_keep_neither_output(data, tmp_path, capsys, monkeypatch, real_engine):
    """--scores fails after the run: neither the label map nor the scores are published (both or neither)."""
    real_open = open

    class FullDisk:
        """A file whose writes fail as on a full disk."""

        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, _text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

    def enospc_open(path, mode="r", *args, **kwargs):  # the scores' write hits a full disk
        f = real_open(path, mode, *args, **kwargs)
        return FullDisk(f) if "w" in mode and str(path).endswith(".csv") else f

    monkeypatch.setattr("builtins.open", enospc_open)
    out, scores = tmp_path / "o" / "x.nii.gz", tmp_path / "o" / "s.csv"
    out.parent.mkdir()
    rc, _, err = main_in_process(segment_argv(data["query"], data["support"], data["labels"], out, "--scores", scores),
                         capsys, monkeypatch)
    assert rc == 2, err
    assert err.splitlines()[-1].startswith(f"{ERROR}{scores}: cannot write (no space left on the device"), err
    assert _left(out.parent, keep=()) == []


def test_out_symlink_is_written_through_to_its_target(data, tmp_path, capsys, monkeypatch, real_engine):
    target = tmp_path / "results" / "seg.nii.gz"
    target.parent.mkdir()
    target.write_bytes(b"stale")
    link = tmp_path / "link.nii.gz"
    link.symlink_to(target)
    rc, _, err = main_in_process(segment_argv(data["query"], data["support"], data["labels"], link), capsys, monkeypatch)
    assert rc == 0, err
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert sitk.ReadImage(str(target)).GetSize() == sitk.ReadImage(data["query"]).GetSize()
    assert sorted(p.name for p in target.parent.iterdir()) == ["seg.nii.gz"]


# ------------------------------------------------------------------------------------------------ batch

from fewshotsam2.commands.batch import SUMMARY_NAME, read_summary, record_path  # noqa: E402

BATCH_MODEL = ["--method", "reverse", "--untrained", "--image-size", "64", "--device", "cpu", "--slice-range", "off",
               "--quiet"]


def _manifest(folder: Path, data, outputs, name="cohort.csv") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = "".join(f"{data['query']},{data['support']},{data['labels']},5,{o}\n" for o in outputs)
    path = folder / name
    path.write_text("query,support_image,support_labels,labels,output\n" + rows)
    return path


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_batch_resumes_only_what_it_completed(data, tmp_path, capsys, monkeypatch, real_engine):
    """A cut output and a foreign image at the output path are redone (with a note), never skipped as done; an
    intact output of this tool for this row with these options is skipped; other options redo it."""
    out = tmp_path / "out"
    manifest = _manifest(tmp_path, data, ["a.nii.gz", "b.nii.gz", "c.nii.gz"])
    argv = ["batch", "--manifest", manifest, "--out-dir", out, *BATCH_MODEL]
    rc, _, err = main_in_process(argv, capsys, monkeypatch)
    assert rc == 0, err
    full = (out / "a.nii.gz").read_bytes()
    (out / "a.nii.gz").write_bytes(full[:len(full) // 2])  # cut
    sitk.WriteImage(sitk.Image([10, 10, 3], sitk.sitkUInt8), str(out / "b.nii.gz"))  # foreign
    rc, stdout, err = main_in_process(argv, capsys, monkeypatch)
    assert rc == 0, err
    assert [r["status"] for r in read_summary(str(out / SUMMARY_NAME))] == ["ok", "ok", "skipped"]
    assert f"fewshotsam2: {manifest.name} row 2: {out / 'a.nii.gz'} changed since this tool wrote it" in err
    assert f"fewshotsam2: {manifest.name} row 3: {out / 'b.nii.gz'} changed since this tool wrote it" in err
    assert (out / "a.nii.gz").read_bytes() == full
    assert sitk.ReadImage(str(out / "b.nii.gz")).GetSize() == sitk.ReadImage(data["query"]).GetSize()
    # no record at all (an older version's output, or a file put there): redone, said so
    record_path(out / "c.nii.gz").unlink()
    rc, _, err = main_in_process(argv, capsys, monkeypatch)
    assert rc == 0 and "c.nii.gz exists but was not completed by this tool (no record)" in err, err
    # other options that change the result: redone
    rc, _, err = main_in_process(argv + ["--shots", "2"], capsys, monkeypatch)
    assert rc == 0 and err.count("was made from other inputs or options") == 3, err
    assert [r["status"] for r in read_summary(str(out / SUMMARY_NAME))] == ["ok"] * 3


def test_batch_summary_never_replaces_the_manifest(data, tmp_path, capsys, monkeypatch, no_engine):
    manifest = _manifest(tmp_path / "cohort", data, ["a.nii.gz"], name=SUMMARY_NAME)
    before = folder_state(tmp_path)
    rc, _, err = main_in_process(["batch", "--manifest", manifest, *BATCH_MODEL], capsys, monkeypatch)
    assert rc == 2
    assert err.startswith(f"{ERROR}the batch summary {manifest} would replace the input {manifest}"), err
    assert folder_state(tmp_path) == before


def test_batch_summary_goes_only_where_the_user_named(data, tmp_path, capsys, monkeypatch, no_engine):
    """Outputs in two unrelated folders: their common parent is nothing the user named (the issue's case: the
    file system root); the summary needs --out-dir."""
    a, b = tmp_path / "disk1" / "segs", tmp_path / "disk2" / "segs"
    manifest = _manifest(tmp_path / "cohort", data, [a / "x.nii.gz", b / "y.nii.gz"])
    before = folder_state(tmp_path)
    rc, _, err = main_in_process(["batch", "--manifest", manifest, *BATCH_MODEL], capsys, monkeypatch)
    assert rc == 2
    assert err.startswith(f"{ERROR}the outputs lie in different folders"), err
    assert "give --out-dir DIR for the batch summary" in err
    assert folder_state(tmp_path) == before and not (tmp_path / SUMMARY_NAME).exists()


def test_batch_outputs_are_not_a_manifest(data, tmp_path, capsys, monkeypatch, no_engine):
    """A row whose output is the manifest itself is refused (the manifest is an input)."""
    manifest = _manifest(tmp_path, data, ["cohort.csv"])
    manifest.write_text(manifest.read_text().replace("cohort.csv", "cohort.nrrd"))
    manifest = manifest.rename(tmp_path / "cohort.nrrd")  # a manifest may have any name
    before = folder_state(tmp_path)
    rc, _, err = main_in_process(["batch", "--manifest", manifest, "--out-dir", tmp_path, *BATCH_MODEL], capsys, monkeypatch)
    assert rc == 2
    assert err.startswith(f"{ERROR}cohort.nrrd row 2: output {manifest} is an input (the manifest"), err
    assert folder_state(tmp_path) == before


@pytest.mark.parametrize("inside", ("out", "."))
def test_outputs_inside_the_queries_folder_are_not_queries_next_time(data, tmp_path, capsys, monkeypatch,
                                                                       real_engine, inside):
    qd = tmp_path / "qd"
    qd.mkdir()
    (qd / "scan.nii.gz").write_bytes(Path(data["query"]).read_bytes())
    out = qd / inside
    argv = ["batch", "--queries", qd, "--support", data["support"], data["labels"], "--labels", "5",
            "--out-dir", out, "--out-format", ".nrrd", *BATCH_MODEL]
    rc, stdout, err = main_in_process(argv, capsys, monkeypatch)
    assert rc == 0 and "1 cases: 1 ok" in stdout, err
    before = folder_state(qd)
    rc, stdout, err = main_in_process(argv, capsys, monkeypatch)
    assert rc == 0 and "1 cases: 0 ok, 1 skipped, 0 failed" in stdout, err
    own = "out/" if inside == "out" else "scan.nrrd"
    assert f"warning: --queries {qd}: skipped this tool's own outputs {own}" in err, err
    assert folder_state(qd) == {k: v for k, v in before.items()} | {SUMMARY_NAME if inside == "." else
                                                             f"out/{SUMMARY_NAME}": folder_state(out)[SUMMARY_NAME]}


def test_queries_folder_with_a_notes_folder_and_a_series_folder_itself(shared_dir, data, tmp_path, capsys,
                                                                        monkeypatch, no_engine):
    qd = tmp_path / "qd"
    (qd / "notes").mkdir(parents=True)
    (qd / "notes" / "readme.txt").write_text("how these scans were taken")
    series = shared_dir / "data" / "abdomen-ct" / "ct-b" / "dicom"
    rc, _, err = main_in_process(["batch", "--queries", qd, "--support", data["support"], data["labels"], "--labels", "5",
                          "--out-dir", tmp_path / "o", *BATCH_MODEL], capsys, monkeypatch)
    assert rc == 2
    assert f"warning: --queries {qd}: skipped folders without DICOM files notes/" in err, err
    assert err.splitlines()[-1].startswith(f"{ERROR}--queries {qd}: no scans found"), err
    rc, _, err = main_in_process(["batch", "--queries", series, "--support", data["support"], data["labels"], "--labels",
                          "5", "--out-dir", tmp_path / "o", *BATCH_MODEL], capsys, monkeypatch)
    assert rc == 2
    assert err.startswith(f"{ERROR}--queries {series}: is itself a DICOM series folder"), err
    assert not (tmp_path / "o").exists()


def test_manifest_that_is_a_folder(tmp_path, capsys, monkeypatch, no_engine):
    rc, _, err = main_in_process(["batch", "--manifest", tmp_path, *BATCH_MODEL], capsys, monkeypatch)
    assert rc == 2 and err.startswith(f"{ERROR}--manifest {tmp_path}: is a folder; give the manifest CSV"), err


def test_stale_temporaries_are_removed_when_a_batch_starts(data, tmp_path, capsys, monkeypatch, real_engine):
    out = tmp_path / "out"
    out.mkdir()
    old = [out / ".tmp-0123abcd.nii.gz", out / ".tmp-89abcdef.csv", out / ".batch-summary-k2j3h4g5.csv"]
    for p in old:
        p.write_bytes(b"half")
        os.utime(p, (time.time() - 3600, time.time() - 3600))
    recent = out / ".tmp-feedbeef.nii.gz"  # another run may be writing it now: kept
    recent.write_bytes(b"being written")
    foreign = out / ".tmp-notours.txt"  # not this package's naming scheme: kept
    foreign.write_bytes(b"x")
    os.utime(foreign, (time.time() - 3600, time.time() - 3600))
    manifest = _manifest(tmp_path, data, ["a.nii.gz"])
    rc, _, err = main_in_process(["batch", "--manifest", manifest, "--out-dir", out, "--force", *BATCH_MODEL], capsys,
                         monkeypatch)
    assert rc == 0, err
    assert f"fewshotsam2: removed 3 temporary file(s) an interrupted run left in {out}" in err
    assert not any(p.exists() for p in old) and recent.exists() and foreign.exists()


def test_batch_summary_follows_the_umask(data, tmp_path, capsys, monkeypatch, real_engine):
    previous = os.umask(0o022)
    try:
        manifest = _manifest(tmp_path, data, ["a.nii.gz"])
        rc, _, err = main_in_process(["batch", "--manifest", manifest, "--out-dir", tmp_path / "o", *BATCH_MODEL], capsys,
                             monkeypatch)
    finally:
        os.umask(previous)
    assert rc == 0, err
    assert (tmp_path / "o" / SUMMARY_NAME).stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "o" / "a.nii.gz").stat().st_mode & 0o777 == 0o644


def test_batch_on_a_full_disk(data, full_disk, tmp_path, capsys, monkeypatch, real_engine):
    manifest = _manifest(tmp_path, data, ["a.nii.gz", "b.nii.gz"])
    before = folder_state(tmp_path)
    rc, _, err = main_in_process(["batch", "--manifest", manifest, "--out-dir", full_disk, *BATCH_MODEL], capsys,
                         monkeypatch)
    assert rc == 2, err
    assert err.splitlines()[-1].startswith(f"{ERROR}cannot write the batch summary {full_disk / SUMMARY_NAME} "
                                           "(no space left on the device"), err
    assert _left(full_disk) == [] and folder_state(tmp_path) == before


def test_batch_summary_folder_read_only(data, tmp_path, capsys, monkeypatch, no_engine):
    """Refused before any work (the issue: case 1 written, then a traceback and case 2 never ran)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() == 0:  # root writes through file modes: a read-only mount is what refuses root
        if not _try_tmpfs(ro, "64k"):
            missing("root, and no read-only tmpfs mount possible here")
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
    else:
        ro.chmod(0o555)
    try:
        manifest = _manifest(tmp_path, data, [tmp_path / "segs" / "a.nii.gz"])
        rc, _, err = main_in_process(["batch", "--manifest", manifest, "--out-dir", ro, *BATCH_MODEL], capsys, monkeypatch)
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(ro)], check=False)
        else:
            ro.chmod(0o755)
    assert rc == 2
    assert err.startswith(f"{ERROR}cannot write the batch summary {ro / SUMMARY_NAME}: {ro} is not a writable"), err
    assert not (tmp_path / "segs").exists()


def test_batch_row_with_an_over_long_output_name(data, tmp_path, capsys, monkeypatch, no_engine):
    manifest = _manifest(tmp_path, data, ["x" * 300 + ".nii.gz"])
    rc, _, err = main_in_process(["batch", "--manifest", manifest, "--out-dir", tmp_path / "o", *BATCH_MODEL], capsys,
                         monkeypatch)
    assert rc == 2 and err.startswith(f"{ERROR}cohort.csv row 2: output xxxx"), err
    assert "file name too long" in err and not (tmp_path / "o").exists()


def test_batch_slice_range_outside_a_query_is_refused_with_the_manifest(data, tmp_path, capsys, monkeypatch,
                                                                          no_engine):
    manifest = _manifest(tmp_path, data, ["a.nii.gz"])
    argv = ["batch", "--manifest", manifest, "--out-dir", tmp_path / "o", *BATCH_MODEL[:-3], "--slice-range",
            "0:99", "--quiet"]
    rc, _, err = main_in_process(argv, capsys, monkeypatch)
    assert rc == 2
    assert err.startswith(f"{ERROR}cohort.csv row 2: --slice-range 0:99 lies outside the query"), err
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------ geometry

def _nrrd_with(path: Path, source: str, field_line: str) -> None:
    """`source` (an image) as a NRRD whose geometry is the one `field_line` gives (spacings, no space)."""
    sitk.WriteImage(sitk.ReadImage(source), str(path), useCompression=False)
    data = path.read_bytes()
    end = data.index(b"\n\n")
    lines = [ln for ln in data[:end].decode().split("\n")
             if not ln.startswith(("space directions", "space:", "space origin", "measurement frame"))]
    path.write_bytes("\n".join(lines + [field_line]).encode() + data[end:])


@pytest.mark.parametrize("value", ("nan", "inf", "-inf"))
def test_nrrd_with_non_finite_spacing_is_refused(data, tmp_path, capsys, monkeypatch, no_engine, value):
    """ITK reads `spacings: 3 3 nan` as 1 mm and would slice along the wrong axis: refused like zero spacing."""
    folder = tmp_path / "in"
    folder.mkdir()
    query = folder / "query.nrrd"
    _nrrd_with(query, data["query"], f"spacings: 0.8 0.8 {value}")
    out = tmp_path / "o" / "x.nii.gz"
    out.parent.mkdir()
    refused(segment_argv(query, data["support"], data["labels"], out), capsys, monkeypatch,
            f"query.nrrd: spacings '0.8 0.8 {value}' holds a value that is not a finite number", [folder])
    assert _left(out.parent, keep=()) == []


def test_seg_nrrd_with_a_zero_space_direction_is_refused(data, tmp_path, capsys, monkeypatch, no_engine):
    import slicerio

    support = read_volume(data["support"])
    liver = (read_volume(data["labels"]).array == 5)
    seg = slicerio.create_segmentation(support.shape[::-1], support.ijk_to_lps())
    slicerio.add_segment(seg, liver.transpose(2, 1, 0), {"id": "a", "name": "liver", "color": [1.0, 0.0, 0.0]})
    folder = tmp_path / "in"
    folder.mkdir()
    path = folder / "s.seg.nrrd"
    slicerio.write_segmentation(str(path), seg)
    raw = path.read_bytes()
    end = raw.index(b"\n\n")
    header = "\n".join(("space directions: (0,0,0) (0,0.8,0) (0,0,3)" if ln.startswith("space directions") else ln)
                       for ln in raw[:end].decode().split("\n"))
    path.write_bytes(header.encode() + raw[end:])
    out = tmp_path / "x.nii.gz"
    refused(segment_argv(data["query"], data["support"], path, out), capsys, monkeypatch,
            "s.seg.nrrd: a space direction is zero or not a finite number", [folder])
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ environment

@pytest.mark.parametrize("name,value,first_words", [
    ("FEWSHOTSAM2_FEATURE_CACHE_MB", "nan", "$FEWSHOTSAM2_FEATURE_CACHE_MB must be a finite number of MB"),
    ("FEWSHOTSAM2_FEATURE_CACHE_MB", "inf", "$FEWSHOTSAM2_FEATURE_CACHE_MB must be a finite number of MB"),
    ("FEWSHOTSAM2_SAMPLE_URL", "not a url", "$FEWSHOTSAM2_SAMPLE_URL must be the http(s):// or file://"),
    ("FEWSHOTSAM2_LPIPS_WEIGHTS", "{tmp}", "$FEWSHOTSAM2_LPIPS_WEIGHTS {tmp} is a folder"),
    ("FEWSHOTSAM2_CACHE", "{data}", "$FEWSHOTSAM2_CACHE {data} is a file"),
    ("FEWSHOTSAM2_PARENT_PID", "{dead}", "$FEWSHOTSAM2_PARENT_PID names process {dead}, which is not running"),
    ("FEWSHOTSAM2_PARENT_PID", "slicer", "$FEWSHOTSAM2_PARENT_PID must be a process id"),
])
def test_environment_variables_are_checked_before_any_work(data, tmp_path, capsys, monkeypatch, no_engine, name,
                                                            value, first_words):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    fill = dict(tmp=tmp_path, data=data["query"], dead=dead.pid)
    monkeypatch.setenv(name, value.format(**fill))
    out = tmp_path / "o" / "x.nii.gz"
    out.parent.mkdir()
    refused(segment_argv(data["query"], data["support"], data["labels"], out, "--progress", "json"), capsys,
            monkeypatch, first_words.format(**fill), [data["dir"], out.parent])


# ------------------------------------------------------------------------------------------------ unclear or late

@pytest.mark.parametrize("spec,first_words", [
    ("liver=1:2,liver=3:4", "--slice-range 'liver=1:2,liver=3:4': 'liver' is given twice"),
    ("0:2,1:3", "--slice-range '0:2,1:3': several ranges without structure names"),
])
def test_slice_range_errors_keep_their_precise_words(data, tmp_path, capsys, monkeypatch, no_engine, spec,
                                                     first_words):
    refused(segment_argv(data["query"], data["support"], data["labels"], tmp_path / "x.nii.gz", "--slice-range",
                         spec), capsys, monkeypatch, first_words, [data["dir"], tmp_path])


def test_two_segments_of_one_name_get_advice_that_works(data, tmp_path, capsys, monkeypatch, no_engine):
    import slicerio

    support = read_volume(data["support"])
    liver = read_volume(data["labels"]).array == 5
    half = liver.copy()
    half[:, :, : liver.shape[2] // 2] = False
    seg = slicerio.create_segmentation(support.shape[::-1], support.ijk_to_lps())
    slicerio.add_segment(seg, (liver & ~half).transpose(2, 1, 0), {"id": "a", "name": "liver", "color": [1, 0, 0]})
    slicerio.add_segment(seg, half.transpose(2, 1, 0), {"id": "b", "name": "liver", "color": [0, 1, 0]})
    folder = tmp_path / "in"
    folder.mkdir()
    path = folder / "two.seg.nrrd"
    slicerio.write_segmentation(str(path), seg)
    argv = segment_argv(data["query"], data["support"], path, tmp_path / "x.nii.gz")
    argv[argv.index("--labels") + 1] = "liver"
    line = refused(argv, capsys, monkeypatch, "--labels 'liver' is ambiguous in", [folder])
    assert "select one by its label value (value:N)" in line and "exact case" not in line
    # the advice works: value:N picks one of them (past the labels, only the engine stand-in stops the run)
    value = slicerio.read_segmentation(str(path))["segments"][0]["labelValue"]
    argv[argv.index("--labels") + 1] = f"value:{value}"
    with pytest.raises(AssertionError, match="SAM2 was built"):
        main_in_process(argv, capsys, monkeypatch)


@pytest.mark.parametrize("content,first_words", [
    (b"not a torch file at all", "cannot read LPIPS backbone weights '{path}': not a PyTorch state dict of tensors"),
    (None, "LPIPS backbone weights '{path}' is a folder; give the weights file"),
])
def test_bad_lpips_weights_are_an_error_not_a_silent_full_run(data, tmp_path, capsys, monkeypatch, no_engine,
                                                              content, first_words):
    path = tmp_path / "w" / "alexnet.pth"
    path.parent.mkdir()
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    out = tmp_path / "o" / "x.nii.gz"
    out.parent.mkdir()
    line = refused(segment_argv(data["query"], data["support"], data["labels"], out, "--slice-range", "auto",
                                "--lpips-weights", path), capsys, monkeypatch, first_words.format(path=path),
                   [data["dir"], out.parent])
    assert len(line) < 400 and "weights_only" not in line


def test_a_query_path_starting_with_a_dash_gets_the_hint(data, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("-scan.nii.gz").write_bytes(Path(data["query"]).read_bytes())
    with pytest.raises(SystemExit) as exit_:
        main_in_process(segment_argv("-scan.nii.gz", data["support"], data["labels"], "x.nii.gz"), capsys, monkeypatch)
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.strip().splitlines()[-1] == ("fewshotsam2 segment: error: argument --query: expected one argument "
                                            "(the path -scan.nii.gz starts with '-', which reads as an option: "
                                            "write ./-scan.nii.gz)")
    assert sorted(os.listdir(tmp_path)) == ["-scan.nii.gz"]


def test_extent_refuses_a_constant_query(data, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "in"
    folder.mkdir()
    air = sitk.ReadImage(data["query"]) * 0 - 1000
    sitk.WriteImage(air, str(folder / "air.nii.gz"))
    refused(["extent", "--query", folder / "air.nii.gz", "--support", data["support"], data["labels"], "--labels",
             "5"], capsys, monkeypatch, "the query is constant (every voxel is -1000)", [folder])


def test_extent_warns_on_another_modality_naming_the_image(shared_dir, data, tmp_path, capsys, monkeypatch):
    from conftest import crop_slices

    mr = read_volume(shared_dir / "data" / "abdomen-mr" / "image.nii.gz")
    sitk.WriteImage(crop_slices(mr, 8, 11).to_sitk(), str(tmp_path / "mr.nii.gz"))
    rc, out, err = main_in_process(["extent", "--query", tmp_path / "mr.nii.gz", "--support", data["support"],
                            data["labels"], "--labels", "5", "--lpips-weights",
                            shared_dir / "weights" / "lpips" / "alexnet_features.pth"], capsys, monkeypatch)
    assert rc == 0, err
    assert f"warning: {data['support']} and the query look like different modalities" in err, err


def test_oblique_query_is_warned_once(data, tmp_path, capsys, monkeypatch, real_engine):
    q = sitk.ReadImage(data["query"])
    a = np.deg2rad(25)
    rot = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    q.SetDirection(tuple((rot @ np.array(q.GetDirection()).reshape(3, 3)).ravel()))
    sitk.WriteImage(q, str(tmp_path / "oblique.nii.gz"))
    rc, _, err = main_in_process(segment_argv(tmp_path / "oblique.nii.gz", data["support"], data["labels"],
                                      tmp_path / "x.nii.gz", "--slice-range", "0:2"), capsys, monkeypatch)
    assert rc == 0, err
    assert err.count("is oblique") == 1, err


def test_bench_refusals_come_without_the_untrained_banner(data, tmp_path, capsys, monkeypatch, no_engine):
    rc, out, err = main_in_process(["bench", "--query", data["query"], "--support", data["support"], "--support-labels",
                            data["labels"], "--max-slices", "-5", "--untrained", "--image-size", "64", "--device",
                            "cpu"], capsys, monkeypatch)
    assert_refused(rc, err, "--max-slices must be 0 (every slice) or more, got -5")
    assert "UNTRAINED" not in out + err


def test_bench_claims_no_crop_it_did_not_make(data, tmp_path, capsys, monkeypatch, real_engine):
    report = tmp_path / "bench.md"
    rc, out, err = main_in_process(["bench", "--query", data["query"], "--support", data["support"], "--support-labels",
                            data["labels"], "--structures", "5", "--methods", "propagate", "--max-slices", "99",
                            "--untrained", "--image-size", "64", "--device", "cpu", "-o", report], capsys,
                           monkeypatch)
    assert rc == 0, err
    assert "cropped" not in report.read_text() and "4 slices along array axis" in report.read_text()
    assert err.index("UNTRAINED") >= 0


def test_evaluate_structure_no_case_holds_is_refused(data, tmp_path, capsys, monkeypatch, no_engine):
    for name in ("case1", "case2"):
        case = tmp_path / name
        case.mkdir()
        (case / "image.nii.gz").write_bytes(Path(data["support"]).read_bytes())
        (case / "labels.nii.gz").write_bytes(Path(data["labels"]).read_bytes())
    refused(["evaluate", tmp_path / "case1", tmp_path / "case2", "-o", tmp_path / "results", "--structures", "5,77",
             "--untrained", "--image-size", "64", "--device", "cpu"], capsys, monkeypatch,
            "--structures: Label 77 (77) is in no case's labels (case1, case2)", [tmp_path])
    assert not (tmp_path / "results").exists()


def test_checkpoint_that_is_a_folder_says_so(data, tmp_path, capsys, monkeypatch):
    argv = segment_argv(data["query"], data["support"], data["labels"], tmp_path / "x.nii.gz")
    argv.remove("--untrained")
    refused(argv + ["--checkpoint", tmp_path], capsys, monkeypatch, f"checkpoint {tmp_path} is a folder; give the "
            "checkpoint file", [data["dir"], tmp_path])


def test_sample_data_names_its_folder_on_the_same_line(shared_dir, capsys, monkeypatch):
    """The demo shows stderr and reads stdout's last line: 'verified in' must carry the folder itself."""
    rc, out, err = main_in_process(["sample-data", "--check", "--dest", shared_dir / "data"], capsys, monkeypatch)
    assert rc == 0, err
    assert f"23 sample files verified (SHA256) in {shared_dir / 'data'}\n" in err
    assert out.strip().splitlines()[-1] == str(shared_dir / "data")
