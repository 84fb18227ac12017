"""Trilinear sampling of one volume at many points, on all of torch's CPU threads.

PyTorch's CPU kernel for 3D ``grid_sample`` parallelises over the batch only, so one volume
sampled at a whole grid of points runs on one core. :func:`grid_sample` cuts the points into one
batch entry per thread, the volume repeated as a stride-0 view (no copy), and gives back exactly
what ``F.grid_sample(..., align_corners=True)`` gives, bit for bit.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

#: below this many points one call on one thread costs less than the split's bookkeeping
MIN_POINTS_TO_SPLIT = 65_536


def grid_sample(volume: torch.Tensor, grid: torch.Tensor, mode: str = "bilinear",
                padding_mode: str = "zeros") -> torch.Tensor:
    """``F.grid_sample(volume, grid, mode, padding_mode, align_corners=True)``.

    ``volume`` (B, C, D, H, W), any strides; ``grid`` (B, *S, 3) with S three spatial sizes, in
    grid_sample's normalised coordinates (x, y, z). Returns (B, C, *S). With B = 1 on a CPU, no
    gradient, and enough points, the points are split across ``torch.get_num_threads()`` threads.
    """
    threads = torch.get_num_threads()
    points = grid[0, ..., 0].numel() if grid.dim() == 5 else 0
    if (threads < 2 or volume.shape[0] != 1 or grid.shape[0] != 1 or grid.dim() != 5
            or volume.device.type != "cpu" or points < MIN_POINTS_TO_SPLIT
            or (torch.is_grad_enabled() and (volume.requires_grad or grid.requires_grad))):
        return F.grid_sample(volume, grid, mode=mode, padding_mode=padding_mode, align_corners=True)
    spatial = tuple(grid.shape[1:-1])
    channels = volume.shape[1]
    per_thread, rest = divmod(points, threads)
    flat = grid.reshape(points, 3)
    split = threads * per_thread  # the first ``split`` points, a view; the ``rest`` (< threads) apart
    out = F.grid_sample(volume.expand(threads, *volume.shape[1:]), flat[:split].view(threads, 1, 1, per_thread, 3),
                        mode=mode, padding_mode=padding_mode, align_corners=True)
    # (threads, C, 1, 1, per_thread): thread-major, which is point order only for one channel
    if channels == 1 and rest == 0:
        return out.view(1, 1, *spatial)
    values = out.new_empty(channels, points)
    values[:, :split].view(channels, threads, per_thread).copy_(out.view(threads, channels, per_thread).transpose(0, 1))
    if rest:
        values[:, split:] = F.grid_sample(volume, flat[split:].view(1, 1, 1, rest, 3), mode=mode,
                                          padding_mode=padding_mode, align_corners=True).view(channels, rest)
    return values.view(1, channels, *spatial)
