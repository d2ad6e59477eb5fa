"""Checkpoint registry, cache, download failure handling and strict loading (no real checkpoint exists here: the
"checkpoints" are state dicts of SAM2 models built from the packaged configs with random weights)."""

from __future__ import annotations

import dataclasses
import http.server
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from fewshotsam2.model import checkpoints
from fewshotsam2.model.checkpoints import (
    CHECKPOINTS,
    checkpoint_info,
    clear_cache,
    download_checkpoint,
    import_checkpoint,
    load_state_dict,
    resolve_checkpoint,
)
from fewshotsam2.model.engine import SAM2Engine, build_sam2_model
from fewshotsam2.errors import InputError


def _model(name: str, seed: int, image_size: int = 64):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_sam2_model(checkpoint_info(name), image_size=image_size, device="cpu")


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A tiny SAM2.1 model with random weights (seed 123, not the engine's seed 0) saved as {"model": sd}."""
    model = _model("tiny", 123, image_size=64)
    path = tmp_path_factory.mktemp("ckpt") / "tiny_random.pt"
    torch.save({"model": model.state_dict()}, path)
    return path, model


# ------------------------------------------------------------------------------------------- registry

def test_registry_has_eight_official_checkpoints_with_packaged_configs():
    import sam2

    package = Path(sam2.__file__).parent
    assert len(CHECKPOINTS) == 9  # Meta's eight and MedSAM2 (test_models.py)
    expected = {f"{p}_hiera_{m}" for p in ("sam2", "sam2.1") for m in ("tiny", "small", "base_plus", "large")}
    assert set(CHECKPOINTS) == expected | {"MedSAM2_latest"}
    for key, info in CHECKPOINTS.items():
        if key == "MedSAM2_latest":
            continue
        assert info.key == key and info.filename == key + ".pt"
        assert info.url.startswith("https://dl.fbaipublicfiles.com/segment_anything_2/")
        assert info.url.endswith("/" + info.filename)
        assert (package / info.config).is_file(), info.config
        assert info.config.startswith("configs/sam2.1/" if info.version == "2.1" else "configs/sam2/")
    assert checkpoint_info("b+", "2").key == "sam2_hiera_base_plus"
    assert checkpoint_info("LARGE").key == "sam2.1_hiera_large"
    with pytest.raises(InputError, match="unknown model 'huge'"):
        checkpoint_info("huge")
    with pytest.raises(InputError, match="version"):
        checkpoint_info("tiny", "3")


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(checkpoints.CACHE_ENV, str(tmp_path / "c"))
    assert checkpoints.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv(checkpoints.CACHE_ENV)
    assert checkpoints.default_cache_dir() == Path.home() / ".cache" / "fewshotsam2" / "checkpoints"


# ------------------------------------------------------------------------------------------- resolve / download

def test_resolve_offline_not_cached_names_the_exact_target(tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(InputError) as exc:
        resolve_checkpoint("small", "2", cache_dir=cache, download=False)
    target = cache / "sam2_hiera_small.pt"
    assert str(target) in str(exc.value)
    assert CHECKPOINTS["sam2_hiera_small"].url in str(exc.value)
    with pytest.raises(InputError, match="not found"):
        resolve_checkpoint("tiny", checkpoint=tmp_path / "missing.pt")
    # a cached file is found without any download
    cache.mkdir()
    (cache / "sam2_hiera_small.pt").write_bytes(b"x")
    assert resolve_checkpoint("small", "2", cache_dir=cache, download=False) == target


def _point_url(monkeypatch, key: str, url: str) -> None:
    monkeypatch.setitem(CHECKPOINTS, key, dataclasses.replace(CHECKPOINTS[key], url=url))


def test_download_failure_is_an_input_error_and_leaves_no_part_file(tmp_path, monkeypatch):
    _point_url(monkeypatch, "sam2.1_hiera_tiny", "http://127.0.0.1:9/x.pt")  # closed port: refused
    cache = tmp_path / "cache"
    with pytest.raises(InputError) as exc:
        download_checkpoint("tiny", "2.1", cache_dir=cache, progress=lambda d, t: None)
    msg = str(exc.value)
    assert "http://127.0.0.1:9/x.pt" in msg and str(cache / "sam2.1_hiera_tiny.pt") in msg
    assert "\n" not in msg
    assert list(cache.iterdir()) == []  # no .part, no target
    # the same through resolve_checkpoint and through the engine (no --checkpoint, nothing cached)
    with pytest.raises(InputError):
        resolve_checkpoint("tiny", cache_dir=cache)
    with pytest.raises(InputError, match="cannot download"):
        SAM2Engine.from_pretrained("tiny", image_size=64, device="cpu", cache_dir=str(cache))
    assert list(cache.iterdir()) == []


class _Server:
    """A local HTTP server: serves `body`, announcing `length` bytes (more than sent = a cut download)."""

    def __init__(self, body: bytes, length: int):
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                self.send_response(200)
                self.send_header("Content-Length", str(outer.length))
                self.end_headers()
                self.wfile.write(outer.body)
                self.wfile.flush()
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.body, self.length = body, length
        self.httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/sam2.1_hiera_tiny.pt"

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_download_writes_the_target_atomically(tmp_path, monkeypatch):
    body = bytes(range(256)) * 4000  # ~1 MB: more than one read chunk
    seen = []
    with _Server(body, len(body)) as url:
        _point_url(monkeypatch, "sam2.1_hiera_tiny", url)
        path = download_checkpoint("tiny", cache_dir=tmp_path, progress=lambda d, t: seen.append((d, t)))
    assert path == tmp_path / "sam2.1_hiera_tiny.pt" and path.read_bytes() == body
    assert seen[-1] == (len(body), len(body))
    assert [p.name for p in tmp_path.iterdir()] == ["sam2.1_hiera_tiny.pt"]
    assert download_checkpoint("tiny", cache_dir=tmp_path) == path  # cached: no second download


def test_cut_download_is_an_input_error_and_leaves_no_part_file(tmp_path, monkeypatch):
    with _Server(b"x" * 1000, 5000) as url:
        _point_url(monkeypatch, "sam2.1_hiera_tiny", url)
        with pytest.raises(InputError):
            download_checkpoint("tiny", cache_dir=tmp_path, progress=lambda d, t: None)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------- strict loading

@pytest.mark.slow  # several seconds: kept out of the fast tier
def test_wrong_checkpoints_are_refused_with_one_message(tmp_path):
    tiny = _model("tiny", 1)
    small_path = tmp_path / "small.pt"
    torch.save({"model": _model("small", 1).state_dict()}, small_path)
    with pytest.raises(InputError) as exc:
        load_state_dict(tiny, small_path, "sam2.1_hiera_tiny")
    assert "does not match the sam2.1_hiera_tiny model" in str(exc.value) and "\n" not in str(exc.value)

    good = tmp_path / "good.pt"
    torch.save({"model": tiny.state_dict()}, good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint\n" * 100)
    for bad in (truncated, garbage):
        with pytest.raises(InputError, match="not a valid PyTorch weights file"):
            load_state_dict(tiny, bad, "sam2.1_hiera_tiny")
    listed = tmp_path / "list.pt"
    torch.save([1, 2, 3], listed)
    with pytest.raises(InputError, match="no state dict"):
        load_state_dict(tiny, listed, "sam2.1_hiera_tiny")
    partial = tmp_path / "partial.pt"
    sd = tiny.state_dict()
    torch.save({k: v for n, (k, v) in enumerate(sd.items()) if n % 2}, partial)  # half the keys, no "model"
    with pytest.raises(InputError, match="does not match"):
        load_state_dict(tiny, partial, "sam2.1_hiera_tiny")
    # a checkpoint of the other SAM2 release does not fit either
    with pytest.raises(InputError, match="does not match"):
        load_state_dict(build_sam2_model(checkpoint_info("tiny", "2"), 64), good, "sam2_hiera_tiny")


def test_engine_refuses_a_small_checkpoint_for_tiny(tmp_path):
    path = tmp_path / "small.pt"
    torch.save({"model": _model("small", 2).state_dict()}, path)
    with pytest.raises(InputError, match="does not match"):
        SAM2Engine.from_pretrained("tiny", image_size=64, device="cpu", checkpoint=str(path))


def test_correct_checkpoint_loads_and_gives_that_models_masks(tiny_ckpt, engine64, ct_a):
    path, model = tiny_ckpt
    loaded = SAM2Engine.from_pretrained("tiny", image_size=64, device="cpu", checkpoint=str(path))
    assert loaded.checkpoint_path == path and not loaded.untrained
    for name, p in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], p), name

    image, labels, _ = ct_a
    from fewshotsam2.slicing.intensity import normalize
    from fewshotsam2.slicing.slices import SlicePlan

    plan = SlicePlan.for_volume(image)
    images, masks = plan.stack(normalize(image)), plan.stack(labels.array) == 5

    def run(engine):
        engine.reset()
        engine.add_frames({i: images[i] for i in (14, 15, 16)})
        memory = engine.memorize([15], [masks[15]])
        pred = engine.predict([14, 16], 1, {0: memory})
        engine.reset()
        return pred

    untrained = run(engine64)
    got = run(loaded)
    want = run(SAM2Engine(model, engine64.info, 64, "cpu"))  # the very model that was saved, in the same engine
    assert torch.equal(got.memory.pred_masks, want.memory.pred_masks)
    for a, b in zip(got.masks, want.masks):
        np.testing.assert_array_equal(a, b)
    assert not torch.equal(got.memory.pred_masks, untrained.memory.pred_masks)  # the weights did change


# ------------------------------------------------------------------------------------------- cache


def test_import_checkpoint_copies_into_the_cache(tiny_ckpt, tmp_path):
    path, _ = tiny_ckpt
    cache = tmp_path / "cache"
    out = import_checkpoint(path, "tiny", "2.1", cache_dir=cache)  # validated against a freshly built tiny model
    assert out == cache / "sam2.1_hiera_tiny.pt"
    assert out.read_bytes() == path.read_bytes()
    assert [p.name for p in cache.iterdir()] == ["sam2.1_hiera_tiny.pt"]
    assert resolve_checkpoint("tiny", cache_dir=cache, download=False) == out
    assert checkpoints.cached_checkpoint("tiny", cache_dir=cache) == out
    assert checkpoints.cached_checkpoint("small", cache_dir=cache) is None


def test_import_checkpoint_refuses_a_wrong_file_and_copies_atomically(tiny_ckpt, tmp_path, monkeypatch):
    path, _ = tiny_ckpt
    cache = tmp_path / "cache"
    with pytest.raises(InputError, match="does not match"):
        import_checkpoint(path, "small", "2.1", cache_dir=cache)  # a tiny checkpoint claimed to be small
    assert not cache.exists() or list(cache.iterdir()) == []
    with pytest.raises(InputError, match="not found"):
        import_checkpoint(tmp_path / "nope.pt", "tiny", cache_dir=cache)

    def broken_copy(src, dst):
        Path(dst).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoints.shutil, "copyfile", broken_copy)
    with pytest.raises(OSError):
        import_checkpoint(path, "tiny", cache_dir=cache)
    assert list(cache.iterdir()) == []  # neither a partial copy nor a half target


def test_clear_cache_removes_checkpoints_and_partial_downloads(tmp_path):
    for name in ("sam2.1_hiera_tiny.pt", "sam2_hiera_large.pt", ".sam2.1_hiera_small.pt.abc.part", "notes.txt"):
        (tmp_path / name).write_bytes(b"1")
    assert clear_cache(tmp_path) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    assert clear_cache(tmp_path) == 0
    assert clear_cache(tmp_path / "missing") == 0
