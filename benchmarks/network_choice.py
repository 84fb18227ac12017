"""Two networks compared through the whole of ``register()`` on ordered pairs (the model card's
protocol for choosing a network): ``--quality fast`` and ``best`` with each model file, every
figure from register()'s own report (label maps carried through the written fields). The affine
of each pair does not depend on the network and is computed once (``--cache``, as
``quality_tuning.py`` caches it). One JSON line
per model, pair and quality is appended to ``--out``; ``--summary FILE`` prints the table, each
model against the one named ``bundled``.

    python benchmarks/network_choice.py --data ../shared/data/brains --pairs 08-09 09-08 \\
        --model bundled=Resources/InverseReg-default.pt --model new=runs/x/best_model.pt --out runs/choice.jsonl
    python benchmarks/network_choice.py --summary runs/choice.jsonl
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from InverseRegLib import pipeline
from InverseRegLib.modelfile import load_model
from quality_tuning import parse_pair_run, read_pair  # benchmarks/ is on the path when this script runs


def summary(path: str) -> None:
    rows = [json.loads(line) for line in open(path)]
    base = {(r["pair"], r["quality"]): r["dice"] for r in rows if r["model"] == "bundled"}
    print("| network | quality | pairs | Dice fwd | Dice bwd | mean | vs bundled | folding % fwd / bwd (worst) "
          "| ICE mm fixed / moving |")
    print("|---|---|---|---|---|---|---|---|---|")
    for quality in ("fast", "best"):
        for name in dict.fromkeys(r["model"] for r in rows):
            group = [r for r in rows if r["model"] == name and r["quality"] == quality]
            if not group:
                continue
            gains = [r["dice"] - base[(r["pair"], quality)] for r in group if (r["pair"], quality) in base]
            print(f"| {name} (`{group[0]['model_id']}`) | {quality} | {len(group)} | "
                  f"{np.mean([r['dice_fwd'] for r in group]):.4f} | {np.mean([r['dice_bwd'] for r in group]):.4f} | "
                  f"{np.mean([r['dice'] for r in group]):.4f} | {np.mean(gains) if gains else float('nan'):+.4f} | "
                  f"{max(r['fold_fwd'] for r in group):.4f} / {max(r['fold_bwd'] for r in group):.4f} | "
                  f"{np.mean([r['ice'] for r in group]):.3f} / {np.mean([r['ice_moving'] for r in group]):.4f} |")


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--summary":
        summary(sys.argv[2])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, help="NAME=PATH (one named 'bundled' is the base)")
    parser.add_argument("--quality", nargs="+", default=["fast", "best"])
    # the affine only is cached: it does not depend on the network
    args, state = parse_pair_run(parser, "runs/network_choice_cache", network=False)
    data = Path(args.data)
    for spec in args.model:
        name, path = spec.split("=", 1)
        model = load_model(path, device="cpu")
        for pair in args.pairs:
            fixed, moving, fixed_seg, moving_seg, state["key"] = read_pair(data, pair)
            for quality in args.quality:
                report = pipeline.register(fixed, moving, model=model, device="cpu", fixed_seg=fixed_seg,
                                           moving_seg=moving_seg, labels="freesurfer", quality=quality).report
                row = {"model": name, "model_id": model.model_id, "pair": pair, "quality": quality,
                       "dice_fwd": report["dice_mean"], "dice_bwd": report["dice_mean_backward"],
                       "dice": 0.5 * (report["dice_mean"] + report["dice_mean_backward"]),
                       "fold_fwd": report["folding_percent_forward"], "fold_bwd": report["folding_percent_backward"],
                       "ice": report["ice_mean_mm"], "ice_moving": report["ice_moving_mean_mm"],
                       "seconds": report["seconds_total"]}
                print(json.dumps(row), flush=True)
                with open(args.out, "a") as handle:
                    handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
