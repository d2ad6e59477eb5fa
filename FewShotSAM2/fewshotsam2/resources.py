"""Peak memory and time of a run, estimated before any slice is encoded, and a clear refusal if it cannot fit.

The figures are rough (constants measured with SAM2.1 tiny on a 2-core CPU, docs/benchmarks.md) but the terms
are the ones that grow: the image encoder's activations (batch x image size^2), the cached image features
(slices kept x bytes per frame), per-slice arrays at the query's own resolution, and, for `reverse`, one mask
memory per query slice. The estimate also picks how cached features are stored when "auto" storage would not
be compact enough (bfloat16 on a CPU past FLOAT32_CACHE_LIMIT, the CPU when the GPU's free memory is small).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch

from .errors import InputError

log = logging.getLogger(__name__)

# Encoder + memory-attention activations per image in a batch, bytes per input pixel (float32; measured: RSS
# 1.46 / 2.16 / 4.72 GiB at 256 / 512 / 1024 px with batch 8 on the CPU).
ACTIVATION_BYTES_PER_PIXEL = 400
PROCESS_BASE_BYTES = 700 * 2**20  # Python, torch, sam2 and LPIPS imported, before the model's weights
# Seconds per slice at 1024 px on the 2-core development CPU, SAM2.1 tiny: image encoding and, per method, the
# memory-conditioned predictions of one slice (docs/benchmarks.md); other sizes scale with the pixel count.
ENCODE_SECONDS_1024 = 2.0
PREDICT_SECONDS_1024 = {"propagate": 1.5, "reverse": 2.5, "lpips": 0.9}
MODEL_COST = {"tiny": 1.0, "small": 1.3, "base_plus": 2.6, "large": 6.0}
CUDA_SPEEDUP = 40.0
# "auto" storage keeps float32 on the CPU (bit-identical to sam2's predictor) until the cache would pass this
FLOAT32_CACHE_LIMIT = 1 * 2**30


@dataclass
class ResourceEstimate:
    peak_ram_bytes: int
    peak_gpu_bytes: int  # 0 off CUDA
    seconds: float
    encoder_calls: int
    cached_feature_bytes: int
    feature_storage: Optional[tuple[str, str]] = None  # (dtype, device) chosen for the engine, None = keep
    # encode every query slice in range before the backends (batched, with its own progress) rather than on
    # first use: only when all their features fit FLOAT32_CACHE_LIMIT
    upfront: bool = True

    def describe(self) -> str:
        gb = 2**30
        gpu = f", GPU {self.peak_gpu_bytes / gb:.1f} GiB" if self.peak_gpu_bytes else ""
        return (f"estimate: {self.encoder_calls} slices to encode, peak memory ~{self.peak_ram_bytes / gb:.1f} GiB"
                f"{gpu}, ~{_duration(self.seconds)}")


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def available_ram_bytes() -> Optional[int]:
    """MemAvailable from /proc/meminfo (Linux), else None (then no check is made)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _process_rss_bytes() -> int:
    try:
        with open(f"/proc/{os.getpid()}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return PROCESS_BASE_BYTES


def estimate_resources(engine, method: str, feature_uses: int, n_slices: int, frame_shape: tuple,
                       n_structures: int = 1) -> ResourceEstimate:
    """Estimate a run of `method` over `n_slices` query slices (`feature_uses` slice visits over structures)."""
    s = engine.image_size
    cuda = engine.device.type == "cuda"
    batch = engine.batch_size
    act = ACTIVATION_BYTES_PER_PIXEL * s * s * batch // (2 if getattr(engine, "_autocast", False) else 1)
    per_frame32 = engine.feature_bytes_per_frame(torch.float32)
    # slices whose features stay cached at the peak: every slice of a range for reverse (read twice), else
    # only those a later structure reads again
    kept = n_slices if method == "reverse" else max(0, feature_uses - n_slices)
    kept = min(kept, n_slices) + batch
    storage = None
    dtype_bytes = engine.feature_bytes_per_frame()
    if engine.feature_dtype == torch.float32 and not cuda and kept * per_frame32 > FLOAT32_CACHE_LIMIT:
        storage = ("bfloat16", str(engine.feature_device))
        dtype_bytes = per_frame32 // 2
        log.info("feature cache past %.1f GiB in float32: stored as bfloat16", FLOAT32_CACHE_LIMIT / 2**30)
    cache = kept * dtype_bytes
    h, w = frame_shape
    # the query's slice stack (float32), label stack, forward masks and per-structure masks, at its own size
    per_slice_arrays = h * w * (4 + 2 + 1 + n_structures)
    mem_bytes = (engine.model.mem_dim * 2 * (s // 16) ** 2 + (s // 4) ** 2) * 4 if method == "reverse" else 0
    params = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    base = max(_process_rss_bytes(), PROCESS_BASE_BYTES)
    ram = base + n_slices * (per_slice_arrays + mem_bytes)
    gpu = 0
    if cuda:
        gpu = params + act + n_slices * mem_bytes
        free = torch.cuda.mem_get_info(engine.device)[0]
        if gpu + cache > 0.8 * free:
            storage = (storage[0] if storage else ("bfloat16" if engine.feature_dtype == torch.bfloat16
                                                    else "float32"), "cpu")
            ram += cache
        else:
            gpu += cache
    else:
        ram += act + cache  # the model's weights are already in the process's RSS
    pixel_factor = (s / 1024) ** 2
    per_slice = (ENCODE_SECONDS_1024 + PREDICT_SECONDS_1024.get(method, 2.0)) * pixel_factor
    seconds = feature_uses * per_slice * MODEL_COST.get(getattr(engine.info, "model", "tiny"), 1.0)
    if cuda:
        seconds /= CUDA_SPEEDUP
    upfront = n_slices * dtype_bytes <= FLOAT32_CACHE_LIMIT
    if upfront and method != "reverse":  # all of them stay cached until used
        extra = max(0, n_slices + batch - kept) * dtype_bytes
        cache += extra
        if cuda and storage is None:
            gpu += extra
        else:
            ram += extra
    return ResourceEstimate(int(ram), int(gpu), float(seconds), int(feature_uses if method != "reverse"
                                                                     else n_slices), int(cache), storage, upfront)


def check_resources(estimate: ResourceEstimate, engine) -> None:
    """Refuse, with the ways out, a run that will not fit in RAM or in the GPU's free memory."""
    log.info(estimate.describe())
    gb = 2**30
    options = ("a smaller --image-size (memory falls with its square), a narrower --slice-range, "
               "or --device cpu" if engine.device.type == "cuda" else
               "a smaller --image-size (memory falls with its square), a narrower --slice-range, "
               "or a smaller --batch-size")
    if engine.device.type == "cuda":
        free = torch.cuda.mem_get_info(engine.device)[0]
        if estimate.peak_gpu_bytes > free:
            raise InputError(f"this run needs ~{estimate.peak_gpu_bytes / gb:.1f} GiB of GPU memory but "
                             f"{free / gb:.1f} GiB are free: use {options}")
    available = available_ram_bytes()
    if available is not None:
        needed = estimate.peak_ram_bytes - _process_rss_bytes()  # what is already resident is not needed again
        if needed > available:
            raise InputError(f"this run needs ~{estimate.peak_ram_bytes / gb:.1f} GiB of memory but "
                             f"{available / gb:.1f} GiB are available: use {options}")
