"""Errors the core raises on purpose.

`InputError` is bad user input: the command line prints its message as one line and exits with code 2;
the Slicer module shows it in a message box. `Cancelled` is raised by a progress callback to stop a run.
Running out of memory becomes an InputError that says what to change (`out_of_memory_as_input_error`).
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Iterator


class InputError(ValueError):
    """The input cannot be used; the message says what is wrong and what to do."""


class Cancelled(Exception):
    """The user cancelled the run (raised from a progress callback)."""


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA raises torch.OutOfMemoryError, numpy MemoryError; torch's CPU allocator and MPS a plain RuntimeError."""
    if isinstance(exc, MemoryError):
        return True
    torch = sys.modules.get("torch")  # nothing ran out of torch memory if torch was never imported
    if torch is not None and isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(s in str(exc) for s in ("can't allocate memory", "out of memory"))


@contextlib.contextmanager
def out_of_memory_as_input_error(settings: Any, written: str = "nothing was written") -> Iterator[None]:
    """Running out of memory (GPU or CPU) ends with one message naming what to change. `settings`: anything with
    image_size, batch_size and device (SegmentOptions, parsed arguments); `written`: what the user is left with."""
    try:
        yield
    except (MemoryError, RuntimeError) as exc:
        if not is_out_of_memory(exc):
            raise
        torch = sys.modules.get("torch")
        where = "GPU memory" if torch is not None and isinstance(exc, torch.OutOfMemoryError) else "memory"
        exc = None  # drop the frames holding the big tensors before freeing the cache
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()
        cpu = "" if settings.device == "cpu" else ", or --device cpu"
        raise InputError(
            f"out of {where} (--image-size {settings.image_size}, --batch-size {settings.batch_size}, "
            f"--device {settings.device}); try a smaller --image-size or --batch-size, a --slice-range of the "
            f"query{cpu}{'; ' + written if written else ''}") from None
