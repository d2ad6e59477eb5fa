"""Options objects (validated once, flat names, defaults in one place), the constants they check against, the
atomic-write helper and the package's one Dice. Fast: no SAM2, no data files."""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
import pytest

from fewshotsam2 import constants as C
from fewshotsam2.io.atomic import atomic_path, write_text_atomic
from fewshotsam2.options import (
    LpipsOptions,
    OptionError,
    PropagateOptions,
    ReverseOptions,
    SegmentOptions,
)
from fewshotsam2.run.overlap import dice, dice_from_counts

BAD = [
    (dict(method="magic"), "method"),
    (dict(model="huge"), "model"),
    (dict(version="3"), "version"),
    (dict(image_size=100), "image_size"),  # not a multiple of 32
    (dict(image_size=32), "image_size"),  # below the minimum
    (dict(image_size=C.MAX_IMAGE_SIZE + 32), "image_size"),  # above SAM2's training size
    (dict(image_size="big"), "image_size"),
    (dict(device="tpu"), "device"),
    (dict(batch_size=0), "batch_size"),
    (dict(batch_size=2.5), "batch_size"),
    (dict(axis="oblique"), "axis"),
    (dict(preset="bone-ish"), "preset"),
    (dict(shots=0), "shots"),
    (dict(shots=True), "shots"),
    (dict(untrained=True, checkpoint="x.pt"), "untrained"),
    (dict(top_k=0), "top_k"),
    (dict(min_score=1.5), "min_score"),
    (dict(min_score=-0.1), "min_score"),
    (dict(min_score=float("nan")), "min_score"),
    (dict(method="lpips", augmentations=-1), "augmentations"),
    (dict(method="lpips", lpips_net="resnet"), "lpips_net"),
    (dict(method="lpips", seed=1.5), "seed"),
]


@pytest.mark.parametrize("settings,option", BAD, ids=[f"{o}-{i}" for i, (_, o) in enumerate(BAD)])
def test_bad_values_are_refused_when_built_naming_the_option_not_a_flag(settings, option):
    with pytest.raises(OptionError) as exc:
        SegmentOptions.from_flat(**settings)
    assert exc.value.option == option
    assert str(exc.value).startswith(option + " ") and "--" not in str(exc.value)
    assert "\n" not in str(exc.value)


