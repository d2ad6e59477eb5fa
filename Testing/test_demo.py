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
