"""Writing a registration's results to a folder: every file atomically, the report last."""
from __future__ import annotations

import json
import time
from pathlib import Path

from .imageio import prepare_output_dir, write_displacement_field, write_image_atomic, write_text_atomic
from .pipeline import RegistrationResult


def write_result(result: RegistrationResult, outdir, inputs: list) -> dict[str, Path]:
    """Write the four images, the affine (if any) and report.json into ``outdir``.

    ``inputs`` are the input file paths: an output that would land on one of them is refused
    before anything is written. Returns the written paths by name. Adds ``seconds_writing`` to
    the report (and ``seconds_whole_process`` when the command line timed its start-up).
    """
    started = time.perf_counter()
    outdir = prepare_output_dir(outdir, inputs)
    written = {}
    for name, image in (("forward", result.forward), ("backward", result.backward)):
        path = outdir / f"{name}.nii.gz"
        write_displacement_field(image, path)  # intent 1006, which Slicer's reader expects
        written[name] = path
    for name, image in (("moving_warped", result.moving_warped), ("fixed_warped", result.fixed_warped)):
        path = outdir / f"{name}.nii.gz"
        write_image_atomic(image, path)
        written[name] = path
    if result.affine is not None:
        from .affine import write_affine
        path = outdir / "affine.tfm"
        write_affine(result.affine, path)
        written["affine"] = path
    result.report["seconds_writing"] = round(time.perf_counter() - started, 3)
    if "seconds_startup" in result.report:
        from .timing import seconds_since_process_start
        result.report["seconds_whole_process"] = seconds_since_process_start()
    path = outdir / "report.json"
    write_text_atomic(json.dumps(result.report, indent=2, sort_keys=True) + "\n", path)
    written["report"] = path
    return written
