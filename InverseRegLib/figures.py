"""The one-page picture of a registration a person can read (needs matplotlib)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .fields import image_to_field
from .intensity import normalize


def overview_png(fixed: sitk.Image, moving: sitk.Image, moving_warped: sitk.Image,
                 forward: sitk.Image, path, title: str = "") -> Path:
    """Fixed, moving (on the fixed grid), registered moving, |difference| before and after, and
    the deformation grid, on the middle axial slice of the fixed image. Written atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    moving_on_fixed = sitk.Resample(moving, fixed, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    f = normalize(sitk.GetArrayFromImage(fixed))
    m = normalize(sitk.GetArrayFromImage(moving_on_fixed))
    w = normalize(sitk.GetArrayFromImage(moving_warped))
    field, geometry = image_to_field(forward)
    k = f.shape[0] // 2
    index_field = field[k] @ np.linalg.inv(geometry.index_to_physical).T  # mm -> voxels
    fig, axes = plt.subplots(2, 3, figsize=(12, 8.5))
    panels = [(f[k], "fixed", "gray"), (m[k], "moving (before)", "gray"), (w[k], "moving registered", "gray"),
              (np.abs(f[k] - m[k]), "|fixed - moving| before", "magma"),
              (np.abs(f[k] - w[k]), "|fixed - moving| after", "magma")]
    for ax, (data, name, cmap) in zip(axes.ravel(), panels):
        ax.imshow(data, cmap=cmap, vmin=0, vmax=1, origin="lower")
        ax.set_title(name)
        ax.axis("off")
    ax = axes.ravel()[5]
    ax.imshow(f[k], cmap="gray", vmin=0, vmax=1, origin="lower", alpha=0.35)
    step = max(1, f.shape[2] // 24)
    yy, xx = np.mgrid[0:f.shape[1], 0:f.shape[2]]
    gx, gy = xx + index_field[..., 0], yy + index_field[..., 1]
    for j in range(0, f.shape[1], step):
        ax.plot(gx[j], gy[j], color="tab:cyan", lw=0.6)
    for i in range(0, f.shape[2], step):
        ax.plot(gx[:, i], gy[:, i], color="tab:cyan", lw=0.6)
    ax.set_title("deformation grid (forward)")
    ax.set_xlim(0, f.shape[2] - 1)
    ax.set_ylim(0, f.shape[1] - 1)
    ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)
    return path
