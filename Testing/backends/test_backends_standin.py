"""Selection and memory-bank logic of the backends, in isolation, with a deterministic stand-in engine.

The stand-in implements the `backends.base.Engine` protocol with known rules: every memory it hands out carries
an identity (stored in `obj_ptr`), forward predictions of query slice i are a table entry, and reverse predictions
of support j from query slice i's memory are another table entry, so the reverse score pi is known in advance.
It records every `predict` call (keys, timeline position, the identities in `cond` and `recent`, direction), so
the tests can check what the memory bank held at each step. The same backends run on the real SAM2 in
test_reverse_real.py / test_propagate_real.py.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from fewshotsam2.backends import memory_bank, propagate, reverse
from fewshotsam2.backends.base import QueryContext, StageClock, SupportSlice
from fewshotsam2.model.engine import Memory, Prediction
from fewshotsam2.errors import InputError
from fewshotsam2.options import PropagateOptions, ReverseOptions

H = W = 12
SUPPORT_ID = 1000  # memory identity of support j: SUPPORT_ID + j
SELF_ID = 10000  # memory identity of a self-propagation prediction of query slice i: SELF_ID + i
PROMPT_ID = 100000  # memory identity of query slice i with a mask prompt (its p_i): PROMPT_ID + i


def _memory(ids) -> Memory:
    ids = torch.tensor([float(i) for i in ids]).view(-1, 1)
    b = ids.shape[0]
    return Memory(torch.zeros(b, 1, 1, 1), [torch.zeros(b, 1, 1, 1)], ids.clone(), torch.zeros(b, 1),
                  torch.zeros(b, 1, 1, 1))


def _ids(memory: Memory) -> list[int]:
    return [int(v) for v in memory.obj_ptr[:, 0].tolist()]


def _dice(a, b) -> float:
    """Reference Dice, independent of the package's."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int((a & b).sum()) / s


class StandInEngine:
    """Deterministic `Engine`: forward mask of query slice i = forward[i]; reverse prediction of support j from
    query slice i's mask-prompt memory = back[(i, j)]; self-propagation of slice i = a full-row stripe i % H."""

    memory_reach = 15  # SAM2.1's: object pointers of 15 earlier frames

    def __init__(self, n: int, k: int, forward, back, batch_size: int = 4):
        self.n, self.k = n, k
        self.forward, self.back = forward, back
        self.batch_size = batch_size
        self.encoder_calls = 0
        self.frames: dict = {}
        self.encoded: set = set()
        self.calls: list[dict] = []
        self.memorized: list = []
        self.prompt_masks: list = []  # (key, mask) of every memorize call, in order

    # Engine protocol ------------------------------------------------------------------------------
    def add_frames(self, frames) -> None:
        self.frames.update(frames)

    def encode(self, keys, progress=None) -> None:
        for key in keys:
            assert key in self.frames, f"{key} was never added"
            if key not in self.encoded:
                self.encoded.add(key)
                self.encoder_calls += 1

    # no feature cache to bound: every frame stays encoded
    def release(self, keys) -> None:
        pass

    def keep_if_room(self, keys) -> None:
        pass

    def over_feature_budget(self) -> bool:
        return False

    def memorize(self, keys, masks) -> Memory:
        self.encode(keys)
        self.memorized.append(list(keys))
        self.prompt_masks += [(key, np.asarray(mask, bool)) for key, mask in zip(keys, masks)]
        # support keys are ("support", j), query keys ("query", i)
        return _memory([(SUPPORT_ID if key[0] == "support" else PROMPT_ID) + key[1] for key in keys])

    def predict(self, keys, frame_idx, cond, recent=None, num_frames=None, reverse=False) -> Prediction:
        keys = list(keys)
        self.encode(keys)
        b = len(keys)
        cond_ids = {t: _ids(m) for t, m in cond.items()}
        for t, m in cond.items():
            assert m.batch in (1, b), "a memory must be of batch 1 or of the prediction's batch"
        call = dict(keys=keys, frame_idx=frame_idx, cond=cond_ids,
                    recent={t: _ids(m) for t, m in (recent or {}).items()},
                    recent_is_none=recent is None, num_frames=num_frames, reverse=reverse)
        if keys[0][0] == "support":  # reverse scoring: cond is one memory per batch element (query slice ids)
            call["phase"] = "reverse"
            assert all(v >= PROMPT_ID for v in cond_ids[0]), "reverse scoring conditions on (q_i, p_i) prompts"
            qids = [v - PROMPT_ID for v in cond_ids[0]]
            qids = qids if len(qids) == b else qids * b
            masks = [self.back[(q, key[1])] for q, key in zip(qids, keys)]
            ids = [-1] * b
        elif all(v >= SUPPORT_ID and v < SELF_ID for ids in cond_ids.values() for v in ids) and not recent:
            call["phase"] = "forward"
            masks = [self.forward[key[1]] for key in keys]
            ids = [key[1] for key in keys]
        else:
            call["phase"] = "self"
            masks = []
            for key in keys:
                m = np.zeros((H, W), bool)
                m[key[1] % H] = True
                masks.append(m)
            ids = [SELF_ID + key[1] for key in keys]
        self.calls.append(call)
        return Prediction(masks, _memory(ids))

    def predict_batched(self, keys, frame_idx, cond, num_frames=None) -> Prediction:
        parts = [self.predict(keys[s:s + self.batch_size], frame_idx, cond, num_frames=num_frames)
                 for s in range(0, len(keys), self.batch_size)]
        return Prediction([m for p in parts for m in p.masks], Memory.cat([p.memory for p in parts]))


