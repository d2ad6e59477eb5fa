"""Static checks of the Slicer module's GUI, which cannot run here (no Slicer application, no Qt):
the .ui file parses, every widget the Widget code uses exists in it, every SlicerParameterName is a parameter of
the parameter node and is bound to a widget type the parameterNodeWrapper can connect, and the GUI's choices
agree with the core's constants."""

import ast
import re
import typing
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from conftest import source_segment

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "FewShotSAM2"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "FewShotSAM2.ui"
MODULE_FILE = MODULE_DIR / "FewShotSAM2.py"

# Widget classes the parameterNodeWrapper connects, per parameter kind (Slicer
# Base/Python/slicer/parameterNodeWrapper/guiConnectors.py: the connectors compare type(widget) exactly).
CONNECTABLE = {
    "node": {"qMRMLNodeComboBox"},
    "choice": {"QComboBox", "ctkComboBox"},
    "int": {"QSpinBox", "QSlider", "QDoubleSpinBox", "ctkSliderWidget", "ctkDoubleSpinBox", "qMRMLSliderWidget",
            "ctkDoubleSlider", "qMRMLSpinBox"},
    "float": {"QDoubleSpinBox", "ctkSliderWidget", "ctkDoubleSpinBox", "qMRMLSliderWidget", "ctkDoubleSlider",
              "qMRMLSpinBox"},
    "bool": {"QCheckBox", "ctkCheckBox"},
    "str": {"QLineEdit", "QLabel", "QTextEdit"},
}


@pytest.fixture(scope="module")
def ui_tree():
    return ET.parse(UI_FILE)  # raises if the XML is malformed


@pytest.fixture(scope="module")
def ui_widgets(ui_tree):
    return {w.get("name"): w for w in ui_tree.iter("widget")}


@pytest.fixture(scope="module")
def module():
    import FewShotSAM2

    return FewShotSAM2


def _slicer_parameter_names(ui_widgets):
    out = {}
    for name, w in ui_widgets.items():
        for prop in w.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                out[name] = prop.findtext("string")
    return out


def _kind(annotation):
    base = annotation
    metadata = ()
    if typing.get_origin(annotation) is typing.Annotated:
        base, *metadata = typing.get_args(annotation)
    if any(type(m).__name__ == "Choice" for m in metadata):
        return "choice"
    if isinstance(base, type) and base.__name__.startswith("vtkMRML"):
        return "node"
    if typing.get_origin(base) is list:
        return "list"
    return {int: "int", float: "float", bool: "bool", str: "str"}.get(base, "other")


def test_ui_parses_with_unique_widget_names(ui_tree):
    root = ui_tree.getroot()
    assert root.tag == "ui"
    assert root.findtext("class") == "FewShotSAM2"
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget" and top.get("name") == "FewShotSAM2"
    names = [w.get("name") for w in root.iter("widget")]
    assert len(names) == len(set(names)), "duplicate widget names"


def test_widget_code_uses_only_existing_widgets(ui_widgets):
    source = MODULE_FILE.read_text()
    used = set(re.findall(r"self\.ui\.(\w+)", source))
    assert used, "the Widget uses no ui widget?"
    missing = sorted(used - set(ui_widgets))
    assert not missing, f"widgets used by FewShotSAM2Widget but absent from the .ui file: {missing}"


def test_widget_code_uses_existing_collapsible_names(ui_widgets):
    # names given as strings (getattr(self.ui, name))
    source = MODULE_FILE.read_text()
    for name in re.findall(r'"(\w+CollapsibleButton)"', source):
        assert name in ui_widgets, name


def test_every_parameter_name_is_a_parameter_of_the_node(module, ui_widgets):
    hints = typing.get_type_hints(module.FewShotSAM2ParameterNode, include_extras=True)
    bound = _slicer_parameter_names(ui_widgets)
    assert bound, "no SlicerParameterName in the .ui file"
    for widget_name, parameter in bound.items():
        assert parameter in hints, f"{widget_name}: SlicerParameterName '{parameter}' is not a parameter"
        kind = _kind(hints[parameter])
        widget_class = ui_widgets[widget_name].get("class")
        assert widget_class in CONNECTABLE.get(kind, set()), (
            f"{widget_name} ({widget_class}) cannot be connected to {parameter} ({kind})"
        )


# parameters shown by widgets built in code (the Slice range table), restored by the Widget itself
TABLE_PARAMETERS = ("sliceRanges", "sliceRangesVolume")


