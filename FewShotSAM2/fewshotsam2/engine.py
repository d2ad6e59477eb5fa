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

import logging
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Hashable, Iterable, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoints import CheckpointInfo, checkpoint_info, load_state_dict, resolve_checkpoint
from .errors import InputError

log = logging.getLogger(__name__)

FrameKey = Hashable
DEVICES = ("auto", "cuda", "mps", "cpu")
FEATURE_STORAGE = ("auto", "float32", "bfloat16")
# ImageNet statistics, as in sam2's own frame loader
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)
FILL_HOLE_AREA = 8  # sam2's video-predictor post-processing default (also the FS-MedSAM2 reference setting)


def pick_device(device: str = "auto") -> torch.device:
    if device not in DEVICES:
        raise InputError(f"unknown device '{device}': choose one of {', '.join(DEVICES)}")
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' was asked for but PyTorch sees no CUDA GPU (use --device cpu or auto)")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InputError("device 'mps' was asked for but it is not available (use --device cpu or auto)")
    return torch.device(device)


def _has_sam2_extension() -> bool:
    """Whether sam2's compiled CUDA extension (connected components for hole filling) is installed."""
    try:
        from sam2 import _C  # noqa: F401
    except ImportError:
        return False
    return True


def build_sam2_model(info: CheckpointInfo, image_size: int = 1024, device: str | torch.device = "cpu") -> torch.nn.Module:
    """SAM2 from the package's own config, with sam2's video post-processing settings, random weights."""
    if image_size % 32 != 0 or image_size < 64:
        raise InputError(f"image size must be a multiple of 32 and at least 64, got {image_size}")
    import sam2  # noqa: F401  (initialises hydra's config module)
    from hydra import compose
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

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
    cfg = compose(config_name=info.config, overrides=overrides)
    OmegaConf.resolve(cfg)
    model = instantiate(cfg.model, _recursive_=True)
    return model.to(device).eval()


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