def _support_mask(j: int) -> np.ndarray:
    m = np.zeros((H, W), bool)
    m[2 + j: 8 + j, 3:9] = True
    return m


def _setup(n=20, k=2, empty=(), seed=0, batch_size=4):
    """Random forward/back tables; forward masks of `empty` slices are empty."""
    rng = np.random.default_rng(seed)
    forward = {}
    for i in range(n):
        m = rng.random((H, W)) < 0.3
        if i in empty:
            m[:] = False
        else:
            m[0, 0] = True
        forward[i] = m
    supports_masks = [_support_mask(j) for j in range(k)]
    back = {}
    for i in range(n):
        for j in range(k):
            # a random share of the support mask plus a little noise: pi varies from slice to slice
            keep = rng.random((H, W)) < rng.random()
            back[(i, j)] = (supports_masks[j] & keep) | (rng.random((H, W)) < 0.02)
    engine = StandInEngine(n, k, forward, back, batch_size)
    qkeys = [("query", i) for i in range(n)]
    engine.add_frames({key: np.zeros((H, W), np.float32) for key in qkeys})
    supports = []
    for j in range(k):
        key = ("support", j)
        engine.add_frames({key: np.zeros((H, W), np.float32)})
        supports.append(SupportSlice(key, supports_masks[j], support=j, stack_index=j))
    context = QueryContext(keys=qkeys, images=np.zeros((n, H, W), np.float32))
    expected_pi = np.array([
        0.0 if i in empty else np.mean([_dice(back[(i, j)], supports_masks[j]) for j in range(k)]) for i in range(n)
    ])
    return engine, context, supports, expected_pi


def _run_reverse(engine, context, supports, **opts):
    timings: dict = {}
    progress_calls = []
    result = reverse.ReverseBackend().run(engine, context, supports, ReverseOptions(**opts),
                                          lambda *a: progress_calls.append(a), StageClock(engine, timings))
    return result, progress_calls


# ------------------------------------------------------------------------------------------- scoring

def test_reverse_scores_are_mean_dice_over_supports_and_empty_forward_scores_zero():
    empty = (3, 11, 12)
    engine, context, supports, expected = _setup(n=20, k=3, empty=empty)
    result, _ = _run_reverse(engine, context, supports, top_k=4)
    pi = result.scores
    assert pi.shape == (20,) and result.higher_is_better
    assert result.supports == supports
    np.testing.assert_allclose(pi, expected, atol=1e-12)
    for i in empty:
        assert pi[i] == 0.0
    # the reverse pass: each non-empty forward prediction predicts every support exactly once, empty ones never
    scored = [(q - PROMPT_ID, key[1]) for c in engine.calls if c["phase"] == "reverse"
              for q, key in zip(c["cond"][0], c["keys"])]
    assert sorted(scored) == sorted((i, j) for i in range(20) if i not in empty for j in range(3))
    for c in engine.calls:
        if c["phase"] == "reverse":
            assert list(c["cond"]) == [0] and c["frame_idx"] == 1 and c["num_frames"] == 2
            assert len(c["keys"]) <= engine.batch_size
    # forward: every query slice once, conditioned on exactly the supports at frames 0..k-1
    fwd = [c for c in engine.calls if c["phase"] == "forward"]
    assert sorted(key[1] for c in fwd for key in c["keys"]) == list(range(20))
    for c in fwd:
        assert c["cond"] == {j: [SUPPORT_ID + j] for j in range(3)}
        assert c["frame_idx"] == 3 and c["num_frames"] == 4
    # the forward masks are reported as p_i
    np.testing.assert_array_equal(result.forward_masks, np.stack([engine.forward[i] for i in range(20)]))
    # the reverse pass prompts each non-empty q_i with p_i as a mask, as the supports are prompted with theirs
    scored_slices = [i for i in range(20) if i not in empty]
    prompted = [(key, mask) for key, mask in engine.prompt_masks if key[0] == "query"][: len(scored_slices)]
    assert sorted(key[1] for key, _ in prompted) == scored_slices
    for key, mask in prompted:
        np.testing.assert_array_equal(mask, engine.forward[key[1]])


