"""`--slice-range auto` on obliquely cut volumes (issue 21, item 9).

A query cut 25 degrees oblique (ct-a resampled onto a grid rotated about left-right) once got a range that kept
0.29 of the liver. Now: a tilt up to extent.OBLIQUE_RANGE_DEGREES widens each end by the levels a slice spreads
over; beyond it every slice is segmented, with a warning that says so.
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import SimpleITK as sitk

from fewshotsam2.slicing.extent import OBLIQUE_RANGE_DEGREES, ExtentEstimator, StackInfo, oblique_spread_mm, \
    slice_tilt_degrees, stack_info
from fewshotsam2.slicing.slices import SlicePlan
from fewshotsam2.io.volume import Volume


def rotated(volume: Volume, degrees: float, labels: bool = False) -> Volume:
    """`volume` resampled onto its own grid (same size and spacing) rotated `degrees` about left-right through the
    grid's centre, as a scanner cutting oblique slices would."""
    image = volume.to_sitk()
    t = math.radians(degrees)
    rot = np.array([[1, 0, 0], [0, math.cos(t), -math.sin(t)], [0, math.sin(t), math.cos(t)]])  # about LPS x
    d0 = np.array(image.GetDirection()).reshape(3, 3)
    d = rot @ d0
    size, spacing = np.array(image.GetSize()), np.array(image.GetSpacing())
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint(((size - 1) / 2).tolist()))
    ref = sitk.Image([int(x) for x in size], image.GetPixelID())
    ref.SetSpacing(spacing.tolist())
    ref.SetDirection(d.flatten().tolist())
    ref.SetOrigin((centre - d @ ((size - 1) / 2 * spacing)).tolist())
    interp = sitk.sitkNearestNeighbor if labels else sitk.sitkLinear
    return Volume.from_sitk(sitk.Resample(image, ref, sitk.Transform(), interp, 0.0 if labels else -1024.0))


@pytest.fixture(scope="module")
def weights(shared_dir):
    return str(shared_dir / "weights" / "lpips" / "alexnet_features.pth")


def test_tilt_is_the_slice_normal_angle(ct_a):
    image = ct_a[0]
    assert slice_tilt_degrees(image, SlicePlan.for_volume(image)) < 1e-6
    tilted = rotated(image, 25.0)
    assert abs(slice_tilt_degrees(tilted, SlicePlan.for_volume(tilted)) - 25.0) < 1e-6
    info = StackInfo(np.zeros((3, 10, 10)), (1.0, 1.0), 1.0, box=(5, 5, 200.0), tilt=10.0)
    assert abs(oblique_spread_mm(info) - 100.0 * math.tan(math.radians(10.0))) < 1e-9
    assert oblique_spread_mm(StackInfo(np.zeros((3, 10, 10)), (1.0, 1.0), 1.0, box=(5, 5, 200.0), tilt=0.5)) == 0.0


def test_strongly_oblique_query_gets_every_slice_with_a_warning(ct_a, shared_dir, tmp_path, weights, capsys):
    """ct-a at 25 degrees (the issue's case), through `fewshotsam2 extent`: the whole query and one warning."""
    from fewshotsam2.cli import main

    query = rotated(ct_a[0], 25.0)
    path = tmp_path / "oblique.nii.gz"
    sitk.WriteImage(query.to_sitk(), str(path))
    support = shared_dir / "data" / "abdomen-ct" / "ct-a"
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        rc = main(["extent", "--query", str(path), "--support", str(support / "image.nii.gz"),
                   str(support / "labels.nii.gz"), "--labels", "1,5", "--json", "--lpips-weights", weights])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    n = query.shape[out["axis"]]
    assert [(s["first"], s["last"]) for s in out["structures"]] == [(0, n - 1)] * 2
    texts = [str(w.message) for w in said if "oblique to the anatomical axes" in str(w.message)]
    assert len(texts) == 1 and texts[0].startswith("the query is cut 25 degrees oblique") and "every slice" in texts[0]


@pytest.mark.slow  # LPIPS over two 128-slice brains
def test_moderately_oblique_query_keeps_every_true_slice(shared_dir, weights):
    """An IBSR brain cut 12 degrees oblique (under the fallback): the range is widened and keeps every true slice
    of CSF, grey and white matter; with the tilt ignored it is narrower."""
    from fewshotsam2.research.extent_eval import load_case

    est = ExtentEstimator(weights=weights)
    q_image, q_labels, plane = load_case(shared_dir / "data" / "brain-mr" / "ibsr-01", 2)
    s_image, s_labels, _ = load_case(shared_dir / "data" / "brain-mr" / "ibsr-03", 2)
    degrees = 12.0
    assert degrees < OBLIQUE_RANGE_DEGREES
    query, _ = stack_info(rotated(q_image, degrees), rotated(q_labels, degrees, labels=True), axis=plane)
    support, _ = stack_info(s_image, s_labels, axis=plane)
    assert abs(query.tilt - degrees) < 1e-6
    structures = [(1, "CSF"), (2, "GM"), (3, "WM")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # under the fallback angle: no warning from the estimate
        widened = est.estimate(query, [support], structures)
    query.tilt = 0.0
    plain = est.estimate(query, [support], structures)
    for w, p in zip(widened, plain):
        truth = np.flatnonzero((query.labels == w.value).reshape(query.labels.shape[0], -1).any(axis=1))
        assert w.first <= truth[0] and truth[-1] <= w.last, (w, truth[0], truth[-1])
        assert w.first <= p.first and p.last <= w.last and len(w) >= len(p)
    assert sum(len(w) for w in widened) > sum(len(p) for p in plain)
