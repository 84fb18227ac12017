"""A registration result folder -> nodes: two grid transforms and two registered volumes.

The forward field (fixed grid, fixed-space points -> moving space) becomes the *FromParent*
transform of a grid transform node under which the moving volume is shown; the backward field
(moving grid) likewise for the fixed volume. Two nodes, so Slicer never inverts a grid.

Interpolation: ITK's ``DisplacementFieldTransform`` (SimpleITK, ANTs, the library's own warped
images) interpolates the field linearly, so the nodes do too, and the files are exactly what a
user's own SimpleITK script applies. Slicer's transform reader always switches a loaded grid to
cubic, so a saved and reloaded scene would move points by up to a few tenths of a millimetre;
every grid node made here carries ``InverseReg.Interpolation = linear`` and
:func:`restore_interpolation` (which the module runs after every scene import) sets it again.
"""
from __future__ import annotations

import json
import os

import numpy as np
import SimpleITK as sitk
import slicer
import vtk

from . import ROLE_ATTRIBUTE
from .volumes import image_to_node

INTERPOLATION_ATTRIBUTE = "InverseReg.Interpolation"
FORWARD, BACKWARD, REGISTERED = "forwardTransform", "backwardTransform", "registered"
RESULT_FILES = ("forward.nii.gz", "backward.nii.gz", "moving_warped.nii.gz", "fixed_warped.nii.gz", "report.json")


def check_result_folder(folder: str) -> dict:
    """The report of a complete result folder; ValueError naming the first missing file."""
    for name in RESULT_FILES:
        if not os.path.isfile(os.path.join(folder, name)):
            raise ValueError(f"the result folder {folder} has no {name}")
    with open(os.path.join(folder, "report.json")) as handle:
        return json.load(handle)


def grid_transform_from_field(field):
    """An ITK displacement field image, or a ``SlicerGrid`` already read from a field file
    (:func:`InverseRegLib.slicer_grid.read_slicer_grid`) -> ``vtkOrientedGridTransform`` (RAS, linear)."""
    from InverseRegLib.slicer_grid import itk_field_to_slicer_grid, to_vtk_image
    grid = itk_field_to_slicer_grid(field) if isinstance(field, sitk.Image) else field
    image, direction = to_vtk_image(grid)
    transform = slicer.vtkOrientedGridTransform()
    transform.SetDisplacementGridData(image)
    transform.SetGridDirectionMatrix(direction)
    transform.SetInterpolationModeToLinear()
    return transform


def check_field_grid(grid, volume, what: str) -> None:
    """ValueError unless the field (a ``SlicerGrid``) lies on ``volume``'s grid (a result of
    another pair, or the two volumes swapped, would otherwise load silently)."""
    dims = volume.GetImageData().GetDimensions() if volume.GetImageData() is not None else None
    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    ijk_to_ras = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(3)])
    size = tuple(grid.displacement_ras.shape[2::-1])
    if size != tuple(dims or ()) or not np.allclose(grid.ijk_to_ras()[:3], ijk_to_ras, atol=1e-3):
        raise ValueError(f"the {what} field is not on the grid of the volume '{volume.GetName()}' "
                         f"(size {size} vs {dims}): is it the result of another pair?")


def set_grid_transform(node, field, moved_node, reference_node) -> None:
    """Fill ``node`` from a field (ITK image, ``SlicerGrid`` or file); ``moved_node`` is the volume
    this transform moves.

    Registration roles as ``vtkMRMLTransformNode.h`` defines them: the *moving* role names the
    node that was moved, the *fixed* role the one it was moved onto. For the backward transform
    that is the fixed volume moved onto the moving one.
    """
    if isinstance(field, (str, os.PathLike)):
        from InverseRegLib.slicer_grid import read_slicer_grid
        field = read_slicer_grid(field)
    node.SetAndObserveTransformFromParent(grid_transform_from_field(field))
    node.SetAttribute(INTERPOLATION_ATTRIBUTE, "linear")
    node.SetNodeReferenceID(slicer.vtkMRMLTransformNode.GetMovingNodeReferenceRole(), moved_node.GetID())
    node.SetNodeReferenceID(slicer.vtkMRMLTransformNode.GetFixedNodeReferenceRole(), reference_node.GetID())


