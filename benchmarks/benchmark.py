"""InverseNet vs VoxelMorph vs ANTs SyN vs greedy vs the affine-only start, on every ordered pair of a labelled set.

For each ordered pair (fixed, moving) of the chosen subjects and each method, one worker process
registers the pair in both directions, then measures, with the same code for every method:

* Dice per evaluation label (moving labels warped onto the fixed grid by the forward field, and
  fixed labels onto the moving grid by the backward field; nearest neighbour), mean and std over
  labels, and the paper's BIR per direction (``InverseRegLib.metrics``);
* % voxels with a non-positive Jacobian determinant of each displacement field (whole grid and
  image foreground; ``InverseRegLib.fields.jacobian_determinant`` on the field in LPS mm);
* inverse-consistency error |phi_back(phi_fwd(x)) - x| in mm, mean and 95th percentile over the
  fixed image's foreground (``InverseRegLib.fields.inverse_consistency_error``), and the same over
  the moving foreground the other way round;
* seconds for both directions (wall, in the worker, inputs already in memory) and the process's
  CPU seconds, for the first call of the process and, with ``--repeat N``, as the median of the
  N - 1 calls after it in the same process (the warm time); also the seconds until both fields
  are in hand and until both warped images are (ANTs returns its warped images from the
  registration call itself); peak resident memory (``ru_maxrss``) of the worker at the end of its
  first registration, before any evaluation code runs. Timings are also given as ratios to ANTs
  SyN's registration call on the same pair in the same run.

Every method's result is a pair of ITK displacement fields (forward on the fixed grid: fixed point
-> moving point; backward on the moving grid), LPS mm, so every metric is computed on the same
representation:

* InverseNet: ``InverseRegLib.pipeline.register(fixed, moving, model, affine=None)`` (the data are
  pre-aligned); its own report's ``seconds_network`` / ``seconds_to_fields`` are kept as well;
  ``--refine N`` (repeatable) adds a row for the first model with N steps of instance optimisation;
  ``--passes N`` (repeatable) a row for the first model with N network passes instead of the
  library's default, and ``--passes-for NAME=N`` sets the passes of one named model row;
* VoxelMorph (trained by ``benchmarks/train_voxelmorph.py``): run twice, moving -> fixed and
  fixed -> moving; each 2 mm model-grid field is resampled in physical space onto the 1 mm grid;
* ANTs (``antspyx``): one ``ants.registration`` gives both directions; its transform lists
  (affine + warp) are composed into one displacement field per direction by
  ``ants.apply_transforms(..., compose=...)`` (antsApplyTransforms' composite field output);
* greedy (``picsl-greedy``): ``Greedy3D().execute`` with ``DEFAULT_GREEDY``'s settings (its
  documented brain settings; ``--greedy NAME=SETTINGS`` to change, ``none`` to skip), forward
  field ``-o`` and its own inverse ``-oinv`` (pairs on one shared grid only);
* ``--quality best`` adds a row for the first model with ``register(quality='best')``;
* identity: the affine-only starting point (the shared brains are already affinely aligned).

All workers run with the same number of threads (``--threads``; OMP/MKL/torch and
``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` for ANTs). Results are cached per (method, pair) in
``--out``; rerun with ``--force`` to redo them. Writes ``--out/benchmark.json``,
``--out/benchmark_table.md``, the figures, and (``--report``) the tables into a markdown file
between ``<!-- benchmark:begin -->`` and ``<!-- benchmark:end -->``.

    python benchmarks/benchmark.py --data /work/shared/data/brains --subjects 11 12 \\
        --model InverseNet=Resources/InverseReg-default.pt \\
        --vxm VoxelMorph=/work/runs/voxelmorph_2mm/model.pt --threads 1 \\
        --out /work/runs/benchmark --figures docs/figures --report docs/benchmark.md
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

#: left/right FreeSurfer labels merged into one structure for the boxplots (the paper's Fig. 3)
STRUCTURES = [
    ("Cerebral WM", (2, 41)), ("Cerebral cortex", (3, 42)), ("Lateral ventricle", (4, 43)),
    ("Cerebellum WM", (7, 46)), ("Cerebellum cortex", (8, 47)), ("Thalamus", (10, 49)),
    ("Caudate", (11, 50)), ("Putamen", (12, 51)), ("Pallidum", (13, 52)), ("3rd ventricle", (14,)),
    ("4th ventricle", (15,)), ("Brain stem", (16,)), ("Hippocampus", (17, 53)), ("Amygdala", (18, 54)),
    ("CSF", (24,)), ("Ventral DC", (28, 60)),
]

#: SyN with antspyx's defaults, and SyN with ANTs' CC metric as antsRegistrationSyN.sh sets it
#: (radius 4, 100x70x50x20 at shrink 8/4/2/1, gradient step 0.1). antspyx's own "SyNCC" preset
#: (2100x1200x1200x20 iterations) did not finish one 1 mm pair in 12 min on 2 threads.
DEFAULT_ANTS = ["ANTs SyN=SyN",
                "ANTs SyN, CC metric=SyN,syn_metric=CC,syn_sampling=4,reg_iterations=100x70x50x20,grad_step=0.1"]


# ------------------------------------------------------------------------------------------------
# worker side: one method, one pair, in its own process


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _repeat(job, once, timing) -> None:
    """Call ``once()`` (which returns its timings) ``job['repeat'] - 1`` more times in this process
    and keep every call's timings; ``<key>_warm`` is the median over the calls after the first,
    the steady state a loaded model reaches on a series of pairs (the first call pays for lazy
    initialisation: oneDNN kernel selection, memory pools)."""
    import statistics
    # the high-water mark of one registration, before later calls overlap with the kept result
    timing["peak_rss_mb"] = _rss_mb()
    calls = [{k: timing[k] for k in TIMED if timing.get(k) is not None}]
    for _ in range(int(job.get("repeat", 1)) - 1):
        calls.append({k: v for k, v in once().items() if k in TIMED and v is not None})
    timing["calls"] = calls
    if len(calls) > 1:
        for key in TIMED:
            values = [c[key] for c in calls[1:] if key in c]
            if values:
                timing[key + "_warm"] = statistics.median(values)


#: the timings each registration call reports (first call as such, later calls as ``<key>_warm``)
TIMED = ("seconds_both_directions", "seconds_to_fields", "seconds_to_warped", "seconds_network", "cpu_seconds")


def _register_inversenet(job, fixed_path, moving_path, timing):
    import torch
    torch.set_num_threads(job["threads"])
    import SimpleITK as sitk  # noqa: F401
    from InverseRegLib.imageio import read_image
    from InverseRegLib.modelfile import load_model
    from InverseRegLib.pipeline import register

    fixed, moving = read_image(fixed_path), read_image(moving_path)
    t0 = time.perf_counter()
    model = load_model(job["path"], device="cpu")
    timing["seconds_model_load"] = time.perf_counter() - t0
    timing["rss_before_mb"] = _rss_mb()
    results = []

    def once():
        cpu0, t0 = _cpu_seconds(), time.perf_counter()
        result = register(fixed, moving, model, device=job.get("device", "cpu"), affine=None,
                          refine=int(job.get("refine", 0)), passes=job.get("passes"),
                          precision=job.get("precision", "auto"), quality=job.get("quality", "fast"))
        wall, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
        if not results:  # later calls only time themselves
            results.append(result)
        report = result.report
        return {"seconds_both_directions": wall, "cpu_seconds": cpu, "seconds_network": report["seconds_network"],
                "seconds_to_fields": report["seconds_to_fields"], "seconds_to_warped": report["seconds_to_warped"]}

    timing.update(once())
    _repeat(job, once, timing)
    result = results[0]
    timing["report"] = {k: v for k, v in result.report.items() if not isinstance(v, (dict, list))}
    timing["model"] = {"path": str(job["path"]), "model_id": model.model_id, "training": model.training,
                       "preset": model.preset.name}
    return fixed, moving, result.forward, result.backward


def _register_voxelmorph(job, fixed_path, moving_path, timing):
    import torch
    torch.set_num_threads(job["threads"])
    sys.path.insert(0, str(HERE))
    from train_voxelmorph import load_vxm, vxm_field_mm
    from InverseRegLib.fields import field_to_image
    from InverseRegLib.grid import Geometry
    from InverseRegLib.imageio import read_image

    fixed, moving = read_image(fixed_path), read_image(moving_path)
    t0 = time.perf_counter()
    model = load_vxm(job["path"])
    timing["seconds_model_load"] = time.perf_counter() - t0
    timing["rss_before_mb"] = _rss_mb()
    images = []

    def once():
        cpu0, t0 = _cpu_seconds(), time.perf_counter()
        forward, net_f = vxm_field_mm(model, fixed, moving)  # run 1: moving -> fixed
        backward, net_b = vxm_field_mm(model, moving, fixed)  # run 2: fixed -> moving
        fields = field_to_image(forward, Geometry.of(fixed)), field_to_image(backward, Geometry.of(moving))
        wall = time.perf_counter() - t0
        if not images:  # later calls only time themselves
            images.append(fields)
        return {"seconds_both_directions": wall, "seconds_to_fields": wall, "seconds_network": net_f + net_b,
                "cpu_seconds": _cpu_seconds() - cpu0}

    timing.update(once())
    _repeat(job, once, timing)
    forward_image, backward_image = images[0]
    timing["model"] = {"path": str(job["path"]), "training": model.training, "arch": model.arch}
    return fixed, moving, forward_image, backward_image


def _parse_ants_spec(spec: str) -> dict:
    """``SyN`` or ``SyN,syn_metric=CC,syn_sampling=4,reg_iterations=100x70x50x20``."""
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    kwargs = {"type_of_transform": parts[0]}
    for part in parts[1:]:
        key, value = part.split("=", 1)
        if "x" in value and all(v.isdigit() for v in value.split("x")):
            kwargs[key] = tuple(int(v) for v in value.split("x"))
        else:
            try:
                kwargs[key] = int(value)
            except ValueError:
                try:
                    kwargs[key] = float(value)
                except ValueError:
                    kwargs[key] = value
    return kwargs


def _register_ants(job, fixed_path, moving_path, timing):
    # ITK reads its thread count from the environment (set by the parent) when it first runs
    import tempfile
    import ants
    import SimpleITK as sitk

    kwargs = _parse_ants_spec(job["spec"])
    fixed_a, moving_a = ants.image_read(str(fixed_path)), ants.image_read(str(moving_path))
    timing["rss_before_mb"] = _rss_mb()
    runs = []

    def once():
        tmp = tempfile.mkdtemp(prefix="ants_", dir=job.get("tmp"))
        cpu0, t0 = _cpu_seconds(), time.perf_counter()
        reg = ants.registration(fixed_a, moving_a, outprefix=str(Path(tmp) / "reg_"), **kwargs)
        call = time.perf_counter() - t0
        t1 = time.perf_counter()
        fwd, inv = reg["fwdtransforms"], reg["invtransforms"]
        # antsApplyTransforms' composite displacement field output: affine and warp in one field per
        # direction, on the reference grid, fixed point -> moving point (ITK resampling convention)
        forward_path = ants.apply_transforms(fixed_a, moving_a, fwd, compose=str(Path(tmp) / "fwd_"),
                                             whichtoinvert=[False] * len(fwd))
        inverted = [("GenericAffine" in t or t.endswith(".mat")) for t in inv]
        backward_path = ants.apply_transforms(moving_a, fixed_a, inv, compose=str(Path(tmp) / "bwd_"),
                                              whichtoinvert=inverted)
        forward_image = sitk.Cast(sitk.ReadImage(forward_path), sitk.sitkVectorFloat64)
        backward_image = sitk.Cast(sitk.ReadImage(backward_path), sitk.sitkVectorFloat64)
        compose_seconds = time.perf_counter() - t1
        if runs:  # only the first run's files are kept (for the label check below)
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            runs.append((tmp, fwd, inv, inverted, forward_image, backward_image, compose_seconds))
        # ants.registration returns both warped images (warpedmovout, warpedfixout) with the transforms
        return {"seconds_both_directions": call, "seconds_to_warped": call,
                "seconds_to_fields": call + compose_seconds, "cpu_seconds": _cpu_seconds() - cpu0}

    timing.update(once())
    _repeat(job, once, timing)
    tmp, fwd, inv, inverted, forward_image, backward_image, timing["seconds_compose_fields"] = runs[0]
    timing["ants"] = {"version": ants.__version__,
                      "kwargs": {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()},
                      "fwdtransforms": [Path(t).name for t in fwd],
                      "invtransforms": [Path(t).name for t in inv], "inverted": inverted}

    def own_warps():
        """ANTs' own nearest-neighbour resampling of the label maps (checks the composed fields)."""
        import shutil
        try:
            fseg, mseg = ants.image_read(job["fixed_seg"]), ants.image_read(job["moving_seg"])
            return {"forward": ants.apply_transforms(fixed_a, mseg, fwd, interpolator="nearestNeighbor",
                                                     whichtoinvert=[False] * len(fwd)).numpy(),
                    "backward": ants.apply_transforms(moving_a, fseg, inv, interpolator="nearestNeighbor",
                                                      whichtoinvert=inverted).numpy()}
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    timing["_after"] = own_warps
    return None, None, forward_image, backward_image


