"""Dice gain of `--refine N` (instance optimisation) against its added time, on one labelled pair.

    python benchmarks/refine_gain.py --data ../shared/data/brains --fixed 11 --moving 12 --steps 0 20 50
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from InverseRegLib.imageio import read_image, read_label
from InverseRegLib.metrics import FREESURFER_EVAL_LABELS
from InverseRegLib.modelfile import load_model
from InverseRegLib.pipeline import register


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--fixed", default="11")
    parser.add_argument("--moving", default="12")
    parser.add_argument("--steps", type=int, nargs="+", default=[0, 20, 50])
    parser.add_argument("--model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = lambda kind, s: f"{args.data}/{kind}_{s}.nii.gz"  # noqa: E731
    fixed, moving = read_image(path("img", args.fixed)), read_image(path("img", args.moving))
    fixed_seg, moving_seg = read_label(path("seg", args.fixed)), read_label(path("seg", args.moving))
    model = load_model(args.model)
    for steps in args.steps:
        report = register(fixed, moving, model, args.device, None, steps, fixed_seg, moving_seg,
                          list(FREESURFER_EVAL_LABELS)).report
        print(json.dumps({"refine": steps, "seconds_network": report["seconds_network"],
                          "dice": round(report["dice_mean"], 4), "dice_bwd": round(report["dice_mean_backward"], 4),
                          "fold": report["folding_percent_forward"], "ice": round(report["ice_mean_mm"], 3)}),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
