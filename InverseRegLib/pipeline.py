"""``register``: the one entry point the command line and the Slicer module call.

Two images in, two transforms out::

    fixed, moving (any 3D grids) --affine pre-alignment (optional)--> model grid (physical space)
      --network, 2 passes by default (+ optional refinement)--> φST, φTS on the model grid (voxels)
      --> forward field on the fixed grid, backward field on the moving grid (LPS mm, ITK files)

The forward field composes the deformable part with the affine, so that one file maps fixed-space
points all the way into the original moving image: ``forward(p) = A(p + d_ST(p)) - p``; the
backward one is ``backward(q) = A⁻¹(q) + d_TS(A⁻¹(q)) - q`` on the moving grid.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable

import numpy as np
import SimpleITK as sitk
import torch

from .device import resolve_device, resolve_precision
from .errors import InverseRegError
from .fields import affine_matrix, field_to_image, resample_field, voxel_field_to_physical, warp_image
from .grid import Geometry, centered_grid, intensity_center, resample_to
from .imageio import validate_image
from .intensity import normalize
from .labels import LABEL_METHODS, check_label_map, compact_labels, grid_mismatch, warp_labels
from .inverse import invert_field
from .metrics import bir, dice_per_label, resolve_labels
from .memory import peak_rss_mb
from .modelfile import LoadedModel, load_model
from .unfold import repair_folds
from .quality import ICE_STRIDE, folding_of_determinant, folding_on_model_grid, inverse_consistency
from .warp import compose, warp

Progress = Callable[[float, str], None]

#: ``register(quality=...)``: the network alone, or followed by full-resolution iterations
QUALITIES = ("fast", "best")

#: network passes per registration (see :func:`run_network`); measured in docs/benchmark.md
DEFAULT_PASSES = 2


class Cancelled(InverseRegError):
    """Raised when the caller's ``cancel()`` returned True; nothing has been written."""


@dataclass
class RegistrationResult:
    # (z, y, x, 3) float32 LPS-mm displacements, as written to the files (in float64):
    forward_field: np.ndarray  # on the fixed grid: fixed point p -> moving point p + f(p)
    backward_field: np.ndarray  # on the moving grid: moving point -> fixed point
    fixed_geometry: Geometry
    moving_geometry: Geometry
    moving_warped: sitk.Image  # moving resampled onto the fixed grid
    fixed_warped: sitk.Image  # fixed resampled onto the moving grid
    affine: sitk.Transform | None  # fixed -> moving affine part (None when switched off)
    report: dict = field(default_factory=dict)
    # with label maps: "moving_seg_warped" (moving labels on the fixed grid, through forward) and
    # "fixed_seg_warped" (fixed labels on the moving grid, through backward); written beside the fields
    label_images: dict = field(default_factory=dict)
    # other images a front end adds before writing (e.g. "jacobian_forward"), written as <name>.nii.gz
    extra_images: dict = field(default_factory=dict)

    # The ITK images are made when asked for, not by register(): a float64 copy of each field is
    # what a caller of sitk.DisplacementFieldTransform needs, and what writing the files does not
    # (on a 400x400x300 grid the forward one alone is 1.1 GB).
    @cached_property
    def forward(self) -> sitk.Image:
        """The forward field as an ITK displacement field image (VectorFloat64, fixed grid)."""
        return field_to_image(self.forward_field, self.fixed_geometry)

    @cached_property
    def backward(self) -> sitk.Image:
        """The backward field as an ITK displacement field image (VectorFloat64, moving grid)."""
        return field_to_image(self.backward_field, self.moving_geometry)


