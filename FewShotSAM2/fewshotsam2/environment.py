"""Every environment variable the package reads, checked once before any work (the command line calls
`check_environment` with the options): a bad value is one clear error, not a traceback after the model is built or
a silent default.

| variable | read by | must be |
| --- | --- | --- |
| FEWSHOTSAM2_FEATURE_CACHE_MB | resources.cpu_feature_cache_bytes | a finite number >= 0 |
| FEWSHOTSAM2_SAMPLE_URL | sample_data (mirror of the sample files) | an http(s):// or file:// address |
| FEWSHOTSAM2_DATA | sample_data.locate | a folder (or a path to create one at) |
| FEWSHOTSAM2_CACHE | checkpoints.default_cache_dir | a folder (or a path to create one at) |
| FEWSHOTSAM2_LPIPS_WEIGHTS | lpips_distance, extent | an existing weights file |
| FEWSHOTSAM2_PARENT_PID | cli (stop when Slicer is gone) | the pid of a running process |
"""

from __future__ import annotations

import math
import os
from typing import Mapping, Optional
from urllib.parse import urlparse

from fewshotsam2.errors import InputError
from fewshotsam2.protocol import PARENT_PID_ENV

FEATURE_CACHE_ENV = "FEWSHOTSAM2_FEATURE_CACHE_MB"
SAMPLE_URL_ENV = "FEWSHOTSAM2_SAMPLE_URL"
DATA_ENV = "FEWSHOTSAM2_DATA"
CACHE_ENV = "FEWSHOTSAM2_CACHE"
LPIPS_WEIGHTS_ENV = "FEWSHOTSAM2_LPIPS_WEIGHTS"
VARIABLES = (FEATURE_CACHE_ENV, SAMPLE_URL_ENV, DATA_ENV, CACHE_ENV, LPIPS_WEIGHTS_ENV, PARENT_PID_ENV)


def feature_cache_mb(value: str) -> float:
    """$FEWSHOTSAM2_FEATURE_CACHE_MB as a number of MB (finite, 0 or more)."""
    try:
        mb = float(value)
    except ValueError:
        raise InputError(f"${FEATURE_CACHE_ENV} must be a number of MB, got '{value}'") from None
    if not math.isfinite(mb) or mb < 0:
        raise InputError(f"${FEATURE_CACHE_ENV} must be a finite number of MB, 0 or more, got '{value}'; unset it "
                         "for the default (256)")
    return mb


def check_sample_url(value: str) -> None:
    url = urlparse(value)
    if url.scheme not in ("http", "https", "file") or (url.scheme != "file" and not url.netloc):
        raise InputError(f"${SAMPLE_URL_ENV} must be the http(s):// or file:// address of a folder holding the "
                         f"sample files (a mirror), got '{value}'; unset it to download from the original source")


def _check_folder(name: str, value: str) -> None:
    path = os.path.expanduser(value)
    if os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f"${name} {value} is a file; it must name a folder (or unset it)")


def _check_weights(value: str) -> None:
    if os.path.isdir(value):
        raise InputError(f"${LPIPS_WEIGHTS_ENV} {value} is a folder; it must name the weights file (.pth)")
    if not os.path.isfile(value):
        raise InputError(f"${LPIPS_WEIGHTS_ENV} {value} does not exist; give the AlexNet weights file or unset it")


def _check_parent_pid(value: str) -> None:
    if not value.isdigit():
        raise InputError(f"${PARENT_PID_ENV} must be a process id (the Slicer module sets it), got '{value}'")
    if os.name != "posix":
        return
    try:
        os.kill(int(value), 0)
    except ProcessLookupError:
        raise InputError(f"${PARENT_PID_ENV} names process {value}, which is not running: every run would stop "
                         "at once as if Slicer had gone; unset it (only the Slicer module sets it)") from None
    except PermissionError:
        pass  # exists, owned by someone else


def check_environment(environ: Optional[Mapping[str, str]] = None) -> None:
    """Raise InputError for the first set environment variable whose value cannot work (empty means unset)."""
    env = os.environ if environ is None else environ
    checks = {FEATURE_CACHE_ENV: feature_cache_mb, SAMPLE_URL_ENV: check_sample_url,
              DATA_ENV: lambda v: _check_folder(DATA_ENV, v), CACHE_ENV: lambda v: _check_folder(CACHE_ENV, v),
              LPIPS_WEIGHTS_ENV: _check_weights, PARENT_PID_ENV: _check_parent_pid}
    for name in VARIABLES:
        value = env.get(name, "").strip()
        if value:
            checks[name](value)
