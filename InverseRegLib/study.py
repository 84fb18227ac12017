"""Registering a study: many pairs in one run, one folder per pair, one summary table.

Pairs come from a template and subjects (every subject registered onto the template: fixed =
template, moving = subject) or from a CSV with columns ``fixed,moving[,fixed_seg,moving_seg][,name]``
(relative paths are relative to the CSV's folder). The model is loaded once per process.

Resuming: a pair whose folder holds a complete ``report.json`` (written last, atomically, by
:func:`~.outputs.write_result`) made from the same input files and options is skipped, so a
study that was stopped (Ctrl-C, a crash, a killed job) continues where it stopped and a finished
pair is never redone or lost. A pair that fails (a missing file, a label map on another grid, ...)
gets an ``error.txt`` in its folder with the one-line reason, and the study goes on.

Several processes (``torchrun --nproc_per_node N -m InverseRegLib study ...``): rank r takes the
pairs i with ``i % world == r``, so each pair is done exactly once; when all ranks are done
(a gloo barrier), rank 0 writes the summary. The summary is always *rebuilt from the pair folders*
(their reports and error files), so it is right whichever process wrote which pair, and after a
crash the next run rebuilds it; in a single process it is also rewritten after every pair.
"""
from __future__ import annotations

import csv
import datetime
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import InverseRegError

SUMMARY_COLUMNS = ["pair", "status", "fixed", "moving", "dice_mean", "dice_mean_backward", "dice_mean_before",
                   "ice_mean_mm", "ice_p95_mm", "folding_percent_forward", "folding_percent_backward", "seconds",
                   "message"]
SUMMARY_NAME = "summary.csv"
ERROR_NAME = "error.txt"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
_IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".gz")


@dataclass(frozen=True)
class Pair:
    name: str
    fixed: Path
    moving: Path
    fixed_seg: Path | None = None
    moving_seg: Path | None = None

    def inputs(self) -> dict:
        """What the report records of the inputs (absolute paths as text), to recognise the pair."""
        return {key: (str(value) if value is not None else None) for key, value in
                (("fixed", self.fixed), ("moving", self.moving), ("fixed_seg", self.fixed_seg),
                 ("moving_seg", self.moving_seg))}


def stem(path) -> str:
    """File name without its image extension(s): ``img_01.nii.gz`` -> ``img_01``."""
    name = Path(path).name
    for suffix in _IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def _checked(pairs: list[Pair], where: str) -> list[Pair]:
    if not pairs:
        raise InverseRegError(f"{where}: no pairs to register")
    seen = {}
    for pair in pairs:
        if not _NAME.match(pair.name):
            raise InverseRegError(f"{where}: pair name {pair.name!r} is not a plain folder name "
                                  "(letters, digits, . _ + -, not starting with a dot)")
        if pair.name in seen:
            raise InverseRegError(f"{where}: two pairs are named {pair.name!r}; give them a name column")
        seen[pair.name] = pair
    return pairs


def pairs_from_template(template, subjects: list, template_seg=None, subject_segs: list | None = None) -> list[Pair]:
    """Every subject onto the template (fixed = template, moving = subject), named after the subject."""
    if subject_segs and len(subject_segs) != len(subjects):
        raise InverseRegError(f"--subject-segs: {len(subject_segs)} label maps for {len(subjects)} subjects")
    if (template_seg is None) != (not subject_segs):
        raise InverseRegError("--template-seg and --subject-segs go together")
    template = Path(template).absolute()
    pairs = [Pair(stem(subject), template, Path(subject).absolute(),
                  Path(template_seg).absolute() if template_seg else None,
                  Path(subject_segs[i]).absolute() if subject_segs else None)
             for i, subject in enumerate(subjects)]
    return _checked(pairs, "--template")


def pairs_from_csv(path) -> list[Pair]:
    """Pairs from a CSV with a header ``fixed,moving[,fixed_seg,moving_seg][,name]``."""
    path = Path(path)
    if not path.is_file():
        raise InverseRegError(f"pairs file not found: {path}")
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise InverseRegError(f"cannot read pairs file {path}: {error}") from None
    missing = {"fixed", "moving"} - set(columns)
    if missing:
        raise InverseRegError(f"pairs file {path} needs columns fixed,moving[,fixed_seg,moving_seg][,name]; "
                              f"missing {', '.join(sorted(missing))}")
    unknown = set(columns) - {"fixed", "moving", "fixed_seg", "moving_seg", "name"}
    if unknown:
        raise InverseRegError(f"pairs file {path}: unknown columns {', '.join(sorted(unknown))}")
    base = path.parent.absolute()
    pairs = []
    for number, row in enumerate(rows, start=2):
        row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
        if not row.get("fixed") or not row.get("moving"):
            raise InverseRegError(f"pairs file {path} line {number}: fixed and moving are both needed")
        segs = [row.get("fixed_seg") or None, row.get("moving_seg") or None]
        if (segs[0] is None) != (segs[1] is None):
            raise InverseRegError(f"pairs file {path} line {number}: fixed_seg and moving_seg go together")
        fixed, moving = base / row["fixed"], base / row["moving"]
        name = row.get("name") or f"{stem(moving)}_to_{stem(fixed)}"
        pairs.append(Pair(name, fixed, moving, base / segs[0] if segs[0] else None, base / segs[1] if segs[1] else None))
    return _checked(pairs, f"pairs file {path}")


