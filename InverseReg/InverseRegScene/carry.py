"""What users do after Register, in the scene: carry a label map, a segmentation or markups from
one volume to the other, and show a Jacobian determinant volume.

Every function takes the scene and nodes (no Qt, no ``slicer.app``, no global scene), so it runs on
Slicer's MRML through slicer-core in tests. Fields are the library's: ITK displacement fields in
LPS mm, given as SimpleITK images (e.g. read from ``forward.nii.gz``/``backward.nii.gz``) or as
the grid transform nodes the module creates (FromParent ``vtkOrientedGridTransform``, RAS mm),
converted here to the same LPS images. Direction, as in the library:

- something drawn on the **moving** volume goes onto the fixed grid through the **forward**
  field (fixed point -> moving point: a plain resampling);
- something drawn on the **fixed** volume goes onto the moving grid through the **backward** one.

Points go the other way round: a point on the fixed volume moves into moving space through
forward (p + forward(p)), one on the moving volume through backward. No numeric inversion anywhere.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
import vtk
from vtk.util import numpy_support

from InverseRegLib.errors import InverseRegError
from InverseRegLib.grid import Geometry
from InverseRegLib.jacobian import jacobian_image
from InverseRegLib.labels import grid_mismatch, warp_labels
from InverseRegLib.points import transform_points

from .views import JACOBIAN  # the role of the module's Jacobian volume (a new registration removes it)

_FLIP = np.array([-1.0, -1.0, 1.0])  # RAS <-> LPS


def _slicer():
    import slicer  # Slicer's Python, or slicer-core outside the application
    return slicer


# --- volumes and fields between MRML and SimpleITK ---------------------------------------------

def volume_geometry(node) -> Geometry:
    """The LPS grid (ITK's) of a volume node: RAS IJK-to-RAS with x and y negated."""
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    ijk_to_ras = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    ijk_to_lps = np.diag([-1.0, -1.0, 1.0]) @ ijk_to_ras[:3, :3]
    spacing = np.linalg.norm(ijk_to_lps, axis=0)
    direction = ijk_to_lps / spacing
    size = node.GetImageData().GetDimensions()
    return Geometry(tuple(int(s) for s in size), tuple(float(s) for s in spacing),
                    tuple(float(v) for v in _FLIP * ijk_to_ras[:3, 3]), tuple(float(v) for v in direction.ravel()))


def volume_to_image(node) -> sitk.Image:
    """A scalar or label map volume node as a SimpleITK image (a copy) on its LPS grid."""
    image_data = node.GetImageData() if node is not None else None
    if image_data is None or image_data.GetPointData().GetScalars() is None:
        raise InverseRegError(f"volume {node.GetName() if node is not None else None!r} has no image data")
    if image_data.GetNumberOfScalarComponents() != 1:
        raise InverseRegError(f"volume {node.GetName()!r} is not a scalar volume")
    nx, ny, nz = image_data.GetDimensions()
    array = numpy_support.vtk_to_numpy(image_data.GetPointData().GetScalars()).reshape(nz, ny, nx).copy()
    return volume_geometry(node).apply_to(sitk.GetImageFromArray(array))


def image_to_volume(scene, image: sitk.Image, name: str, class_name: str = "vtkMRMLScalarVolumeNode"):
    """A new volume node (``class_name``) in ``scene`` holding ``image`` on its own grid, with a display node."""
    slicer = _slicer()
    geometry = Geometry.of(image)
    array = np.ascontiguousarray(sitk.GetArrayFromImage(image))
    image_data = vtk.vtkImageData()
    image_data.SetDimensions(*geometry.size)
    scalars = numpy_support.numpy_to_vtk(array.ravel(), deep=True)
    image_data.GetPointData().SetScalars(scalars)
    node = scene.AddNewNodeByClass(class_name, name)
    node.SetAndObserveImageData(image_data)
    ijk_to_ras = np.eye(4)
    ijk_to_ras[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ geometry.index_to_physical
    ijk_to_ras[:3, 3] = _FLIP * np.asarray(geometry.origin)
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(ijk_to_ras[r, c]))
    node.SetIJKToRASMatrix(matrix)
    node.CreateDefaultDisplayNodes()
    if class_name == "vtkMRMLLabelMapVolumeNode":
        node.GetDisplayNode().SetAndObserveColorNodeID(_label_colors(scene, slicer).GetID())
    return node


def _label_colors(scene, slicer):
    """Slicer's GenericAnatomyColors when the scene has it (the application does), else a
    random-colour table of 256 labels made once per scene."""
    for name in ("GenericAnatomyColors", "InverseRegLabels"):
        found = scene.GetFirstNodeByName(name)
        if found is not None:
            return found
    table = scene.AddNewNodeByClass("vtkMRMLColorTableNode", "InverseRegLabels")
    table.SetTypeToRandom()
    table.SetNumberOfColors(256)
    return table


def field_from_file(path) -> sitk.Image:
    """An ITK displacement field file (forward.nii.gz / backward.nii.gz) as a float64 vector image."""
    path = Path(path)
    if not path.is_file():
        raise InverseRegError(f"displacement field not found: {path}")
    return sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkVectorFloat64)


