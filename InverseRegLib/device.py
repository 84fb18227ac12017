"""Choosing the compute device: ``auto`` takes a CUDA GPU when there is one, else the CPU."""
from __future__ import annotations

import torch

from .errors import InverseRegError


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InverseRegError("a CUDA GPU was asked for but none is available; use device 'cpu'")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise InverseRegError(f"unknown device '{name}': use auto, cpu or cuda")
