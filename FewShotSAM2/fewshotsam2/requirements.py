"""Optional packages a run may need, checked before use so that a missing one is one clear error line.

`lpips` is needed by `--slice-range auto` (the command line's default: the range estimate compares slices with
AlexNet LPIPS features) and by `--method lpips`; a plain `ModuleNotFoundError` traceback from deep inside a run
would tell the user neither why nor what to do.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from fewshotsam2.errors import InputError

LPIPS_REQUIREMENT = "lpips==0.1.4"


def require_lpips() -> ModuleType:
    """The `lpips` module; InputError (one line: what needs it, how to install it) when it is not installed."""
    try:
        missing = importlib.util.find_spec("lpips") is None
    except ValueError:  # sys.modules["lpips"] is None: blocked on purpose
        missing = True
    if missing:
        raise InputError(
            "the Python package 'lpips' is not installed; --slice-range auto (the default) and --method lpips "
            f"need it: install it with `pip install {LPIPS_REQUIREMENT}`, or give --slice-range off"
        )
    try:
        return importlib.import_module("lpips")
    except ImportError as exc:  # installed but broken (e.g. a dependency of it is missing)
        raise InputError(f"the Python package 'lpips' cannot be imported: {exc}") from exc
