"""Training losses: local NCC, the paper's cycle L1 term, a diffusion smoothness penalty and,
for training subjects with label maps, a soft Dice of the labels carried through each field.

All take and return tensors; shapes are (B, C, D, H, W). Each returns a scalar to *minimise*
except :func:`local_ncc`, which returns the similarity itself (higher is better) so that its
tests read naturally; :func:`registration_loss` puts the signs together.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .presets import Preset
from .warp import warp


def local_ncc(a: torch.Tensor, b: torch.Tensor, window: int = 9, eps: float = 1e-5) -> torch.Tensor:
    """Mean local (windowed) normalised cross-correlation of two (B, 1, D, H, W) images.

    The correlation coefficient is computed in every ``window``^3 box and averaged over voxels:
    1 for identical images, -1 for an inverted contrast (``b = c - a``), about 0 for unrelated
    ones. Box sums are done with a separable 3D average filter, so the cost is linear in ``window``.
    Near the border a window holds only the voxels inside the image (box sums divided by the
    number of voxels inside, not by ``window``^3): zero padding would add fake zero voxels that
    correlate any two images, e.g. +0.2 instead of -1 for an inverted contrast on a small grid.
    """
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    if window < 1 or window % 2 == 0:
        raise ValueError(f"window must be a positive odd number, got {window}")

    def box_mean(x: torch.Tensor) -> torch.Tensor:
        pad = window // 2
        for dim in range(3):
            kernel_shape = [1, 1, 1, 1, 1]
            kernel_shape[2 + dim] = window
            kernel = torch.full(kernel_shape, 1.0 / window, dtype=x.dtype, device=x.device)
            padding = [0, 0, 0]
            padding[dim] = pad
            x = F.conv3d(x, kernel, padding=tuple(padding))
        return x

    def inside_fraction(n: int, x: torch.Tensor) -> torch.Tensor:
        """Fraction of each 1D window that lies inside an axis of length ``n``."""
        ones = torch.ones(1, 1, n, dtype=x.dtype, device=x.device)
        kernel = torch.full((1, 1, window), 1.0 / window, dtype=x.dtype, device=x.device)
        return F.conv1d(ones, kernel, padding=window // 2).view(n)

    a = a.reshape(-1, 1, *a.shape[2:])
    b = b.reshape(-1, 1, *b.shape[2:])
    d, h, w = a.shape[2:]
    # the box filter is separable, so the fraction of a window inside the grid is a product
    inside = (inside_fraction(d, a).view(d, 1, 1) * inside_fraction(h, a).view(1, h, 1)
              * inside_fraction(w, a).view(1, 1, w))

    def local_mean(x: torch.Tensor) -> torch.Tensor:
        return box_mean(x) / inside

    mean_a, mean_b = local_mean(a), local_mean(b)
    cov = local_mean(a * b) - mean_a * mean_b
    var_a = torch.clamp(local_mean(a * a) - mean_a**2, min=0.0)
    var_b = torch.clamp(local_mean(b * b) - mean_b**2, min=0.0)
    cc = cov / torch.sqrt(var_a * var_b + eps)
    return cc.mean()


def cycle_l1(original: torch.Tensor, round_trip: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between an image and its forward-then-backward warp."""
    return (original - round_trip).abs().mean()


def diffusion(field: torch.Tensor) -> torch.Tensor:
    """Mean squared forward difference of a (B, 3, D, H, W) field along each axis (voxel units)."""
    dz = field[:, :, 1:] - field[:, :, :-1]
    dy = field[:, :, :, 1:] - field[:, :, :, :-1]
    dx = field[:, :, :, :, 1:] - field[:, :, :, :, :-1]
    return (dz.pow(2).mean() + dy.pow(2).mean() + dx.pow(2).mean()) / 3.0


def one_hot_labels(label: torch.Tensor, label_set) -> torch.Tensor:
    """(D, H, W) integer label map -> (1, K, D, H, W) float32 one-hot of the K labels of
    ``label_set`` (every other value, background included, is in no channel)."""
    values = torch.as_tensor(list(label_set), dtype=label.dtype, device=label.device)
    if values.numel() == 0:
        raise ValueError("label_set is empty")
    return (label[None] == values.view(-1, 1, 1, 1)).float()[None]


def soft_dice_loss(moved: torch.Tensor, reference: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """1 - mean over channels of 2|A∩B| / (|A| + |B|) for (B, K, D, H, W) soft masks in [0, 1].

    Channels absent from both masks are left out of the mean (their Dice is undefined), so a
    structure missing from a pair neither rewards nor penalises the field."""
    if moved.shape != reference.shape:
        raise ValueError(f"label masks differ in shape: {tuple(moved.shape)} vs {tuple(reference.shape)}")
    dims = tuple(range(2, moved.dim()))
    overlap = (moved * reference).sum(dims)
    size = moved.sum(dims) + reference.sum(dims)
    present = size > eps
    if not bool(present.any()):
        return moved.sum() * 0.0
    dice = 2.0 * overlap[present] / size[present]
    return 1.0 - dice.mean()


def registration_loss(
    source: torch.Tensor,
    target: torch.Tensor,
    u_st: torch.Tensor,
    u_ts: torch.Tensor,
    aux: dict,
    preset: Preset,
    weights: dict | None = None,
    labels: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The paper's objective plus the optional smoothness and label terms; returns (total, parts).

    total = w_ncc * (-NCC(S∘φST, T) - NCC(T∘φTS, S))
          + w_cycle * (|(T∘φTS)∘φST - T|_1 + |(S∘φST)∘φTS - S|_1)
          + w_smooth * (diffusion(raw_st) + diffusion(raw_ts))
          + w_dice * (DiceLoss(L_S∘φST, L_T) + DiceLoss(L_T∘φTS, L_S))

    ``labels``: (source, target) one-hot masks (B, K, D, H, W) (:func:`one_hot_labels`), needed
    when ``w_dice`` > 0; carried trilinearly (soft masks), so the term has a gradient. Inference
    needs no labels: they only shape the network's fields during training (VoxelMorph's
    semi-supervised variant).
    """
    w = dict(preset.weights if weights is None else weights)
    source_warped = warp(source, u_st)  # S∘φST, in target space
    target_warped = warp(target, u_ts)  # T∘φTS, in source space
    ncc_st = local_ncc(source_warped, target, preset.ncc_window)
    ncc_ts = local_ncc(target_warped, source, preset.ncc_window)
    total = -w.get("ncc", 1.0) * (ncc_st + ncc_ts)
    parts = {"ncc_st": float(ncc_st.detach()), "ncc_ts": float(ncc_ts.detach())}
    if w.get("cycle", 0.0) > 0:
        cycle = cycle_l1(target, warp(target_warped, u_st)) + cycle_l1(source, warp(source_warped, u_ts))
        total = total + w["cycle"] * cycle
        parts["cycle"] = float(cycle.detach())
    if w.get("smooth", 0.0) > 0:
        smooth = diffusion(aux["raw_st"]) + diffusion(aux["raw_ts"])
        total = total + w["smooth"] * smooth
        parts["smooth"] = float(smooth.detach())
    if w.get("dice", 0.0) > 0:
        if labels is None:
            raise ValueError("the loss has a Dice weight but no label maps were given")
        source_labels, target_labels = labels
        dice = (soft_dice_loss(warp(source_labels, u_st), target_labels)
                + soft_dice_loss(warp(target_labels, u_ts), source_labels))
        total = total + w["dice"] * dice
        parts["dice"] = float(dice.detach())
    parts["loss"] = float(total.detach())
    return total, parts
