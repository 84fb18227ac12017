"""Static checks of the Slicer module that need no Slicer: UI names, parameters, CMake lists.

What runs inside Slicer (InverseRegTest) cannot run here; these catch the mistakes that would
otherwise only show up there: a widget the code uses but the .ui lacks, a parameter name typo,
a file CMake installs that does not exist, a library file that is not installed, a heavy import
at module load.
"""
import ast
import py_compile
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULE = ROOT / "InverseReg" / "InverseReg.py"
UI = ROOT / "InverseReg" / "Resources" / "UI" / "InverseReg.ui"
MODULE_CMAKE = ROOT / "InverseReg" / "CMakeLists.txt"


def _ui_widgets():
    tree = ET.parse(UI)
    names, parameters = set(), {}
    for widget in tree.iter("widget"):
        names.add(widget.get("name"))
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                parameters[prop.find("string").text] = widget.get("name")
    return names, parameters


def _parameter_fields():
    tree = ast.parse(MODULE.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "InverseRegParameterNode":
            return {n.target.id for n in node.body if isinstance(n, ast.AnnAssign)}
    raise AssertionError("InverseRegParameterNode not found")


def test_module_compiles():
    py_compile.compile(str(MODULE), doraise=True)


def test_every_widget_the_module_uses_exists_in_the_ui():
    names, _ = _ui_widgets()
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE.read_text(encoding="utf-8")))
    assert used, "the module should use widgets from the .ui"
    assert used - names == set()


def test_every_bound_widget_names_a_parameter():
    _, bound = _ui_widgets()
    fields = _parameter_fields()
    assert bound, "widgets should be bound with SlicerParameterName"
    assert set(bound) - fields == set()


def test_no_heavy_import_at_module_load():
    tree = ast.parse(MODULE.read_text(encoding="utf-8"))
    heavy = {"torch", "InverseRegLib", "SimpleITK", "sitkUtils", "numpy", "PyTorchUtils"}
    top = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            top += [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            top.append(node.module.split(".")[0])
    assert heavy & set(top) == set()


def test_test_runner_methods_are_real_tests():
    tree = ast.parse(MODULE.read_text(encoding="utf-8"))
    test_class = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "InverseRegTest")
    for method in test_class.body:
        if isinstance(method, ast.FunctionDef) and method.name.startswith("test"):
            source = ast.unparse(method)
            assert "assert" in source, f"{method.name} runs without checking anything"


def _cmake_list(text: str, variable: str):
    match = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S)
    assert match, f"{variable} not set"
    lines = [line.split("#", 1)[0] for line in match.group(1).splitlines()]  # comments off
    return [item for line in lines for item in line.split()]


def test_every_file_cmake_lists_exists_and_every_library_file_is_listed():
    text = MODULE_CMAKE.read_text(encoding="utf-8")
    for item in _cmake_list(text, "MODULE_PYTHON_RESOURCES"):
        assert (MODULE_CMAKE.parent / item.replace("${MODULE_NAME}", "InverseReg")).exists(), item
    for item in _cmake_list(text, "MODULE_PYTHON_SCRIPTS"):
        assert (MODULE_CMAKE.parent / item.replace("${MODULE_NAME}", "InverseReg")).exists(), item
    scripts = _cmake_list(text, "INVERSEREG_LIB_SCRIPTS")
    for item in scripts + _cmake_list(text, "INVERSEREG_LIB_RESOURCES"):
        if item.endswith(".pt") and not (ROOT / item).exists():
            pytest.fail(f"the bundled model {item} is listed but missing")
        assert (ROOT / item).exists(), item
    library = {f"InverseRegLib/{p.name}" for p in (ROOT / "InverseRegLib").glob("*.py")}
    assert library - set(scripts) == set(), "library files the Slicer extension would not install"


def test_extension_metadata_is_filled():
    text = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        assert re.search(rf'set\({key} "[^"]+"\)', text), key
    assert re.search(r'set\(EXTENSION_DEPENDS "?PyTorch"?\)', text)
    assert "add_subdirectory(InverseReg)" in text
    s4ext = dict(line.split(" ", 1) for line in (ROOT / "InverseReg.s4ext").read_text(encoding="utf-8").splitlines()
                 if line.strip() and not line.startswith("#"))
    for key in ("scm", "scmurl", "depends", "build_subdirectory", "homepage", "category", "iconurl",
                "description", "enabled"):
        assert s4ext.get(key, "").strip(), key
    assert (ROOT / "Resources" / "Icons" / "InverseReg.png").exists()
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in MODULE_CMAKE.read_text(encoding="utf-8")