#: greedy (picsl-greedy) with the settings its documentation gives for brain MRI: NCC 2x2x2,
#: 100x50x10 iterations at 4/2/1 mm, smoothing 1.5 and 0.5 voxels; no initial affine (the shared
#: brains are affinely pre-aligned); the inverse field from greedy's own ``-oinv``
DEFAULT_GREEDY = ["greedy=-n 100x50x10 -m NCC 2x2x2 -s 1.5vox 0.5vox"]


def _register_greedy(job, fixed_path, moving_path, timing):
    """``Greedy3D().execute("-d 3 -i F M -o fwd -oinv bwd <settings> -threads T")``: both fields
    are ITK displacement fields on the fixed grid (fixed point -> moving point, and back); the
    inverse serves as the moving-grid backward field only when both images share one grid."""
    import shutil
    import tempfile
    import SimpleITK as sitk
    from picsl_greedy import Greedy3D
    from InverseRegLib.grid import Geometry

    if Geometry.of(sitk.ReadImage(str(fixed_path))) != Geometry.of(sitk.ReadImage(str(moving_path))):
        raise SystemExit("greedy: -oinv lives on the fixed grid; this benchmark needs pairs that share one grid")
    timing["rss_before_mb"] = _rss_mb()
    runs = []

    def once():
        tmp = tempfile.mkdtemp(prefix="greedy_", dir=job.get("tmp"))
        forward_path, backward_path = str(Path(tmp) / "fwd.nii.gz"), str(Path(tmp) / "bwd.nii.gz")
        command = (f"-d 3 -i {fixed_path} {moving_path} -o {forward_path} -oinv {backward_path} "
                   f"{job['spec']} -threads {job['threads']}")
        cpu0, t0 = _cpu_seconds(), time.perf_counter()
        with open(os.devnull, "w") as quiet:
            Greedy3D().execute(command, out=quiet, err=quiet)
        call = time.perf_counter() - t0
        fields = tuple(sitk.Cast(sitk.ReadImage(p), sitk.sitkVectorFloat64) for p in (forward_path, backward_path))
        shutil.rmtree(tmp, ignore_errors=True)
        if not runs:
            runs.append(fields)
        return {"seconds_both_directions": call, "seconds_to_fields": call, "cpu_seconds": _cpu_seconds() - cpu0}

    timing.update(once())
    _repeat(job, once, timing)
    import picsl_greedy
    timing["greedy"] = {"version": getattr(picsl_greedy, "__version__", None), "command": job["spec"]}
    forward_image, backward_image = runs[0]
    return None, None, forward_image, backward_image


