"""scripts/setup_env.sh only ever deletes a folder carrying its own stamp: a non-empty folder without it (a thesis,
the home folder, the repository) is refused with exit code 2 and left untouched. No environment is built here:
the refusals come first, and --dry-run stops after saying what it would install and delete."""

from __future__ import annotations

import os
import subprocess

import pytest

from conftest import REPO, unchanged

SCRIPT = REPO / "scripts" / "setup_env.sh"
pytestmark = pytest.mark.slow  # subprocesses


def _run(args, tmp_path, cwd=None):
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("FEWSHOTSAM2_VENV", "FEWSHOTSAM2_TORCH_INDEX")}
    env["HOME"] = str(home)
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=cwd or tmp_path, env=env, capture_output=True,
                          text=True, encoding="utf-8", timeout=60)


def test_refuses_a_non_empty_folder_without_its_stamp(tmp_path):
    thesis = tmp_path / "thesis"
    (thesis / "chapters").mkdir(parents=True)
    (thesis / "chapters" / "1.tex").write_text("four years of work\n")
    (thesis / "bin").mkdir()  # looks a bit like a venv, still not ours
    with unchanged(thesis):
        for args in (["thesis"], ["--dry-run", "thesis"]):
            run = _run(args, tmp_path)
            assert run.returncode == 2, run.stderr
            assert "has no .fewshotsam2-stamp" in run.stderr and "refusing to delete it" in run.stderr
            assert "building" not in run.stderr  # refused before announcing or starting anything


@pytest.mark.parametrize("where", ["home", "repo", "cwd"])
def test_refuses_home_repository_and_current_folder(tmp_path, where):
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("keep me")
    target = {"home": str(home), "repo": str(REPO), "cwd": "."}[where]
    run = _run([target], tmp_path, cwd=home if where == "cwd" else None)
    assert run.returncode == 2 and "refusing" in run.stderr
    assert (home / "notes.txt").read_text() == "keep me"


def test_a_stamped_folder_is_the_only_kind_it_would_remove(tmp_path):
    ours = tmp_path / "venv"
    ours.mkdir()
    (ours / ".fewshotsam2-stamp").write_text("incomplete build of: an older set\n")
    (ours / "junk").write_text("x")
    run = _run(["--dry-run", "venv"], tmp_path)
    assert run.returncode == 0, run.stderr
    assert "was made by this script" in run.stderr and "dry run: would remove venv first" in run.stderr
    assert (ours / "junk").exists()  # a dry run changes nothing
    assert run.stdout.strip().splitlines()[-1] == "venv"


def test_says_what_it_installs_how_big_and_how_long(tmp_path):
    run = _run(["--dry-run", "new-venv"], tmp_path)
    assert run.returncode == 0, run.stderr
    for said in ("torch 2.14.1", "sam2 1.1.0", "lpips 0.1.4", "disk: about", "GB", "time: about", "minutes",
                 "source new-venv/bin/activate"):
        assert said in run.stderr, said
    assert not (tmp_path / "new-venv").exists()
