"""The Slicer module's scene layer on Slicer's real MRML core (the ``slicer-core`` wheel).

The test bodies live in ``InverseReg/InverseRegScene/tests.py``: the same code ``InverseRegTest``
runs inside Slicer. Here they are collected by pytest. They skip only where slicer-core cannot be
installed (it is a cp311 manylinux wheel); on this project's machines and in CI they run.
"""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
slicer = pytest.importorskip("slicer", reason="slicer-core (Slicer's MRML core, cp311 manylinux wheel) is not installed")
if not hasattr(slicer, "vtkMRMLScene"):  # PyPI has an unrelated package named "slicer" (used by shap)
    pytest.skip("the 'slicer' module here is not slicer-core (no vtkMRMLScene)", allow_module_level=True)
sys.path.insert(0, str(ROOT / "InverseReg"))

from InverseRegScene import tests as scene_tests  # noqa: E402

scene_tests.LIBRARY_DIR = str(ROOT)
scene_tests.PYTHON = sys.executable


class TestSceneBasics(scene_tests.SceneBasicsTests):
    pass


class TestRegisteredScene(scene_tests.RegisteredSceneTests):
    pass
