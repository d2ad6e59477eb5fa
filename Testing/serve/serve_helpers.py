"""Shared by the server tests: small synthetic volumes (a bright disc per slice, label 3) and job archives."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk


def write_case(folder: Path, slices: int, shift: int, seed: int, prefix: str) -> tuple[str, str]:
    """A 48 x 48 x `slices` image with a disc (label 3) per slice; returns (image path, labels path)."""
    rng = np.random.default_rng(seed)
    image = rng.normal(0, 20, (slices, 48, 48)).astype(np.float32)
    labels = np.zeros((slices, 48, 48), np.uint8)
    yy, xx = np.ogrid[:48, :48]
    for k in range(slices):
        disc = (yy - 24 - shift) ** 2 + (xx - 22) ** 2 < (8 + k % 3) ** 2
        image[k][disc] += 300
        labels[k][disc] = 3
    img = sitk.GetImageFromArray(image)
    img.SetSpacing((1.0, 1.0, 3.0))
    lab = sitk.GetImageFromArray(labels)
    lab.CopyInformation(img)
    paths = str(folder / f"{prefix}.nii.gz"), str(folder / f"{prefix}_labels.nii.gz")
    sitk.WriteImage(img, paths[0])
    sitk.WriteImage(lab, paths[1])
    return paths


def raw_archive(members: dict[str, bytes], manifest: dict) -> bytes:
    """A job archive built by hand (any member names), to test what the server does with hostile ones."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in [("job.json", json.dumps(manifest).encode()), *members.items()]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()
