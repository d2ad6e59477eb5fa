"""Write files so that nobody ever sees half of one: write a temporary file next to the target, check it, rename.

`os.replace` within one folder is atomic on POSIX and Windows, so a reader sees the old file or the new one,
never a mix; when writing fails, the temporary file is removed and the target is untouched.

Before the rename the temporary file is flushed to disk (`fsync`), must not be empty, and the caller's `verify`
(e.g. read the image back) must accept it: some writers (ITK's) do not report a full disk and leave a truncated
file, which must never be published. `publish_together()` holds the renames of several files until all of them
are written and checked (an output and its scores: both or neither).

A symlink target is written through: the temporary file goes next to the file the link points to and replaces
it, so the link keeps pointing at the new content (replacing the link itself would leave its target stale).
"""

from __future__ import annotations

import contextvars
import errno
import os
import re
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

from fewshotsam2.errors import InputError

PathLike = Union[str, "os.PathLike[str]"]
TMP_PREFIX = ".tmp-"  # every temporary name starts so: `stale_temporaries` finds a killed process's leftovers

# the (temporary, target) renames held by an open `publish_together()`, else None
_held: contextvars.ContextVar[Optional[list]] = contextvars.ContextVar("fewshotsam2_held_renames", default=None)


class IncompleteWrite(OSError):
    """A written file is shorter than what was written (a full disk the writer did not report)."""


class CannotWrite(InputError):
    """A file could not be written (full disk, read-only folder); nothing was published. One line, exit code 2."""

    def __init__(self, path: PathLike, reason: str) -> None:
        super().__init__(f"{os.fspath(path)}: cannot write ({reason}); nothing was written")
        self.path = os.fspath(path)
        self.reason = reason


def write_target(path: PathLike) -> Path:
    """The file a write to `path` replaces: `path` itself, or, for a symlink, the file it points to."""
    p = Path(path)
    return Path(os.path.realpath(p)) if os.path.islink(p) else p


def disk_problem(exc: BaseException, folder: PathLike) -> str:
    """A short reason for a failed write; names a full disk (and its free space) when that is the cause."""
    try:
        st = os.statvfs(folder)
        free = st.f_bavail * st.f_frsize
    except (OSError, AttributeError):
        free = None
    full = getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or (
        isinstance(exc, IncompleteWrite) and free is not None and free < 2**20)
    if full:
        where = f"{free // 1024} KiB free in {folder}" if free is not None else str(folder)
        return f"no space left on the device ({where}); free some space or choose another folder"
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text


def _settle(tmp: Path, verify: Optional[Callable[[Path], None]], allow_empty: bool) -> None:
    """Flush `tmp` to disk and check it before it may be renamed into place."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)  # a delayed-allocation file system reports a full disk here, not at write()
    finally:
        os.close(fd)
    if not allow_empty and os.path.getsize(tmp) == 0:
        raise IncompleteWrite(errno.EIO, "the written file is empty")
    if verify is not None:
        verify(tmp)


def _fsync_folder(folder: Path) -> None:
    if os.name != "posix":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)  # the rename itself survives a power cut
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: PathLike, verify: Optional[Callable[[Path], None]] = None,
                allow_empty: bool = False) -> Iterator[Path]:
    """Yield a temporary path in `path`'s folder; on normal exit it is checked and renamed over `path`, else removed.

    The temporary name ends with the target's extension in lower case (so writers that pick a format by
    extension, such as ITK's, still do, also for `O.NII.GZ`), is short (a name near the file system's limit
    still fits) and starts with a dot (hidden; `.tmp-` also marks leftovers of a killed process).
    `verify(tmp)` raises when the written file is not what was meant (read back and compared); the file is also
    fsync'ed and must not be empty. A symlink `path` is written through to its target.
    """
    target = write_target(path)
    extension = "".join(Path(path).suffixes[-2:]).lower()  # ".nii.gz", ".seg.nrrd", ".csv"
    tmp = target.with_name(f"{TMP_PREFIX}{secrets.token_hex(4)}{extension[:32]}")
    held = _held.get()
    handed_over = False
    try:
        yield tmp
        _settle(tmp, verify, allow_empty)
        if held is not None:
            held.append((tmp, target))
            handed_over = True
        else:
            os.replace(tmp, target)
            _fsync_folder(target.parent)
    finally:
        if not handed_over and tmp.exists():
            tmp.unlink()


@contextmanager
def publish_together() -> Iterator[None]:
    """Hold the renames of every `atomic_path` inside this block until the block ends without error: then all
    files are renamed into place, else all temporaries are removed and no target is touched."""
    held: list = []
    token = _held.set(held)
    try:
        yield
    except BaseException:
        for tmp, _ in held:
            if tmp.exists():
                tmp.unlink()
        raise
    finally:
        _held.reset(token)
    try:
        for tmp, target in held:
            os.replace(tmp, target)
            _fsync_folder(target.parent)
    finally:
        for tmp, _ in held:
            if tmp.exists():
                tmp.unlink()


def write_text_atomic(path: PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write `text` to `path` atomically (flushed to disk and its size checked before the rename); the file follows
    the umask. Raises CannotWrite (an InputError: exit code 2) when it cannot be written."""
    def complete(tmp: Path) -> None:
        if tmp.stat().st_size != len(text.encode(encoding)):
            raise IncompleteWrite(errno.EIO, f"{tmp.stat().st_size} of {len(text.encode(encoding))} bytes written")

    try:
        with atomic_path(path, verify=complete, allow_empty=not text) as tmp:
            with open(tmp, "w", encoding=encoding, newline="") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
    except OSError as e:  # a full disk or a read-only folder: one line (CannotWrite), not a traceback
        raise CannotWrite(path, disk_problem(e, write_target(path).parent)) from None


_TMP_NAME = re.compile(r"^\.tmp-[0-9a-f]{8}(\.[a-z0-9]+){0,2}$|^\.batch-summary-[A-Za-z0-9_]{8}\.csv$")


def stale_temporaries(folder: PathLike, older_than: float) -> list[Path]:
    """This package's temporary files in `folder` (its naming scheme only: `.tmp-` and 8 hex digits, plus the
    `.batch-summary-XXXXXXXX.csv` of earlier versions) last modified before the time `older_than`: leftovers of
    a process killed while writing (SIGKILL, a power cut). A writer in progress keeps its file's time recent."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    out = []
    for e in entries:
        try:
            if _TMP_NAME.match(e.name) and e.is_file(follow_symlinks=False) and e.stat().st_mtime < older_than:
                out.append(Path(e.path))
        except OSError:
            continue
    return sorted(out)