def field_from_grid_transform(node) -> sitk.Image:
    """The LPS displacement field image of a grid transform node whose FromParent transform is a
    ``vtkOrientedGridTransform`` (how InverseReg's nodes and Slicer's reader of ITK fields hold
    them): vectors and origin with x and y negated, the direction left-multiplied by diag(-1, -1, 1)."""
    slicer = _slicer()
    transform = node.GetTransformFromParent() if node is not None else None
    if transform is not None and not isinstance(transform, slicer.vtkOrientedGridTransform):
        # Slicer may wrap it in a general transform of one element
        if hasattr(transform, "GetNumberOfConcatenatedTransforms") and transform.GetNumberOfConcatenatedTransforms() == 1:
            transform = transform.GetConcatenatedTransform(0)
    if not isinstance(transform, slicer.vtkOrientedGridTransform) or transform.GetDisplacementGrid() is None:
        raise InverseRegError(f"transform {node.GetName() if node is not None else None!r} has no grid in the "
                              "FromParent (resampling) direction; use InverseReg's forward/backward transform nodes")
    grid = transform.GetDisplacementGrid()
    nx, ny, nz = grid.GetDimensions()
    vectors = numpy_support.vtk_to_numpy(grid.GetPointData().GetScalars()).astype(np.float64).reshape(nz, ny, nx, 3)
    vectors = vectors * transform.GetDisplacementScale() + transform.GetDisplacementShift()
    direction = transform.GetGridDirectionMatrix()  # a vtkMatrix4x4 (identity when unset)
    ras_direction = np.array([[direction.GetElement(r, c) for c in range(3)] for r in range(3)])
    image = sitk.GetImageFromArray(vectors * _FLIP, isVector=True)
    image.SetSpacing(tuple(float(s) for s in grid.GetSpacing()))
    image.SetOrigin(tuple(float(v) for v in _FLIP * np.asarray(grid.GetOrigin())))
    image.SetDirection(tuple(float(v) for v in (np.diag([-1.0, -1.0, 1.0]) @ ras_direction).ravel()))
    return image


def as_field(field) -> sitk.Image:
    """A field given as a SimpleITK image, a file path or a grid transform node."""
    if isinstance(field, sitk.Image):
        return sitk.Cast(field, sitk.sitkVectorFloat64)
    if isinstance(field, (str, Path)):
        return field_from_file(field)
    return field_from_grid_transform(field)


# --- carrying label maps and segmentations --------------------------------------------------------

def carry_label_map(scene, label_node, field, target_volume, method: str = "linear", name: str | None = None):
    """A new label map volume node on ``target_volume``'s grid: ``label_node`` resampled through
    ``field`` (which must live on the target's grid: forward for the fixed volume, backward for
    the moving one), label-preserving by default (see :mod:`InverseRegLib.labels`)."""
    labels = volume_to_image(label_node)
    field = as_field(field)
    target = volume_geometry(target_volume)
    mismatch = grid_mismatch(Geometry.of(field), target)
    if mismatch is not None:
        raise InverseRegError(f"the field is not on {target_volume.GetName()!r}'s grid ({mismatch}): carry onto the "
                              "fixed volume with the forward field, onto the moving one with the backward field")
    carried = warp_labels(labels, field, target, method)
    return image_to_volume(scene, carried, name or f"{label_node.GetName()} on {target_volume.GetName()}",
                           "vtkMRMLLabelMapVolumeNode")


