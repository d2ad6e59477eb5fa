"""The oracle's shared parts: sam2's own `SAM2VideoPredictor` run on our engine's frames (`sam2_video`), the
recorder of what our engine was given, the tie-aware `Comparison`, and the ct-a -> ct-b liver pair; used by
the oracle tests of every path (model/test_oracle_sam2.py, run/test_refine_oracle.py,
run/test_multi_structure_oracle.py, backends/test_range_continuation.py, model/test_models.py).

How the oracle works (same weights, same model-input frames, the predictor's own post-processing,
what is compared and how a float tie is recognised): model/test_oracle_sam2.py's docstring.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

import sam2.sam2_video_predictor
import sam2.utils.misc
from conftest import crop_slices
from fewshotsam2.model.engine import FILL_HOLE_AREA, SAM2Engine, build_sam2_model
from fewshotsam2.run.pipeline import SegmentOptions, SupportCase, segment
from fewshotsam2.slicing.slices import SlicePlan
from fewshotsam2.io.volume import read_volume

# (image size, weight seed): the 256 px with two seeds (slow tier), and 64 px in the fast tier
CONFIGS = [
    pytest.param((64, 0), id="64px-seed0"),
    pytest.param((256, 0), id="256px-seed0", marks=pytest.mark.slow),
    pytest.param((256, 1), id="256px-seed1", marks=pytest.mark.slow),
]
TOLERANCE = 1e-5  # max |delta logit|
LIVER = 5
QUERY_SLICES = (5, 12)  # ct-b array slices with liver


# ------------------------------------------------------------------------------------------ the oracle's SAM2

def _cpu_connected_components(mask: torch.Tensor):
    """sam2's `get_connected_components` contract (8-connectivity; per pixel: component label and area) on the CPU."""
    m = mask.cpu().numpy().astype(bool)
    labels = np.zeros(m.shape, np.int32)
    areas = np.zeros(m.shape, np.int32)
    for i in range(m.shape[0]):
        lab, n = ndimage.label(m[i, 0], structure=np.ones((3, 3), int))
        labels[i, 0] = lab
        areas[i, 0] = np.where(lab > 0, np.bincount(lab.ravel())[lab], 0)
    return torch.from_numpy(labels).to(mask.device), torch.from_numpy(areas).to(mask.device)


_ENGINES: dict[int, SAM2Engine] = {}  # one per image size, for the whole module (building takes seconds)


@pytest.fixture(params=CONFIGS)
def engine(request, monkeypatch):
    """An engine with the random weights of one seed; its model doubles as sam2's video predictor."""
    size, seed = request.param
    if size not in _ENGINES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _ENGINES[size] = SAM2Engine.with_random_weights("tiny", image_size=size, device="cpu")
    engine = _ENGINES[size]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        weights = build_sam2_model(engine.info, size, "cpu").state_dict()
    engine.model.load_state_dict(weights)
    engine.seed = f"{seed} ({size} px)"
    engine.sam2_features = {}  # the predictor's image features under these weights, by input
    # the predictor's post-processing, as build_sam2_video_predictor(apply_postprocessing=True) sets it
    monkeypatch.setattr(engine.model, "fill_hole_area", FILL_HOLE_AREA)
    monkeypatch.setattr(sam2.utils.misc, "get_connected_components", _cpu_connected_components)
    engine.reset()
    return engine


class Sam2Frame(NamedTuple):
    """What sam2's video predictor gave one frame."""

    raw: torch.Tensor  # low-res logits (1, 1, S/4, S/4) before hole filling: the inputs to the filling decision
    filled: torch.Tensor  # the same after hole filling (what the predictor stores and upsamples)
    mask: np.ndarray  # final bool mask
    mask_logits: np.ndarray  # its logits (`filled` upsampled bilinearly)


