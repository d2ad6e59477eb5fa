"""Settings of a segmentation run: one validated, immutable object per method plus the common settings.

Defaults come from the settings table (`settings.SETTINGS`), the one place they live: the command line, the
Slicer GUI and `evaluate` derive theirs from it too. Every value is checked once, when the object is built (`__post_init__`); a bad value raises
`OptionError`, whose message names the option as the Python API spells it (`top_k`), never a command-line flag:
each front end maps `OptionError.option` to its own wording (the command line to `--top-k`).

Front ends that hold every setting under flat names (the GUI's parameter node, evaluate's run settings) build
options with `SegmentOptions.from_flat(method=..., top_k=..., lpips_net=...)` and read them back with
`to_flat()`.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Union

from fewshotsam2 import constants as C
from fewshotsam2.errors import InputError
from fewshotsam2.model.models import CARDS, default_image_size, normalise_model_name, parse_config
from fewshotsam2.settings import SETTINGS, defaults, method_fields
from fewshotsam2.slicing.slice_range import parse_slice_ranges

_D = defaults()  # the settings table's defaults, by flat name


class OptionError(InputError):
    """A setting has a value it cannot have. `option` is its flat name (`top_k`, `lpips_net`, `image_size`)."""

    def __init__(self, option: str, problem: str) -> None:
        super().__init__(f"{option} {problem}")
        self.option = option
        self.problem = problem


def _int(option: str, value: Any, minimum: Optional[int] = None) -> int:
    try:
        number = int(value)
        whole = not isinstance(value, bool) and float(value) == number  # refuses True, 2.5 and "2.5"
    except (TypeError, ValueError, OverflowError):
        whole = False
    if not whole:
        raise OptionError(option, f"must be a whole number, got {value!r}")
    if minimum is not None and number < minimum:
        raise OptionError(option, f"must be at least {minimum}, got {number}")
    return number


def _float(option: str, value: Any, low: float, high: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise OptionError(option, f"must be a number, got {value!r}") from None
    if not low <= number <= high:  # also refuses nan
        raise OptionError(option, f"must lie in [{low:g}, {high:g}], got {value!r}")
    return number


def _choice(option: str, value: Any, choices: tuple[str, ...]) -> str:
    text = str(value)
    if text not in choices:
        raise OptionError(option, f"must be one of {', '.join(choices)}, got {value!r}")
    return text


def _set(obj: object, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)  # frozen dataclasses: normalised values are stored once, in __post_init__


# ------------------------------------------------------------------------------------------ per-method settings


@dataclass(frozen=True)
class PropagateOptions:
    """Plain SAM2 propagation has no settings of its own."""

    method: ClassVar[str] = "propagate"
    FLAT: ClassVar[dict[str, str]] = {}  # flat name -> field name


@dataclass(frozen=True)
class ReverseOptions:
    """Reverse propagation (RevSAM2).

    top_k: query slices kept as conditional slices, best reverse score first.
    min_score: only slices whose reverse score pi (mean Dice on the supports, 0..1) reaches this are kept; if
        none does, the best slice is used with a warning.
    keep_supports: keep the support slices in SAM2's memory during query self-propagation (the paper keeps only
        the conditional query slices).
    """

    top_k: int = _D["top_k"]
    min_score: float = _D["min_score"]
    keep_supports: bool = _D["keep_supports"]

    method: ClassVar[str] = "reverse"
    FLAT: ClassVar[dict[str, str]] = method_fields("reverse")

    def __post_init__(self) -> None:
        _set(self, "top_k", _int("top_k", self.top_k, minimum=1))
        _set(self, "min_score", _float("min_score", self.min_score, 0.0, 1.0))  # a Dice
        _set(self, "keep_supports", bool(self.keep_supports))


@dataclass(frozen=True)
class LpipsOptions:
    """LPIPS matching (Zu et al.).

    augmentations: augmented copies of each support slice in the matching set.
    net: LPIPS backbone. weights: a torchvision-layout state dict of that backbone for offline use (None: the
        environment variable FEWSHOTSAM2_LPIPS_WEIGHTS, else torchvision's download). seed: of the augmentations.
    """

    augmentations: int = _D["augmentations"]
    net: str = _D["lpips_net"]
    weights: Optional[str] = _D["lpips_weights"]
    seed: int = _D["seed"]

    method: ClassVar[str] = "lpips"
    FLAT: ClassVar[dict[str, str]] = method_fields("lpips")

    def __post_init__(self) -> None:
        _set(self, "augmentations", _int("augmentations", self.augmentations, minimum=0))
        _set(self, "net", _choice("lpips_net", self.net, C.LPIPS_NETS))
        _set(self, "weights", None if self.weights in (None, "") else str(self.weights))
        _set(self, "seed", _int("seed", self.seed))


MethodOptions = Union[PropagateOptions, ReverseOptions, LpipsOptions]
METHOD_OPTIONS: dict[str, type] = {cls.method: cls for cls in (PropagateOptions, ReverseOptions, LpipsOptions)}


# ------------------------------------------------------------------------------------------ one run


@dataclass(frozen=True)
class SegmentOptions:
    """Everything a run needs besides its inputs.

    method: "reverse" (RevSAM2), "lpips" (Zu et al.) or "propagate" (plain SAM2 propagation); its own settings
        are `method_options` (a ReverseOptions, LpipsOptions or PropagateOptions; None: that method's defaults).
    model, version, image_size, device, checkpoint, untrained, cache_dir, batch_size: which SAM2, where it runs
        (see `engine.SAM2Engine.from_pretrained`); `untrained` uses random weights (tests of the plumbing only).
        image_size None: the model's own (`models.default_image_size`). config: `NAME[,KEY=VALUE...]`, one of
        sam2's configs plus overrides, for a fine-tune given as `checkpoint` (`models.parse_config`).
    axis: slice direction ("auto" = the acquisition axis). preset: intensity window ("auto" = CT window for CT,
        percentiles otherwise). shots: support slices per support volume and structure.
    slice_range: which query slices are segmented: "off" (every slice; the default here, so scripted runs keep
        whole-volume results), "auto" (per structure, estimated from the supports, `extent.py`; the command
        line's default) or "FIRST:LAST" (inclusive indices along the query array's slice axis).
    extent_margin: mm added at each end of an "auto" range. extent_weights: AlexNet weights for the "auto"
        estimate (None: the LPIPS weights of an lpips run, then $FEWSHOTSAM2_LPIPS_WEIGHTS, then torchvision).
    feature_storage: the engine's image-feature cache: "auto", "float32" or "bfloat16" (`SAM2Engine.
        set_feature_storage`).
    overlap: who keeps a voxel two structures claim: "logits" (the structure with the higher SAM2 logit, as
        sam2's video predictor with non_overlap_masks=True), "order" (the one listed first) or "allow" (both:
        each structure keeps its whole mask, overlapping ones in separate layers; only a .seg.nrrd holds that,
        `check_overlap_output`). `non_overlap.py`.
    """

    method: str = _D["method"]
    model: str = _D["model"]
    version: str = _D["version"]
    image_size: Optional[int] = _D["image_size"]  # None: the model's own (1024; MedSAM2 512; --config's)
    device: str = _D["device"]
    checkpoint: Optional[str] = _D["checkpoint"]
    config: Optional[str] = _D["config"]
    untrained: bool = _D["untrained"]
    cache_dir: Optional[str] = _D["cache_dir"]
    batch_size: int = _D["batch_size"]
    axis: str = _D["axis"]
    preset: str = _D["preset"]
    shots: int = _D["shots"]
    slice_range: str = _D["slice_range"]
    extent_margin: float = _D["extent_margin"]
    extent_weights: Optional[str] = None  # no setting of its own: the command line passes --lpips-weights
    feature_storage: str = _D["feature_storage"]
    overlap: str = _D["overlap"]
    method_options: Optional[MethodOptions] = field(default=None)

    # the settings that decide which SAM2 engine is built (a run can reuse an engine when these agree)
    ENGINE_FIELDS: ClassVar[tuple[str, ...]] = ("model", "version", "image_size", "device", "checkpoint",
                                                "config", "untrained", "cache_dir", "batch_size")

    def __post_init__(self) -> None:
        method = _choice("method", self.method, C.METHODS)
        _set(self, "method", method)
        try:
            _set(self, "model", normalise_model_name(str(self.model)))
        except InputError:
            raise OptionError("model", f"must be one of {', '.join(C.MODELS)}, got {self.model!r}") from None
        _set(self, "version", _choice("version", self.version, C.VERSIONS))
        _set(self, "config", None if self.config in (None, "") else str(self.config))
        if self.version not in CARDS[self.model].versions:  # MedSAM2 is SAM2.1 only
            raise OptionError("version", f"must be {' or '.join(CARDS[self.model].versions)} for model "
                                         f"{self.model}, got {self.version!r}")
        if self.config is not None:
            try:
                parse_config(self.config)
            except InputError as exc:
                raise OptionError("config", str(exc).removeprefix("--config").lstrip(": ")) from None
            if not self.untrained and self.checkpoint in (None, ""):
                raise OptionError("config", "builds a fine-tune from its own weights: give them as a checkpoint file")
        if self.image_size in (None, ""):  # the model's own input size
            try:
                _set(self, "image_size", default_image_size(self.model, self.config))
            except InputError as exc:
                raise OptionError("config", str(exc).removeprefix("--config").lstrip(": ")) from None
        size = _int("image_size", self.image_size)
        if size % C.IMAGE_SIZE_STEP or not C.MIN_IMAGE_SIZE <= size <= C.MAX_IMAGE_SIZE:
            raise OptionError("image_size", f"must be a multiple of {C.IMAGE_SIZE_STEP} from {C.MIN_IMAGE_SIZE} "
                                            f"to {C.MAX_IMAGE_SIZE} (SAM2's training size), got {size}")
        _set(self, "image_size", size)
        _set(self, "device", _choice("device", self.device, C.DEVICES))
        _set(self, "untrained", bool(self.untrained))
        _set(self, "checkpoint", None if self.checkpoint in (None, "") else str(self.checkpoint))
        _set(self, "cache_dir", None if self.cache_dir in (None, "") else str(self.cache_dir))
        if self.untrained and self.checkpoint is not None:
            raise OptionError("untrained", "excludes a checkpoint: random weights or a checkpoint, not both")
        _set(self, "batch_size", _int("batch_size", self.batch_size, minimum=1))
        _set(self, "axis", _choice("axis", self.axis, C.AXES))
        _set(self, "preset", _choice("preset", self.preset, C.PRESETS))
        _set(self, "shots", _int("shots", self.shots, minimum=1))
        try:
            parse_slice_ranges(self.slice_range)
        except InputError as exc:  # the grammar's own words say what is wrong
            raise OptionError("slice_range", str(exc)) from None
        _set(self, "slice_range", str(self.slice_range).strip())
        _set(self, "extent_margin", _float("extent_margin", self.extent_margin, 0.0, 1000.0))
        _set(self, "extent_weights", None if self.extent_weights in (None, "") else str(self.extent_weights))
        _set(self, "feature_storage", _choice("feature_storage", self.feature_storage,
                                              ("auto", "float32", "bfloat16")))
        _set(self, "overlap", _choice("overlap", self.overlap, C.OVERLAP_RULES))
        expected = METHOD_OPTIONS[method]
        if self.method_options is None:
            _set(self, "method_options", expected())
        elif type(self.method_options) is not expected:
            raise OptionError("method_options", f"must be a {expected.__name__} for method '{method}', got a "
                                                f"{type(self.method_options).__name__}")

    # ---------------------------------------------------------------- flat names

    @classmethod
    def flat_names(cls) -> tuple[str, ...]:
        """Every flat setting name, common ones first (what `from_flat` accepts and `to_flat` returns)."""
        common = tuple(f.name for f in dataclasses.fields(cls) if f.name != "method_options")
        return common + tuple(name for o in METHOD_OPTIONS.values() for name in o.FLAT)

    @classmethod
    def flat_defaults(cls) -> dict[str, Any]:
        """Default of every flat setting (the Python API's: the settings table's; image_size None is the model's
        own size)."""
        out = {f.name: f.default for f in dataclasses.fields(cls) if f.name != "method_options"}
        for options_cls in METHOD_OPTIONS.values():
            defaults = options_cls()
            out.update({flat: getattr(defaults, name) for flat, name in options_cls.FLAT.items()})
        return out

    @classmethod
    def from_flat(cls, **settings: Any) -> "SegmentOptions":
        """Build from flat names (`top_k`, `lpips_net`, ...). A front end may pass every setting it holds: those of
        the other methods are checked too (a bad value is an error whatever the method) and then dropped. A name
        no method knows is a TypeError."""
        common_names = {f.name for f in dataclasses.fields(cls)} - {"method_options"}
        unknown = set(settings) - set(cls.flat_names())
        if unknown:
            raise TypeError(f"unknown option(s): {', '.join(sorted(unknown))}")
        common = {k: v for k, v in settings.items() if k in common_names}
        method = _choice("method", common.get("method", cls.method), C.METHODS)
        built = {m: o(**{name: settings[flat] for flat, name in o.FLAT.items() if flat in settings})
                 for m, o in METHOD_OPTIONS.items()}
        return cls(**common, method_options=built[method])

    def to_flat(self) -> dict[str, Any]:
        """The common settings and this method's own, under their flat names."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "method_options"}
        out.update({flat: getattr(self.method_options, name) for flat, name in type(self.method_options).FLAT.items()})
        return out

    def engine_settings(self) -> dict[str, Any]:
        """The settings that decide which SAM2 engine is built (equal settings: the engine can be reused)."""
        return {name: getattr(self, name) for name in self.ENGINE_FIELDS}


def options_from_args(args: "argparse.Namespace", method: Optional[str] = None) -> SegmentOptions:
    """The `SegmentOptions` of parsed arguments (`--top-k` is `top_k`); `method` overrides args.method."""
    flat = {s.name: getattr(args, s.name) for s in SETTINGS if hasattr(args, s.name)}
    if method is not None:
        flat["method"] = method
    if flat.get("lpips_weights"):  # the slice-range estimate uses the same AlexNet, whatever the method
        flat["extent_weights"] = flat["lpips_weights"]
    return SegmentOptions.from_flat(**flat)


def check_overlap_output(overlap: str, out: Optional[str], where: str = "--out") -> None:
    """`--overlap allow` keeps overlapping structures in separate layers, which only a .seg.nrrd output holds:
    any other output format is refused before any work (rather than flattening the overlaps silently)."""
    if overlap == "allow" and out is not None and not str(out).lower().endswith(C.LAYERED_OUTPUT):
        raise OptionError("overlap", f"allow keeps overlapping structures in separate layers, which only a "
                                     f"{C.LAYERED_OUTPUT} output holds; {where} {out} is not one (write "
                                     f"{C.LAYERED_OUTPUT}, or choose --overlap logits or order)")
