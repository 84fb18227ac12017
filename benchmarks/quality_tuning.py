"""Settings of the stages after the network, compared on ordered pairs under the model card's protocol.

Each pair's affine and network fields are computed once and cached (``--cache``), so comparing
settings of ``--quality fast``'s model-grid stage or ``--quality best``'s full-resolution levels
repeats only what they change; every figure comes from ``register()``'s own report (Dice of the
label maps carried through the written fields, folding, timings). One JSON line per pair and
setting is appended to ``--out``; finished ones are skipped on a rerun.

Setting syntax ``NAME=QUALITY:ITERATIONS,RADIUS,SIGMA_UPDATE,SIGMA_FIELD,STEP`` with ITERATIONS
``10`` or ``20x10`` (coarsest first), e.g. ``fast10=fast:10,2,1.5,0.5,0.5``,
``none=fast:0,2,1.5,0.5,0.5`` (the network alone), ``best=best:20x10,2,1.5,0.5,0.5``,
``greedy=greedy:-n 100x50x10 -m NCC 2x2x2 -s 1.5vox 0.5vox`` (picsl-greedy with those options,
scored by the same code).
A ``best`` setting may add ``+POLISH`` (e.g. ``best:0x10,2,1.5,0.5,0.5+fast:10,2,1.5,0.5,0.5``)
to run the model-grid stage first.

    python benchmarks/quality_tuning.py --data ../shared/data/brains --pairs 03-04 04-03 \\
        --setting none=fast:0,2,1.5,0.5,0.5 --setting fast10=fast:10,2,1.5,0.5,0.5 --out runs/tune.jsonl
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from InverseRegLib import pipeline
from InverseRegLib import affine as affine_module
from InverseRegLib.fullres import FullResSettings
from InverseRegLib.metrics import resolve_labels


def parse_setting(text: str) -> tuple[str, dict]:
    name, spec = text.split("=", 1)
    if spec.startswith("greedy:"):
        return name, {"greedy": spec.removeprefix("greedy:")}
    parts = spec.split("+")
    out = {}
    for part in parts:
        quality, values = part.split(":", 1)
        it, radius, su, sf, step = values.split(",")
        settings = FullResSettings(iterations=tuple(int(n) for n in it.split("x")), radius=int(radius),
                                   sigma_update=float(su), sigma_field=float(sf), step=float(step))
        if "quality" not in out:
            out["quality"] = quality
        out["polish_settings" if quality == "fast" else "fullres_settings"] = settings
    return name, out


def cached(cache: Path, network: bool = True):
    """Wrap affine_align and (with ``network``) run_network so each pair's results are read from
    ``cache`` after the first call (keyed by the pair set in ``state['key']``)."""
    state = {"key": None}
    real_affine, real_network = affine_module.affine_align, pipeline.run_network

    def affine_align(fixed, moving, **kwargs):
        path = cache / f"{state['key']}_affine.tfm"
        if path.exists():
            return sitk.ReadTransform(str(path))
        transform = real_affine(fixed, moving, **kwargs)
        sitk.WriteTransform(transform, str(path))
        return transform

    def run_network(model, source, target, device, *args, **kwargs):
        path = cache / f"{state['key']}_network.pt"
        if path.exists():
            data = torch.load(path)
            return data["u_st"], data["u_ts"]
        u_st, u_ts = real_network(model, source, target, device, *args, **kwargs)
        torch.save({"u_st": u_st, "u_ts": u_ts}, path)
        return u_st, u_ts

    affine_module.affine_align = affine_align
    if network:
        pipeline.run_network = run_network
    return state


def summary(path: str, base_path: str | None = None) -> None:
    """Per setting: pairs, mean Dice (both ways), gain over ``none`` on the same pairs, worst
    folding on the image grids (backward: all voxels / 3 voxels inside the faces), mean ICE in both
    orders, median seconds of the stage and of the whole call, and their ratio to greedy's median
    when greedy ran in the same file. ``base_path``: where the ``none`` rows are, if elsewhere."""
    rows = [json.loads(line) for line in open(path)]
    base_rows = [json.loads(line) for line in open(base_path)] if base_path else rows
    base = {r["pair"]: r["dice"] for r in base_rows if r["setting"] == "none"}
    greedy = [r["seconds_total"] for r in rows if r["quality"] == "greedy"]
    names = list(dict.fromkeys(r["setting"] for r in rows))
    print("| setting | pairs | Dice fwd | Dice bwd | mean | gain over network alone | folding % fwd / bwd / bwd inside (image grids, worst pair) "
          "| ICE mean mm, fixed / moving order | stage s (median) | register s (median) | ÷ greedy |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")

    def worst(group, key, fallback=None):
        # rows from before the independent check: the report's own figure when it was measured
        # on that image grid
        values = [r.get(key, r.get(fallback) if fallback and "image grid" in r["folding_on"] else None) for r in group]
        values = [v for v in values if v is not None]
        return f"{max(values):.4f}" if values else "n/a"

    for name in names:
        group = [r for r in rows if r["setting"] == name]
        gain = [r["dice"] - base[r["pair"]] for r in group if r["pair"] in base]
        stage = [r["seconds_polish"] + r["seconds_fullres"] for r in group]
        total = float(np.median([r["seconds_total"] for r in group]))
        ratio = f"{total / float(np.median(greedy)):.2f}" if greedy else ""
        print(f"| {name} | {len(group)} | {np.mean([r['dice_fwd'] for r in group]):.4f} | "
              f"{np.mean([r['dice_bwd'] for r in group]):.4f} | {np.mean([r['dice'] for r in group]):.4f} | "
              f"{np.mean(gain) if gain else float('nan'):+.4f} | "
              f"{worst(group, 'folding_fwd_image_grid')} / {worst(group, 'folding_bwd_image_grid', 'folding_bwd')} / "
              f"{worst(group, 'folding_bwd_image_grid_interior')} | "
              f"{np.mean([r['ice_mean_mm'] for r in group]):.4f} / {np.mean([r['ice_moving_mean_mm'] for r in group]):.4f} | "
              f"{np.median(stage):.1f} | {total:.1f} | {ratio} |")


def run_greedy(spec: str, fixed_path: Path, moving_path: Path, fixed_seg, moving_seg, threads: int) -> dict:
    """picsl-greedy on the pair (``-o`` forward, ``-oinv`` backward; both images share one grid),
    scored by the very code of ``register()``'s report (label carrying, Dice, folding, ICE)."""
    import shutil
    import tempfile
    from picsl_greedy import Greedy3D
    from InverseRegLib.fields import image_to_field, folding_percent, jacobian_determinant
    from InverseRegLib.pipeline import foreground_mask, label_report
    from InverseRegLib.quality import inverse_consistency
    tmp = tempfile.mkdtemp(prefix="greedy_")
    try:
        fwd, bwd = str(Path(tmp) / "fwd.nii.gz"), str(Path(tmp) / "bwd.nii.gz")
        t0 = time.perf_counter()
        with open(os.devnull, "w") as quiet:
            Greedy3D().execute(f"-d 3 -i {fixed_path} {moving_path} -o {fwd} -oinv {bwd} {spec} -threads {threads}",
                               out=quiet, err=quiet)
        seconds = time.perf_counter() - t0
        forward, fixed_geometry = image_to_field(sitk.ReadImage(fwd))
        backward, moving_geometry = image_to_field(sitk.ReadImage(bwd))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    scores, _ = label_report(fixed_seg, moving_seg, forward, backward, fixed_geometry, moving_geometry,
                             resolve_labels("freesurfer"))
    fixed_mask = foreground_mask(sitk.ReadImage(str(fixed_path), sitk.sitkFloat32))
    moving_mask = foreground_mask(sitk.ReadImage(str(moving_path), sitk.sitkFloat32))
    ice = inverse_consistency(forward, fixed_geometry, backward, moving_geometry, fixed_mask)[0]
    ice_moving = inverse_consistency(backward, moving_geometry, forward, fixed_geometry, moving_mask)[0]
    folding = [folding_percent(jacobian_determinant(f, g)) for f, g in ((forward, fixed_geometry), (backward, moving_geometry))]
    return {"quality": "greedy", "dice_fwd": scores["dice_mean"], "dice_bwd": scores["dice_mean_backward"],
            "dice": 0.5 * (scores["dice_mean"] + scores["dice_mean_backward"]),
            "folding_fwd": folding[0], "folding_bwd": folding[1], "folding_on": "image grids",
            "folding_fwd_image_grid": folding[0], "folding_bwd_image_grid": folding[1],
            "ice_mean_mm": ice, "ice_moving_mean_mm": ice_moving, "seconds_polish": 0.0, "seconds_fullres": 0.0,
            "seconds_inverse": 0.0, "seconds_total": round(seconds, 3), "greedy": spec}