def _parameter_default(name: str):
    tree = ast.parse(MODULE.read_text(encoding="utf-8"))
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "InverseRegParameterNode")
    field = next(n for n in node.body if isinstance(n, ast.AnnAssign) and n.target.id == name)
    return ast.literal_eval(field.value)


def test_network_passes_default_matches_the_library_and_the_ui():
    from InverseRegLib.pipeline import DEFAULT_PASSES
    assert _parameter_default("networkPasses") == DEFAULT_PASSES
    spin = next(w for w in ET.parse(UI).iter("widget") if w.get("name") == "passesSpinBox")
    value = next(p for p in spin.findall("property") if p.get("name") == "value")
    assert int(value.find("number").text) == DEFAULT_PASSES


def test_every_option_the_module_passes_is_a_register_option():
    """The module runs ``python -m InverseRegLib register ...``: each ``--option`` it writes must
    be one the CLI's register command accepts."""
    from InverseRegLib.cli import build_parser
    source = (ROOT / "InverseReg" / "InverseRegScene" / "runner.py").read_text(encoding="utf-8")
    body = source[source.index("def register_command"):source.index("return command", source.index("def register_command"))]
    options = set(re.findall(r'"(--[a-z-]+)"', body))
    assert {"--passes", "--refine", "--affine", "--device", "--model", "--quality", "--mutual-inverse",
            "--mutual-target"} <= options
    assert "registrationOptions" in MODULE.read_text(encoding="utf-8") and "register_request" in source  # the worker's requests
    register = next(a for a in build_parser()._subparsers._group_actions[0].choices.items() if a[0] == "register")[1]
    accepted = {s for action in register._actions for s in action.option_strings}
    # --quality comes with issue 13's CLI change; the module passes it only for "best", so the
    # default command works before that change is merged
    assert options - accepted <= {"--quality"}


SCENE = ROOT / "InverseReg" / "InverseRegScene"


def test_scene_layer_is_qt_free_and_installed():
    """InverseRegScene runs on slicer-core: no Qt, no application globals; CMake installs every file."""
    forbidden = {"qt", "ctk", "sitkUtils", "slicer.util", "slicer.cli", "slicer.app", "slicer.mrmlScene",
                 "slicer.modules", "slicer.ScriptedLoadableModule", "slicer.parameterNodeWrapper"}
    listed = set(_cmake_list(MODULE_CMAKE.read_text(encoding="utf-8"), "MODULE_PYTHON_SCRIPTS"))
    files = sorted(SCENE.glob("*.py"))
    assert (SCENE / "__init__.py") in files
    for path in files:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
        assert not {name for name in imported if name in forbidden or name.split(".")[0] in {"qt", "ctk"}}, path
        used = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name) and node.value.id == "slicer"}
        assert used & {"app", "mrmlScene", "util", "cli", "modules"} == set(), f"{path.name} uses slicer.{used}"
        assert f"${{MODULE_NAME}}Scene/{path.name}" in listed, f"{path.name} is not installed by CMake"


def test_catalog_entry_and_s4ext_agree():
    """InverseReg.json (Slicer's extensions index) and InverseReg.s4ext (older tooling) say the same."""
    import json
    entry = json.loads((ROOT / "InverseReg.json").read_text(encoding="utf-8"))
    allowed = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
               "build_subdirectory", "enabled"}  # Schemas/slicer-extension-catalog-entry-schema-v1.0.0.json
    assert {"$schema", "category", "scm_url"} <= set(entry) <= allowed
    assert entry["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.0.json#")
    s4ext = dict(line.split(" ", 1) for line in (ROOT / "InverseReg.s4ext").read_text(encoding="utf-8").splitlines()
                 if line.strip() and not line.startswith("#"))
    assert entry["category"] == s4ext["category"].strip()
    assert entry["scm_url"] == s4ext["scmurl"].strip()
    assert entry.get("scm_type", "git") == s4ext["scm"].strip()
    assert entry.get("scm_revision", "") == s4ext.get("scmrevision", "").strip()
    assert entry["build_dependencies"] == s4ext["depends"].split()
    assert entry.get("build_subdirectory", ".") == s4ext["build_subdirectory"].strip()
    assert entry.get("enabled", True) == (s4ext["enabled"].strip() == "1")
    cmake = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    assert re.search(r'set\(EXTENSION_CATEGORY "([^"]+)"\)', cmake).group(1) == entry["category"]
    assert re.search(r'set\(EXTENSION_DEPENDS "?([^")]+)"?\)', cmake).group(1).split() == entry["build_dependencies"]
    # the current extension template's CMake minimum
    assert "cmake_minimum_required(VERSION 3.28.0...3.28.0 FATAL_ERROR)" in cmake


