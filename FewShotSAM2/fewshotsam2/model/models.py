"""Which weights SAM2 runs with: Meta's SAM2/SAM2.1 sizes, MedSAM2, or any SAM2.1-architecture fine-tune.

Pure Python (no torch or sam2 import): the command line's help and the Slicer module's *Model* section read the
cards below before the core's dependencies are installed.

MedSAM2 (bowang-lab, 2025) is SAM2.1 tiny fine-tuned on medical 3D images and videos. Its config
(`sam2.1_hiera_t512.yaml` in its repository) differs from sam2's `sam2.1_hiera_t.yaml` only in `image_size: 512`
and the memory attention's RoPE `feat_sizes: [32, 32]` (the stride-16 feature grid at 512 px); its checkpoint is
`{"model": state_dict}` like Meta's. So it is built here from sam2's own tiny config with those two overrides (the
RoPE grid follows the image size, so another `--image-size` stays consistent).

The weights cannot tell which model they are: SAM2.1 tiny at 1024 px and MedSAM2 at 512 px have the same keys and
shapes (the position embedding is interpolated, the RoPE tables are computed at run time). The user's choice sets
the config; a known file is recognised by its SHA256 where the publisher gives one.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from fewshotsam2.constants import MODELS
from fewshotsam2.errors import InputError


@dataclass(frozen=True)
class ModelCard:
    """What a person (and the downloader) needs to know about one model's weights."""

    name: str  # the --model value
    title: str  # what a person reads
    licence: str
    size_mb: int  # the checkpoint file, about
    image_size: int  # the input size the model was trained at (the default --image-size)
    filename: Optional[str] = None  # in the checkpoint cache; None: Meta's per-version names (checkpoints.py)
    url: Optional[str] = None
    sha256: Optional[str] = None
    sha256_source: str = ""  # where the SHA256 comes from
    config: Optional[str] = None  # sam2's packaged config; None: Meta's per-version configs (checkpoints.py)
    rope_follows_image_size: bool = False  # set the memory attention's RoPE feat_sizes to image_size / 16
    versions: tuple[str, ...] = ("2.1", "2")
    notes: str = ""


_META_LICENCE = "Apache-2.0 (Meta's SAM2 / SAM2.1 checkpoints)"
MEDSAM2_REVISION = "e4a6f35edd7e091619cbc0750f462f1574e23955"  # wanglab/MedSAM2 on Hugging Face

CARDS: dict[str, ModelCard] = {
    "tiny": ModelCard("tiny", "SAM2.1 tiny", _META_LICENCE, 156, 1024),
    "small": ModelCard("small", "SAM2.1 small", _META_LICENCE, 184, 1024),
    "base_plus": ModelCard("base_plus", "SAM2.1 base+", _META_LICENCE, 324, 1024),
    "large": ModelCard("large", "SAM2.1 large", _META_LICENCE, 898, 1024),
    "medsam2": ModelCard(
        "medsam2", "MedSAM2 (SAM2.1 tiny fine-tuned on medical 3D images, 512 px)",
        licence=("model card: CC BY-SA 4.0 in its metadata, and its text restricts the weights to research and "
                 "education; the MedSAM2 code is Apache-2.0. Read the card before any clinical or commercial use"),
        size_mb=156, image_size=512,
        filename="MedSAM2_latest.pt",
        url=f"https://huggingface.co/wanglab/MedSAM2/resolve/{MEDSAM2_REVISION}/MedSAM2_latest.pt",
        sha256="c92743b99f00d078bf32a3afcc38aaa9faf1c1692dffe3eaa7a90938c1991060",
        sha256_source=(f"the Git LFS SHA256 Hugging Face publishes for MedSAM2_latest.pt at wanglab/MedSAM2 revision "
                       f"{MEDSAM2_REVISION[:7]} (156,040,129 bytes)"),
        config="configs/sam2.1/sam2.1_hiera_t.yaml",
        rope_follows_image_size=True,
        versions=("2.1",),
        notes="MedSAM2_latest.pt, the publisher's recommended file; other MedSAM2 files load with --checkpoint FILE"),
}
MODEL_NAMES: tuple[str, ...] = tuple(CARDS)

# the config names MedSAM2's repository uses, recognised by --config
_CONFIG_ALIASES = {"sam2.1_hiera_t512": ("configs/sam2.1/sam2.1_hiera_t.yaml", 512, True)}