def test_every_frame_encoded_once_by_the_stand_in_run():
    engine, context, supports, _ = _setup(n=15, k=2)
    _run_reverse(engine, context, supports, top_k=3)
    assert engine.encoder_calls == 15 + 2


# ------------------------------------------------------------------------------------------- selection

def test_select_conditional_top_k_and_min_score():
    s = [0.1, 0.9, 0.0, 0.5, 0.7, 0.5, 0.3]
    sel = reverse.select_conditional(s, top_k=3, min_score=0.0)
    assert sel.selected == [1, 4, 3] and not sel.fallback  # best first, ties keep slice order
    sel = reverse.select_conditional(s, top_k=10, min_score=0.0)
    assert sel.selected == [1, 4, 3, 5, 6, 0]  # pi = 0 is never conditional
    sel = reverse.select_conditional(s, top_k=10, min_score=0.5)
    assert sel.selected == [1, 4, 3, 5]
    sel = reverse.select_conditional(s, top_k=2, min_score=0.5)
    assert sel.selected == [1, 4]
    sel = reverse.select_conditional(s, top_k=3, min_score=0.95)
    assert sel.selected == [1] and sel.fallback
    sel = reverse.select_conditional([0.0, 0.0], top_k=3, min_score=0.5)
    assert sel.selected == [] and not sel.fallback
    sel = reverse.select_conditional(s, top_k=1, min_score=1.0)
    assert sel.selected == [1] and sel.fallback


@pytest.mark.parametrize("top_k,min_score", [(0, 0.0), (-2, 0.0), (3, 1.5), (3, -0.1)])
def test_select_conditional_refuses_bad_settings(top_k, min_score):
    with pytest.raises(InputError) as exc:
        reverse.select_conditional([0.5], top_k, min_score)
    assert exc.value.option == ("top_k" if top_k < 1 else "min_score")
    assert "--" not in str(exc.value)  # the core names no command-line flag


def test_reverse_selects_top_k_by_pi():
    engine, context, supports, expected = _setup(n=20, k=2, empty=(5,))
    result, _ = _run_reverse(engine, context, supports, top_k=4)
    selected = result.selected
    want = sorted(np.argsort(-expected, kind="stable")[:4].tolist())
    assert sorted(selected) == want
    for i in want:  # a conditional slice keeps its forward prediction
        np.testing.assert_array_equal(result.masks[i], engine.forward[i])


def test_reverse_min_score_filters_and_falls_back_to_best_slice_with_warning():
    engine, context, supports, expected = _setup(n=20, k=2)
    threshold = float(np.sort(expected)[-3])  # exactly three slices reach it
    result, _ = _run_reverse(engine, context, supports, top_k=10, min_score=threshold)
    assert sorted(result.selected) == sorted(np.flatnonzero(expected >= threshold))

    engine, context, supports, expected = _setup(n=20, k=2)
    with pytest.warns(UserWarning, match="min_score"):
        result, _ = _run_reverse(engine, context, supports, top_k=5, min_score=float(expected.max()) + 1e-6)
    assert result.selected == [int(np.argmax(expected))]
    assert result.masks.shape == (20, H, W)


def test_reverse_all_forward_empty_gives_empty_result_with_warning():
    engine, context, supports, _ = _setup(n=8, k=2, empty=tuple(range(8)))
    with pytest.warns(UserWarning, match="not found"):
        result, _ = _run_reverse(engine, context, supports, top_k=3)
    assert not result.masks.any() and result.masks.shape == (8, H, W)
    assert [c["phase"] for c in engine.calls] == ["forward"] * 2  # no reverse pass, no self-propagation
    assert not result.scores.any() and result.selected == []


# ------------------------------------------------------------------------------------------- memory bank