def carry_label_map_between(scene, label_node, fixed_volume, moving_volume, forward, backward,
                            method: str = "linear", name: str | None = None):
    """Carry a label map drawn on either volume onto the other one, choosing the field by the
    label map's grid (moving grid: forward, onto the fixed volume; fixed grid: backward, onto the
    moving volume). A label map on neither grid, or an empty one, is refused with one line."""
    geometry = volume_geometry(label_node)
    on_moving = grid_mismatch(geometry, volume_geometry(moving_volume)) is None
    on_fixed = grid_mismatch(geometry, volume_geometry(fixed_volume)) is None
    if not (on_moving or on_fixed):
        raise InverseRegError(f"label map {label_node.GetName()!r} is on neither the fixed volume's nor the moving "
                              "volume's grid; resample it onto the volume it was drawn on first")
    if not np.any(sitk.GetArrayFromImage(volume_to_image(label_node))):  # a copy: the image is a temporary
        raise InverseRegError(f"label map {label_node.GetName()!r} is empty: every voxel is 0")
    if on_moving:  # both grids equal: the moving one wins, as the registration's usual direction
        return carry_label_map(scene, label_node, forward, fixed_volume, method, name)
    return carry_label_map(scene, label_node, backward, moving_volume, method, name)


def carry_segmentation(scene, segmentation_node, source_volume, fixed_volume, moving_volume, forward, backward,
                       method: str = "linear", name: str | None = None):
    """A new segmentation node on the other volume: ``segmentation_node`` (drawn on
    ``source_volume``, the fixed or the moving one; ``None``: the volume the segmentation names
    as its reference geometry, as Slicer's Segment Editor sets it) exported to a label map on the source's grid
    (Slicer's own segmentations logic), carried as :func:`carry_label_map`, imported back, each
    segment keeping its name and colour. A segment that vanishes (too small for the target grid)
    is dropped."""
    slicer = _slicer()
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    if source_volume is None:
        source_volume = segmentation_node.GetNodeReference(segmentation_node.GetReferenceImageGeometryReferenceRole())
        if source_volume is None or source_volume.GetID() not in (fixed_volume.GetID(), moving_volume.GetID()):
            raise InverseRegError(f"segmentation {segmentation_node.GetName()!r} does not name the fixed or the moving "
                                  "volume as its reference geometry; say which volume it was drawn on")
        source_volume = fixed_volume if source_volume.GetID() == fixed_volume.GetID() else moving_volume
    if source_volume not in (fixed_volume, moving_volume):
        raise InverseRegError("the segmentation's source volume must be the fixed or the moving volume")
    segmentation = segmentation_node.GetSegmentation()
    ids = vtk.vtkStringArray()
    segmentation.GetSegmentIDs(ids)
    if ids.GetNumberOfValues() == 0:
        raise InverseRegError(f"segmentation {segmentation_node.GetName()!r} has no segments")
    exported = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", f"{segmentation_node.GetName()} labels")
    try:
        # label value i + 1 for the i-th segment, on the source volume's own grid
        if not logic.ExportSegmentsToLabelmapNode(segmentation_node, ids, exported, source_volume,
                                                  slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY):
            raise InverseRegError(f"could not export segmentation {segmentation_node.GetName()!r} to a label map")
        if not np.any(sitk.GetArrayFromImage(volume_to_image(exported))):
            raise InverseRegError(f"segmentation {segmentation_node.GetName()!r} is empty on its volume's grid")
        forward_direction = source_volume is moving_volume
        target = fixed_volume if forward_direction else moving_volume
        carried = carry_label_map(scene, exported, forward if forward_direction else backward, target, method)
        result = scene.AddNewNodeByClass("vtkMRMLSegmentationNode",
                                         name or f"{segmentation_node.GetName()} on {target.GetName()}")
        result.SetReferenceImageGeometryParameterFromVolumeNode(target)
        result.CreateDefaultDisplayNodes()
        if not logic.ImportLabelmapToSegmentationNode(carried, result):
            raise InverseRegError("could not import the carried label map as a segmentation")
        scene.RemoveNode(carried)
    finally:
        scene.RemoveNode(exported)
    imported = vtk.vtkStringArray()
    result.GetSegmentation().GetSegmentIDs(imported)
    for i in range(imported.GetNumberOfValues()):
        segment = result.GetSegmentation().GetSegment(imported.GetValue(i))
        source = segmentation.GetSegment(ids.GetValue(segment.GetLabelValue() - 1))
        segment.SetName(source.GetName())
        segment.SetColor(*source.GetColor())
    return result


