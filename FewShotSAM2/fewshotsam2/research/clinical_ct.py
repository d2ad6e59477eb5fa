"""A clinical-size CT for benchmarks: the shared ct-b (512 x 512 x 20, 2 mm) resampled to N slices along z.

The shared data holds no full-length CT, so this stretches ct-b's 20 slices (40 mm of abdomen) to N slices by
linear interpolation (labels: nearest slice) and keeps a 2 mm slice spacing in the header: a synthetic 512 x 512 x N
volume whose anatomy is ct-b's, N/20 times longer. It has the size, dtype and layout of a real scan, so it
measures time and memory; it says nothing about accuracy.

`python -m fewshotsam2.research.clinical_ct OUT_DIR [--slices 300]` writes OUT_DIR/image.nii.gz and labels.nii.gz.
In ct-b, label 7 (pancreas) spans slices 0-3 of 20, a fifth of the volume.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def build(data: Path, n_slices: int):
    from fewshotsam2.io.volume import Volume, read_labels, read_volume

    folder = Path(data) / "abdomen-ct" / "ct-b"
    image = read_volume(folder / "dicom")
    labels = read_labels(folder / "labels.nii.gz", image)[0]
    n = image.array.shape[0]
    t = np.linspace(0, n - 1, n_slices)
    lo = np.floor(t).astype(int)
    hi = np.minimum(lo + 1, n - 1)
    w = (t - lo)[:, None, None].astype(np.float32)
    arr = image.array.astype(np.float32)
    stretched = ((1 - w) * arr[lo] + w * arr[hi]).round().astype(image.array.dtype)
    lab = labels.array[np.rint(t).astype(int)]
    return (Volume(stretched, image.spacing, image.origin, image.direction),
            Volume(np.ascontiguousarray(lab), labels.spacing, labels.origin, labels.direction))


def main(argv=None) -> int:
    from fewshotsam2.io.volume import default_structure, write_labels

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--data", default="../shared/data")
    args = ap.parse_args(argv)
    import SimpleITK as sitk

    image, labels = build(Path(args.data), args.slices)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image.to_sitk(), str(out / "image.nii.gz"))
    sitk.WriteImage(labels.to_sitk(), str(out / "labels.nii.gz"))
    print(f"wrote {out}/image.nii.gz {image.array.shape[::-1]} and labels.nii.gz")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
