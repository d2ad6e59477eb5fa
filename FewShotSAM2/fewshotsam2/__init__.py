"""FewShotSAM2: few-shot 3D medical image segmentation with SAM2 and no training.

The core of the FewShotSAM2 3D Slicer extension; it imports no slicer, qt or vtk. Typical use::

    import fewshotsam2 as fs

    query = fs.read_volume("query.nii.gz")
    image = fs.read_volume("support.nii.gz")
    labels = fs.read_labels("support_labels.nii.gz", image)  # a LabelMap: the label volume and its structures
    supports, structures = fs.load_supports([(image, labels, "support")], "liver=5")  # the one support rule
    options = fs.SegmentOptions(method="reverse", method_options=fs.ReverseOptions(top_k=5))
    result = fs.Segmenter(options).segment(query, supports, structures)
    fs.write_labels("out.seg.nrrd", result.labels, result.structures)

Names are imported on first use (PEP 562), so `import fewshotsam2` and the command line's `--help` stay fast: torch
is imported only when work starts.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "segment": "run.pipeline",
    "Segmenter": "run.segmenter",
    "SupportCase": "supports.support_loader",
    "load_supports": "supports.support_loader",
    "read_supports": "supports.support_loader",
    "LabelMap": "io.volume",
    "refine": "run.refine",
    "PreviousRun": "run.refine",
    "RefineResult": "run.refine",
    "FeatureCache": "model.feature_cache",
    "SegmentOptions": "options",
    "ReverseOptions": "options",
    "LpipsOptions": "options",
    "PropagateOptions": "options",
    "OptionError": "options",
    "SegmentationResult": "run.results",
    "SliceScore": "run.results",
    "LpipsMatch": "run.results",
    "UsedSupportSlice": "run.results",
    "SAM2Engine": "model.engine",
    "Volume": "io.volume",
    "Structure": "io.volume",
    "read_volume": "io.volume",
    "read_labels": "io.volume",
    "write_labels": "io.volume",
    "InputError": "errors",
    "Cancelled": "errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fewshotsam2' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return __all__
