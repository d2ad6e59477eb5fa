"""The choices the GUI offers and the readable name shown for each.

The values and their readable names are the core's (`fewshotsam2.constants`, pure Python: the module loads before
torch and sam2 are installed); this file only says which combo box shows which parameter.
"""

from fewshotsam2 import constants

from fewshotsam2.model import models

METHODS = constants.METHODS
MODEL_SIZES = constants.MODELS
MODEL_VERSIONS = constants.VERSIONS
DEVICES = constants.DEVICES
SLICE_AXES = constants.AXES
INTENSITY_PRESETS = constants.PRESETS
LPIPS_NETS = constants.LPIPS_NETS
IMAGE_SIZES = constants.IMAGE_SIZES
OVERLAP_RULES = constants.OVERLAP_RULES
# what the Model section says of each model's weights before they are downloaded: size and licence
MODEL_NOTES = {name: f"about {card.size_mb} MB; licence: {card.licence.split(';')[0]}"
               for name, card in models.CARDS.items()}
# the GUI's slice-range modes: the core's --slice-range auto / off, or the table's ranges per structure
SLICE_RANGE_MODES = ("auto", "off", "manual")
SLICE_RANGE_NAMES = {"auto": "Automatic (estimated per structure)", "off": "Whole volume (off: lesions, tumours)",
                     "manual": "Manual per structure (table below)"}

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
    "sliceRangeMode": ("sliceRangeModeComboBox", SLICE_RANGE_MODES),
    "overlap": ("overlapComboBox", OVERLAP_RULES),
}


def displayName(parameter: str, value) -> str:
    """What the combo box of `parameter` shows for `value`."""
    if parameter == "imageSize":
        return f"{value} px" + (" (SAM2's own size)" if value == constants.DEFAULT_IMAGE_SIZE else "")
    if parameter == "sliceRangeMode":
        return SLICE_RANGE_NAMES[value]
    return constants.display_name(value)


def imageSizeForModel(previousModel: str, model: str, imageSize: int) -> int:
    """The image size to show after the model changes: the new model's own size (MedSAM2 512, SAM2.1 1024) when the
    user had kept the previous model's own size, else the user's choice (as `--image-size` follows `--model` unless
    it is set)."""
    from fewshotsam2.model.models import CARDS  # pure Python

    old, new = CARDS.get(previousModel), CARDS.get(model)
    if old is None or new is None or int(imageSize) != old.image_size:
        return int(imageSize)
    return new.image_size