def restore_interpolation(scene) -> int:
    """Set linear interpolation again on every grid transform node made by this module (after a
    scene is loaded: Slicer's reader picks cubic). Returns how many nodes were set."""
    count = 0
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLGridTransformNode")):
        node = scene.GetNthNodeByClass(index, "vtkMRMLGridTransformNode")
        if node.GetAttribute(INTERPOLATION_ATTRIBUTE) != "linear":
            continue
        transform = node.GetTransformFromParent()
        if isinstance(transform, slicer.vtkOrientedGridTransform):
            if transform.GetInterpolationMode() != vtk.VTK_LINEAR_INTERPOLATION:
                transform.SetInterpolationModeToLinear()
            count += 1
    return count


def nodes_with_role(scene, role: str) -> list:
    """Every node of the scene that the module made for ``role``."""
    collection = scene.GetNodes()
    found = []
    for index in range(collection.GetNumberOfItems()):
        node = collection.GetItemAsObject(index)
        if node.GetAttribute(ROLE_ATTRIBUTE) == role:
            found.append(node)
    return found


def find_node(scene, role: str, source=None):
    """The node the module made for ``role`` (and ``source`` volume, for registered volumes)."""
    for node in nodes_with_role(scene, role):
        if source is None or node.GetNodeReferenceID("InverseReg.source") == source.GetID():
            return node
    return None


def _new_node(scene, class_name: str, name: str, role: str):
    node = scene.AddNewNodeByClass(class_name, scene.GenerateUniqueName(name))
    node.SetAttribute(ROLE_ATTRIBUTE, role)
    return node


def load_result(scene, fixed, moving, folder: str, forward=None, backward=None) -> tuple:
    """Create (or update the given) forward and backward grid transform nodes and the two
    registered volumes from ``folder``; returns ``(forward, backward, report)``.

    Nothing is created before every file was found, so a bad folder leaves the scene as it was.
    """
    from InverseRegLib.slicer_grid import read_slicer_grid
    report = check_result_folder(folder)
    forward_field = read_slicer_grid(os.path.join(folder, "forward.nii.gz"))
    backward_field = read_slicer_grid(os.path.join(folder, "backward.nii.gz"))
    check_field_grid(forward_field, fixed, "forward")
    check_field_grid(backward_field, moving, "backward")
    if forward is None:
        forward = _new_node(scene, "vtkMRMLGridTransformNode", f"{moving.GetName()} to {fixed.GetName()}", FORWARD)
    if backward is None:
        backward = _new_node(scene, "vtkMRMLGridTransformNode", f"{fixed.GetName()} to {moving.GetName()}", BACKWARD)
    forward.SetAttribute(ROLE_ATTRIBUTE, FORWARD)
    backward.SetAttribute(ROLE_ATTRIBUTE, BACKWARD)
    set_grid_transform(forward, forward_field, moved_node=moving, reference_node=fixed)
    set_grid_transform(backward, backward_field, moved_node=fixed, reference_node=moving)
    for file_name, source in (("moving_warped.nii.gz", moving), ("fixed_warped.nii.gz", fixed)):
        load_registered_volume(scene, source, os.path.join(folder, file_name))
    from .views import remove_derived_volumes
    remove_derived_volumes(scene)  # differences / checkerboard of an earlier run would be stale
    return forward, backward, report


def load_registered_volume(scene, source, path: str):
    """The registered image of ``source`` (the library's own resampling, on the other volume's
    grid): created once per source volume and updated by later runs, so no view is stale."""
    node = find_node(scene, REGISTERED, source)
    if node is None:
        node = _new_node(scene, "vtkMRMLScalarVolumeNode", f"{source.GetName()} registered", REGISTERED)
        node.SetNodeReferenceID("InverseReg.source", source.GetID())
        node.CreateDefaultDisplayNodes()
    image_to_node(sitk.ReadImage(path), node)
    display = node.GetDisplayNode()
    source_display = source.GetDisplayNode()
    if display is not None and source_display is not None:
        display.SetAutoWindowLevel(False)
        display.SetWindowLevel(source_display.GetWindow(), source_display.GetLevel())
    return node


def map_point(node, ras) -> np.ndarray:
    """A RAS point through a transform node's FromParent transform (resampling direction)."""
    return np.asarray(node.GetTransformFromParent().TransformPoint([float(v) for v in ras]))
