"""``precision``: the network's convolutions in bfloat16 (autocast) or float32.

Checked: what ``auto`` resolves to (bfloat16 only on a CPU with native bfloat16, never on a GPU);
bad values are refused in one line before any work; under autocast only the convolutions change
precision (the fields come back float32, in the default layout, close to the float32 fields but
not equal to them, so autocast did take effect); register() records the precision it used and
its fields agree with float32's to a small fraction of their size; the CLI takes the option.
"""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from InverseRegLib.cli import build_parser
from InverseRegLib.device import PRECISIONS, native_bfloat16_cpu, resolve_precision
from InverseRegLib.errors import InverseRegError
from InverseRegLib.pipeline import register
from inversereg_testlib import small_model

torch.set_num_threads(1)


def test_auto_is_bfloat16_only_on_a_cpu_that_computes_it_natively():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == (torch.bfloat16 if native_bfloat16_cpu() else torch.float32)
    assert resolve_precision("auto", torch.device("cuda")) == torch.float32
    assert resolve_precision("float32", cpu) == torch.float32
    assert resolve_precision("bfloat16", cpu) == torch.bfloat16
    with pytest.raises(InverseRegError, match="unknown precision 'half': use auto, float32, bfloat16"):
        resolve_precision("half", cpu)


def _pair(shape=(32, 32, 32), seed=0):
    generator = torch.Generator().manual_seed(seed)
    source = torch.nn.functional.avg_pool3d(torch.rand(1, 1, *shape, generator=generator), 5, 1, 2)
    target = torch.nn.functional.avg_pool3d(torch.rand(1, 1, *shape, generator=generator), 5, 1, 2)
    return source, target


@pytest.mark.parametrize("preset", ["default", "paper"])
def test_autocast_changes_only_the_convolutions(preset):
    network = small_model(preset, head_scale=5e4).network
    source, target = _pair()
    with torch.no_grad():
        u32, v32, _ = network(source, target)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            u16, v16, aux = network(source, target)
    for field in (u16, v16, aux["raw_st"], aux["raw_ts"]):
        assert field.dtype == torch.float32 and field.is_contiguous()
    size = float(u32.abs().mean())
    assert size > 0.05, "the test network must move voxels"
    for low, full in ((u16, u32), (v16, v32)):
        error = float((low - full).abs().mean())
        assert 0 < error < 0.02 * size, (error, size)
    if preset == "default":  # the symmetric coupling still holds exactly in bfloat16 inference
        assert torch.equal(aux["raw_ts"], -aux["raw_st"])


def test_register_records_and_applies_the_precision(small_pair):
    fixed, moving = small_pair[:2]
    model = small_model("default", head_scale=5e4)
    full = register(fixed, moving, model, "cpu", None, precision="float32")
    low = register(fixed, moving, model, "cpu", None, precision="bfloat16")
    auto = register(fixed, moving, model, "cpu", None)
    assert full.report["precision"] == "float32" and low.report["precision"] == "bfloat16"
    expected = "bfloat16" if native_bfloat16_cpu() else "float32"
    assert auto.report["precision"] == expected
    forward32, forward16 = (sitk.GetArrayFromImage(r.forward) for r in (full, low))
    size = float(np.linalg.norm(forward32, axis=-1).mean())
    difference = float(np.linalg.norm(forward16 - forward32, axis=-1).mean())
    assert size > 0.5  # mm
    assert 0 < difference < 0.02 * size, (difference, size)
    with pytest.raises(InverseRegError, match="unknown precision"):
        register(fixed, moving, model, "cpu", None, precision="float16")


def test_cli_takes_precision():
    parser = build_parser()
    for command in (["register", "f.nii", "m.nii", "-o", "out"], ["evaluate", "data", "-o", "out"]):
        assert parser.parse_args(command).precision == "auto"
        for value in PRECISIONS:
            assert parser.parse_args(command + ["--precision", value]).precision == value
        with pytest.raises(SystemExit):
            parser.parse_args(command + ["--precision", "half"])