def read_pair(data: Path, pair: str):
    """``FIXED-MOVING`` of a labelled set -> (fixed, moving, fixed_seg, moving_seg, cache key)."""
    f, m = pair.split("-")
    fixed = sitk.ReadImage(str(data / f"img_{f}.nii.gz"), sitk.sitkFloat32)
    moving = sitk.ReadImage(str(data / f"img_{m}.nii.gz"), sitk.sitkFloat32)
    fixed_seg, moving_seg = (sitk.ReadImage(str(data / f"seg_{s}.nii.gz")) for s in (f, m))
    return fixed, moving, fixed_seg, moving_seg, f"{f}_{m}"


def parse_pair_run(parser: argparse.ArgumentParser, cache_default: str, network: bool):
    """The options every pair-by-pair comparison here shares (--data, --pairs, --cache, --out,
    --threads) added to ``parser`` and parsed; torch's threads set and the cache made ready
    (:func:`cached`). Returns ``(args, state)``."""
    parser.add_argument("--data", required=True)
    parser.add_argument("--pairs", nargs="+", required=True, help="FIXED-MOVING subject numbers, e.g. 03-04")
    parser.add_argument("--cache", default=cache_default)
    parser.add_argument("--out", required=True)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    return args, cached(cache, network)


def main() -> None:
    if len(os.sys.argv) in (3, 4) and os.sys.argv[1] == "--summary":
        summary(*os.sys.argv[2:])  # FILE [FILE WITH THE 'none' ROWS]
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", action="append", required=True)
    args, state = parse_pair_run(parser, "/work/runs/accuracy2/cache", network=True)
    done = set()
    if os.path.exists(args.out):
        for line in open(args.out):
            row = json.loads(line)
            done.add((row["pair"], row["setting"]))
    settings = [parse_setting(s) for s in args.setting]
    data = Path(args.data)
    for pair in args.pairs:
        f, m = pair.split("-")
        fixed, moving, fixed_seg, moving_seg, state["key"] = read_pair(data, pair)
        for name, kwargs in settings:
            if (pair, name) in done:
                continue
            t0 = time.perf_counter()
            if "greedy" in kwargs:
                row = {"pair": pair, "setting": name,
                       **run_greedy(kwargs["greedy"], data / f"img_{f}.nii.gz", data / f"img_{m}.nii.gz",
                                    fixed_seg, moving_seg, args.threads),
                       "wall": round(time.perf_counter() - t0, 2), "load": os.getloadavg()[0]}
                with open(args.out, "a") as handle:
                    handle.write(json.dumps(row) + "\n")
                print(f"{pair} {name}: Dice {row['dice_fwd']:.4f}/{row['dice_bwd']:.4f} folding "
                      f"{row['folding_fwd']:.4f}/{row['folding_bwd']:.4f} seconds {row['seconds_total']}", flush=True)
                continue
            result = pipeline.register(fixed, moving, device="cpu", fixed_seg=fixed_seg, moving_seg=moving_seg,
                                       labels="freesurfer", **kwargs)
            r = result.report
            # an independent check of the forward field's folding on the fixed image grid
            from InverseRegLib.fields import image_to_field, folding_percent, jacobian_determinant
            written, grid = image_to_field(result.forward)
            folding_image = folding_percent(jacobian_determinant(written, grid))
            written, grid = image_to_field(result.backward)
            det_bwd = jacobian_determinant(written, grid)
            folding_image_bwd = folding_percent(det_bwd)
            # folds away from the grid's faces (the inverse stalls where a preimage leaves the fixed grid)
            folding_image_bwd_interior = folding_percent(det_bwd[3:-3, 3:-3, 3:-3])
            del written
            row = {"pair": pair, "setting": name, "quality": r["quality"],
                   "dice_fwd": r["dice_mean"], "dice_bwd": r["dice_mean_backward"],
                   "dice": 0.5 * (r["dice_mean"] + r["dice_mean_backward"]),
                   "folding_fwd": r["folding_percent_forward"], "folding_bwd": r["folding_percent_backward"],
                   "folding_on": r["folding_measured_on"], "folding_fwd_image_grid": folding_image,
                   "folding_bwd_image_grid": folding_image_bwd,
                   "folding_bwd_image_grid_interior": folding_image_bwd_interior,
                   "folding_fwd_foreground": r["folding_percent_forward_foreground"],
                   "folding_bwd_foreground": r["folding_percent_backward_foreground"],
                   "ice_mean_mm": r["ice_mean_mm"], "ice_moving_mean_mm": r["ice_moving_mean_mm"],
                   "seconds_polish": r.get("seconds_polish"), "seconds_fullres": r["seconds_fullres"],
                   "seconds_inverse": r["seconds_inverse"], "seconds_total": r["seconds_total"],
                   "wall": round(time.perf_counter() - t0, 2), "load": os.getloadavg()[0],
                   "inverse": {k: v for k, v in r.items() if k.startswith("inverse_")}}
            with open(args.out, "a") as handle:
                handle.write(json.dumps(row) + "\n")
            print(f"{pair} {name}: Dice {row['dice_fwd']:.4f}/{row['dice_bwd']:.4f} folding "
                  f"{row['folding_fwd']:.4f}/{row['folding_bwd']:.4f} (image grids {folding_image:.4f}/{folding_image_bwd:.4f}, bwd 3 voxels inside the faces {folding_image_bwd_interior:.4f}) polish {row['seconds_polish']} "
                  f"fullres {row['seconds_fullres']} total {row['seconds_total']} load {row['load']:.1f}", flush=True)


if __name__ == "__main__":
    main()
