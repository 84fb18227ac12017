"""Choosing the compute device (``auto`` takes a CUDA GPU when there is one, else the CPU) and
the precision the network's convolutions run in."""
from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from .errors import InverseRegError

if TYPE_CHECKING:  # torch is imported where it is used, so the command line's --help stays fast
    import torch


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    import torch
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


#: what ``precision`` accepts (:func:`resolve_precision`)
PRECISIONS = ("auto", "float32", "bfloat16")


def native_bfloat16_cpu() -> bool:
    """True where the CPU computes bfloat16 dot products in hardware (AVX512-BF16 or AMX), so
    oneDNN's bfloat16 convolutions are faster than float32 ones; elsewhere they are emulated and
    slower. (torch's own ``_is_mkldnn_bf16_supported`` also says yes on plain AVX512.)"""
    import torch
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check is not None and check() for check in checks)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """The dtype for the network's convolutions: ``float32``, ``bfloat16``, or ``auto``: bfloat16
    on a CPU with native bfloat16 (as OpenVINO does by default on such CPUs), float32 otherwise
    (GPUs included). Warps, field composition and integration stay float32 either way."""
    import torch
    if precision not in PRECISIONS:
        raise InverseRegError(f"unknown precision '{precision}': use {', '.join(PRECISIONS)}")
    if precision == "auto":
        return torch.bfloat16 if device.type == "cpu" and native_bfloat16_cpu() else torch.float32
    return torch.bfloat16 if precision == "bfloat16" else torch.float32


#: PyTorch's CPU allocator (c10) asks Linux for transparent huge pages for its buffers of 2 MB
#: and more when this variable is 1; it reads it once, at torch's first allocation
HUGE_PAGES_VARIABLE = "THP_MEM_ALLOC_ENABLE"


def allocate_in_huge_pages() -> bool:
    """Ask torch's CPU allocator for transparent huge pages, unless the variable is already set
    (the user's choice stands) or torch is already imported (too late: it is read once); returns
    whether this process's torch allocates so.

    Every step of a 1 mm registration allocates volumes of tens of MB, and each fresh one is
    paged in by the kernel 4 kB at a time: on this project's 2-core CPU half of ``--quality
    best``'s system time. With 2 MB pages the whole ``register`` command took 0.82x the time
    (best) and 0.94x (default), with less peak memory (docs/benchmark.md, twelfth round). Called
    by the command line (and so by the Slicer module's worker) before torch is imported; a
    Python program that imports torch itself can set the variable before it does. Where the
    kernel offers no huge pages (or on macOS and Windows) the variable changes nothing."""
    if "torch" not in sys.modules:
        os.environ.setdefault(HUGE_PAGES_VARIABLE, "1")
    return os.environ.get(HUGE_PAGES_VARIABLE) == "1"
