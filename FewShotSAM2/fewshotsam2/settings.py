"""One table of every run setting: its core name, command-line flag, Slicer parameter, type, default and help.

Everything else is derived from it: `SegmentOptions`' defaults (options.py), the command line's arguments
(`add_arguments`), the Slicer module's parameter node and its option mapping (FewShotSAM2.py), the process
runner's flags (FewShotSAM2Lib/process.py) and `fewshotsam2 extent`'s options. Pure Python, no torch: the Slicer
module reads it before the core's dependencies are installed.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Optional

from fewshotsam2 import constants as C

CACHE_ENV = "FEWSHOTSAM2_CACHE"  # the checkpoint cache folder (checkpoints.py)
FEATURE_CACHE_ENV = "FEWSHOTSAM2_FEATURE_CACHE"  # the on-disk feature cache's folder, or "off" (feature_cache.py)
FEATURE_CACHE_SIZE_ENV = "FEWSHOTSAM2_FEATURE_CACHE_GB"
DEFAULT_FEATURE_CACHE_GB = 4.0
LPIPS_WEIGHTS_ENV = "FEWSHOTSAM2_LPIPS_WEIGHTS"  # the LPIPS backbone weights (lpips_distance.py)

# the groups of the command line's --help, in order
GROUPS = {
    "model": "model",
    "slices": "slices",
    "reverse": "reverse propagation (--method reverse)",
    "lpips": "LPIPS matching (--method lpips)",
}


@dataclass(frozen=True)
class Setting:
    """One setting. `name` is the core's flat name (`SegmentOptions.from_flat`); the flag is derived from it
    (`top_k` -> `--top-k`). `default` is the Python API's; `user_default` (when given) is what the command line
    and the Slicer module start from. `gui` names the Slicer parameter node's member (None: not in the GUI), with
    `gui_range` (min, max) for a number; `gui_choices` the values its menu offers when they differ from
    `choices`."""

    name: str
    kind: type
    default: Any
    help: str
    group: str
    choices: tuple = ()
    metavar: Optional[str] = None
    gui: Optional[str] = None
    gui_range: Optional[tuple] = None
    gui_choices: tuple = ()
    user_default: Any = None
    method: Optional[str] = None  # the method whose own options hold it (None: common to every method)
    field: Optional[str] = None  # its field in that method's options type, when it differs from `name`

    @property
    def flag(self) -> str:
        return flag(self.name)

    @property
    def front_end_default(self) -> Any:
        return self.default if self.user_default is None else self.user_default

    @property
    def gui_default(self) -> Any:
        """The Slicer parameter's default: the front ends' one, else (None: image_size's "the model's own") the
        first entry of its menu."""
        value = self.front_end_default
        return value if value is not None or not (self.gui_choices or self.choices) else \
            (self.gui_choices or self.choices)[0]


def flag(name: str) -> str:
    """The command-line flag of a flat setting name (`top_k` -> `--top-k`)."""
    return "--" + name.replace("_", "-")


_SLICE_RANGE_HELP = (
    "which query slices to segment: auto (the command line's default) = per structure, the slices where the "
    "supports say it can be (aligned by anatomy, plus --extent-margin); off = every slice: use it for lesions and "
    "tumours, which do not sit at the same level in every patient; FIRST:LAST = inclusive indices along the query "
    "array's slice axis (see `fewshotsam2 extent`); per structure: e.g. 5=10:40,spleen=off (keyed by output value "
    "or name; structures not named take auto, or a bare RANGE in the list). Outside the range the output is "
    "background. The Python API's default is off")

SETTINGS: tuple[Setting, ...] = (
    Setting("method", str, "reverse", "reverse = reverse propagation (RevSAM2, default); lpips = LPIPS matching "
            "(Zu et al.); propagate = plain SAM2 propagation (baseline)", "method", C.METHODS, gui="method"),
    # ---- model
    Setting("model", str, "tiny", "SAM2 size: tiny (default, fastest), small, base_plus, large (most accurate), or "
            "medsam2 (MedSAM2: SAM2.1 tiny fine-tuned on medical 3D images, 512 px; its weights are for research "
            "and education, see the README). The official checkpoint is downloaded on first use into the cache "
            f"(--cache-dir or ${CACHE_ENV}; default ~/.cache/fewshotsam2/checkpoints); MedSAM2's is checked against "
            "its published SHA256", "model", gui="modelSize", gui_choices=C.MODELS),
    Setting("version", str, "2.1", f"SAM2 release: {' or '.join(C.VERSIONS)} (default 2.1)", "model", C.VERSIONS,
            gui="modelVersion"),
    # None: the model's own size (models.default_image_size); the GUI starts from its first menu entry (1024)
    Setting("image_size", int, None,
            f"SAM2 input size in pixels (default: the model's own, {C.DEFAULT_IMAGE_SIZE} for the SAM2 sizes, 512 for "
            f"medsam2; {C.MAX_IMAGE_SIZE} is the largest allowed; smaller is faster and less accurate; a multiple of "
            f"{C.IMAGE_SIZE_STEP}, at least {C.MIN_IMAGE_SIZE})", "model", metavar="N", gui="imageSize",
            gui_choices=C.IMAGE_SIZES),
    Setting("device", str, "auto", "where SAM2 runs (default auto: cuda, then mps, then cpu)", "model", C.DEVICES,
            gui="device"),
    Setting("checkpoint", str, None, "a local SAM2 checkpoint (.pt) matching --model/--version (or --config), "
            "instead of the cached download; loaded with weights_only and a strict key and shape check", "model",
            metavar="PATH"),
    Setting("config", str, None, "with --checkpoint: build the model from one of sam2's configs (sam2.1_hiera_t, "
            "_s, _b+, _l; sam2.1_hiera_t512 = MedSAM2's) plus overrides under model. (e.g. image_size=512), for any "
            "SAM2.1-architecture fine-tune; keys and shapes are checked strictly. The weights cannot say which "
            "model they are (tiny at 1024 px and MedSAM2 at 512 px have the same tensors): this choice, or "
            "--model, sets the config", "model", metavar="NAME[,KEY=VALUE...]"),
    Setting("cache_dir", str, None, f"checkpoint cache folder (default ${CACHE_ENV} or "
            "~/.cache/fewshotsam2/checkpoints)", "model", metavar="DIR"),
    Setting("untrained", bool, False, "use RANDOM weights instead of a checkpoint: for testing the plumbing only, "
            "the masks mean nothing", "model"),
    Setting("batch_size", int, 8, "slices per batch for the image encoder and for predictions that share memory "
            "(default 8, at least 1; on a CPU the encoder takes one slice at a time and predictions are batched "
            "only as far as memory allows)", "model", metavar="B"),
    Setting("feature_storage", str, "auto", "cached image features: auto (default) = bfloat16 on CUDA, float32 on "
            "the CPU unless the features kept between passes would pass 256 MiB (past that budget slices are "
            "encoded again); bfloat16 halves the memory at a small cost in exactness", "model",
            ("auto", "float32", "bfloat16")),
    # ---- slices
    Setting("axis", str, "auto", "slice direction: auto = the acquisition axis (coarsest spacing), or a named "
            "plane", "slices", C.AXES, gui="sliceAxis"),
    Setting("preset", str, "auto", "intensity window: auto = CT abdomen window for CT, 0.5-99.5 percentiles "
            "otherwise", "slices", C.PRESETS, gui="intensityPreset"),
    Setting("slice_range", str, "off", _SLICE_RANGE_HELP, "slices", metavar="auto|off|FIRST:LAST|S=RANGE,...",
            user_default="auto"),
    Setting("extent_margin", float, 15.0, "with --slice-range auto: widen each end of the estimated range by this "
            "many mm (default 15)", "slices", metavar="MM"),
    Setting("shots", int, 1, "support slices per support volume and structure: 1 = the middle labeled slice, K = K "
            "evenly spaced labeled slices (default 1)", "slices", metavar="K", gui="shots", gui_range=(1, 50)),
    Setting("overlap", str, "logits", "who keeps a voxel two structures claim: logits (default) = the structure "
            "with the higher SAM2 logit there, as sam2's video predictor with several objects; order = the one "
            "listed first in --labels; allow = both keep it (overlapping structures in separate layers: a .seg.nrrd "
            "output only)", "slices", C.OVERLAP_RULES, gui="overlap"),
    # ---- reverse propagation
    Setting("top_k", int, 5, "query slices kept as conditional slices, best reverse score first (default 5)",
            "reverse", metavar="K", gui="topK", gui_range=(1, 100), method="reverse"),
    Setting("min_score", float, 0.0, "only slices whose reverse score (mean Dice on the supports, 0..1) reaches "
            "this are kept; if none does, the best slice is used with a warning (default 0)", "reverse",
            metavar="PI", gui="minScore", gui_range=(0.0, 1.0), method="reverse"),
    Setting("keep_supports", bool, False, "keep the support slices in SAM2's memory during query self-propagation "
            "(default: only the conditional query slices, as in the paper)", "reverse", method="reverse"),
    # ---- LPIPS matching
    Setting("augmentations", int, 3, "augmented copies of each support slice in the matching set (default 3)",
            "lpips", metavar="N", gui="augmentations", gui_range=(0, 20), method="lpips"),
    Setting("lpips_net", str, "alex", "LPIPS backbone (default alex)", "lpips", C.LPIPS_NETS, gui="lpipsNet",
            method="lpips", field="net"),
    Setting("lpips_weights", str, None, "LPIPS backbone weights (torchvision-layout state dict) for offline use; "
            f"also ${LPIPS_WEIGHTS_ENV}; the slice-range estimate uses the same AlexNet", "lpips", metavar="PATH",
            method="lpips", field="weights"),
    Setting("seed", int, 0, "seed of the augmentations (default 0)", "lpips", method="lpips"),
)

BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}

# the settings `fewshotsam2 extent` (the slice-range estimate) takes, besides its inputs
EXTENT_SETTINGS = ("axis", "preset", "extent_margin", "lpips_weights", "device")


def defaults(names: Optional[tuple] = None) -> dict[str, Any]:
    """The Python API's default of each setting (all, or those named)."""
    return {s.name: s.default for s in SETTINGS if names is None or s.name in names}


def method_fields(method: str) -> dict[str, str]:
    """A method's own settings: flat name -> field name of its options type."""
    return {s.name: s.field or s.name for s in SETTINGS if s.method == method}


def add_arguments(parser: argparse.ArgumentParser, groups: tuple = tuple(GROUPS),
                  only: Optional[tuple] = None) -> None:
    """Add the settings of `groups` (or just those named in `only`) to a parser, with the front ends' defaults.
    Parsed names are the flat names (`--top-k` -> `args.top_k`), so `options.options_from_args` reads them back."""
    made: dict[str, argparse._ArgumentGroup] = {}
    for s in SETTINGS:
        if (only is not None and s.name not in only) or (only is None and s.group not in groups):
            continue
        if s.group == "method":
            target = parser
        else:
            target = made.get(s.group) or made.setdefault(s.group, parser.add_argument_group(GROUPS[s.group]))
        if s.kind is bool:
            target.add_argument(s.flag, dest=s.name, action="store_true", help=s.help)
            continue
        kwargs: dict[str, Any] = dict(dest=s.name, default=s.front_end_default, help=s.help.replace("%", "%%"))
        if s.kind in (int, float):
            kwargs["type"] = s.kind
        if s.choices:
            kwargs["choices"] = s.choices
        if s.metavar:
            kwargs["metavar"] = s.metavar
        target.add_argument(s.flag, **kwargs)


def command_arguments(values: dict[str, Any]) -> list[str]:
    """Command-line arguments for flat settings (None values left out; a true bool is its flag alone).
    A name that is no setting is a KeyError naming it."""
    args: list[str] = []
    for name, value in values.items():
        if value is None:
            continue
        s = BY_NAME[name]
        if s.kind is bool:
            if value:
                args.append(s.flag)
        else:
            args += [s.flag, str(value)]
    return args


def gui_settings() -> tuple[Setting, ...]:
    """The settings the Slicer module shows (its parameter node members)."""
    return tuple(s for s in SETTINGS if s.gui)


def from_gui(parameters: Any) -> dict[str, Any]:
    """Flat settings from an object holding the GUI's members (the parameter node), typed as the table says."""
    return {s.name: s.kind(getattr(parameters, s.gui)) for s in gui_settings()}
