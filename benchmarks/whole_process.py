"""What a user waits for: whole commands, each a fresh process, against ANTs SyN in the same run.

Every timed command is a new ``python`` process started from this script, timed from before
``fork`` to after ``wait`` (so it includes the interpreter, the imports, reading, registration and
writing both directions), with its own peak resident memory and CPU time (``wait4``'s, taken by a
small launcher between this script and the command: see :data:`_LAUNCHER`):

* ``ours``: ``python -m InverseRegLib register FIXED MOVING -o OUT`` with the default settings
  (affine on) from this checkout;
* ``before`` (with ``--baseline DIR``): the same command from another source tree, e.g. the
  main branch exported with ``git archive``, to show what changed;
* ``ants``: a fresh ``python`` that imports antspyx, reads both images, runs
  ``ants.registration(fixed, moving, type_of_transform="SyN")`` (antspyx defaults) and writes
  both warps (``outprefix`` in the output folder: ``0GenericAffine.mat``, ``1Warp.nii.gz``,
  ``1InverseWarp.nii.gz``);
* ``greedy`` (``--greedy``): ``picsl-greedy`` with its brain settings (docs/peers.md), both fields;
* ``best`` (``--best``): ours with ``--quality best``;
* ``ours+mi`` and ``best+mi`` (``--mutual``; the second with ``--best``): the same with
  ``--mutual-target 0.01``, the inverse-consistency option (both fields adjusted until each is the
  other's inverse within 0.01 mm in both orders).

Methods alternate within each run (ours, before, ants, greedy, then the next pair), so slow
phases of a shared machine hit all of them alike. Per pair it prints the median seconds of each
method and the ratios to ours, and next to the timings the accuracy of what was written, judged
here with SimpleITK through the written files (not the report): Dice over the FreeSurfer labels
both ways (label maps resampled nearest-neighbour through each method's transforms), folding
(% det J <= 0, physical-space Jacobian: index gradients / spacing times the inverse direction),
and inverse consistency in both orders, |b(x + f(x)) + f(x)| over the fixed foreground and
|f(y + b(y)) + b(y)| over the moving foreground, for our fields and greedy's.

``--large`` adds the large-image case: the fixed image is ``img_A`` resampled to 0.6 mm on a
400 x 400 x 300 grid (made here, in a temporary folder), the moving one the 1 mm ``img_B``; it
prints seconds and peak memory of our whole command, and the ratio to the 1 mm pair's median.

Usage (the machine is shared: keep runs few)::

    python benchmarks/whole_process.py --pairs 11:12,12:11 --runs 2 --baseline /tmp/main_src --large \\
        --json results.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ANTS_SCRIPT = """
import sys, ants
fixed, moving, prefix = sys.argv[1:4]
f, m = ants.image_read(fixed), ants.image_read(moving)
ants.registration(f, m, type_of_transform="SyN", outprefix=prefix)
"""
GREEDY_SCRIPT = """
import sys
from picsl_greedy import Greedy3D
fixed, moving, out = sys.argv[1:4]
Greedy3D().execute(f"-d 3 -i {fixed} {moving} -o {out}/fwd.nii.gz -oinv {out}/bwd.nii.gz "
                   "-n 100x50x10 -m NCC 2x2x2 -s 1.5vox 0.5vox -threads 2")