class SAM2Engine:
    """SAM2 over in-memory 2D frames, with a per-run image-feature cache and an encoder-call counter."""

    def __init__(
        self,
        model: str = "tiny",
        version: str = "2.1",
        image_size: int = 1024,
        device: str = "auto",
        checkpoint: Optional[str] = None,
        untrained: bool = False,
        cache_dir: Optional[str] = None,
        batch_size: int = 8,
        fill_hole_area: int = FILL_HOLE_AREA,
        feature_storage: str = "auto",
    ) -> None:
        self.info = checkpoint_info(model, version)
        self.device = pick_device(device)
        self.image_size = int(image_size)
        self.batch_size = max(1, int(batch_size))
        self.fill_hole_area = fill_hole_area
        self.untrained = untrained
        if untrained and checkpoint is not None:
            raise InputError("--untrained and --checkpoint exclude each other")
        # random weights are drawn from a fixed seed so that untrained runs (tests, benchmarks) are reproducible
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.model = build_sam2_model(self.info, self.image_size, "cpu")
        if untrained:
            warnings.warn(
                "SAM2 runs with RANDOM WEIGHTS (--untrained): masks are meaningless; use this only to test plumbing",
                stacklevel=2,
            )
            self.checkpoint_path = None
        else:
            self.checkpoint_path = resolve_checkpoint(model, version, checkpoint, cache_dir)
            load_state_dict(self.model, self.checkpoint_path, self.info.key)
        self.model.to(self.device)
        # bf16 autocast on CUDA where the GPU supports it (as sam2's own examples); float32 elsewhere
        self._autocast = (
            self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        )
        self.encoder_calls = 0
        self.encode_seconds = 0.0
        self._frames: dict[FrameKey, np.ndarray] = {}
        self._features: dict[FrameKey, list[torch.Tensor]] = {}
        # feature cache storage (see set_feature_storage); `pinned` keys survive reset() and release()
        self.feature_dtype = torch.float32
        self.feature_device = self.device
        self.set_feature_storage(feature_storage)
        self.pinned: set[FrameKey] = set()
        self._use_once: set[FrameKey] = set()
        self._pos_enc: Optional[list[torch.Tensor]] = None
        self._feat_sizes: Optional[list[tuple[int, int]]] = None
        self._cuda_hole_filling = self.device.type == "cuda" and _has_sam2_extension()

    # ---------------------------------------------------------------- frames and features
    def set_feature_storage(self, storage: str = "auto", device: Optional[str | torch.device] = None) -> None:
        """How cached image features are stored: "float32", "bfloat16" or "auto"; on `device` (default: SAM2's).

        "auto" stores what the encoder computes: bfloat16 under CUDA autocast (as sam2's own predictor caches
        them, and no float32 copy), float32 on CPU and MPS, where float32 storage keeps the engine's logits
        bit-identical to sam2's predictor. bfloat16 halves the cache (features are cast back where used).
        Features stored before a change keep their old storage.
        """
        if storage not in FEATURE_STORAGE:
            raise InputError(f"unknown feature storage '{storage}': choose one of {', '.join(FEATURE_STORAGE)}")
        if storage == "auto":
            self.feature_dtype = torch.bfloat16 if self._autocast else torch.float32
        else:
            self.feature_dtype = torch.bfloat16 if storage == "bfloat16" else torch.float32
        self.feature_device = torch.device(device) if device is not None else self.device

    def feature_bytes_per_frame(self, dtype: Optional[torch.dtype] = None) -> int:
        """Bytes of one frame's cached features (all levels SAM2 reads) in `dtype` (default: the storage)."""
        s = self.image_size
        # levels at strides 4, 8, 16: channels after sam2's conv_s0 / conv_s1 (d_model/8, d_model/4) and d_model
        d = self.model.hidden_dim
        n = (d // 8) * (s // 4) ** 2 + (d // 4) * (s // 8) ** 2 + d * (s // 16) ** 2
        if not self.model.use_high_res_features_in_sam:
            n = d * (s // 16) ** 2
        return n * torch.empty((), dtype=dtype or self.feature_dtype).element_size()

    def reset(self) -> None:
        """Start a new run: forget frames, features (except pinned ones) and the encoder count."""
        for key in [k for k in self._frames if k not in self.pinned]:
            del self._frames[key]
        for key in [k for k in self._features if k not in self.pinned]:
            del self._features[key]
        self._use_once.clear()
        self.encoder_calls = 0
        self.encode_seconds = 0.0

    def pin(self, keys: Iterable[FrameKey]) -> None:
        """Keep these frames' features across reset() and release() (e.g. support slices reused across queries)."""
        self.pinned.update(keys)

    def unpin(self, keys: Iterable[FrameKey]) -> None:
        self.pinned.difference_update(keys)

    def release(self, keys: Iterable[FrameKey]) -> None:
        """Drop the cached features of frames no longer needed (pinned ones stay); they re-encode if used again."""
        for key in keys:
            if key not in self.pinned:
                self._features.pop(key, None)
                self._use_once.discard(key)

    def use_once(self, keys: Iterable[FrameKey]) -> None:
        """These frames will be read once more: drop their features right after that read."""
        self._use_once.update(k for k in keys if k not in self.pinned)

    @property
    def cached_feature_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for f in self._features.values() for t in f)

    def add_frames(self, frames: Mapping[FrameKey, np.ndarray]) -> None:
        """Register 2D float images in [0, 1] under keys; nothing is encoded until a frame is used."""
        for key, image in frames.items():
            image = np.asarray(image, dtype=np.float32)
            if image.ndim != 2:
                raise ValueError(f"frame {key!r} must be 2D, got shape {image.shape}")
            if key in self._frames and key in self._features and not np.array_equal(self._frames[key], image):
                del self._features[key]  # same key, new pixels: its features are stale
            self._frames[key] = image

    def frame_shape(self, key: FrameKey) -> tuple[int, int]:
        return self._frames[key].shape

    def _autocast_ctx(self):
        if self._autocast:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def _to_model_input(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        batch = []
        for image in images:
            t = torch.from_numpy(image)[None, None].to(self.device)
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
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            t0 = time.perf_counter()
            with self._autocast_ctx():
                out = self.model.forward_image(self._to_model_input([self._frames[k] for k in chunk]))
            levels = out["backbone_fpn"][-self.model.num_feature_levels :]
            if self._pos_enc is None:
                pos = out["vision_pos_enc"][-self.model.num_feature_levels :]
                self._pos_enc = [p[:1].float() for p in pos]  # identical for every frame of this size
                self._feat_sizes = [(p.shape[-2], p.shape[-1]) for p in pos]
            for i, key in enumerate(chunk):
                # clone: a view would keep the whole batch's tensor alive
                self._features[key] = [lvl[i : i + 1].to(self.feature_device, self.feature_dtype, copy=True)
                                       for lvl in levels]
            self.encoder_calls += len(chunk)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            self.encode_seconds += time.perf_counter() - t0
            if progress is not None:
                progress(min(start + len(chunk), len(todo)), len(todo))

    def _vision(self, keys: Sequence[FrameKey]):
        self.encode(keys)
        b = len(keys)
        # cast where used: float32 outside autocast (bf16 storage meeting float32 weights fails on CPU); under
        # autocast the stored dtype is what the encoder produced
        dtype = self.feature_dtype if self._autocast else torch.float32
        feats = [torch.cat([self._features[k][lvl] for k in keys]).to(self.device, dtype)
                 for lvl in range(len(self._pos_enc))]
        self.release([k for k in keys if k in self._use_once])
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
        """Conditioning memory of frames whose masks are known (support slices with their labels)."""
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
                run_mem_encoder=True,
            )
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
        memory = self._memory(out)
        logits = self._fill_holes(memory.pred_masks)
        masks = []
        for i, key in enumerate(keys):
            h, w = self._frames[key].shape
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
        # Memories are kept in float32: under autocast the memory encoder returns bf16, and bf16 memories
        # meeting float32 weights break memory attention on CPU (sam2 itself casts them to bf16 for storage).
        return Memory(
            out["maskmem_features"].float(),
            [p.float() for p in out["maskmem_pos_enc"]],
            out["obj_ptr"].float(),
            out["object_score_logits"].float(),
            out["pred_masks"].float(),
        )

    def _fill_holes(self, logits: torch.Tensor) -> torch.Tensor:
        """Fill background holes up to `fill_hole_area` low-res pixels, as sam2's post-processing does.

        sam2 does this with its CUDA extension; without it we use scipy on the CPU (same rule, 8-connectivity).
        """
        if self.fill_hole_area <= 0:
            return logits
        if self._cuda_hole_filling:
            from sam2.utils.misc import get_connected_components

            labels, areas = get_connected_components(logits <= 0)
            return torch.where((labels > 0) & (areas <= self.fill_hole_area), 0.1, logits)
        from scipy import ndimage

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