def sam2_video(engine: SAM2Engine, keys, prompts: dict, start: int | None = None,
               both_ways: bool = False) -> dict[int, Sam2Frame]:
    """Run sam2's video predictor on the engine's frames `keys` with mask prompts {frame: mask}.

    Returns {frame: Sam2Frame}; final masks have the size of the last frame (sam2's videos have one size; ours mixes
    support and query sizes).
    """
    model = engine.model
    with torch.inference_mode():
        images = engine._to_model_input([engine._frames[k] for k in keys])
    h, w = engine._frames[keys[-1]].shape  # the "video size": that of the frames compared (the last one's)
    encode = model.forward_image

    def forward_image(image):
        # The predictor keeps only the last frame's features and re-encodes the others (seconds per case on
        # the CPU); the image encoder is deterministic, so each distinct frame is encoded once for speed.
        key = image.cpu().numpy().tobytes()
        if key not in engine.sam2_features:
            engine.sam2_features[key] = encode(image)
        return engine.sam2_features[key]

    raw = {}  # frame -> logits before hole filling, from sam2's own call of its post-processing
    run_frame, fill_holes = model._run_single_frame_inference, sam2.sam2_video_predictor.fill_holes_in_mask_scores

    def run_single_frame(*args, frame_idx, **kwargs):
        def recorded_fill_holes(mask, max_area):
            raw[frame_idx] = mask.float().clone()
            return fill_holes(mask, max_area)

        with mock.patch.object(sam2.sam2_video_predictor, "fill_holes_in_mask_scores", recorded_fill_holes):
            return run_frame(*args, frame_idx=frame_idx, **kwargs)

    out = {}
    with mock.patch.object(sam2.sam2_video_predictor, "load_video_frames", return_value=(images, h, w)), \
            mock.patch.object(model, "forward_image", forward_image), \
            mock.patch.object(model, "_run_single_frame_inference", run_single_frame):
        state = model.init_state("frames in memory")
        for frame, mask in prompts.items():
            model.add_new_mask(state, frame, 1, np.asarray(mask, bool))
        outputs = state["output_dict_per_obj"][0]
        for reverse in (False, True) if both_ways else (False,):
            for frame, _, video_masks in model.propagate_in_video(state, start_frame_idx=start, reverse=reverse):
                stored = outputs["cond_frame_outputs"].get(frame) or outputs["non_cond_frame_outputs"][frame]
                logits = video_masks[0, 0].cpu()
                out[frame] = Sam2Frame(raw[frame], stored["pred_masks"].float(), (logits > 0).numpy(), logits.numpy())
    return out


# ------------------------------------------------------------------------------------------ our side, recorded

class Recorder:
    """Wraps the engine's `memorize` and `predict` (the real ones run) to keep what each frame got."""

    def __init__(self, engine: SAM2Engine, monkeypatch) -> None:
        self.prompts: dict[int, list] = {}  # id(memory) -> [(key, mask)] per batch element
        self.masks_of: dict = {}  # key -> prompt mask
        self.predictions: list[dict] = []
        memorize, predict, fill_holes = engine.memorize, engine.predict, engine._fill_holes
        unfilled: list[torch.Tensor] = []  # the logits `predict` hands to its hole filling

        def recorded_fill_holes(logits):
            unfilled.append(logits.float().clone())
            return fill_holes(logits)

        def recorded_memorize(keys, masks):
            memory = memorize(keys, masks)
            self.prompts[id(memory)] = list(zip(keys, masks))
            for key, mask in zip(keys, masks):
                self.masks_of.setdefault(key, np.asarray(mask, bool))
            return memory

        def recorded_predict(keys, frame_idx, cond, recent=None, num_frames=None, reverse=False):
            unfilled.clear()
            pred = predict(keys, frame_idx, cond, recent=recent, num_frames=num_frames, reverse=reverse)
            (raw,) = unfilled  # hole filling ran once, on the whole batch
            logits = pred.memory.pred_masks  # the filled logits, as sam2's predictor keeps them
            sources = {t: self.prompts.get(id(m)) for t, m in cond.items()}
            for b, key in enumerate(keys):
                prompt = {t: (s[b] if len(s) > 1 else s[0]) for t, s in sources.items() if s is not None}
                self.predictions.append(dict(key=key, frame=frame_idx, raw=raw[b : b + 1], logits=logits[b : b + 1],
                                             mask=pred.masks[b], reverse=reverse, num_frames=num_frames,
                                             prompts=prompt))
            return pred

        monkeypatch.setattr(engine, "memorize", recorded_memorize)
        monkeypatch.setattr(engine, "predict", recorded_predict)
        monkeypatch.setattr(engine, "_fill_holes", recorded_fill_holes)


