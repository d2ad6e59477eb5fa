"""Test setup: import the core from <repo>/FewShotSAM2 and find the shared read-only data."""

import ast
import contextlib
import functools
import hashlib
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Iterator, Optional, Union

import numpy as np
import pytest

from fewshotsam2.io.volume import Structure, Volume
from fewshotsam2.supports.support_loader import SupportCase

REPO = Path(__file__).resolve().parents[1]  # pyproject's `pythonpath` puts REPO/FewShotSAM2 first on sys.path
# tests write no image features into the user's cache (~/.cache/fewshotsam2/features): the tests of the feature
# cache name their own folder (--feature-cache / FeatureCache); subprocesses inherit this
os.environ.setdefault("FEWSHOTSAM2_FEATURE_CACHE", "off")


def pytest_terminal_summary(terminalreporter):
    """One line per skip reason with its count, at the end (also under -q), instead of one line per skipped test."""
    reasons = Counter()
    for report in terminalreporter.stats.get("skipped", []):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        reasons[reason.removeprefix("Skipped: ")] += 1
    if reasons:
        terminalreporter.write_sep("-", f"{sum(reasons.values())} skipped, by reason")
        for reason, n in reasons.most_common():
            terminalreporter.write_line(f"{n:4d}  {reason}")
    if not (REPO.parent / "shared").is_dir() and any("no ../shared folder" in r for r in reasons):
        terminalreporter.write_line("(no ../shared beside the clone: the project's real data and weights; "
                                    "`fewshotsam2 sample-data` fetches the demo pair)")


def _missing(reason: str):
    """Skip a test whose real resource is absent (../shared beside the clone, or the verified demo pair), or fail it
    under CI (CI=true), where both are there: CI never skips for a missing resource."""
    if os.environ.get("CI", "").strip().lower() in ("true", "1", "yes"):
        pytest.fail(f"{reason} (CI=true: the data must be there)", pytrace=False)
    pytest.skip(reason)


# ---------------------------------------------------------------- the command as a real process; folders left alone