@pytest.mark.parametrize("n,top_k,keep_supports", [(40, 3, False), (40, 1, True), (12, 4, False)])
def test_self_propagation_memory_bank_and_order(n, top_k, keep_supports):
    k = 2
    engine, context, supports, expected = _setup(n=n, k=k, seed=n + top_k)
    result, progress_calls = _run_reverse(engine, context, supports, top_k=top_k, keep_supports=keep_supports)
    conditional = sorted(result.selected)
    assert len(conditional) == top_k
    first = conditional[0]
    self_calls = [c for c in engine.calls if c["phase"] == "self"]
    visited = [c["keys"][0][1] for c in self_calls]
    assert all(len(c["keys"]) == 1 for c in self_calls)

    # both ways from the first conditional slice: up in increasing order (reverse=False), then down (reverse=True)
    up = [i for i in range(first, n) if i not in conditional]
    down = [i for i in range(first - 1, -1, -1) if i not in conditional]
    assert visited == up + down
    assert [c["reverse"] for c in self_calls] == [False] * len(up) + [True] * len(down)
    assert sorted(visited + conditional) == list(range(n))  # every slice exactly once, conditional ones kept

    want_cond = {c: [PROMPT_ID + c] for c in conditional}  # query slice c with p_c as a mask prompt, at frame c
    prompts = [(key, mask) for key, mask in engine.prompt_masks if key[0] == "query"][n:]  # after the reverse pass
    assert sorted(key[1] for key, _ in prompts) == conditional
    for key, mask in prompts:
        np.testing.assert_array_equal(mask, engine.forward[key[1]])
    if keep_supports:
        want_cond.update({-1 - j: [SUPPORT_ID + j] for j in range(k)})
    previous = None
    for call in self_calls:
        pos = call["frame_idx"]
        assert pos == call["keys"][0][1]  # query slice i sits at frame i
        assert call["num_frames"] == n
        # every conditional slice (and, with keep_supports, every support) is in cond at every step
        assert call["cond"] == want_cond
        recent = call["recent"]
        assert len(recent) <= engine.memory_reach
        for t, ids in recent.items():
            assert ids == [SELF_ID + t]  # only this run's self-propagation predictions, at their own frames
            assert t not in want_cond
            assert previous is not None and abs(t - pos) <= engine.memory_reach  # within reach
        if previous is not None and abs(pos - previous) == 1:  # inside one pass: what SAM2 reads is there
            step = pos - previous
            for d in range(1, engine.memory_reach):
                t = pos - step * d
                if t in visited[: visited.index(pos)] and (t - first) * step >= 0:
                    assert t in recent, f"slice {t} missing from the FIFO at frame {pos}"
        if down and pos == down[0]:
            # the backward pass starts from the forward pass's predictions just above the first conditional slice
            assert set(recent) == {t for t in up if 0 < t - first < engine.memory_reach}
        previous = pos
    # the result: stand-in self masks where predicted, forward masks on conditional slices
    for i in range(n):
        if i in conditional:
            np.testing.assert_array_equal(result.masks[i], engine.forward[i])
        else:
            assert result.masks[i][i % H].all() and result.masks[i].sum() == W
    assert progress_calls and all(len(p) == 3 for p in progress_calls)


def test_propagate_backend_memory_bank():
    n, k = 25, 3
    engine, context, supports, _ = _setup(n=n, k=k)
    # the stand-in treats calls whose cond holds only supports and an empty FIFO as "forward"
    result = propagate.PropagateBackend().run(engine, context, supports, PropagateOptions(), lambda *a: None,
                                              StageClock(engine, {}))
    assert engine.memorized == [[("support", j) for j in range(k)]]
    assert [c["keys"][0][1] for c in engine.calls] == list(range(n))
    for i, call in enumerate(engine.calls):
        assert call["frame_idx"] == k + i and call["num_frames"] == k + n and not call["reverse"]
        assert call["cond"] == {j: [SUPPORT_ID + j] for j in range(k)}
        # the FIFO holds the latest predictions SAM2 can still reach (object pointers: 15 frames back)
        assert len(call["recent"]) == min(i, engine.memory_reach)
        assert sorted(call["recent"]) == list(range(k + max(0, i - engine.memory_reach), k + i))
    assert result.masks.shape == (n, H, W) and result.scores is None and result.supports == supports
    np.testing.assert_array_equal(result.masks[0], engine.forward[0])


def test_propagate_sequence_bounded_fifo_with_stand_in():
    engine, context, supports, _ = _setup(n=30, k=1)
    cond = {0: _memory([SUPPORT_ID + 0])}
    recent: dict = {}
    done = []
    masks = memory_bank.propagate_sequence(engine, context.keys, list(range(1, 31)), cond, 31, recent=recent,
                                           on_slice=lambda d, t: done.append((d, t)))
    assert len(masks) == 30 and done[-1] == (30, 30)
    assert len(recent) <= engine.memory_reach and max(recent) == 30
    assert all(30 - t < engine.memory_reach for t in recent)


@pytest.mark.parametrize("reach", [3, 7])
def test_propagate_sequence_keeps_what_the_engine_can_reach(reach):
    # another model config reads memories from another distance: the FIFO follows the engine, not a constant
    engine, context, supports, _ = _setup(n=20, k=1)
    engine.memory_reach = reach
    cond = {0: _memory([SUPPORT_ID + 0])}
    memory_bank.propagate_sequence(engine, context.keys, list(range(1, 21)), cond, 21)
    for call in engine.calls:
        pos = call["frame_idx"]
        assert sorted(call["recent"]) == list(range(max(1, pos - reach), pos))