def _holes(background: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """8-connected background components (labels) and which of them sam2's post-processing fills (area <= 8)."""
    labels, n = ndimage.label(background, structure=np.ones((3, 3), int))
    small = (np.bincount(labels.ravel(), minlength=n + 1) <= FILL_HOLE_AREA) & (np.arange(n + 1) > 0)
    return labels, small


def tie_decided_holes(ours_raw: np.ndarray, sam2_raw: np.ndarray) -> np.ndarray:
    """Low-res pixels whose hole-filling decision a float tie may flip (2-D bool), given the logits before filling.

    A tie is a pixel on different sides of 0 in the two runs (`<= 0` is background) although its logits agree
    within TOLERANCE (checked separately), so it lies within TOLERANCE of 0. Only the background components that
    contain or 8-touch such a pixel can differ between the runs (adding a pixel merges its neighbours' components,
    removing one splits its component into pieces that each touch it); of those, the small ones (area <=
    FILL_HOLE_AREA, on either side) are holes whose filling the tie decides. Every other pixel is decided by the
    same components on both sides and must agree within TOLERANCE after filling.
    """
    tie = (ours_raw <= 0) != (sam2_raw <= 0)
    decided = np.zeros(tie.shape, bool)
    if not tie.any():
        return decided
    near = ndimage.binary_dilation(tie, structure=np.ones((3, 3), bool))
    for raw in (ours_raw, sam2_raw):
        labels, small = _holes(raw <= 0)
        touched = np.zeros_like(small)
        touched[np.unique(labels[near])] = True
        decided |= (small & touched)[labels]
    return decided


class Comparison:
    """Max |delta logit| and differing mask pixels of one case, over frames.

    Batching (our engine predicts up to `batch_size` frames at once; the predictor one) and the CPU's choice of
    kernels (threads, vector width, memory alignment) change logits in the last float bits (~1e-7). Three places
    where that may flip a result without any logit being wrong, each recognised strictly:

    1. the low-res logits before hole filling (the inputs to every later decision) must agree within TOLERANCE
       everywhere: no excuse there;
    2. hole filling: a pixel within TOLERANCE of 0 may be background in one run and not in the other, and so decide
       whether a small background region is a hole (filled with 0.1) or not (`tie_decided_holes`). Only the pixels
       of such tie-decided holes may differ after filling (by the fill value 0.1, each side being its own logit or
       0.1); every other filled logit must agree within TOLERANCE;
    3. the final mask: on a frame with a tie-decided hole, the predictor's final logits are rebuilt as the
       predictor computes them (bilinear upsampling of its filled logits, checked to reproduce its own output) but
       with our filling decision on the tie-decided holes. A final-mask pixel whose (rebuilt) logit lies within
       TOLERANCE of 0 may come out either way (bilinear upsampling cannot enlarge a difference); every other pixel
       must agree with ours.

    Pixels that differ by a tie (2 or 3) are counted apart and printed; the checks are not loosened anywhere else.
    """

    def __init__(self, case: str, seed) -> None:
        self.case, self.seed = case, seed
        self.max_draw = 0.0  # before hole filling, every pixel
        self.max_dlogit = 0.0  # after hole filling, every pixel but those of tie-decided holes
        self.pixels = 0
        self.ties = 0  # final-mask pixels that differ at a tie (|logit| <= TOLERANCE) or by a tie-decided hole
        self.tie_holes = 0  # low-res pixels of tie-decided holes filled in one run only
        self.frames = 0
        self.constant = 0

    def add(self, ours_raw, ours_logits, ours_mask, sam2: Sam2Frame) -> None:
        ours_mask = np.asarray(ours_mask, bool)
        assert ours_mask.shape == sam2.mask.shape
        o_raw, s_raw = (np.asarray(t.float().cpu())[0, 0] for t in (ours_raw, sam2.raw))
        o_fill, s_fill = (np.asarray(t.float().cpu())[0, 0] for t in (ours_logits, sam2.filled))
        self.max_draw = max(self.max_draw, float(np.abs(o_raw - s_raw).max()))
        decided = tie_decided_holes(o_raw, s_raw)
        dlogit = np.abs(o_fill - s_fill)
        self.max_dlogit = max(self.max_dlogit, float(dlogit[~decided].max(initial=0.0)))
        flipped = decided & (dlogit > TOLERANCE)
        reference, reference_logits = sam2.mask, sam2.mask_logits
        if flipped.any():
            for fill, raw in ((o_fill, o_raw), (s_fill, s_raw)):  # the decision is the only thing that differs
                assert np.all((fill[flipped] == raw[flipped]) | (fill[flipped] == np.float32(0.1))), self.case
            self.tie_holes += int(flipped.sum())
            # the predictor's output with our filling decision on the tie-decided holes: what ours must equal
            ours_decision = np.where(flipped, np.where(o_fill == o_raw, s_raw, o_fill), s_fill)
            reference_logits = self._rebuilt(sam2, ours_decision)
            reference = reference_logits > 0
        wrong = (ours_mask != reference) & (np.abs(reference_logits) > TOLERANCE)
        self.pixels += int(wrong.sum())
        self.ties += int(((ours_mask != sam2.mask) & ~wrong).sum())
        self.frames += 1
        self.constant += int(sam2.mask.all() or not sam2.mask.any())

    @staticmethod
    def _rebuilt(sam2: Sam2Frame, filled: np.ndarray) -> np.ndarray:
        """The predictor's final logits for other filled low-res logits: its own bilinear upsampling (checked)."""
        def upsample(low):
            low = torch.as_tensor(low, dtype=torch.float32).reshape(1, 1, *low.shape[-2:])
            return F.interpolate(low, size=sam2.mask.shape, mode="bilinear", align_corners=False)[0, 0].numpy()

        np.testing.assert_allclose(upsample(np.asarray(sam2.filled.float().cpu())), sam2.mask_logits, rtol=0,
                                   atol=1e-6)
        return upsample(filled)

    def check(self) -> None:
        print(f"ORACLE seed={self.seed} case={self.case}: max|dlogit|={self.max_dlogit:.3g} "
              f"(before hole filling {self.max_draw:.3g}) differing pixels={self.pixels} (+{self.ties} by float "
              f"ties; {self.tie_holes} low-res pixels of tie-decided holes) frames={self.frames} "
              f"constant masks={self.constant}")
        assert self.frames > 0
        assert self.max_draw <= TOLERANCE, f"{self.case}: max |delta logit| before hole filling {self.max_draw:.3g}"
        assert self.max_dlogit <= TOLERANCE, f"{self.case}: max |delta logit| {self.max_dlogit:.3g}"
        assert self.pixels == 0, f"{self.case}: {self.pixels} mask pixels differ"
        assert self.constant < self.frames, f"{self.case}: every mask is constant, the comparison says little"


# ------------------------------------------------------------------------------------------ data

@pytest.fixture(scope="module")
def ct_b(shared_dir):
    return read_volume(shared_dir / "data" / "abdomen-ct" / "ct-b" / "dicom")  # 20 slices


@pytest.fixture(scope="module")
def pair(ct_a, ct_b):
    """ct-a (support, cropped to the liver's middle) -> ct-b (query, cropped to 7 slices with liver)."""
    image, labels, structures = ct_a
    query = crop_slices(ct_b, *QUERY_SLICES)
    liver = next(s for s in structures if s.value == LIVER)
    support = SupportCase(crop_slices(image, 8, 22), crop_slices(labels, 8, 22), "ct-a")
    return query, support, liver


def _run(engine, pair, monkeypatch, **options):
    query, support, liver = pair
    recorder = Recorder(engine, monkeypatch)
    opts = SegmentOptions.from_flat(image_size=engine.image_size, device="cpu", untrained=True, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = segment(query, [support], [liver], opts, engine=engine)
    plan = SlicePlan.for_volume(query)
    final = plan.stack(result.labels.array) == LIVER
    return recorder, result, final


def _support_keys(recorder):
    return sorted((k for k in recorder.masks_of if k[0] == "support"), key=lambda k: k[2])


