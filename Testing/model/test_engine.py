"""SAM2Engine on the real sam2 package (tiny, random weights, 256 px, CPU): feature cache, encoder count,
batching, reproducibility, hole filling without sam2's CUDA extension, and encoder counts through segment()."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from conftest import crop_slices
from fewshotsam2.model.engine import Memory, SAM2Engine
from fewshotsam2.slicing.intensity import normalize
from fewshotsam2.run.pipeline import SegmentOptions, SupportCase, segment
from fewshotsam2.slicing.slices import SlicePlan
from fewshotsam2.slicing.support import select_support_slices


@pytest.fixture(scope="module")
def ct_slices(ct_a):
    """Canonical [0, 1] slices of ct-a and its liver (5) masks."""
    image, labels, _ = ct_a
    plan = SlicePlan.for_volume(image)
    return plan.stack(normalize(image)), plan.stack(labels.array) == 5


def _frames(engine, ct_slices, idx):
    images, masks = ct_slices
    engine.reset()
    keys = [("f", i) for i in idx]
    engine.add_frames({key: images[i] for key, i in zip(keys, idx)})
    return keys, [masks[i] for i in idx]


# ------------------------------------------------------------------------------ feature cache and counter

def test_each_frame_is_encoded_once_per_run_and_reset_clears(engine64, ct_slices):
    engine = engine64
    keys, masks = _frames(engine, ct_slices, [14, 15, 16, 17])
    assert engine.encoder_calls == 0  # registering frames encodes nothing
    memory = engine.memorize(keys[:1], masks[:1])
    assert engine.encoder_calls == 1 and memory.batch == 1
    first = engine.predict(keys[1:3], 1, {0: memory})
    assert engine.encoder_calls == 3
    again = engine.predict(keys[1:3], 1, {0: memory})  # same keys: cached features, no encoder call
    assert engine.encoder_calls == 3
    assert torch.equal(first.memory.pred_masks, again.memory.pred_masks)
    engine.encode(keys)  # only the one never used is encoded
    assert engine.encoder_calls == 4
    engine.predict_batched(keys, 2, {0: memory})
    assert engine.encoder_calls == 4
    # the same key with the same pixels keeps its features; new pixels make them stale
    engine.add_frames({keys[0]: ct_slices[0][14]})
    engine.encode(keys)
    assert engine.encoder_calls == 4
    engine.add_frames({keys[0]: ct_slices[0][20]})
    engine.encode(keys)
    assert engine.encoder_calls == 5
    engine.reset()
    assert engine.encoder_calls == 0 and engine.encode_seconds == 0.0
    with pytest.raises(KeyError):  # frames are forgotten too
        engine.encode(keys[:1])


def test_cpu_prediction_masks_have_each_frames_own_size(engine64, ct_slices):
    engine = engine64
    assert engine.device.type == "cpu"
    engine.reset()
    images, masks = ct_slices
    small = images[15][10:50, 20:76]  # 40 x 56, not square
    engine.add_frames({"s": images[15], "q": small})
    memory = engine.memorize(["s"], [masks[15]])
    pred = engine.predict(["q"], 1, {0: memory})
    assert pred.masks[0].shape == (40, 56) and pred.masks[0].dtype == bool
    assert pred.memory.batch == 1
    assert pred.memory.pred_masks.shape == (1, 1, 16, 16)  # low-res logits at image_size / 4
    assert all(torch.isfinite(t).all() for t in (pred.memory.maskmem_features, pred.memory.obj_ptr))


def test_batched_prediction_matches_one_frame_at_a_time(engine64, ct_slices):
    engine = engine64
    keys, masks = _frames(engine, ct_slices, [12, 13, 14, 15, 16])
    memory = engine.memorize(keys[:2], masks[:2])
    assert memory.batch == 2
    cond = {0: memory.select(0), 1: memory.select(1)}  # batch-1 memories expanded to the batch
    batched = engine.predict(keys[2:], 2, cond)
    assert batched.memory.batch == 3
    for n, key in enumerate(keys[2:]):
        alone = engine.predict([key], 2, cond)
        torch.testing.assert_close(batched.memory.pred_masks[n : n + 1], alone.memory.pred_masks, atol=1e-3,
                                   rtol=1e-3)
    # predict_batched chunks by batch size and gives the same predictions
    engine.batch_size, old = 2, engine.batch_size
    try:
        chunked = engine.predict_batched(keys[2:], 2, cond)
    finally:
        engine.batch_size = old
    assert chunked.memory.batch == 3 and len(chunked.masks) == 3
    torch.testing.assert_close(chunked.memory.pred_masks, batched.memory.pred_masks, atol=1e-3, rtol=1e-3)
    with pytest.raises(ValueError):
        engine.predict(keys[2:], 2, {})  # no conditioning memory


def test_untrained_engines_are_reproducible(engine64, ct_slices):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        other = SAM2Engine.with_random_weights("tiny", image_size=64, device="cpu")
    for name, p in engine64.model.state_dict().items():
        assert torch.equal(p, other.model.state_dict()[name]), name
    outputs = []
    for engine in (engine64, other):
        keys, masks = _frames(engine, ct_slices, [15, 16, 17])
        memory = engine.memorize(keys[:1], masks[:1])
        outputs.append(engine.predict(keys[1:], 1, {0: memory}))
    assert torch.equal(outputs[0].memory.pred_masks, outputs[1].memory.pred_masks)
    for a, b in zip(outputs[0].masks, outputs[1].masks):
        np.testing.assert_array_equal(a, b)


def test_engine_construction_steps_and_refusals(tmp_path):
    from fewshotsam2.model.checkpoints import checkpoint_info
    from fewshotsam2.errors import InputError

    with pytest.raises(TypeError, match="from_pretrained"):
        SAM2Engine("tiny", checkpoint_info("tiny"), 64)  # __init__ wraps a built model: it builds, downloads, loads nothing
    with pytest.raises(InputError, match="device"):
        SAM2Engine.with_random_weights("tiny", image_size=64, device="tpu")
    with pytest.raises(InputError, match="image size"):
        SAM2Engine.with_random_weights("tiny", image_size=100, device="cpu")
    # offline and not cached: one clear error naming the file to fetch, before anything is built
    with pytest.raises(InputError, match="not in the cache"):
        SAM2Engine.from_pretrained("tiny", image_size=64, device="cpu", cache_dir=str(tmp_path), download=False)
    with pytest.warns(UserWarning, match="RANDOM WEIGHTS"):
        engine = SAM2Engine.with_random_weights("tiny", image_size=64, device="cpu", batch_size=3)
    assert engine.untrained and engine.checkpoint_path is None and engine.batch_size == 3
    assert engine.encoder_calls == 0 and engine.image_size == 64


# ------------------------------------------------------------------------------ Memory

def _mem(b: int, seed: int = 0) -> Memory:
    g = torch.Generator().manual_seed(seed)
    return Memory(torch.randn(b, 4, 2, 2, generator=g), [torch.randn(b, 4, 2, 2, generator=g)],
                  torch.randn(b, 3, generator=g), torch.randn(b, 1, generator=g), torch.randn(b, 1, 8, 8, generator=g))


def test_memory_as_output_expands_batch_one():
    m = _mem(1)
    out = m.as_output(3)
    assert set(out) == {"maskmem_features", "maskmem_pos_enc", "obj_ptr", "object_score_logits", "pred_masks"}
    assert out["maskmem_features"].shape == (3, 4, 2, 2) and out["obj_ptr"].shape == (3, 3)
    assert out["object_score_logits"].shape == (3, 1) and out["pred_masks"].shape == (3, 1, 8, 8)
    assert out["maskmem_pos_enc"][0].shape == (3, 4, 2, 2)
    for b in range(3):
        assert torch.equal(out["maskmem_features"][b], m.maskmem_features[0])
        assert torch.equal(out["obj_ptr"][b], m.obj_ptr[0])
        assert torch.equal(out["maskmem_pos_enc"][0][b], m.maskmem_pos_enc[0][0])
    same = _mem(3).as_output(3)
    assert same["obj_ptr"].shape == (3, 3)
    with pytest.raises(ValueError):
        _mem(2).as_output(3)


def test_memory_select_and_cat_round_trip():
    a, b = _mem(2, 1), _mem(3, 2)
    c = Memory.cat([a, b])
    assert c.batch == 5
    assert torch.equal(c.select([2, 3, 4]).obj_ptr, b.obj_ptr)
    assert torch.equal(c.select(1).maskmem_pos_enc[0], a.maskmem_pos_enc[0][1:2])
    assert c.select(0).batch == 1


# ------------------------------------------------------------------------------ hole filling

def _holes_logits() -> torch.Tensor:
    x = torch.full((2, 1, 16, 16), 2.0)
    x[0, 0, 2:4, 2:4] = -1.0  # 4-pixel hole: filled
    x[0, 0, 8:13, 8:13] = -1.0  # 25-pixel hole: kept
    for d in range(9):  # a diagonal line of 9 pixels: one 8-connected hole of 9 > 8, kept
        x[1, 0, 3 + d, 3 + d] = -0.5
    x[1, 0, 0, 15] = -3.0  # a 1-pixel hole in a corner: filled
    return x


def _check_filled(out: torch.Tensor, x: torch.Tensor) -> None:
    assert out.shape == x.shape
    assert torch.all(out[0, 0, 2:4, 2:4] == 0.1)
    assert torch.equal(out[0, 0, 8:13, 8:13], x[0, 0, 8:13, 8:13])
    assert out[1, 0, 0, 15] == 0.1
    for d in range(9):
        assert out[1, 0, 3 + d, 3 + d] == -0.5
    changed = out != x
    assert int(changed.sum()) == 5  # nothing but the two small holes
    assert torch.equal(x, _holes_logits())  # the input is not modified


def test_fill_holes_on_the_cpu(engine64):
    """Without sam2's compiled extension (never on the CPU) holes are filled with scipy: same rule as sam2's."""
    engine = engine64
    assert not engine._cuda_hole_filling  # the path under test is the one that runs here
    x = _holes_logits()
    _check_filled(engine._fill_holes(x), x)
    off = SAM2Engine(engine.model, engine.info, 64, "cpu", fill_hole_area=0)
    assert torch.equal(off._fill_holes(x), x)
    wide = SAM2Engine(engine.model, engine.info, 64, "cpu", fill_hole_area=30)
    out = wide._fill_holes(x)
    assert torch.all(out[0, 0, 8:13, 8:13] == 0.1) and torch.all(out[1, 0, 3, 3] == 0.1)


# ------------------------------------------------------------------------------ encoder calls through segment()

def _expected_support_slices(case: SupportCase, values, shots: int) -> set:
    plan = SlicePlan.for_volume(case.image)
    stack = plan.stack(case.labels.array)
    return {idx for v in values for idx in select_support_slices(stack, v, shots)}


@pytest.mark.parametrize("method,shots", [("propagate", 2), ("reverse", 1)])
@pytest.mark.slow  # real-data pipelines at 256 px (the fast tier's version is test_pipeline.py)
def test_encoder_calls_equal_distinct_slices_through_segment(engine256, ct_a, abdomen_mr, method, shots):
    image, labels, structures = ct_a
    mr_image, _, _ = abdomen_mr
    query = crop_slices(mr_image, 8, 13)  # 5 query slices
    supports = [SupportCase(image, labels, "ct-a")]
    if shots == 2:  # a second support volume: its slices are other frames
        supports.append(SupportCase(crop_slices(image, 4, 24), crop_slices(labels, 4, 24), "ct-a part"))
    chosen = [s for s in structures if s.value in (1, 5)]
    options = SegmentOptions.from_flat(method=method, image_size=256, device="cpu", untrained=True, shots=shots,
                                       top_k=2)
    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = segment(query, supports, chosen, options, progress=lambda *a: seen.append(a), engine=engine256)
    # distinct support slices: per support volume, the union over structures (a slice shared by spleen and
    # liver is encoded once: in ct-a both span every slice, so their 1-shot and 2-shot slices coincide)
    n_support = sum(len(_expected_support_slices(case, (1, 5), shots)) for case in supports)
    assert n_support == (4 if shots == 2 else 1)
    assert result.encoder_calls == 5 + n_support
    assert engine256.encoder_calls == result.encoder_calls
    assert result.labels.same_grid(query)
    assert set(np.unique(result.labels.array)) <= {0, 1, 5}
    # each structure's bar starts at 0, before its first slice is encoded (seconds at 1024 px on a CPU); propagate
    # tracks several structures in one pass, under one bar named after all of them ("Label 1, Label 5: ...")
    for name in (s.name for s in chosen):
        first = next(r for r in seen if name in r[0].split(": ")[0].split(", "))
        assert first[1] == 0 and first[2] > 0, first
