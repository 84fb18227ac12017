"""What the slice views show after a registration: one direction at a time, and comparisons.

* Directions: *forward* puts the moving volume under the forward transform over the fixed
  volume (untransformed); *backward* the fixed volume under the backward transform over the
  moving one. A parent transform the user had put on either volume is replaced (the registration
  saw the volumes as acquired, so that is the only way the overlay is right), the replaced one is
  recorded on the volume (``InverseReg.UserTransformID``, saved with the scene) and named in the
  returned messages, and :func:`restore_user_transforms` puts it back.
* Comparisons: ``difference`` (after registration) and ``differenceBefore`` are signed
  difference volumes, reference minus the other image, shown with a diverging colour table
  (Slicer's Subtract compositing clamps at zero and hides every voxel where the moving image is
  brighter); ``blend`` is 50 % alpha; ``checkerboard`` alternates 8 x 8 x 8 blocks of the
  reference and the registered image.
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import slicer

from . import ROLE_ATTRIBUTE
from .results import BACKWARD, FORWARD, REGISTERED, find_node, nodes_with_role
from .volumes import image_to_node, node_to_image, same_geometry

USER_TRANSFORM_ATTRIBUTE = "InverseReg.UserTransformID"
DIFFERENCE, CHECKERBOARD, COLORS = "difference", "checkerboard", "differenceColors"
JACOBIAN = "jacobian"  # the Jacobian volume of carry.show_jacobian
MODES = ("difference", "differenceBefore", "blend", "checkerboard")
#: Slicer's own diverging table (the application has it; slicer-core's colour logic does not)
SLICER_DIVERGING_TABLE_ID = "vtkMRMLColorTableNodeFileDivergingBlueRed.txt"


def _module_transform_ids(scene) -> set:
    return {node.GetID() for role in (FORWARD, BACKWARD) for node in nodes_with_role(scene, role)}


def _put_under(scene, volume, transform_id, messages: list) -> None:
    """Set ``volume``'s parent, recording a parent the user had set (once: the first one wins)."""
    current = volume.GetTransformNodeID()
    if current and current != transform_id and current not in _module_transform_ids(scene):
        if volume.GetAttribute(USER_TRANSFORM_ATTRIBUTE) is None:
            volume.SetAttribute(USER_TRANSFORM_ATTRIBUTE, current)
            user = scene.GetNodeByID(current)
            messages.append(f"'{volume.GetName()}' was under the transform '{user.GetName() if user else current}'; "
                            "it is taken off while the registration is shown (Restore puts it back).")
    volume.SetAndObserveTransformNodeID(transform_id)


def show_direction(scene, fixed, moving, forward_node, backward_node, forward: bool = True) -> list:
    """Place the volumes for one direction; returns messages about replaced user transforms."""
    if forward_node is None or backward_node is None:
        raise ValueError("Register first: there are no output transforms yet.")
    messages: list = []
    if forward:
        _put_under(scene, fixed, None, messages)
        _put_under(scene, moving, forward_node.GetID(), messages)
    else:
        _put_under(scene, moving, None, messages)
        _put_under(scene, fixed, backward_node.GetID(), messages)
    return messages


def restore_user_transforms(scene, volumes) -> list:
    """Put back the parent transforms the user had set before a direction was shown; volumes
    the user had left untransformed come off the module's transforms. Returns messages."""
    messages = []
    for volume in volumes:
        if volume is None:
            continue
        saved = volume.GetAttribute(USER_TRANSFORM_ATTRIBUTE)
        if saved is not None:
            user = scene.GetNodeByID(saved)
            volume.SetAndObserveTransformNodeID(saved if user is not None else None)
            volume.RemoveAttribute(USER_TRANSFORM_ATTRIBUTE)
            messages.append(f"'{volume.GetName()}' is under '{user.GetName()}' again." if user is not None else
                            f"The transform '{volume.GetName()}' was under has been deleted; it stays untransformed.")
        elif volume.GetTransformNodeID() in _module_transform_ids(scene):
            volume.SetAndObserveTransformNodeID(None)
    return messages


def set_slice_layers(scene, background, foreground=None, opacity: float = 0.0,
                     compositing: int | None = None) -> None:
    """Every slice view of the scene: these layers (``None`` clears one), no label layer."""
    if compositing is None:
        compositing = slicer.vtkMRMLSliceCompositeNode.Alpha
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        composite = scene.GetNthNodeByClass(index, "vtkMRMLSliceCompositeNode")
        composite.SetBackgroundVolumeID(background.GetID() if background is not None else None)
        composite.SetForegroundVolumeID(foreground.GetID() if foreground is not None else None)
        composite.SetLabelVolumeID(None)
        composite.SetForegroundOpacity(opacity)
        composite.SetCompositing(compositing)


def diverging_colors(scene):
    """Slicer's DivergingBlueRed table where the application provides it, else the module's own
    blue-white-red table (created once, saved with the scene)."""
    node = scene.GetNodeByID(SLICER_DIVERGING_TABLE_ID)
    if node is not None:
        return node
    node = find_node(scene, COLORS)
    if node is not None:
        return node
    node = slicer.vtkMRMLColorTableNode()
    node.SetTypeToUser()
    node.SetName("InverseReg difference colours")
    node.SetAttribute(ROLE_ATTRIBUTE, COLORS)
    count = 255  # odd: the middle entry is exactly white, at zero difference
    node.SetNumberOfColors(count)
    for index in range(count):
        t = 2.0 * index / (count - 1) - 1.0  # -1 (blue) .. 0 (white) .. 1 (red)
        if t < 0:
            rgb = (1.0 + t * 0.8, 1.0 + t * 0.7, 1.0 + t * 0.1)
        else:
            rgb = (1.0 - t * 0.1, 1.0 - t * 0.85, 1.0 - t * 0.85)
        node.SetColor(index, f"{t:+.3f}", *rgb, 1.0)
    scene.AddNode(node)
    return node