def _register_identity(job, fixed_path, moving_path, timing):
    import numpy as np
    from InverseRegLib.fields import field_to_image
    from InverseRegLib.grid import Geometry
    from InverseRegLib.imageio import read_image
    fixed, moving = read_image(fixed_path), read_image(moving_path)
    timing["rss_before_mb"] = _rss_mb()
    zeros_f = np.zeros((*Geometry.of(fixed).array_shape, 3))
    zeros_m = np.zeros((*Geometry.of(moving).array_shape, 3))
    forward, backward = field_to_image(zeros_f, Geometry.of(fixed)), field_to_image(zeros_m, Geometry.of(moving))
    # the starting point costs nothing: no registration is run
    timing["seconds_both_directions"] = timing["seconds_to_fields"] = timing["cpu_seconds"] = 0.0
    return fixed, moving, forward, backward


def run_worker(job: dict) -> int:
    kind = job["kind"]
    timing: dict = {}
    register_fn = {"inversenet": _register_inversenet, "voxelmorph": _register_voxelmorph,
                   "ants": _register_ants, "greedy": _register_greedy, "identity": _register_identity}[kind]
    fixed, moving, forward, backward = register_fn(job, job["fixed"], job["moving"], timing)
    # reading, registering, fields in memory (the first call's, where _repeat measured it)
    timing.setdefault("peak_rss_mb", _rss_mb())
    after = timing.pop("_after", None)
    own = after() if (after is not None and job.get("fixed_seg") and job.get("moving_seg")) else None
    if fixed is None:
        from InverseRegLib.imageio import read_image
        fixed, moving = read_image(job["fixed"]), read_image(job["moving"])

    import numpy as np
    import SimpleITK as sitk
    import torch
    torch.set_num_threads(job["threads"])
    from InverseRegLib.fields import (folding_percent, image_to_field, inverse_consistency_error,
                                      jacobian_determinant, warp_image)
    from InverseRegLib.grid import Geometry
    from InverseRegLib.imageio import read_label, write_image_atomic
    from InverseRegLib.metrics import bir, dice_per_label
    from InverseRegLib.pipeline import foreground_mask

    fixed_geometry, moving_geometry = Geometry.of(fixed), Geometry.of(moving)
    for image, geometry, what in ((forward, fixed_geometry, "forward"), (backward, moving_geometry, "backward")):
        g = Geometry.of(image)
        if g.size != geometry.size or not np.allclose(g.origin, geometry.origin, atol=1e-3) \
                or not np.allclose(g.spacing, geometry.spacing, atol=1e-5) \
                or not np.allclose(g.direction, geometry.direction, atol=1e-5):
            raise SystemExit(f"{kind}: the {what} field is not on its image's grid: {g} vs {geometry}")
        image.CopyInformation(geometry.reference_image())  # drop float noise in the header
    forward_field, _ = image_to_field(forward)
    backward_field, _ = image_to_field(backward)
    fixed_mask, moving_mask = foreground_mask(fixed), foreground_mask(moving)
    out = {"method": job["name"], "kind": kind, "fixed": job["fixed_name"], "moving": job["moving_name"],
           "threads": job["threads"], **timing}
    det = jacobian_determinant(forward_field, fixed_geometry)
    out["folding_percent_forward"] = folding_percent(det)
    out["folding_percent_forward_foreground"] = folding_percent(det, fixed_mask)
    out["jacobian_forward_min"] = float(det.min())
    del det
    det = jacobian_determinant(backward_field, moving_geometry)
    out["folding_percent_backward"] = folding_percent(det)
    out["folding_percent_backward_foreground"] = folding_percent(det, moving_mask)
    out["jacobian_backward_min"] = float(det.min())
    del det
    out["ice_mean_mm"], out["ice_p95_mm"] = inverse_consistency_error(forward, backward, fixed_mask)
    out["ice_moving_mean_mm"], out["ice_moving_p95_mm"] = inverse_consistency_error(backward, forward, moving_mask)
    displacement = np.linalg.norm(forward_field, axis=-1)[fixed_mask]
    out["displacement_mean_mm"] = float(displacement.mean()) if displacement.size else 0.0

    if job.get("fixed_seg") and job.get("moving_seg"):
        fixed_seg, moving_seg = read_label(job["fixed_seg"]), read_label(job["moving_seg"])
        fixed_labels = sitk.GetArrayFromImage(fixed_seg).astype(np.int32)
        moving_labels = sitk.GetArrayFromImage(moving_seg).astype(np.int32)
        warped_moving = warp_image(moving_seg, forward_field, fixed_geometry, nearest=True)
        warped_fixed = warp_image(fixed_seg, backward_field, moving_geometry, nearest=True)
        wm, wf = sitk.GetArrayFromImage(warped_moving), sitk.GetArrayFromImage(warped_fixed)
        labels = [int(v) for v in job["labels"]]
        labels = [v for v in labels if (fixed_labels == v).any() and (moving_labels == v).any()]
        forward_dice = dice_per_label(wm, fixed_labels, labels)
        backward_dice = dice_per_label(wf, moving_labels, labels)
        out.update({
            "labels": labels,
            "dice_per_label": {str(k): v for k, v in forward_dice.items()},
            "dice_per_label_backward": {str(k): v for k, v in backward_dice.items()},
            "dice_mean": float(np.mean(list(forward_dice.values()))),
            "dice_std": float(np.std(list(forward_dice.values()))),
            "dice_mean_backward": float(np.mean(list(backward_dice.values()))),
            "dice_std_backward": float(np.std(list(backward_dice.values()))),
            "bir": bir(wm, fixed_labels, labels),
            "bir_backward": bir(wf, moving_labels, labels),
        })
        if own is not None:
            # antspy arrays are (x, y, z); ours are (z, y, x)
            agree_f = float(np.mean(np.transpose(own["forward"], (2, 1, 0)).astype(np.int32) == wm))
            agree_b = float(np.mean(np.transpose(own["backward"], (2, 1, 0)).astype(np.int32) == wf))
            out["ants_composed_field_label_agreement"] = {"forward": agree_f, "backward": agree_b}
        pair_dir = Path(job["pair_dir"])
        write_image_atomic(sitk.Cast(warped_moving, sitk.sitkUInt8), pair_dir / "warped_moving_labels.nii.gz")
        write_image_atomic(sitk.Cast(warped_fixed, sitk.sitkUInt8), pair_dir / "warped_fixed_labels.nii.gz")
    Path(job["result"]).write_text(json.dumps(out, indent=1) + "\n")
    return 0


