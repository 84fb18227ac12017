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

from InverseRegLib import pipeline
from quality_tuning import parse_pair_run, read_pair  # benchmarks/ is on the path when this script runs


def summary(path: str) -> None:
    rows = [json.loads(line) for line in open(path)]
    base = {(r["pair"], r["quality"]): r for r in rows if r["steps"] == 0}
    print("| quality | steps | pairs | Dice fwd | Dice bwd | mean vs 0 steps | folding % fwd / bwd (worst) "
          "| ICE mean mm, fixed / moving order | mutual s (median) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for quality in ("fast", "best"):
        for steps in sorted({r["steps"] for r in rows if r["quality"] == quality}):
            group = [r for r in rows if r["quality"] == quality and r["steps"] == steps]
            gains = [(r["dice"] + r["dice_bwd"] - base[(r["pair"], quality)]["dice"]
                      - base[(r["pair"], quality)]["dice_bwd"]) / 2 for r in group if (r["pair"], quality) in base]
            print(f"| {quality} | {steps} | {len(group)} | {np.mean([r['dice'] for r in group]):.4f} | "
                  f"{np.mean([r['dice_bwd'] for r in group]):.4f} | "
                  f"{round(float(np.mean(gains)), 6) + 0.0:+.4f} | {max(r['fold_fwd'] for r in group):.4f} / "
                  f"{max(r['fold_bwd'] for r in group):.4f} | {np.mean([r['ice'] for r in group]):.4f} / "
                  f"{np.mean([r['ice_moving'] for r in group]):.4f} | "
                  f"{np.median([r['seconds_mutual'] for r in group]):.1f} |")


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--summary":
        summary(sys.argv[2])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quality", choices=["fast", "best"], default="fast")
    parser.add_argument("--steps", type=int, nargs="+", required=True)
    args, state = parse_pair_run(parser, os.path.join("runs", "mutual-cache"), network=True)
    done = set()
    if os.path.exists(args.out):
        done = {(r["pair"], r["quality"], r["steps"]) for r in map(json.loads, open(args.out))}
    data = Path(args.data)
    for pair in args.pairs:
        fixed, moving, fixed_seg, moving_seg, state["key"] = read_pair(data, pair)
        for steps in args.steps:
            if (pair, args.quality, steps) in done:
                continue
            r = pipeline.register(fixed, moving, device="cpu", fixed_seg=fixed_seg, moving_seg=moving_seg,
                                  labels="freesurfer", quality=args.quality, mutual_steps=steps).report
            row = dict(pair=pair, quality=args.quality, steps=steps, dice=r["dice_mean"],
                       dice_bwd=r["dice_mean_backward"], ice=r["ice_mean_mm"], ice_moving=r["ice_moving_mean_mm"],
                       fold_fwd=r["folding_percent_forward"], fold_bwd=r["folding_percent_backward"],
                       seconds_mutual=r["seconds_mutual"], seconds_total=r["seconds_total"],
                       forward_change_mm=r.get("mutual_forward_change_mm", 0.0))
            print(json.dumps(row), flush=True)
            with open(args.out, "a") as out:
                out.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