def test_values_are_normalised_once():
    o = SegmentOptions.from_flat(model="T", version=2.1, image_size="256", shots=2.0, top_k="3", checkpoint="")
    assert (o.model, o.version, o.image_size, o.shots, o.checkpoint) == ("tiny", "2.1", 256, 2, None)
    assert o.method_options == ReverseOptions(top_k=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.image_size = 4096  # immutable: a value cannot skip validation by being changed later


def test_each_method_gets_its_own_options_type():
    assert SegmentOptions().method_options == ReverseOptions()
    assert SegmentOptions(method="propagate").method_options == PropagateOptions()
    lp = SegmentOptions.from_flat(method="lpips", lpips_net="vgg", lpips_weights="w.pth", top_k=9)
    assert lp.method_options == LpipsOptions(net="vgg", weights="w.pth")  # top_k belongs to reverse: dropped
    with pytest.raises(OptionError, match="top_k"):
        SegmentOptions.from_flat(method="lpips", top_k=0)  # ... but checked: a bad value is refused whatever the method
    with pytest.raises(OptionError) as exc:
        SegmentOptions(method="lpips", method_options=ReverseOptions())
    assert exc.value.option == "method_options"
    with pytest.raises(TypeError, match="no_such"):
        SegmentOptions.from_flat(no_such=1)


def test_flat_names_round_trip_and_defaults_come_from_the_classes():
    for method in C.METHODS:
        o = SegmentOptions.from_flat(method=method, image_size=512, shots=3, top_k=2, min_score=0.25,
                                     keep_supports=True, augmentations=1, lpips_net="squeeze", seed=4)
        assert SegmentOptions.from_flat(**o.to_flat()) == o
        assert set(o.to_flat()) <= set(SegmentOptions.flat_names())
    d = SegmentOptions.flat_defaults()
    assert d["top_k"] == ReverseOptions().top_k and d["lpips_net"] == LpipsOptions().net
    assert d["image_size"] is None and d["method"] == C.METHODS[0]  # None: the model's own size
    assert SegmentOptions().image_size == C.DEFAULT_IMAGE_SIZE
    assert SegmentOptions.from_flat(**d) == SegmentOptions()


def test_engine_settings_decide_engine_reuse():
    a = SegmentOptions.from_flat(method="reverse", image_size=256, top_k=3)
    b = SegmentOptions.from_flat(method="lpips", image_size=256, augmentations=1)
    c = SegmentOptions.from_flat(method="lpips", image_size=512)
    assert a.engine_settings() == b.engine_settings() != c.engine_settings()
    assert set(a.engine_settings()) == set(SegmentOptions.ENGINE_FIELDS)


def test_command_line_flags_are_the_flat_names():
    from fewshotsam2 import cli

    parser = cli.build_parser()
    args = parser.parse_args(["segment", "--query", "q", "--support", "i", "l", "--labels", "1", "--out", "o.nii.gz",
                              "--method", "lpips", "--lpips-net", "vgg", "--image-size", "512"])
    o = cli.options_from_args(args)
    assert o.method_options == LpipsOptions(net="vgg") and o.image_size == 512
    # every default the command line shows is the options' default
    d = SegmentOptions.flat_defaults()
    for name in SegmentOptions.flat_names():
        # slice_range: the command line estimates the range ("auto"); the library segments every slice ("off")
        # unless asked, so scripted runs and their golden outputs keep whole-volume results
        if hasattr(args, name) and name not in ("method", "image_size", "lpips_net", "slice_range"):
            assert getattr(args, name) == d[name], name
    assert args.slice_range == "auto" and d["slice_range"] == "off"
    assert cli.flag("lpips_net") == "--lpips-net"


def test_intensity_presets_and_constants_agree():
    from fewshotsam2.slicing import intensity

    # the preset descriptions and the list every front end offers are written in two places
    assert C.PRESETS == ("auto",) + tuple(intensity.PRESETS)
    assert all(name in C.DISPLAY_NAMES for name in C.METHODS + C.MODELS + C.DEVICES + C.AXES + C.PRESETS)
    assert C.display_name("base_plus") == "Base+" and C.display_name("unknown") == "unknown"


# ------------------------------------------------------------------------------------------ atomic writes


def test_atomic_path_renames_on_success_and_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.nii.gz"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            # hidden, short (a name near the file system's limit still fits), the extension kept for ITK
            assert tmp.parent == tmp_path and tmp.name.endswith(".nii.gz") and tmp.name.startswith(".")
            assert len(tmp.name) <= len(".tmp-12345678.nii.gz")
            tmp.write_text("half")
            raise RuntimeError("writer failed")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["out.nii.gz"]
    write_text_atomic(target, "new\n")
    assert target.read_text() == "new\n" and os.listdir(tmp_path) == ["out.nii.gz"]


# ------------------------------------------------------------------------------------------ Dice


def test_dice_matches_a_set_computation_and_handles_empty_masks():
    rng = np.random.default_rng(0)
    for _ in range(20):
        a, b = rng.random((6, 7)) < 0.3, rng.random((6, 7)) < 0.5
        sa = {tuple(i) for i in np.argwhere(a)}
        sb = {tuple(i) for i in np.argwhere(b)}
        assert math.isclose(dice(a, b), 2 * len(sa & sb) / (len(sa) + len(sb)))
    empty = np.zeros((3, 3), bool)
    assert dice(empty, empty) == 1.0 and dice(empty, ~empty) == 0.0
    assert dice_from_counts(0, 0, 0) == 1.0 and dice_from_counts(1, 1, 0) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        dice(np.zeros((2, 2)), np.zeros((2, 3)))