def read_report(folder: Path) -> dict | None:
    """The pair folder's report if it is complete (parses, has the total time), else None."""
    try:
        report = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) and "seconds_total" in report else None


def is_done(folder: Path, pair: Pair, options: dict) -> bool:
    """A complete report made from this pair's inputs with these options, its fields beside it."""
    report = read_report(folder)
    return (report is not None and report.get("study_inputs") == pair.inputs()
            and _with_later_defaults(report.get("study_options")) == options
            and all((folder / name).is_file() for name in ("forward.nii.gz", "backward.nii.gz")))


def _with_later_defaults(recorded):
    """Options a report recorded, with the defaults of options added since (a study made before
    ``quality``, ``mutual_steps`` and ``mutual_target_mm`` were recorded ran fast with none: still done under those)."""
    return {**LATER_DEFAULTS, **recorded} if isinstance(recorded, dict) else recorded


#: options recorded since the first studies, with the value those studies ran with
LATER_DEFAULTS = {"quality": "fast", "mutual_steps": 0, "mutual_target_mm": None}


def register_pair(pair: Pair, folder: Path, model, options: dict, jacobian: str | None = None,
                  recorded: dict | None = None, rank: str = "0/1", compression: str | None = None) -> dict:
    """Read, register and write one pair into ``folder``; returns the report. ``recorded``: the
    options the report keeps (``study_options``) to recognise the pair as done on a rerun."""
    from .imageio import read_image, read_label
    from .labels import check_label_map
    from .outputs import write_result
    from .pipeline import register

    fixed = read_image(pair.fixed, role="fixed image")
    moving = read_image(pair.moving, role="moving image")
    fixed_seg = moving_seg = None
    if pair.fixed_seg is not None:
        fixed_seg = check_label_map(read_label(pair.fixed_seg, role="fixed label map"), fixed,
                                    f"fixed label map {pair.fixed_seg}", f"the fixed image {pair.fixed}")
        moving_seg = check_label_map(read_label(pair.moving_seg, role="moving label map"), moving,
                                     f"moving label map {pair.moving_seg}", f"the moving image {pair.moving}")
    result = register(fixed, moving, model, options["device"], options["affine"], options["refine"], fixed_seg,
                      moving_seg, options["labels"], passes=options["passes"], precision=options["precision"],
                      label_interpolation=options["label_interpolation"], quality=options["quality"],
                      mutual_steps=options["mutual_steps"], mutual_target_mm=options.get("mutual_target_mm"))
    if jacobian:
        from .jacobian import jacobian_images
        result.extra_images.update(jacobian_images(result.forward, result.backward, jacobian))
        result.report["jacobian"] = jacobian
    result.report["study_inputs"] = pair.inputs()
    result.report["study_options"] = options if recorded is None else recorded
    result.report["study_rank"] = rank  # which process of a torchrun study registered it ("rank/world")
    inputs = [p for p in (pair.fixed, pair.moving, pair.fixed_seg, pair.moving_seg) if p is not None]
    from .fastgzip import DEFAULT_COMPRESSION
    write_result(result, folder, inputs, compression=compression or DEFAULT_COMPRESSION)
    return result.report