def test_every_scalar_parameter_has_a_widget(module, ui_widgets):
    """A saved scene restores the GUI: every parameter except the support lists and the Slice range table (rows
    built in code) is bound."""
    hints = typing.get_type_hints(module.FewShotSAM2ParameterNode, include_extras=True)
    bound = set(_slicer_parameter_names(ui_widgets).values())
    for parameter, annotation in hints.items():
        if _kind(annotation) == "list":
            assert parameter in ("supportVolumes", "supportSegmentations", "supportSegmentIds")
            continue
        if parameter in TABLE_PARAMETERS:
            assert parameter not in bound
            continue
        assert parameter in bound, f"parameter {parameter} has no widget in the .ui file"


def _widget_methods():
    text = MODULE_FILE.read_text()
    widget = next(n for n in ast.parse(text).body if isinstance(n, ast.ClassDef) and n.name == "FewShotSAM2Widget")
    return {n.name: source_segment(text, n) for n in widget.body if isinstance(n, ast.FunctionDef)}


def test_slice_range_table_parameters_match_what_the_logic_writes(module):
    """The Logic writes the table with raw SetParameter / SetNodeReferenceID under the names of these wrapper
    fields, in the wrapper's own formats (parameterNodeWrapper/serializers.py: StringSerializer, NodeSerializer)."""
    from FewShotSAM2Lib import slice_ranges

    hints = typing.get_type_hints(module.FewShotSAM2ParameterNode, include_extras=True)
    assert hints[slice_ranges.TEXT_PARAMETER] is str
    assert module.FewShotSAM2ParameterNode.sliceRanges == ""
    assert _kind(hints[slice_ranges.VOLUME_PARAMETER]) == "node"
    assert hints[slice_ranges.VOLUME_PARAMETER] is hints["queryVolume"]
    assert set(TABLE_PARAMETERS) == {slice_ranges.TEXT_PARAMETER, slice_ranges.VOLUME_PARAMETER}


def test_estimate_runs_as_a_polled_process_and_the_table_is_saved():
    """Estimate starts the extent process and returns (no blocking call in the Widget); the poll timer finishes it;
    Estimate while estimating cancels through _stopRun; the table is stored on every change and restored when the
    parameter node is set."""
    methods = _widget_methods()
    estimate = methods["onEstimateRanges"]
    assert "self.logic.startSliceRangeEstimate(" in estimate and "self._startPolling(" in estimate
    assert "self._pollTimer.start()" in methods["_startPolling"]
    assert "estimateSliceRanges(" not in "".join(methods.values())  # the blocking call is for scripts only
    assert "ProcessingState.ESTIMATING" in estimate and "self._stopRun()" in estimate
    assert "self._onRangePoll()" in methods["_onPoll"]
    poll = methods["_onRangePoll"]
    assert "self.logic.finishSliceRangeEstimate(job)" in poll and "self._reportError(" in poll
    assert poll.index("job.finished") < poll.index("finishSliceRangeEstimate")
    stop = methods["_cancelJobs"]
    assert "self._rangeJob" in stop and "self.logic.cancel(running)" in stop and "self._cancelJobs()" in methods["_stopRun"]
    assert "self._storeRangeTable()" in methods["_onRangeEdited"] and "self._storeRangeTable()" in poll
    assert "self.logic.storeSliceRanges(" in methods["_storeRangeTable"]
    assert "self.logic.storedSliceRanges(" in methods["_restoreRangeTable"]
    assert "self._restoreRangeTable()" in methods["setParameterNode"]
    assert "self._restoreRangeTable()" in methods["_onParameterNodeModified"]  # a query change shows its own table
    # restoring must not count as an edit: spin boxes get their value before valueChanged is connected
    fill = methods["_fillRangeTable"]
    assert fill.index("spin.setValue(value)") < fill.index('spin.connect("valueChanged(int)"')


def test_choice_defaults_are_valid(module):
    hints = typing.get_type_hints(module.FewShotSAM2ParameterNode, include_extras=True)
    for parameter, annotation in hints.items():
        if typing.get_origin(annotation) is typing.Annotated:
            base, *metadata = typing.get_args(annotation)
            default = getattr(module.FewShotSAM2ParameterNode, parameter)
            for m in metadata:
                if type(m).__name__ == "Choice":
                    assert default in m.choices, parameter
                if type(m).__name__ == "WithinRange":
                    assert m.minimum <= default <= m.maximum, parameter
    assert module.FewShotSAM2ParameterNode.method == "reverse"
    assert module.FewShotSAM2ParameterNode.modelSize == "tiny"
    assert module.FewShotSAM2ParameterNode.overlap == "logits"


