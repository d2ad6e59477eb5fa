"""The image-feature cache on disk (feature_cache.py): hits instead of encoder calls, lossless, bounded, never trusted blindly."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch

from fewshotsam2.model.engine import SAM2Engine
from fewshotsam2.model.feature_cache import FeatureCache
from fewshotsam2.run.pipeline import SegmentOptions, SupportCase, segment
from fewshotsam2.run.refine import refine


def _engine(cache=None) -> SAM2Engine:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        e = SAM2Engine.with_random_weights("tiny", image_size=64, device="cpu")
    e.feature_cache = cache
    return e


def _frames(n: int = 4, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {("f", i): rng.random((40, 48)).astype(np.float32) for i in range(n)}


def _entries(folder) -> list:
    return sorted(p for p in folder.iterdir() if p.suffix == ".pt")


def test_a_second_engine_reads_every_slice_from_disk(tmp_path):
    frames = _frames()
    first = _engine(FeatureCache(tmp_path, 10**9))
    first.add_frames(frames)
    first.encode(list(frames))
    assert first.encoder_calls == 4 and first.cache_hits == 0 and len(_entries(tmp_path)) == 4
    entry = torch.load(_entries(tmp_path)[0], weights_only=True)
    assert all(t.dtype == torch.float32 for t in entry["levels"])  # what the CPU encoder computes: lossless
    second = _engine(FeatureCache(tmp_path, 10**9))  # another engine (as another process): empty run cache
    second.add_frames(frames)
    second.encode(list(frames))
    assert second.encoder_calls == 0 and second.cache_hits == 4
    # the positional encodings it derived without an encoder call are the encoder's own
    for a, b in zip(first._pos_enc, second._pos_enc):
        assert torch.equal(a, b)
    assert first._feat_sizes == second._feat_sizes
    for k in frames:
        for a, b in zip(first._features[k], second._features[k]):
            assert torch.equal(a, b)  # read from disk = as encoded
    nocache = _engine()  # and both equal a run without a cache, to the bit (so sam2's predictor, as the oracle tests)
    nocache.add_frames(frames)
    nocache.encode(list(frames))
    for k in frames:
        for a, b in zip(nocache._features[k], second._features[k]):
            assert torch.equal(a, b)
    # other pixels are another entry
    second.add_frames({("g", 0): frames[("f", 0)] * 0.5})
    second.encode([("g", 0)])
    assert second.encoder_calls == 1


def test_truncated_and_foreign_entries_are_encoded_again_with_a_warning(tmp_path):
    frames = _frames(2)
    e = _engine(FeatureCache(tmp_path, 10**9))
    e.add_frames(frames)
    e.encode(list(frames))
    good = [torch.load(p, weights_only=True) for p in _entries(tmp_path)]
    a, b = _entries(tmp_path)
    with open(a, "r+b") as f:
        f.truncate(os.path.getsize(a) // 2)
    foreign = torch.load(b, weights_only=True)
    foreign["identity"] = foreign["identity"].replace("64px", "128px")
    torch.save(foreign, b)
    e.reset()
    e.add_frames(frames)
    with pytest.warns(UserWarning, match="encoded again") as record:
        e.encode(list(frames))
    assert len(record) == 2 and e.encoder_calls == 2 and e.cache_hits == 0
    assert any("unreadable" in str(w.message) for w in record)
    assert any("another model" in str(w.message) for w in record)
    again = [torch.load(p, weights_only=True) for p in _entries(tmp_path)]  # rewritten whole
    for x, y in zip(good, again):
        assert all(torch.equal(s, t) for s, t in zip(x["levels"], y["levels"]))


def test_the_cache_stays_within_its_size_least_recently_used_first(tmp_path):
    frames = _frames(6)
    e = _engine(FeatureCache(tmp_path, 10**9))
    e.add_frames(frames)
    e.encode([("f", 0)])
    entry = os.path.getsize(_entries(tmp_path)[0])
    os.utime(_entries(tmp_path)[0], (1000, 1000))  # the oldest
    cache = FeatureCache(tmp_path, int(entry * 3.5))  # room for 3 entries
    e.feature_cache = cache
    keys = list(frames)
    for i, k in enumerate(keys[1:], start=1):
        e.encode([k])
        os.utime(cache._path(e, k)[0], (1000 + i, 1000 + i))  # a clear order, whatever the clock's resolution
        assert cache.size() <= cache.max_bytes
    kept = {p.name for p in _entries(tmp_path)}
    newest = {cache._path(e, k)[0].name for k in keys[-2:]}
    assert newest <= kept and len(kept) <= 3
    assert cache._path(e, keys[0])[0].name not in kept


def test_settings_off_and_bad_values(tmp_path, monkeypatch):
    from fewshotsam2.errors import InputError

    assert FeatureCache.from_settings("off") is None
    monkeypatch.setenv("FEWSHOTSAM2_FEATURE_CACHE", "off")
    assert FeatureCache.from_settings() is None
    c = FeatureCache.from_settings(str(tmp_path / "f"), 0.5)
    assert c.folder == tmp_path / "f" and c.max_bytes == 5 * 10**8 and c.folder.is_dir()
    with pytest.raises(InputError, match="more than 0 GB"):
        FeatureCache.from_settings(str(tmp_path), 0)
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="cannot use feature cache folder"):
        FeatureCache.from_settings(str(tmp_path / "file" / "sub"), 1)


def test_refine_after_a_first_run_encodes_nothing(tmp_path, ct_a):
    from conftest import crop_slices

    image, labels, structures = ct_a
    liver = next(s for s in structures if s.value == 5)
    query = crop_slices(image, 10, 20)
    support = SupportCase(crop_slices(image, 8, 22), crop_slices(labels, 8, 22), "ct-a")
    opts = SegmentOptions.from_flat(method="propagate", image_size=64, device="cpu", untrained=True)
    engine = _engine(FeatureCache(tmp_path, 10**9))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = segment(query, [support], [liver], opts, progress=None, engine=engine)
    # 10 query slices + 1 support slice; the support (ct-a itself) has the pixels of a query slice: read from disk
    assert first.encoder_calls == 10 and engine.cache_hits == 1
    edited = first.labels.array.copy()
    edited[5] = np.where(crop_slices(labels, 10, 20).array[5] == 5, 5, 0)
    engine2 = _engine(FeatureCache(tmp_path, 10**9))  # as the refine command: a new process
    result = refine(query, [support], [liver], opts, first.labels, first.labels.with_array(edited), engine=engine2,
                    previous=first)
    assert result.corrected_slices == {5: [5]}
    assert result.encoder_calls == 0 and result.cache_hits == 11  # 9 predicted, the corrected one, the support


def test_a_cache_folder_removed_during_a_run_warns_and_the_run_goes_on(tmp_path):
    import shutil
    folder = tmp_path / "cache"
    folder.mkdir()
    frames = _frames(2)
    e = _engine(FeatureCache(folder, 10**9))
    e.add_frames(frames)
    shutil.rmtree(folder)  # another process (or the user) removed it
    with pytest.warns(UserWarning, match="cannot write"):
        e.encode(list(frames))
    assert e.encoder_calls == 2 and all(k in e._features for k in frames)
