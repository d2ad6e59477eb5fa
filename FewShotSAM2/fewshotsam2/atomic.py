"""Write files so that nobody ever sees half of one: write a temporary file next to the target, then rename.

`os.replace` within one folder is atomic on POSIX and Windows, so a reader sees the old file or the new one,
never a mix; when writing fails, the temporary file is removed and the target is untouched.
"""

from __future__ import annotations

import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union

PathLike = Union[str, "os.PathLike[str]"]


@contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path in `path`'s folder; on normal exit it is renamed over `path`, else removed.

    The temporary name ends with the target's extension in lower case (so writers that pick a format by
    extension, such as ITK's, still do, also for `O.NII.GZ`), is short (a name near the file system's limit
    still fits) and starts with a dot (hidden; `.tmp-` also marks leftovers of a killed process).
    """
    target = Path(path)
    extension = "".join(target.suffixes[-2:]).lower()  # ".nii.gz", ".seg.nrrd", ".csv"
    tmp = target.with_name(f".tmp-{secrets.token_hex(4)}{extension[:32]}")
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write `text` to `path` atomically (flushed to disk before the rename)."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding=encoding, newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
