"""Sample data: the table's checksums are those of ../shared/data, downloads are verified (a local HTTP server on
127.0.0.1 serves files made here), being offline gives one message that says what to download and where, and a
clone without ../shared and with an empty home folder gets that message and skips its real-data tests once."""

from __future__ import annotations

import re
import hashlib
import os
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from fewshotsam2.io import sample_data as sd
from fresh_clone import make_fresh_clone, mirror_sample_data, serve_folder


@pytest.fixture
def server(tmp_path):
    """(folder served, base URL): a real HTTP server on 127.0.0.1, stopped after the test."""
    root = tmp_path / "served"
    root.mkdir()
    with serve_folder(root) as url:
        yield root, url


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _item(filename: str, content: bytes, path: str) -> sd.SampleFile:
    return sd.SampleFile(f"test file {filename}", filename, hashlib.sha256(content).hexdigest(), len(content), path)


# ------------------------------------------------------------------------------------------------ the table


def test_table_describes_the_shared_demo_pair(shared_dir):
    paths = [f.path for f in sd.DEMO_FILES]
    assert len(paths) == len(set(paths)) == 23  # 2 ct-a files, ct-b labels, 20 DICOM slices
    assert sum(p.startswith(sd.DEMO_QUERY + "/") for p in paths) == 20
    for f in sd.DEMO_FILES:
        assert f.url.startswith(f"https://raw.githubusercontent.com/wasserth/TotalSegmentator/{sd.SOURCE_COMMIT}/")
        assert len(f.sha256) == 64
    # the same bytes as the project's own copy: what the public addresses serve is what the tests use
    assert sd.check_folder(shared_dir / "data") == []
    assert sd.locate(download=False).resolve() == (shared_dir / "data").resolve()


def test_check_folder_names_a_changed_file(shared_dir, tmp_path):
    item = sd.DEMO_FILES[0]
    (tmp_path / item.path).parent.mkdir(parents=True)
    data = bytearray((shared_dir / "data" / item.path).read_bytes())
    data[-1] ^= 0xFF  # same size, one byte different
    (tmp_path / item.path).write_bytes(bytes(data))
    problem = sd.check_file(tmp_path, item)
    assert problem is not None and "SHA256" in problem and item.sha256 in problem
    assert "missing" in sd.check_file(tmp_path, sd.DEMO_FILES[1])


# ------------------------------------------------------------------------------------------------ downloads


def test_download_verifies_caches_and_reuses(server, tmp_path, monkeypatch):
    served, url = server
    monkeypatch.setenv(sd.URL_ENV, url)
    (served / "sub").mkdir()
    a, b = b"first file\n" * 1000, bytes(range(256)) * 50
    (served / "a.bin").write_bytes(a)
    (served / "sub" / "b.bin").write_bytes(b)
    files = (_item("a.bin", a, "x/a.bin"), _item("sub/b.bin", b, "y/z/b.bin"))
    dest = tmp_path / "dest"
    lines = []
    assert sd.locate(dest, files=files, report=lines.append) == dest
    assert (dest / "x/a.bin").read_bytes() == a and (dest / "y/z/b.bin").read_bytes() == b
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((dest / "x/a.bin").stat().st_mode) == 0o666 & ~umask  # 0644 with the usual umask
    assert any("downloading 2" in line for line in lines)
    assert not list(dest.rglob("*.part"))
    # cached: with the server's files gone nothing is downloaded again and nothing is reported
    (served / "a.bin").unlink()
    lines.clear()
    assert sd.locate(dest, files=files, report=lines.append) == dest
    assert lines == []


def test_download_refuses_a_wrong_checksum_and_keeps_nothing(server, tmp_path, monkeypatch):
    served, url = server
    monkeypatch.setenv(sd.URL_ENV, url)
    (served / "a.bin").write_bytes(b"what the server has")
    item = _item("a.bin", b"what the table expects", "x/a.bin")
    with pytest.raises(sd.SampleDataUnavailable, match="did not give the expected") as err:
        sd.locate(tmp_path / "dest", files=(item,))
    assert item.sha256 in str(err.value)
    assert not (tmp_path / "dest").exists()  # no file, no .part, no empty folders


