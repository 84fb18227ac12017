"""Robustness of the pre-alignment to the misalignment of real scans (issue 5's measurement).

For each brain pair (fixed F, moving M) from a labelled folder (``img_XX``/``seg_XX``, all on one
grid and already affinely aligned, so the identity is the "pre-aligned" start), the moving scan is
perturbed by a random affine Q (seeded): rotations up to ``--max-rotation`` degrees about each
axis, shifts up to ``--max-shift`` mm, per-axis scaling up to ``--max-scale``, about the image
centre. The perturbed scan M' is resampled on the moving grid padded by ``--pad`` mm so that no
anatomy leaves the field of view. Then:

* ``residual``: the recovered transform T' (F -> M') against the ground truth
  ``Q^-1 ∘ T0``, where T0 is the same method's answer on the unperturbed pair (the perturbation
  must not change the answer), in mm over the fixed brain, mean and max; ``vs_identity`` compares
  with ``Q^-1`` alone (the data set's own alignment taken as the truth);
* ``dice``: mean Dice over the evaluation labels of M's labels warped onto F, from the
  unperturbed start (``pre``) and from the perturbed start (``perturbed``); ``oracle`` undoes Q
  exactly, which shows what the second nearest-neighbour resampling of the labels alone costs;
* seconds per call, wall clock and CPU time of the process (with ``--threads 1`` the CPU time is
  what the call costs on an idle core, whatever else the machine runs).

The registration step is a function ``(fixed, moving, fixed_seg, moving_seg) -> (warped moving
seg on the fixed grid, transform or None, info dict)``; :func:`affine_only` is the default and
the full pipeline (affine + deformable) can be swapped in with ``--method``.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/affine_robustness.py --pairs 11:12,12:11,11:11 --trials 2
"""
from __future__ import annotations

import argparse
import math
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported; shared machines
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import SimpleITK as sitk
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from InverseRegLib.affine import affine_align  # noqa: E402
from InverseRegLib.grid import Geometry  # noqa: E402
from InverseRegLib.metrics import FREESURFER_EVAL_LABELS, dice_per_label  # noqa: E402

#: (fixed, moving, fixed_seg, moving_seg) -> (moving seg warped onto the fixed grid, the affine
#: resampling transform F -> M if the method has one, extra numbers for the table)
RegisterFn = Callable[[sitk.Image, sitk.Image, sitk.Image, sitk.Image], tuple[sitk.Image, Optional[sitk.Transform], dict]]


def affine_only(mode: str = "affine", device: str = "cpu", **options) -> RegisterFn:
    """The pre-alignment alone, labels carried with nearest neighbour; ``options`` go to
    :func:`affine_align` (``symmetric``, ``iterations``)."""

    def run(fixed, moving, fixed_seg, moving_seg):
        start, start_cpu = time.perf_counter(), time.process_time()
        transform = affine_align(fixed, moving, mode=mode, device=device, **options)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
        warped = sitk.Resample(moving_seg, fixed_seg, transform, sitk.sitkNearestNeighbor, 0)
        return warped, transform, {"seconds": seconds, "cpu_seconds": cpu_seconds}

    return run


def pipeline_method(device: str = "cpu", model: str | None = None) -> RegisterFn:
    """The full pipeline (affine pre-alignment + the deformable network): the moving labels are
    carried onto the fixed grid through the written forward field, which contains both parts."""
    from InverseRegLib.fields import image_to_field, warp_image
    from InverseRegLib.modelfile import load_model
    from InverseRegLib.pipeline import register

    loaded = load_model(model)

    def run(fixed, moving, fixed_seg, moving_seg):
        start, start_cpu = time.perf_counter(), time.process_time()
        result = register(fixed, moving, loaded, device, affine="affine")
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
        displacement, geometry = image_to_field(result.forward)
        warped = warp_image(moving_seg, displacement, geometry, nearest=True)
        return warped, result.affine, {"seconds": seconds, "cpu_seconds": cpu_seconds,
                                       "seconds_affine": result.report["seconds_affine"]}

    return run


