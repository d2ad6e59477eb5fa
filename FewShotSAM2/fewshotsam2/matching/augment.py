"""Seeded support-set augmentation for LPIPS matching (Zu et al. 2025, arXiv 2503.04826).

The support set is the original (image, mask) pair plus `n` augmented pairs. Each augmented pair gets one random
affine transform (rotation, isotropic scale, shear, translation about the image centre) applied identically to
the image (bilinear) and to the mask (nearest neighbour), then intensity jitter on the image alone. The paper
found 2-4 transforms per support better than none.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
from scipy import ndimage

# redraws of the affine when the structure leaves the field of view; after that the pair keeps only the jitter
MAX_TRIES = 20


@dataclass
class AugmentConfig:
    """Ranges of the random transforms; each augmented pair draws every parameter uniformly.

    Geometry (image and mask together), about the image centre:
      rotation_deg  rotation in [-r, r] degrees
      scale         isotropic zoom factor in [lo, hi]
      translate     shift in [-t, t] times the image height (rows) and width (columns), drawn per axis
      shear_deg     shear angle in [-s, s] degrees (columns sheared along rows)

    Intensity (image only), in this order, then clipped to [0, 1]:
      gamma         x -> x ** g, g log-uniform in [lo, hi] (so 0.8 and 1.25 are equally likely)
      contrast      blend with the image mean: c * x + (1 - c) * mean(x), c in [lo, hi] (torchvision's contrast)
      brightness    x -> b * x, b in [1 - brightness, 1 + brightness] (torchvision's brightness)

    Gamma takes the place of ColorJitter's hue and saturation: a scan slice has one channel, so hue and saturation
    mean nothing, while a gamma change mimics what differs between scanners and protocols (the tissue contrast
    curve), unlike a linear change which brightness/contrast already cover.
    """

    rotation_deg: float = 15.0
    scale: tuple[float, float] = (0.9, 1.1)
    translate: float = 0.05
    shear_deg: float = 5.0
    brightness: float = 0.1
    contrast: tuple[float, float] = (0.8, 1.2)
    gamma: tuple[float, float] = (0.8, 1.25)


def _affine(rng: np.random.Generator, cfg: AugmentConfig, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Draw one affine; return scipy's (matrix, offset) mapping output (row, col) to input (row, col)."""
    theta = math.radians(rng.uniform(-cfg.rotation_deg, cfg.rotation_deg))
    s = rng.uniform(cfg.scale[0], cfg.scale[1])
    shear = math.radians(rng.uniform(-cfg.shear_deg, cfg.shear_deg))
    t = np.array([rng.uniform(-cfg.translate, cfg.translate) * shape[0],
                  rng.uniform(-cfg.translate, cfg.translate) * shape[1]])
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    shr = np.array([[1.0, 0.0], [math.tan(shear), 1.0]])
    forward = rot @ shr @ (s * np.eye(2))  # input -> output, about the centre, then shifted by t
    centre = (np.array(shape, dtype=float) - 1.0) / 2.0
    inverse = np.linalg.inv(forward)
    # output o = forward (i - c) + c + t  <=>  i = inverse o + (c - inverse (c + t))
    return inverse, centre - inverse @ (centre + t)


def _jitter(rng: np.random.Generator, cfg: AugmentConfig, image: np.ndarray) -> np.ndarray:
    g = math.exp(rng.uniform(math.log(cfg.gamma[0]), math.log(cfg.gamma[1])))
    c = rng.uniform(cfg.contrast[0], cfg.contrast[1])
    b = rng.uniform(1.0 - cfg.brightness, 1.0 + cfg.brightness)
    x = np.clip(image, 0.0, 1.0) ** g  # clip first: a negative base under a fractional power is NaN
    x = c * x + (1.0 - c) * float(x.mean())
    return np.clip(b * x, 0.0, 1.0).astype(np.float32)


def augment_support(
    image: np.ndarray,
    mask: np.ndarray,
    n: int,
    seed: int,
    config: Optional[AugmentConfig] = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The original (image, mask) pair followed by `n` augmented pairs.

    image: (h, w) float in [0, 1]; mask: (h, w) bool. Returns n + 1 pairs of (float32 image in [0, 1],
    bool mask); element 0 is the original (image as float32, clipped). The same seed gives the same pairs.

    Each augmented pair draws an affine; if it would leave the mask empty (the structure moved out of the field
    of view or, for a few-pixel structure, fell between nearest-neighbour samples) it is drawn again, up to
    MAX_TRIES times, after which that pair keeps the original geometry and gets only intensity jitter. An empty
    input mask is accepted and stays empty. Pixels coming from outside the image repeat the nearest edge pixel in
    the image (scans are usually background there; a constant would draw artificial edges) and are background
    in the mask.
    """
    cfg = config or AugmentConfig()
    image = np.asarray(image)
    mask = np.asarray(mask).astype(bool)
    if image.ndim != 2 or mask.shape != image.shape:
        raise ValueError(f"augment_support needs a 2D image and a mask of the same shape, got {image.shape}, {mask.shape}")
    if n < 0:
        raise ValueError(f"number of augmentations must be >= 0, got {n}")
    image = np.clip(image.astype(np.float32), 0.0, 1.0)
    rng = np.random.default_rng(seed)
    pairs = [(image, mask.copy())]
    mask_u8 = mask.astype(np.uint8)
    for _ in range(n):
        new_image, new_mask = image, mask.copy()
        for _try in range(MAX_TRIES):
            matrix, offset = _affine(rng, cfg, image.shape)
            m = ndimage.affine_transform(mask_u8, matrix, offset, order=0, mode="constant", cval=0).astype(bool)
            if m.any() or not mask.any():
                new_mask = m
                new_image = ndimage.affine_transform(image, matrix, offset, order=1, mode="nearest")
                break
        pairs.append((_jitter(rng, cfg, new_image), new_mask))
    return pairs
