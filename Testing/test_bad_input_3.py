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

from test_bad_input import ERROR, data, digest, no_engine, real_engine, run_cli, segment_argv  # noqa: F401
from fewshotsam2 import volume

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
        pytest.skip("cannot mount a tmpfs here (needs root on Linux); the write-wrapper tests cover a full disk")
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
    before = digest(data["dir"])
    out = full_disk / f"x{ext}"
    rc, out_text, err = run_cli(segment_argv(data["query"], data["support"], data["labels"], out), capsys,
                                monkeypatch)
    assert rc == 2, err
    assert err.splitlines()[-1].startswith(f"{ERROR}{out}: cannot write (no space left on the device"), err
    assert "wrote" not in out_text
    assert _left(full_disk) == []
    assert digest(data["dir"]) == before


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
    before = digest(data["dir"])
    rc, out_text, err = run_cli(segment_argv(data["query"], data["support"], data["labels"], out), capsys,
                                monkeypatch)
    assert rc == 2, err
    assert err.splitlines()[-1].startswith(f"{ERROR}{out}: cannot write ("), err
    assert out.read_bytes() == b"an older result"
    assert _left(out.parent, keep=("x" + ext,)) == []
    assert digest(data["dir"]) == before


def test_scores_on_a_full_disk_keep_neither_output(data, tmp_path, capsys, monkeypatch, real_engine):
    """--scores fails after the run: neither the label map nor the scores are published (both or neither)."""
    from fewshotsam2 import atomic

    real = atomic.write_text_atomic

    def enospc(path, text, encoding="utf-8"):
        if str(path).endswith(".csv"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, text, encoding)

    monkeypatch.setattr(atomic, "write_text_atomic", enospc)
    out, scores = tmp_path / "o" / "x.nii.gz", tmp_path / "o" / "s.csv"
    out.parent.mkdir()
    rc, _, err = run_cli(segment_argv(data["query"], data["support"], data["labels"], out, "--scores", scores),
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
    rc, _, err = run_cli(segment_argv(data["query"], data["support"], data["labels"], link), capsys, monkeypatch)
    assert rc == 0, err
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert sitk.ReadImage(str(target)).GetSize() == sitk.ReadImage(data["query"]).GetSize()
    assert sorted(p.name for p in target.parent.iterdir()) == ["seg.nii.gz"]
