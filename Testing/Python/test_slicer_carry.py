"""Scene functions after Register (issue 15, item 5) on Slicer's real MRML (slicer-core): label
maps, segmentations and markups carried between the volumes, Jacobian volumes with a colour table
centred on no change.

Inputs enter the scene through Slicer's own storage nodes (the volume archetype reader, the
transform reader of ITK fields); results leave it through them too and are compared with what the
command line wrote for the same registration (whose Dice and SimpleITK agreement
test_labels_carry.py checks) and with SimpleITK's TransformPoint.
"""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from InverseRegLib.cli import main
from InverseRegLib.errors import InverseRegError
from InverseRegLib.jacobian import jacobian_image
from inversereg_testlib import OBLIQUE_MOVING_GRID as MOVING_GRID, RAS_FLIP as FLIP, oblique_geometry

slicer = pytest.importorskip("slicer", reason="slicer-core (Slicer's MRML in Python) is not installed")

from InverseReg.InverseRegScene import carry  # noqa: E402  (needs slicer)



@pytest.fixture(scope="module")
def case(tmp_path_factory, small_pair, model_file):
    """Files of a registration (moving on its own oblique grid) made by the command line."""
    folder = tmp_path_factory.mktemp("slicer_carry")
    fixed, moving, fixed_seg, moving_seg, _ = small_pair
    onto = lambda image, nearest: sitk.Resample(  # noqa: E731
        image, MOVING_GRID.reference_image(), sitk.Transform(), sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear,
        0.0, sitk.sitkInt16 if nearest else sitk.sitkFloat32)
    files = {"fixed": fixed, "moving": onto(moving, False), "fixed_seg": sitk.Cast(fixed_seg, sitk.sitkInt16),
             "moving_seg": onto(moving_seg, True)}
    paths = {}
    for name, image in files.items():
        paths[name] = folder / f"{name}.nii.gz"
        sitk.WriteImage(image, str(paths[name]))
    out = folder / "out"
    assert main(["register", str(paths["fixed"]), str(paths["moving"]), "-o", str(out), "--model", str(model_file),
                 "--device", "cpu", "--no-affine", "--passes", "1", "--progress", "none",
                 "--fixed-seg", str(paths["fixed_seg"]), "--moving-seg", str(paths["moving_seg"])]) == 0
    paths["out"] = out
    return paths


def load_volume(scene, path, label=False):
    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode" if label else "vtkMRMLScalarVolumeNode", path.name)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.ReadData(node) == 1
    return node


def load_transform(scene, path):
    node = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", path.name)
    storage = slicer.vtkMRMLTransformStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.ReadData(node) == 1
    return node


def save_volume(scene, node, path) -> sitk.Image:
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.WriteData(node) == 1
    return sitk.ReadImage(str(path))


@pytest.fixture()
def scene(case):
    scene = slicer.vtkMRMLScene()
    nodes = {name: load_volume(scene, case[name], label=name.endswith("seg"))
             for name in ("fixed", "moving", "fixed_seg", "moving_seg")}
    nodes["forward_node"] = load_transform(scene, case["out"] / "forward.nii.gz")
    nodes["backward_node"] = load_transform(scene, case["out"] / "backward.nii.gz")
    return scene, nodes


def same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    return (a.GetSize() == b.GetSize() and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-3)
            and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-4)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-4))


@pytest.mark.parametrize("through", ["files", "nodes"])
def test_label_maps_go_both_ways_as_the_command_line_carries_them(scene, case, tmp_path, through):
    """A label map on the moving volume lands on the fixed grid (forward), one on the fixed volume
    on the moving grid (backward), the field chosen by the label map's grid; saved by Slicer, each
    equals the command line's carried map, with the fields read from the files or taken from the
    grid transform nodes Slicer's reader made."""
    scene, nodes = scene
    forward, backward = ((case["out"] / "forward.nii.gz", case["out"] / "backward.nii.gz") if through == "files"
                         else (nodes["forward_node"], nodes["backward_node"]))
    for label, expected_name, grid in (("moving_seg", "moving_seg_warped", "fixed"),
                                       ("fixed_seg", "fixed_seg_warped", "moving")):
        node = carry.carry_label_map_between(scene, nodes[label], nodes["fixed"], nodes["moving"], forward, backward)
        assert node.IsA("vtkMRMLLabelMapVolumeNode") and node.GetScene() is scene
        saved = save_volume(scene, node, tmp_path / f"{label}_{through}.nrrd")
        expected = sitk.ReadImage(str(case["out"] / f"{expected_name}.nii.gz"))
        assert same_grid(saved, sitk.ReadImage(str(case[grid])))
        agreement = np.mean(sitk.GetArrayFromImage(saved) == sitk.GetArrayFromImage(expected))
        assert agreement > 0.9999, agreement


