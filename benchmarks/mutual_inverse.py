"""What ``register(mutual_steps=N)`` (``--mutual-inverse N``) buys and costs on ordered brain
pairs: Dice both ways, inverse consistency in both orders, folding and the step's own seconds,
every figure from register()'s own report (label maps carried through the written fields).
The network's fields and each pair's affine do not depend on N and come from ``--cache`` (as in
``quality_tuning.py``). One JSON line per pair, quality and N is appended to ``--out``;
``--summary FILE`` prints the table, each N against N = 0 on the same pairs.

    python benchmarks/mutual_inverse.py --data ../shared/data/brains --pairs 11-12 12-11 \\
        --quality fast --steps 0 50 200 --out runs/mutual.jsonl
    python benchmarks/mutual_inverse.py --summary runs/mutual.jsonl
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from InverseRegLib import mutual, pipeline
from quality_tuning import parse_pair_run, read_pair  # benchmarks/ is on the path when this script runs


def key(row: dict) -> tuple:
    """A row's setting (rows written before the rate and the target were recorded: 0.01 mm, none)."""
    return row["pair"], row["quality"], row["steps"], row.get("step_mm", 0.01), row.get("target")


def summary(path: str) -> None:
    rows = [json.loads(line) for line in open(path)]
    base = {(r["pair"], r["quality"]): r for r in rows if r["steps"] == 0}
    print("| quality | steps (most) | rate mm | target mm | pairs | steps run | Dice fwd | Dice bwd | mean vs 0 steps "
          "| folding % fwd / bwd (worst) | ICE mean mm, fixed / moving order | mutual s (median) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for quality in ("fast", "best"):
        settings = sorted({key(r)[2:] for r in rows if r["quality"] == quality},
                          key=lambda k: (k[0], k[1], k[2] is not None, k[2] or 0))
        for steps, step_mm, target in settings:
            group = [r for r in rows if r["quality"] == quality and key(r)[2:] == (steps, step_mm, target)]
            gains = [(r["dice"] + r["dice_bwd"] - base[(r["pair"], quality)]["dice"]
                      - base[(r["pair"], quality)]["dice_bwd"]) / 2 for r in group if (r["pair"], quality) in base]
            run = [r.get("steps_run", r["steps"]) for r in group]
            print(f"| {quality} | {steps} | {step_mm if steps else ''} | {target if steps and target else ''} | "
                  f"{len(group)} | {min(run)}-{max(run)} | {np.mean([r['dice'] for r in group]):.4f} | "
                  f"{np.mean([r['dice_bwd'] for r in group]):.4f} | "
                  f"{f'{round(float(np.mean(gains)), 6) + 0.0:+.4f}' if gains else 'n/a'} | "
                  f"{max(r['fold_fwd'] for r in group):.4f} / "
                  f"{max(r['fold_bwd'] for r in group):.4f} | {np.mean([r['ice'] for r in group]):.4f} / "
                  f"{np.mean([r['ice_moving'] for r in group]):.4f} | "
                  f"{np.median([r['seconds_mutual'] for r in group]):.1f} |")


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--summary":
        summary(sys.argv[2])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quality", choices=["fast", "best"], default="fast")
    parser.add_argument("--steps", type=int, nargs="+", required=True,
                        help="step counts to run (with --target: the most steps)")
    parser.add_argument("--step-mm", type=float, default=None,
                        help=f"Adam's rate (default mutual.DEFAULT_STEP_MM, {mutual.DEFAULT_STEP_MM} mm)")
    parser.add_argument("--device", default="cpu", help="where register() runs, the steps included (default cpu)")
    parser.add_argument("--target", type=float, default=None,
                        help="stop once both orders' means are at most this many mm (register's mutual_target_mm)")
    args, state = parse_pair_run(parser, os.path.join("runs", "mutual-cache"), network=True)
    done = set()
    if os.path.exists(args.out):
        done = {key(r) for r in map(json.loads, open(args.out))}
    data = Path(args.data)
    step_mm = mutual.DEFAULT_STEP_MM if args.step_mm is None else args.step_mm
    mutual.DEFAULT_STEP_MM = step_mm  # read at each call of make_mutually_inverse
    for pair in args.pairs:
        fixed, moving, fixed_seg, moving_seg, state["key"] = read_pair(data, pair)
        for steps in args.steps:
            if key(dict(pair=pair, quality=args.quality, steps=steps, step_mm=step_mm, target=args.target)) in done:
                continue
            r = pipeline.register(fixed, moving, device=args.device, fixed_seg=fixed_seg, moving_seg=moving_seg,
                                  labels="freesurfer", quality=args.quality, mutual_steps=steps,
                                  mutual_target_mm=args.target if steps else None).report
            row = dict(pair=pair, quality=args.quality, steps=steps, step_mm=step_mm, target=args.target,
                       steps_run=r.get("mutual_steps_run", 0), dice=r["dice_mean"],
                       dice_bwd=r["dice_mean_backward"], ice=r["ice_mean_mm"], ice_moving=r["ice_moving_mean_mm"],
                       fold_fwd=r["folding_percent_forward"], fold_bwd=r["folding_percent_backward"],
                       seconds_mutual=r["seconds_mutual"], seconds_total=r["seconds_total"],
                       forward_change_mm=r.get("mutual_forward_change_mm", 0.0),
                       reached_target=r.get("mutual_reached_target"), rounds=r.get("mutual_rounds"),
                       folds_repaired=(r["folds_repaired_forward"], r["folds_repaired_backward"]))
            print(json.dumps(row), flush=True)
            with open(args.out, "a") as out:
                out.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
