"""The one device picker: where SAM2 and LPIPS run ("auto" = CUDA, then Apple's MPS, then the CPU)."""

from __future__ import annotations

from typing import Union

import torch

from fewshotsam2.constants import DEVICES
from fewshotsam2.errors import InputError


def pick_device(device: Union[str, torch.device] = "auto") -> torch.device:
    """The torch device for a setting value; a device that is asked for but absent is an InputError."""
    if isinstance(device, torch.device):
        return device
    if device not in DEVICES:
        raise InputError(f"unknown device '{device}': choose one of {', '.join(DEVICES)}")
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' was asked for but PyTorch sees no CUDA GPU (use --device cpu or auto)")
    if device == "mps" and not _mps_available():
        raise InputError("device 'mps' was asked for but it is not available (use --device cpu or auto)")
    return torch.device(device)


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
