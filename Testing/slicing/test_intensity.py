"""intensity.py: CT windows, percentile normalisation and the automatic choice, on the real volumes."""

from __future__ import annotations

import numpy as np
import pytest

from fewshotsam2.errors import InputError
from fewshotsam2.slicing.intensity import PRESET_NAMES, choose_preset, normalize
from fewshotsam2.io.volume import Volume, read_volume

CT = ["abdomen-ct/ct-a/image.nii.gz", "abdomen-ct/ct-b/dicom", "spleen-ct/image.nii.gz"]
MR = ["abdomen-mr/image.nii.gz", "brain-mr/ibsr-01/image.nii.gz", "brain-mr/ibsr-05/image.nii.gz"]


def synthetic(values) -> Volume:
    array = np.asarray(values, dtype=np.float32).reshape(1, 1, -1)
    return Volume(array, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3))


@pytest.mark.parametrize("name", CT + MR)
def test_auto_choice_and_range_on_real_volumes(name, shared_dir):
    vol = read_volume(shared_dir / "data" / name)
    expected = "ct-abdomen" if name in CT else "percentile"
    assert choose_preset(vol) == expected
    out = normalize(vol)
    assert out.dtype == np.float32 and out.shape == vol.shape
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert np.array_equal(out, normalize(vol, expected))
    # both ends of the range are used: air/background at 0, bright tissue at 1
    assert out.min() == 0.0 and out.max() == 1.0


def test_every_preset_stays_in_range(shared_dir):
    vol = read_volume(shared_dir / "data" / "abdomen-ct/ct-a/image.nii.gz")
    for preset in PRESET_NAMES:
        out = normalize(vol, preset)
        assert out.dtype == np.float32 and out.shape == vol.shape
        assert 0.0 <= out.min() and out.max() <= 1.0 and np.isfinite(out).all()
    # different windows give different images
    assert not np.array_equal(normalize(vol, "ct-lung"), normalize(vol, "ct-abdomen"))


def test_ct_window_arithmetic():
    vol = synthetic([-1000, -160, 40, 240, 1000])  # abdomen window W400/L40 spans -160..240
    np.testing.assert_allclose(normalize(vol, "ct-abdomen").ravel(), [0, 0, 0.5, 1, 1], atol=1e-6)
    np.testing.assert_allclose(normalize(synthetic([-1350, -600, 150]), "ct-lung").ravel(), [0, 0.5, 1], atol=1e-6)


def test_percentile_and_minmax():
    values = np.arange(1000, dtype=np.float32)
    values[-1] = 1e6  # an outlier: percentile ignores it, minmax does not
    vol = synthetic(values)
    pct = normalize(vol, "percentile").ravel()
    low, high = np.percentile(values, [0.5, 99.5])
    np.testing.assert_allclose(pct[500], (500 - low) / (high - low), rtol=1e-5)
    assert pct[-1] == 1.0 and pct[0] == 0.0
    mm = normalize(vol, "minmax").ravel()
    assert mm[-1] == 1.0 and mm[500] < 1e-3


def test_constant_volume_gives_zeros_not_nan():
    for preset in ("percentile", "minmax", "auto"):
        out = normalize(synthetic([7.0] * 10), preset)
        assert np.array_equal(out, np.zeros_like(out))


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(InputError) as info:
        normalize(synthetic([0, 1]), "ct-heart")
    for name in PRESET_NAMES:
        assert name in str(info.value)