def test_gui_defaults_are_the_cores(module):
    """The parameter node's defaults (written out in the GUI, which Slicer needs as class attributes) agree with
    the core's one set of defaults, and each builds valid options."""
    from fewshotsam2.options import SegmentOptions

    d = SegmentOptions.flat_defaults()
    d["image_size"] = SegmentOptions().image_size  # the table's None: the default model's own size
    node = module.FewShotSAM2ParameterNode
    gui = dict(method=node.method, model=node.modelSize, version=node.modelVersion, device=node.device,
               image_size=node.imageSize, axis=node.sliceAxis, preset=node.intensityPreset, shots=node.shots,
               top_k=node.topK, min_score=node.minScore, augmentations=node.augmentations, lpips_net=node.lpipsNet,
               overlap=node.overlap)
    assert gui == {k: d[k] for k in gui}
    for method in module.METHODS:
        SegmentOptions.from_flat(**dict(gui, method=method))


def test_overlap_menu_offers_the_cores_rules_and_refine_says_why_it_is_off(module, ui_widgets):
    """Overlapping structures (issue 23): a menu in Output bound to the parameter node's `overlap`, which the
    settings table derives from the core's rule (--overlap); its items are the core's rules, default first, with
    readable names; a "Keep overlaps" result turns Refine off with the Logic's reason as its tooltip."""
    from fewshotsam2 import constants, settings
    from FewShotSAM2Lib import choices

    assert _slicer_parameter_names(ui_widgets)["overlapComboBox"] == "overlap"
    assert ui_widgets["overlapComboBox"].get("class") == "QComboBox"
    outputs = {w.get("name") for w in ui_widgets["outputsCollapsibleButton"].iter("widget")}
    assert "overlapComboBox" in outputs  # shown, not under the collapsed Advanced
    assert settings.BY_NAME["overlap"].gui == "overlap"
    hints = typing.get_type_hints(module.FewShotSAM2ParameterNode, include_extras=True)
    (choice,) = [m for m in typing.get_args(hints["overlap"])[1:] if type(m).__name__ == "Choice"]
    assert tuple(choice.choices) == constants.OVERLAP_RULES == choices.COMBO_BOXES["overlap"][1]
    assert choices.COMBO_BOXES["overlap"][0] == "overlapComboBox"
    assert [choices.displayName("overlap", r) for r in constants.OVERLAP_RULES] == [
        "Decided by SAM2's logits (default)", "First listed wins", "Keep overlaps (separate layers)"]
    update = _widget_methods()["_updateRefineButtons"]
    assert "self.logic.refineRefusal(node)" in update
    assert "and not refused" in update and "self.refineButton.toolTip = refused or" in update


def test_segment_button_and_progress_exist(ui_widgets):
    assert ui_widgets["segmentButton"].get("class") == "QPushButton"
    assert ui_widgets["progressBar"].get("class") == "QProgressBar"
    adv = ui_widgets["advancedCollapsibleButton"]
    collapsed = [p for p in adv.findall("property") if p.get("name") == "collapsed"]
    assert collapsed and collapsed[0].findtext("bool") == "true", "Advanced must start collapsed"