"""

#: our commands: the options each method adds to ``register``
OURS_OPTIONS = {"ours": [], "before": [], "best": ["--quality", "best"],
                "ours+mi": ["--mutual-target", "0.01"], "best+mi": ["--quality", "best", "--mutual-target", "0.01"]}


#: run between this script and each timed command: Linux puts the RSS of the process that execs
#: into the child's ``ru_maxrss`` (exec records the old address space's high-water mark), so a
#: command forked from this script, which holds the images and the judges' arrays (1 GB and
#: more), would report at least this script's size: ``true`` reported 1035 MiB from a 1 GB
#: parent, and every method 1242-1250 MiB in the runs before this launcher. Started without
#: ``site`` (~10 MB), it forks the command, waits for it and writes the command's own usage.
_LAUNCHER = """import json, os, subprocess, sys
process = subprocess.Popen(sys.argv[2:], stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(process.pid, 0)
with open(sys.argv[1], "w") as report:
    json.dump({"code": os.waitstatus_to_exitcode(status), "maxrss_kb": usage.ru_maxrss,
               "cpu_seconds": usage.ru_utime + usage.ru_stime}, report)
"""


def run_timed(command: list[str], env: dict | None = None) -> tuple[float, float, float]:
    """(wall seconds, peak RSS in MiB, CPU seconds user + system) of one fresh process, the
    command's own (through :data:`_LAUNCHER`; the wall time includes its ~20 ms start)."""
    with tempfile.TemporaryDirectory() as folder:
        usage_path = os.path.join(folder, "usage.json")
        started = time.perf_counter()
        process = subprocess.Popen([sys.executable, "-S", "-c", _LAUNCHER, usage_path, *command],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        stderr = process.stderr.read().decode("utf-8", "replace")
        process.wait()
        seconds = time.perf_counter() - started
        usage = json.loads(Path(usage_path).read_text()) if process.returncode == 0 else {"code": process.returncode}
    if usage["code"] != 0:
        raise RuntimeError(f"{command[:4]}... failed ({usage['code']}): {stderr[-500:]}")
    return seconds, usage["maxrss_kb"] / 1024.0, usage["cpu_seconds"]


def ours_command(source: Path, fixed: Path, moving: Path, out: Path, *options: str) -> tuple[list[str], dict]:
    env = {**os.environ, "PYTHONPATH": str(source)}
    # -P: without it ``-m`` puts the working directory first on sys.path, and a run started from
    # a checkout times that checkout's code as 'before' too (it did, in this round's first run)
    return [sys.executable, "-P", "-m", "InverseRegLib", "register", str(fixed), str(moving), "-o", str(out),
            "--progress", "none", *options], env


# ----------------------------------------------------------------------------------------------
# judging the written files


def _labels() -> list[int]:
    from InverseRegLib.metrics import resolve_labels
    return list(resolve_labels("freesurfer"))


def dice(a: np.ndarray, b: np.ndarray, labels: list[int]) -> float:
    scores = []
    for label in labels:
        x, y = a == label, b == label
        total = x.sum() + y.sum()
        if total:
            scores.append(2.0 * np.logical_and(x, y).sum() / total)
    return float(np.mean(scores))


def warp_labels(seg: sitk.Image, reference: sitk.Image, transform: sitk.Transform) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.Resample(seg, reference, transform, sitk.sitkNearestNeighbor, 0))


def field_transform(path: Path) -> sitk.Transform:
    field = sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkVectorFloat64)
    return sitk.DisplacementFieldTransform(field)  # takes the image over


def folding_percent(path: Path) -> float:
    """% voxels with det J <= 0 of a displacement field file, Jacobian in physical space."""
    image = sitk.ReadImage(str(path))
    field = sitk.GetArrayViewFromImage(image)
    inverse = np.linalg.inv(np.asarray(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing()))
    bad = total = 0
    for z0 in range(0, field.shape[0], 16):
        lo, hi = max(z0 - 1, 0), min(z0 + 17, field.shape[0])
        block = np.asarray(field[lo:hi], dtype=np.float32)
        grads = [np.gradient(block, axis=axis) for axis in (2, 1, 0)]  # d/d index x, y, z
        g = np.stack(grads, axis=-1)  # (..., component a, index b)
        jac = np.eye(3, dtype=np.float32) + g @ inverse.astype(np.float32)
        det = np.linalg.det(jac)[z0 - lo: z0 - lo + min(16, field.shape[0] - z0)]
        bad += int((det <= 0).sum())
        total += det.size
    return 100.0 * bad / total


