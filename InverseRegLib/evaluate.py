"""Evaluation over all ordered pairs of a labelled folder: CSV per pair, per label, and a summary."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Callable

import numpy as np

from .data import discover_subjects
from .errors import InverseRegError
from .imageio import read_image, read_label
from .modelfile import LoadedModel, load_model
from .outputs import publish
from .pipeline import register

PAIR_COLUMNS = ["fixed", "moving", "dice_mean_before", "dice_mean", "dice_mean_backward", "bir", "bir_backward",
                "folding_percent_forward", "folding_percent_backward", "ice_mean_mm", "ice_p95_mm",
                "ice_moving_mean_mm", "ice_moving_p95_mm", "seconds_inverse", "mutual_steps_run", "seconds_mutual",
                "seconds_network", "seconds_total", "peak_memory_mb_process"]


def evaluate_folder(data_dir, outdir, model: LoadedModel | str | None = None, device="auto",
                    affine: str | None = "affine", refine: int = 0, labels=None, subjects: list[str] | None = None,
                    pair_callback: Callable[[int, int], None] | None = None, passes: int | None = None,
                    precision: str = "auto", quality: str = "fast", mutual_steps: int = 0,
                    mutual_target_mm: float | None = None) -> dict:
    """Register every ordered pair (fixed, moving) of labelled subjects and write
    ``pairs.csv``, ``labels.csv`` and ``summary.json`` into ``outdir``; returns the summary.
    The options are :func:`~.pipeline.register`'s."""
    chosen = [s for s in discover_subjects(data_dir) if s.label is not None]
    if subjects:
        chosen = [s for s in chosen if s.name in set(subjects)]
    if len(chosen) < 2:
        raise InverseRegError(f"need at least 2 labelled subjects in {data_dir} to evaluate, found {len(chosen)}")
    outdir = Path(outdir)
    if outdir.exists() and not outdir.is_dir():
        raise InverseRegError(f"output path exists and is not a folder: {outdir}")
    outdir.mkdir(parents=True, exist_ok=True)
    if not isinstance(model, LoadedModel):
        model = load_model(model)
    pairs = [(f, m) for f in chosen for m in chosen if f is not m]
    rows, label_rows = [], []
    for index, (fixed, moving) in enumerate(pairs):
        result = register(read_image(fixed.image), read_image(moving.image), model, device, affine, refine,
                          read_label(fixed.label), read_label(moving.label), labels, passes=passes,
                          precision=precision, quality=quality, mutual_steps=mutual_steps,
                          mutual_target_mm=mutual_target_mm)
        report = result.report
        rows.append({"fixed": fixed.name, "moving": moving.name, **{k: report.get(k) for k in PAIR_COLUMNS[2:]}})
        for label, value in report["dice_per_label"].items():
            label_rows.append({"fixed": fixed.name, "moving": moving.name, "label": label, "dice": value,
                               "dice_backward": report["dice_per_label_backward"].get(label)})
        if pair_callback:
            pair_callback(index + 1, len(pairs))
    summary = {"pairs": len(rows), "model_id": model.model_id, "device": rows[0] and result.report["device"],
               "passes": result.report["passes"], "refine_steps": result.report["refine_steps"],
               "precision": result.report["precision"], "quality": result.report["quality"],
               "mutual_steps": result.report["mutual_steps"], "mutual_target_mm": mutual_target_mm,
               "affine": result.report["affine"]}
    for key in PAIR_COLUMNS[2:]:
        values = np.asarray([r[key] for r in rows if r[key] is not None], dtype=float)
        if values.size:
            summary[key] = {"mean": float(values.mean()), "std": float(values.std())}
    writers = {"pairs.csv": lambda path: _write_csv(path, PAIR_COLUMNS, rows),
               "labels.csv": lambda path: _write_csv(path, LABEL_COLUMNS, label_rows)}

    def index(files: dict) -> str:
        summary["files"] = files
        return json.dumps(summary, indent=2) + "\n"

    # the three files replace an earlier evaluation's as one unit, summary.json last
    publish(outdir, writers, "summary.json", index, EVALUATION_NAMES)
    return summary


LABEL_COLUMNS = ["fixed", "moving", "label", "dice", "dice_backward"]

#: every file ``evaluate`` writes into its output folder
EVALUATION_NAMES = ("pairs.csv", "labels.csv", "summary.json")


def _write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    with Path(path).open("w", newline="", encoding="utf-8") as handle:  # a file in the staging folder (outputs.publish)
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
