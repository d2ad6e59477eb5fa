"""The choices every front end offers: methods, SAM2 models, devices, slice axes, intensity presets.

One place for the command line, the Slicer GUI and the core. Pure Python (no numpy, torch or sam2 import), so the
Slicer module can show its choices before the core's dependencies are installed. Each tuple lists the internal
names in the order a menu shows them (the default first); `DISPLAY_NAMES` gives what a person reads.
"""

from __future__ import annotations

METHODS: tuple[str, ...] = ("reverse", "lpips", "propagate")
MODELS: tuple[str, ...] = ("tiny", "small", "base_plus", "large", "medsam2")  # cards: models.py
VERSIONS: tuple[str, ...] = ("2.1", "2")
DEVICES: tuple[str, ...] = ("auto", "cuda", "mps", "cpu")
AXES: tuple[str, ...] = ("auto", "axial", "coronal", "sagittal")
# name -> (window width, window level) in HU
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "ct-abdomen": (400.0, 40.0),
    "ct-liver": (150.0, 30.0),
    "ct-lung": (1500.0, -600.0),
    "ct-bone": (1800.0, 400.0),
    "ct-brain": (80.0, 40.0),
}
PRESETS: tuple[str, ...] = ("auto",) + tuple(CT_WINDOWS) + ("percentile", "minmax")
LPIPS_NETS: tuple[str, ...] = ("alex", "vgg", "squeeze")
# who keeps a voxel two structures claim (non_overlap.py): the higher SAM2 logit, the structure listed first, or
# both ("allow": each structure in its own .seg.nrrd layer where they overlap; only a layered format holds that)
OVERLAP_RULES: tuple[str, ...] = ("logits", "order", "allow")
LAYERED_OUTPUT = ".seg.nrrd"  # the one output format that keeps overlapping structures (`--overlap allow`)

# SAM2 input size in pixels. SAM2 was trained at 1024: larger inputs are outside what it has seen (its position
# embeddings are interpolated), and memory attention costs grow with the square of the token count
# ((size / 16)^2 tokens per frame), so a larger size costs much more and gains nothing. Smaller sizes trade
# accuracy for speed; the image encoder needs a multiple of 32 (its coarsest stride, so every level has whole
# pixels), and below 64 px a slice keeps too little detail to be worth segmenting.
DEFAULT_IMAGE_SIZE = 1024
MIN_IMAGE_SIZE = 64
MAX_IMAGE_SIZE = 1024
IMAGE_SIZE_STEP = 32
IMAGE_SIZES: tuple[int, ...] = (1024, 512, 256)  # the sizes a menu offers

DISPLAY_NAMES: dict[str, str] = {
    # methods
    "reverse": "Reverse propagation (RevSAM2)",
    "lpips": "LPIPS matching (Zu et al.)",
    "propagate": "SAM2 propagation (baseline)",
    # models
    "tiny": "Tiny (fastest)",
    "small": "Small",
    "base_plus": "Base+",
    "large": "Large (most accurate)",
    "medsam2": "MedSAM2 (medical fine-tune of tiny, 512 px)",
    # versions
    "2.1": "SAM2.1",
    "2": "SAM2",
    # devices
    "auto": "Automatic",
    "cuda": "NVIDIA GPU (CUDA)",
    "mps": "Apple GPU (MPS)",
    "cpu": "CPU",
    # axes ("auto" shared with devices and presets: "Automatic")
    "axial": "Axial",
    "coronal": "Coronal",
    "sagittal": "Sagittal",
    # presets
    "ct-abdomen": "CT abdomen (W400/L40)",
    "ct-liver": "CT liver (W150/L30)",
    "ct-lung": "CT lung (W1500/L-600)",
    "ct-bone": "CT bone (W1800/L400)",
    "ct-brain": "CT brain (W80/L40)",
    "percentile": "0.5-99.5 percentiles (MR, other)",
    "minmax": "Minimum to maximum",
    # LPIPS networks
    "alex": "AlexNet",
    "vgg": "VGG16",
    "squeeze": "SqueezeNet",
    # overlap rules
    "logits": "Decided by SAM2's logits (default)",
    "order": "First listed wins",
    "allow": "Keep overlaps (separate layers)",
}


def display_name(name: str) -> str:
    """What a person reads for an internal choice name (the name itself when it has none)."""
    return DISPLAY_NAMES.get(str(name), str(name))
