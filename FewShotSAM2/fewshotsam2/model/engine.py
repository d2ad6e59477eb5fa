"""SAM2 as a slice engine: frames from memory, each encoded once, memories the backends can arrange freely.

`sam2`'s video predictor reads JPEG folders and keeps one frame's features. Few-shot segmentation needs more
control: the same support memories condition every query slice, a query slice's prediction becomes a memory that
predicts the supports back, and slices are visited in orders the video predictor does not know. So this engine
drives `SAM2Base.track_step` directly with an explicit memory bank (`cond` and `recent` dicts of frame index ->
`Memory`), the way `sam2`'s own predictor does internally, and caches every frame's image features for the run.

Batching: predictions that share their memory (every query slice against the same supports) run as one batch;
memories of batch 1 are expanded to the batch.
"""

from __future__ import annotations

import hashlib
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Hashable, Iterable, Mapping, Optional, Sequence

import numpy as np
import sam2  # noqa: F401  (initialises hydra's config module, which build_sam2_model composes from)
import torch
import torch.nn.functional as F
from hydra import compose
from hydra.utils import instantiate
from omegaconf import OmegaConf
from sam2.utils import misc as sam2_misc  # looked up at each call: the oracle tests patch get_connected_components
from scipy import ndimage

from fewshotsam2 import constants
from fewshotsam2.model.checkpoints import CheckpointInfo, checkpoint_info, load_state_dict, resolve_checkpoint
from fewshotsam2.constants import DEFAULT_IMAGE_SIZE
from fewshotsam2.model.device import pick_device  # noqa: F401  (re-exported: engine.pick_device)
from fewshotsam2.errors import InputError

if TYPE_CHECKING:
    from fewshotsam2.options import SegmentOptions

FrameKey = Hashable
DEVICES = constants.DEVICES
FEATURE_STORAGE = ("auto", "float32", "bfloat16")
# ImageNet statistics, as in sam2's own frame loader
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)
FILL_HOLE_AREA = 8  # sam2's video-predictor post-processing default (also the FS-MedSAM2 reference setting)


def _has_sam2_extension() -> bool:
    """Whether sam2's compiled CUDA extension (connected components for hole filling) is installed."""
    try:
        from sam2 import _C  # noqa: F401  (optional: only a CUDA build of sam2 has it)
    except ImportError:
        return False
    return True


def build_sam2_model(info: CheckpointInfo, image_size: int = 1024, device: str | torch.device = "cpu") -> torch.nn.Module:
    """SAM2 from the package's own config, with sam2's video post-processing settings, random weights."""
    if image_size % 32 != 0 or image_size < 64:
        raise InputError(f"image size must be a multiple of 32 and at least 64, got {image_size}")
    overrides = [
        "++model._target_=sam2.sam2_video_predictor.SAM2VideoPredictor",
        f"++model.image_size={image_size}",
        # the same post-processing as sam2.build_sam.build_sam2_video_predictor(apply_postprocessing=True)
        "++model.sam_mask_decoder_extra_args.dynamic_multimask_via_stability=true",
        "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_delta=0.05",
        "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_thresh=0.98",
        "++model.binarize_mask_from_pts_for_mem_enc=true",
        "++model.fill_hole_area=0",  # done by this engine, with a CPU fallback
    ]
    if info.rope_follows_image_size:  # MedSAM2's config: the RoPE grid is the stride-16 feature grid
        side = image_size // 16
        overrides += [f"model.memory_attention.layer.{a}.feat_sizes=[{side},{side}]"
                      for a in ("self_attention", "cross_attention")]
    overrides += list(info.overrides)
    try:
        cfg = compose(config_name=info.config, overrides=overrides)
    except Exception as exc:  # hydra: an override naming a key the config lacks, a bad value
        text = " ".join(str(exc).split()) or type(exc).__name__
        raise InputError(f"--config {info.config}: {text[:300]}") from None
    OmegaConf.resolve(cfg)
    model = instantiate(cfg.model, _recursive_=True)
    return model.to(device).eval()


def _build_seeded(info: CheckpointInfo, image_size: int) -> torch.nn.Module:
    # random weights from a fixed seed, without disturbing the caller's random state
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build_sam2_model(info, image_size, "cpu")


