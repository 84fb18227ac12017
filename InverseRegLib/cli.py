"""The ``inversereg`` command line: register, train, evaluate, demo.

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
import sys
import time
from pathlib import Path

from .device import PRECISIONS
from .errors import InverseRegError
from .presets import PRESETS


class _Progress:
    """Progress sink for the three ``--progress`` modes."""

    def __init__(self, mode: str, description: str):
        self.mode, self.bar, self.last = mode, None, 0.0
        if mode == "bar":
            from tqdm import tqdm
            self.bar = tqdm(total=100, desc=description, unit="%", bar_format="{l_bar}{bar}| {postfix}")

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


def _affine_arg(args) -> str | None:
    return None if args.no_affine or args.affine == "none" else args.affine


def cmd_register(args) -> int:
    from .imageio import read_image, read_label, prepare_output_dir
    from .modelfile import load_model
    from .outputs import write_result
    from .pipeline import register

    inputs = [args.fixed, args.moving, args.fixed_seg, args.moving_seg]
    prepare_output_dir(args.output, inputs)  # refuse a bad output folder before any work
    if (args.fixed_seg is None) != (args.moving_seg is None):
        raise InverseRegError("--fixed-seg and --moving-seg go together")
    fixed = read_image(args.fixed, role="fixed image")
    moving = read_image(args.moving, role="moving image")
    fixed_seg = read_label(args.fixed_seg, role="fixed label map") if args.fixed_seg else None
    moving_seg = read_label(args.moving_seg, role="moving label map") if args.moving_seg else None
    model = load_model(args.model)
    progress = _Progress(args.progress, "register")
    try:
        result = register(fixed, moving, model, args.device, _affine_arg(args), args.refine,
                          fixed_seg, moving_seg, _labels_arg(args.labels), progress=progress, passes=args.passes,
                          precision=args.precision, quality=args.quality)
    finally:
        progress.close()
    written = write_result(result, args.output, inputs)
    if args.progress == "json":
        print(json.dumps({"event": "done", "outdir": str(Path(args.output).resolve()), "report": result.report}),
              flush=True)
    else:
        _print_summary(result.report, written)
    return 0


def _print_summary(report: dict, written: dict) -> None:
    lines = [f"device {report['device']}: network {report['seconds_network']:.2f} s, total {report['seconds_total']:.2f} s",
             f"folding (det J <= 0): forward {report['folding_percent_forward']:.4f} %, "
             f"backward {report['folding_percent_backward']:.4f} %",
             f"inverse consistency |φTS(φST(x)) - x|: mean {report['ice_mean_mm']:.3f} mm, "
             f"95th percentile {report['ice_p95_mm']:.3f} mm"]
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
                                 ("smooth", args.weight_smooth)) if v is not None}
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
    from tqdm import tqdm

    from .evaluate import evaluate_folder
    bar = tqdm(desc="evaluate", unit="pair")

    def on_pair(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    try:
        summary = evaluate_folder(args.data_dir, args.output, args.model, args.device, _affine_arg(args),
                                  args.refine, _labels_arg(args.labels), args.subjects, on_pair, args.passes,
                                  args.precision, args.quality)
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
    written = write_result(result, outdir, [])
    written["overview"] = overview_png(fixed, moving, result.moving_warped, result.forward, outdir / "overview.png",
                                       title=f"InverseReg demo: Dice {result.report['dice_mean_before']:.3f} -> "
                                             f"{result.report['dice_mean']:.3f}")
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
                       help="fast: the network's fields (default); best: then greedy-like iterations at the "
                            "input's full resolution (slower, more accurate)")

    p = sub.add_parser("register", help="register a pair; writes forward/backward fields, warped images, report")
    p.add_argument("fixed")
    p.add_argument("moving")
    p.add_argument("-o", "--output", required=True, help="output folder")
    add_common(p)
    add_alignment(p)
    p.add_argument("--fixed-seg", help="label map of the fixed image (adds Dice and BIR to the report)")
    p.add_argument("--moving-seg", help="label map of the moving image")
    add_precision(p)
    p.add_argument("--progress", choices=["bar", "json", "none"], default="bar")
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
    add_precision(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("demo", help="register a built-in synthetic pair and draw overview.png")
    p.add_argument("-o", "--output", default="demo_output")
    p.add_argument("--quiet", action="store_true")
    add_common(p)
    p.set_defaults(func=cmd_demo)
    return parser


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


if __name__ == "__main__":
    sys.exit(main())