def test_mrml_widgets_get_the_scene(ui_tree, ui_widgets):
    """Each qMRMLNodeComboBox of the .ui receives the scene through the top widget's mrmlSceneChanged signal."""
    receivers = {c.findtext("receiver") for c in ui_tree.getroot().iter("connection")
                 if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"}
    combos = {n for n, w in ui_widgets.items() if w.get("class") == "qMRMLNodeComboBox"}
    assert combos <= receivers


def test_module_imports_without_qt(module):
    """slicer-core has no qt/ctk: the module still imports and its Logic is usable."""
    assert module.SLICER_APPLICATION is False
    logic = module.FewShotSAM2Logic()
    assert logic.moduleName == "FewShotSAM2"


def test_logic_code_path_has_no_qt():
    """No `qt.`/`ctk.`/`slicer.app` in the Logic, its helpers and the Lib modules (the Widget is the only Qt user)."""
    source = MODULE_FILE.read_text()
    tree = ast.parse(source)
    qt_free = {"FewShotSAM2Logic", "FewShotSAM2Job", "FewShotSAM2ExtentJob", "FewShotSAM2Run", "FewShotSAM2Support",
               "PreparedSupport"}
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and (node.name in qt_free or isinstance(node, ast.FunctionDef)):
            segment = source_segment(source, node)
            if node.name == "_registerSampleData":
                continue
            for forbidden in ("qt.", "ctk.", "slicer.app", "slicer.mrmlScene", "slicer.modules"):
                assert forbidden not in segment, f"{node.name} uses {forbidden}"
    for path in (MODULE_DIR / "FewShotSAM2Lib").glob("*.py"):
        text = path.read_text()
        for forbidden in ("import qt", "import ctk", "qt.", "slicer.app", "slicer.mrmlScene", "import torch"):
            assert forbidden not in text, f"{path.name} uses {forbidden}"


def test_segment_ids_are_stored_as_lists(module):
    hints = typing.get_type_hints(module.FewShotSAM2ParameterNode, include_extras=True)
    assert hints["supportSegmentIds"] == list[list[str]]
    text = MODULE_FILE.read_text()
    widget = next(n for n in ast.parse(text).body if isinstance(n, ast.ClassDef) and n.name == "FewShotSAM2Widget")
    source = source_segment(text, widget)
    assert '",".join' not in source and '.split(",")' not in source


def test_selectors_offer_scans_only(ui_widgets):
    """Label map volumes are a subclass of scalar volumes: the selectors must not show child node types."""
    for name in ("queryVolumeSelector",):
        props = {p.get("name"): p for p in ui_widgets[name].findall("property")}
        assert props["showChildNodeTypes"].findtext("bool") == "false"
    assert "volumeSelector.showChildNodeTypes = False" in MODULE_FILE.read_text()


def test_widget_keeps_the_run_on_exit_and_stops_it_on_close():
    """exit() (the user opens another module) keeps a run; cleanup() (closing Slicer, Reload), aboutToQuit, scene
    close and Reload stop it. The behaviour itself is run on slicer-core in test_slicer_fresh.py."""
    text = MODULE_FILE.read_text()
    widget = next(n for n in ast.parse(text).body if isinstance(n, ast.ClassDef) and n.name == "FewShotSAM2Widget")
    methods = {n.name: source_segment(text, n) for n in widget.body if isinstance(n, ast.FunctionDef)}
    assert "_stopRun" not in methods["exit"] and "_cancelJobs" not in methods["exit"]
    for name in ("onSceneStartClose", "onReload"):
        assert "self._stopRun()" in methods[name], name
    assert "self._cancelJobs()" in methods["cleanup"] and "self._cancelJobs()" in methods["_onAboutToQuit"]
    assert 'slicer.app.connect("aboutToQuit()", self._onAboutToQuit)' in methods["_connectApplication"]
    assert 'slicer.app.disconnect("aboutToQuit()", self._onAboutToQuit)' in methods["_disconnectApplication"]
    assert "self._disconnectApplication()" in methods["cleanup"]
    assert "importlib.reload" in methods["onReload"]


def test_module_metadata(module):
    class Parent:
        pass

    parent = Parent()
    module.FewShotSAM2(parent)
    # the stand-in base does not set attributes, so the module's own __init__ must set them all
    assert parent.title == "FewShotSAM2"
    assert parent.categories == ["Segmentation"]
    assert parent.contributors
    assert "2409.04298" in parent.acknowledgementText and "2503.04826" in parent.acknowledgementText
    assert "RevSAM2" in parent.acknowledgementText and "Rethinking Few-Shot" in parent.acknowledgementText
    assert "README" in parent.helpText or "readme" in parent.helpText


def test_cmake_lists_register_module_and_test():
    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    assert "slicerMacroBuildScriptedModule" in text and "WITH_GENERIC_TESTS" in text
    assert "slicer_add_python_unittest" in text
    for line in re.findall(r"^\s+(\S+\.(?:py|png|ui))\s*$", text, flags=re.M):
        if "*" in line or "CMAKE_" in line:
            continue
        path = line.replace("${MODULE_NAME}", "FewShotSAM2")
        assert (MODULE_DIR / path).is_file(), f"CMakeLists lists a missing file: {path}"
    # every core module (sub-packages included) is installed with the extension
    assert "GLOB_RECURSE" in text and "${MODULE_NAME}Lib/*.py" in text and "${MODULE_LIB_SCRIPTS}" in text
    top = (REPO / "CMakeLists.txt").read_text()
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert key in top
    assert re.search(r'EXTENSION_DEPENDS\s+"NA"', top)  # torch comes from light-the-torch, not PyTorchUtils
    assert "add_subdirectory(FewShotSAM2)" in top


def test_icons_exist():
    from PIL import Image

    for path in (MODULE_DIR / "Resources" / "Icons" / "FewShotSAM2.png", REPO / "Resources" / "Icons" / "FewShotSAM2.png"):
        with Image.open(path) as im:
            assert im.size == (128, 128)


def test_image_size_follows_the_model_unless_chosen():
    """Choosing MedSAM2 shows its own 512 px; back to tiny, 1024; a size the user chose is kept (issue 24)."""
    from FewShotSAM2Lib.choices import imageSizeForModel

    assert imageSizeForModel("tiny", "medsam2", 1024) == 512
    assert imageSizeForModel("medsam2", "tiny", 512) == 1024
    assert imageSizeForModel("tiny", "medsam2", 256) == 256  # chosen by the user: kept
    assert imageSizeForModel("tiny", "small", 1024) == 1024
    assert 512 in __import__("FewShotSAM2Lib.choices", fromlist=["IMAGE_SIZES"]).IMAGE_SIZES