@dataclass
class Memory:
    """What SAM2 keeps of frames whose mask is known or predicted (batch B along dim 0)."""

    maskmem_features: torch.Tensor  # (B, C_mem, h, w)
    maskmem_pos_enc: list[torch.Tensor]
    obj_ptr: torch.Tensor  # (B, C)
    object_score_logits: torch.Tensor  # (B, 1)
    pred_masks: torch.Tensor  # (B, 1, S/4, S/4) low-resolution logits

    @property
    def batch(self) -> int:
        return self.obj_ptr.shape[0]

    def as_output(self, batch: int) -> dict:
        """The dict `SAM2Base` reads from its memory bank, expanded to `batch` when this holds one frame."""
        if self.batch == batch:
            m = self
        elif self.batch == 1:
            m = Memory(
                self.maskmem_features.expand(batch, -1, -1, -1),
                [p.expand(batch, -1, -1, -1) for p in self.maskmem_pos_enc],
                self.obj_ptr.expand(batch, -1),
                self.object_score_logits.expand(batch, -1),
                self.pred_masks.expand(batch, -1, -1, -1),
            )
        else:
            raise ValueError(f"memory of batch {self.batch} cannot serve a batch of {batch}")
        return {
            "maskmem_features": m.maskmem_features,
            "maskmem_pos_enc": m.maskmem_pos_enc,
            "obj_ptr": m.obj_ptr,
            "object_score_logits": m.object_score_logits,
            "pred_masks": m.pred_masks,
        }

    def select(self, index: int | Sequence[int]) -> "Memory":
        idx = [index] if isinstance(index, int) else list(index)
        return Memory(
            self.maskmem_features[idx],
            [p[idx] for p in self.maskmem_pos_enc],
            self.obj_ptr[idx],
            self.object_score_logits[idx],
            self.pred_masks[idx],
        )

    @staticmethod
    def cat(memories: Sequence["Memory"]) -> "Memory":
        return Memory(
            torch.cat([m.maskmem_features for m in memories]),
            [torch.cat(ps) for ps in zip(*[m.maskmem_pos_enc for m in memories])],
            torch.cat([m.obj_ptr for m in memories]),
            torch.cat([m.object_score_logits for m in memories]),
            torch.cat([m.pred_masks for m in memories]),
        )


@dataclass
class Prediction:
    masks: list[np.ndarray]  # per frame, bool at the frame's own size
    memory: Memory  # batch = number of frames predicted


class _StackSlice:
    """Slice `index` of a stack, read when used (`np.asarray`)."""

    __slots__ = ("stack", "index")

    def __init__(self, stack, index: int) -> None:
        self.stack, self.index = stack, index

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.stack.shape[1:])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        image = np.asarray(self.stack[self.index])
        return image if dtype is None else image.astype(dtype, copy=False)


