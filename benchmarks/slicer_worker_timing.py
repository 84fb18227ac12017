"""Seconds from a Register click to the difference overlay shown, on Slicer's MRML core
(slicer-core), through the module's own scene code: export both volumes, the registration
(persistent worker, or a one-shot process for comparison), load the result into the scene,
show the difference view. Registrations 1..N of one session: the first pays for starting the
worker (Python, torch import, first-call warm-up), later ones do not.

    PYTHONPATH=$PWD python benchmarks/slicer_worker_timing.py ../shared/data/brains/img_11.nii.gz \\
        ../shared/data/brains/img_12.nii.gz --runs 3 --device cpu
"""
from __future__ import annotations

import argparse
import json
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

from InverseRegScene.results import load_result  # noqa: E402
from InverseRegScene.runner import RegistrationRunner, RegistrationWorker, register_command  # noqa: E402
from InverseRegScene.tests import library_env, volume_node  # noqa: E402
from InverseRegScene.views import show_comparison  # noqa: E402
from InverseRegScene.volumes import write_volume  # noqa: E402


def one_click(scene, fixed, moving, worker, device: str, nodes) -> dict:
    times = {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="InverseReg-timing-") as run:
        inputs = [os.path.join(run, "fixed.nrrd"), os.path.join(run, "moving.nrrd")]
        write_volume(fixed, inputs[0])
        write_volume(moving, inputs[1])
        times["export"] = time.perf_counter() - start
        output = os.path.join(run, "result")
        if worker is not None:
            job = worker.submit(*inputs, output, device=device)
        else:
            job = RegistrationRunner(register_command(sys.executable, *inputs, output, device=device), output,
                                     env=library_env())
        if job.wait(3600) != "done":
            raise SystemExit(f"registration failed: {job.error}")
        times["registration"] = time.perf_counter() - start - times["export"]
        mark = time.perf_counter()
        forward, backward, report = load_result(scene, fixed, moving, output, *nodes)
        nodes[:] = [forward, backward]
        times["load"] = time.perf_counter() - mark
        mark = time.perf_counter()
        show_comparison(scene, fixed, moving, forward, backward, "difference")
        times["overlay"] = time.perf_counter() - mark
    times["click_to_overlay"] = time.perf_counter() - start
    times["process_total"] = report["seconds_total"]
    times["network"] = report["seconds_network"]
    return {k: round(v, 2) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("fixed")
    parser.add_argument("moving")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--one-shot", action="store_true", help="also time the one-shot process per click")
    args = parser.parse_args()
    scene = slicer.vtkMRMLScene()
    scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
    fixed = volume_node(scene, sitk.ReadImage(args.fixed, sitk.sitkFloat32), "fixed")
    moving = volume_node(scene, sitk.ReadImage(args.moving, sitk.sitkFloat32), "moving")
    results = {"worker": []}
    worker = RegistrationWorker(sys.executable, env=library_env())
    nodes: list = [None, None]
    try:
        for index in range(args.runs):
            results["worker"].append(one_click(scene, fixed, moving, worker, args.device, nodes))
            print(json.dumps({"worker run": index + 1, **results["worker"][-1]}), flush=True)
    finally:
        worker.stop()
    if args.one_shot:
        results["one_shot"] = [one_click(scene, fixed, moving, None, args.device, nodes)]
        print(json.dumps({"one-shot run": 1, **results["one_shot"][-1]}), flush=True)


if __name__ == "__main__":
    main()
