"""--slice-range (`slice_range.py`): one range's grammar and its check against the query, the per-structure
grammar, the key lookup, and a two-structure run on ct-a (64 px)."""

import warnings

import numpy as np
import pytest

from fewshotsam2.errors import InputError
from fewshotsam2.slicing.slice_range import (AUTO, WHOLE, SliceRangeSpec, check_slice_range, parse_slice_range,
                                     parse_slice_ranges, resolve_slice_ranges)
from fewshotsam2.io.volume import Structure

LIVER_SPLEEN = [Structure(1, "spleen", (0, 0, 1)), Structure(6, "liver", (1, 0, 0))]


def R(first, last):
    return SliceRangeSpec("range", first, last)


@pytest.mark.parametrize("text,expected", [("auto", AUTO), ("off", WHOLE), ("3:17", R(3, 17))])
def test_parse_slice_range(text, expected):
    assert parse_slice_range(text) == expected
    assert str(expected) == text  # the typed spec writes back as the user wrote it


@pytest.mark.parametrize("text", ["", "3-17", "a:b", "3:", "all"])
def test_parse_slice_range_refuses_bad_grammar(text):
    with pytest.raises(InputError, match="is no slice range: write auto, off, FIRST:LAST"):
        parse_slice_range(text)


@pytest.mark.parametrize("first,last,why", [(5, 3, "reversed"), (-1, 3, "outside"), (0, 20, "outside")])
def test_check_slice_range_refuses(first, last, why):
    with pytest.raises(InputError, match=why):
        check_slice_range(first, last, 20, 0)
    check_slice_range(0, 19, 20, 0)


@pytest.mark.parametrize("text, expected", [
    ("auto", {None: AUTO}), ("off", {None: WHOLE}), ("3:9", {None: R(3, 9)}),
    ("5=10:40,1=off,liver=auto", {"5": R(10, 40), "1": WHOLE, "liver": AUTO, None: AUTO}),
    ("1=2:4, off", {"1": R(2, 4), None: WHOLE}),
])
def test_parse_slice_ranges(text, expected):
    assert parse_slice_ranges(text) == expected


@pytest.mark.parametrize("text,why", [("1=2:4,1=off", "'1' is given twice"), ("=3:4", "an empty structure name"),
                                      ("1=x", "'x' is no slice range"), ("1=2:4,off,auto", "default range' is given"),
                                      ("1=2:4,", "'' is no slice range")])
def test_parse_slice_ranges_refuses(text, why):
    with pytest.raises(InputError, match=why):
        parse_slice_ranges(text)


def test_options_keep_the_grammars_precise_message():
    """A bad per-structure range names what is wrong (issue 21 item 13), not a generic line."""
    from fewshotsam2.options import OptionError, SegmentOptions

    with pytest.raises(OptionError, match="'liver' is given twice") as info:
        SegmentOptions(slice_range="liver=1:2,liver=3:4")
    assert info.value.option == "slice_range"


def test_resolve_by_value_then_name_and_default():
    assert resolve_slice_ranges("liver=3:5,1=off", LIVER_SPLEEN) == {6: R(3, 5), 1: WHOLE}
    assert resolve_slice_ranges("liver=3:5", LIVER_SPLEEN) == {6: R(3, 5), 1: AUTO}  # unnamed: auto
    assert resolve_slice_ranges("liver=3:5,off", LIVER_SPLEEN) == {6: R(3, 5), 1: WHOLE}
    with pytest.raises(InputError, match="kidney.*not segmented"):
        resolve_slice_ranges("kidney=1:2", LIVER_SPLEEN)


@pytest.mark.slow  # several seconds: kept out of the fast tier
def test_segment_with_a_range_per_structure(engine64, ct_a):
    from fewshotsam2.run.pipeline import SegmentOptions, SupportCase, segment
    from fewshotsam2.slicing.slices import SlicePlan

    image, labels, structures = ct_a
    chosen = [s for s in structures if s.value in (1, 6)]
    liver = next(s for s in chosen if s.value == 6)
    options = SegmentOptions(method="propagate", image_size=64, device="cpu", untrained=True,
                             slice_range=f"1=10:12,{liver.name}=off")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = segment(image, [SupportCase(image, labels)], chosen, options, engine=engine64)
    axis = SlicePlan.for_volume(image).array_axis
    n = image.array.shape[axis]
    assert result.slice_ranges == {1: (10, 12), 6: (0, n - 1)}
    stack = np.moveaxis(result.labels.array, axis, 0)
    assert not (np.delete(stack, range(10, 13), axis=0) == 1).any()  # spleen only inside its range


def test_segment_refuses_an_unknown_structure_before_encoding(engine64, ct_a):
    from fewshotsam2.run.pipeline import SegmentOptions, SupportCase, segment

    image, labels, structures = ct_a
    options = SegmentOptions(method="propagate", image_size=64, device="cpu", untrained=True,
                             slice_range="99=1:2")
    calls = engine64.encoder_calls
    with pytest.raises(InputError, match="'99'"):
        segment(image, [SupportCase(image, labels)], [s for s in structures if s.value == 1], options,
                engine=engine64)
    assert engine64.encoder_calls == calls
