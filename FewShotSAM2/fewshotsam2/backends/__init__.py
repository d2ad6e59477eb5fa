"""The few-shot methods. Each is a `base.Backend` with its own validated options type (see `options`)."""

from __future__ import annotations

from fewshotsam2.backends.base import Backend
from fewshotsam2.backends.lpips_matching import LpipsBackend
from fewshotsam2.backends.propagate import PropagateBackend
from fewshotsam2.backends.reverse import ReverseBackend
from fewshotsam2.constants import METHODS
from fewshotsam2.errors import InputError

BACKENDS: dict[str, type[Backend]] = {"propagate": PropagateBackend, "reverse": ReverseBackend, "lpips": LpipsBackend}


def get_backend(method: str) -> Backend:
    """The backend of a method name ("propagate", "reverse", "lpips")."""
    if method not in BACKENDS:
        raise InputError(f"unknown method '{method}': choose one of {', '.join(METHODS)}")
    return BACKENDS[method]()
