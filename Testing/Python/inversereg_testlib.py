"""Helpers shared by the InverseRegLib tests: oblique anisotropic grids, analytic images, small
networks that produce non-trivial fields without training, model files, the trained-model lookup.

Nothing here replaces SimpleITK or torch: images are real SimpleITK images, networks are real
:class:`InverseRegLib.model.InverseNet` instances, model files are written by the library's own
exporter.
"""
from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from InverseRegLib.grid import Geometry, centered_grid
from InverseRegLib.intensity import DEFAULT_NORMALIZATION
from InverseRegLib.model import InverseNet
from InverseRegLib.modelfile import LoadedModel, ModelGridSpec, default_model_path, export_model
from InverseRegLib.presets import get_preset

#: environment variable naming a trained model file to use instead of the bundled one (e.g. a
#: training snapshot, ``INVERSEREG_TEST_MODEL=/work/runs/default_2mm/best_model.pt``) for the
#: tests that need a trained network (field recovery, ``inversereg demo``)
TEST_MODEL_ENV = "INVERSEREG_TEST_MODEL"

#: the brain-like model grid of the small untrained test networks: 32 x 48 x 32 voxels of 5 mm
#: in the RAS-stored orientation NIfTI brains have (LPS direction diag(-1, -1, 1))
SMALL_GRID = ModelGridSpec((32, 48, 32), (5.0, 5.0, 5.0), (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))


def rotation_matrix(axis, degrees: float) -> np.ndarray:
    """3x3 rotation by ``degrees`` about ``axis`` (Rodrigues)."""
    axis = np.asarray(axis, dtype=np.float64)
    axis = axis / np.linalg.norm(axis)
    angle = np.deg2rad(degrees)
    k = np.array([[0.0, -axis[2], axis[1]], [axis[2], 0.0, -axis[0]], [-axis[1], axis[0], 0.0]])
    return np.eye(3) + np.sin(angle) * k + (1.0 - np.cos(angle)) * (k @ k)


def oblique_geometry(size, spacing, axis=(1.0, 2.0, 0.5), degrees=20.0, center=(8.0, -12.0, 20.0),
                     noisy_ok: bool = False) -> Geometry:
    """A grid with anisotropic ``spacing`` whose axes are rotated ``degrees`` about ``axis``
    (direction cosines with no zero entries), centred at ``center`` (LPS mm). ``noisy_ok`` allows
    a tiny angle: axes that are the coordinate axes up to rounding noise."""
    direction = rotation_matrix(axis, degrees)
    assert noisy_ok or np.count_nonzero(np.abs(direction) < 1e-3) == 0, "the test grid must be truly oblique"
    return centered_grid(size, spacing, direction.ravel(), center)


def blob_image(geometry: Geometry, center, scale: float = 100.0) -> sitk.Image:
    """A smooth analytic float32 image on ``geometry``: a few anisotropic Gaussian blobs around
    ``center`` (LPS mm), small (< 1e-3 of the peak) near the grid's borders."""
    points = geometry.physical_points() - np.asarray(center, dtype=np.float64)
    blobs = [((0.0, 0.0, 0.0), (12.0, 10.0, 9.0), 1.0),
             ((8.0, 5.0, -4.0), (5.0, 7.0, 4.0), 0.8),
             ((-7.0, -4.0, 5.0), (4.0, 3.5, 6.0), -0.5),
             ((3.0, -8.0, 6.0), (3.5, 3.5, 3.5), 0.6)]
    image = np.zeros(points.shape[:3])
    for shift, radii, weight in blobs:
        r2 = (((points - np.asarray(shift)) / np.asarray(radii)) ** 2).sum(-1)
        image += weight * np.exp(-0.5 * r2)
    out = sitk.GetImageFromArray((scale * image).astype(np.float32))
    return geometry.apply_to(out)


def small_model(preset: str = "default", head_scale: float = 0.0, seed: int = 0,
                grid: ModelGridSpec = SMALL_GRID) -> LoadedModel:
    """An untrained :class:`InverseNet` on a small model grid.

    The network's 3-channel heads start at N(0, 1e-5), i.e. ~identity fields; ``head_scale``
    multiplies them so the untrained network returns smooth, non-trivial fields (5e4 gives a few
    mm on the 5 mm grid) that exercise every transfer step of the pipeline.
    """
    torch.manual_seed(seed)
    network = InverseNet(get_preset(preset)).eval()
    if head_scale:
        with torch.no_grad():
            for decoder in (network.decoder_st, network.decoder_ts):
                decoder.head.weight.mul_(head_scale)
    return LoadedModel(network, network.preset, grid, dict(DEFAULT_NORMALIZATION), {"steps": 0},
                       f"untrained-{preset}-{head_scale:g}", "")


def write_model_file(path, model: LoadedModel) -> Path:
    export_model(path, model.network, model.grid, model.normalization, model.training)
    return Path(path)


def file_hashes(*paths) -> dict[str, str]:
    """sha256 of every file under the given files/folders (to prove inputs were not touched)."""
    out = {}
    for root in paths:
        root = Path(root)
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def trained_model_path() -> Path:
    """The trained model the end-to-end tests use: ``$INVERSEREG_TEST_MODEL`` if set (it must then
    exist), else the bundled ``Resources/InverseReg-default.pt``; skips only when no override is
    given and the bundled file is absent."""
    override = os.environ.get(TEST_MODEL_ENV)
    if override:
        path = Path(override)
        assert path.is_file(), f"{TEST_MODEL_ENV}={override} does not name a file"
        return path
    path = default_model_path()
    if not path.is_file():
        pytest.skip(f"bundled model {path} is not in the checkout yet (set {TEST_MODEL_ENV} to a "
                    "trained model file to run this test)")
    return path


def geometry_equal(a: sitk.Image, b: sitk.Image, tol: float = 1e-6) -> bool:
    """Same size, and spacing, origin and direction within ``tol``."""
    return (a.GetSize() == b.GetSize()
            and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tol)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tol)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=tol))


#: a moving grid of its own (coarse, anisotropic, rotated 10 degrees) for the tests that carry
#: points and label maps between two grids (test_points, test_slicer_carry)
OBLIQUE_MOVING_GRID = oblique_geometry((44, 50, 42), (3.6, 3.3, 3.9), axis=(1.0, -0.5, 2.0), degrees=10.0,
                                       center=(1.0, -2.0, 0.5))
#: LPS <-> RAS: x and y change sign
RAS_FLIP = np.array([-1.0, -1.0, 1.0])