def test_self_test_skips_without_torch(monkeypatch):
    """Defect 8: where torch is absent the registration tests skip with a clear reason and
    nothing imports or installs torch (``checkModelFile`` used to import it)."""
    import sys
    import unittest
    if not hasattr(pytest.importorskip("slicer", reason="slicer-core is not installed"), "vtkMRMLScene"):
        pytest.skip("the 'slicer' module here is not slicer-core")
    sys.path.insert(0, str(ROOT / "InverseReg"))
    from InverseRegScene import tests as scene_tests
    monkeypatch.setitem(sys.modules, "torch", None)  # find_spec("torch") is None, as without torch
    with pytest.raises(unittest.SkipTest, match="torch is not installed"):
        scene_tests.require_torch()
    result = unittest.TestResult()
    unittest.defaultTestLoader.loadTestsFromTestCase(scene_tests.RegisteredSceneTests).run(result)
    assert result.errors == [] and result.failures == []
    assert result.skipped and all("torch is not installed" in reason for _, reason in result.skipped)
    assert "InverseRegTest" in MODULE.read_text(encoding="utf-8") and "run_all()" in MODULE.read_text(encoding="utf-8")


# --- the panel's wiring: what only shows inside Slicer, checked from the .ui XML and the module's AST ---

def _ui_tree():
    return ET.parse(UI)


def _string_list(widget, prop_name):
    prop = next((p for p in widget.findall("property") if p.get("name") == prop_name), None)
    return [s.text for s in prop.iter("string")] if prop is not None else None


def _parameter_annotations():
    tree = ast.parse(MODULE.read_text(encoding="utf-8"))
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "InverseRegParameterNode")
    return {n.target.id: n.annotation for n in node.body if isinstance(n, ast.AnnAssign)}


def _node_classes(annotation):
    """``vtkMRMLX`` -> {"vtkMRMLX"}; ``Union[vtkMRMLA, vtkMRMLB, None]`` -> {"vtkMRMLA", "vtkMRMLB"}; else None."""
    if isinstance(annotation, ast.Name) and annotation.id.startswith("vtkMRML"):
        return {annotation.id}
    if isinstance(annotation, ast.Subscript) and ast.unparse(annotation.value) in ("Union", "typing.Union", "Optional"):
        parts = annotation.slice.elts if isinstance(annotation.slice, ast.Tuple) else [annotation.slice]
        names = {ast.unparse(p) for p in parts} - {"None"}
        return names if all(n.startswith("vtkMRML") for n in names) else None
    return None


def _choices(annotation):
    for call in ast.walk(annotation):
        if isinstance(call, ast.Call) and ast.unparse(call.func) == "Choice":
            return ast.literal_eval(call.args[0])
    return None


def _class_source(name):
    tree = ast.parse(MODULE.read_text(encoding="utf-8"))
    return next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name)


def test_every_node_selector_is_given_the_scene():
    """A qMRMLNodeComboBox without the .ui's mrmlSceneChanged -> setMRMLScene connection lists
    no nodes in Slicer (the module only sets the scene on the top widget)."""
    tree = _ui_tree()
    selectors = {w.get("name") for w in tree.iter("widget") if w.get("class") == "qMRMLNodeComboBox"}
    connected = {c.findtext("receiver") for c in tree.iter("connection")
                 if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
                 and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)" and c.findtext("sender") == "InverseReg"}
    assert {"carrySourceSelector", "pointsToMoveSelector", "fixedPointsSelector", "movingPointsSelector"} <= selectors
    assert selectors - connected == set()


def test_bound_widgets_can_represent_their_parameter():
    """parameterNodeWrapper binds by widget class and annotation (Slicer's guiConnectors.py):
    nodes to qMRMLNodeComboBox (whose nodeTypes are the annotation's classes), Choice strings to
    QComboBox, bool to QCheckBox, int to QSpinBox, float to QDoubleSpinBox."""
    annotations = _parameter_annotations()
    widgets = {w.get("name"): w for w in _ui_tree().iter("widget")}
    _, bound = _ui_widgets()
    assert {"carrySource", "pointsToMove", "pointsOn", "fixedPoints", "movingPoints", "jacobianBackward",
            "jacobianLog"} <= set(bound)
    for parameter, name in bound.items():
        widget, annotation = widgets[name], annotations[parameter]
        classes = _node_classes(annotation)
        if classes is not None:
            assert widget.get("class") == "qMRMLNodeComboBox", name
            assert set(_string_list(widget, "nodeTypes") or []) == classes, name
        elif _choices(annotation) is not None:
            assert widget.get("class") == "QComboBox", name
        elif ast.unparse(annotation) == "bool":
            assert widget.get("class") == "QCheckBox", name
        elif "int" in ast.unparse(annotation):
            assert widget.get("class") == "QSpinBox", name
        elif "float" in ast.unparse(annotation):
            assert widget.get("class") in ("QDoubleSpinBox", "ctkSliderWidget", "ctkDoubleSpinBox"), name


