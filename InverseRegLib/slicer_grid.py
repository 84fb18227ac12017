"""ITK displacement fields (LPS) to the RAS grids 3D Slicer's grid transforms hold.

Slicer's ``vtkOrientedGridTransform`` stores a displacement grid as a ``vtkImageData`` (origin,
spacing, dimensions) plus a 3x3 grid direction matrix, with displacement vectors in RAS mm. An ITK
field file is the same grid in LPS. Slicer's own converter (``vtkITKTransformConverter``) flips the
sign of x and y of the origin and of every vector and left-multiplies the direction by
diag(-1, -1, 1); this module does exactly that, so the Slicer module stays free of numerics.

The resampling sense is kept: a field that maps fixed-space points to moving-space points in ITK
is a Slicer *FromParent* transform.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


@dataclass
class SlicerGrid:
    displacement_ras: np.ndarray  # (K, J, I, 3) float64, RAS mm, the array layout arrayFromGridTransform uses
    origin_ras: np.ndarray  # (3,)
    spacing: np.ndarray  # (3,) mm, I, J, K order
    direction_ras: np.ndarray  # (3, 3) IJK-to-RAS direction, columns are the axes

    def ijk_to_ras(self) -> np.ndarray:
        """4x4 IJK-to-RAS matrix of the grid (what a volume node's GetIJKToRASMatrix returns)."""
        matrix = np.eye(4)
        matrix[:3, :3] = self.direction_ras @ np.diag(self.spacing)
        matrix[:3, 3] = self.origin_ras
        return matrix


def itk_field_to_slicer_grid(field: sitk.Image) -> SlicerGrid:
    """An ITK displacement field image (3 components, LPS mm) -> :class:`SlicerGrid` (RAS)."""
    if field.GetDimension() != 3 or field.GetNumberOfComponentsPerPixel() != 3:
        raise ValueError("a 3D displacement field with 3 components per voxel is needed")
    vectors = sitk.GetArrayViewFromImage(field)
    direction = np.asarray(field.GetDirection(), dtype=np.float64).reshape(3, 3)
    return SlicerGrid(
        displacement_ras=np.multiply(vectors, np.array([-1.0, -1.0, 1.0]), dtype=np.float64),  # one copy
        origin_ras=_LPS_TO_RAS @ np.asarray(field.GetOrigin(), dtype=np.float64),
        spacing=np.asarray(field.GetSpacing(), dtype=np.float64),
        direction_ras=_LPS_TO_RAS @ direction,
    )


def read_slicer_grid(path) -> SlicerGrid:
    """A displacement field file -> :class:`SlicerGrid`. The library's own field files (intent
    1006, float64, as :func:`~.fieldfile.write_field` writes them) are read without ITK's
    conversions (:func:`~.fieldfile.read_field_ras`); any other file goes through SimpleITK."""
    from .fieldfile import read_field_ras

    fast = read_field_ras(path)
    if fast is None:
        return itk_field_to_slicer_grid(sitk.ReadImage(str(path)))
    displacement_ras, geometry = fast
    return SlicerGrid(
        displacement_ras=displacement_ras,
        origin_ras=_LPS_TO_RAS @ np.asarray(geometry.origin, dtype=np.float64),
        spacing=np.asarray(geometry.spacing, dtype=np.float64),
        direction_ras=_LPS_TO_RAS @ geometry.direction_matrix,
    )


def slicer_grid_to_itk_field(grid: SlicerGrid) -> sitk.Image:
    """The inverse conversion (Slicer grid -> ITK field image), e.g. to save from Slicer."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(grid.displacement_ras * np.array([-1.0, -1.0, 1.0])),
                                   isVector=True)
    image.SetOrigin(tuple(_LPS_TO_RAS @ grid.origin_ras))
    image.SetSpacing(tuple(float(s) for s in grid.spacing))
    image.SetDirection(tuple((_LPS_TO_RAS @ grid.direction_ras).ravel()))
    return image


def to_vtk_image(grid: SlicerGrid):
    """A ``vtkImageData`` holding the displacement grid (double, 3 components) with the grid's
    origin and spacing, and a ``vtkMatrix4x4`` holding its direction: what
    ``vtkOrientedGridTransform.SetDisplacementGridData`` / ``SetGridDirectionMatrix`` take.
    VTK is imported here so the rest of the library does not need it."""
    import vtk
    from vtk.util import numpy_support

    k, j, i, _ = grid.displacement_ras.shape
    image = vtk.vtkImageData()
    image.SetDimensions(i, j, k)
    image.SetOrigin(*grid.origin_ras)
    image.SetSpacing(*grid.spacing)
    flat = np.ascontiguousarray(grid.displacement_ras.reshape(-1, 3))
    array = numpy_support.numpy_to_vtk(flat, deep=True, array_type=vtk.VTK_DOUBLE)
    array.SetNumberOfComponents(3)
    image.GetPointData().SetScalars(array)
    direction = vtk.vtkMatrix4x4()
    for r in range(3):
        for c in range(3):
            direction.SetElement(r, c, grid.direction_ras[r, c])
    return image, direction
