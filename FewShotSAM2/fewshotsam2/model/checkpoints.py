"""The official SAM2 / SAM2.1 checkpoints: where they come from, where they are cached, how they are loaded.

A checkpoint is only ever loaded with `weights_only=True` into a model built from the matching packaged config,
with a strict state-dict match, so a wrong or truncated file is refused with a message instead of giving
silently bad masks.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import warnings
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from fewshotsam2 import constants
from fewshotsam2.errors import InputError
from fewshotsam2.io.atomic import atomic_path
from fewshotsam2.model import models
from fewshotsam2.model.models import normalise_model_name  # noqa: F401  (re-exported: checkpoints.normalise_model_name)
from fewshotsam2.settings import CACHE_ENV  # noqa: F401  (the one definition is the settings table's)

# torch, tqdm and the engine are imported inside the functions that need them: options (and so the command line's
# --help) and the Slicer module read this file before the core's dependencies are installed (the engine also
# imports this module: a cycle)
MODELS = constants.MODELS
VERSIONS = constants.VERSIONS

_BASE_URLS = {
    "2": "https://dl.fbaipublicfiles.com/segment_anything_2/072824",
    "2.1": "https://dl.fbaipublicfiles.com/segment_anything_2/092824",
}
_CONFIG_SUFFIX = {"tiny": "t", "small": "s", "base_plus": "b+", "large": "l"}


@dataclass(frozen=True)
class CheckpointInfo:
    model: str
    version: str
    config: str  # hydra config name inside the sam2 package
    filename: str
    url: str
    overrides: tuple[str, ...] = ()  # hydra overrides on top of the config ("model.KEY=VALUE")
    rope_follows_image_size: bool = False  # memory attention RoPE feat_sizes = image_size / 16 (MedSAM2's config)
    sha256: Optional[str] = None  # published by the checkpoint's publisher (models.ModelCard.sha256_source)
    image_size: int = 1024  # the size the model was trained at

    @property
    def key(self) -> str:
        return self.filename[: -len(".pt")]


def _registry() -> dict[str, CheckpointInfo]:
    out = {}
    for version in VERSIONS:
        prefix = "sam2" if version == "2" else "sam2.1"
        for model in MODELS:
            card = models.CARDS[model]
            if card.filename is not None:  # not one of Meta's sizes: its own file (below)
                continue
            filename = f"{prefix}_hiera_{model}.pt"
            info = CheckpointInfo(
                model=model,
                version=version,
                config=f"configs/{prefix}/{prefix}_hiera_{_CONFIG_SUFFIX[model]}.yaml",
                filename=filename,
                url=f"{_BASE_URLS[version]}/{filename}",
            )
            out[info.key] = info
    for card in models.CARDS.values():
        if card.filename is not None:
            info = CheckpointInfo(card.name, card.versions[0], card.config, card.filename, card.url,
                                  rope_follows_image_size=card.rope_follows_image_size, sha256=card.sha256,
                                  image_size=card.image_size)
            out[info.key] = info
    return out


CHECKPOINTS: dict[str, CheckpointInfo] = _registry()

def checkpoint_info(model: str, version: str = "2.1", config: Optional[str] = None,
                    checkpoint: Optional[str | Path] = None) -> CheckpointInfo:
    """The model to build and its official file. `config` (`--config NAME[,KEY=VALUE...]`, with a local
    `checkpoint`) builds any SAM2-architecture fine-tune from one of sam2's configs instead of `model`'s."""
    version = str(version)
    if version not in VERSIONS:
        raise InputError(f"unknown SAM2 version '{version}': choose one of {', '.join(VERSIONS)}")
    if config:
        custom = models.parse_config(config)
        name = Path(checkpoint).name if checkpoint else f"{custom.name}.pt"
        return CheckpointInfo(f"config {custom.name}", "2.1" if "sam2.1" in custom.config else "2", custom.config,
                              name, "", overrides=custom.overrides,
                              rope_follows_image_size=custom.rope_follows_image_size, image_size=custom.image_size)
    return CHECKPOINTS[checkpoint_key(model, version)]


def checkpoint_key(model: str, version: str = "2.1") -> str:
    name = normalise_model_name(model)
    card = models.CARDS[name]
    if card.filename is not None:
        if str(version) not in card.versions:
            raise InputError(f"model '{name}' ({card.title}) is a SAM{'/'.join(card.versions)} model; "
                             f"--version {version} does not apply to it")
        return card.filename[: -len(".pt")]
    prefix = "sam2" if str(version) == "2" else "sam2.1"
    return f"{prefix}_hiera_{name}"


def default_cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "fewshotsam2" / "checkpoints"


def _cache(cache_dir: Optional[str | Path]) -> Path:
    return Path(cache_dir).expanduser() if cache_dir else default_cache_dir()


def cached_checkpoint(model: str, version: str = "2.1", cache_dir: Optional[str | Path] = None) -> Optional[Path]:
    path = _cache(cache_dir) / checkpoint_info(model, version).filename
    return path if path.is_file() else None


def download_checkpoint(
    model: str,
    version: str = "2.1",
    cache_dir: Optional[str | Path] = None,
    progress: Optional[Callable[[int, int], None]] = None,
) -> Path:
    """Download an official checkpoint into the cache, to a temporary name renamed when complete.

    `progress(done_bytes, total_bytes)` is called while downloading; without it a tqdm bar is shown.
    """
    info = checkpoint_info(model, version)
    folder = _cache(cache_dir)
    target = folder / info.filename
    if target.is_file():
        return target
    _ensure_cache_folder(folder)
    bar = None
    announced = {}  # the server's Content-Length: a shorter file (a cut connection, a full disk) is not published

    def complete(tmp: Path) -> None:
        size = tmp.stat().st_size
        if announced.get("total") and size != announced["total"]:
            raise OSError(f"downloaded {size} of {announced['total']} bytes")

    digest = hashlib.sha256()
    try:
        with atomic_path(target, verify=complete) as tmp, open(tmp, "wb") as out, \
                urllib.request.urlopen(info.url, timeout=60) as response:
            total = announced["total"] = int(response.headers.get("Content-Length") or 0)
            if progress is None:
                from tqdm import tqdm

                bar = tqdm(total=total or None, unit="B", unit_scale=True, desc=f"Downloading {info.filename}")
            done = 0
            while True:
                chunk = response.read(1 << 20)
                if not chunk:
                    break
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
                else:
                    bar.update(len(chunk))
            out.flush()
            if total and done != total:
                raise InputError(f"download of {info.url} was incomplete ({done} of {total} bytes)")
            if info.sha256 and digest.hexdigest() != info.sha256:  # the temporary file is removed
                raise InputError(f"download of {info.url} has SHA256 {digest.hexdigest()}, not the published "
                                 f"{info.sha256}: damaged or replaced; nothing was kept")
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        raise InputError(
            f"cannot download the {info.key} checkpoint ({exc}). Download {info.url} yourself and put it at "
            f"{target} (or pass --checkpoint PATH, or set {CACHE_ENV} to a folder holding {info.filename})"
        ) from None
    finally:
        if bar is not None:
            bar.close()
    return target


def _ensure_cache_folder(folder: Path) -> None:
    """Create the cache folder if needed and make sure a file can be written in it; else one clear error."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        why = ("is a file, not a folder" if folder.exists() and not folder.is_dir()
               else "lies under a file" if isinstance(exc, (FileExistsError, NotADirectoryError))
               else "is not writable" if isinstance(exc, PermissionError) else (exc.strerror or str(exc)))
        raise InputError(f"checkpoint cache {folder} {why}; choose another folder with --cache-dir or ${CACHE_ENV}, "
                         "or pass --checkpoint PATH") from None


