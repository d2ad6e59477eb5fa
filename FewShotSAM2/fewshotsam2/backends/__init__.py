"""The few-shot methods. Each is a `base.Backend` with its own validated options type (see `options`)."""

from __future__ import annotations

from ..errors import InputError


def get_backend(method: str):
    """The backend of a method name ("propagate", "reverse", "lpips"); imported on first use."""
    if method == "propagate":
        from .propagate import PropagateBackend as cls
    elif method == "reverse":
        from .reverse import ReverseBackend as cls
    elif method == "lpips":
        from .lpips_matching import LpipsBackend as cls
    else:
        from ..constants import METHODS

        raise InputError(f"unknown method '{method}': choose one of {', '.join(METHODS)}")
    return cls()
