"""Input problems as one sentence each (the Register button's tooltip), or None."""
from __future__ import annotations

from typing import Optional


def volume_problem(node, role: str) -> Optional[str]:
    if node is None:
        return f"Select a {role} volume."
    if node.IsA("vtkMRMLLabelMapVolumeNode"):
        return f"The {role} volume '{node.GetName()}' is a label map; select an image (label maps go in Labels)."
    image = node.GetImageData()
    if image is None or image.GetNumberOfPoints() == 0:
        return f"The {role} volume '{node.GetName()}' is empty."
    if image.GetNumberOfScalarComponents() != 1:
        return (f"The {role} volume '{node.GetName()}' has {image.GetNumberOfScalarComponents()} components; "
                "a scalar volume is needed.")
    if min(image.GetDimensions()) < 4:
        return f"The {role} volume '{node.GetName()}' is not 3D (size {image.GetDimensions()})."
    low, high = image.GetScalarRange()
    if low == high:
        return f"The {role} volume '{node.GetName()}' is constant: nothing to register."
    return None


def input_problem(fixed, moving, fixed_labels=None, moving_labels=None) -> Optional[str]:
    """The first problem that prevents registering, as a sentence, or None."""
    problem = volume_problem(fixed, "fixed") or volume_problem(moving, "moving")
    if problem:
        return problem
    if fixed == moving:
        return "The fixed and moving volumes are the same volume: choose two different volumes."
    if bool(fixed_labels) != bool(moving_labels):
        return "Give both label maps (fixed and moving) or neither."
    return None


def torch_available() -> bool:
    """Whether torch can be imported, found without importing it (Slicer's extension build
    machines have none, and importing it costs seconds)."""
    import importlib.util
    return importlib.util.find_spec("torch") is not None
