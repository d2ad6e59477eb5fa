"""Support-set augmentation: image and mask move together, runs are reproducible, jitter touches pixels only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fewshotsam2.matching.augment import AugmentConfig, augment_support


def _shape_pair(h: int = 96, w: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """An asymmetric bright shape (ellipse + off-centre bar) on a dark background, and the same shape as mask."""
    rr, cc = np.mgrid[:h, :w]
    ellipse = ((rr - 50) / 18.0) ** 2 + ((cc - 60) / 26.0) ** 2 <= 1.0
    bar = (rr >= 20) & (rr < 30) & (cc >= 70) & (cc < 100)
    mask = ellipse | bar
    image = np.where(mask, 0.9, 0.1).astype(np.float32)
    return image, mask


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


NO_JITTER = AugmentConfig(brightness=0.0, contrast=(1.0, 1.0), gamma=(1.0, 1.0))


def test_image_and_mask_stay_aligned_for_many_seeds() -> None:
    image, mask = _shape_pair()
    moved = 0
    for seed in range(40):
        pairs = augment_support(image, mask, n=3, seed=seed, config=NO_JITTER)
        for aug_image, aug_mask in pairs[1:]:
            assert aug_mask.dtype == bool and aug_mask.shape == mask.shape
            assert _iou(aug_image > 0.5, aug_mask) > 0.95
            moved += _iou(aug_mask, mask) < 0.9
    assert moved > 60  # of 120: the transforms really move the shape, so alignment is not trivial


def test_alignment_holds_with_jitter_too() -> None:
    image, mask = _shape_pair()
    for seed in range(20):
        for aug_image, aug_mask in augment_support(image, mask, n=2, seed=seed)[1:]:
            # jitter is monotonic per image, so the shape stays the brighter part: threshold between the two levels
            fg, bg = aug_image[aug_mask].mean(), aug_image[~aug_mask].mean()
            assert fg > bg
            assert _iou(aug_image > (fg + bg) / 2, aug_mask) > 0.95


def test_original_first_and_reproducible() -> None:
    image, mask = _shape_pair()
    a = augment_support(image, mask, n=4, seed=7)
    b = augment_support(image, mask, n=4, seed=7)
    c = augment_support(image, mask, n=4, seed=8)
    assert len(a) == 5
    assert np.array_equal(a[0][0], image) and np.array_equal(a[0][1], mask)
    for (ia, ma), (ib, mb) in zip(a, b):
        assert np.array_equal(ia, ib) and np.array_equal(ma, mb)
    assert all(not np.array_equal(ia, ic) for (ia, _), (ic, _) in zip(a[1:], c[1:]))
    assert all(not np.array_equal(ma, mask) for _, ma in a[1:])  # every augmented pair was moved


def test_n_zero_gives_only_the_original() -> None:
    image, mask = _shape_pair()
    pairs = augment_support(image, mask, n=0, seed=0)
    assert len(pairs) == 1
    assert np.array_equal(pairs[0][0], image) and np.array_equal(pairs[0][1], mask)
    with pytest.raises(ValueError):
        augment_support(image, mask, n=-1, seed=0)
    with pytest.raises(ValueError):
        augment_support(image, mask[:10], n=1, seed=0)


def test_intensity_jitter_leaves_mask_and_range(shared_dir: Path) -> None:
    import SimpleITK as sitk

    # a real slice: the CT liver, windowed to [0, 1]
    ct = sitk.GetArrayFromImage(sitk.ReadImage(str(shared_dir / "data/abdomen-ct/ct-a/image.nii.gz")))
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(shared_dir / "data/abdomen-ct/ct-a/labels.nii.gz")))
    k = int(np.argmax((lab == 5).sum(axis=(1, 2))))
    image = np.clip((ct[k].astype(np.float32) + 160.0) / 400.0, 0.0, 1.0)
    mask = lab[k] == 5
    no_geometry = AugmentConfig(rotation_deg=0.0, scale=(1.0, 1.0), translate=0.0, shear_deg=0.0,
                                brightness=0.3, contrast=(0.5, 1.5), gamma=(0.5, 2.0))
    pairs = augment_support(image, mask, n=6, seed=3, config=no_geometry)
    for aug_image, aug_mask in pairs[1:]:
        assert np.array_equal(aug_mask, mask)
        assert aug_image.dtype == np.float32 and aug_image.min() >= 0.0 and aug_image.max() <= 1.0
        assert np.abs(aug_image - image).max() > 0.02  # the pixels did change
    # default config on the same slice: range kept, masks non-empty
    for aug_image, aug_mask in augment_support(image, mask, n=6, seed=4)[1:]:
        assert aug_image.min() >= 0.0 and aug_image.max() <= 1.0 and aug_mask.any()


def test_structure_at_the_edge_is_redrawn_not_lost() -> None:
    # a small structure in the corner: big shifts would push it out; every returned mask must stay non-empty
    image = np.zeros((64, 64), np.float32)
    mask = np.zeros((64, 64), bool)
    mask[:3, :3] = True
    image[mask] = 1.0
    wild = AugmentConfig(rotation_deg=30.0, translate=0.3)
    for seed in range(10):
        for aug_image, aug_mask in augment_support(image, mask, n=4, seed=seed, config=wild)[1:]:
            assert aug_mask.any()
    # an empty mask is accepted and stays empty
    pairs = augment_support(image, np.zeros_like(mask), n=2, seed=0)
    assert len(pairs) == 3 and not any(m.any() for _, m in pairs)
