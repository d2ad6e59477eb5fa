"""The choices the GUI offers and the readable name shown for each, in one place.

The values are the core's (the static tests check that they agree with fewshotsam2's constants); they are
spelled out here so that Slicer can load the module before the core's dependencies (torch, sam2) are installed.
"""

METHODS = ("reverse", "lpips", "propagate")
MODEL_SIZES = ("tiny", "small", "base_plus", "large")
MODEL_VERSIONS = ("2.1", "2")
DEVICES = ("auto", "cuda", "cpu")
SLICE_AXES = ("auto", "axial", "coronal", "sagittal")
INTENSITY_PRESETS = ("auto", "ct-abdomen", "ct-liver", "ct-lung", "ct-bone", "ct-brain", "percentile", "minmax")
LPIPS_NETS = ("alex", "vgg", "squeeze")
IMAGE_SIZES = (1024, 512, 256)

# parameter name -> {value: text shown in the combo box}; a value without an entry is shown as it is
DISPLAY_NAMES = {
    "method": {
        "reverse": "Reverse propagation (RevSAM2)",
        "lpips": "LPIPS matching (Zu et al.)",
        "propagate": "SAM2 propagation (baseline)",
    },
    "modelSize": {"tiny": "Tiny (fastest)", "small": "Small", "base_plus": "Base+", "large": "Large (most accurate)"},
    "modelVersion": {"2.1": "SAM 2.1", "2": "SAM 2"},
    "device": {"auto": "Automatic (GPU if available)", "cuda": "GPU (CUDA)", "cpu": "CPU"},
    "imageSize": {1024: "1024 px (SAM2's own size)", 512: "512 px (faster)", 256: "256 px (fastest, coarse)"},
    "sliceAxis": {"auto": "Automatic (acquisition plane)", "axial": "Axial", "coronal": "Coronal", "sagittal": "Sagittal"},
    "intensityPreset": {
        "auto": "Automatic (CT window for CT, percentiles otherwise)",
        "ct-abdomen": "CT abdomen window",
        "ct-liver": "CT liver window",
        "ct-lung": "CT lung window",
        "ct-bone": "CT bone window",
        "ct-brain": "CT brain window",
        "percentile": "Percentiles (0.5-99.5 %)",
        "minmax": "Full range (min-max)",
    },
    "lpipsNet": {"alex": "AlexNet (as in the paper)", "vgg": "VGG", "squeeze": "SqueezeNet"},
}

# parameter name -> (the .ui combo box bound to it, its values in the order the combo box lists them)
COMBO_BOXES = {
    "method": ("methodComboBox", METHODS),
    "modelSize": ("modelSizeComboBox", MODEL_SIZES),
    "modelVersion": ("modelVersionComboBox", MODEL_VERSIONS),
    "device": ("deviceComboBox", DEVICES),
    "imageSize": ("imageSizeComboBox", IMAGE_SIZES),
    "sliceAxis": ("sliceAxisComboBox", SLICE_AXES),
    "intensityPreset": ("intensityPresetComboBox", INTENSITY_PRESETS),
    "lpipsNet": ("lpipsNetComboBox", LPIPS_NETS),
}


def displayName(parameter: str, value) -> str:
    return DISPLAY_NAMES.get(parameter, {}).get(value, str(value))