class SAM2Engine:
    """SAM2 over in-memory 2D frames, with a per-run image-feature cache and an encoder-call counter.

    Building, downloading and loading are separate steps, and `__init__` does none of them (no network, no file):
    it wraps a SAM2 model that is already built and loaded. Make one with

    * `SAM2Engine.from_pretrained(model, version, ...)`: an official checkpoint (downloaded into the cache on
      first use unless `download=False`) or a local `checkpoint` file, loaded strictly;
    * `SAM2Engine.with_random_weights(model, version, ...)`: random weights from a fixed seed, for tests and
      benchmarks of the plumbing (the masks mean nothing);
    * `SAM2Engine.from_options(options)`: either of the above from a `SegmentOptions`.
    """

    def __init__(
        self,
        sam2_model: torch.nn.Module,
        info: CheckpointInfo,
        image_size: int,
        device: str | torch.device = "cpu",
        batch_size: int = 8,
        fill_hole_area: int = FILL_HOLE_AREA,
        checkpoint_path: Optional[Path] = None,
    ) -> None:
        if not isinstance(sam2_model, torch.nn.Module):
            raise TypeError("SAM2Engine wraps a built SAM2 model: use SAM2Engine.from_pretrained(...) or "
                            "SAM2Engine.with_random_weights(...)")
        self.info = info
        self.device = pick_device(device) if isinstance(device, str) else device
        self.image_size = int(image_size)
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        # the image encoder's batch: on a CPU one image at a time is the fastest (measured at 512 px, SAM2.1 tiny,
        # 2 cores: 0.45 s per image alone, 0.56 in pairs, 0.69 in eights) and the leanest (activations ~400 bytes
        # per input pixel and image: 0.4 GB at 1024 px alone, 2.5 GB in eights)
        self.encode_batch_size = self.batch_size if self.device.type == "cuda" else 1
        # bytes of features a method keeps between passes (None: no limit); set per run from the resource estimate
        self.feature_budget: Optional[int] = None
        self.fill_hole_area = fill_hole_area
        self.checkpoint_path = checkpoint_path
        self.untrained = checkpoint_path is None
        self.model = sam2_model.to(self.device).eval()
        # bf16 autocast on CUDA where the GPU computes in bf16 natively (Ampere and later), as sam2's own examples;
        # float32 elsewhere (emulated bf16 on older GPUs is slower than float32)
        self._autocast = self.device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
        self.encoder_calls = 0
        self.encode_seconds = 0.0
        self._frames: dict[FrameKey, np.ndarray | _StackSlice] = {}
        self._features: dict[FrameKey, list[torch.Tensor]] = {}
        self._pos_enc: Optional[list[torch.Tensor]] = None
        self._feat_sizes: Optional[list[tuple[int, int]]] = None
        self._cuda_hole_filling = self.device.type == "cuda" and _has_sam2_extension()
        # features kept across runs (see keep_features), by pixel content: {digest: features}
        self._keep: Optional[Callable[[FrameKey], bool]] = None
        self._kept: dict[bytes, list[torch.Tensor]] = {}
        # feature cache storage (set_feature_storage) and frames whose features go after their next read
        self.feature_dtype = torch.float32
        self.feature_device = self.device
        self.set_feature_storage("auto")
        self._use_once: set[FrameKey] = set()
        self._keep_if_room: set[FrameKey] = set()
        # features on disk across runs and processes (feature_cache.FeatureCache; None: off), and its hits this run
        self.feature_cache = None
        self.cache_hits = 0

    @classmethod
    def with_random_weights(
        cls,
        model: str = "tiny",
        version: str = "2.1",
        image_size: int = DEFAULT_IMAGE_SIZE,
        device: str = "auto",
        batch_size: int = 8,
        fill_hole_area: int = FILL_HOLE_AREA,
        config: Optional[str] = None,
    ) -> "SAM2Engine":
        """SAM2 with random weights drawn from a fixed seed, so untrained runs (tests, benchmarks) are
        reproducible. Warns: the masks are meaningless."""
        info = checkpoint_info(model, version, config)
        torch_device = pick_device(device)
        warnings.warn(
            "SAM2 runs with RANDOM WEIGHTS (--untrained): masks are meaningless; use this only to test plumbing",
            stacklevel=2,
        )
        return cls(_build_seeded(info, image_size), info, image_size, torch_device, batch_size, fill_hole_area)

    @classmethod
    def from_pretrained(
        cls,
        model: str = "tiny",
        version: str = "2.1",
        image_size: int = DEFAULT_IMAGE_SIZE,
        device: str = "auto",
        checkpoint: Optional[str | Path] = None,
        cache_dir: Optional[str | Path] = None,
        batch_size: int = 8,
        download: bool = True,
        fill_hole_area: int = FILL_HOLE_AREA,
        config: Optional[str] = None,
    ) -> "SAM2Engine":
        """SAM2 with trained weights: `checkpoint` if given, else the official checkpoint from the cache,
        downloaded first when missing (unless `download=False`, which raises `InputError` instead).
        `config` (`NAME[,KEY=VALUE...]`, see `models.parse_config`) builds a fine-tune given as `checkpoint`."""
        if config and checkpoint is None:
            raise InputError("--config builds a fine-tune from its own file: give it with --checkpoint FILE")
        info = checkpoint_info(model, version, config, checkpoint)
        torch_device = pick_device(device)  # a wrong device fails before a download
        path = resolve_checkpoint(model, version, checkpoint, cache_dir, download=download)
        net = build_sam2_model(info, image_size, "cpu")
        load_state_dict(net, path, info.key)
        return cls(net, info, image_size, torch_device, batch_size, fill_hole_area, checkpoint_path=path)

    @classmethod
    def from_options(cls, options: "SegmentOptions") -> "SAM2Engine":
        """The engine a `SegmentOptions` asks for (random weights when `options.untrained`)."""
        if options.untrained:
            return cls.with_random_weights(options.model, options.version, options.image_size, options.device,
                                           options.batch_size, config=options.config)
        return cls.from_pretrained(options.model, options.version, options.image_size, options.device,
                                   options.checkpoint, options.cache_dir, options.batch_size, config=options.config)

    # ---------------------------------------------------------------- frames and features
    def reset(self) -> None:
        """Start a new run: forget frames, features and the encoder count."""
        self._frames.clear()
        self._features.clear()
        self._use_once.clear()
        self._keep_if_room.clear()
        self.encoder_calls = 0
        self.encode_seconds = 0.0
        self.cache_hits = 0

    def set_feature_storage(self, storage: str = "auto", device: Optional[str | torch.device] = None) -> None:
        """How cached image features are stored: "float32", "bfloat16" or "auto"; on `device` (default: SAM2's).

        "auto" stores what the encoder computes: bfloat16 under CUDA autocast (as sam2's own predictor caches
        them; no float32 copy), float32 on CPU and MPS, where float32 storage keeps the logits identical to sam2's
        predictor. bfloat16 halves the cache; features are cast back where they are used. Features stored before
        a change keep their old storage.
        """
        if storage not in FEATURE_STORAGE:
            raise InputError(f"unknown feature storage '{storage}': choose one of {', '.join(FEATURE_STORAGE)}")
        if storage == "auto":
            self.feature_dtype = torch.bfloat16 if self._autocast else torch.float32
        else:
            self.feature_dtype = torch.bfloat16 if storage == "bfloat16" else torch.float32
        self.feature_device = torch.device(device) if device is not None else self.device

    def feature_bytes_per_frame(self, dtype: Optional[torch.dtype] = None) -> int:
        """Bytes of one frame's cached features (every level SAM2 reads) in `dtype` (default: the storage)."""
        s, d = self.image_size, self.model.hidden_dim
        if self.model.use_high_res_features_in_sam:
            # strides 4, 8, 16: channels after sam2's conv_s0 / conv_s1 (d/8, d/4), then d
            n = (d // 8) * (s // 4) ** 2 + (d // 4) * (s // 8) ** 2 + d * (s // 16) ** 2
        else:
            n = d * (s // 16) ** 2
        return n * torch.empty((), dtype=dtype or self.feature_dtype).element_size()

    def release(self, keys: Iterable[FrameKey]) -> None:
        """Drop the cached features of frames no longer needed (they are encoded again if used again)."""
        for key in keys:
            self._features.pop(key, None)
            self._use_once.discard(key)
            self._keep_if_room.discard(key)

    def use_once(self, keys: Iterable[FrameKey]) -> None:
        """These frames will be read once more: drop their features right after that read."""
        self._use_once.update(keys)

    def keep_if_room(self, keys: Iterable[FrameKey]) -> None:
        """These frames are read again later: keep their features while the cache is within `feature_budget`,
        else drop them right after a read (they are encoded again when read again)."""
        self._keep_if_room.update(keys)

    def over_feature_budget(self) -> bool:
        """True when the cached features pass `feature_budget`: features read again later should be dropped
        (and encoded again when read) rather than kept."""
        return self.feature_budget is not None and self.cached_feature_bytes > self.feature_budget

    @property
    def cached_feature_bytes(self) -> int:
        """Bytes of the features cached for this run (kept-across-runs copies not counted)."""
        return sum(t.numel() * t.element_size() for f in self._features.values() for t in f)

    def keep_features(self, which: Optional[Callable[[FrameKey], bool]]) -> None:
        """Keep the features of the frames `which(key)` selects across `reset()`, found again by pixel content.

        For cohorts (`fewshotsam2 batch`): the support slices are the same for every query, so they are encoded
        for the first query only. Content, not key, identifies a kept frame: keys are per-run names (a support's
        position in the run's list), and a frame with other pixels must not get stale features.
        `None` stops keeping and forgets what was kept.
        """
        self._keep = which
        if which is None:
            self._kept.clear()

    def _image(self, key: FrameKey) -> np.ndarray:
        return np.asarray(self._frames[key], dtype=np.float32)

    def _content_digest(self, key: FrameKey) -> bytes:
        image = self._image(key)
        return hashlib.blake2b(repr(image.shape).encode() + image.tobytes(), digest_size=16).digest()

    def add_frames(self, frames: Mapping[FrameKey, np.ndarray]) -> None:
        """Register 2D float images in [0, 1] under keys; nothing is encoded until a frame is used."""
        for key, image in frames.items():
            image = np.asarray(image, dtype=np.float32)
            if image.ndim != 2:
                raise ValueError(f"frame {key!r} must be 2D, got shape {image.shape}")
            if key in self._frames and key in self._features and not np.array_equal(self._frames[key], image):
                del self._features[key]  # same key, new pixels: its features are stale
            self._frames[key] = image

    def add_stack(self, keys: Sequence[FrameKey], stack) -> None:
        """Register the slices of an (n, h, w) stack, a float array in [0, 1] or a lazy `SliceStack`, under `keys`
        (one per slice). A slice is read from the stack only when it is encoded: the engine holds no copy."""
        if len(keys) != len(stack):
            raise ValueError(f"{len(keys)} keys for a stack of {len(stack)} slices")
        for i, key in enumerate(keys):
            frame = _StackSlice(stack, i)
            if key in self._frames and key in self._features and not np.array_equal(self._frames[key], frame):
                del self._features[key]  # same key, new pixels: its features are stale
            self._frames[key] = frame

    def _autocast_ctx(self):
        if self._autocast:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def _to_model_input(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        batch = []
        for image in images:
            t = torch.from_numpy(np.asarray(image, dtype=np.float32))[None, None].to(self.device)
            t = F.interpolate(t, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
            batch.append(t)
        x = torch.cat(batch).expand(-1, 3, -1, -1)
        mean = torch.tensor(_MEAN, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(_STD, device=self.device).view(1, 3, 1, 1)
        return (x - mean) / std

    @torch.inference_mode()
    def encode(self, keys: Iterable[FrameKey], progress=None) -> None:
        """Run the image encoder on every key not encoded yet in this run, in batches."""
        todo = [k for k in dict.fromkeys(keys) if k not in self._features]
        if self._keep is not None:
            for k in todo:
                kept = self._kept.get(self._content_digest(k)) if self._keep(k) else None
                if kept is not None:
                    self._features[k] = kept
            todo = [k for k in todo if k not in self._features]
        if self.feature_cache is not None and todo:
            todo = self.feature_cache.fill(self, todo)  # what an earlier run (or process) encoded
        step = min(self.encode_batch_size, self.batch_size)
        for start in range(0, len(todo), step):
            chunk = todo[start : start + step]
            t0 = time.perf_counter()
            with self._autocast_ctx():
                out = self.model.forward_image(self._to_model_input([self._image(k) for k in chunk]))
            levels = out["backbone_fpn"][-self.model.num_feature_levels :]
            if self._pos_enc is None:
                pos = out["vision_pos_enc"][-self.model.num_feature_levels :]
                self._pos_enc = [p[:1].float() for p in pos]  # identical for every frame of this size
                self._feat_sizes = [(p.shape[-2], p.shape[-1]) for p in pos]
            for i, key in enumerate(chunk):
                # a copy in the storage dtype: a view of the batch tensor would keep the whole batch alive
                self._features[key] = [lvl[i : i + 1].to(self.feature_device, self.feature_dtype, copy=True)
                                       for lvl in levels]
                if self.feature_cache is not None:  # stored on disk; the run uses what a later run will read
                    self._features[key] = self.feature_cache.put(self, key, self._features[key])
                if self._keep is not None and self._keep(key):
                    self._kept[self._content_digest(key)] = self._features[key]  # already a copy, never changed
            self.encoder_calls += len(chunk)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            self.encode_seconds += time.perf_counter() - t0
            if progress is not None:
                progress(min(start + len(chunk), len(todo)), len(todo))

    def _vision(self, keys: Sequence[FrameKey]):
        self.encode(keys)
        b = len(keys)
        # cast where used: float32 outside autocast (bf16 features meeting float32 weights fail on the CPU); under
        # autocast the stored dtype is what the encoder produced
        dtype = self.feature_dtype if self._autocast else torch.float32
        feats = [torch.cat([self._features[k][lvl] for k in keys]).to(self.device, dtype)
                 for lvl in range(len(self._pos_enc))]
        if self._use_once or self._keep_if_room:
            drop = [k for k in keys if k in self._use_once]
            if self._keep_if_room and self.over_feature_budget():
                drop += [k for k in keys if k in self._keep_if_room]
            self.release(drop)
        vision_feats = [f.flatten(2).permute(2, 0, 1) for f in feats]
        pos = [p.expand(b, -1, -1, -1).flatten(2).permute(2, 0, 1) for p in self._pos_enc]
        return vision_feats, pos, self._feat_sizes

    # ---------------------------------------------------------------- memories and predictions
    def _mask_input(self, masks: Sequence[np.ndarray]) -> torch.Tensor:
        # as sam2's add_new_mask: resize to the model's input size, anti-aliased, then threshold at 0.5
        out = []
        for m in masks:
            t = torch.from_numpy(np.asarray(m, dtype=np.float32))[None, None].to(self.device)
            t = F.interpolate(t, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False,
                              antialias=True)
            out.append((t >= 0.5).float())
        return torch.cat(out)

    @torch.inference_mode()
    def memorize(self, keys: Sequence[FrameKey], masks: Sequence[np.ndarray]) -> Memory:
        """Conditioning memory of frames whose masks are known, encoded exactly as sam2's `add_new_mask` does.

        sam2 (video predictor: `add_new_mask`, then `propagate_in_video_preflight`): the mask prompt goes through
        `track_step` without the memory encoder, giving low-resolution mask logits (the mask as +-10, downsampled
        with anti-aliasing), an object pointer and an object score; the logits are hole-filled, upsampled
        bilinearly to the model's input size and encoded as a mask from a user prompt (binarised).
        """
        vision_feats, pos, sizes = self._vision(list(keys))
        with self._autocast_ctx():
            out = self.model.track_step(
                frame_idx=0,
                is_init_cond_frame=True,
                current_vision_feats=vision_feats,
                current_vision_pos_embeds=pos,
                feat_sizes=sizes,
                point_inputs=None,
                mask_inputs=self._mask_input(masks),
                output_dict={"cond_frame_outputs": {}, "non_cond_frame_outputs": {}},
                num_frames=1,
                run_mem_encoder=False,
            )
            low_res = self._fill_holes(out["pred_masks"])
            high_res = F.interpolate(low_res, size=(self.image_size, self.image_size), mode="bilinear",
                                     align_corners=False)
            out["maskmem_features"], out["maskmem_pos_enc"] = self.model._encode_new_memory(
                current_vision_feats=vision_feats,
                feat_sizes=sizes,
                pred_masks_high_res=high_res,
                object_score_logits=out["object_score_logits"],
                is_mask_from_pts=True,
            )
        out["pred_masks"] = low_res
        return self._memory(out)

    @torch.inference_mode()
    def predict(
        self,
        keys: Sequence[FrameKey],
        frame_idx: int,
        cond: Mapping[int, Memory],
        recent: Optional[Mapping[int, Memory]] = None,
        num_frames: Optional[int] = None,
        reverse: bool = False,
    ) -> Prediction:
        """Predict the masks of `keys` (one batch) at timeline position `frame_idx`.

        `cond` holds conditioning memories (always attended to), `recent` the non-conditioning memories SAM2
        picks by distance to `frame_idx` (its FIFO of the last `num_maskmem - 1` frames). Positions are virtual
        frame indices: backends place supports and query slices on one timeline.
        """
        keys = list(keys)
        b = len(keys)
        if not cond:
            raise ValueError("a prediction needs at least one conditioning memory")
        output_dict = {
            "cond_frame_outputs": {t: m.as_output(b) for t, m in cond.items()},
            "non_cond_frame_outputs": {t: m.as_output(b) for t, m in (recent or {}).items()},
        }
        if num_frames is None:
            everything = list(cond) + list(recent or {}) + [frame_idx]
            num_frames = max(everything) - min(0, min(everything)) + 1
        vision_feats, pos, sizes = self._vision(keys)
        with self._autocast_ctx():
            out = self.model.track_step(
                frame_idx=frame_idx,
                is_init_cond_frame=False,
                current_vision_feats=vision_feats,
                current_vision_pos_embeds=pos,
                feat_sizes=sizes,
                point_inputs=None,
                mask_inputs=None,
                output_dict=output_dict,
                num_frames=num_frames,
                track_in_reverse=reverse,
                run_mem_encoder=True,
            )
        out["pred_masks"] = logits = self._fill_holes(out["pred_masks"])  # the logits sam2's predictor keeps
        memory = self._memory(out)
        masks = []
        for i, key in enumerate(keys):
            h, w = self._frames[key].shape[-2:]
            up = F.interpolate(logits[i : i + 1], size=(h, w), mode="bilinear", align_corners=False)
            masks.append((up[0, 0] > 0).cpu().numpy())
        return Prediction(masks, memory)

    def predict_batched(
        self,
        keys: Sequence[FrameKey],
        frame_idx: int,
        cond: Mapping[int, Memory],
        num_frames: Optional[int] = None,
    ) -> Prediction:
        """`predict` over many frames that share one memory bank, in chunks of the engine's batch size."""
        parts = [
            self.predict(keys[s : s + self.batch_size], frame_idx, cond, num_frames=num_frames)
            for s in range(0, len(keys), self.batch_size)
        ]
        return Prediction([m for p in parts for m in p.masks], Memory.cat([p.memory for p in parts]))

    def _memory(self, out: dict) -> Memory:
        # What sam2's video predictor stores of a frame: memory features in bf16 (on every device: they are the
        # bulk of a memory bank; the memory attention reads them promoted to the dtype of the object pointers
        # they are concatenated with), the rest as the model returned it.
        return Memory(
            out["maskmem_features"].to(torch.bfloat16),
            list(out["maskmem_pos_enc"]),
            out["obj_ptr"],
            out["object_score_logits"],
            out["pred_masks"].float(),
        )

    @property
    def memory_reach(self) -> int:
        """How many frames back (in visiting order) SAM2 can still read a non-conditioning memory.

        Mask memories: the last `num_maskmem - 1` frames, taken every `memory_temporal_stride_for_eval`-th frame
        (an upper bound: `(num_maskmem - 1) * stride + 1`); object pointers: up to `max_obj_ptrs_in_encoder - 1`
        frames back. Older predictions are never read again and can be dropped.
        """
        m = self.model
        masks = (m.num_maskmem - 1) * m.memory_temporal_stride_for_eval + 1 if m.num_maskmem > 0 else 0
        pointers = m.max_obj_ptrs_in_encoder - 1 if m.use_obj_ptrs_in_encoder else 0
        return max(1, masks, pointers)

    def _fill_holes(self, logits: torch.Tensor) -> torch.Tensor:
        """Fill background holes up to `fill_hole_area` low-res pixels, as sam2's post-processing does.

        sam2 does this with its CUDA extension; without it we use scipy on the CPU (same rule, 8-connectivity).
        """
        if self.fill_hole_area <= 0:
            return logits
        if self._cuda_hole_filling:
            labels, areas = sam2_misc.get_connected_components(logits <= 0)
            return torch.where((labels > 0) & (areas <= self.fill_hole_area), 0.1, logits)
        filled = logits.clone()
        bg = (logits <= 0).cpu().numpy()
        for i in range(bg.shape[0]):
            lab, n = ndimage.label(bg[i, 0], structure=np.ones((3, 3)))
            if n == 0:
                continue
            sizes = np.bincount(lab.ravel())
            small = (sizes <= self.fill_hole_area) & (np.arange(n + 1) > 0)
            hole = torch.from_numpy(small[lab]).to(logits.device)
            filled[i, 0] = torch.where(hole, torch.tensor(0.1, device=logits.device), logits[i, 0])
        return filled