def judge_ours(out: Path, fixed, moving, fixed_seg, moving_seg, labels, paths=None) -> dict:
    forward = warp_labels(moving_seg, fixed, field_transform(out / "forward.nii.gz"))
    backward = warp_labels(fixed_seg, moving, field_transform(out / "backward.nii.gz"))
    ice = inverse_consistency(out / "forward.nii.gz", out / "backward.nii.gz", fixed)
    ice_moving = inverse_consistency(out / "backward.nii.gz", out / "forward.nii.gz", moving)
    report = json.loads((out / "report.json").read_text())
    return {"dice_forward": dice(forward, sitk.GetArrayViewFromImage(fixed_seg), labels),
            "dice_backward": dice(backward, sitk.GetArrayViewFromImage(moving_seg), labels),
            "folding_forward": folding_percent(out / "forward.nii.gz"),
            "folding_backward": folding_percent(out / "backward.nii.gz"),
            "ice_mean": ice[0], "ice_p95": ice[1], "ice_moving_mean": ice_moving[0], "ice_moving_p95": ice_moving[1],
            "stages": {k[len("seconds_"):]: v for k, v in report.items() if k.startswith("seconds_")},
            "mutual": {k: v for k, v in report.items() if k.startswith("mutual_") and isinstance(v, (int, float))}}


def _points(size, origin, spacing, direction) -> np.ndarray:
    """Physical points (z, y, x, 3) of the voxel centres of a grid."""
    matrix = np.asarray(direction, dtype=np.float64).reshape(3, 3) @ np.diag(spacing)
    k, j, i = np.indices(tuple(reversed(size)), dtype=np.float64)
    return (i[..., None] * matrix[:, 0] + j[..., None] * matrix[:, 1] + k[..., None] * matrix[:, 2]
            + np.asarray(origin, dtype=np.float64))


def composition_error(transforms: list[sitk.Transform], reference: sitk.Image) -> tuple[float, float]:
    """Mean and 95th percentile of |T(x) - x| (mm) over the foreground of ``reference``, where T is
    ``transforms`` composed as ``sitk.CompositeTransform`` composes a list (the last one acts
    first), each evaluated as ITK evaluates it: a displacement
    field trilinearly within its buffer and not at all beyond it, a matrix exactly.

    T(x) is read off an image of physical coordinates resampled through the composition (trilinear
    interpolation reproduces a linear function exactly), on ``reference``'s grid grown by 16 voxels
    a side, so that points sent a little beyond the grid are read too."""
    from InverseRegLib.pipeline import foreground_mask
    pad = 16
    size = [n + 2 * pad for n in reference.GetSize()]
    origin = reference.TransformIndexToPhysicalPoint([-pad] * 3)
    coordinates = sitk.GetImageFromArray(_points(size, origin, reference.GetSpacing(), reference.GetDirection()),
                                         isVector=True)
    coordinates.SetOrigin(origin)
    coordinates.SetSpacing(reference.GetSpacing())
    coordinates.SetDirection(reference.GetDirection())
    moved = sitk.Resample(coordinates, reference, sitk.CompositeTransform(transforms), sitk.sitkLinear,
                          float("nan"), sitk.sitkVectorFloat64)
    here = _points(reference.GetSize(), reference.GetOrigin(), reference.GetSpacing(), reference.GetDirection())
    error = np.linalg.norm(sitk.GetArrayViewFromImage(moved) - here, axis=-1)
    values = error[foreground_mask(sitk.Cast(reference, sitk.sitkFloat32))]
    if not np.isfinite(values).all():
        raise RuntimeError("a composed point left the coordinate image; grow its padding")
    return float(values.mean()), float(np.percentile(values, 95))


def inverse_consistency(forward: Path, backward: Path, fixed: sitk.Image) -> tuple[float, float]:
    """Mean and 95th percentile of |b(x + f(x)) + f(x)| (mm) over the foreground of ``fixed``, the
    image on whose grid ``forward`` lies (swap the fields and give the moving image for the other
    order): the two files composed as ITK composes them (:func:`composition_error`)."""
    return composition_error([field_transform(backward), field_transform(forward)], fixed)