def _peak_memory_mb(device: torch.device) -> dict:
    out = {"peak_memory_mb_process": peak_rss_mb()}
    if device.type == "cuda":
        out["peak_memory_mb_gpu"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def _compose_with_affine(field_mm: torch.Tensor, model_grid: Geometry, output_grid: Geometry,
                         transform: sitk.Transform | None, inverse: bool) -> np.ndarray:
    """The whole map on ``output_grid`` as a (z, y, x, 3) float64 LPS displacement.

    forward (on the fixed grid):  p -> A(p + d_ST(p))          , minus p
    backward (on the moving grid): q -> A^-1(q) + d_TS(A^-1(q)), minus q
    The network's fields live in the fixed image's frame (where the affinely resampled moving
    image was registered), hence A after the forward field and A^-1 before the backward one.
    """
    if transform is None:
        return resample_field(field_mm, model_grid, output_grid)
    matrix, offset = affine_matrix(transform.GetInverse() if inverse else transform)
    if inverse:  # A p + b + d(A p + b) - p
        return resample_field(field_mm, model_grid, output_grid, pre=(matrix, offset),
                              post=(np.eye(3), matrix - np.eye(3), offset))
    # A (p + d(p)) + b - p
    return resample_field(field_mm, model_grid, output_grid, post=(matrix, matrix - np.eye(3), offset))


def model_geometry(model: LoadedModel, fixed: sitk.Image, normalized: np.ndarray | None = None) -> Geometry:
    """The model grid centred on the fixed image's intensity centre (as in training);
    ``normalized``: the fixed image's array already through ``normalize`` (saves recomputing it)."""
    spec = model.grid
    return centered_grid(spec.size, spec.spacing, spec.direction, intensity_center(fixed, normalized))


def foreground_mask(image: sitk.Image | None, threshold: float = 0.1, normalized: np.ndarray | None = None) -> np.ndarray:
    """Voxels brighter than ``threshold`` of the normalised range: the region metrics cover."""
    return (normalize(sitk.GetArrayViewFromImage(image)) if normalized is None else normalized) > threshold


def run_network(model: LoadedModel, source: np.ndarray, target: np.ndarray, device: torch.device,
                refine: int = 0, progress: Progress | None = None, cancel=None, passes: int = 1,
                precision: torch.dtype = torch.float32):
    """φST and φTS displacement fields (1, 3, D, H, W) in voxels of the model grid.

    ``passes`` > 1 runs the network again on the source warped by the fields so far and composes
    the result (a cascade, as recursive cascaded networks do, with the one trained network): the
    forward field becomes φST∘φ' and the backward one φ'⁻¹∘φTS, so a symmetric model's pair stays
    inverse to each other and diffeomorphic. ``refine`` polishes the last pass.
    ``progress(fraction, message)`` hears of every pass (and of every refinement step);
    ``cancel()`` is asked before every pass and stops with :class:`Cancelled`. ``precision``:
    the dtype of the network's convolutions in the plain passes (autocast; a refined pass runs in
    float32); everything else is float32.
    """
    network = model.network.to(device)
    src = torch.from_numpy(source)[None, None].to(device)
    tgt = torch.from_numpy(target)[None, None].to(device)
    channels_last = device.type == "cpu"
    if channels_last:
        # oneDNN's 3D convolutions are faster on channels-last tensors (about 7 % for the bundled
        # model on 2 threads); the fields agree with the default layout to ~1e-6 voxel
        network = network.to(memory_format=torch.channels_last_3d)
        src, tgt = (t.contiguous(memory_format=torch.channels_last_3d) for t in (src, tgt))
    u_st = u_ts = None
    moved = src
    try:
        for index in range(passes):
            last = index == passes - 1
            if cancel is not None and cancel():
                raise Cancelled(f"registration cancelled before network pass {index + 1} of {passes}")
            if progress is not None:
                progress(index / passes, f"network pass {index + 1} of {passes}")
            if last and refine > 0:
                from .refine import refine_fields
                share = (lambda f, m: progress((index + f) / passes, m)) if progress is not None else None
                step_st, step_ts = refine_fields(network, moved, tgt, steps=refine, progress=share, cancel=cancel)
            else:
                low = precision != torch.float32
                with torch.no_grad(), (torch.autocast(device.type, dtype=precision) if low else contextlib.nullcontext()):
                    step_st, step_ts, _ = network(moved, tgt)
            with torch.no_grad():
                if u_st is None:
                    u_st, u_ts = step_st, step_ts
                else:
                    u_st, u_ts = compose(u_st, step_st), compose(step_ts, u_ts)
                if not last:
                    moved = warp(src, u_st)
                    if channels_last:
                        moved = moved.contiguous(memory_format=torch.channels_last_3d)
    except torch.cuda.OutOfMemoryError:
        raise InverseRegError("out of GPU memory while running the network; rerun with device 'cpu'") from None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if progress is not None:
        progress(1.0, f"network: {passes} pass{'es' if passes != 1 else ''} done")
    return u_st.detach(), u_ts.detach()


#: the stages' places on the progress bar where the mutual-inverse steps run (see register())
MUTUAL_SPAN = (0.7, 0.75)
#: about as long as the rest of a 1 mm brain's registration, in mutual-inverse steps (~0.6 s each)
MUTUAL_REST_IN_STEPS = 10


def mutual_progress(report_progress, steps: int, target_mm: float | None):
    """make_mutually_inverse's ``report(step, error_mm)`` -> register()'s progress between
    :data:`MUTUAL_SPAN`: the steps' share of ``steps``, or with a target, if further, how far the
    error has fallen towards it (on a log scale, from the first step's error; it falls steadily)."""
    start_error, done = [], [0.0]

    def report(step: int, error_mm: float) -> None:
        fraction = step / steps
        if target_mm is not None:
            start_error[:1] = start_error[:1] or [error_mm]
            if start_error[0] > target_mm and error_mm > 0:
                fraction = max(fraction, math.log(start_error[0] / error_mm) / math.log(start_error[0] / target_mm))
        done[0] = max(done[0], min(fraction, 1.0))
        goal = f", target {target_mm:g} mm" if target_mm is not None else ""
        report_progress(MUTUAL_SPAN[0] + (MUTUAL_SPAN[1] - MUTUAL_SPAN[0]) * done[0],
                        f"mutual-inverse step {step} of {'at most ' if target_mm is not None else ''}{steps}: "
                        f"error {error_mm:.4f} mm{goal}")
    return report


def mutual_progress_scale(steps: int):
    """The progress fraction of register()'s stages -> the bar's when ``steps`` mutual-inverse
    steps run: they get their share of the time (~steps / (steps + MUTUAL_REST_IN_STEPS)) in
    place of the bar's 5 % between :data:`MUTUAL_SPAN`, the other stages the rest, in order."""
    start, end = MUTUAL_SPAN
    share = steps / (steps + MUTUAL_REST_IN_STEPS)
    rest = (1.0 - share) / (1.0 - (end - start))

    def bar(fraction: float) -> float:
        if fraction <= start:
            return fraction * rest
        if fraction <= end:
            return start * rest + (fraction - start) / (end - start) * share
        return start * rest + share + (fraction - end) * rest
    return bar


def register(
    fixed: sitk.Image,
    moving: sitk.Image,
    model: LoadedModel | str | None = None,
    device: str | torch.device = "auto",
    affine: str | None = "affine",
    refine: int = 0,
    fixed_seg: sitk.Image | None = None,
    moving_seg: sitk.Image | None = None,
    labels=None,
    progress: Progress | None = None,
    cancel: Callable[[], bool] | None = None,
    passes: int | None = None,
    precision: str = "auto",
    label_interpolation: str = "linear",
    quality: str = "fast",
    fullres_settings=None,
    polish_settings=None,
    mutual_steps: int = 0,
    mutual_target_mm: float | None = None,
) -> RegistrationResult:
    """Register ``moving`` onto ``fixed`` and ``fixed`` onto ``moving``; both fields come from the
    same network passes.

    ``affine`` is ``"affine"``, ``"rigid"`` or ``None`` (images already aligned). ``refine`` adds
    that many steps of instance optimisation. ``passes`` runs the network that many times, each on
    the moving image warped by the fields so far (see :func:`run_network`; None: ``DEFAULT_PASSES``).
    ``precision`` (``auto``, ``float32``, ``bfloat16``): the dtype of the network's convolutions;
    ``auto`` is bfloat16 on CPUs that compute it natively (see :func:`~.device.resolve_precision`).
    ``quality``: ``fast`` (the network's fields, then a few NCC iterations on the model grid:
    :mod:`InverseRegLib.polish`, settings ``polish_settings``, default
    :data:`~.polish.FAST_SETTINGS`; :data:`~.polish.NETWORK_ONLY` switches it off) or ``best``
    (the same, then greedy-like iterations at the input's full resolution, warm-started from them:
    :mod:`InverseRegLib.fullres`; its settings ``fullres_settings``, default
    :data:`~.fullres.DEFAULT_SETTINGS`). Either way the written
    backward field is the inverse of the written forward one (:mod:`InverseRegLib.inverse`).
    ``mutual_steps`` > 0 then adjusts both fields together for that many steps so that each is
    the other's inverse in both orders (:mod:`InverseRegLib.mutual`; ~0.6 s each on two CPU
    cores for a 1 mm brain; 0, the default, skips it); ``mutual_target_mm`` stops them as soon as
    both orders' means are at most that (then ``mutual_steps`` is the most that run; the report
    says how many did, and whether the written fields, after any fold repair, are within it;
    0.01 mm takes ~107 steps with ``fast`` on 1 mm brains, for ~0.006 Dice).
    Label maps, if given, add Dice per label (both directions) and BIR to the report, over
    ``labels`` (see :func:`InverseRegLib.metrics.resolve_labels`; default: labels both maps share),
    and are carried to the other grid (``result.label_images``) with ``label_interpolation``
    (``linear``: label-preserving, or ``nearest``; see :mod:`InverseRegLib.labels`); the Dice is
    that of exactly those carried label maps.
    """
    t_start = time.perf_counter()
    report_progress = progress or (lambda fraction, message: None)
    if progress is not None and isinstance(mutual_steps, int) and mutual_steps > 0:
        bar = mutual_progress_scale(mutual_steps)
        report_progress = lambda fraction, message: progress(bar(fraction), message)  # noqa: E731

    def check_cancel():
        if cancel is not None and cancel():
            raise Cancelled("registration cancelled")

    fixed, moving = validate_image(fixed, "fixed image"), validate_image(moving, "moving image")
    # no second copy of an input that is float32 already (the command line reads it so)
    fixed = fixed if fixed.GetPixelID() == sitk.sitkFloat32 else sitk.Cast(fixed, sitk.sitkFloat32)
    moving = moving if moving.GetPixelID() == sitk.sitkFloat32 else sitk.Cast(moving, sitk.sitkFloat32)
    if refine < 0:
        raise InverseRegError(f"refine must be >= 0, got {refine}")
    if isinstance(mutual_steps, bool) or not isinstance(mutual_steps, int) or mutual_steps < 0:
        raise InverseRegError(f"mutual_steps must be a whole number >= 0, got {mutual_steps!r}")
    if mutual_target_mm is not None:
        if isinstance(mutual_target_mm, bool) or not isinstance(mutual_target_mm, (int, float)) \
                or not 0 < mutual_target_mm < float("inf"):
            raise InverseRegError(f"mutual_target_mm must be a number of mm > 0, got {mutual_target_mm!r}")
        if not mutual_steps:
            raise InverseRegError("mutual_target_mm needs mutual_steps > 0 (the most steps to run for it)")
    passes = DEFAULT_PASSES if passes is None else passes
    if isinstance(passes, bool) or not isinstance(passes, int) or passes < 1:
        raise InverseRegError(f"passes must be a whole number >= 1, got {passes!r}")
    if quality not in QUALITIES:
        raise InverseRegError(f"quality must be one of {', '.join(QUALITIES)}, got {quality!r}")
    if affine not in (None, "affine", "rigid"):
        raise InverseRegError(f"affine must be 'affine', 'rigid' or None, got {affine!r}")
    try:
        labels = resolve_labels(labels)
    except ValueError as error:
        raise InverseRegError(str(error)) from None
    if label_interpolation not in LABEL_METHODS:
        raise InverseRegError(f"label interpolation must be one of {', '.join(LABEL_METHODS)}, got {label_interpolation!r}")
    if fixed_seg is not None:
        fixed_seg = check_label_map(fixed_seg, fixed, "fixed label map", "the fixed image")
    if moving_seg is not None:
        moving_seg = check_label_map(moving_seg, moving, "moving label map", "the moving image")
    device = resolve_device(device)
    dtype = resolve_precision(precision, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if not isinstance(model, LoadedModel):
        model = load_model(model, device="cpu")
    report_progress(0.05, "inputs read")

    transform = None
    t_affine = 0.0
    if affine is not None:
        from .affine import affine_align
        check_cancel()
        t0 = time.perf_counter()
        transform = affine_align(fixed, moving, mode=affine, device=device,
                                 progress=lambda f, m: report_progress(0.05 + 0.2 * f, m))
        t_affine = time.perf_counter() - t0
    report_progress(0.25, "resampling into the model grid")

    check_cancel()
    # the default normalisation of the full fixed image serves the grid centre and the QA mask
    fixed_normalized = normalize(sitk.GetArrayViewFromImage(fixed))
    geometry = model_geometry(model, fixed, fixed_normalized)
    fixed_mask = foreground_mask(fixed, normalized=fixed_normalized)  # 1 byte per voxel, not 4
    del fixed_normalized
    fixed_on_model = sitk.GetArrayFromImage(resample_to(fixed, geometry))
    moving_on_model = sitk.GetArrayFromImage(resample_to(moving, geometry, transform))
    target = normalize(fixed_on_model, model.normalization)
    source = normalize(moving_on_model, model.normalization)
    report_progress(0.3, f"running the network on {device.type.upper()}")
    t0 = time.perf_counter()
    u_st, u_ts = run_network(model, source, target, device, refine,
                             lambda f, m: report_progress(0.3 + 0.3 * f, m), cancel, passes, dtype)
    t_network = time.perf_counter() - t0
    check_cancel()
    report_progress(0.6, "bringing the fields back to the original grids")

    d_st = voxel_field_to_physical(u_st, geometry)
    d_ts = voxel_field_to_physical(u_ts, geometry)
    t_polish = 0.0
    polished = False
    folds_repaired = folds_left = 0  # forward-field voxels unfold.py found folded / left folded
    from .polish import FAST_SETTINGS, polish_fields
    polish = polish_settings or FAST_SETTINGS  # both qualities: best's full-resolution level starts from it
    if sum(polish.iterations) > 0:
        report_progress(0.6, "model-grid NCC iterations")
        t0 = time.perf_counter()
        d_st, d_ts = polish_fields(target, source, d_st, d_ts, geometry, polish, cancel)
        # the few voxels the iterations may fold, smoothed out where they are (unfold.py); on the
        # model grid, where the field lives (its exact inverse is taken later, on the image grid)
        repaired, repair = repair_folds(d_st[0].permute(1, 2, 3, 0), geometry)
        if repair.folded_before:
            d_st = torch.from_numpy(repaired).permute(3, 0, 1, 2)[None].contiguous()
        folds_repaired, folds_left = repair.folded_before, repair.folded_after
        t_polish = time.perf_counter() - t0
        polished = True
    fixed_geometry, moving_geometry = Geometry.of(fixed), Geometry.of(moving)
    forward = _compose_with_affine(d_st, geometry, fixed_geometry, transform, inverse=False)
    backward = _compose_with_affine(d_ts, geometry, moving_geometry, transform, inverse=True)
    t_fullres = 0.0
    forward_determinant = None
    if quality == "best":
        from .fullres import DEFAULT_SETTINGS, optimise_fullres
        check_cancel()
        t0 = time.perf_counter()
        forward = optimise_fullres(fixed, moving, forward, fullres_settings or DEFAULT_SETTINGS,
                                   lambda f, m: report_progress(0.6 + 0.1 * f, m), cancel)
        forward, repair = repair_folds(forward, fixed_geometry)
        forward_determinant = repair.determinant  # the folding figure below, without a second Jacobian
        folds_repaired, folds_left = folds_repaired + repair.folded_before, repair.folded_after
        t_fullres = time.perf_counter() - t0
    # the written backward field made the inverse of the written forward one (the network's own
    # backward field is the starting point; after the full-resolution iterations a farther one)
    t0 = time.perf_counter()
    backward, inverse_stats = invert_field(forward, fixed_geometry, moving_geometry, initial=backward,
                                           linear=None if transform is None else affine_matrix(transform)[0],
                                           iterations=12 if quality == "fast" else 30)
    # where the forward field compresses almost to a point its exact inverse can fold: those few
    # voxels smoothed out locally (unfold.py), exactness given up there only (the report counts them)
    backward, backward_repair = repair_folds(backward, moving_geometry)
    t_inverse = time.perf_counter() - t0
    t_mutual = 0.0
    moving_mask = foreground_mask(moving)
    mutual_report = {}
    if mutual_steps:
        check_cancel()
        t0 = time.perf_counter()
        from .mutual import make_written_pair_inverse
        target = None if mutual_target_mm is None else float(mutual_target_mm)
        try:
            forward, backward, forward_repair, backward_repair, mutual_report = make_written_pair_inverse(
                forward, fixed_geometry, backward, moving_geometry, fixed_mask, moving_mask, mutual_steps, target,
                report=mutual_progress(report_progress, mutual_steps, target), cancel=cancel, device=device)
        except torch.cuda.OutOfMemoryError:
            raise InverseRegError("out of GPU memory during the mutual-inverse steps; rerun with device 'cpu'") from None
        # the written fields changed after the model grid: their folding is judged on the image grids
        forward_determinant = forward_repair.determinant
        folds_repaired, folds_left = folds_repaired + forward_repair.folded_before, forward_repair.folded_after
        t_mutual = time.perf_counter() - t0
    # float32 from here on (the files get these values in float64; see RegistrationResult)
    forward = np.ascontiguousarray(forward, dtype=np.float32)
    backward = np.ascontiguousarray(backward, dtype=np.float32)
    t_fields = time.perf_counter() - t_start
    check_cancel()
    report_progress(0.75, "warping the images")
    moving_warped = warp_image(moving, forward, fixed_geometry)
    fixed_warped = warp_image(fixed, backward, moving_geometry)
    t_warped = time.perf_counter() - t_start

    report_progress(0.85, "measuring folding and inverse consistency")
    t0 = time.perf_counter()
    if quality == "fast" and not mutual_steps:
        # folding where the fields come from (the model grid, after the model-grid stage if it
        # ran; see quality.py), each on its own image's foreground: φST over the fixed image, φTS
        # over the affinely aligned moving one
        folding_forward = folding_on_model_grid(d_st, geometry, foreground_mask(None, normalized=normalize(fixed_on_model)))
        if polished:
            # d_ts is then only the first-order start of the exact inverse: judge the written field
            folding_backward = folding_of_determinant(backward_repair.determinant, moving_mask)
        else:
            folding_backward = folding_on_model_grid(d_ts, geometry, foreground_mask(None, normalized=normalize(moving_on_model)))
    else:
        # the full-resolution iterations changed the fields after the model grid: judge the written ones
        folding_forward = folding_of_determinant(forward_determinant, fixed_mask)
        folding_backward = folding_of_determinant(backward_repair.determinant, moving_mask)
    # after mutual-inverse steps, every voxel (~0.5 s more on a 1 mm brain, against a minute of
    # steps): the steps judge their target there, and the sample's 1e-4 mm would otherwise put the
    # report on the wrong side of it
    ice_stride = 1 if mutual_steps else ICE_STRIDE
    ice_mean, ice_p95 = inverse_consistency(forward, fixed_geometry, backward, moving_geometry, fixed_mask,
                                            stride=ice_stride)
    ice_moving_mean, ice_moving_p95 = inverse_consistency(backward, moving_geometry, forward, fixed_geometry,
                                                          moving_mask, stride=ice_stride)
    t_metrics = time.perf_counter() - t0
    report = {
        "device": device.type,
        "model_id": model.model_id,
        "model_path": model.path,
        "preset": model.preset.name,
        "affine": affine,
        "refine_steps": int(refine),
        "passes": int(passes),
        "precision": str(dtype).removeprefix("torch."),
        "seconds_affine": round(t_affine, 3),
        "seconds_network": round(t_network, 3),
        "seconds_to_fields": round(t_fields, 3),
        "seconds_to_warped": round(t_warped, 3),
        "seconds_warps": round(t_warped - t_fields, 3),
        "seconds_metrics": round(t_metrics, 3),
        "folding_percent_forward": folding_forward[0],
        "folding_percent_backward": folding_backward[0],
        "folding_percent_forward_foreground": folding_forward[1],
        "folding_percent_backward_foreground": folding_backward[1],
        "folding_measured_on": ("image grids" if quality == "best" or mutual_steps else
                                "model grid (forward), moving image grid (backward)" if polished else "model grid"),
        "ice_mean_mm": ice_mean,
        "ice_p95_mm": ice_p95,
        "ice_sampled_every": ice_stride,
        "ice_moving_mean_mm": ice_moving_mean,
        "ice_moving_p95_mm": ice_moving_p95,
        "quality": quality,
        "seconds_fullres": round(t_fullres, 3),
        "seconds_polish": round(t_polish, 3),
        "seconds_inverse": round(t_inverse, 3),
        "seconds_mutual": round(t_mutual, 3),
        "mutual_steps": int(mutual_steps),
        # voxels of the forward field that folded after the iterations, before unfold.py smoothed them out
        "folds_repaired_forward": folds_repaired,
        "folds_left_forward": folds_left,
        "folds_repaired_backward": backward_repair.folded_before,
        "folds_left_backward": backward_repair.folded_after,
        "voxels_changed_by_fold_repair_backward": backward_repair.changed,
        **inverse_stats.as_report(),
        **mutual_report,
    }
    label_images = {}
    if fixed_seg is not None and moving_seg is not None:
        report_progress(0.9, "carrying the label maps both ways")
        label_scores, label_images = label_report(fixed_seg, moving_seg, forward, backward, fixed_geometry,
                                                  moving_geometry, labels, label_interpolation)
        report.update(label_scores)
    report.update(_peak_memory_mb(device))
    report["seconds_total"] = round(time.perf_counter() - t_start, 3)
    report_progress(1.0, "done")
    return RegistrationResult(forward, backward, fixed_geometry, moving_geometry, moving_warped, fixed_warped,
                              transform, report, label_images)


def label_report(fixed_seg, moving_seg, forward, backward, fixed_geometry, moving_geometry, labels=None,
                 method: str = "linear") -> tuple[dict, dict]:
    """Dice per label both ways and the paper's BIR, and the carried label maps they score:
    ``(scores, {"moving_seg_warped": on the fixed grid, "fixed_seg_warped": on the moving grid})``."""
    fixed_seg = check_label_map(fixed_seg, fixed_geometry, "fixed label map", "the fixed image")
    moving_seg = check_label_map(moving_seg, moving_geometry, "moving label map", "the moving image")
    fixed_labels = sitk.GetArrayFromImage(fixed_seg)
    moving_labels = sitk.GetArrayFromImage(moving_seg)
    moving_carried = warp_labels(moving_seg, forward, fixed_geometry, method)
    fixed_carried = warp_labels(fixed_seg, backward, moving_geometry, method)
    warped_moving = sitk.GetArrayFromImage(moving_carried)
    warped_fixed = sitk.GetArrayFromImage(fixed_carried)
    if labels is None:  # register() has resolved names such as 'freesurfer' already
        labels = sorted(int(v) for v in set(np.unique(fixed_labels)) & set(np.unique(moving_labels)) - {0})
    forward_dice = dice_per_label(warped_moving, fixed_labels, labels)
    backward_dice = dice_per_label(warped_fixed, moving_labels, labels)
    # overlap before registration, in physical space (the grids may differ)
    if grid_mismatch(moving_geometry, fixed_geometry) is None:  # one grid: the identity keeps every voxel
        unregistered = moving_labels
    else:
        unregistered = sitk.GetArrayFromImage(warp_labels(moving_seg, np.zeros_like(forward), fixed_geometry, method))
    before = dice_per_label(unregistered, fixed_labels, labels)
    out = {
        "labels": labels,
        "dice_per_label": {str(k): v for k, v in forward_dice.items()},
        "dice_mean": float(np.mean(list(forward_dice.values()))) if forward_dice else None,
        "dice_per_label_backward": {str(k): v for k, v in backward_dice.items()},
        "dice_mean_backward": float(np.mean(list(backward_dice.values()))) if backward_dice else None,
        "bir": bir(warped_moving, fixed_labels, labels),
        "bir_backward": bir(warped_fixed, moving_labels, labels),
    }
    out["dice_mean_before"] = float(np.mean(list(before.values()))) if before else None
    out["label_interpolation"] = method
    return out, {"moving_seg_warped": compact_labels(moving_carried), "fixed_seg_warped": compact_labels(fixed_carried)}