def random_perturbation(rng: np.random.Generator, center: np.ndarray, max_rotation: float,
                        max_shift: float, max_scale: float) -> sitk.AffineTransform:
    """A random affine about ``center``: per-axis rotations, shifts and scalings, uniform."""
    angles = np.deg2rad(rng.uniform(-max_rotation, max_rotation, 3))
    shift = rng.uniform(-max_shift, max_shift, 3)
    scale = 1.0 + rng.uniform(-max_scale, max_scale, 3)
    rotation = sitk.Euler3DTransform()
    rotation.SetRotation(*angles)
    matrix = np.asarray(rotation.GetMatrix()).reshape(3, 3) @ np.diag(scale)
    transform = sitk.AffineTransform(3)
    transform.SetCenter(tuple(center))
    transform.SetMatrix(tuple(matrix.ravel()))
    transform.SetTranslation(tuple(shift))
    return transform


def padded_geometry(geometry: Geometry, pad_mm: float) -> Geometry:
    pad = np.ceil(pad_mm / np.asarray(geometry.spacing)).astype(int)
    origin = np.asarray(geometry.origin) - geometry.index_to_physical @ pad
    return Geometry(tuple(int(s) for s in np.asarray(geometry.size) + 2 * pad), geometry.spacing,
                    tuple(float(o) for o in origin), geometry.direction)


def affine_matrix(transform: sitk.Transform) -> np.ndarray:
    """Homogeneous 4x4 of a linear SimpleITK transform, by probing it."""
    origin = np.asarray(transform.TransformPoint((0.0, 0.0, 0.0)))
    out = np.eye(4)
    for axis in range(3):
        out[:3, axis] = (np.asarray(transform.TransformPoint(tuple(100.0 * np.eye(3)[axis]))) - origin) / 100.0
    out[:3, 3] = origin
    return out


def apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:3, :3].T + matrix[:3, 3]