# --- markups -------------------------------------------------------------------------------------

def carry_markups(scene, markups_node, field, name: str | None = None):
    """A new fiducial node with ``markups_node``'s defined control points moved through ``field``
    (on the fixed volume: the forward field, into moving space; on the moving volume: backward),
    labels kept. World positions are read, so a markups node under a transform is moved from
    where it is shown."""
    field = as_field(field)
    ras, labels = placed_points(markups_node)
    moved = transform_points(ras * _FLIP, field, labels, "the field's grid") * _FLIP
    result = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name or f"{markups_node.GetName()} moved")
    for position, label in zip(moved, labels):
        result.AddControlPoint(float(position[0]), float(position[1]), float(position[2]), label)
    return result


def placed_points(markups_node) -> tuple[np.ndarray, list[str]]:
    """World RAS positions (N, 3) and labels of a markups node's placed control points (those
    still being placed or skipped are left out); refused with one line when there are none."""
    slicer = _slicer()
    defined = [i for i in range(markups_node.GetNumberOfControlPoints())
               if markups_node.GetNthControlPointPositionStatus(i) == slicer.vtkMRMLMarkupsNode.PositionDefined]
    if not defined:
        raise InverseRegError(f"markups {markups_node.GetName()!r} has no placed points")
    ras = np.zeros((len(defined), 3))
    for row, i in enumerate(defined):
        position = [0.0, 0.0, 0.0]
        markups_node.GetNthControlPointPositionWorld(i, position)
        ras[row] = position
    return ras, [markups_node.GetNthControlPointLabel(i) for i in defined]


# --- Jacobian determinant volumes ---------------------------------------------------------------

#: half the colour range around "no change": det J in [1/2, 2] (log: [-ln 2, ln 2]) spans blue to red
JACOBIAN_HALF_RANGE = {False: 1.0, True: float(np.log(2.0))}


def jacobian_volume(scene, field, log: bool = False, name: str | None = None):
    """A scalar volume node of det J (or ln det J) of ``field`` on the field's grid, shown with a
    diverging colour table centred on no change (1, or 0 for log): blue shrinks, white none, red
    grows; window/level fixed so the centre stays there. The colour node is made once per scene."""
    field = as_field(field)
    node = image_to_volume(scene, jacobian_image(field, log),
                           name or ("log Jacobian determinant" if log else "Jacobian determinant"))
    display = node.GetDisplayNode()
    display.SetAndObserveColorNodeID(diverging_colors(scene).GetID())
    centre, half = (0.0 if log else 1.0), JACOBIAN_HALF_RANGE[log]
    display.AutoWindowLevelOff()
    display.SetWindowLevel(2.0 * half, centre)
    return node


