"""MedSAM2 and any SAM2.1 fine-tune (`--model medsam2`, `--checkpoint FILE --config NAME[,overrides]`): the config
built, strict loading naming the key, SHA256 on download and import, and the engine against sam2's own predictor
built from MedSAM2's config. No real checkpoint exists here: the "checkpoints" are state dicts of models built with
random weights, saved in MedSAM2's layout ({"model": state_dict})."""

from __future__ import annotations

import dataclasses
import hashlib
import warnings

import pytest
import torch

from fewshotsam2.model import models
from fewshotsam2.model.checkpoints import CHECKPOINTS, checkpoint_info, download_checkpoint, import_checkpoint
from fewshotsam2.model.engine import SAM2Engine, build_sam2_model
from fewshotsam2.errors import InputError
from fewshotsam2.options import OptionError, SegmentOptions
from test_checkpoints import _Server

MEDSAM2_YAML_OVERRIDES = [  # what MedSAM2's sam2.1_hiera_t512.yaml changes in sam2.1_hiera_t.yaml
    "++model.image_size=512",
    "++model.memory_attention.layer.self_attention.feat_sizes=[32,32]",
    "++model.memory_attention.layer.cross_attention.feat_sizes=[32,32]",
]


def _random(info, seed: int, size: int = 64):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_sam2_model(info, size, "cpu")


@pytest.fixture(scope="module")
def medsam2_file(tmp_path_factory):
    """A checkpoint in MedSAM2's layout: {"model": state_dict} of the 512 px tiny model, random weights (seed 7)."""
    net = _random(checkpoint_info("medsam2"), 7, 512)
    path = tmp_path_factory.mktemp("medsam2") / "MedSAM2_random.pt"
    torch.save({"model": net.state_dict()}, path)
    return path


def test_medsam2_builds_the_t512_config():
    info = checkpoint_info("medsam2")
    assert info.config == "configs/sam2.1/sam2.1_hiera_t.yaml" and info.image_size == 512 and info.version == "2.1"
    net = build_sam2_model(info, 512)
    assert net.image_size == 512
    for layer in net.memory_attention.layers:  # the RoPE grid of MedSAM2's config: 32 x 32 stride-16 tokens
        assert layer.self_attn.freqs_cis.shape[0] == 32 * 32
        assert layer.cross_attn_image.freqs_cis.shape[0] == 32 * 32
    tiny = build_sam2_model(checkpoint_info("tiny"), 1024)
    assert tiny.memory_attention.layers[0].self_attn.freqs_cis.shape[0] == 64 * 64
    # the same tensors: the weights cannot tell which model they are
    a, b = net.state_dict(), tiny.state_dict()
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)


def test_image_size_follows_the_model_unless_set():
    assert SegmentOptions().image_size == 1024
    assert SegmentOptions(model="medsam2").image_size == 512
    assert SegmentOptions(model="MedSAM").image_size == 512 and SegmentOptions(model="MedSAM").model == "medsam2"
    assert SegmentOptions(model="medsam2", image_size=256).image_size == 256
    assert SegmentOptions(config="sam2.1_hiera_t512", untrained=True).image_size == 512
    assert SegmentOptions(config="sam2.1_hiera_s,image_size=384", untrained=True).image_size == 384
    with pytest.raises(OptionError, match="version must be 2.1 for model medsam2"):
        SegmentOptions(model="medsam2", version="2")
    with pytest.raises(OptionError, match="give them as a checkpoint file"):
        SegmentOptions(config="sam2.1_hiera_t")
    with pytest.raises(OptionError, match="not a config sam2 ships; choose one of .*sam2.1_hiera_b\\+"):
        SegmentOptions(config="sam2.1_hiera_xl", untrained=True)


def test_config_grammar():
    c = models.parse_config("configs/sam2.1/sam2.1_hiera_t.yaml,image_size=512,"
                            "memory_attention.layer.self_attention.feat_sizes=[32,32],model.num_maskmem=7")
    assert c.config == "configs/sam2.1/sam2.1_hiera_t.yaml" and c.image_size == 512
    assert c.overrides == ("model.memory_attention.layer.self_attention.feat_sizes=[32,32]", "model.num_maskmem=7")
    assert models.parse_config("sam2.1_hiera_b+").config == "configs/sam2.1/sam2.1_hiera_b+.yaml"
    for bad in ("", "sam2.1_hiera_t,image_size", "sam2.1_hiera_t,x y=1", "sam2.1_hiera_t,image_size=big"):
        with pytest.raises(InputError):
            models.parse_config(bad)


