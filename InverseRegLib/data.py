"""Training data: discovering subjects, putting them on the model grid, augmenting intensities.

A data folder holds NIfTI/NRRD/MHA images, with optional label maps matched by name
(``img_XX.nii.gz`` with ``seg_XX.nii.gz``), or a ``manifest.csv`` with columns
``image,label`` (paths relative to the folder; ``label`` may be empty).
"""
from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from .errors import InverseRegError
from .grid import Geometry, centered_grid, intensity_center, resample_to
from .imageio import read_image, read_label
from .intensity import normalize

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


@dataclass(frozen=True)
class Subject:
    name: str
    image: Path
    label: Path | None


def _strip_suffix(name: str) -> str:
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def discover_subjects(data_dir) -> list[Subject]:
    """Subjects of a data folder, sorted by name (see the module docstring for the layout)."""
    root = Path(data_dir)
    if not root.is_dir():
        raise InverseRegError(f"data folder not found: {root}")
    manifest = root / "manifest.csv"
    subjects: list[Subject] = []
    if manifest.exists():
        with manifest.open(newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                if "image" not in row:
                    raise InverseRegError(f"{manifest} needs an 'image' column")
                image = root / row["image"]
                label = root / row["label"] if row.get("label") else None
                subjects.append(Subject(_strip_suffix(Path(row["image"]).name), image, label))
    else:
        files = sorted(p for p in root.iterdir() if p.name.endswith(IMAGE_SUFFIXES))
        labels = {}
        for p in files:
            match = re.match(r"(seg|label|labels)_(.+)", _strip_suffix(p.name))
            if match:
                labels[match.group(2)] = p
        for p in files:
            stem = _strip_suffix(p.name)
            if re.match(r"(seg|label|labels)_", stem):
                continue
            key = stem[4:] if stem.startswith("img_") else stem
            subjects.append(Subject(key, p, labels.get(key)))
    if not subjects:
        raise InverseRegError(f"no images found in {root} (expected img_*.nii.gz or manifest.csv)")
    for s in subjects:
        if not s.image.exists():
            raise InverseRegError(f"image listed for subject {s.name} not found: {s.image}")
    return sorted(subjects, key=lambda s: s.name)


def split_subjects(subjects: list[Subject], val_names: list[str] | None) -> tuple[list[Subject], list[Subject]]:
    """Training and validation subjects; by default the last two when there are at least six."""
    if val_names is None:
        val_names = [s.name for s in subjects[-2:]] if len(subjects) >= 6 else []
    unknown = set(val_names) - {s.name for s in subjects}
    if unknown:
        raise InverseRegError(f"validation subjects not in the data folder: {sorted(unknown)}")
    train = [s for s in subjects if s.name not in val_names]
    val = [s for s in subjects if s.name in val_names]
    if len(train) < 2:
        raise InverseRegError(f"need at least 2 training subjects, got {len(train)}")
    return train, val


def training_grid(subjects: list[Subject], spacing: float, divisor: int = 16) -> Geometry:
    """The model grid for a data set: the first image's orientation and field of view at
    ``spacing`` mm (size rounded up to a multiple of ``divisor``), centred on the mean intensity
    centre of the subjects, which is where registration later centres it on a fixed image."""
    first = read_image(subjects[0].image)
    geometry = Geometry.of(first)
    extent = np.asarray(geometry.size) * np.asarray(geometry.spacing)
    size = tuple(int(math.ceil(e / spacing / divisor) * divisor) for e in extent)
    centers = [intensity_center(read_image(s.image)) for s in subjects]
    return centered_grid(size, (spacing,) * 3, geometry.direction, np.mean(centers, axis=0))


def load_on_grid(subject: Subject, geometry: Geometry, normalization: dict) -> tuple[np.ndarray, np.ndarray | None]:
    """Normalised image (float32) and label map (int32 or None) resampled onto ``geometry``."""
    image = read_image(subject.image)
    resampled = sitk.GetArrayFromImage(resample_to(image, geometry))
    array = normalize(resampled, normalization)
    label = None
    if subject.label is not None:
        label_image = read_label(subject.label)
        label = sitk.GetArrayFromImage(resample_to(label_image, geometry, interpolator=sitk.sitkNearestNeighbor))
        label = label.astype(np.int32)
    return array, label


def _smooth_random_field(rng: np.random.Generator, shape, control: int = 4, scale: float = 0.3) -> torch.Tensor:
    coarse = torch.from_numpy(rng.normal(0.0, scale, size=(1, 1, control, control, control)).astype(np.float32))
    return F.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)[0, 0]


def augment_intensity(image: torch.Tensor, rng: np.random.Generator, normalization: dict) -> torch.Tensor:
    """Random gamma, smooth multiplicative bias, blur-free Gaussian noise; renormalised.

    ``image`` is a normalised (D, H, W) tensor; the result is normalised the same way so training
    sees the input distribution registration will see.
    """
    x = image.clamp(min=0.0) ** float(np.exp(rng.normal(0.0, 0.25)))
    x = x * torch.exp(_smooth_random_field(rng, x.shape))
    x = x + float(rng.uniform(0.0, 0.03)) * torch.from_numpy(rng.standard_normal(x.shape).astype(np.float32))
    x = torch.where(image > 0, x, torch.zeros_like(x))  # keep the background at zero
    return torch.from_numpy(normalize(x.numpy(), normalization))


def synthesize_from_labels(labels: list[np.ndarray], rng: np.random.Generator, normalization: dict) -> list[torch.Tensor]:
    """Images of a random contrast drawn from label maps (SynthMorph's idea), one shared
    label-to-intensity table for the pair so the similarity loss still compares like with like."""
    top = int(max(l.max() for l in labels)) + 1
    table = rng.uniform(0.0, 1.0, size=top).astype(np.float32)
    table[0] = 0.0
    out = []
    for label in labels:
        x = torch.from_numpy(table[label])
        x = x + 0.03 * torch.from_numpy(rng.standard_normal(x.shape).astype(np.float32))
        x = torch.where(torch.from_numpy(label > 0), x, torch.zeros_like(x))
        sigma = float(rng.uniform(0.3, 1.0))
        x = _blur(x, sigma)
        x = x * torch.exp(_smooth_random_field(rng, x.shape, scale=0.2))
        out.append(torch.from_numpy(normalize(x.numpy(), normalization)))
    return out


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(2 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = kernel / kernel.sum()
    y = x[None, None]
    for dim in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + dim] = kernel.numel()
        padding = [0, 0, 0]
        padding[dim] = radius
        y = F.conv3d(y, kernel.view(shape), padding=tuple(padding))
    return y[0, 0]
