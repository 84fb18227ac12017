"""Tiny labelled training folders for the training tests (failure injection, resume): four
synthetic phantoms of 40^3 voxels of 4 mm, each affinely displaced (a few mm, a few % scale)."""
from __future__ import annotations

from pathlib import Path

import SimpleITK as sitk

#: (translation mm, isotropic scale) of each subject relative to the phantom
SUBJECT_MOVES = [((8.0, -6.0, 4.0), 1.0), ((-6.0, 8.0, -6.0), 0.92), ((2.0, 4.0, 10.0), 1.08),
                 ((-3.0, -5.0, 2.0), 0.97)]


def write_subjects(folder: Path) -> Path:
    """``img_XX.nii.gz`` / ``seg_XX.nii.gz`` for XX = 00..03 in ``folder``; returns it."""
    from InverseRegLib.synthetic import make_pair
    fixed, moving, fixed_seg, moving_seg = make_pair(size=(40, 40, 40), spacing=(4.0, 4.0, 4.0), seed=0,
                                                     amplitude=6.0, wavelength=60.0)
    folder.mkdir(parents=True, exist_ok=True)
    for k, (shift, scale) in enumerate(SUBJECT_MOVES):
        transform = sitk.AffineTransform(3)
        transform.SetMatrix((scale, 0, 0, 0, scale, 0, 0, 0, scale))
        transform.SetTranslation(shift)
        image = sitk.Resample(moving if k % 2 else fixed, fixed, transform, sitk.sitkLinear, 0.0)
        seg = sitk.Resample(moving_seg if k % 2 else fixed_seg, fixed, transform, sitk.sitkNearestNeighbor, 0)
        sitk.WriteImage(image, str(folder / f"img_{k:02d}.nii.gz"))
        sitk.WriteImage(seg, str(folder / f"seg_{k:02d}.nii.gz"))
    return folder


def train_argv(data: Path, run: Path, steps: int, *extra) -> list[str]:
    """``inversereg train`` arguments for a 16^3 model grid, validation on 02 and 03 every step."""
    return ["train", str(data), "-o", str(run), "--steps", str(steps), "--spacing", "10", "--quiet",
            "--device", "cpu", "--val", "02", "03", "--val-every", "1", "--labels", "2,41", *[str(e) for e in extra]]


def interrupt_training_at(monkeypatch, step: int):
    """Make training's loss raise KeyboardInterrupt (what Ctrl-C or a killed job looks like to
    the loop) on its ``step``-th call; returns the real loss function, to put back."""
    from InverseRegLib import train as train_module
    real_loss = train_module.registration_loss
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == step:
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(train_module, "registration_loss", interrupted)
    return real_loss
