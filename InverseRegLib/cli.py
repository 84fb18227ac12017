"""The ``inversereg`` command line: register, study, points, jacobian, train, evaluate, demo.

Every user-fixable problem ends the program with one line ``inversereg: error: ...`` on stderr
and exit status 2 (with ``--progress json`` also a ``{"event": "error"}`` line on stdout, which
is what the Slicer module reads).

``--progress json`` prints one JSON object per stdout line::

    {"event": "progress", "fraction": 0.3, "message": "running the network on CPU"}
    {"event": "done", "outdir": "...", "report": {...}}
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from . import timing  # first: its import time is the fallback start of the clock
from .device import PRECISIONS, allocate_in_huge_pages
from .errors import InverseRegError
from .presets import PRESETS


class _TextBar:
    """What ``--progress bar`` shows when tqdm (an optional extra) is not installed: one plain
    line on stderr per new message or 10 % step, so a log file stays readable."""

    def __init__(self, description: str, total: int = 100, unit: str = "%"):
        self.description, self.total, self.unit = description, total, unit
        self.n, self._shown, self._postfix = 0, None, ""

    def update(self, amount: float) -> None:
        self.n += amount
        self._show()

    def set_postfix_str(self, text: str) -> None:
        self._postfix = text
        self._show()

    def _show(self) -> None:
        if self.total:
            state = (int(10 * self.n / self.total), self._postfix)
            text = f"{round(100 * self.n / self.total):3d} %"
        else:
            state = (int(self.n), self._postfix)
            text = f"{int(self.n)} {self.unit}"
        if state != self._shown:
            self._shown = state
            print(f"{self.description}: {text} {self._postfix}".rstrip(), file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


def _bar(description: str, total: int | None = 100, unit: str = "%"):
    """A tqdm bar when tqdm is installed (the ``train`` extra), else :class:`_TextBar`."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _TextBar(description, total or 0, unit)
    # tqdm starts a postfix with ", ": after the elapsed time it reads "00:03, network pass 1 of 2"
    if unit == "%":
        return tqdm(total=total, desc=description, unit=unit, bar_format="{l_bar}{bar}| {elapsed}{postfix}")
    return tqdm(total=total, desc=description, unit=unit)


