"""Tests written to kill mutants that survived a mutation-testing run (docs/mutation_testing.md):
each names the behaviour the surviving mutant changed without any test noticing."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from InverseRegLib.metrics import bir, resolve_labels
from InverseRegLib.warp import integrate_velocity, resize_displacement, warp


def test_label_zero_is_a_valid_label_number():
    """Documented: whole numbers >= 0 (mutants `number <= 0` / `number < 1` survived)."""
    assert resolve_labels("0,2") == [0, 2]
    assert resolve_labels([0]) == [0]


def test_bir_without_a_labelled_target_says_so():
    with pytest.raises(ValueError, match="^target label map has no labelled voxels$"):
        bir(np.array([1, 2]), np.array([0, 0]))


def test_warp_on_an_axis_of_two_voxels_moves_by_whole_voxels():
    """A one-voxel shift on a 2-voxel axis takes the second voxel's value exactly (mutant:
    `clamp(scale, min=2.0)` in voxel_to_normalized, which halves the step on such axes)."""
    image = torch.tensor([3.0, 7.0]).view(1, 1, 2, 1, 1).expand(1, 1, 2, 3, 3).contiguous()
    shift = torch.zeros(1, 3, 2, 3, 3)
    shift[:, 2] = 1.0  # channel 2 is z, the array axis of length 2
    moved = warp(image, shift)
    assert torch.allclose(moved[0, 0, 0], torch.full((3, 3), 7.0))
    assert torch.allclose(moved[0, 0, 1], torch.zeros(3, 3))  # beyond the grid: zero padding


def test_warp_takes_an_image_of_another_float_type_than_the_field():
    """float64 image, float32 field (mutant: `image.to(None)` makes grid_sample refuse)."""
    image = torch.arange(64, dtype=torch.float64).view(1, 1, 4, 4, 4)
    out = warp(image, torch.zeros(1, 3, 4, 4, 4))
    assert out.dtype == torch.float32 and torch.equal(out, image.float())


def test_negative_integration_steps_are_refused_with_the_value():
    with pytest.raises(ValueError, match=r"^steps must be >= 0, got -1$"):
        integrate_velocity(torch.zeros(1, 3, 4, 4, 4), steps=-1)


@pytest.mark.parametrize("old,new,factor", [(2, 4, 3.0), (1, 4, 3.0), (5, 9, 2.0)])
def test_resize_displacement_keeps_the_physical_length_on_short_axes(old, new, factor):
    """With align_corners an axis of n samples spans n - 1 voxel steps, so one voxel on an axis
    of 2 samples is 3 voxels on 4 samples (an axis of 1 sample has no extent: its displacement is
    scaled as if it had one step). Mutants: `max(old - 1, 2)` in the factors."""
    field = torch.ones(1, 3, old, old, old)
    resized = resize_displacement(field, (new, new, new))
    assert resized.shape == (1, 3, new, new, new)
    assert torch.allclose(resized, torch.full_like(resized, factor))


def test_files_are_staged_in_a_hidden_folder_inside_the_output_folder(tmp_path):
    """While a run writes, the output folder shows one new entry, a hidden staging folder, and
    each file is written inside it: same file system as the final names, so the renames that put
    the files in place cannot fail half-way across devices (mutants: mkdtemp without the prefix,
    or without dir=outdir)."""
    from InverseRegLib.outputs import STAGING_PREFIX, write_result
    from InverseRegLib.pipeline import register
    from InverseRegLib.synthetic import make_pair
    from inversereg_testlib import small_model

    fixed, moving, _, _ = make_pair(size=(24, 28, 24), spacing=(6.8, 6.8, 6.8), seed=3)
    result = register(fixed, moving, small_model("default"), "cpu", None, passes=1)
    outdir = tmp_path / "out"
    seen = {}

    def probe(path):
        seen["path"] = path
        seen["entries"] = sorted(p.name for p in outdir.iterdir())
        path.write_text("probe\n")

    written = write_result(result, outdir, [], extra={"probe.txt": probe})
    assert len(seen["entries"]) == 1 and seen["entries"][0].startswith(STAGING_PREFIX)
    assert seen["path"].parent.parent.parent == outdir  # outdir/<staging>/new/probe.txt
    assert written["probe"] == outdir / "probe.txt" and (outdir / "probe.txt").read_text(encoding="utf-8") == "probe\n"
    # the returned paths are keyed by file name without its extensions (mutants of that split)
    assert list(written) == ["forward", "backward", "moving_warped", "fixed_warped", "probe", "report"]
    assert written["forward"] == outdir / "forward.nii.gz" and written["report"] == outdir / "report.json"
    assert not any(p.name.startswith(".") for p in outdir.iterdir())