def test_field_from_grid_transform_node_is_the_file(scene, case):
    """Slicer's reader turns the LPS file into a RAS grid; converting back gives the file's values."""
    scene, nodes = scene
    ours = carry.field_from_grid_transform(nodes["forward_node"])
    file = sitk.Cast(sitk.ReadImage(str(case["out"] / "forward.nii.gz")), sitk.sitkVectorFloat64)
    assert same_grid(ours, file)
    assert np.abs(sitk.GetArrayFromImage(ours) - sitk.GetArrayFromImage(file)).max() < 1e-5


def test_bad_label_maps_are_refused(scene, case, tmp_path):
    scene, nodes = scene
    third = oblique_geometry((30, 30, 30), (4.0, 4.0, 4.0), degrees=30.0)
    image = sitk.Resample(sitk.ReadImage(str(case["moving_seg"])), third.reference_image(), sitk.Transform(),
                          sitk.sitkNearestNeighbor, 0, sitk.sitkInt16)
    sitk.WriteImage(image, str(tmp_path / "third.nii.gz"))
    sitk.WriteImage(image * 0, str(tmp_path / "empty.nii.gz"))
    sitk.WriteImage(sitk.ReadImage(str(case["moving_seg"])) * 0, str(tmp_path / "empty_on_moving.nii.gz"))
    with pytest.raises(InverseRegError, match="on neither the fixed volume's nor the moving"):
        carry.carry_label_map_between(scene, load_volume(scene, tmp_path / "third.nii.gz", True), nodes["fixed"],
                                      nodes["moving"], nodes["forward_node"], nodes["backward_node"])
    with pytest.raises(InverseRegError, match="is empty"):
        carry.carry_label_map_between(scene, load_volume(scene, tmp_path / "empty_on_moving.nii.gz", True),
                                      nodes["fixed"], nodes["moving"], nodes["forward_node"], nodes["backward_node"])
    with pytest.raises(InverseRegError, match="not on 'moving.nii.gz'"):  # the wrong field for the target
        carry.carry_label_map(scene, nodes["fixed_seg"], nodes["forward_node"], nodes["moving"])


def test_segmentation_goes_to_the_other_volume_keeping_names(scene, case, tmp_path):
    """A segmentation made (by Slicer's logic) from the moving label map, carried to the fixed
    volume: exported there by Slicer, it equals the command line's carried label map, segment by
    segment, and the segments keep their names and colours."""
    scene, nodes = scene
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "atlas")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(nodes["moving"])
    assert logic.ImportLabelmapToSegmentationNode(nodes["moving_seg"], segmentation)
    ids = _segment_ids(segmentation)
    for index, segment_id in enumerate(ids):
        segment = segmentation.GetSegmentation().GetSegment(segment_id)
        segment.SetName(f"structure {segment.GetLabelValue()}")
        segment.SetColor(index / len(ids), 0.5, 1.0 - index / len(ids))
    # the source volume found from the segmentation's reference geometry (the moving volume)
    carried = carry.carry_segmentation(scene, segmentation, None, nodes["fixed"], nodes["moving"],
                                       nodes["forward_node"], nodes["backward_node"])
    expected = sitk.GetArrayFromImage(sitk.ReadImage(str(case["out"] / "moving_seg_warped.nii.gz")))
    exported = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "check")
    carried_ids = _segment_ids(carried)
    names = [carried.GetSegmentation().GetSegment(i).GetName() for i in carried_ids]
    assert sorted(names) == sorted(f"structure {v}" for v in np.unique(expected) if v != 0)
    assert logic.ExportSegmentsToLabelmapNode(carried, _string_array(carried_ids), exported, nodes["fixed"],
                                              slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
    values = sitk.GetArrayFromImage(carry.volume_to_image(exported))  # segment i -> i + 1
    lookup = np.zeros(len(carried_ids) + 1, dtype=np.int64)
    for i, segment_id in enumerate(carried_ids):
        lookup[i + 1] = int(carried.GetSegmentation().GetSegment(segment_id).GetName().split()[-1])
        source = segmentation.GetSegmentation().GetSegment(ids[[segmentation.GetSegmentation().GetSegment(s).GetName()
                                                                for s in ids].index(names[i])])
        assert np.allclose(carried.GetSegmentation().GetSegment(segment_id).GetColor(), source.GetColor())
    assert np.mean(lookup[values] == expected) > 0.9999
    orphan = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "orphan")
    assert logic.ImportLabelmapToSegmentationNode(nodes["moving_seg"], orphan)
    with pytest.raises(InverseRegError, match="say which volume"):
        carry.carry_segmentation(scene, orphan, None, nodes["fixed"], nodes["moving"], nodes["forward_node"],
                                 nodes["backward_node"])


def _segment_ids(node) -> list[str]:
    ids = slicer.vtkStringArray() if hasattr(slicer, "vtkStringArray") else __import__("vtk").vtkStringArray()
    node.GetSegmentation().GetSegmentIDs(ids)
    return [ids.GetValue(i) for i in range(ids.GetNumberOfValues())]


