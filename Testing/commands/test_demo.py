"""scripts/demo.sh as a new user runs it: a clone with no ../shared beside it and an empty home folder. Its
offline form (--untrained) fetches the sample data (from a local mirror standing in for the public addresses),
runs the whole chain at its small size on the CPU, and writes segments named "liver" and "spleen"; a failed run
leaves no empty output folder. The environment set-up is skipped (FEWSHOTSAM2_PYTHON = this interpreter): it is
tested on its own in test_setup_env.py."""

from __future__ import annotations

import csv
import os
import stat
import subprocess
import sys

import pytest

from fresh_clone import make_fresh_clone, mirror_sample_data, serve_folder

pytestmark = pytest.mark.slow  # a real run of the demo in a subprocess (about a minute on 2 idle cores)


@pytest.fixture
def new_user(tmp_path, shared_dir):
    clone, env = make_fresh_clone(tmp_path, with_scripts=True)
    served = tmp_path / "mirror"
    mirror_sample_data(shared_dir / "data", served)
    with serve_folder(served) as url:
        env.update(FEWSHOTSAM2_SAMPLE_URL=url, FEWSHOTSAM2_PYTHON=sys.executable, OMP_NUM_THREADS="2")
        yield clone, env


def _demo(clone, env, *args):
    return subprocess.run(["bash", str(clone / "scripts" / "demo.sh"), *args], cwd=clone, env=env,
                          capture_output=True, text=True, encoding="utf-8", timeout=900)


def test_offline_demo_end_to_end_names_its_segments(new_user):
    import slicerio

    clone, env = new_user
    run = _demo(clone, env, "--untrained")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "about a minute" in run.stderr and "RANDOM weights at 128" in run.stderr
    assert "demo: done in" in run.stderr
    out = clone / "out"
    seg = slicerio.read_segmentation(str(out / "ct-b_liver_spleen.seg.nrrd"))
    names = {s["name"]: s for s in seg["segments"]}
    assert sorted(names) == ["liver", "spleen"]  # named by --labels liver=5,spleen=1 (stored in value order)
    assert (names["liver"]["labelValue"], names["spleen"]["labelValue"]) == (5, 1)
    with open(out / "ct-b_scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["structure"] for r in rows} == {"liver", "spleen"} and len(rows) == 2 * 20  # 20 query slices each
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((out / "ct-b_scores.csv").stat().st_mode) == 0o666 & ~umask
    # the sample data went to the empty home's cache, checked
    assert (clone.parent / "home" / ".cache" / "fewshotsam2" / "sample-data" / "abdomen-ct" / "ct-b" / "dicom").is_dir()


def test_failed_demo_leaves_no_empty_output_folder(new_user):
    clone, env = new_user
    run = _demo(clone, env, "--untrained", "--top-k", "0")  # refused before SAM2 is built
    assert run.returncode == 2 and "fewshotsam2: error:" in run.stderr
    assert not (clone / "out").exists()


def test_demo_without_the_sample_data_stops_before_the_set_up(tmp_path):
    """No data and no network: the demo stops in seconds with the workable message (every file, the mirror
    variable, --dest / FEWSHOTSAM2_DATA), before it builds the environment (no FEWSHOTSAM2_PYTHON here: the set-up
    would run next and take minutes)."""
    import socket
    import time

    from fewshotsam2.io import sample_data as sd

    clone, env = make_fresh_clone(tmp_path, with_scripts=True)
    with socket.socket() as s:  # a port nobody listens on: the download fails at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env.pop("FEWSHOTSAM2_PYTHON", None)
    env["FEWSHOTSAM2_SAMPLE_URL"] = f"http://127.0.0.1:{port}"
    env["PATH"] = f"{os.path.dirname(sys.executable)}:{env.get('PATH', '')}"  # python3: a Python without torch works too
    t0 = time.monotonic()
    run = _demo(clone, env, "--untrained")
    assert run.returncode == 1, run.stderr[-2000:]
    assert time.monotonic() - t0 < 60
    assert "building a Python environment" not in run.stderr and not (clone.parent / "home" / ".cache" /
                                                                        "fewshotsam2" / "venv").exists()
    assert "fewshotsam2: cannot download the sample data" in run.stderr
    assert "FEWSHOTSAM2_SAMPLE_URL=" in run.stderr and "FEWSHOTSAM2_DATA=DIR" in run.stderr
    assert all(f"{sd.BASE_URL}/{f.filename}" in run.stderr for f in sd.DEMO_FILES)
    assert not (clone / "out").exists()