def test_config_override_of_an_unknown_key_is_refused_naming_it(tmp_path):
    info = checkpoint_info("tiny", config="sam2.1_hiera_t,memory_attention.no_such_key=3")
    with pytest.raises(InputError, match="no_such_key") as exc:
        build_sam2_model(info, 64)
    assert "\n" not in str(exc.value)
    # a known key is applied
    net = build_sam2_model(checkpoint_info("tiny", config="sam2.1_hiera_t,num_maskmem=3"), 64)
    assert net.num_maskmem == 3


def test_medsam2_checkpoint_loads_strictly(medsam2_file):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = SAM2Engine.from_options(SegmentOptions(model="medsam2", checkpoint=str(medsam2_file), device="cpu",
                                                        method="propagate"))
    assert engine.image_size == 512 and not engine.untrained and engine.info.key == "MedSAM2_latest"
    saved = torch.load(medsam2_file, weights_only=True)["model"]
    assert all(torch.equal(engine.model.state_dict()[k], v) for k, v in saved.items())
    # the same file through --config with MedSAM2's own config name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        by_config = SAM2Engine.from_options(SegmentOptions(config="sam2.1_hiera_t512", checkpoint=str(medsam2_file),
                                                           device="cpu"))
    assert by_config.info.rope_follows_image_size and by_config.image_size == 512


@pytest.mark.slow  # SAM2 at 512 px
@pytest.mark.parametrize("seed", [0])
def test_medsam2_segments_at_512_as_sam2s_own_predictor_built_from_its_config(tmp_path, ct_a, shared_dir,
                                                                              monkeypatch, seed):
    """Our engine with --model medsam2 against sam2's `build_sam2_video_predictor` given MedSAM2's config
    (sam2.1_hiera_t512 = sam2.1_hiera_t + the overrides above) and the same checkpoint file: within 1e-5 logits."""
    import sam2.utils.misc
    from sam2.build_sam import build_sam2_video_predictor

    from conftest import crop_slices
    from fewshotsam2.run.pipeline import SupportCase
    from fewshotsam2.io.volume import read_volume
    from sam2_oracle import (Comparison, _cpu_connected_components, _run, _support_keys,
                                  sam2_video)

    medsam2_file = tmp_path / "MedSAM2_random.pt"  # MedSAM2's layout, random weights of this seed
    torch.save({"model": _random(checkpoint_info("medsam2"), seed, 512).state_dict()}, medsam2_file)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = SAM2Engine.from_pretrained("medsam2", image_size=512, device="cpu", checkpoint=medsam2_file)
        oracle_model = build_sam2_video_predictor("configs/sam2.1/sam2.1_hiera_t.yaml", str(medsam2_file),
                                                  device="cpu", hydra_overrides_extra=MEDSAM2_YAML_OVERRIDES,
                                                  apply_postprocessing=True)
    monkeypatch.setattr(sam2.utils.misc, "get_connected_components", _cpu_connected_components)
    image, labels, structures = ct_a
    liver = next(s for s in structures if s.value == 5)
    query = crop_slices(read_volume(shared_dir / "data" / "abdomen-ct" / "ct-b" / "dicom"), 8, 11)
    pair = (query, SupportCase(crop_slices(image, 14, 16), crop_slices(labels, 14, 16), "ct-a"), liver)
    recorder, result, final = _run(engine, pair, monkeypatch, method="propagate")
    assert result.labels.shape == query.shape and engine.image_size == 512
    supports = _support_keys(recorder)
    query_keys = [p["key"] for p in recorder.predictions]
    oracle = SAM2Engine(oracle_model, engine.info, 512, "cpu")
    oracle._frames = engine._frames
    oracle.sam2_features = {}
    sam = sam2_video(oracle, supports + query_keys, {j: recorder.masks_of[s] for j, s in enumerate(supports)})
    cmp = Comparison("medsam2 propagate at 512 px", f"{seed} (512 px)")
    for i, p in enumerate(recorder.predictions):
        cmp.add(p["raw"], p["logits"], final[i], sam[len(supports) + i])
    cmp.check()