def test_choice_combo_boxes_are_filled_with_exactly_the_choices():
    """A QComboBox bound to a Choice is filled in setup(); the items must be the choices, or the
    wrapper cannot write the parameter into the box."""
    annotations = _parameter_annotations()
    _, bound = _ui_widgets()
    setup = ast.unparse(next(m for m in _class_source("InverseRegWidget").body
                             if isinstance(m, ast.FunctionDef) and m.name == "setup"))
    filled = {m.group(1): ast.literal_eval(m.group(2))
              for m in re.finditer(r"\(self\.ui\.(\w+), (\[[^\]]*\])\)", setup)}
    for parameter, name in bound.items():
        choices = _choices(annotations[parameter])
        if choices is not None:
            assert filled.get(name) == choices, (name, filled.get(name), choices)


def test_every_button_is_connected_and_calls_a_logic_method():
    """Each push button of the .ui is connected in the Widget; each ``self.logic.<method>`` the
    Widget calls exists on the Logic; the Logic never touches widgets or dialogs."""
    source = MODULE.read_text(encoding="utf-8")
    buttons = {w.get("name") for w in _ui_tree().iter("widget") if w.get("class") == "QPushButton"}
    assert {"carryButton", "movePointsButton", "pointErrorButton", "jacobianButton"} <= buttons
    for button in buttons:
        assert re.search(rf'self\.ui\.{button}\.connect\("clicked\(', source), f"{button} is not connected"
    widget = ast.unparse(_class_source("InverseRegWidget"))
    logic_class = _class_source("InverseRegLogic")
    methods = {m.name for m in logic_class.body if isinstance(m, ast.FunctionDef)} | {"getParameterNode"}
    called = set(re.findall(r"self\.logic\.(\w+)\(", widget))
    assert {"carryToOtherVolume", "carryMarkups", "markupsError", "showJacobian"} <= called
    assert called - methods == set()
    logic = ast.unparse(logic_class)
    for forbidden in ("self.ui", "qt.", "slicer.util", "ctk."):
        assert forbidden not in logic, f"the Logic uses {forbidden}"


def test_every_scene_function_the_logic_calls_is_tested_on_slicer_core():
    """What a Logic method imports from InverseRegScene is called by the shared scene tests
    (tests.py, run by pytest and by InverseRegTest) or by a test_slicer_*.py file."""
    logic = ast.unparse(_class_source("InverseRegLogic"))
    used = {name.strip() for module, names in re.findall(r"from InverseRegScene\.(\w+) import ([\w, ]+)", logic)
            if module not in ("folders",) for name in names.split(",")}
    assert {"carry_to_other_volume", "carry_markups_between", "markups_registration_error",
            "registration_error_sentence", "show_jacobian"} <= used
    tests = (SCENE / "tests.py").read_text(encoding="utf-8") + "".join(
        p.read_text(encoding="utf-8") for p in (ROOT / "Testing" / "Python").glob("test_slicer_*.py") if p.name != Path(__file__).name)
    untested = {name for name in used if not re.search(rf"\b{name}\(", tests)}
    assert untested == set()


def test_summary_says_whether_the_mutual_inverse_target_was_reached():
    """The panel's summary (a pure function of the report, run here from the module's source):
    with a target, one line says whether the written fields reached it and after how many steps;
    without, no such line."""
    tree = ast.parse(MODULE.read_text(encoding="utf-8"))
    function = next(node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef) and node.name == "summaryText")
    function.decorator_list = []
    namespace = {}
    exec(compile(ast.Module([function], type_ignores=[]), str(MODULE), "exec"), namespace)
    report = {"folding_percent_forward": 0.0, "folding_percent_backward": 0.0, "ice_mean_mm": 0.0099,
              "ice_p95_mm": 0.03}
    assert "target" not in namespace["summaryText"](report)
    reached = {**report, "mutual_target_mm": 0.01, "mutual_reached_target": True, "mutual_steps_run": 107,
               "mutual_steps": 1000}
    assert "Mutual-inverse target 0.01 mm reached after 107 of at most 1000 steps" in namespace["summaryText"](reached)
    missed = {**reached, "mutual_reached_target": False}
    assert "0.01 mm not reached after 107" in namespace["summaryText"](missed)
