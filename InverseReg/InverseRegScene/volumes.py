"""Scalar volume nodes <-> SimpleITK images, through numpy (what sitkUtils does in Slicer,
without needing the application).

A volume node holds a ``vtkImageData`` (voxels, no geometry) and an IJK-to-RAS matrix; a
SimpleITK image holds voxels plus LPS origin, spacing and direction. Parent transforms are
ignored, as ``sitkUtils.PullVolumeFromSlicer`` ignores them: a volume is exported as acquired.
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import vtk
from vtk.util import numpy_support

_LPS = np.diag([-1.0, -1.0, 1.0])


def _ijk_to_ras(node) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def node_to_image(node) -> sitk.Image:
    """A scalar volume node -> SimpleITK image (same voxel type, LPS geometry)."""
    data = node.GetImageData()
    if data is None or data.GetNumberOfPoints() == 0:
        raise ValueError(f"the volume '{node.GetName()}' has no voxels")
    i, j, k = data.GetDimensions()
    components = data.GetNumberOfScalarComponents()
    array = numpy_support.vtk_to_numpy(data.GetPointData().GetScalars())
    array = array.reshape((k, j, i) if components == 1 else (k, j, i, components))
    image = sitk.GetImageFromArray(np.ascontiguousarray(array), isVector=components > 1)
    matrix = _ijk_to_ras(node)
    spacing = np.linalg.norm(matrix[:3, :3], axis=0)
    direction = _LPS @ (matrix[:3, :3] / spacing)
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetOrigin(tuple(float(v) for v in _LPS @ matrix[:3, 3]))
    image.SetDirection(tuple(float(v) for v in direction.ravel()))
    return image


def image_to_node(image: sitk.Image, node) -> None:
    """Put a 3D scalar SimpleITK image's voxels and geometry into ``node`` (replacing its image)."""
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError("a 3D scalar image is needed")
    array = sitk.GetArrayFromImage(image)
    k, j, i = array.shape
    data = vtk.vtkImageData()
    data.SetDimensions(i, j, k)
    scalars = numpy_support.numpy_to_vtk(array.ravel(), deep=True)
    data.GetPointData().SetScalars(scalars)
    direction = _LPS @ np.asarray(image.GetDirection()).reshape(3, 3)
    matrix = vtk.vtkMatrix4x4()
    for r in range(3):
        for c in range(3):
            matrix.SetElement(r, c, direction[r, c] * image.GetSpacing()[c])
        matrix.SetElement(r, 3, (_LPS @ np.asarray(image.GetOrigin()))[r])
    node.SetIJKToRASMatrix(matrix)
    node.SetAndObserveImageData(data)


def write_volume(node, path: str) -> None:
    """Export a copy of a volume node to ``path`` (the node and its storage are not touched)."""
    sitk.WriteImage(node_to_image(node), path)


def same_geometry(a: sitk.Image, b: sitk.Image, tolerance: float = 1e-4) -> bool:
    return (a.GetSize() == b.GetSize()
            and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tolerance)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tolerance)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=tolerance))