@pytest.mark.parametrize("change", ["missing", "extra", "shape"])
def test_a_checkpoint_that_does_not_fit_is_refused_with_the_key_named(medsam2_file, tmp_path, change):
    state = torch.load(medsam2_file, weights_only=True)["model"]
    key = "sam_mask_decoder.iou_prediction_head.layers.0.weight"
    if change == "missing":
        del state[key]
    elif change == "extra":
        state["extra.weight"] = torch.zeros(1)
        key = "extra.weight"
    else:
        state[key] = torch.zeros(3, 3)
    bad = tmp_path / f"{change}.pt"
    torch.save({"model": state}, bad)
    with pytest.raises(InputError) as exc:
        SAM2Engine.from_pretrained("medsam2", image_size=64, device="cpu", checkpoint=bad)
    msg = str(exc.value)
    assert f"'{key}'" in msg and "does not match the MedSAM2_latest model" in msg and "\n" not in msg
    assert {"missing": "missing key", "extra": "unexpected key", "shape": "has shape (3, 3) in the file"}[change] in msg


def test_a_base_plus_checkpoint_given_as_medsam2_is_refused(tmp_path):
    path = tmp_path / "b.pt"
    torch.save({"model": _random(checkpoint_info("base_plus"), 1).state_dict()}, path)
    with pytest.raises(InputError, match=r"does not match the MedSAM2_latest model: .*key 'image_encoder\.trunk"):
        SAM2Engine.from_pretrained("medsam2", image_size=64, device="cpu", checkpoint=path)


def test_pickled_code_is_refused_by_weights_only(tmp_path):
    bad = tmp_path / "code.pt"
    from pathlib import PurePosixPath

    torch.save({"model": {"x": PurePosixPath("any class: unpickling would run its code")}}, bad)
    with pytest.raises(InputError, match="not a valid PyTorch weights file"):
        SAM2Engine.from_pretrained("medsam2", image_size=64, device="cpu", checkpoint=bad)


def _point(monkeypatch, url: str, sha256: str) -> None:
    key = "MedSAM2_latest"
    monkeypatch.setitem(CHECKPOINTS, key, dataclasses.replace(CHECKPOINTS[key], url=url, sha256=sha256))


def test_download_checks_the_published_sha256(tmp_path, monkeypatch):
    body = bytes(range(256)) * 3000
    good = hashlib.sha256(body).hexdigest()
    with _Server(body, len(body)) as url:
        _point(monkeypatch, url, "0" * 64)
        with pytest.raises(InputError, match="SHA256 .* not the published 0000") as exc:
            download_checkpoint("medsam2", cache_dir=tmp_path, progress=lambda d, t: None)
        assert "\n" not in str(exc.value)
        assert list(tmp_path.iterdir()) == []  # nothing kept
        _point(monkeypatch, url, good)
        seen = []
        path = download_checkpoint("medsam2", cache_dir=tmp_path, progress=lambda d, t: seen.append(d))
    assert path.name == "MedSAM2_latest.pt" and path.read_bytes() == body and seen[-1] == len(body)
    assert [p.name for p in tmp_path.iterdir()] == ["MedSAM2_latest.pt"]


def test_import_recognises_the_published_file_by_sha256(medsam2_file, tmp_path, monkeypatch):
    with pytest.warns(UserWarning, match="is not the published MedSAM2_latest.pt"):
        import_checkpoint(medsam2_file, "medsam2", cache_dir=tmp_path / "a")
    digest = hashlib.sha256(medsam2_file.read_bytes()).hexdigest()
    _point(monkeypatch, "http://127.0.0.1:9/x.pt", digest)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the published file: no warning
        cached = import_checkpoint(medsam2_file, "medsam2", cache_dir=tmp_path / "b")
    assert cached.name == "MedSAM2_latest.pt" and cached.read_bytes() == medsam2_file.read_bytes()


def test_offline_download_names_the_url_and_the_place(tmp_path, monkeypatch):
    _point(monkeypatch, "http://127.0.0.1:9/MedSAM2_latest.pt", "0" * 64)
    with pytest.raises(InputError) as exc:
        download_checkpoint("medsam2", cache_dir=tmp_path, progress=lambda d, t: None)
    msg = str(exc.value)
    assert "http://127.0.0.1:9/MedSAM2_latest.pt" in msg and str(tmp_path / "MedSAM2_latest.pt") in msg
    assert "--checkpoint" in msg


def test_the_cards_name_licence_size_and_source():
    card = models.CARDS["medsam2"]
    assert card.url.startswith("https://huggingface.co/wanglab/MedSAM2/resolve/") and card.sha256
    assert len(card.sha256) == 64 and card.sha256_source and "research and education" in card.licence
    assert all(c.licence and c.size_mb > 0 for c in models.CARDS.values())
