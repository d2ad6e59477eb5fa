"""Test setup: import the core from <repo>/FewShotSAM2 and find the shared read-only data."""

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "FewShotSAM2"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """`../shared` from the project root (read-only data, docs and weights)."""
    path = (REPO.parent / "shared").resolve()
    assert path.is_dir(), f"shared data folder not found at {path}"
    return path