class _Progress:
    """Progress sink for the three ``--progress`` modes."""

    def __init__(self, mode: str, description: str):
        self.mode, self.bar, self.last = mode, None, 0.0
        if mode == "bar":
            self.bar = _bar(description)

    def __call__(self, fraction: float, message: str) -> None:
        fraction = min(max(float(fraction), 0.0), 1.0)
        if self.mode == "json":
            print(json.dumps({"event": "progress", "fraction": round(fraction, 4), "message": message}), flush=True)
        elif self.bar is not None:
            self.bar.update(max(0.0, round(100 * fraction) - self.bar.n))
            self.bar.set_postfix_str(message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _labels_arg(text: str | None):
    from .metrics import resolve_labels
    try:
        return resolve_labels(text)
    except ValueError as error:
        raise InverseRegError(f"--labels: {error}") from None


def _polish_arg(args):
    """``--polish N`` as ``register(polish_settings=...)``: None keeps the library's default."""
    if getattr(args, "polish", None) is None:
        return None
    import dataclasses
    from .polish import FAST_SETTINGS
    if args.polish < 0:
        raise InverseRegError(f"--polish must be >= 0, got {args.polish}")
    return dataclasses.replace(FAST_SETTINGS, iterations=(args.polish,))


def _affine_arg(args) -> str | None:
    return None if args.no_affine or args.affine == "none" else args.affine


def cmd_register(args) -> int:
    from .imageio import check_output_dir, read_image, read_label

    inputs = [args.fixed, args.moving, args.fixed_seg, args.moving_seg]
    check_output_dir(args.output, inputs)  # refuse a bad output folder before any work; created when writing
    if (args.fixed_seg is None) != (args.moving_seg is None):
        raise InverseRegError("--fixed-seg and --moving-seg go together")
    from .modelfile import load_model  # torch: the largest part of the start-up
    from .outputs import write_result
    from .pipeline import register
    startup = _startup_seconds()
    t0 = time.perf_counter()
    fixed = read_image(args.fixed, role="fixed image")
    moving = read_image(args.moving, role="moving image")
    fixed_seg = read_label(args.fixed_seg, role="fixed label map") if args.fixed_seg else None
    moving_seg = read_label(args.moving_seg, role="moving label map") if args.moving_seg else None
    fixed_seg, moving_seg = _check_label_maps(args, fixed, moving, fixed_seg, moving_seg)
    t_reading = time.perf_counter() - t0
    t0 = time.perf_counter()
    model = load_model(args.model)
    t_model = time.perf_counter() - t0
    from .device import resolve_device
    resolve_device(args.device)  # a wrong --device is one error line, not one under a started bar
    polish = _polish_arg(args)  # so is a wrong --polish
    mutual = _mutual_arg(args)  # and a wrong --mutual-inverse or --mutual-target
    progress = _Progress(args.progress, "register")
    try:
        result = register(fixed, moving, model, args.device, _affine_arg(args), args.refine,
                          fixed_seg, moving_seg, _labels_arg(args.labels), progress=progress, passes=args.passes,
                          precision=args.precision, label_interpolation=args.label_interpolation,
                          quality=args.quality, polish_settings=polish, **mutual)
    finally:
        progress.close()
    del fixed, moving, fixed_seg, moving_seg  # not needed for writing, where the peak memory is on large grids
    result.report.update({"seconds_startup": startup, "seconds_reading": round(t_reading, 3),
                          "seconds_loading_model": round(t_model, 3)})
    _add_jacobians(args, result)
    written = write_result(result, args.output, inputs, compression=args.compression)
    if args.progress == "json":
        print(json.dumps({"event": "done", "outdir": str(Path(args.output).resolve()), "report": result.report}),
              flush=True)
    else:
        _print_summary(result.report, written)
    return 0


def _startup_seconds() -> float:
    """Seconds from process start to now, before the inputs are read: the interpreter and the
    imports (torch is most of it); reading and loading the model are reported on their own."""
    since_start = timing.seconds_since_process_start()
    if since_start is None:
        since_start = timing.seconds_since_import()
    return round(max(0.0, since_start), 3)


# --- after Register (issue 15): carried label maps, Jacobian determinants -------------------------

def _check_label_maps(args, fixed, moving, fixed_seg, moving_seg):
    """Each label map on its own image's grid and not empty; errors name the file."""
    from .labels import check_label_map
    if fixed_seg is not None:
        fixed_seg = check_label_map(fixed_seg, fixed, f"fixed label map {args.fixed_seg}", f"the fixed image {args.fixed}")
    if moving_seg is not None:
        moving_seg = check_label_map(moving_seg, moving, f"moving label map {args.moving_seg}",
                                     f"the moving image {args.moving}")
    return fixed_seg, moving_seg


def _add_jacobians(args, result) -> None:
    """With ``--jacobian``: det J of both fields, written as jacobian_forward/backward.nii.gz."""
    if not getattr(args, "jacobian", None):
        return
    from .jacobian import jacobian_images
    result.extra_images.update(jacobian_images(result.forward, result.backward, args.jacobian))
    result.report["jacobian"] = args.jacobian


def cmd_jacobian(args) -> int:
    from .imageio import _read, write_image_atomic
    from .jacobian import jacobian_image
    field = _read(args.field, "displacement field")
    output = Path(args.output)
    if output.resolve() == Path(args.field).resolve():
        raise InverseRegError(f"output {output} would overwrite the field; choose another name")
    if not output.parent.is_dir():
        raise InverseRegError(f"output folder does not exist: {output.parent}")
    write_image_atomic(jacobian_image(field, args.log), output)
    print(f"wrote {output}")
    return 0


def add_after_register_options(p) -> None:
    p.add_argument("--compression", choices=["none", "fast", "small"], default="none",
                   help="how the .nii.gz outputs are compressed: none (default: gzip files holding the data "
                        "uncompressed, the fastest to write and to read; a 1 mm brain's two fields take "
                        "2 x 118 MB), fast (zlib level 1, ~64 %% of that) or small (zlib level 6, slowest)")
    p.add_argument("--label-interpolation", choices=["linear", "nearest"], default="linear",
                   help="how --fixed-seg/--moving-seg are carried to the other grid: linear (label-preserving: "
                        "argmax of each label's interpolated indicator; default) or nearest")
    p.add_argument("--jacobian", nargs="?", const="plain", choices=["plain", "log"],
                   help="also write jacobian_forward.nii.gz (fixed grid) and jacobian_backward.nii.gz (moving "
                        "grid): det J of each field, or its natural log with --jacobian log")


#: the most mutual-inverse steps when only --mutual-target is given (~10 minutes on two CPU cores)
TARGET_ONLY_MAX_STEPS = 1000


def add_mutual_inverse(p) -> None:
    p.add_argument("--mutual-inverse", type=int, default=None, metavar="STEPS",
                   help="then adjust both fields together for at most STEPS steps so each is the other's "
                        "inverse in both orders (default 0: off; ~0.6 s each on two CPU cores for a "
                        "1 mm brain; see --mutual-target)")
    p.add_argument("--mutual-target", type=float, default=None, metavar="MM",
                   help="stop those steps as soon as the mean inverse-consistency error is at most MM in both "
                        f"orders (over each image's foreground); alone, it means at most "
                        f"{TARGET_ONLY_MAX_STEPS} steps (--mutual-target 0.01: ~107 steps on 1 mm brains, "
                        "~0.006 Dice with --quality fast)")


def _mutual_arg(args) -> dict:
    """``--mutual-inverse`` and ``--mutual-target`` as register()'s keywords, checked before any
    work (one error line, not one under a started bar)."""
    steps, target = args.mutual_inverse, args.mutual_target
    if steps is not None and steps < 0:
        raise InverseRegError(f"--mutual-inverse must be >= 0, got {steps}")
    if target is not None:
        if not 0 < target < float("inf"):
            raise InverseRegError(f"--mutual-target must be a number of mm > 0, got {target}")
        if steps == 0:
            raise InverseRegError("--mutual-target needs --mutual-inverse above 0 (or left out)")
        steps = TARGET_ONLY_MAX_STEPS if steps is None else steps
    return {"mutual_steps": steps or 0, "mutual_target_mm": target}


def add_after_register_commands(sub, add_common, add_alignment, add_precision) -> None:
    p = sub.add_parser("study", help="register many pairs (a template and subjects, or a CSV of pairs): one "
                                     "folder per pair, summary.csv; resumes; torchrun splits the pairs")
    p.add_argument("subjects", nargs="*", help="with --template: the subject images (each registered onto it)")
    p.add_argument("-o", "--output", required=True, help="study folder: one sub-folder per pair and summary.csv")
    p.add_argument("--pairs", help="CSV with columns fixed,moving[,fixed_seg,moving_seg][,name]; relative paths "
                                   "are relative to the CSV's folder")
    p.add_argument("--template", help="the fixed image every subject is registered onto")
    p.add_argument("--template-seg", help="the template's label map (with --subject-segs)")
    p.add_argument("--subject-segs", nargs="+", help="the subjects' label maps, in the subjects' order")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    add_common(p)
    add_alignment(p)
    add_mutual_inverse(p)
    add_precision(p)
    add_after_register_options(p)
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("jacobian", help="Jacobian determinant image of a displacement field file")
    p.add_argument("field", help="ITK displacement field (e.g. forward.nii.gz)")
    p.add_argument("-o", "--output", required=True, help="output image, e.g. jacobian.nii.gz")
    p.add_argument("--log", action="store_true", help="natural log of the determinant")
    p.set_defaults(func=cmd_jacobian)

    p = sub.add_parser("points", help="move points between the images through the fields; TRE with both lists")
    p.add_argument("result", help="a register output folder (forward.nii.gz, backward.nii.gz)")
    p.add_argument("--fixed-points", help="points on the fixed image (.mrk.json, .fcsv or CSV x,y,z[,label]): "
                   "moved into moving space through forward")
    p.add_argument("--moving-points", help="points on the moving image: moved into fixed space through backward")
    p.add_argument("--coordinates", choices=["LPS", "RAS"], default="LPS",
                   help="coordinate system of CSV files (default LPS, as ITK/ANTs); markups files name their own")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.set_defaults(func=cmd_points)

def cmd_points(args) -> int:
    from .imageio import _read, write_text_atomic
    from .points import point_file_suffix, read_points, target_registration_error, transform_points, write_points
    if not args.fixed_points and not args.moving_points:
        raise InverseRegError("give --fixed-points, --moving-points or both")
    result = Path(args.result)
    if not result.is_dir():
        raise InverseRegError(f"registration output folder not found: {result}")
    outdir = Path(args.output)
    if outdir.exists() and not outdir.is_dir():
        raise InverseRegError(f"output path exists and is not a folder: {outdir}")
    fixed_points = read_points(args.fixed_points, args.coordinates) if args.fixed_points else None
    moving_points = read_points(args.moving_points, args.coordinates) if args.moving_points else None
    forward = _read(result / "forward.nii.gz", "forward field") if fixed_points else None
    backward = _read(result / "backward.nii.gz", "backward field") if moving_points else None
    jobs = []  # (points, field, output name, grid name)
    if fixed_points:
        jobs.append((fixed_points, forward, "fixed_points_in_moving", args.fixed_points, "the fixed image's grid"))
    if moving_points:
        jobs.append((moving_points, backward, "moving_points_in_fixed", args.moving_points, "the moving image's grid"))
    mapped = [(points, transform_points(points.lps, field, points.names, grid), name, source)
              for points, field, name, source, grid in jobs]
    summary = rows = None
    if fixed_points and moving_points:
        summary, rows = target_registration_error(fixed_points, moving_points, forward, backward)
    inputs = {Path(p).resolve() for p in (args.fixed_points, args.moving_points) if p}
    outdir.mkdir(parents=True, exist_ok=True)
    for points, positions, name, source in mapped:
        path = outdir / (name + point_file_suffix(source))
        if path.resolve() in inputs:
            raise InverseRegError(f"output {path} would overwrite an input file; choose another folder")
        write_points(points, positions, path)
        print(f"wrote {path} ({len(points.names)} points)")
    if summary is not None:
        lines = ["label,before_mm,fixed_to_moving_mm,moving_to_fixed_mm"]
        lines += [f"{r['label']},{r['before_mm']:.4f},{r['fixed_to_moving_mm']:.4f},{r['moving_to_fixed_mm']:.4f}"
                  for r in rows]
        write_text_atomic("\n".join(lines) + "\n", outdir / "tre.csv")
        write_text_atomic(json.dumps(summary, indent=2) + "\n", outdir / "tre.json")
        for key, title in (("before", "before registration"), ("fixed_to_moving", "fixed -> moving (forward)"),
                           ("moving_to_fixed", "moving -> fixed (backward)")):
            s = summary[key]
            print(f"TRE {title}: mean {s['mean_mm']:.2f} mm, median {s['median_mm']:.2f} mm, "
                  f"max {s['max_mm']:.2f} mm over {s['n']} points")
        print(f"wrote {outdir / 'tre.json'} and {outdir / 'tre.csv'}")
    return 0


def cmd_study(args) -> int:
    from .modelfile import load_model
    from .study import SUMMARY_NAME, pairs_from_csv, pairs_from_template, run_study
    if bool(args.pairs) == bool(args.template):
        raise InverseRegError("give either --pairs pairs.csv or --template T with subjects")
    if args.template:
        if not args.subjects:
            raise InverseRegError("--template needs at least one subject image after it")
        pairs = pairs_from_template(args.template, args.subjects, args.template_seg, args.subject_segs)
    else:
        if args.subjects or args.template_seg or args.subject_segs:
            raise InverseRegError("subjects, --template-seg and --subject-segs go with --template, not --pairs")
        pairs = pairs_from_csv(args.pairs)
    options = {"device": args.device, "affine": _affine_arg(args), "refine": args.refine,
               "labels": _labels_arg(args.labels), "passes": args.passes, "precision": args.precision,
               "label_interpolation": args.label_interpolation, "quality": args.quality,
               **_mutual_arg(args)}
    model = load_model(args.model)
    rows = run_study(pairs, args.output, model, options, args.jacobian, progress=not args.quiet,
                     compression=args.compression)
    counts = {status: sum(r["status"] == status for r in rows) for status in ("ok", "failed", "not run")}
    print(f"{len(rows)} pairs: {counts['ok']} ok, {counts['failed']} failed, {counts['not run']} not run; "
          f"summary: {Path(args.output) / SUMMARY_NAME}")
    return 0 if counts["ok"] == len(rows) else 1


# --- end of the after-Register block --------------------------------------------------------------


def _print_summary(report: dict, written: dict) -> None:
    whole = (f", whole command {report['seconds_whole_process']:.2f} s"
             if report.get("seconds_whole_process") is not None else "")
    lines = [f"device {report['device']}: network {report['seconds_network']:.2f} s, registration "
             f"{report['seconds_total']:.2f} s, writing {report.get('seconds_writing', 0.0):.2f} s{whole}",
             f"folding (det J <= 0): forward {report['folding_percent_forward']:.4f} %, "
             f"backward {report['folding_percent_backward']:.4f} %",
             f"inverse consistency |φTS(φST(x)) - x|: mean {report['ice_mean_mm']:.3f} mm, "
             f"95th percentile {report['ice_p95_mm']:.3f} mm"]
    if report.get("mutual_target_mm") is not None:
        orders = (report.get("mutual_fixed_order_after_repair_mm", report["mutual_fixed_order_mm"]),
                  report.get("mutual_moving_order_after_repair_mm", report["mutual_moving_order_mm"]))
        verdict = "reached" if report["mutual_reached_target"] else "NOT reached"
        loop_reached = max(report["mutual_fixed_order_mm"], report["mutual_moving_order_mm"]) <= report["mutual_target_mm"]
        why = " (the fold repair after the steps raised it)" if loop_reached and not report["mutual_reached_target"] else ""
        lines.append(f"mutual-inverse target {report['mutual_target_mm']:g} mm {verdict} after "
                     f"{report['mutual_steps_run']} of at most {report['mutual_steps']} steps: "
                     f"{orders[0]:.4f} / {orders[1]:.4f} mm (fixed / moving order){why}")
    if report.get("dice_mean") is not None:
        lines.append(f"Dice: before {report['dice_mean_before']:.3f} -> after {report['dice_mean']:.3f} "
                     f"(backward {report['dice_mean_backward']:.3f}); BIR {report['bir']:.3f}")
    lines += [f"wrote {path}" for path in written.values()]
    print("\n".join(lines))


def cmd_train(args) -> int:
    import torch

    from .train import TrainConfig, train
    if args.threads:
        torch.set_num_threads(args.threads)
    weights = {k: v for k, v in (("ncc", args.weight_ncc), ("cycle", args.weight_cycle),
                                 ("smooth", args.weight_smooth), ("dice", args.weight_dice)) if v is not None}
    config = TrainConfig(data_dir=args.data_dir, run_dir=args.output, preset=args.preset, steps=args.steps,
                         lr=args.lr, seed=args.seed, spacing=args.spacing, val_subjects=args.val,
                         val_every=args.val_every, checkpoint_every=args.checkpoint_every, augment=args.augment,
                         synth=args.synth, weights=weights, ncc_window=args.ncc_window, device=args.device,
                         init=args.init, init_regrid=args.init_regrid, cascade=args.cascade,
                         lr_schedule=args.lr_schedule)
    path = train(config, progress=not args.quiet, label_set=_labels_arg(args.labels), resume=args.resume)
    print(f"model written to {path}")
    return 0


def cmd_evaluate(args) -> int:
    from .evaluate import evaluate_folder
    mutual = _mutual_arg(args)
    bar = _bar("evaluate", None, "pair")

    def on_pair(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    try:
        summary = evaluate_folder(args.data_dir, args.output, args.model, args.device, _affine_arg(args),
                                  args.refine, _labels_arg(args.labels), args.subjects, on_pair, args.passes,
                                  args.precision, args.quality, **mutual)
    finally:
        bar.close()
    print(json.dumps(summary, indent=2))
    return 0


def cmd_demo(args) -> int:
    from .figures import overview_png
    from .modelfile import load_model
    from .outputs import write_result
    from .pipeline import register
    from .synthetic import make_pair

    started = time.perf_counter()
    print("making a synthetic brain-like pair with a known deformation (no download needed)")
    fixed, moving, fixed_seg, moving_seg = make_pair(size=(96, 112, 96), spacing=(1.7, 1.7, 1.7), seed=1,
                                                     amplitude=5.0, wavelength=80.0)
    outdir = Path(args.output)
    model = load_model(args.model)
    progress = _Progress("bar" if not args.quiet else "none", "register")
    try:
        result = register(fixed, moving, model, args.device, "affine", 0, fixed_seg, moving_seg, progress=progress)
    finally:
        progress.close()
    title = f"InverseReg demo: Dice {result.report['dice_mean_before']:.3f} -> {result.report['dice_mean']:.3f}"
    overview = {"overview.png": lambda path: overview_png(fixed, moving, result.moving_warped, result.forward, path,
                                                          title=title)}
    written = write_result(result, outdir, [], extra=overview)
    _print_summary(result.report, written)
    print(f"demo finished in {time.perf_counter() - started:.1f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="inversereg", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def add_common(p, model=True):
        if model:
            p.add_argument("--model", help="model file (default: the bundled Resources/InverseReg-default.pt)")
        p.add_argument("--device", default="auto", help="auto (GPU if available), cpu or cuda")

    def add_precision(p):
        p.add_argument("--precision", choices=list(PRECISIONS), default="auto",
                       help="dtype of the network's convolutions: auto (bfloat16 on CPUs that compute it "
                            "natively, else float32), float32 (bit-for-bit the trained network), bfloat16")

    def add_alignment(p):
        p.add_argument("--affine", choices=["affine", "rigid", "none"], default="affine",
                       help="pre-alignment before the deformable network (default affine)")
        p.add_argument("--no-affine", action="store_true", help="same as --affine none: images already aligned")
        p.add_argument("--refine", type=int, default=0, metavar="N", help="N steps of instance optimisation")
        p.add_argument("--passes", type=int, metavar="N",
                       help="network passes, each on the moving image warped so far (default: the library's)")
        p.add_argument("--labels", help="labels to evaluate: all (default), freesurfer, or a list like 2,3,41")
        p.add_argument("--quality", choices=["fast", "best"], default="fast",
                       help="fast: the network's fields and a few NCC iterations on its 2 mm grid (default); "
                            "best: then greedy-like iterations at the input's full resolution (slower, "
                            "more accurate)")

    p = sub.add_parser("register", help="register a pair; writes forward/backward fields, warped images, report")
    p.add_argument("--polish", type=int, metavar="N",
                   help="NCC iterations on the network's 2 mm grid after it (default: the library's, 5; "
                        "0: the network's fields alone)")
    add_mutual_inverse(p)
    p.add_argument("fixed")
    p.add_argument("moving")
    p.add_argument("-o", "--output", required=True, help="output folder")
    add_common(p)
    add_alignment(p)
    p.add_argument("--fixed-seg", help="label map of the fixed image (adds Dice and BIR to the report)")
    p.add_argument("--moving-seg", help="label map of the moving image")
    add_precision(p)
    p.add_argument("--progress", choices=["bar", "json", "none"], default="bar")
    add_after_register_options(p)
    p.set_defaults(func=cmd_register)

    p = sub.add_parser("train", help="train a model on a folder of images (pairwise N x (N-1))")
    p.add_argument("data_dir")
    p.add_argument("-o", "--output", required=True, help="run folder (checkpoints, logs, model.pt)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="default")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--spacing", type=float, default=2.0, help="model grid spacing in mm (1 = full resolution)")
    p.add_argument("--val", nargs="*", help="validation subject names (default: the last two of >= 6)")
    p.add_argument("--val-every", type=int, default=100)
    p.add_argument("--checkpoint-every", type=int, default=25)
    p.add_argument("--augment", type=float, default=0.5, help="probability of intensity augmentation per image")
    p.add_argument("--cascade", type=float, default=0.0,
                   help="probability that a step trains on the source warped by one pass of the current network "
                        "(what the second registration pass sees)")
    p.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant",
                   help="constant lr, or cosine decay from --lr to 0 at --steps (to end a fine-tuning stage)")
    p.add_argument("--synth", type=float, default=0.1, help="probability of a label-synthesised pair")
    p.add_argument("--weight-ncc", type=float)
    p.add_argument("--weight-cycle", type=float)
    p.add_argument("--weight-smooth", type=float)
    p.add_argument("--weight-dice", type=float,
                   help="weight of a soft Dice of the training label maps carried through both fields "
                        "(needs a label map per training subject; --labels picks the structures; "
                        "registration itself needs no labels)")
    p.add_argument("--ncc-window", type=int)
    p.add_argument("--labels", help="labels for validation Dice: all (default), freesurfer or a list")
    p.add_argument("--resume", action="store_true", help="continue the run in the output folder")
    p.add_argument("--init", metavar="MODEL", help="start from this exported model's weights (fine-tune; "
                   "same preset and grid), with a fresh optimiser")
    p.add_argument("--init-regrid", action="store_true",
                   help="with --init: allow a model grid of another size or spacing (e.g. a 2 mm model "
                        "fine-tuned at 1 mm on a GPU); its output layer is rescaled so that the initial "
                        "fields keep their size in mm")
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_common(p, model=False)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="register all ordered pairs of a labelled folder; CSV + summary")
    p.add_argument("data_dir")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--subjects", nargs="*", help="restrict to these subject names")
    add_common(p)
    add_alignment(p)
    add_mutual_inverse(p)
    add_precision(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("worker", help="serve register requests, one JSON line each on stdin (the Slicer module's process)")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("demo", help="register a built-in synthetic pair and draw overview.png")
    p.add_argument("-o", "--output", default="demo_output")
    p.add_argument("--quiet", action="store_true")
    add_common(p)
    p.set_defaults(func=cmd_demo)
    add_after_register_commands(sub, add_common, add_alignment, add_precision)
    return parser


def cmd_worker(args) -> int:
    from .worker import serve
    return serve()


class Terminated(BaseException):
    """SIGTERM arrived (``kill``, a batch system's time limit): it unwinds the program as Ctrl-C
    does, so a result being written is rolled back (:mod:`.outputs`) instead of leaving its
    staging folder behind. A BaseException, like KeyboardInterrupt: no ``except Exception`` stops it."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def handle_sigterm() -> None:
    """Turn SIGTERM into :class:`Terminated` (the console script does this before :func:`main`)."""
    import signal
    import threading
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except InverseRegError as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        if getattr(args, "progress", None) == "json":
            print(json.dumps({"event": "error", "message": message}), flush=True)
        print(f"inversereg: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("inversereg: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("inversereg: terminated", file=sys.stderr)
        return 143  # 128 + SIGTERM, what a shell reports for a process SIGTERM ended


def run() -> None:
    """The console script: :func:`main`, then exit without tearing the interpreter down.

    Freeing a registration's arrays, torch's thread pools and thousands of modules one by one
    takes seconds after the work is done and the files are written (measured: ~3 s of a 1 mm
    brain pair's whole command on a busy 2-core CPU); the OS reclaims it all at once instead.
    Every output is written atomically and closed before this point, and the streams are flushed.
    """
    # torch's OpenMP threads spin while they wait for work: on a CPU shared with other jobs a
    # spinning thread holds a core that the thread it waits for needs (measured on a 1 mm pair on
    # a loaded 2-core machine: folding/ICE 2.3 s -> 0.45 s, the network 9 -> 5 s). Set before
    # torch is imported; the user's own setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    allocate_in_huge_pages()  # also before torch is imported
    handle_sigterm()
    code = main()
    if sys.argv[1:2] != ["register"]:  # training and the rest: a normal exit (process groups, ...)
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
