"""Jacobian determinant images of displacement fields: where tissue grew (> 1) or shrank (< 1).

``det J(p) = det(I + ∂d/∂p)`` of the map ``p -> p + d(p)``, computed in physical space (index
gradients times the inverse of the grid's direction-times-spacing matrix, see
:func:`InverseRegLib.fields.jacobian_determinant`), so it is right on grids with flipped or oblique
axes; SimpleITK's ``DisplacementFieldJacobianDeterminant`` ignores direction cosines and is not.

The forward field (on the fixed grid) maps fixed points into moving space, so ``jacobian_forward``
says, at each fixed-image point, how much moving-image volume maps onto a unit of fixed-image
volume (ANTs' ``CreateJacobianDeterminantImage`` convention for its warp files). The backward one
is the same on the moving grid, and at corresponding points the two are reciprocal:
``det J_forward(x) · det J_backward(x + forward(x)) = 1``.
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from .errors import InverseRegError
from .fields import image_to_field, jacobian_determinant

JACOBIAN_MODES = ("plain", "log")

#: with ``log``, determinants below this (folding: det <= 0, where no logarithm exists) are
#: written as log(LOG_FLOOR) ≈ -6.9, far beyond any real change, so they stand out
LOG_FLOOR = 1e-3


def jacobian_image(field: sitk.Image, log: bool = False) -> sitk.Image:
    """Float32 image of det J (or ln det J with ``log``) on the field's own grid."""
    try:
        displacement, geometry = image_to_field(field)
    except ValueError as error:
        raise InverseRegError(f"cannot take the Jacobian: {error}") from None
    det = jacobian_determinant(displacement, geometry)
    if log:
        det = np.log(np.maximum(det, LOG_FLOOR))
    return geometry.apply_to(sitk.GetImageFromArray(det.astype(np.float32)))


def jacobian_images(forward: sitk.Image, backward: sitk.Image, mode: str = "plain") -> dict[str, sitk.Image]:
    """``{"jacobian_forward": on the fixed grid, "jacobian_backward": on the moving grid}``."""
    if mode not in JACOBIAN_MODES:
        raise InverseRegError(f"--jacobian must be one of {', '.join(JACOBIAN_MODES)}, got {mode!r}")
    log = mode == "log"
    return {"jacobian_forward": jacobian_image(forward, log), "jacobian_backward": jacobian_image(backward, log)}