# ------------------------------------------------------------------------------------------------
# parent side


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")


def _named(entries: list[str], default_name: str) -> list[tuple[str, str]]:
    out = []
    for i, entry in enumerate(entries):
        if "=" in entry and not entry.startswith("/"):
            name, value = entry.split("=", 1)
        else:
            name, value = (default_name if len(entries) == 1 else f"{default_name} {i + 1}"), entry
        out.append((name.strip(), value.strip()))
    return out


def machine_info(threads: int) -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {"python": platform.python_version()}
    for module in ("torch", "numpy", "SimpleITK", "ants", "voxelmorph", "neurite", "nilearn"):
        try:
            mod = __import__(module)
            versions[module if module != "ants" else "antspyx"] = getattr(mod, "__version__", None) or \
                getattr(mod, "Version_VersionString", lambda: None)()
        except Exception:  # a missing peer is reported, not fatal
            versions[module] = None
    import torch
    return {"cpu": cpu, "cores": os.cpu_count(), "threads_per_method": threads,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "platform": platform.platform(), "versions": versions}


def run_job(job: dict, env: dict) -> dict:
    """Run one worker; returns its result plus the peak RSS of that child process (wait4)."""
    job_file = Path(job["pair_dir"]) / "job.json"
    job_file.write_text(json.dumps(job, indent=1))
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", str(job_file)], env=env)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"worker {job['name']} {job['fixed_name']}->{job['moving_name']} failed "
                         f"(exit {process.returncode})")
    result = json.loads(Path(job["result"]).read_text())
    result["process_peak_rss_mb_incl_evaluation"] = usage.ru_maxrss / 1024.0
    result["process_wall_seconds"] = time.perf_counter() - started
    Path(job["result"]).write_text(json.dumps(result, indent=1) + "\n")
    return result