def test_offline_says_what_to_download_and_where(tmp_path, monkeypatch):
    monkeypatch.setenv(sd.URL_ENV, f"http://127.0.0.1:{_closed_port()}/base")
    dest = tmp_path / "dest"
    with pytest.raises(sd.SampleDataUnavailable) as err:
        sd.locate(dest)  # the real table
    message = str(err.value)
    assert message.startswith("cannot download the sample data")
    # the ways out: a mirror, a folder that holds the files, and every file by hand (the 20 DICOM slices too)
    assert f"set {sd.URL_ENV}=<address of tests/reference_files/>" in message
    assert f"--dest DIR or {sd.DATA_ENV}=DIR" in message
    for f in sd.DEMO_FILES:  # every file: its source address (not the dead mirror's) and its place
        assert f"      {sd.BASE_URL}/{f.filename}\n        -> {dest / f.path}\n" in message
    assert message.endswith(f"then run `fewshotsam2 sample-data --dest {dest}` to check them (SHA256).")
    assert not dest.exists()


def test_dest_that_is_a_file_is_one_clear_error(tmp_path, capsys):
    """`sample-data --dest FILE`: exit 2 with a line that can be acted on (was: "Not a directory" and download
    instructions into the file), the file untouched; also through the torch-free entry the demo uses."""
    from fewshotsam2 import cli

    dest = tmp_path / "notes.txt"
    dest.write_text("mine")
    for main in (lambda argv: cli.main(["sample-data", *argv]), sd.main):
        rc = main(["--dest", str(dest)])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith(f"fewshotsam2: error: --dest {dest} is a file; give a folder"), err
        assert dest.read_text() == "mine" and sorted(tmp_path.iterdir()) == [dest]


def test_bad_sample_url_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    from fewshotsam2 import cli

    monkeypatch.setenv(sd.URL_ENV, "not a url")
    for main in (lambda argv: cli.main(["sample-data", *argv]), sd.main):
        rc = main(["--dest", str(tmp_path / "d")])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith(f"fewshotsam2: error: ${sd.URL_ENV} must be the http(s):// or file://"), err
        assert not (tmp_path / "d").exists()


def test_check_only_never_downloads(tmp_path, monkeypatch):
    monkeypatch.setenv(sd.URL_ENV, f"http://127.0.0.1:{_closed_port()}")
    with pytest.raises(sd.SampleDataUnavailable, match="23 of 23 files missing"):
        sd.locate(tmp_path, download=False)


# ------------------------------------------------------------------------------------------------ a fresh clone


