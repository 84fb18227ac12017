"""Whole commands on a machine with an NVIDIA GPU: the figures that issue 13's inverse-consistency
goal and issue 14's GPU goal wait for, prepared so that a lent device session spends its minutes
measuring, not debugging (``benchmarks/gpu_check.sh`` runs it there; see benchmarks/README.md).

For each ordered pair and setting it runs, as a fresh process, ::

    python -m InverseRegLib register FIXED MOVING -o OUT --device DEVICE --progress none \\
        --fixed-seg SEG --moving-seg SEG --labels LABELS [the setting's options]

times it from start to exit, and reads its ``report.json``: the stages' seconds, Dice both ways,
inverse consistency in both orders, folding, the mutual-inverse steps run and peak GPU memory.
``--cpu-baseline`` adds the same commands with ``--device cpu`` on the same machine, so GPU and
CPU figures come from one machine and one run. Prints one table; writes every figure to
``OUT/gpu_check.json`` and each first run's report to ``OUT/<setting>_<device>_<pair>.json``.

Settings (``--settings``): ``default``, ``best`` (``--quality best``), ``target``
(``--mutual-target 0.01``) and ``best+target``.
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

REPO = Path(__file__).resolve().parents[1]

#: the options each setting adds to ``register``
SETTINGS = {"default": [], "best": ["--quality", "best"], "target": ["--mutual-target", "0.01"],
            "best+target": ["--quality", "best", "--mutual-target", "0.01"]}

#: report.json fields shown in the table, and the column each goes to
COLUMNS = [("seconds_startup", "startup"), ("seconds_network", "network"), ("seconds_fullres", "1 mm"),
           ("seconds_inverse", "inverse"), ("seconds_mutual", "mutual"), ("seconds_writing", "writing"),
           ("mutual_steps_run", "steps"), ("dice_mean", "Dice fwd"), ("dice_mean_backward", "Dice bwd"),
           ("ice_mean_mm", "ICE fixed"), ("ice_moving_mean_mm", "ICE moving"),
           ("folding_percent_forward", "fold fwd %"), ("folding_percent_backward", "fold bwd %"),
           ("peak_memory_mb_gpu", "GPU MiB")]


def register_command(data: Path, pair: tuple[str, str], out: Path, device: str, labels: str,
                     options: list[str]) -> list[str]:
    fixed, moving = pair
    return [sys.executable, "-m", "InverseRegLib", "register", str(data / f"img_{fixed}.nii.gz"),
            str(data / f"img_{moving}.nii.gz"), "-o", str(out), "--device", device, "--progress", "none",
            "--fixed-seg", str(data / f"seg_{fixed}.nii.gz"), "--moving-seg", str(data / f"seg_{moving}.nii.gz"),
            "--labels", labels, *options]


def run_once(command: list[str]) -> float:
    """Wall seconds of one fresh process; raises with its last words if it fails."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    started = time.perf_counter()
    done = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[2:5])} ... failed ({done.returncode}): {done.stderr.strip()[-400:]}")
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="a folder of img_XX.nii.gz / seg_XX.nii.gz")
    parser.add_argument("--pairs", default="11:12,12:11", help="ordered pairs FIXED:MOVING, comma-separated")
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, of {', '.join(SETTINGS)}")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--cpu-baseline", action="store_true", help="also run every command with --device cpu")
    parser.add_argument("--runs", type=int, default=2, help="fresh processes per command (the median is quoted)")
    parser.add_argument("--labels", default="freesurfer", help="register's --labels (default: freesurfer)")
    parser.add_argument("--out", type=Path, default=Path("gpu_check"))
    args = parser.parse_args(argv)

    settings = args.settings.split(",")
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        parser.error(f"unknown settings {unknown}; choose from {', '.join(SETTINGS)}")
    pairs = [tuple(p.split(":")) for p in args.pairs.split(",")]
    devices = [args.device] + (["cpu"] if args.cpu_baseline and args.device != "cpu" else [])
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    try:
        for device in devices:
            for setting in settings:
                for pair in pairs:
                    name = f"{setting}_{device}_{pair[0]}-{pair[1]}"
                    seconds, report = [], None
                    for run in range(args.runs):
                        out = work / f"{name}_{run}"
                        seconds.append(run_once(register_command(args.data, pair, out, device, args.labels,
                                                                 SETTINGS[setting])))
                        if report is None:
                            report = json.loads((out / "report.json").read_text())
                            shutil.copyfile(out / "report.json", args.out / f"{name}.json")
                        shutil.rmtree(out, ignore_errors=True)
                    row = {"setting": setting, "device": device, "pair": f"{pair[0]}:{pair[1]}", "seconds": seconds,
                           "median_seconds": statistics.median(seconds), "report_device": report.get("device"),
                           **{key: report.get(key) for key, _ in COLUMNS}}
                    rows.append(row)
                    print(f"{name}: {row['median_seconds']:.2f} s (runs {', '.join(f'{s:.2f}' for s in seconds)})",
                          flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print("\nwhole command, fresh process, median of runs; stages from the first run's report.json")
    header = ["setting", "device", "pair", "whole s"] + [column for _, column in COLUMNS]
    print(" | ".join(header))
    for row in rows:
        cells = [row["setting"], row["device"], row["pair"], f"{row['median_seconds']:.2f}"]
        for key, _ in COLUMNS:
            value = row[key]
            cells.append("-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value))
        print(" | ".join(cells))
    (args.out / "gpu_check.json").write_text(json.dumps(rows, indent=2) + "\n")
    if any(row["report_device"] != row["device"] for row in rows):
        print("warning: some commands ran on another device than asked (no GPU visible?)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
