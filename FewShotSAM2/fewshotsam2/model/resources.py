"""Peak memory and time of a run, estimated before any slice is encoded, and a clear refusal if it cannot fit.

The figures are rough (constants measured with SAM2.1 tiny on a 2-core CPU, docs/benchmarks.md) but the terms
are the ones that grow: the image encoder's activations (batch x image size^2), the cached image features
(slices kept x bytes per frame), per-slice arrays at the query's own resolution, and, for `reverse`, one mask
memory per query slice. The estimate also chooses how the run holds its features: storage (bfloat16 on a CPU when
float32 would pass the feature budget, the CPU when the GPU's free memory is small), the prediction batch (capped
by an activation budget on a CPU), how many features are kept between passes (a budget on a CPU: past it, slices
are encoded again), and whether slices are encoded up front (on a GPU only).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch

from fewshotsam2.environment import feature_cache_mb
from fewshotsam2.errors import InputError

log = logging.getLogger(__name__)

# Peak activations per image of a batch, bytes per input pixel, float32 on the CPU (SAM2.1 tiny, measured with
# `python -m fewshotsam2.research.bench_memory`-style probes: one 1024 px image adds 470 MB to the RSS while it is
# encoded, eight add 2.5 GB; one memory-conditioned prediction with seven memories adds ~170 MB at 1024 px).
ENCODER_BYTES_PER_PIXEL = 400
PREDICT_BYTES_PER_PIXEL = 160
PROCESS_BASE_BYTES = 700 * 2**20  # Python, torch, sam2 and LPIPS imported, before the model's weights
# Memory attention over SAM2's memory bank: its score matrix grows with the 4th power of the image size (query
# tokens x memory tokens); at 1024 px this is what the 300-slice CT's peaks held beyond the other terms.
ATTENTION_BYTES_1024 = 650 * 2**20
LPIPS_BYTES = 300 * 2**20  # lpips: the LPIPS network and the augmented support set (300-slice CT at 512 px)
# Seconds per slice at 1024 px on the 2-core development CPU, SAM2.1 tiny, measured on the 300-slice CT
# (docs/benchmarks.md): image encoding and, per method, the memory-conditioned predictions of one slice. Smaller
# sizes cost less than their pixel count says (1024 -> 512 px: encoding /7, predictions /6.5 to /13.5): the
# exponents of the image side below fit both sizes.
ENCODE_SECONDS_1024 = 3.0
PREDICT_SECONDS_1024 = {"propagate": 4.2, "reverse": 7.1, "lpips": 1.2}
ENCODE_SIZE_EXPONENT = 2.85
PREDICT_SIZE_EXPONENT = 3.2
MODEL_COST = {"tiny": 1.0, "small": 1.3, "base_plus": 2.6, "large": 6.0}
CUDA_SPEEDUP = 40.0
# On the CPU, predictions are batched only as far as their activations stay within this (batching buys little
# there; the encoder itself runs one image at a time, see SAM2Engine.encode_batch_size).
CPU_ACTIVATION_BUDGET = 512 * 2**20
# Image features kept between passes on the CPU (reverse's forward/reverse step and its self-propagation, a slice
# two structures share): past this, the rest are encoded again when read again. 256 MiB holds 64 slices at
# 1024 px or 128 at 512 (bfloat16). FEWSHOTSAM2_FEATURE_CACHE_MB overrides it (benchmarks of the trade-off).
CPU_FEATURE_CACHE_BYTES = 256 * 2**20
FEATURE_CACHE_ENV = "FEWSHOTSAM2_FEATURE_CACHE_MB"


@dataclass
class ResourceEstimate:
    peak_ram_bytes: int
    peak_gpu_bytes: int  # 0 off CUDA
    seconds: float
    encoder_calls: int
    cached_feature_bytes: int
    feature_storage: Optional[tuple[str, str]] = None  # (dtype, device) chosen for the engine, None = keep
    # encode every query slice in range before the backends (batched, with its own progress) rather than on
    # first use: on a GPU, when all their features fit its memory
    upfront: bool = True
    batch_size: int = 8  # predictions per batch for this run (the engine's, capped on the CPU)
    feature_budget: Optional[int] = None  # bytes of features kept between passes (None: no limit)

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


def cpu_feature_cache_bytes() -> int:
    """The CPU feature-cache budget: CPU_FEATURE_CACHE_BYTES, or $FEWSHOTSAM2_FEATURE_CACHE_MB."""
    value = os.environ.get(FEATURE_CACHE_ENV, "").strip()
    if not value:
        return CPU_FEATURE_CACHE_BYTES
    return int(feature_cache_mb(value) * 2**20)  # NaN and inf refused too (int() of them is a traceback)


def estimate_resources(engine, method: str, feature_uses: int, n_slices: int, frame_shape: tuple,
                       n_structures: int = 1, storage: str = "auto", logit_maps: int = 0,
                       layered: bool = False) -> ResourceEstimate:
    """Estimate a run of `method` over `n_slices` query slices (`feature_uses` slice visits over structures), and
    choose how the run holds its features: storage dtype (when `storage` is "auto") and device, the prediction
    batch, what is kept.

    Several structures: predictions batched over structures (propagate's one pass) run in chunks of the batch
    chosen here, so they stay within the same activation budget; `logit_maps` low-resolution logit maps (one per
    structure and slice, for the overlap rule) and every structure's memory FIFO are held at once. `layered`
    (`--overlap allow`): every structure's whole mask is kept to the end (and its unstacked copy for the layers)."""
    s = engine.image_size
    cuda = engine.device.type == "cuda"
    half = 2 if getattr(engine, "_autocast", False) else 1
    batch = engine.batch_size
    if not cuda:
        batch = max(1, min(batch, CPU_ACTIVATION_BUDGET // (PREDICT_BYTES_PER_PIXEL * s * s)))
    encode_batch = min(getattr(engine, "encode_batch_size", batch), engine.batch_size)
    act = max(ENCODER_BYTES_PER_PIXEL * encode_batch, PREDICT_BYTES_PER_PIXEL * batch) * s * s // half
    attention = int(ATTENTION_BYTES_1024 * (s / 1024) ** 4) // half
    per_frame32 = engine.feature_bytes_per_frame(torch.float32)
    # slices read again after a pass: every slice of a range for reverse, else those a later structure reads
    # (propagate: none; its one pass reads each slice once for every structure with the same number of supports)
    again = (n_slices if method == "reverse" else 0 if method == "propagate"
             else min(max(0, feature_uses - n_slices), n_slices))
    chosen_storage = None
    budget = None
    dtype_bytes = engine.feature_bytes_per_frame()
    if not cuda:
        budget = cpu_feature_cache_bytes()
        if storage == "auto" and engine.feature_dtype == torch.float32 and again * per_frame32 > budget:
            # float32 (bit-identical to sam2's predictor) while everything fits the budget, else twice as many
            # slices in bfloat16
            chosen_storage = ("bfloat16", str(engine.feature_device))
            dtype_bytes = per_frame32 // 2
            log.info("feature cache past %.0f MiB in float32: stored as bfloat16", budget / 2**20)
    kept = min(again, budget // dtype_bytes) if budget is not None else again
    reencoded = again - kept
    cache = (kept + batch) * dtype_bytes
    h, w = frame_shape
    # per query slice at its own size: the source array (int16 typical), the output label stack and its
    # unstacked copy (uint8), per-structure masks, and for reverse the forward masks; `layered`: each structure's
    # kept mask and its copy
    per_slice_arrays = h * w * (2 + 2 + n_structures * ((3 if method == "reverse" else 2) + (2 if layered else 0)))
    mem_bytes = (engine.model.mem_dim * 2 * (s // 16) ** 2 + (s // 4) ** 2) * 4 if method == "reverse" else 0
    # the overlap rule's low-resolution logits (float32), and one pass's FIFOs beyond the first structure's (each
    # memory: bf16 mask-memory features plus float32 low-resolution logits)
    held = logit_maps * (s // 4) ** 2 * 4
    if method in ("propagate", "reverse") and n_structures > 1:  # reverse: two FIFOs each (forward, backward)
        held += ((n_structures - 1) * getattr(engine, "memory_reach", 15) * (2 if method == "reverse" else 1)
                 * (engine.model.mem_dim * 2 * (s // 16) ** 2 + (s // 4) ** 2 * 4))
    params = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    base = max(_process_rss_bytes(), PROCESS_BASE_BYTES)
    ram = base + n_slices * per_slice_arrays + held
    gpu = 0
    upfront = False
    if cuda:
        gpu = params + act + attention + n_slices * mem_bytes
        free = torch.cuda.mem_get_info(engine.device)[0]
        if gpu + cache > 0.8 * free:
            chosen_storage = ("bfloat16" if engine.feature_dtype == torch.bfloat16 else "float32", "cpu")
            ram += cache
        else:
            gpu += cache
            # every slice in range fits: encode them up front in batches (faster on a GPU)
            upfront = gpu + n_slices * dtype_bytes <= 0.8 * free
            if upfront and method != "reverse":
                gpu += max(0, n_slices - kept) * dtype_bytes
    else:
        ram += act + attention + cache  # the model's weights are already in the process's RSS
    if method == "lpips":
        ram += LPIPS_BYTES
    calls = (feature_uses if method == "lpips" else n_slices) + reencoded
    seconds = (calls * ENCODE_SECONDS_1024 * (s / 1024) ** ENCODE_SIZE_EXPONENT
               + feature_uses * PREDICT_SECONDS_1024.get(method, 5.0) * (s / 1024) ** PREDICT_SIZE_EXPONENT)
    seconds *= MODEL_COST.get(getattr(engine.info, "model", "tiny"), 1.0)
    if cuda:
        seconds /= CUDA_SPEEDUP
    return ResourceEstimate(int(ram), int(gpu), float(seconds), int(calls), int(cache), chosen_storage, upfront,
                            batch, budget)


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