def _string_array(values):
    import vtk
    array = vtk.vtkStringArray()
    for value in values:
        array.InsertNextValue(value)
    return array


def test_markups_move_through_the_other_field(scene, case):
    """Fiducials on the fixed volume go into moving space through forward (and those on the moving
    volume into fixed space through backward) where SimpleITK's TransformPoint puts them (RAS in
    the scene, LPS in ITK)."""
    scene, nodes = scene
    for field_name, grid in (("forward", "fixed"), ("backward", "moving")):
        image = sitk.ReadImage(str(case[grid]))
        rng = np.random.default_rng(len(field_name))
        index = rng.uniform(2.0, np.asarray(image.GetSize()) - 3.0, size=(8, 3))
        lps = np.array([image.TransformContinuousIndexToPhysicalPoint(tuple(i)) for i in index])
        markups = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", f"on {grid}")
        for k, p in enumerate(lps * FLIP):
            markups.AddControlPoint(float(p[0]), float(p[1]), float(p[2]), f"P{k}")
        moved = carry.carry_markups(scene, markups, nodes[f"{field_name}_node"])
        field = sitk.Cast(sitk.ReadImage(str(case["out"] / f"{field_name}.nii.gz")), sitk.sitkVectorFloat64)
        transform = sitk.DisplacementFieldTransform(field)
        expected = np.array([transform.TransformPoint(tuple(p)) for p in lps]) * FLIP
        got = np.zeros((8, 3))
        for k in range(8):
            position = [0.0, 0.0, 0.0]
            moved.GetNthControlPointPosition(k, position)
            got[k] = position
            assert moved.GetNthControlPointLabel(k) == f"P{k}"
        assert np.abs(got - lps * FLIP).max() > 0.5  # the field moves them
        assert np.abs(got - expected).max() < 1e-4


@pytest.mark.parametrize("log", [False, True])
def test_jacobian_volume_is_centred_on_no_change(scene, case, log):
    """The Jacobian volume holds the library's determinant on the field's grid; its display maps
    no change (1, or 0 for log) to white, growth to red and shrinkage to blue, as Slicer's own
    display pipeline renders it."""
    scene, nodes = scene
    node = carry.jacobian_volume(scene, nodes["forward_node"], log=log)
    values = sitk.GetArrayFromImage(carry.volume_to_image(node))
    field = sitk.ReadImage(str(case["out"] / "forward.nii.gz"))
    expected = sitk.GetArrayFromImage(jacobian_image(sitk.Cast(field, sitk.sitkVectorFloat64), log))
    assert np.abs(values - expected).max() < 1e-5
    display = node.GetDisplayNode()
    assert display.GetLevel() == pytest.approx(0.0 if log else 1.0)
    # render three probe values through Slicer's scalar display pipeline
    import vtk
    centre = 0.0 if log else 1.0
    probes = np.array([centre, centre + 0.9 * carry.JACOBIAN_HALF_RANGE[log],
                       centre - 0.9 * carry.JACOBIAN_HALF_RANGE[log]], dtype=np.float32)
    probe = vtk.vtkImageData()
    probe.SetDimensions(3, 1, 1)
    from vtk.util import numpy_support
    probe.GetPointData().SetScalars(numpy_support.numpy_to_vtk(probes, deep=True))
    producer = vtk.vtkTrivialProducer()
    producer.SetOutput(probe)
    display.SetInputImageDataConnection(producer.GetOutputPort())
    display.GetOutputImageDataConnection().GetProducer().Update()
    rgba = numpy_support.vtk_to_numpy(display.GetOutputImageData().GetPointData().GetScalars()).reshape(3, -1)
    white, red, blue = rgba[0, :3].astype(int), rgba[1, :3].astype(int), rgba[2, :3].astype(int)
    assert white.min() > 240, white
    assert red[0] > 150 and red[2] < 120, red
    assert blue[2] > 150 and blue[0] < 120, blue


def test_overlay_jacobian_in_every_slice_view(scene):
    """One call puts the Jacobian volume over its volume in each slice view (three composite
    nodes, as the application's layout has) at the given opacity, keeping the label layer."""
    scene, nodes = scene
    composites = []
    for _ in range(3):
        composite = slicer.vtkMRMLSliceCompositeNode()
        scene.AddNode(composite)
        composite.SetLabelVolumeID(nodes["fixed_seg"].GetID())
        composites.append(composite)
    node = carry.jacobian_volume(scene, nodes["forward_node"])
    assert carry.overlay_jacobian(scene, node, nodes["fixed"], 0.6) == 3
    for composite in composites:
        assert composite.GetForegroundVolumeID() == node.GetID()
        assert composite.GetBackgroundVolumeID() == nodes["fixed"].GetID()
        assert composite.GetForegroundOpacity() == pytest.approx(0.6)
        assert composite.GetLabelVolumeID() == nodes["fixed_seg"].GetID()
    with pytest.raises(InverseRegError, match="opacity"):
        carry.overlay_jacobian(scene, node, nodes["fixed"], 1.5)
