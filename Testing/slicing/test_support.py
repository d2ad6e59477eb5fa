"""support.py: which labeled slices prompt SAM2, on synthetic stacks and the real labels."""

from __future__ import annotations

import numpy as np
import pytest

from fewshotsam2.errors import InputError
from fewshotsam2.slicing.slices import SlicePlan
from fewshotsam2.slicing.support import labeled_slices, select_support_slices
from fewshotsam2.io.volume import read_labels, read_volume


def stack_with(slices_with_value, n=20, value=5) -> np.ndarray:
    stack = np.zeros((n, 8, 9), np.uint8)
    for s in slices_with_value:
        stack[s, 2:4, 3:6] = value
    stack[0, 0, 0] = 9  # another structure must not count
    return stack


def test_labeled_slices():
    stack = stack_with([3, 4, 5, 11])
    assert labeled_slices(stack, 5).tolist() == [3, 4, 5, 11]
    assert labeled_slices(stack, 9).tolist() == [0]
    assert labeled_slices(stack, 2).tolist() == []


def test_one_shot_is_the_middle_labeled_slice():
    assert select_support_slices(stack_with(range(4, 15)), 5, 1) == [9]  # 11 slices 4..14 -> 9
    assert select_support_slices(stack_with([2, 3, 10, 12]), 5, 1) == [10]  # present[4 // 2]


def test_k_shots_are_evenly_spaced_over_the_labeled_extent():
    stack = stack_with(range(2, 19))  # 17 labeled slices, 2..18
    assert select_support_slices(stack, 5, 3) == [2, 10, 18]
    assert select_support_slices(stack, 5, 5) == [2, 6, 10, 14, 18]
    picked = select_support_slices(stack, 5, 4)
    assert picked == sorted(set(picked)) and len(picked) == 4 and picked[0] == 2 and picked[-1] == 18
    assert select_support_slices(stack_with(range(5, 12)), 5, 7) == list(range(5, 12))  # as many shots as slices


def test_more_shots_than_labeled_slices_uses_all_with_a_warning():
    stack = stack_with([3, 7, 8])
    with pytest.warns(UserWarning, match="3 slices"):
        assert select_support_slices(stack, 5, 10) == [3, 7, 8]


def test_bad_requests():
    stack = stack_with([3, 4])
    with pytest.raises(InputError, match="absent from the support"):
        select_support_slices(stack, 2, 1)
    for shots in (0, -1, 1.5):
        with pytest.raises(InputError, match="shots"):
            select_support_slices(stack, 5, shots)


def test_real_spleen_support_slices(shared_dir):
    data = shared_dir / "data" / "abdomen-ct/ct-a"
    image = read_volume(data / "image.nii.gz")
    labels, _ = read_labels(data / "labels.nii.gz", image)
    plan = SlicePlan.for_volume(image)
    stack = plan.stack(labels.array)
    spleen = 1
    present = labeled_slices(stack, spleen)
    # the same slices, counted directly on the volume's own array along the slice axis
    direct = sorted(
        plan.array_index_to_slice_index(int(k))
        for k in np.flatnonzero((labels.array == spleen).any(axis=tuple(a for a in range(3) if a != plan.array_axis)))
    )
    assert present.tolist() == direct and len(present) >= 3
    one = select_support_slices(stack, spleen, 1)
    assert one == [int(present[len(present) // 2])]
    three = select_support_slices(stack, spleen, 3)
    assert three[0] == present[0] and three[-1] == present[-1] and len(three) == 3
    assert all((stack[s] == spleen).any() for s in three)
