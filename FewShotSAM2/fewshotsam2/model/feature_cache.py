"""SAM2 image features on disk, so that a refine (or any later run on the same slices) encodes nothing again.

One file per slice, named by a hash of what determines its features: the windowed slice pixels (float32, as the
engine receives them), the model and its checkpoint (file, size and modification time; "random weights" for
`--untrained`), the image size, the device type and sam2's version. Stored as the encoder computes them: bfloat16
under CUDA autocast (what sam2 itself computes there), float32 elsewhere, so an entry is lossless and a result never
depends on the cache: a run with a cache, warm or cold, gives the same logits as a run without one, and as sam2's
own video predictor. (Rounding CPU features to bfloat16 would halve the files but move the logits by far more than
float precision; the size bound below is in bytes either way.)

Safety: files are written to a temporary name and renamed (a reader sees a whole file or none, also with two
processes writing the same entry); an entry that cannot be read, or that names another model, is encoded again
with a warning and never used. Size: bounded (`--feature-cache-size`, default 4 GB); past it the least recently
used entries (file modification time, refreshed on every read) are deleted. Folder: `--feature-cache DIR`,
$FEWSHOTSAM2_FEATURE_CACHE, default ~/.cache/fewshotsam2/features; `off` turns the cache off.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Hashable, Optional, Sequence

import sam2
import torch

from fewshotsam2.errors import InputError
from fewshotsam2.io.paths import writable_cache_folder

if TYPE_CHECKING:
    from fewshotsam2.model.engine import SAM2Engine

from fewshotsam2.settings import DEFAULT_FEATURE_CACHE_GB as DEFAULT_SIZE_GB  # noqa: E402  (defined with the settings)
from fewshotsam2.settings import FEATURE_CACHE_ENV, FEATURE_CACHE_SIZE_ENV  # noqa: E402,F401
FORMAT = "fewshotsam2-features-2"  # 2: stored in the encoder's dtype (1 rounded CPU features to bf16)
_STALE_TMP_SECONDS = 3600  # a temporary file this old is a killed writer's leftover


def default_folder() -> Path:
    return Path.home() / ".cache" / "fewshotsam2" / "features"


class FeatureCache:
    """A folder of per-slice image features, bounded to `max_bytes` with least-recently-used eviction."""

    def __init__(self, folder: str | Path, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise InputError(f"the feature cache size must be positive, got {max_bytes} bytes")
        self.folder = Path(folder).expanduser()
        self.max_bytes = int(max_bytes)
        self._size: Optional[int] = None  # bytes in the folder, scanned on the first write

    @classmethod
    def from_settings(cls, folder: Optional[str] = None, size_gb: Optional[float] = None) -> Optional["FeatureCache"]:
        """The cache the settings ask for (None when "off"): `folder`, else $FEWSHOTSAM2_FEATURE_CACHE, else the
        default folder; `size_gb`, else $FEWSHOTSAM2_FEATURE_CACHE_GB, else 4."""
        where = folder if folder is not None else os.environ.get(FEATURE_CACHE_ENV) or str(default_folder())
        if where.strip().lower() == "off":
            return None
        if size_gb is None:
            text = os.environ.get(FEATURE_CACHE_SIZE_ENV, "")
            try:
                size_gb = float(text) if text.strip() else DEFAULT_SIZE_GB
            except ValueError:
                raise InputError(f"${FEATURE_CACHE_SIZE_ENV} must be a number of GB, got {text!r}") from None
        if not size_gb > 0:
            raise InputError(f"the feature cache size must be more than 0 GB, got {size_gb:g}")
        return cls(writable_cache_folder(where), int(size_gb * 1e9))

    # ------------------------------------------------------------------ keys
    @staticmethod
    def identity(engine: "SAM2Engine") -> str:
        """What besides the pixels decides a slice's features."""
        if engine.checkpoint_path is None:
            weights = "random-weights-seed0"  # SAM2Engine.with_random_weights
        else:
            p = Path(engine.checkpoint_path).resolve()
            st = p.stat()
            weights = f"{p}|{st.st_size}|{st.st_mtime_ns}"
        return (f"{FORMAT}|sam2 {getattr(sam2, '__version__', '?')}|{engine.info.key}|{weights}|"
                f"{engine.image_size}px|{engine.device.type}|autocast={engine._autocast}")

    def _path(self, engine: "SAM2Engine", key: Hashable) -> tuple[Path, str]:
        identity = self.identity(engine)
        image = engine._image(key)
        h = hashlib.blake2b(digest_size=20)
        h.update(identity.encode())
        h.update(repr(image.shape).encode())
        h.update(image.tobytes())
        return self.folder / f"{h.hexdigest()}.pt", identity

    # ------------------------------------------------------------------ reading
    def fill(self, engine: "SAM2Engine", keys: Sequence[Hashable]) -> list:
        """Put the cached features of `keys` into the engine's run cache; return the keys still to encode."""
        rest = []
        for key in keys:
            path, identity = self._path(engine, key)
            levels = self._load(path, identity, engine)
            if levels is None:
                rest.append(key)
                continue
            _ensure_pos_enc(engine, levels)
            engine._features[key] = [t.to(engine.feature_device, engine.feature_dtype) for t in levels]
            engine.cache_hits += 1
        return rest

    def _load(self, path: Path, identity: str, engine: "SAM2Engine") -> Optional[list[torch.Tensor]]:
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            return None
        except Exception as exc:  # truncated, garbage, another format: never trusted
            return self._reject(path, f"unreadable ({type(exc).__name__})")
        problem = _check(entry, identity, engine)
        if problem:
            return self._reject(path, problem)
        try:
            os.utime(path)  # least recently used = oldest modification time
        except OSError:
            pass
        return entry["levels"]

    def _reject(self, path: Path, why: str) -> None:
        warnings.warn(f"feature cache entry {path.name} is {why}: that slice is encoded again", stacklevel=4)
        try:
            path.unlink()
        except OSError:
            pass
        return None

    # ------------------------------------------------------------------ writing
    def put(self, engine: "SAM2Engine", key: Hashable, levels: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Store one slice's features (levels of batch 1) as the encoder computed them; return them as the run
        uses them (the engine's storage dtype and device), unchanged by the trip to disk."""
        stored = [t.detach().to("cpu", stored_dtype(engine)).contiguous().clone() for t in levels]
        path, identity = self._path(engine, key)
        tmp = path.with_name(f".tmp-{os.getpid()}-{secrets.token_hex(4)}.pt")
        try:
            torch.save({"format": FORMAT, "identity": identity, "levels": stored}, tmp)
            size = tmp.stat().st_size
            os.replace(tmp, path)  # atomic: a reader sees the old entry, the new one or none
        except (OSError, RuntimeError) as exc:  # torch.save raises RuntimeError for a folder removed meanwhile
            why = getattr(exc, "strerror", None) or str(exc).splitlines()[0]
            warnings.warn(f"feature cache {self.folder}: cannot write ({why}); going on without storing",
                          stacklevel=3)
            size = 0
        finally:
            if tmp.exists():
                tmp.unlink()
        if size:
            if self._size is None:
                self._size = self._scan()[1]
            else:
                self._size += size
            if self._size > self.max_bytes:
                self.evict()
        return [t.to(engine.feature_device, engine.feature_dtype) for t in stored]

    def _scan(self) -> tuple[list[tuple[float, int, Path]], int]:
        entries = []
        now = time.time()
        for p in self.folder.iterdir():
            try:
                st = p.stat()
            except OSError:
                continue  # deleted by another process meanwhile
            if p.name.startswith(".tmp-"):
                if now - st.st_mtime > _STALE_TMP_SECONDS:
                    _unlink(p)
                continue
            if p.suffix == ".pt":
                entries.append((st.st_mtime, st.st_size, p))
        return entries, sum(e[1] for e in entries)

    def evict(self) -> None:
        """Delete the least recently used entries until the folder holds at most 90% of `max_bytes`."""
        entries, total = self._scan()
        target = int(self.max_bytes * 0.9)
        for mtime, size, p in sorted(entries, key=lambda e: e[0]):
            if total <= target:
                break
            _unlink(p)
            total -= size
        self._size = total

    def size(self) -> int:
        return self._scan()[1]


def _unlink(p: Path) -> None:
    try:
        p.unlink()
    except OSError:
        pass


def _check(entry, identity: str, engine: "SAM2Engine") -> str:
    """Why a loaded entry must not be used ('' when it can)."""
    if not isinstance(entry, dict) or entry.get("format") != FORMAT:
        return "not a feature entry of this version"
    if entry.get("identity") != identity:
        return "of another model, checkpoint or image size"
    levels = entry.get("levels")
    n = engine.model.num_feature_levels
    if not isinstance(levels, list) or len(levels) != n or not all(isinstance(t, torch.Tensor) for t in levels):
        return "incomplete"
    sizes = _level_sizes(engine)
    for t, (h, w) in zip(levels, sizes):
        if t.dtype != stored_dtype(engine) or t.ndim != 4 or t.shape[0] != 1 or tuple(t.shape[-2:]) != (h, w):
            return "of the wrong shape"
        if not torch.isfinite(t).all():
            return "damaged (not finite)"
    return ""


def stored_dtype(engine: "SAM2Engine") -> torch.dtype:
    """The dtype the encoder computes features in: bfloat16 under CUDA autocast, float32 elsewhere (lossless)."""
    return torch.bfloat16 if engine._autocast else torch.float32


def _level_sizes(engine: "SAM2Engine") -> list[tuple[int, int]]:
    """The spatial size of each feature level the engine uses (highest resolution first)."""
    s = engine.image_size
    n = engine.model.num_feature_levels
    # the backbone's FPN levels are at strides 4, 8, 16 (SAM2: the last `num_feature_levels` of them)
    return [(s // 2 ** (2 + i), s // 2 ** (2 + i)) for i in range(3)][-n:]


def _ensure_pos_enc(engine: "SAM2Engine", levels: Sequence[torch.Tensor]) -> None:
    """The positional encodings the engine takes from its first encoder call, when every slice came from disk:
    the neck's sine encoding depends on each level's size only (computed as the neck does: in the features'
    dtype, then kept in float32 as the engine keeps them)."""
    if engine._pos_enc is not None:
        return
    pe = engine.model.image_encoder.neck.position_encoding
    dtype = torch.bfloat16 if engine._autocast else torch.float32
    with torch.inference_mode():
        engine._pos_enc = [pe(t.to(engine.device, dtype)).to(dtype)[:1].float() for t in levels]
    engine._feat_sizes = [(p.shape[-2], p.shape[-1]) for p in engine._pos_enc]