def mean_dice(warped: sitk.Image, target: sitk.Image) -> float:
    scores = dice_per_label(sitk.GetArrayViewFromImage(warped), sitk.GetArrayViewFromImage(target),
                            FREESURFER_EVAL_LABELS)
    return float(np.mean(list(scores.values())))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="/work/shared/data/brains")
    parser.add_argument("--pairs", default="11:12,12:11", help="fixed:moving subject ids, comma separated")
    parser.add_argument("--trials", type=int, default=2, help="random perturbations per pair")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-rotation", type=float, default=15.0, help="degrees about each axis")
    parser.add_argument("--max-shift", type=float, default=20.0, help="mm along each axis")
    parser.add_argument("--max-scale", type=float, default=0.10, help="fraction, per axis")
    parser.add_argument("--pad", type=float, default=40.0, help="mm added around the perturbed scan")
    parser.add_argument("--mode", default="affine", choices=("rigid", "affine"))
    parser.add_argument("--method", default="affine", choices=("affine", "pipeline"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--iterations", default=None, help="Adam steps per level, e.g. 120,60,30")
    parser.add_argument("--one-way", action="store_true", help="similarity fixed-side only (not symmetric)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    options = {"symmetric": not args.one_way}
    if args.iterations:
        options["iterations"] = tuple(int(n) for n in args.iterations.split(","))
    if args.method == "affine":
        method = affine_only(args.mode, args.device, **options)
    else:
        method = pipeline_method(args.device)
    rng = np.random.default_rng(args.seed)
    data = Path(args.data)

    def load(kind: str, subject: str, pixel) -> sitk.Image:
        return sitk.Cast(sitk.ReadImage(str(data / f"{kind}_{subject}.nii.gz")), pixel)

    print(f"{'pair':>7} {'trial':>5} {'rot_max':>7} {'shift':>6} {'scale':>5} | {'t(s)':>5} {'cpu':>5} "
          f"{'res_mean':>8} {'res_max':>7} {'vs_id':>6} | {'dice_id':>7} {'pre':>6} {'pert':>6} {'oracle':>6}")
    rows = []
    for pair in args.pairs.split(","):
        f_id, m_id = pair.split(":")
        fixed, moving = load("img", f_id, sitk.sitkFloat32), load("img", m_id, sitk.sitkFloat32)
        fixed_seg, moving_seg = load("seg", f_id, sitk.sitkInt32), load("seg", m_id, sitk.sitkInt32)
        seg_array = sitk.GetArrayViewFromImage(fixed_seg)
        brain = Geometry.of(fixed_seg).physical_points()[seg_array > 0][::7]  # every 7th brain voxel
        dice_identity = mean_dice(moving_seg, fixed_seg)
        warped0, t0, info0 = method(fixed, moving, fixed_seg, moving_seg)
        dice_pre = mean_dice(warped0, fixed_seg)
        t0_matrix = affine_matrix(t0) if t0 is not None else np.eye(4)
        for trial in range(args.trials):
            q = random_perturbation(rng, Geometry.of(moving).center(), args.max_rotation,
                                    args.max_shift, args.max_scale)
            grid = padded_geometry(Geometry.of(moving), args.pad).reference_image()
            # M'(y) = M(Q(y)): Q is the resampling transform from the perturbed grid into M
            moving_p = sitk.Resample(moving, grid, q, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
            moving_seg_p = sitk.Resample(moving_seg, grid, q, sitk.sitkNearestNeighbor, 0)
            q_inv = np.linalg.inv(affine_matrix(q))
            oracle = sitk.Resample(moving_seg_p, fixed_seg, q.GetInverse(), sitk.sitkNearestNeighbor, 0)
            warped, t1, info = method(fixed, moving_p, fixed_seg, moving_seg_p)
            row = {
                "pair": pair, "trial": trial, "seconds": info.get("seconds", float("nan")),
                "cpu_seconds": info.get("cpu_seconds", float("nan")),
                "dice_identity": dice_identity, "dice_pre": dice_pre,
                "dice_perturbed": mean_dice(warped, fixed_seg), "dice_oracle": mean_dice(oracle, fixed_seg),
            }
            row["dice_drop"] = row["dice_pre"] - row["dice_perturbed"]
            if t1 is not None:
                t1_matrix = affine_matrix(t1)
                recovered = apply(t1_matrix, brain)
                residual = np.linalg.norm(recovered - apply(q_inv @ t0_matrix, brain), axis=1)
                row.update(res_mean=float(residual.mean()), res_max=float(residual.max()),
                           vs_identity=float(np.linalg.norm(recovered - apply(q_inv, brain), axis=1).mean()))
            euler = np.rad2deg(np.arccos(np.clip((np.trace(q_inv[:3, :3] / np.cbrt(np.linalg.det(q_inv[:3, :3]))) - 1) / 2, -1, 1)))
            row.update(rotation=float(euler), shift=float(np.linalg.norm(np.asarray(q.GetTranslation()))),
                       scale=float(np.cbrt(np.linalg.det(affine_matrix(q)[:3, :3]))))
            rows.append(row)
            print(f"{pair:>7} {trial:>5} {row['rotation']:>7.1f} {row['shift']:>6.1f} {row['scale']:>5.2f} | "
                  f"{row['seconds']:>5.2f} {row['cpu_seconds']:>5.2f} {row.get('res_mean', math.nan):>8.2f} {row.get('res_max', math.nan):>7.2f} "
                  f"{row.get('vs_identity', math.nan):>6.2f} | {dice_identity:>7.3f} {dice_pre:>6.3f} "
                  f"{row['dice_perturbed']:>6.3f} {row['dice_oracle']:>6.3f}", flush=True)
        print(f"{pair:>7}   pre: {info0.get('seconds', math.nan):.2f} s ({info0.get('cpu_seconds', math.nan):.2f} s CPU) "
              "for the unperturbed pair")

    def stat(key: str, fn=np.mean) -> float:
        values = [r[key] for r in rows if key in r]
        return float(fn(values)) if values else math.nan

    print(f"\nsummary over {len(rows)} perturbed runs: time {stat('seconds'):.2f} s/pair (max {stat('seconds', np.max):.2f}), "
          f"CPU {stat('cpu_seconds'):.2f} s (max {stat('cpu_seconds', np.max):.2f}); "
          f"residual mean {stat('res_mean'):.2f} mm, worst max {stat('res_max', np.max):.2f} mm; "
          f"Dice pre-aligned {stat('dice_pre'):.3f}, perturbed {stat('dice_perturbed'):.3f}, "
          f"oracle {stat('dice_oracle'):.3f}, worst drop {stat('dice_drop', np.max):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