def ants_inverse_consistency(prefix: str, fixed: sitk.Image, moving: sitk.Image) -> dict:
    """ANTs SyN's inverse consistency in both orders, from its written files, composed as
    ``ants.apply_transforms`` applies its ``fwdtransforms`` ([warp, affine]: a fixed point goes
    through the warp, then the affine) and ``invtransforms`` ([affine inverted, inverse warp]):
    fixed order |inv(fwd(x)) - x| over the fixed foreground, moving order |fwd(inv(y)) - y| over
    the moving one. (In ITK's list, where the last acts first, those are [affine, warp] and
    [inverse warp, affine inverted]: label maps resampled through them match
    ``ants.apply_transforms``'s voxel for voxel on 11 -> 12.)"""
    affine = sitk.ReadTransform(f"{prefix}0GenericAffine.mat")
    warp, inverse_warp = (field_transform(Path(f"{prefix}{name}")) for name in ("1Warp.nii.gz", "1InverseWarp.nii.gz"))
    forward = [affine, warp]
    backward = [inverse_warp, affine.GetInverse()]
    fixed_order = composition_error(backward + forward, fixed)
    moving_order = composition_error(forward + backward, moving)
    return {"ice_mean": fixed_order[0], "ice_p95": fixed_order[1],
            "ice_moving_mean": moving_order[0], "ice_moving_p95": moving_order[1]}


def judge_ants(prefix: str, fixed, moving, fixed_seg, moving_seg, labels, paths) -> dict:
    """Dice both ways through ANTs's own transforms (``fwdtransforms`` / ``invtransforms`` order),
    folding of its two warp fields, inverse consistency in both orders (:func:`ants_inverse_consistency`)."""
    import ants
    f, m, fseg, mseg = (ants.image_read(str(p)) for p in paths)
    fwd = [f"{prefix}1Warp.nii.gz", f"{prefix}0GenericAffine.mat"]
    inv = [f"{prefix}0GenericAffine.mat", f"{prefix}1InverseWarp.nii.gz"]
    warped_m = ants.apply_transforms(f, mseg, fwd, interpolator="nearestNeighbor").numpy()
    warped_f = ants.apply_transforms(m, fseg, inv, interpolator="nearestNeighbor", whichtoinvert=[True, False]).numpy()
    return {"dice_forward": dice(warped_m, fseg.numpy(), labels), "dice_backward": dice(warped_f, mseg.numpy(), labels),
            "folding_forward": folding_percent(Path(fwd[0])), "folding_backward": folding_percent(Path(inv[1])),
            **ants_inverse_consistency(prefix, fixed, moving)}


def judge_greedy(out: Path, fixed, moving, fixed_seg, moving_seg, labels, paths=None) -> dict:
    forward = warp_labels(moving_seg, fixed, field_transform(out / "fwd.nii.gz"))
    backward = warp_labels(fixed_seg, moving, field_transform(out / "bwd.nii.gz"))  # same grid here
    ice = inverse_consistency(out / "fwd.nii.gz", out / "bwd.nii.gz", fixed)
    ice_moving = inverse_consistency(out / "bwd.nii.gz", out / "fwd.nii.gz", moving)
    return {"dice_forward": dice(forward, sitk.GetArrayViewFromImage(fixed_seg), labels),
            "dice_backward": dice(backward, sitk.GetArrayViewFromImage(moving_seg), labels),
            "folding_forward": folding_percent(out / "fwd.nii.gz"), "folding_backward": folding_percent(out / "bwd.nii.gz"),
            "ice_mean": ice[0], "ice_p95": ice[1], "ice_moving_mean": ice_moving[0], "ice_moving_p95": ice_moving[1]}


# ----------------------------------------------------------------------------------------------


