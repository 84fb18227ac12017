"""Writing a registration's results to a folder: every file atomically, the report last."""
from __future__ import annotations

import json
from pathlib import Path

from .imageio import prepare_output_dir, write_image_atomic, write_text_atomic
from .pipeline import RegistrationResult


def write_result(result: RegistrationResult, outdir, inputs: list) -> dict[str, Path]:
    """Write the four images, the carried label maps and extra images (if any), the affine (if any)
    and report.json into ``outdir``.

    ``inputs`` are the input file paths: an output that would land on one of them is refused
    before anything is written. Returns the written paths by name.
    """
    outdir = prepare_output_dir(outdir, inputs)
    written = {}
    for name, image in (("forward", result.forward), ("backward", result.backward),
                        ("moving_warped", result.moving_warped), ("fixed_warped", result.fixed_warped)):
        path = outdir / f"{name}.nii.gz"
        write_image_atomic(image, path)
        written[name] = path
    # carried label maps and other per-run images (Jacobians) the front end asked for
    for name, image in {**result.label_images, **result.extra_images}.items():
        path = outdir / f"{name}.nii.gz"
        write_image_atomic(image, path)
        written[name] = path
    if result.affine is not None:
        from .affine import write_affine
        path = outdir / "affine.tfm"
        write_affine(result.affine, path)
        written["affine"] = path
    path = outdir / "report.json"
    write_text_atomic(json.dumps(result.report, indent=2, sort_keys=True) + "\n", path)
    written["report"] = path
    return written
