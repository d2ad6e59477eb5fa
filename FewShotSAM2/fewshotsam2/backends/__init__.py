"""The few-shot methods. Each is a `base.Backend` with its own validated options type (see `options`)."""

from __future__ import annotations

from fewshotsam2.errors import InputError


def get_backend(method: str):
    """The backend of a method name ("propagate", "reverse", "lpips"); imported on first use."""
    if method == "propagate":
        from fewshotsam2.backends.propagate import PropagateBackend as cls
    elif method == "reverse":
        from fewshotsam2.backends.reverse import ReverseBackend as cls
    elif method == "lpips":
        from fewshotsam2.backends.lpips_matching import LpipsBackend as cls
    else:
        from fewshotsam2.constants import METHODS

        raise InputError(f"unknown method '{method}': choose one of {', '.join(METHODS)}")
    return cls()
