"""The README says what runs: its test command is .ci/run's, the fast-tier command is there, its Python snippet
runs as written, and the files and figures it shows exist."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import REPO

README = (REPO / "README.md").read_text(encoding="utf-8")


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_the_test_command_is_what_ci_runs():
    ci = (REPO / ".ci" / "run").read_text().strip().splitlines()
    setup, tests = ci[-2], ci[-1]  # venv="$(scripts/setup_env.sh | tail -n 1)", "$venv/bin/python" -m pytest ...
    assert f'{setup} && {tests}' in README
    assert '-m pytest Testing -q -m "not slow"' in README
    assert "bash scripts/demo.sh" in README and "bash scripts/demo.sh --untrained" in README


def test_linked_files_exist():
    for target in re.findall(r"\]\(((?:docs|Resources|scripts)/[^)#]+)\)", README):
        assert (REPO / target).exists(), target


@pytest.mark.slow
def test_python_snippet_runs_as_written(tmp_path, sample_data_dir):
    (snippet,) = [b for b in _blocks("python") if "sample_data.locate()" in b]
    run = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True, encoding="utf-8",
                         timeout=900, env={"PYTHONPATH": str(REPO / "FewShotSAM2"), "OMP_NUM_THREADS": "2",
                                           "HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "ct-b_liver.nii.gz").is_file()
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 3 and all(len(line.split()) == 3 for line in lines)
    assert "Forward and reverse prediction" in run.stderr and "Propagating slice" in run.stderr  # the default bar


def test_anchor_links_name_a_heading():
    """`[text](#anchor)` links go to a heading of the README (GitHub's slugs: lower case, spaces to '-',
    punctuation dropped)."""
    slugs = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
             for h in re.findall(r"^#+ (.+)$", README, flags=re.M)}
    for anchor in re.findall(r"\]\(#([^)]+)\)", README):
        assert anchor in slugs, anchor
