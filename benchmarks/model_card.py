"""Write the bundled model's card from the model file and an `inversereg evaluate` summary.

    inversereg evaluate ../shared/data/brains -o runs/card_eval --model Resources/InverseReg-default.pt \
        --subjects 11 12 --no-affine --labels freesurfer --device cpu
    python benchmarks/model_card.py --model Resources/InverseReg-default.pt --eval runs/card_eval \
        --run runs/default_2mm --out Resources/InverseReg-default.md [--previous OLDER.pt ...]
"""
from __future__ import annotations

import argparse
import csv
import json
import platform
from pathlib import Path

from InverseRegLib.modelfile import load_model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--eval", required=True, help="folder written by inversereg evaluate")
    parser.add_argument("--run", help="training run folder (log.csv, val.csv, config.json)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--command", default="", help="the training command, verbatim")
    parser.add_argument("--notes", default="", help="extra markdown appended at the end")
    parser.add_argument("--previous", action="append",
                        help="a model this one descends from by --init, for the history; repeat, oldest first")
    args = parser.parse_args()
    model = load_model(args.model)
    summary = json.loads((Path(args.eval) / "summary.json").read_text())
    info = model.training
    size = "x".join(str(s) for s in model.grid.size)
    spacing = "x".join(f"{s:g}" for s in model.grid.spacing)

    def stat(key, digits=3):
        value = summary.get(key)
        return f"{value['mean']:.{digits}f} ± {value['std']:.{digits}f}" if value else "n/a"

    val_curve = ""
    if args.run and (Path(args.run) / "val.csv").exists():
        rows = list(csv.DictReader((Path(args.run) / "val.csv").open()))
        val_curve = ", ".join(f"{r['step']}: {float(r['dice']):.3f}" for r in rows)
    # the training history: every --init stage the weights went through, oldest first
    chain = [load_model(path) for path in args.previous or []] + [model]
    stages = [m.training for m in chain]
    if stages[0].get("init_steps") is not None:  # a stage before the oldest file given
        stages.insert(0, {"steps": stages[0]["init_steps"]})

    def describe(stage: dict, loaded) -> str:
        text = f"{stage.get('steps')} steps"
        if stage.get("lr") is not None:
            text += f" at lr {stage['lr']:g}, seed {stage.get('seed')}"
        if loaded is not None:
            text += f", loss {json.dumps(loaded.preset.weights)} / NCC window {loaded.preset.ncc_window}"
        if stage.get("cascade"):
            text += f", cascade {stage['cascade']:g}"
        return text

    files = [None] * (len(stages) - len(chain)) + chain
    parts = [describe(stage, loaded) for stage, loaded in zip(stages, files)]
    optimiser = (f"Adam, batch 1, lr {info.get('lr')}, seed {info.get('seed')}" if len(parts) == 1 else
                 "Adam, batch 1; a fresh Adam per stage (`--init`): " + "; then ".join(parts))
    steps = str(sum(int(stage.get("steps") or 0) for stage in stages))
    if len(stages) > 1:
        steps += f" in {len(stages)} stages (" + " + ".join(str(stage.get("steps")) for stage in stages) + ")"
    hours = sum(stage.get("seconds", 0) for stage in stages) / 3600
    untimed = [str(k + 1) for k, stage in enumerate(stages) if "seconds" not in stage]
    hours_text = f"{hours:.2f} h" + (f" (not counting stage {', '.join(untimed)}: its file records no time)"
                                     if untimed else "")
    settings = ""
    if "passes" in summary:
        settings = (f"; {summary['passes']} network pass{'es' if summary['passes'] != 1 else ''}, "
                    f"{summary.get('refine_steps', 0)} refinement steps")
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    text = f"""# Model card: InverseReg-default

| | |
|---|---|
| file | `{Path(args.model).name}` (model id `{model.model_id}`, {Path(args.model).stat().st_size / 1e6:.1f} MB) |
| preset | `{model.preset.name}`: {model.preset.field_type} fields, symmetric={model.preset.symmetric}, {model.preset.integration_steps} squarings |
| loss weights | {json.dumps(model.preset.weights)}, local NCC window {model.preset.ncc_window} voxels |
| model grid | {size} voxels at {spacing} mm (inputs are resampled into it in physical space; fields come back to the input grids) |
| intensity normalisation | {json.dumps(model.normalization)} |
| training data | `{info.get('data')}`: subjects {', '.join(info.get('train_subjects', []))} (pairwise N×(N−1)); validation {', '.join(info.get('val_subjects', []))} |
| augmentation | intensity (gamma, smooth bias, noise) with p={info.get('augment')} per image; label-synthesised random-contrast pairs with p={info.get('synth')} |
| optimiser | {optimiser} |
| steps | {steps} |
| device | {info.get('device')} ({cpu}); training time {hours_text} |

Training command:

```
{args.command}
```

## Validation (subjects {', '.join(info.get('val_subjects', []))}, all ordered pairs, full 1 mm resolution, through the written ITK fields{settings})

| measure | value |
|---|---|
| Dice (28 FreeSurfer structures), forward | {stat('dice_mean')} (before registration {stat('dice_mean_before')}) |
| Dice, backward | {stat('dice_mean_backward')} |
| BIR (paper) | {stat('bir')} |
| folding: voxels with det J ≤ 0, forward / backward % | {stat('folding_percent_forward', 4)} / {stat('folding_percent_backward', 4)} |
| inverse consistency error, mean / p95 mm | {stat('ice_mean_mm')} / {stat('ice_p95_mm')} |
| seconds per pair (network / total incl. metrics), CPU | {stat('seconds_network', 2)} / {stat('seconds_total', 2)} |

Validation Dice on the model grid during training (step: Dice): {val_curve or 'n/a'}.

{args.notes}
"""
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