def make_large(image: Path, seg: Path, folder: Path) -> tuple[Path, Path]:
    """``image`` resampled to 0.6 mm on a 400 x 400 x 300 grid about its centre (and its labels)."""
    source = sitk.ReadImage(str(image))
    labels = sitk.ReadImage(str(seg))
    size, spacing = (400, 400, 300), (0.6, 0.6, 0.6)
    direction = np.asarray(source.GetDirection()).reshape(3, 3)
    centre = np.asarray(source.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in source.GetSize()]))
    origin = centre - direction @ (np.asarray(spacing) * (np.asarray(size) - 1) / 2)
    reference = sitk.Image(size, sitk.sitkUInt8)
    reference.SetSpacing(spacing)
    reference.SetDirection(source.GetDirection())
    reference.SetOrigin(tuple(origin))
    large = sitk.Resample(sitk.Cast(source, sitk.sitkFloat32), reference, sitk.Transform(), sitk.sitkLinear, 0,
                          sitk.sitkInt16)
    large_seg = sitk.Resample(labels, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    paths = folder / "large_img.nii.gz", folder / "large_seg.nii.gz"
    sitk.WriteImage(large, str(paths[0]))
    sitk.WriteImage(large_seg, str(paths[1]))
    return paths


def median(values):
    return statistics.median(values) if values else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="/work/shared/data/brains")
    parser.add_argument("--pairs", default="11:12,12:11")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--baseline", type=Path, help="another source tree to time as 'before'")
    parser.add_argument("--no-ants", action="store_true")
    parser.add_argument("--greedy", action="store_true")
    parser.add_argument("--best", action="store_true", help="also time ours with --quality best ('best')")
    parser.add_argument("--mutual", action="store_true",
                        help="also time ours (and best, with --best) with --mutual-target 0.01 ('ours+mi', 'best+mi')")
    parser.add_argument("--large", action="store_true", help="add the 400x400x300 0.6 mm case")
    parser.add_argument("--json", type=Path, help="write all figures here")
    args = parser.parse_args()

    data = Path(args.data)
    pairs = [tuple(p.split(":")) for p in args.pairs.split(",")]
    labels = _labels()
    methods = ["ours"] + (["best"] if args.best else []) + (["ours+mi"] if args.mutual else []) + \
              (["best+mi"] if args.mutual and args.best else []) + (["before"] if args.baseline else []) + \
              ([] if args.no_ants else ["ants"]) + (["greedy"] if args.greedy else [])
    times = {(m, p): [] for m in methods for p in pairs}
    cpu = {(m, p): [] for m in methods for p in pairs}
    memory = {(m, p): [] for m in methods for p in pairs}
    accuracy = {}
    work = Path(tempfile.mkdtemp(prefix="whole_process_"))
    try:
        for run in range(args.runs):
            for pair in pairs:
                fixed_path, moving_path = data / f"img_{pair[0]}.nii.gz", data / f"img_{pair[1]}.nii.gz"
                for method in methods:
                    out = work / f"{method}_{pair[0]}_{pair[1]}_{run}"
                    out.mkdir()
                    if method in OURS_OPTIONS:
                        command, env = ours_command(args.baseline if method == "before" else REPO, fixed_path,
                                                    moving_path, out, *OURS_OPTIONS[method])
                    elif method == "ants":
                        command, env = [sys.executable, "-c", ANTS_SCRIPT, str(fixed_path), str(moving_path),
                                        str(out) + "/"], None
                    else:
                        command, env = [sys.executable, "-c", GREEDY_SCRIPT, str(fixed_path), str(moving_path),
                                        str(out)], None
                    seconds, rss, cpu_seconds = run_timed(command, env)
                    times[(method, pair)].append(seconds)
                    cpu[(method, pair)].append(cpu_seconds)
                    memory[(method, pair)].append(rss)
                    print(f"run {run + 1} pair {pair[0]}:{pair[1]} {method:7s} {seconds:7.2f} s  CPU {cpu_seconds:7.2f} s  "
                          f"peak {rss:7.0f} MiB",
                          flush=True)
                    if run == 0:
                        fixed, moving = sitk.ReadImage(str(fixed_path)), sitk.ReadImage(str(moving_path))
                        seg_paths = data / f"seg_{pair[0]}.nii.gz", data / f"seg_{pair[1]}.nii.gz"
                        fixed_seg, moving_seg = (sitk.ReadImage(str(p)) for p in seg_paths)
                        judge = judge_ours if method in OURS_OPTIONS else {"ants": judge_ants, "greedy": judge_greedy}[method]
                        target = str(out) + "/" if method == "ants" else out
                        accuracy[(method, pair)] = judge(target, fixed, moving, fixed_seg, moving_seg, labels,
                                                         (fixed_path, moving_path, *seg_paths))
                    if run > 0 or method not in OURS_OPTIONS:
                        shutil.rmtree(out, ignore_errors=True)

        print("\nwhole process, fresh python each, median over runs (s); ratio = method / ours; machine shared")
        print(f"{'pair':7s} {'method':7s} {'median s':>9s} {'ratio':>6s} {'CPU s':>7s} {'ratio':>6s} {'peak MiB':>9s}  {'Dice f/b':>13s} "
              f"{'fold f/b %':>15s} {'ICE mean/p95 mm':>16s} {'moving order':>14s}")
        summary = {}
        for pair in pairs:
            base = median(times[("ours", pair)])
            base_cpu = median(cpu[("ours", pair)])
            for method in methods:
                t = median(times[(method, pair)])
                c = median(cpu[(method, pair)])
                acc = accuracy.get((method, pair), {})
                ice = (f"{acc['ice_mean']:.4f}/{acc['ice_p95']:.3f}" if "ice_mean" in acc else "-")
                ice_moving = (f"{acc['ice_moving_mean']:.4f}/{acc['ice_moving_p95']:.3f}" if "ice_moving_mean" in acc else "-")
                print(f"{pair[0]}:{pair[1]:4s} {method:7s} {t:9.2f} {t / base:6.2f} {c:7.2f} {c / base_cpu:6.2f} "
                      f"{max(memory[(method, pair)]):9.0f}  "
                      f"{acc.get('dice_forward', float('nan')):.3f}/{acc.get('dice_backward', float('nan')):.3f} "
                      f"{acc.get('folding_forward', float('nan')):7.4f}/{acc.get('folding_backward', float('nan')):7.4f} "
                      f"{ice:>16s} {ice_moving:>14s}")
                summary[f"{method} {pair[0]}:{pair[1]}"] = {"seconds": times[(method, pair)], "median": t,
                                                             "ratio_to_ours": t / base,
                                                             "cpu_seconds": cpu[(method, pair)],
                                                             "cpu_ratio_to_ours": c / base_cpu,
                                                             "peak_mib": memory[(method, pair)], **acc}
        for method in methods:
            for pair in pairs:
                stages = accuracy.get((method, pair), {}).get("stages")
                if stages:
                    print(f"stages {method} {pair[0]}:{pair[1]} (first run, report.json): "
                          + ", ".join(f"{k} {v:.2f}" for k, v in sorted(stages.items()) if isinstance(v, (int, float))))
                mutual = accuracy.get((method, pair), {}).get("mutual")
                if mutual and mutual.get("mutual_steps_run"):
                    print(f"mutual {method} {pair[0]}:{pair[1]} (first run, report.json): "
                          + ", ".join(f"{k[len('mutual_'):]} {v:g}" for k, v in sorted(mutual.items())))

        if args.large:
            a, b = pairs[0]
            large_img, large_seg = make_large(data / f"img_{a}.nii.gz", data / f"seg_{a}.nii.gz", work)
            out = work / "large"
            out.mkdir()
            command, env = ours_command(REPO, large_img, data / f"img_{b}.nii.gz", out)
            seconds, rss, cpu_seconds = run_timed(command, env)
            fixed = sitk.ReadImage(str(large_img))
            moving = sitk.ReadImage(str(data / f"img_{b}.nii.gz"))
            acc = judge_ours(out, fixed, moving, sitk.ReadImage(str(large_seg)),
                             sitk.ReadImage(str(data / f"seg_{b}.nii.gz")), labels)
            base = median(times[("ours", (a, b))])
            print(f"\nlarge: fixed img_{a} at 0.6 mm on 400x400x300, moving img_{b} (1 mm): {seconds:.2f} s "
                  f"({seconds / base:.2f}x the 1 mm pair's median {base:.2f} s), CPU {cpu_seconds:.2f} s "
                  f"({cpu_seconds / median(cpu[('ours', (a, b))]):.2f}x), peak {rss:.0f} MiB; "
                  f"Dice {acc['dice_forward']:.3f}/{acc['dice_backward']:.3f}, folding "
                  f"{acc['folding_forward']:.4f}/{acc['folding_backward']:.4f} %, ICE {acc['ice_mean']:.3f}/"
                  f"{acc['ice_p95']:.3f} mm")
            print("stages large (report.json): " + ", ".join(
                f"{k} {v:.2f}" for k, v in sorted(acc["stages"].items()) if isinstance(v, (int, float))))
            summary["large"] = {"seconds": seconds, "cpu_seconds": cpu_seconds, "peak_mib": rss,
                                "ratio_to_1mm": seconds / base, **acc}
        if args.json:
            args.json.write_text(json.dumps(summary, indent=2, default=float) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