def diverging_colors(scene):
    """A 256-entry blue-white-red colour table ("InverseRegDiverging"); window/level place its
    middle entry (white) on the display's level."""
    found = scene.GetFirstNodeByName("InverseRegDiverging")
    if found is not None:
        return found
    table = scene.AddNewNodeByClass("vtkMRMLColorTableNode", "InverseRegDiverging")
    table.SetTypeToUser()
    table.SetNumberOfColors(256)
    for i in range(256):
        t = i / 255.0
        if t < 0.5:  # blue (0.23, 0.30, 0.75) to white
            s = t / 0.5
            rgb = (0.23 + s * 0.77, 0.30 + s * 0.70, 0.75 + s * 0.25)
        else:  # white to red (0.71, 0.02, 0.15)
            s = (t - 0.5) / 0.5
            rgb = (1.0 - s * 0.29, 1.0 - s * 0.98, 1.0 - s * 0.85)
        table.SetColor(i, f"{i}", *rgb, 1.0)
    table.SetAttribute("Category", "InverseReg")
    return table


def overlay_jacobian(scene, jacobian_node, background_volume, opacity: float = 0.5) -> int:
    """Show ``jacobian_node`` over ``background_volume`` (its own grid's volume: the fixed volume
    for the forward field's determinant) in every slice view of the scene; returns how many views.
    The user's label layer is kept."""
    if not 0.0 <= opacity <= 1.0:
        raise InverseRegError(f"opacity must be between 0 and 1, got {opacity}")
    composites = scene.GetNodesByClass("vtkMRMLSliceCompositeNode")
    count = composites.GetNumberOfItems()
    for i in range(count):
        composite = composites.GetItemAsObject(i)
        composite.SetBackgroundVolumeID(background_volume.GetID())
        composite.SetForegroundVolumeID(jacobian_node.GetID())
        composite.SetForegroundOpacity(opacity)
    return count


# --- what the panel's "After registration" section calls -------------------------------------------

def _require_result(forward, backward) -> None:
    if forward is None or backward is None:
        raise InverseRegError("Register first: there are no forward and backward transforms yet.")


def carry_to_other_volume(scene, node, fixed_volume, moving_volume, forward, backward, method: str = "linear"):
    """The panel's "Carry to the other volume": a segmentation node or a label map volume drawn on
    either volume goes onto the other one (a segmentation by the volume it names as its reference
    geometry, a label map by its grid; see :func:`carry_segmentation`,
    :func:`carry_label_map_between`). Returns ``(new node, the volume it is on)``; one on a third
    volume's grid, an empty one or anything else is refused with one line and adds nothing."""
    _require_result(forward, backward)
    if node is None:
        raise InverseRegError("Select a segmentation or a label map to carry.")
    if node.IsA("vtkMRMLSegmentationNode"):
        carried = carry_segmentation(scene, node, None, fixed_volume, moving_volume, forward, backward, method)
        source = node.GetNodeReference(node.GetReferenceImageGeometryReferenceRole())
        return carried, (fixed_volume if source.GetID() == moving_volume.GetID() else moving_volume)
    if node.IsA("vtkMRMLLabelMapVolumeNode"):
        # as carry_label_map_between chooses: a label map on the moving grid goes onto the fixed volume
        on_moving = grid_mismatch(volume_geometry(node), volume_geometry(moving_volume)) is None
        carried = carry_label_map_between(scene, node, fixed_volume, moving_volume, forward, backward, method)
        return carried, (fixed_volume if on_moving else moving_volume)
    raise InverseRegError(f"{node.GetName()!r} is neither a segmentation nor a label map volume")


def show_on_volume(scene, node, target_volume, fixed_volume, moving_volume, forward, backward) -> list:
    """Show a carried node where it lies: the volumes placed for the direction in which
    ``target_volume`` is untransformed (the fixed volume: forward; the moving one: backward),
    ``target_volume`` the background of every slice view, and a label map node its label layer
    (segmentations and markups show themselves). Returns :func:`views.show_direction`'s messages."""
    from .views import set_slice_layers, show_direction
    messages = show_direction(scene, fixed_volume, moving_volume, forward, backward,
                              forward=target_volume.GetID() == fixed_volume.GetID())
    set_slice_layers(scene, target_volume)
    if node.IsA("vtkMRMLLabelMapVolumeNode"):
        for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
            scene.GetNthNodeByClass(index, "vtkMRMLSliceCompositeNode").SetLabelVolumeID(node.GetID())
    return messages


