"""The exported model file: weights plus everything needed to use them.

A model file is a ``torch.save`` dictionary readable with ``weights_only=True`` (no pickled code
runs on load)::

    format: "inversereg-model"      format_version: 1
    preset: Preset.to_dict()        grid: {size (x,y,z), spacing (mm), direction (LPS, 9)}
    normalization: {...}            state_dict: network weights
    training: {steps, data, ...}    library_version: "..."

Anything else, a truncated file, or weights that do not fit the preset is refused with one line
saying which.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__
from .errors import InverseRegError
from .model import InverseNet
from .presets import Preset

FORMAT = "inversereg-model"
FORMAT_VERSION = 1


@dataclass
class ModelGridSpec:
    size: tuple[int, int, int]  # x, y, z
    spacing: tuple[float, float, float]
    direction: tuple[float, ...]

    def to_dict(self) -> dict:
        return {"size": list(self.size), "spacing": list(self.spacing), "direction": list(self.direction)}


@dataclass
class LoadedModel:
    network: InverseNet
    preset: Preset
    grid: ModelGridSpec
    normalization: dict
    training: dict = field(default_factory=dict)
    model_id: str = ""
    path: str = ""


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """Write ``obj`` to ``path`` through a temporary file in the same folder, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    _permissions(tmp)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def export_model(path, network: InverseNet, grid: ModelGridSpec, normalization: dict, training: dict) -> None:
    state = {k: v.detach().cpu().clone() for k, v in network.state_dict().items()}
    atomic_torch_save(
        {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "library_version": __version__,
            "preset": network.preset.to_dict(),
            "grid": grid.to_dict(),
            "normalization": dict(normalization),
            "training": dict(training),
            "state_dict": state,
        },
        path,
    )


DEFAULT_MODEL_NAME = "InverseReg-default.pt"


def default_model_path() -> Path:
    """The bundled model, wherever this copy of the library was put.

    An installed wheel holds it as package data in ``InverseRegLib/resources/`` (pyproject.toml
    maps the repository's top-level ``Resources/`` there); a source checkout, an editable install
    and the Slicer module (which copies ``InverseRegLib/`` beside ``InverseReg.py`` and the model
    into ``Resources/`` beside that) keep it in ``Resources/`` beside the package.
    """
    from importlib import resources

    try:
        packaged = resources.files(__package__).joinpath("resources", DEFAULT_MODEL_NAME)
    except (ModuleNotFoundError, TypeError):  # no package context (e.g. a frozen or zipped copy)
        packaged = None
    if isinstance(packaged, Path) and packaged.is_file():
        return packaged
    return Path(__file__).resolve().parent.parent / "Resources" / DEFAULT_MODEL_NAME


def load_model(path=None, device: str | torch.device = "cpu") -> LoadedModel:
    path = Path(path) if path is not None else default_model_path()
    if not path.exists():
        raise InverseRegError(f"model file not found: {path}")
    if not path.is_file():
        raise InverseRegError(f"model path is not a file: {path}")
    data = path.read_bytes()
    model_id = hashlib.sha256(data).hexdigest()[:12]
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt or foreign files
        raise InverseRegError(
            f"cannot read model file {path}: not a PyTorch file or corrupt ({type(exc).__name__})"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise InverseRegError(f"{path} is not an InverseReg model file (no '{FORMAT}' header)")
    if int(payload.get("format_version", 0)) > FORMAT_VERSION:
        raise InverseRegError(
            f"{path} has model format {payload.get('format_version')}, newer than this library "
            f"reads ({FORMAT_VERSION}); update InverseReg"
        )
    try:
        preset = Preset.from_dict(payload["preset"])
        grid_data = payload["grid"]
        grid = ModelGridSpec(tuple(grid_data["size"]), tuple(grid_data["spacing"]), tuple(grid_data["direction"]))
        network = InverseNet(preset)
        network.load_state_dict(payload["state_dict"], strict=True)
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InverseRegError(f"model file {path} does not match its preset or is incomplete: {first}") from None
    network.eval().to(device)
    return LoadedModel(network, preset, grid, payload.get("normalization", {}), payload.get("training", {}),
                       model_id, str(path))


def _permissions(path) -> None:
    """mkstemp makes files private (0600); outputs get the usual mode for new files instead."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