@pytest.mark.slow
def test_fresh_clone_fetches_from_a_mirror_and_refuses_a_corrupt_one(server, tmp_path, shared_dir):
    clone, env = make_fresh_clone(tmp_path)
    served, url = server
    mirror_sample_data(shared_dir / "data", served)  # the pinned commit's files, laid out as in its repository
    cmd = [sys.executable, "-m", "fewshotsam2.cli", "sample-data"]
    cache = Path(env["HOME"]) / ".cache" / "fewshotsam2" / "sample-data"

    # offline with nothing cached: one message, exit code 1, naming the cache folder as the place to put the files
    offline = dict(env, **{sd.URL_ENV: f"http://127.0.0.1:{_closed_port()}"})
    run = subprocess.run(cmd, cwd=clone, env=offline, capture_output=True, text=True, encoding="utf-8", timeout=120)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert "cannot download the sample data" in run.stderr and str(cache / sd.DEMO_SUPPORT_IMAGE) in run.stderr

    # a mirror serving one corrupt slice: refused, that slice not kept
    bad = sd.DEMO_FILES[10]
    (served / bad.filename).write_bytes(b"\0" * bad.size)
    run = subprocess.run(cmd, cwd=clone, env=dict(env, **{sd.URL_ENV: url}), capture_output=True, text=True, encoding="utf-8",
                         timeout=120)
    assert run.returncode == 1 and "did not give the expected" in run.stderr
    assert not (cache / bad.path).exists()

    # a good mirror: every file verified into the cache, the folder printed last
    shutil.copy(shared_dir / "data" / bad.path, served / bad.filename)
    run = subprocess.run(cmd, cwd=clone, env=dict(env, **{sd.URL_ENV: url}), capture_output=True, text=True, encoding="utf-8",
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == str(cache)
    assert sd.check_folder(cache) == []


@pytest.mark.slow
def test_fresh_clone_skips_real_data_tests_once_with_the_reason(tmp_path):
    clone, env = make_fresh_clone(tmp_path)
    (clone / "Testing" / "test_needs_data.py").write_text(
        "import pytest\n"
        "@pytest.mark.parametrize('i', range(5))\n"
        "def test_shared(shared_dir, i):\n    assert shared_dir.is_dir()\n"
        "def test_pair(sample_data_dir):\n    assert sample_data_dir.is_dir()\n"
    )
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "Testing"]  # as the README says
    run = subprocess.run(cmd, cwd=clone, env=env, capture_output=True, text=True, encoding="utf-8", timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "6 skipped" in run.stdout and "Error" not in run.stdout
    # one line per reason with its count, at the end (conftest's summary), not one line per skipped test
    assert "6 skipped, by reason" in run.stdout and "SKIPPED [" not in run.stdout
    assert re.search(r"^\s*5  no \.\./shared folder beside the clone", run.stdout, re.M)
    assert re.search(r"^\s*1  sample data not found.*run `fewshotsam2 sample-data` to fetch it", run.stdout, re.M)
    assert "(no ../shared beside the clone" in run.stdout
    # under CI the same absence is a failure
    run = subprocess.run(cmd, cwd=clone, env=dict(env, CI="true"), capture_output=True, text=True, encoding="utf-8", timeout=300)
    assert run.returncode == 1 and "6 errors" in run.stdout and "CI=true: the data must be there" in run.stdout


def test_alexnet_backbone_is_fetched_once_and_checked(server, tmp_path):
    """`sample-data --lpips`: the backbone goes to torch.hub's folder under its own name, checked as torch.hub
    checks it (the SHA256 starts with the name's 8 hex digits); a wrong file is refused and nothing kept; a
    second call does not download again."""
    import hashlib

    served, url = server
    content = b"alexnet weights stand-in " * 100
    prefix = hashlib.sha256(content).hexdigest()[:8]
    (served / f"alexnet-owt-{prefix}.pth").write_bytes(content)
    (served / "alexnet-owt-00000000.pth").write_bytes(content)
    folder = tmp_path / "hub" / "checkpoints"
    lines = []
    got = sd.fetch_alexnet(f"{url}/alexnet-owt-{prefix}.pth", folder, report=lines.append)
    assert got == folder / f"alexnet-owt-{prefix}.pth" and got.read_bytes() == content and len(lines) == 1
    sd.fetch_alexnet(f"{url}/alexnet-owt-{prefix}.pth", folder, report=lines.append)
    assert len(lines) == 1  # already there and checked: no download
    with pytest.raises(sd.SampleDataUnavailable, match="did not give the expected file"):
        sd.fetch_alexnet(f"{url}/alexnet-owt-00000000.pth", folder)
    assert sorted(p.name for p in folder.iterdir()) == [f"alexnet-owt-{prefix}.pth"]
    with pytest.raises(sd.SampleDataUnavailable, match="Offline: copy alexnet-owt-11111111.pth"):
        sd.fetch_alexnet(f"http://127.0.0.1:{_closed_port()}/alexnet-owt-11111111.pth", folder)


def test_torch_hub_folder_is_torchs_own(monkeypatch, tmp_path):
    import torch

    for env in ({}, {"TORCH_HOME": str(tmp_path / "th")}, {"XDG_CACHE_HOME": str(tmp_path / "xdg")}):
        for k in ("TORCH_HOME", "XDG_CACHE_HOME"):
            monkeypatch.delenv(k, raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        assert sd.torch_hub_checkpoints() == Path(torch.hub.get_dir()) / "checkpoints"