def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a `fewshotsam2` subprocess: this one, with this checkout's core first on PYTHONPATH and one
    torch thread (the tests share the machine's cores); `extra` adds or replaces variables."""
    return {**os.environ, "PYTHONPATH": str(REPO / "FewShotSAM2"), "OMP_NUM_THREADS": "1", **extra}


def cli_command(*argv: Union[str, os.PathLike]) -> list[str]:
    """`fewshotsam2 ARGV` with this interpreter (for `subprocess.Popen`; `run_cli` runs it to the end)."""
    return [sys.executable, "-m", "fewshotsam2.cli", *map(str, argv)]


def run_cli(*argv: Union[str, os.PathLike], env: Optional[dict] = None, cwd: Optional[Path] = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `fewshotsam2 ARGV` as a real process to its end (env: `cli_env()` unless given). The result holds
    `returncode`, `stdout` and `stderr` (text)."""
    return subprocess.run(cli_command(*argv), capture_output=True, text=True, encoding="utf-8",
                          env=cli_env() if env is None else env, cwd=cwd, timeout=timeout)


def folder_state(folder: Union[str, os.PathLike], times: bool = False) -> dict[str, object]:
    """Every entry under `folder` (hidden ones too, sub-folders included) -> the SHA-256 of a file's bytes, or
    "folder"; with `times`, (that, modification time in ns), so that a rewrite with the same bytes, or a file made
    and removed again inside a sub-folder, counts too. Two equal states: nothing was written, changed, added or
    removed."""
    root = Path(folder)
    state = {}
    for p in sorted(root.rglob("*")):
        what = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
        state[str(p.relative_to(root))] = (what, p.stat().st_mtime_ns) if times else what
    return state


@contextlib.contextmanager
def unchanged(*folders: Union[str, os.PathLike], times: bool = False) -> Iterator[None]:
    """Assert that the block leaves `folders` as they were (`folder_state`). Put `pytest.raises` inside the block:
    an exception leaving it skips the check."""
    before = [folder_state(f, times) for f in folders]
    yield
    for folder, state in zip(folders, before):
        after = folder_state(folder, times)
        changed = sorted(k for k in state.keys() | after.keys() if state.get(k) != after.get(k))
        assert not changed, f"{folder} changed: {changed[:10]}"


@functools.lru_cache(maxsize=8)
def _lines(source: str) -> list[str]:
    return source.splitlines()


def source_segment(source: str, node: ast.AST) -> str:
    """`ast.get_source_segment(source, node)` without its character-by-character split of the whole file at every
    call (2 s for the Widget's 63 methods in FewShotSAM2.py, 30 s on a busy machine). Offsets are UTF-8 bytes."""
    lines = _lines(source)
    first, last = node.lineno - 1, node.end_lineno - 1
    if first == last:
        return lines[first].encode()[node.col_offset:node.end_col_offset].decode()
    head = lines[first].encode()[node.col_offset:].decode()
    tail = lines[last].encode()[:node.end_col_offset].decode()
    return "\n".join([head, *lines[first + 1:last], tail])


# ---------------------------------------------------------------- shared data

@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """`../shared` beside the clone: real data, LPIPS weights and docs (read-only; present on the project's machines
    and in CI). Elsewhere the tests that need it are skipped with this one reason (or fail under CI=true)."""
    path = (REPO.parent / "shared").resolve()
    if not path.is_dir():
        _missing(f"no ../shared folder beside the clone ({path}): the real-data tests need the project's shared "
                 "data and weights")
    return path


@pytest.fixture(scope="session")
def sample_data_dir() -> Path:
    """The folder holding the demo pair (abdomen-ct): ../shared/data, or the verified `fewshotsam2 sample-data`
    cache; skipped (failed under CI=true) when neither holds every file with the right SHA256."""
    from fewshotsam2.io import sample_data

    try:
        return sample_data.locate(download=False)
    except sample_data.SampleDataUnavailable as exc:
        if sample_data.repo_shared_data().is_dir():  # the data is there but wrong: that is a failure, not a skip
            pytest.fail(str(exc), pytrace=False)
        _missing(f"sample data not found (no ../shared/data beside the clone, nothing verified in "
                 f"{sample_data.default_cache_dir()}): run `fewshotsam2 sample-data` to fetch it")


# ---------------------------------------------------------------- SAM2 engine and shared volumes (engine/backends tests)

@pytest.fixture(scope="session")
def engine64():
    """Random-weight SAM2 tiny at 64 px on the CPU (the fast tier's engine: built in about a second)."""
    import warnings

    from fewshotsam2.model.engine import SAM2Engine

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return SAM2Engine.with_random_weights("tiny", image_size=64, device="cpu")


@pytest.fixture(scope="session")
def engine256():
    """One random-weight SAM2 tiny at 256 px on the CPU, built once per session (building takes seconds).

    Tests share it: `pipeline.segment` and the tests call `engine.reset()` before using it.
    """
    import warnings

    from fewshotsam2.model.engine import SAM2Engine

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return SAM2Engine.with_random_weights("tiny", image_size=256, device="cpu")


def crop_slices(volume, k0: int, k1: int):
    """Array slices k0:k1 (the volume's last ITK axis) of a Volume, with its physical geometry kept right."""
    from fewshotsam2.io.volume import Volume

    return Volume.from_sitk(volume.to_sitk()[:, :, k0:k1])


@pytest.fixture(scope="session")
def ct_a(sample_data_dir):
    """(image, labels, structures) of abdomen-ct/ct-a."""
    from fewshotsam2.io.volume import read_labels, read_volume

    folder = sample_data_dir / "abdomen-ct" / "ct-a"
    image = read_volume(folder / "image.nii.gz")
    labels, structures = read_labels(folder / "labels.nii.gz", image)
    return image, labels, structures


@pytest.fixture(scope="session")
def abdomen_mr(shared_dir):
    """(image, labels, structures) of abdomen-mr."""
    from fewshotsam2.io.volume import read_labels, read_volume

    folder = shared_dir / "data" / "abdomen-mr"
    image = read_volume(folder / "image.nii.gz")
    labels, structures = read_labels(folder / "labels.nii.gz", image)
    return image, labels, structures


# -------------------------------------------------------------- a synthetic pair (pipeline, memory bounds)

def two_box_pair():
    """Query and support: 7 slices of 40 x 48 at 1 x 1 x 3 mm (slice axis k), a bright box labeled 2 and a
    dimmer one labeled 4; the support's k axis points the other way (direction -z), so stack != array order."""
    def volume(shift: int, flip: bool):
        image = np.zeros((7, 40, 48), np.float32)
        labels = np.zeros((7, 40, 48), np.uint8)
        labels[1:6, 10 + shift:24 + shift, 8:20] = 2
        labels[2:5, 26:34, 28 + shift:40 + shift] = 4
        image[labels == 2], image[labels == 4] = 900.0, 400.0
        image += np.random.default_rng(shift).normal(0, 20, image.shape).astype(np.float32)
        direction = np.diag([1.0, 1.0, -1.0 if flip else 1.0])
        return (Volume(image, (1.0, 1.0, 3.0), (0.0, 0.0, 0.0), direction),
                Volume(labels, (1.0, 1.0, 3.0), (0.0, 0.0, 0.0), direction))

    query, query_labels = volume(2, False)
    image, labels = volume(0, True)
    return query, query_labels, SupportCase(image, labels, "synthetic")


STRUCTURES = [Structure(2, "box", (1.0, 0.0, 0.0)), Structure(4, "dim box", (0.0, 0.0, 1.0))]