class _Lines:
    """Progress as plain lines on stderr, where tqdm is not installed."""

    def __init__(self, total: int, prefix: str):
        self.total, self.n, self.prefix, self.text = total, 0, prefix, ""

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        self.text = text

    def update(self, count: int = 1) -> None:
        self.n += count
        print(f"{self.prefix}[{self.n}/{self.total}] {self.text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


def _progress_bar(total: int, rank: int, world: int, enabled: bool):
    prefix = f"study rank {rank}/{world} " if world > 1 else "study "
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return _Lines(total, prefix)
    return tqdm(total=total, desc=prefix.strip(), unit="pair", position=rank if world > 1 else None)


def distributed() -> tuple[int, int]:
    """(rank, world) from torchrun's environment, joining a gloo group for the final barrier
    (gloo works on CPUs and beside GPUs; the group only ever carries that barrier)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist
    if not dist.is_initialized():
        # ranks may finish their shares far apart: wait up to a day at the barrier
        dist.init_process_group("gloo", timeout=datetime.timedelta(days=1))
    return dist.get_rank(), dist.get_world_size()


def run_study(pairs: list[Pair], outdir, model=None, options: dict | None = None, jacobian: str | None = None,
              progress: bool = True, report_error: Callable[[str], None] | None = None,
              compression: str | None = None) -> list[dict]:
    """Register this process's share of ``pairs`` into ``outdir/<name>/``, then (rank 0, after
    every rank is done) write ``outdir/summary.csv``. Returns the summary rows (rank 0: all
    pairs; other ranks: their own share). ``compression``: of the written ``.nii.gz`` files
    (:data:`~.fastgzip.COMPRESSIONS`; not part of what makes a pair "done": it changes no value)."""
    from .imageio import write_text_atomic
    from .modelfile import LoadedModel, load_model

    options = {**default_options(), **(options or {})}
    if options["passes"] is None:  # the default spelled out, so "--passes 2" later is the same study
        from .pipeline import DEFAULT_PASSES
        options["passes"] = DEFAULT_PASSES
    report_error = report_error or (lambda line: print(line, file=sys.stderr, flush=True))
    outdir = Path(outdir)
    if outdir.exists() and not outdir.is_dir():
        raise InverseRegError(f"output path exists and is not a folder: {outdir}")
    outdir.mkdir(parents=True, exist_ok=True)
    rank, world = distributed()
    device = options["device"]
    if world > 1 and str(device) in ("auto", "cuda"):
        import torch
        if torch.cuda.is_available():  # one GPU per rank on a multi-GPU machine
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank)) % torch.cuda.device_count()}"
    mine = [pair for index, pair in enumerate(pairs) if index % world == rank]
    # what the report keeps to recognise a finished pair; not the device: a rerun elsewhere may skip it
    recorded = {k: v for k, v in options.items() if k != "device"}
    if not isinstance(model, LoadedModel):
        model = load_model(model)
    recorded["model_id"] = model.model_id
    if jacobian:
        recorded["jacobian"] = jacobian
    # one process: summary.csv is kept up to date after every pair, so it shows how far a running
    # or stopped study got (with several, rank 0 writes it once all are done)
    live = summary_rows(pairs, outdir, recorded) if world == 1 else None
    bar = _progress_bar(len(mine), rank, world, progress)
    try:
        for number, pair in enumerate(mine):
            folder = outdir / pair.name
            if is_done(folder, pair, recorded):
                _step(bar, f"{pair.name}: already done")
                continue
            started = time.perf_counter()
            try:
                folder.mkdir(exist_ok=True)
                run_options = {**options, "device": device}
                register_pair(pair, folder, model, run_options, jacobian, recorded, f"{rank}/{world}", compression)
                (folder / ERROR_NAME).unlink(missing_ok=True)
                _step(bar, f"{pair.name}: done in {time.perf_counter() - started:.1f} s")
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as error:  # noqa: BLE001 - one pair's failure must not stop the study
                message = (str(error).splitlines()[0] if str(error) else type(error).__name__)
                if not isinstance(error, InverseRegError):
                    message = f"{type(error).__name__}: {message}"
                write_text_atomic(message + "\n", folder / ERROR_NAME)
                report_error(f"inversereg: study: pair {pair.name!r} failed: {message}")
                _step(bar, f"{pair.name}: failed")
            if live is not None:
                live[number] = summary_rows([pair], outdir, recorded)[0]
                write_summary(live, outdir / SUMMARY_NAME)
    finally:
        if bar is not None:
            bar.close()
    if world > 1:
        import torch.distributed as dist
        dist.barrier()
    rows = summary_rows(pairs if rank == 0 else mine, outdir, recorded)
    if rank == 0:
        write_summary(rows, outdir / SUMMARY_NAME)
    if world > 1:
        import torch.distributed as dist
        dist.barrier()
        dist.destroy_process_group()
    return rows


def _step(bar, text: str) -> None:
    if bar is not None:
        bar.set_postfix_str(text, refresh=False)
        bar.update(1)


def default_options() -> dict:
    return {"device": "auto", "affine": "affine", "refine": 0, "labels": None, "passes": None,
            "precision": "auto", "label_interpolation": "linear", **LATER_DEFAULTS}


def summary_rows(pairs: list[Pair], outdir: Path, recorded: dict) -> list[dict]:
    """One row per pair from its folder: ``ok`` (a complete report of these inputs and options),
    ``failed`` (its error.txt), or ``not run``."""
    rows = []
    for pair in pairs:
        folder = outdir / pair.name
        row = {"pair": pair.name, "fixed": str(pair.fixed), "moving": str(pair.moving)}
        report = read_report(folder)
        if is_done(folder, pair, recorded):
            row.update(status="ok", seconds=report.get("seconds_total"), message="",
                       **{key: report.get(key) for key in SUMMARY_COLUMNS if key in report})
        elif (folder / ERROR_NAME).is_file():
            row.update(status="failed", message=(folder / ERROR_NAME).read_text(encoding="utf-8").strip())
        else:
            row.update(status="not run", message="")
        rows.append(row)
    return rows


def write_summary(rows: list[dict], path: Path) -> None:
    """The summary table, atomically (a temporary sibling, then a rename)."""
    import io

    from .imageio import write_text_atomic
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SUMMARY_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: ("" if row.get(key) is None else row.get(key)) for key in SUMMARY_COLUMNS})
    write_text_atomic(buffer.getvalue(), path)