def carry_markups_between(scene, markups_node, source_volume, fixed_volume, moving_volume, forward, backward):
    """The panel's "Move points": fiducials placed on ``source_volume`` (the fixed or the moving
    volume, shown untransformed: the fixed one in the forward view, the moving one in the
    backward view) moved onto the other one through the other field (fixed points through
    forward, moving points through backward); returns the new markups node."""
    _require_result(forward, backward)
    if markups_node is None:
        raise InverseRegError("Select a markups point list to move.")
    if source_volume is None or source_volume.GetID() not in (fixed_volume.GetID(), moving_volume.GetID()):
        raise InverseRegError("the points must be on the fixed or the moving volume")
    on_fixed = source_volume.GetID() == fixed_volume.GetID()
    target = moving_volume if on_fixed else fixed_volume
    return carry_markups(scene, markups_node, forward if on_fixed else backward,
                         name=f"{markups_node.GetName()} on {target.GetName()}")


def markups_registration_error(fixed_markups, moving_markups, forward, backward) -> dict:
    """Target registration error of corresponding points (by label when the labels match one to
    one, else by order): fixed points through forward against the moving points, moving points
    through backward against the fixed ones, and the distance before registration, as
    :func:`InverseRegLib.points.target_registration_error` computes it (mm; keys ``pairs``,
    ``before``, ``fixed_to_moving``, ``moving_to_fixed``, each with ``mean_mm``, ``median_mm``,
    ``max_mm``)."""
    from InverseRegLib.points import PointSet, target_registration_error
    _require_result(forward, backward)
    if fixed_markups is None or moving_markups is None:
        raise InverseRegError("Select the point lists on both volumes (fixed and moving) to measure the error.")
    if fixed_markups.GetID() == moving_markups.GetID():
        raise InverseRegError("The fixed and moving point lists are the same node: choose one on each volume.")
    sets = []
    for node in (fixed_markups, moving_markups):
        ras, labels = placed_points(node)
        sets.append(PointSet(lps=ras * _FLIP, names=labels, kind="csv"))
    summary, _ = target_registration_error(sets[0], sets[1], as_field(forward), as_field(backward))
    return summary


def registration_error_sentence(summary: dict) -> str:
    """One line for the panel from :func:`markups_registration_error`'s summary."""
    part = lambda key: f"{summary[key]['mean_mm']:.2f} mm mean, {summary[key]['max_mm']:.2f} max"  # noqa: E731
    return (f"TRE over {summary['pairs']} point pairs: before {part('before')}; fixed to moving {part('fixed_to_moving')}; "
            f"moving to fixed {part('moving_to_fixed')}.")


def show_jacobian(scene, fixed_volume, moving_volume, forward, backward, backward_direction: bool = False,
                  log: bool = False, opacity: float = 0.5) -> tuple:
    """The panel's "Show Jacobian": det J (or ln det J) of the forward field over the fixed
    volume, or of the backward field over the moving volume, in every slice view; the volumes
    placed for that direction (so the one under the overlay is untransformed). Replaces the
    module's previous Jacobian volume. Returns ``(node, messages)``."""
    from . import ROLE_ATTRIBUTE
    from .results import nodes_with_role
    from .views import remove_volume, show_direction
    _require_result(forward, backward)
    field, background = (backward, moving_volume) if backward_direction else (forward, fixed_volume)
    for old in nodes_with_role(scene, JACOBIAN):
        remove_volume(scene, old)
    direction = "backward" if backward_direction else "forward"
    node = jacobian_volume(scene, field, log, f"{'log ' if log else ''}Jacobian determinant ({direction}, on "
                                              f"{background.GetName()})")
    node.SetAttribute(ROLE_ATTRIBUTE, JACOBIAN)
    messages = show_direction(scene, fixed_volume, moving_volume, forward, backward, forward=not backward_direction)
    views = overlay_jacobian(scene, node, background, opacity)
    centre = "0 (log)" if log else "1"
    messages.append(f"{node.GetName()} over '{background.GetName()}' in {views} slice view(s): red grew, blue shrank, "
                    f"white is no change ({centre}).")
    return node, messages