def _reference_and_other(fixed, moving, forward: bool):
    return (fixed, moving) if forward else (moving, fixed)


def remove_volume(scene, node) -> None:
    """Remove a volume node with its display and storage nodes (RemoveNode alone leaves them)."""
    helpers = [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
    helpers += [node.GetNthStorageNode(i) for i in range(node.GetNumberOfStorageNodes())]
    scene.RemoveNode(node)
    for helper in helpers:
        if helper is not None and scene.IsNodePresent(helper):
            scene.RemoveNode(helper)


def remove_derived_volumes(scene) -> None:
    """Remove difference, checkerboard and Jacobian volumes (recomputed on demand from the
    current result; an earlier run's would be stale)."""
    for role in (DIFFERENCE, CHECKERBOARD, JACOBIAN):
        for node in nodes_with_role(scene, role):
            remove_volume(scene, node)


def _derived_node(scene, role: str, key: str, name: str):
    for node in nodes_with_role(scene, role):
        if node.GetAttribute("InverseReg.Key") == key:
            return node
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", scene.GenerateUniqueName(name))
    node.SetAttribute(ROLE_ATTRIBUTE, role)
    node.SetAttribute("InverseReg.Key", key)
    node.CreateDefaultDisplayNodes()
    return node


def difference_volume(scene, fixed, moving, forward: bool = True, after: bool = True):
    """Signed difference volume on the reference grid: reference minus the other image, either
    registered (``after``) or as it lies before registration (resampled by the identity).
    Both stages of one direction share one symmetric window, so their colours compare."""
    reference, other = _reference_and_other(fixed, moving, forward)
    reference_image = sitk.Cast(node_to_image(reference), sitk.sitkFloat32)
    if after:
        registered = find_node(scene, REGISTERED, other)
        if registered is None:
            raise ValueError("Register first: there is no registered volume to compare with.")
        other_image = sitk.Cast(node_to_image(registered), sitk.sitkFloat32)
        if not same_geometry(other_image, reference_image):
            raise ValueError(f"the registered volume '{registered.GetName()}' is not on the grid of "
                             f"'{reference.GetName()}'")
    else:
        other_image = sitk.Resample(sitk.Cast(node_to_image(other), sitk.sitkFloat32), reference_image,
                                    sitk.Transform(), sitk.sitkLinear, 0.0)
    difference = sitk.Subtract(reference_image, other_image)
    stage = "after" if after else "before"
    direction = "forward" if forward else "backward"
    node = _derived_node(scene, DIFFERENCE, f"{direction}-{stage}",
                         f"{reference.GetName()} - {other.GetName()} ({stage} registration)")
    image_to_node(difference, node)
    values = sitk.GetArrayViewFromImage(reference_image)
    low, high = np.percentile(values, [1.0, 99.0])
    half = max(float(high - low) / 2.0, 1e-6)
    display = node.GetDisplayNode()
    display.SetAndObserveColorNodeID(diverging_colors(scene).GetID())
    display.SetAutoWindowLevel(False)
    display.SetWindowLevel(2.0 * half, 0.0)  # white at zero, full colour at +-half the image's range
    return node


def checkerboard_volume(scene, fixed, moving, forward: bool = True, block: int = 8):
    """Alternating ``block``-voxel cubes of the reference and of the registered image (both on
    the reference grid). Computed here with numpy: no CLI node, nothing left behind on failure."""
    reference, other = _reference_and_other(fixed, moving, forward)
    registered = find_node(scene, REGISTERED, other)
    if registered is None:
        raise ValueError("Register first: there is no registered volume to compare with.")
    reference_image = sitk.Cast(node_to_image(reference), sitk.sitkFloat32)
    registered_image = sitk.Cast(node_to_image(registered), sitk.sitkFloat32)
    if not same_geometry(reference_image, registered_image):
        raise ValueError(f"the registered volume '{registered.GetName()}' is not on the grid of '{reference.GetName()}'")
    a = sitk.GetArrayFromImage(reference_image)
    b = sitk.GetArrayFromImage(registered_image)
    k, j, i = np.indices(a.shape, sparse=True)
    board = ((k // block + j // block + i // block) % 2).astype(bool)
    image = sitk.GetImageFromArray(np.where(board, b, a))
    image.CopyInformation(reference_image)
    direction = "forward" if forward else "backward"
    node = _derived_node(scene, CHECKERBOARD, direction, f"{reference.GetName()} / {other.GetName()} checkerboard")
    image_to_node(image, node)
    reference_display = reference.GetDisplayNode()
    if reference_display is not None:
        node.GetDisplayNode().SetAutoWindowLevel(False)
        node.GetDisplayNode().SetWindowLevel(reference_display.GetWindow(), reference_display.GetLevel())
    return node


def show_comparison(scene, fixed, moving, forward_node, backward_node, mode: str, forward: bool = True) -> list:
    """Show one comparison in every slice view; returns the messages of :func:`show_direction`."""
    if mode not in MODES:
        raise ValueError(f"unknown comparison '{mode}': choose one of {', '.join(MODES)}")
    messages = show_direction(scene, fixed, moving, forward_node, backward_node, forward)
    reference, other = _reference_and_other(fixed, moving, forward)
    if mode == "blend":
        set_slice_layers(scene, reference, other, 0.5)
    elif mode == "checkerboard":
        set_slice_layers(scene, checkerboard_volume(scene, fixed, moving, forward))
    else:
        set_slice_layers(scene, difference_volume(scene, fixed, moving, forward, after=mode == "difference"))
    return messages
