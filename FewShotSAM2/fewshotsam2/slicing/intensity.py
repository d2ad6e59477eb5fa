"""Intensity normalisation: a volume -> float32 in [0, 1] for SAM2 (which expects 8-bit-like images).

CT uses fixed HU windows (comparable across scans, which matters when support and query come from
different scanners); MR and everything else uses the volume's own 0.5-99.5 percentile range.
"""

from __future__ import annotations

import numpy as np

from fewshotsam2 import constants
from fewshotsam2.errors import InputError
from fewshotsam2.io.volume import Volume

CT_WINDOWS = constants.CT_WINDOWS  # name -> (window width, window level) in HU

PRESETS: dict[str, str] = {
    **{name: f"CT window W{w:g}/L{lv:g}" for name, (w, lv) in CT_WINDOWS.items()},
    "percentile": "0.5-99.5 percentile of the volume (MR and other modalities)",
    "minmax": "minimum-maximum of the volume",
}

PRESET_NAMES: tuple[str, ...] = constants.PRESETS

PERCENTILES = (0.5, 99.5)

# Percentile estimates on at most this many voxels: exact enough for a window, fast on big volumes.
_MAX_SAMPLES = 2_000_000


def _sample(array: np.ndarray) -> np.ndarray:
    flat = array.reshape(-1)
    step = max(1, flat.size // _MAX_SAMPLES)
    return flat[::step]


def choose_preset(volume: Volume) -> str:
    """Pick a preset from the intensities alone (no metadata needed).

    Rule: CT-like when the 0.5th percentile is below -500 (air around or inside the body, about -1000 HU)
    and the 99.9th percentile is above 300 (contrast, bone) -> "ct-abdomen"; otherwise "percentile".
    MR has no large negative values, so it falls to "percentile". A CT cropped to soft tissue only (no air)
    also gets "percentile", which is still a sensible window for it.
    """
    low, high = np.percentile(_sample(volume.array).astype(np.float64), [0.5, 99.9])
    return "ct-abdomen" if low < -500 and high > 300 else "percentile"


def intensity_window(volume: Volume, preset: str = "auto") -> tuple[float, float]:
    """(low, high) intensities that map to 0 and 1 under `preset` (high <= low: a constant volume)."""
    if preset not in PRESET_NAMES:
        raise InputError(f"unknown intensity preset '{preset}'; valid presets: {', '.join(PRESET_NAMES)}")
    if preset == "auto":
        preset = choose_preset(volume)
    if preset in CT_WINDOWS:
        width, level = CT_WINDOWS[preset]
        return level - width / 2.0, level + width / 2.0
    array = volume.array
    if preset == "percentile":
        low, high = (float(v) for v in np.percentile(_sample(array).astype(np.float32), PERCENTILES))
        if high > low:
            return low, high
        # mostly constant volume (e.g. a sparse image): fall back to the full range
    # as float32, the type the window is applied in
    return float(np.float32(array.min())), float(np.float32(array.max()))


def apply_window(array: np.ndarray, low: float, high: float) -> np.ndarray:
    """`array` mapped to float32 in [0, 1]: `low` -> 0, `high` -> 1, clipped (a new array)."""
    if high <= low:
        return np.zeros(array.shape, dtype=np.float32)
    out = (array.astype(np.float32, copy=False) - np.float32(low)) / np.float32(high - low)
    np.clip(out, 0.0, 1.0, out=out)
    return out.astype(np.float32, copy=False)


def normalize(volume: Volume, preset: str = "auto") -> np.ndarray:
    """Map intensities to float32 in [0, 1] (same shape as volume.array) with a preset from PRESET_NAMES."""
    return apply_window(volume.array, *intensity_window(volume, preset))
