"""Preset ablation: the paper's loss vs diffeomorphic vs symmetric-diffeomorphic (our default).

Trains each preset with the same data, seed, step budget and grid, then evaluates every ordered
validation pair at full resolution through the public pipeline (the ITK fields we write), and
prints a markdown table of Dice, BIR, folding and inverse-consistency error. A measurement behind
the choice of the default preset, sized for a CPU (coarse grid, few steps); the numbers compare
the presets with each other, not with the bundled model.

A variant changes the loss of a preset with ``train``'s own options: ``default:weight-smooth=1,
ncc-window=9`` trains ``default`` with ``--weight-smooth 1 --ncc-window 9`` (so the loss and the
field model can be told apart). ``--passes`` (default 1, the paper's single pass) is what
``evaluate`` runs.

    python benchmarks/preset_ablation.py --data ../shared/data/brains --steps 300 --spacing 4 \\
        --presets paper diffeo default default:weight-smooth=1,ncc-window=9 \\
        --out runs/ablation --report docs/preset_ablation.md
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

BEGIN, END = "<!-- ablation:begin -->", "<!-- ablation:end -->"


def parse_variant(entry: str) -> tuple[str, list[str]]:
    """``preset[:option=value,...]`` -> (preset, extra ``train`` arguments)."""
    preset, _, options = entry.partition(":")
    extra = []
    for option in filter(None, (o.strip() for o in options.split(","))):
        key, separator, value = option.partition("=")
        if not separator or not re.fullmatch(r"[a-z][a-z-]*", key):
            raise SystemExit(f"variant options are train options as key=value, got {option!r} in {entry!r}")
        extra += [f"--{key}", value]
    return preset, extra


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", default="runs/ablation")
    parser.add_argument("--presets", nargs="*", default=["paper", "diffeo", "default"],
                        help="presets or variants PRESET:train-option=value,...")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--spacing", type=float, default=4.0)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--val", nargs="*", default=["11", "12"])
    parser.add_argument("--passes", type=int, default=1, help="network passes when evaluating (default 1)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--report", help="markdown file whose <!-- ablation:begin/end --> block gets the table")
    args = parser.parse_args()
    out = Path(args.out)
    rows = []
    for entry in args.presets:
        preset, extra = parse_variant(entry)
        run = out / re.sub(r"[^A-Za-z0-9_.-]+", "_", entry)
        started = time.perf_counter()
        if not (run / "model.pt").exists():
            command = [sys.executable, "-m", "InverseRegLib", "train", args.data, "-o", str(run), "--preset", preset,
                       "--steps", str(args.steps), "--spacing", str(args.spacing), "--lr", str(args.lr),
                       "--val", *args.val, "--val-every", str(args.steps), "--threads", str(args.threads), "--quiet",
                       *extra]
            if (run / "checkpoint.pt").exists():
                command.append("--resume")
            subprocess.run(command, check=True)
        train_seconds = time.perf_counter() - started
        evaluation = run.with_name(run.name + "_eval")
        subprocess.run([sys.executable, "-m", "InverseRegLib", "evaluate", args.data, "-o", str(evaluation),
                        "--model", str(run / "model.pt"), "--subjects", *args.val, "--no-affine",
                        "--labels", "freesurfer", "--device", "cpu", "--passes", str(args.passes)],
                       check=True, stdout=subprocess.DEVNULL)
        summary = json.loads((evaluation / "summary.json").read_text())
        rows.append((entry, summary, train_seconds))
    lines = [f"Same data, seed, lr {args.lr}, {args.steps} steps, {args.spacing} mm model grid, CPU; "
             f"validation pairs {', '.join(args.val)} (all ordered pairs), evaluated at full resolution "
             f"with {args.passes} network pass{'es' if args.passes != 1 else ''}.", "",
             "| preset | Dice fwd | Dice bwd | BIR | folding fwd % | folding bwd % | ICE mean mm | ICE p95 mm |",
             "|---|---|---|---|---|---|---|---|"]
    for entry, s, _ in rows:
        def f(key, digits=3):
            value = s.get(key)
            return f"{value['mean']:.{digits}f}" if value else "n/a"
        lines.append(f"| {entry} | {f('dice_mean')} | {f('dice_mean_backward')} | {f('bir')} | "
                     f"{f('folding_percent_forward', 4)} | {f('folding_percent_backward', 4)} | "
                     f"{f('ice_mean_mm')} | {f('ice_p95_mm')} |")
    table = "\n".join(lines)
    print(table)
    if args.report:
        report = Path(args.report)
        block = f"{BEGIN}\n<!-- written by benchmarks/preset_ablation.py; do not edit by hand -->\n\n{table}\n\n" \
                f"Command:\n\n```\npython {' '.join(sys.argv)}\n```\n\n{END}"
        text = report.read_text() if report.exists() else "# Preset ablation\n"
        if BEGIN in text and END in text:
            text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
        else:
            text = text.rstrip("\n") + "\n\n" + block + "\n"
        report.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
