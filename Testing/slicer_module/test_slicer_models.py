"""The Slicer module's Model section with MedSAM2: listed with its size and licence, Import file... accepts a file
in MedSAM2's layout (checked by the core in a process of its own)."""

from __future__ import annotations

import warnings

import pytest

slicer = pytest.importorskip("slicer")
import FewShotSAM2 as module  # noqa: E402
from FewShotSAM2Lib import choices  # noqa: E402


def test_model_choices_list_medsam2_with_size_and_licence(tmp_path, monkeypatch):
    from fewshotsam2.model import checkpoints

    assert "medsam2" in choices.MODEL_SIZES and "medsam2" in choices.COMBO_BOXES["modelSize"][1]
    assert "MedSAM2" in choices.displayName("modelSize", "medsam2")
    monkeypatch.setenv(checkpoints.CACHE_ENV, str(tmp_path / "cache"))
    ready, text = module.FewShotSAM2Logic.checkpointStatus("medsam2", "2.1")
    assert not ready and "MedSAM2_latest: not downloaded" in text
    assert "156 MB" in text and "research and education" in text


@pytest.mark.slow  # the import check runs in a process of its own
def test_import_file_accepts_a_medsam2_checkpoint(tmp_path, monkeypatch):
    import torch

    from fewshotsam2.model import checkpoints
    from fewshotsam2.model.engine import build_sam2_model

    monkeypatch.setenv(checkpoints.CACHE_ENV, str(tmp_path / "cache"))
    path = tmp_path / "MedSAM2_2411.pt"  # another MedSAM2 file: same architecture, another SHA256
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        torch.save({"model": build_sam2_model(checkpoints.checkpoint_info("medsam2"), 512).state_dict()}, path)
    logic = module.FewShotSAM2Logic()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cached = logic.importCheckpoint(str(path), "medsam2", "2.1")
    assert cached.name == "MedSAM2_latest.pt" and cached.read_bytes() == path.read_bytes()
    ready, text = logic.checkpointStatus("medsam2", "2.1")
    assert ready and "MedSAM2_latest: ready" in text
