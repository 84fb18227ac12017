"""A wheel built from this repository registers out of the box, with only the core dependencies.

The rest of the suite runs from the source tree with every extra installed, so it can see neither
a package file that the wheel leaves out (the bundled model) nor an import of an optional extra
(tqdm, matplotlib, vtk) on the registration path. Here the wheel is built offline from a copy of
the sources, installed non-editable into a temporary folder, and a fresh interpreter whose
``sys.path`` holds only that folder and the site-packages of torch, numpy and SimpleITK, with the
extras blocked from importing, registers a small synthetic pair through the ``inversereg``
console-script entry point.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
#: what the package needs at run time (pyproject.toml's ``dependencies``) and what it must not
BLOCKED = ("tqdm", "matplotlib", "vtk", "slicer", "ants", "nibabel", "nilearn", "voxelmorph", "pytest", "scipy")

RUNNER = textwrap.dedent("""
    import importlib.abc, importlib.metadata, json, sys
    target, site_dirs, blocked, argv = sys.argv[1], json.loads(sys.argv[2]), set(json.loads(sys.argv[3])), sys.argv[4:]

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in blocked:
                raise ModuleNotFoundError(f"No module named {name!r} (blocked: not a core dependency)", name=name)
            return None

    sys.meta_path.insert(0, Blocker())
    sys.path[:] = [p for p in sys.path if "site-packages" not in p] + [target] + site_dirs
    (dist,) = [d for d in importlib.metadata.distributions(path=[target]) if d.metadata["Name"] == "inversereg"]
    (entry,) = [e for e in dist.entry_points if e.group == "console_scripts" and e.name == "inversereg"]
    import InverseRegLib
    assert InverseRegLib.__file__.startswith(target), InverseRegLib.__file__
    import os
    exit_now = os._exit

    def report_and_exit(code):  # the command ends with os._exit: say first what it imported
        print("LOADED", json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in blocked)), flush=True)
        exit_now(code)

    os._exit = report_and_exit
    sys.argv = ["inversereg", *argv]
    entry.load()()
""")


def _site_dir(module: str) -> str:
    spec = __import__(module)
    return str(Path(spec.__file__).resolve().parents[1])


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    source = work / "src"
    source.mkdir()
    # only what the build reads: building in the checkout itself would leave build/ and
    # *.egg-info in it (and race with a parallel test run)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    for name in ("InverseRegLib", "Resources"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    env = {**os.environ, "PIP_NO_INDEX": "1"}
    built = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(work / "dist"),
                            str(source)], capture_output=True, text=True, env=env, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (work / "dist").glob("inversereg-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "InverseRegLib/resources/InverseReg-default.pt" in names, names
    target = work / "site"
    done = subprocess.run([*pip, "install", "--no-deps", "--no-index", "-q", "--target", str(target), str(wheel)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return target


def _write_pair(folder: Path) -> tuple[Path, Path]:
    import numpy as np
    import SimpleITK as sitk
    z, y, x = np.mgrid[:40, :48, :40]
    paths = []
    for name, centre in (("fixed", 20), ("moving", 22)):
        blob = (((z - centre) / 14.0) ** 2 + ((y - 24) / 18.0) ** 2 + ((x - 20) / 13.0) ** 2) < 1
        image = sitk.GetImageFromArray(blob.astype(np.float32) * 100)
        image.SetSpacing((2.0, 2.0, 2.0))
        paths.append(folder / f"{name}.nii.gz")
        sitk.WriteImage(image, str(paths[-1]))
    return paths[0], paths[1]


def test_wheel_without_extras_registers(installed, tmp_path):
    fixed, moving = _write_pair(tmp_path)
    out = tmp_path / "out"
    site_dirs = sorted({_site_dir(m) for m in ("torch", "numpy", "SimpleITK")})
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONIOENCODING="utf-8")
    run = subprocess.run([sys.executable, "-I", "-c", RUNNER, str(installed), json.dumps(site_dirs),
                          json.dumps(BLOCKED), "register", str(fixed), str(moving), "-o", str(out),
                          "--device", "cpu"],
                         capture_output=True, text=True, encoding="utf-8", errors="replace", env=env,
                         cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "LOADED []" in run.stdout
    # the text progress that replaces tqdm went to stderr
    assert "register:" in run.stderr and "100 %" in run.stderr
    for name in ("forward.nii.gz", "backward.nii.gz", "moving_warped.nii.gz", "fixed_warped.nii.gz",
                 "affine.tfm", "report.json"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    # the bundled model came from the installed package, not from this checkout
    assert Path(report["model_path"]).resolve().is_relative_to(installed.resolve()), report["model_path"]