def check_cache_folder(cache_dir: Optional[str | Path] = None) -> None:
    """Raise InputError now if a download could not be stored in the cache (not a folder, not writable)."""
    _ensure_cache_folder(_cache(cache_dir))


def resolve_checkpoint(
    model: str,
    version: str = "2.1",
    checkpoint: Optional[str | Path] = None,
    cache_dir: Optional[str | Path] = None,
    download: bool = True,
) -> Path:
    """The checkpoint file to load: an explicit path, else the cached official one, else download it."""
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        if path.is_dir():
            raise InputError(f"checkpoint {path} is a folder; give the checkpoint file (.pt)")
        if not path.is_file():
            raise InputError(f"checkpoint file not found: {path}")
        return path
    cached = cached_checkpoint(model, version, cache_dir)
    if cached is not None:
        return cached
    if not download:
        info = checkpoint_info(model, version)
        raise InputError(
            f"the {info.key} checkpoint is not in the cache: download {info.url} and put it at "
            f"{_cache(cache_dir) / info.filename}, or pass --checkpoint PATH"
        )
    return download_checkpoint(model, version, cache_dir)


def load_state_dict(model: "object", path: str | Path, key: str) -> None:
    """Load a checkpoint into `model` strictly; a file that does not match is refused with one clear message."""
    import torch

    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, not a torch file, pickled code refused by weights_only
        raise InputError(f"cannot read checkpoint {path}: it is not a valid PyTorch weights file ({type(exc).__name__})")
    if isinstance(state, dict) and "model" in state:
        state = state["model"]
    if not isinstance(state, dict):
        raise InputError(f"checkpoint {path} holds no state dict")
    problem = state_dict_mismatch(model.state_dict(), state)
    if problem:
        raise InputError(f"checkpoint {path} does not match the {key} model: {problem}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "state dict mismatch"
        raise InputError(f"checkpoint {path} does not match the {key} model: {first}") from None


def state_dict_mismatch(expected: dict, given: dict) -> str:
    """'' when `given` has exactly `expected`'s keys with the same shapes; else what differs, naming the first key."""
    missing = [k for k in expected if k not in given]
    extra = [k for k in given if k not in expected]
    shapes = [k for k in expected if k in given and hasattr(given[k], "shape")
              and tuple(given[k].shape) != tuple(expected[k].shape)]
    more = lambda n: f" (and {n - 1} more)" if n > 1 else ""  # noqa: E731
    if missing:
        return f"missing key '{missing[0]}'{more(len(missing))}"
    if extra:
        return f"unexpected key '{extra[0]}'{more(len(extra))}"
    if shapes:
        k = shapes[0]
        return (f"tensor '{k}' has shape {tuple(given[k].shape)} in the file, {tuple(expected[k].shape)} in the "
                f"model{more(len(shapes))} (another model size?)")
    return ""


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def import_checkpoint(
    path: str | Path, model: str, version: str = "2.1", cache_dir: Optional[str | Path] = None
) -> Path:
    """Validate a local checkpoint against the model it claims to be, then copy it into the cache."""
    from fewshotsam2.model.engine import build_sam2_model

    info = checkpoint_info(model, version)
    src = Path(path).expanduser()
    if src.is_dir():
        raise InputError(f"checkpoint {src} is a folder; give the checkpoint file (.pt)")
    if not src.is_file():
        raise InputError(f"checkpoint file not found: {src}")
    # the weights do not depend on the input size (position embeddings are interpolated): the smallest model checks them
    net = build_sam2_model(info, image_size=constants.MIN_IMAGE_SIZE, device="cpu")
    load_state_dict(net, src, info.key)
    if info.sha256 and file_sha256(src) != info.sha256:
        # the same architecture fits (another MedSAM2 file, a fine-tune): used as this model, said once
        warnings.warn(f"{src.name} is not the published {info.filename} (its SHA256 differs); it fits the {info.key} "
                      f"architecture and is imported as {info.filename}", stacklevel=2)
    folder = _cache(cache_dir)
    _ensure_cache_folder(folder)
    with atomic_path(folder / info.filename) as tmp:
        shutil.copyfile(src, tmp)
    return folder / info.filename


def clear_cache(cache_dir: Optional[str | Path] = None) -> int:
    """Delete cached checkpoints (and leftover partial downloads); returns how many files were removed."""
    folder = _cache(cache_dir)
    removed = 0
    if folder.is_dir():
        for f in folder.iterdir():
            if f.is_file() and (f.suffix == ".pt" or f.name.endswith(".part") or f.name.startswith(".tmp-")):
                f.unlink()
                removed += 1
    return removed
