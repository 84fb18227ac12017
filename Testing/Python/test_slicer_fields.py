"""The field files (forward/backward.nii.gz) as each real reader sees them: SimpleITK, ANTs and
3D Slicer's own ``vtkMRMLTransformStorageNode`` (slicer-core) must get the same displacements,
and Slicer must not warn that "the transform may be incorrect" (NIfTI intent code 1006)."""
import gzip
import struct

import numpy as np
import pytest
import SimpleITK as sitk

from InverseRegLib.fields import field_to_image
from InverseRegLib.grid import centered_grid
from InverseRegLib.imageio import write_displacement_field, write_image_atomic


def _field():
    direction = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])  # oblique axes, like a RAS NIfTI
    geometry = centered_grid((9, 11, 7), (2.0, 1.5, 3.0), direction.ravel(), (5.0, -3.0, 12.0))
    points = geometry.physical_points()
    field = np.stack([2.0 * np.sin(points[..., 1] / 7.0), -1.5 * np.cos(points[..., 2] / 5.0),
                      1.0 + 0.0 * points[..., 0]], axis=-1)
    return field_to_image(field, geometry), geometry


def _intent(path):
    return struct.unpack_from("<h", gzip.open(path).read(348), 68)[0]


@pytest.mark.parametrize("chunk_bytes,compression", [(8 << 20, "none"), (8 << 20, "fast"), (4096, "fast")])
def test_written_field_has_intent_1006_and_simpleitk_reads_the_same_values(tmp_path, chunk_bytes, compression):
    image, _ = _field()  # with 4096-byte chunks: a multi-member gzip file
    path = tmp_path / "forward.nii.gz"
    write_displacement_field(image, path, chunk_bytes=chunk_bytes, compression=compression)
    assert _intent(path) == 1006
    back = sitk.ReadImage(str(path))
    assert back.GetPixelID() == sitk.sitkVectorFloat64  # DisplacementFieldTransform takes it as read
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))
    np.testing.assert_allclose(back.GetDirection(), image.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(back.GetOrigin(), image.GetOrigin(), atol=1e-5)
    assert [p.name for p in tmp_path.iterdir()] == ["forward.nii.gz"]  # no temporary file left


def test_ants_reads_the_same_values(tmp_path):
    ants = pytest.importorskip("ants")
    image, _ = _field()
    path = tmp_path / "forward.nii.gz"
    write_displacement_field(image, path, chunk_bytes=4096, compression="fast")  # a multi-member gzip file
    read = ants.image_read(str(path))
    assert read.components == 3
    # ANTs arrays are (I, J, K, 3); SimpleITK's are (K, J, I, 3)
    np.testing.assert_allclose(read.numpy().transpose(2, 1, 0, 3), sitk.GetArrayFromImage(image), atol=1e-6)


def _slicer_read(path):
    slicer = pytest.importorskip("slicer", reason="slicer-core (cp311 manylinux wheel) is not installed")
    if not hasattr(slicer, "vtkMRMLScene"):
        pytest.skip("the 'slicer' module here is not slicer-core (no vtkMRMLScene)")
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLGridTransformNode")
    storage = scene.AddNewNodeByClass("vtkMRMLTransformStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node) == 1
    messages = storage.GetUserMessages()
    text = [messages.GetNthMessageText(i) for i in range(messages.GetNumberOfMessages())]
    return node, text


def test_slicer_reads_without_warning_and_maps_points_as_simpleitk(tmp_path):
    image, geometry = _field()
    path = tmp_path / "forward.nii.gz"
    write_displacement_field(image, path, chunk_bytes=4096)
    node, messages = _slicer_read(path)
    assert messages == [], messages
    grid = node.GetTransformFromParent()
    grid.SetInterpolationModeToLinear()  # ITK's interpolation (Slicer's reader picks cubic)
    itk_transform = sitk.DisplacementFieldTransform(sitk.ReadImage(str(path)))
    rng = np.random.default_rng(1)
    flip = np.array([-1.0, -1.0, 1.0])
    errors = []
    for index in rng.uniform(1.0, np.asarray(geometry.size) - 2.0, size=(40, 3)):
        lps = np.asarray(image.TransformContinuousIndexToPhysicalPoint(tuple(index)))
        expected = np.asarray(itk_transform.TransformPoint(tuple(lps))) * flip
        errors.append(np.abs(np.asarray(grid.TransformPoint(*(lps * flip))) - expected).max())
    assert max(errors) < 1e-4


def test_simpleitk_alone_writes_intent_1007_which_slicer_warns_about(tmp_path):
    # what the outputs were before write_displacement_field: the test above can fail
    image, _ = _field()
    path = tmp_path / "old.nii.gz"
    write_image_atomic(image, path)
    assert _intent(path) == 1007
    _, messages = _slicer_read(path)
    assert any("transform may be incorrect" in m for m in messages), messages


def test_bad_field_is_refused_with_one_line(tmp_path):
    from InverseRegLib.errors import InverseRegError
    scalar = sitk.Image(4, 4, 4, sitk.sitkFloat32)
    with pytest.raises(InverseRegError, match="3 components"):
        write_displacement_field(scalar, tmp_path / "f.nii.gz")
    image, _ = _field()
    with pytest.raises(InverseRegError, match="NIfTI"):
        write_displacement_field(image, tmp_path / "f.mha")
    assert list(tmp_path.iterdir()) == []
