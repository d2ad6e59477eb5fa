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


# ---------------------------------------------------------------- SAM2 engine and shared volumes (engine/backends tests)

@pytest.fixture(scope="session")
def engine64():
    """Random-weight SAM2 tiny at 64 px on the CPU (the fast tier's engine: built in about a second)."""
    import warnings

    from fewshotsam2.engine import SAM2Engine

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return SAM2Engine.with_random_weights("tiny", image_size=64, device="cpu")


@pytest.fixture(scope="session")
def engine256():
    """One random-weight SAM2 tiny at 256 px on the CPU, built once per session (building takes seconds).

    Tests share it: `pipeline.segment` and the tests call `engine.reset()` before using it.
    """
    import warnings

    from fewshotsam2.engine import SAM2Engine

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return SAM2Engine.with_random_weights("tiny", image_size=256, device="cpu")


def crop_slices(volume, k0: int, k1: int):
    """Array slices k0:k1 (the volume's last ITK axis) of a Volume, with its physical geometry kept right."""
    from fewshotsam2.volume import Volume

    return Volume.from_sitk(volume.to_sitk()[:, :, k0:k1])


@pytest.fixture(scope="session")
def ct_a(shared_dir):
    """(image, labels, structures) of abdomen-ct/ct-a."""
    from fewshotsam2.volume import read_labels, read_volume

    folder = shared_dir / "data" / "abdomen-ct" / "ct-a"
    image = read_volume(folder / "image.nii.gz")
    labels, structures = read_labels(folder / "labels.nii.gz", image)
    return image, labels, structures


@pytest.fixture(scope="session")
def abdomen_mr(shared_dir):
    """(image, labels, structures) of abdomen-mr."""
    from fewshotsam2.volume import read_labels, read_volume

    folder = shared_dir / "data" / "abdomen-mr"
    image = read_volume(folder / "image.nii.gz")
    labels, structures = read_labels(folder / "labels.nii.gz", image)
    return image, labels, structures
