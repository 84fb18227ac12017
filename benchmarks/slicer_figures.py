"""The Slicer module's comparison views on a real brain pair, rendered offscreen by Slicer's own
``vtkMRMLSliceLogic`` (slicer-core), into ``docs/figures/slicer_*.png``.

What runs is the module's own code path (InverseReg/InverseRegScene): volumes put into a real
``vtkMRMLScene``, exported as the module exports them, the registration process started by the
module's runner (``python -m InverseRegLib register``, bundled model, CPU), the result loaded into
the scene, each view shown and rendered. Also prints the seconds from the request to the result
loaded in the scene.

    PYTHONPATH=$PWD python benchmarks/slicer_figures.py ../shared/data/brains/img_11.nii.gz \\
        ../shared/data/brains/img_12.nii.gz -o docs/figures
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "InverseReg"))
sys.path.insert(0, str(ROOT))

import SimpleITK as sitk  # noqa: E402
import slicer  # noqa: E402

from InverseRegScene.render import SliceRenderer  # noqa: E402
from InverseRegScene.results import load_result  # noqa: E402
from InverseRegScene.runner import RegistrationRunner, register_command  # noqa: E402
from InverseRegScene.tests import library_env, volume_node  # noqa: E402
from InverseRegScene.views import show_comparison  # noqa: E402
from InverseRegScene.volumes import write_volume  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("fixed")
    parser.add_argument("moving")
    parser.add_argument("-o", "--output", default=str(ROOT / "docs" / "figures"))
    parser.add_argument("--size", type=int, default=240)
    args = parser.parse_args()
    scene = slicer.vtkMRMLScene()
    fixed = volume_node(scene, sitk.ReadImage(args.fixed, sitk.sitkFloat32), "fixed")
    moving = volume_node(scene, sitk.ReadImage(args.moving, sitk.sitkFloat32), "moving")
    renderer = SliceRenderer(scene, size=(args.size, args.size))
    with tempfile.TemporaryDirectory(prefix="InverseReg-figures-") as run:
        start = time.perf_counter()
        inputs = [os.path.join(run, "fixed.nrrd"), os.path.join(run, "moving.nrrd")]
        write_volume(fixed, inputs[0])
        write_volume(moving, inputs[1])
        output = os.path.join(run, "result")
        runner = RegistrationRunner(register_command(sys.executable, *inputs, output, device="cpu"), output,
                                    env=library_env())
        if runner.wait() != "done":
            raise SystemExit(f"registration failed: {runner.error}")
        forward, backward, report = load_result(scene, fixed, moving, output)
        seconds = time.perf_counter() - start
    print(f"request to result in the scene: {seconds:.1f} s (registration process total "
          f"{report['seconds_total']:.1f} s, network {report['seconds_network']:.2f} s)")
    for name, mode, direction in (("difference_before", "differenceBefore", True),
                                  ("difference_after", "difference", True), ("blend", "blend", True),
                                  ("checkerboard", "checkerboard", True), ("backward_blend", "blend", False),
                                  ("backward_difference_after", "difference", False)):
        show_comparison(scene, fixed, moving, forward, backward, mode, direction)
        renderer.fit()
        renderer.save_png(os.path.join(args.output, f"slicer_{name}.png"))
        print(f"wrote slicer_{name}.png")


if __name__ == "__main__":
    main()