def card(model: str) -> ModelCard:
    return CARDS[model]


_MODEL_ALIASES = {"medsam": "medsam2", "medsam-2": "medsam2", "medsam_2": "medsam2", "t": "tiny", "s": "small", "b+": "base_plus", "base+": "base_plus", "baseplus": "base_plus",
                  "base-plus": "base_plus", "b": "base_plus", "l": "large"}


def normalise_model_name(model: str) -> str:
    """A model name or its alias ("MedSAM", "b+") -> the model's name in constants.MODELS."""
    name = _MODEL_ALIASES.get(model.lower(), model.lower())
    if name not in MODELS:
        raise InputError(f"unknown model '{model}': choose one of {', '.join(MODELS)}")
    return name


def default_image_size(model: str, config: Optional[str] = None) -> int:
    """The input size a model was trained at: the default when --image-size is not given."""
    if config:
        return parse_config(config).image_size
    try:
        model = normalise_model_name(model)
    except InputError:
        return 1024  # refused with its own message where the model is checked
    return CARDS[model].image_size


@dataclass(frozen=True)
class CustomConfig:
    """`--config NAME[,KEY=VALUE,...]`: one of sam2's packaged configs plus overrides under `model.`."""

    config: str  # hydra config name inside the sam2 package
    overrides: tuple[str, ...] = field(default=())  # hydra overrides, "model.KEY=VALUE"
    image_size: int = 1024
    rope_follows_image_size: bool = False

    @property
    def name(self) -> str:
        return self.config.rsplit("/", 1)[-1][: -len(".yaml")]


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets (a value may be a list: feat_sizes=[32,32])."""
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += ch in "[{("
        depth -= ch in "]})"
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return [p.strip() for p in parts]


def packaged_configs() -> list[str]:
    """The hydra names of the configs sam2 ships (`configs/sam2.1/sam2.1_hiera_t.yaml`, ...)."""
    spec = importlib.util.find_spec("sam2")
    if spec is None or not spec.submodule_search_locations:
        return []
    root = Path(list(spec.submodule_search_locations)[0])
    return sorted(str(p.relative_to(root)) for p in (root / "configs").rglob("*.yaml"))


def parse_config(text: str) -> CustomConfig:
    """`NAME[,KEY=VALUE,...]`: NAME is a config sam2 ships (`sam2.1_hiera_t`, `sam2.1_hiera_b+.yaml`,
    `configs/sam2.1/sam2.1_hiera_l.yaml`) or MedSAM2's `sam2.1_hiera_t512`; KEY a setting under `model.`
    (`image_size=512`, `memory_attention.layer.self_attention.feat_sizes=[32,32]`). Unknown keys are refused when
    the model is built (hydra names them)."""
    parts = _split_top_level(str(text))
    name, items = parts[0], [p for p in parts[1:] if p]
    if not name:
        raise InputError("--config: give a config name (e.g. sam2.1_hiera_t, or sam2.1_hiera_t512 for MedSAM2)")
    stem = re.sub(r"\.yaml$", "", name.rsplit("/", 1)[-1])
    if stem in _CONFIG_ALIASES:
        config, size, rope = _CONFIG_ALIASES[stem]
    else:
        shipped = packaged_configs()
        matches = [c for c in shipped if c.rsplit("/", 1)[-1][: -len(".yaml")] == stem]
        if not matches:
            names = ", ".join(sorted({c.rsplit('/', 1)[-1][:-5] for c in shipped})) or "none found: is sam2 installed?"
            raise InputError(f"--config {name}: not a config sam2 ships; choose one of {names}, or "
                             "sam2.1_hiera_t512 (MedSAM2)")
        config, size, rope = matches[-1], 1024, False
    overrides = []
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().removeprefix("++").removeprefix("+")
        key = key.removeprefix("model.")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key) or not value.strip():
            raise InputError(f"--config: '{item}' is not KEY=VALUE (a setting under model., e.g. image_size=512)")
        if key == "image_size":
            try:
                size = int(value)
            except ValueError:
                raise InputError(f"--config: image_size must be a whole number, got {value!r}") from None
            continue  # the engine sets the image size (it is also --image-size's default)
        overrides.append(f"model.{key}={value.strip()}")
    return CustomConfig(config, tuple(overrides), size, rope)
