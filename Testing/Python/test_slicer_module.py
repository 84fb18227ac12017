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
    tree = ast.parse(MODULE.read_text())
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "InverseRegParameterNode":
            return {n.target.id for n in node.body if isinstance(n, ast.AnnAssign)}
    raise AssertionError("InverseRegParameterNode not found")


def test_module_compiles():
    py_compile.compile(str(MODULE), doraise=True)


def test_every_widget_the_module_uses_exists_in_the_ui():
    names, _ = _ui_widgets()
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE.read_text()))
    assert used, "the module should use widgets from the .ui"
    assert used - names == set()


def test_every_bound_widget_names_a_parameter():
    _, bound = _ui_widgets()
    fields = _parameter_fields()
    assert bound, "widgets should be bound with SlicerParameterName"
    assert set(bound) - fields == set()


def test_no_heavy_import_at_module_load():
    tree = ast.parse(MODULE.read_text())
    heavy = {"torch", "InverseRegLib", "SimpleITK", "sitkUtils", "numpy", "PyTorchUtils"}
    top = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            top += [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            top.append(node.module.split(".")[0])
    assert heavy & set(top) == set()


def test_test_runner_methods_are_real_tests():
    tree = ast.parse(MODULE.read_text())
    test_class = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "InverseRegTest")
    for method in test_class.body:
        if isinstance(method, ast.FunctionDef) and method.name.startswith("test"):
            source = ast.unparse(method)
            assert "assert" in source, f"{method.name} runs without checking anything"


def _cmake_list(text: str, variable: str):
    match = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S)
    assert match, f"{variable} not set"
    return [item for item in match.group(1).split() if not item.startswith("#")]


def test_every_file_cmake_lists_exists_and_every_library_file_is_listed():
    text = MODULE_CMAKE.read_text()
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
    text = (ROOT / "CMakeLists.txt").read_text()
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        assert re.search(rf'set\({key} "[^"]+"\)', text), key
    assert re.search(r'set\(EXTENSION_DEPENDS "?PyTorch"?\)', text)
    assert "add_subdirectory(InverseReg)" in text
    s4ext = dict(line.split(" ", 1) for line in (ROOT / "InverseReg.s4ext").read_text().splitlines()
                 if line.strip() and not line.startswith("#"))
    for key in ("scm", "scmurl", "depends", "build_subdirectory", "homepage", "category", "iconurl",
                "description", "enabled"):
        assert s4ext.get(key, "").strip(), key
    assert (ROOT / "Resources" / "Icons" / "InverseReg.png").exists()
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in MODULE_CMAKE.read_text()


def _parameter_default(name: str):
    tree = ast.parse(MODULE.read_text())
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
    source = MODULE.read_text()
    body = source[source.index("def buildCommand"):source.index("return command", source.index("def buildCommand"))]
    options = set(re.findall(r'"(--[a-z-]+)"', body))
    assert {"--passes", "--refine", "--affine", "--device", "--model"} <= options
    register = next(a for a in build_parser()._subparsers._group_actions[0].choices.items() if a[0] == "register")[1]
    accepted = {s for action in register._actions for s in action.option_strings}
    assert options - accepted == set()