def _fmt(value, digits=3):
    return "n/a" if value is None else f"{value:.{digits}f}"


def tables(results: list[dict], methods: list[str], reference: str | None) -> str:
    """Markdown: quality per method, timing per method (first call and warm), then per pair."""
    import numpy as np
    lines = []
    by_pair: dict = {}
    for r in results:
        by_pair.setdefault((r["fixed"], r["moving"]), {})[r["method"]] = r
    ref = {pair: m[reference] for pair, m in by_pair.items() if reference and reference in m}

    def ratio(r, key, ref_key="seconds_both_directions"):
        """``r[key]`` over the reference's ``ref_key`` on the same pair; a warm figure is divided by
        the reference's warm figure where it was repeated too, else by its single call."""
        base = ref.get((r["fixed"], r["moving"]))
        if base is None or r["kind"] == "identity" or not r.get(key):
            return None
        if key.endswith("_warm"):
            ref_key = ref_key + "_warm" if base.get(ref_key + "_warm") else ref_key
        return r[key] / base[ref_key] if base.get(ref_key) else None

    def rows_of(method):
        return [r for r in results if r["method"] == method]

    def mean(rs, key):
        values = [r[key] for r in rs if r.get(key) is not None]
        return float(np.mean(values)) if values else None

    def mean_ratio(rs, key, ref_key):
        values = [v for v in (ratio(r, key, ref_key) for r in rs) if v is not None]
        return float(np.mean(values)) if values else None

    def dice(rs, direction):
        key = "dice_per_label" + ("" if direction == "fwd" else "_backward")
        per_pair_mean = [np.mean(list(r[key].values())) for r in rs if key in r]
        per_pair_std = [np.std(list(r[key].values())) for r in rs if key in r]
        if not per_pair_mean:
            return "n/a"
        return f"{np.mean(per_pair_mean):.3f} ± {np.mean(per_pair_std):.3f}"

    lines += ["Quality (mean over pairs; Dice mean ± std over labels):", "",
              "| method | Dice fwd | Dice bwd | BIR fwd | BIR bwd | fold % fwd | fold % bwd | ICE mean mm | "
              "ICE p95 mm | peak RSS MB |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for method in methods:
        rs = rows_of(method)
        if rs:
            lines.append(
                f"| {method} | {dice(rs, 'fwd')} | {dice(rs, 'bwd')} | {_fmt(mean(rs, 'bir'))} | "
                f"{_fmt(mean(rs, 'bir_backward'))} | {_fmt(mean(rs, 'folding_percent_forward'), 4)} | "
                f"{_fmt(mean(rs, 'folding_percent_backward'), 4)} | {_fmt(mean(rs, 'ice_mean_mm'))} | "
                f"{_fmt(mean(rs, 'ice_p95_mm'))} | {_fmt(mean(rs, 'peak_rss_mb'), 0)} |")
    repeats = max((len(r.get("calls", [])) for r in results), default=1)
    warm = (f"the median of the {repeats - 1} later call(s) in the same process (n/a where a method ran once)"
            if repeats > 1 else "n/a: every method ran once (--repeat N adds warm timings)")
    lines += ["", f"Time for both directions, seconds (mean over pairs). \"first\": the first call in a fresh "
              f"process; \"warm\": {warm}. \"÷ SyN\": the ratio to the reference on the same pair.", "",
              "| method | to fields, first | to fields, warm | to fields ÷ SyN, first | to fields ÷ SyN, warm | "
              "to warped images, first / warm | whole call, first / warm | whole ÷ SyN, first | "
              "CPU s ÷ SyN CPU s, first |",
              "|---|---|---|---|---|---|---|---|---|"]
    for method in methods:
        rs = rows_of(method)
        if not rs or rs[0]["kind"] == "identity":
            continue
        lines.append(
            f"| {method} | {_fmt(mean(rs, 'seconds_to_fields'), 2)} | {_fmt(mean(rs, 'seconds_to_fields_warm'), 2)} | "
            f"{_fmt(mean_ratio(rs, 'seconds_to_fields', 'seconds_both_directions'), 4)} | "
            f"{_fmt(mean_ratio(rs, 'seconds_to_fields_warm', 'seconds_both_directions'), 4)} | "
            f"{_fmt(mean(rs, 'seconds_to_warped'), 2)} / {_fmt(mean(rs, 'seconds_to_warped_warm'), 2)} | "
            f"{_fmt(mean(rs, 'seconds_both_directions'), 2)} / {_fmt(mean(rs, 'seconds_both_directions_warm'), 2)} | "
            f"{_fmt(mean_ratio(rs, 'seconds_both_directions', 'seconds_both_directions'), 4)} | "
            f"{_fmt(mean_ratio(rs, 'cpu_seconds', 'cpu_seconds'), 4)} |")
    lines += ["", "Per pair (fixed ← moving):", "",
              "| pair | method | Dice fwd (mean ± std over labels) | Dice bwd | BIR fwd | BIR bwd | fold % fwd | "
              "fold % bwd | ICE mean / p95 mm | s network, first / warm | s to fields, first / warm | "
              "to fields ÷ SyN, first / warm | CPU s | peak RSS MB |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (fixed, moving), ms in by_pair.items():
        for method in methods:
            r = ms.get(method)
            if r is None:
                continue
            dice_f = f"{r['dice_mean']:.3f} ± {r['dice_std']:.3f}" if "dice_mean" in r else "n/a"
            dice_b = f"{r['dice_mean_backward']:.3f} ± {r['dice_std_backward']:.3f}" if "dice_mean" in r else "n/a"
            lines.append(
                f"| {fixed} ← {moving} | {method} | {dice_f} | {dice_b} | {_fmt(r.get('bir'))} | "
                f"{_fmt(r.get('bir_backward'))} | {_fmt(r['folding_percent_forward'], 4)} | "
                f"{_fmt(r['folding_percent_backward'], 4)} | {r['ice_mean_mm']:.3f} / {r['ice_p95_mm']:.3f} | "
                f"{_fmt(r.get('seconds_network'), 2)} / {_fmt(r.get('seconds_network_warm'), 2)} | "
                f"{_fmt(r.get('seconds_to_fields'), 2)} / {_fmt(r.get('seconds_to_fields_warm'), 2)} | "
                f"{_fmt(ratio(r, 'seconds_to_fields'), 4)} / {_fmt(ratio(r, 'seconds_to_fields_warm'), 4)} | "
                f"{_fmt(r.get('cpu_seconds'), 1)} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def figures(results: list[dict], methods: list[str], subjects: dict, out_dir: Path, figure_dir: Path,
            labels: list[int], n_pairs: int = 2) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import SimpleITK as sitk

    figure_dir.mkdir(parents=True, exist_ok=True)
    written = []
    # Fig. 3: per-structure Dice boxplots, both directions and hemispheres pooled per structure
    structures = [(name, [l for l in ls if l in labels]) for name, ls in STRUCTURES]
    structures = [(name, ls) for name, ls in structures if ls]
    if not structures:  # not FreeSurfer labels: one box per label
        structures = [(str(l), [l]) for l in labels]
    shown = [m for m in methods if any(r["method"] == m and "dice_per_label" in r for r in results)]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, ax = plt.subplots(figsize=(max(10, 0.9 * len(structures) * max(1, len(shown)) / 2.5), 5.2))
    width = 0.8 / max(len(shown), 1)
    for k, method in enumerate(shown):
        data = []
        for _, ls in structures:
            values = []
            for r in results:
                if r["method"] != method or "dice_per_label" not in r:
                    continue
                for key in ("dice_per_label", "dice_per_label_backward"):
                    values += [r[key][str(l)] for l in ls if str(l) in r[key]]
            data.append(values)
        positions = np.arange(len(structures)) + (k - (len(shown) - 1) / 2) * width
        box = ax.boxplot(data, positions=positions, widths=width * 0.9, patch_artist=True, showfliers=True,
                         flierprops={"markersize": 2})
        for patch in box["boxes"]:
            patch.set_facecolor(colors[k % len(colors)])
            patch.set_alpha(0.75)
        ax.plot([], [], color=colors[k % len(colors)], lw=8, alpha=0.75, label=method)
    ax.set_xticks(np.arange(len(structures)))
    ax.set_xticklabels([name for name, _ in structures], rotation=45, ha="right")
    ax.set_ylabel("Dice")
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="lower left", fontsize=8, ncol=min(len(shown), 3))
    ax.set_title("Dice per structure (left/right pooled; every ordered pair, both directions)")
    fig.tight_layout()
    path = figure_dir / "dice_boxplot.png"
    fig.savefig(path, dpi=130)
    plt.close(fig)
    written.append(str(path))

    # Fig. 2: target label vs warped label differences, two pairs, a coronal and an axial slice
    pairs = []
    for r in results:
        key = (r["fixed"], r["moving"])
        if key not in pairs:
            pairs.append(key)
    for index, (fixed_name, moving_name) in enumerate(pairs[:n_pairs]):
        fixed_image = sitk.GetArrayFromImage(sitk.ReadImage(str(subjects[fixed_name].image), sitk.sitkFloat32))
        target = sitk.GetArrayFromImage(sitk.ReadImage(str(subjects[fixed_name].label))).astype(np.int32)
        target = np.where(np.isin(target, labels), target, 0)
        panels = []
        for method in shown:
            warped_path = out_dir / _slug(method) / f"{fixed_name}_{moving_name}" / "warped_moving_labels.nii.gz"
            if warped_path.exists():
                warped = sitk.GetArrayFromImage(sitk.ReadImage(str(warped_path))).astype(np.int32)
                panels.append((method, np.where(np.isin(warped, labels), warped, 0)))
        if not panels:
            continue
        nz, ny, nx = target.shape
        labelled = np.argwhere(target > 0)
        centre = labelled.mean(axis=0).astype(int) if labelled.size else np.array([nz // 2, ny // 2, nx // 2])
        # array axes (z, y, x) of the LPS-ordered grid; flipped so that superior / anterior are up
        cuts = [("axial", lambda a: a[centre[0]][::-1]), ("coronal", lambda a: a[:, centre[1]][::-1])]
        fig, axes = plt.subplots(len(cuts), len(panels) + 1, figsize=(2.6 * (len(panels) + 1), 2.9 * len(cuts)))
        cmap = plt.get_cmap("tab20")
        for row, (cut_name, cut) in enumerate(cuts):
            ax = axes[row, 0]
            ax.imshow(cut(fixed_image), cmap="gray")
            lab = cut(target).astype(float)
            ax.imshow(np.ma.masked_where(lab == 0, lab % 20), cmap=cmap, vmin=0, vmax=19, alpha=0.55,
                      interpolation="nearest")
            ax.set_title(f"target labels ({fixed_name})" if row == 0 else "", fontsize=8)
            ax.set_ylabel(cut_name, fontsize=8)
            for col, (method, warped) in enumerate(panels, start=1):
                ax = axes[row, col]
                differ = (warped != target) & ((warped > 0) | (target > 0))
                ax.imshow(cut(fixed_image), cmap="gray")
                d = cut(differ)
                ax.imshow(np.ma.masked_where(~d, d), cmap="autumn", alpha=0.9, interpolation="nearest")
                share = 100.0 * differ.sum() / max((target > 0).sum(), 1)
                if row == 0:
                    ax.set_title(f"{method}\n{share:.1f}% of labelled voxels differ", fontsize=8)
            for ax in axes[row]:
                ax.set_xticks([])
                ax.set_yticks([])
        fig.suptitle(f"Warped label vs target label, fixed {fixed_name} ← moving {moving_name} "
                     f"(red: voxels whose label differs)", fontsize=9)
        fig.tight_layout()
        path = figure_dir / f"label_difference_pair{index + 1}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path))
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--data", default="/work/shared/data/brains", help="labelled folder (img_XX/seg_XX or manifest.csv)")
    parser.add_argument("--subjects", nargs="*", default=["11", "12"],
                        help="subjects to pair (default: the validation subjects 11 12); 'all' for every labelled one")
    parser.add_argument("--model", action="append", default=None,
                        help="InverseNet model file, or NAME=PATH; repeatable (default Resources/InverseReg-default.pt)")
    parser.add_argument("--vxm", action="append", default=None,
                        help="VoxelMorph model from benchmarks/train_voxelmorph.py, or NAME=PATH; repeatable "
                             "(default /work/runs/voxelmorph_2mm/model.pt); 'none' to skip")
    parser.add_argument("--ants", action="append", default=None,
                        help="NAME=TYPE[,key=value...] for ants.registration, repeatable (default: SyN with "
                             "antspyx's defaults and SyN with the CC metric, see DEFAULT_ANTS); 'none' to skip")
    parser.add_argument("--greedy", action="append", default=None,
                        help="NAME=SETTINGS for picsl-greedy (added to -d 3 -i F M -o ... -oinv ... -threads T), "
                             "repeatable (default: its documented brain settings, see DEFAULT_GREEDY); 'none' to skip")
    parser.add_argument("--quality", action="append", default=None, metavar="Q",
                        help="add a row: the first InverseNet model with register(quality=Q) (best)")
    parser.add_argument("--refine", type=int, action="append", default=None, metavar="N",
                        help="add a row: the first InverseNet model with N steps of instance optimisation "
                             "(repeatable: one row per N)")
    parser.add_argument("--passes", type=int, action="append", default=None, metavar="N",
                        help="add a row: the first InverseNet model with N network passes (repeatable)")
    parser.add_argument("--precision", action="append", default=None, metavar="P",
                        help="add a row: the first InverseNet model with its convolutions in precision P "
                             "(float32 or bfloat16; the other rows use the library's default, auto)")
    parser.add_argument("--passes-for", action="append", default=None, metavar="NAME=N",
                        help="run the InverseNet row NAME with N network passes (default: the library's)")
    parser.add_argument("--no-identity", action="store_true", help="leave out the affine-only starting point")
    parser.add_argument("--labels", default="freesurfer", help="'freesurfer' (the evaluation list), 'all', or 2,3,41,...")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for every method (default 1)")
    parser.add_argument("--device", default="cpu", help="device for InverseNet (cpu or cuda)")
    parser.add_argument("--pairs", type=int, default=None, help="only the first N ordered pairs (dry runs)")
    parser.add_argument("--repeat", type=int, default=1, metavar="N",
                        help="register each pair N times in its worker: the first call, and the median of the "
                             "others as the warm time (default 1)")
    parser.add_argument("--repeat-for", action="append", default=None, metavar="NAME=N",
                        help="N calls for the method NAME instead of --repeat (e.g. 1 for a slow peer)")
    parser.add_argument("--out", default="/work/runs/benchmark")
    parser.add_argument("--figures", default=str(ROOT / "docs" / "figures"))
    parser.add_argument("--report", help="markdown file whose <!-- benchmark:begin/end --> block gets the tables")
    parser.add_argument("--force", action="store_true", help="recompute cached (method, pair) results")
    parser.add_argument("--plot", action="append", default=None, metavar="NAME",
                        help="methods shown in the figures (repeatable; default: all)")
    args = parser.parse_args(argv)
    if args.worker:
        return run_worker(json.loads(Path(args.worker).read_text()))

    sys.path.insert(0, str(ROOT))
    from InverseRegLib.data import discover_subjects
    from InverseRegLib.device import PRECISIONS
    from InverseRegLib.metrics import resolve_labels

    subjects = {s.name: s for s in discover_subjects(args.data) if s.label is not None}
    chosen = sorted(subjects) if args.subjects in (["all"], []) else args.subjects
    missing = [s for s in chosen if s not in subjects]
    if missing or len(chosen) < 2:
        raise SystemExit(f"need >= 2 labelled subjects; not found or unlabelled: {missing}")
    pairs = [(f, m) for f in chosen for m in chosen if f != m]
    if args.pairs:
        pairs = pairs[: args.pairs]
    if args.labels == "all":
        import numpy as np
        import SimpleITK as sitk
        labels = sorted(set.intersection(*[set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(subjects[s].label)))).tolist())
                                           for s in chosen]) - {0})
    else:
        labels = resolve_labels(args.labels)

    methods: list[tuple[str, str, dict]] = []  # (name, kind, extra job fields)
    if not args.no_identity:
        methods.append(("affine only (identity)", "identity", {}))
    for name, path in _named(args.model or [str(ROOT / "Resources" / "InverseReg-default.pt")], "InverseNet"):
        if not Path(path).is_file():
            raise SystemExit(f"InverseNet model not found: {path}")
        methods.append((name, "inversenet", {"path": str(Path(path).resolve()), "device": args.device}))
    for entry in args.passes_for or []:
        name, _, count = entry.rpartition("=")
        row = next((m for m in methods if m[0] == name and m[1] == "inversenet"), None)
        if row is None or not count.isdigit() or int(count) < 1:
            raise SystemExit(f"--passes-for needs NAME=N with an InverseNet row's name and N >= 1, got {entry!r}")
        row[2]["passes"] = int(count)
    first = next(m for m in methods if m[1] == "inversenet")
    for count in args.passes or []:
        if count < 1:
            raise SystemExit(f"--passes needs N >= 1, got {count}")
        methods.append((f"{first[0]}, {count} pass{'es' if count > 1 else ''}", "inversenet",
                        {**first[2], "passes": count}))
    for precision in args.precision or []:
        if precision not in PRECISIONS:
            raise SystemExit(f"--precision needs one of {', '.join(PRECISIONS)}, got {precision!r}")
        methods.append((f"{first[0]}, {precision}", "inversenet", {**first[2], "precision": precision}))
    for steps in args.refine or []:
        if steps <= 0:
            raise SystemExit(f"--refine needs a positive number of steps, got {steps}")
        methods.append((f"{first[0]} + refine {steps}", "inversenet", {**first[2], "refine": steps}))
    for quality in args.quality or []:
        if quality not in ("fast", "best"):
            raise SystemExit(f"--quality needs fast or best, got {quality!r}")
        methods.append((f"{first[0]}, quality {quality}", "inversenet", {**first[2], "quality": quality}))
    vxm_entries = args.vxm or ["/work/runs/voxelmorph_2mm/model.pt"]
    if vxm_entries != ["none"]:
        for name, path in _named(vxm_entries, "VoxelMorph"):
            if not Path(path).is_file():
                raise SystemExit(f"VoxelMorph model not found: {path} (train it with benchmarks/train_voxelmorph.py)")
            methods.append((name, "voxelmorph", {"path": str(Path(path).resolve())}))
    ants_entries = args.ants or DEFAULT_ANTS
    if ants_entries != ["none"]:
        for entry in ants_entries:
            name, spec = entry.split("=", 1) if "=" in entry else (f"ANTs {entry}", entry)
            methods.append((name.strip(), "ants", {"spec": spec.strip()}))
    greedy_entries = args.greedy or DEFAULT_GREEDY
    if greedy_entries != ["none"]:
        for entry in greedy_entries:
            name, spec = entry.split("=", 1) if "=" in entry else ("greedy", entry)
            methods.append((name.strip(), "greedy", {"spec": spec.strip()}))
    reference = next((name for name, kind, extra in methods
                      if kind == "ants" and _parse_ants_spec(extra["spec"]) == {"type_of_transform": "SyN"}), None)

    if args.repeat < 1:
        raise SystemExit(f"--repeat needs N >= 1, got {args.repeat}")
    for name, _, extra in methods:
        extra["repeat"] = args.repeat
    for entry in args.repeat_for or []:
        name, _, count = entry.rpartition("=")
        row = next((m for m in methods if m[0] == name), None)
        if row is None or not count.isdigit() or int(count) < 1:
            raise SystemExit(f"--repeat-for needs NAME=N with a method's name and N >= 1, got {entry!r}")
        row[2]["repeat"] = int(count)
    unknown = sorted(set(args.plot or []) - {name for name, _, _ in methods})
    if unknown:
        raise SystemExit(f"--plot names no method of this run: {unknown}; methods: {[m[0] for m in methods]}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    threads = str(args.threads)
    env.update({"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads,
                "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": threads,
                "PYTHONPATH": os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)})
    results = []
    for fixed_name, moving_name in pairs:
        for name, kind, extra in methods:
            pair_dir = out / _slug(name) / f"{fixed_name}_{moving_name}"
            pair_dir.mkdir(parents=True, exist_ok=True)
            result_path = pair_dir / "result.json"
            if result_path.exists() and not args.force:
                results.append(json.loads(result_path.read_text()))
                print(f"[cached] {name}: {fixed_name} <- {moving_name}", flush=True)
                continue
            job = {"name": name, "kind": kind, "threads": args.threads, "fixed_name": fixed_name,
                   "moving_name": moving_name, "fixed": str(subjects[fixed_name].image),
                   "moving": str(subjects[moving_name].image), "fixed_seg": str(subjects[fixed_name].label),
                   "moving_seg": str(subjects[moving_name].label), "labels": labels, "pair_dir": str(pair_dir),
                   "result": str(result_path), "tmp": str(out), **extra}
            print(f"[run] {name}: {fixed_name} <- {moving_name}", flush=True)
            result = run_job(job, env)
            results.append(result)
            print(f"      Dice {result.get('dice_mean', float('nan')):.3f}/{result.get('dice_mean_backward', float('nan')):.3f}"
                  f"  fold {result['folding_percent_forward']:.4f}%  ICE {result['ice_mean_mm']:.3f} mm"
                  f"  {result['seconds_both_directions']:.1f} s  {result['peak_rss_mb']:.0f} MB", flush=True)

    method_names = [name for name, _, _ in methods]
    table = tables(results, method_names, reference)
    info = machine_info(args.threads)
    command = "python " + " ".join([str(Path(sys.argv[0]))] + [a if " " not in a and "<" not in a else repr(a)
                                                                 for a in sys.argv[1:]])
    summary = {"command": command, "machine": info, "data": str(args.data), "subjects": chosen,
               "pairs": [list(p) for p in pairs], "labels": labels, "reference_for_ratios": reference,
               "methods": [{"name": n, "kind": k, **e} for n, k, e in methods], "results": results}
    (out / "benchmark.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "benchmark_table.md").write_text(table + "\n")
    written = figures(results, args.plot or method_names, subjects, out, Path(args.figures), labels)
    print(table)
    print("figures:", *written)
    if args.report:
        report = Path(args.report)
        text = report.read_text() if report.exists() else "<!-- benchmark:begin -->\n<!-- benchmark:end -->\n"
        block = (f"<!-- benchmark:begin -->\n<!-- written by benchmarks/benchmark.py; do not edit by hand -->\n\n"
                 f"Command:\n\n```\n{command}\n```\n\nMachine: {info['cpu']}, {info['cores']} cores, "
                 f"{info['threads_per_method']} thread(s) per method; GPU: {info['gpu'] or 'none'}. "
                 f"Versions: {', '.join(f'{k} {v}' for k, v in info['versions'].items())}.\n\n"
                 f"Timing ratios are to {reference or 'n/a'} on the same pair in the same run.\n\n{table}\n\n"
                 f"<!-- benchmark:end -->")
        if "<!-- benchmark:begin -->" in text and "<!-- benchmark:end -->" in text:
            text = re.sub(r"<!-- benchmark:begin -->.*?<!-- benchmark:end -->", lambda _: block, text, flags=re.S)
        else:
            text = text.rstrip("\n") + "\n\n" + block + "\n"
        report.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
