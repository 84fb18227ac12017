"""Train the PyTorch VoxelMorph peer on exactly what InverseNet is trained on, for the benchmark.

Same data folder and train/validation split, same model grid (``InverseRegLib.data.training_grid``
at ``--spacing`` mm: 80x96x80 for the shared brains at 2 mm), same intensity normalisation, same
pair and augmentation stream (``numpy.random.default_rng([seed, step, 0])`` per step, exactly as
``InverseRegLib.train`` draws them: pair from the N x (N-1) ordered training pairs, a
label-synthesised pair with probability ``--synth``, otherwise ``augment_intensity`` on each image
with probability ``--augment``), same optimiser (Adam), learning rate, seed and step budget.

The network and loss are VoxelMorph's own (PyPI ``voxelmorph`` >= 0.3, the PyTorch rewrite):

* ``voxelmorph.nn.models.VxmPairwise`` -- the 0.3 successor of ``VxmDense`` (``VxmDense`` no longer
  exists in the package) -- configured as ``VxmDense``'s defaults: U-Net features
  encoder (16, 32, 32, 32), decoder (32, 32, 32, 32), a diffeomorphic stationary velocity field
  integrated with 7 scaling-and-squaring steps, unidirectional (``bidir=False``);
* loss ``-NCC(moved, fixed) + lambda * Grad_l2(velocity)`` with neurite's ``NCC`` (window 9, the
  squared local correlation VoxelMorph has always used) and ``SpatialGradient('l2')``, and
  ``lambda = 1``: the VoxelMorph README ("for the CC loss function, we found a reg parameter of 1
  to work best").

VoxelMorph registers one direction per network pass (moving -> fixed); the benchmark runs it twice.

Resumable (``--resume``), one model file per 100 steps in ``snapshots/`` (so a run compared with a
given InverseNet snapshot uses the same step count) and ``model.pt`` at the end::

    OMP_NUM_THREADS=1 python benchmarks/train_voxelmorph.py --data /work/shared/data/brains \
        --out /work/runs/voxelmorph_2mm --steps 800 --lr 3e-4 --seed 0 --threads 1

The functions :func:`load_vxm` and :func:`vxm_field_mm` are what ``benchmarks/benchmark.py`` uses
to register with the trained peer at full resolution.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

FORMAT = "voxelmorph-benchmark-model"
#: VxmDense's default U-Net (voxelmorph <= 0.2 ``default_unet_features``: encoder, decoder); the
#: 0.3 ``BasicUNet`` has one conv per level, so the three extra full-resolution convs of the old
#: decoder (32, 16, 16) are not representable and are left out
DEFAULT_FEATURES = [[16, 32, 32, 32], [32, 32, 32, 32]]
DEFAULT_INT_STEPS = 7


def build_network(arch: dict):
    import voxelmorph as vxm
    return vxm.nn.models.VxmPairwise(ndim=3, source_channels=1, target_channels=1,
                                     nb_features=[list(f) for f in arch["nb_features"]],
                                     integration_steps=int(arch["integration_steps"]))


def vxm_to_ours(u: torch.Tensor) -> torch.Tensor:
    """VoxelMorph's displacement (channel c along tensor axis c: z, y, x) -> InverseRegLib's
    (channel 0 along x / W, 1 along y / H, 2 along z / D). Both are in voxels, pull convention."""
    return u.flip(1)


def predict_displacement(network, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(1, 3, D, H, W) displacement in voxels, InverseRegLib channel order: ``source`` sampled at
    ``x + u(x)`` lands on ``target``."""
    u = network(source, target, return_field_type="displacement")
    return vxm_to_ours(u)


def atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def export(path: Path, network, arch, grid, normalization, training) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save({"format": FORMAT, "arch": arch, "grid": grid, "normalization": normalization,
                 "training": training,
                 "state_dict": {k: v.detach().cpu().clone() for k, v in network.state_dict().items()}}, path)


class LoadedVxm:
    def __init__(self, network, arch, grid, normalization, training, path):
        self.network, self.arch, self.grid = network, arch, grid
        self.normalization, self.training, self.path = normalization, training, path


def load_vxm(path) -> LoadedVxm:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise SystemExit(f"{path} is not a VoxelMorph model written by benchmarks/train_voxelmorph.py")
    network = build_network(payload["arch"])
    network.load_state_dict(payload["state_dict"], strict=True)
    network.eval()
    return LoadedVxm(network, payload["arch"], payload["grid"], payload["normalization"],
                     payload.get("training", {}), str(path))


def vxm_field_mm(model: LoadedVxm, fixed, moving):
    """Register ``moving`` onto ``fixed`` (SimpleITK images, any grids) with one VoxelMorph pass.

    As InverseReg's pipeline does (without affine): the model grid is centred on the fixed image's
    intensity centre, both images are resampled into it in physical space and normalised, the
    network's voxel displacement is converted to LPS mm on the model grid and resampled in physical
    space (trilinear, border-extended) at every voxel centre of the fixed grid. Returns
    ((z, y, x, 3) float64 LPS displacement on the fixed grid, seconds in the network).
    """
    import SimpleITK as sitk
    from InverseRegLib.fields import resample_field, voxel_field_to_physical
    from InverseRegLib.grid import Geometry, centered_grid, intensity_center, resample_to
    from InverseRegLib.intensity import normalize

    spec = model.grid
    geometry = centered_grid(tuple(spec["size"]), tuple(spec["spacing"]), tuple(spec["direction"]),
                             intensity_center(fixed))
    target = normalize(sitk.GetArrayFromImage(resample_to(fixed, geometry)), model.normalization)
    source = normalize(sitk.GetArrayFromImage(resample_to(moving, geometry)), model.normalization)
    t0 = time.perf_counter()
    with torch.no_grad():
        u = predict_displacement(model.network, torch.from_numpy(source)[None, None],
                                 torch.from_numpy(target)[None, None])
    seconds = time.perf_counter() - t0
    d_mm = voxel_field_to_physical(u, geometry)
    fixed_geometry = Geometry.of(fixed)
    field = resample_field(d_mm, geometry, fixed_geometry)  # the same code path as InverseNet's fields
    return field, seconds


def validation_dice(network, images, labels, label_set) -> float | None:
    """Mean Dice over ordered validation pairs on the model grid, as InverseRegLib.train does."""
    from InverseRegLib.metrics import dice_per_label
    from InverseRegLib.warp import warp
    pairs = [(i, j) for i in range(len(images)) for j in range(len(images)) if i != j
             and labels[i] is not None and labels[j] is not None]
    if not pairs:
        return None
    scores = []
    network.eval()
    with torch.no_grad():
        for i, j in pairs:
            u = predict_displacement(network, images[i][None, None], images[j][None, None])
            moved = warp(torch.from_numpy(labels[i]).float()[None, None], u, mode="nearest")
            per_label = dice_per_label(moved[0, 0].round().long().numpy(), labels[j], label_set)
            scores.append(np.mean(list(per_label.values())))
    network.train()
    return float(np.mean(scores))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="/work/shared/data/brains")
    parser.add_argument("--out", default="/work/runs/voxelmorph_2mm")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--spacing", type=float, default=2.0)
    parser.add_argument("--val", nargs="*", default=["11", "12"])
    parser.add_argument("--augment", type=float, default=0.5)
    parser.add_argument("--synth", type=float, default=0.1)
    parser.add_argument("--reg-lambda", type=float, default=1.0, help="weight of the gradient-L2 term")
    parser.add_argument("--int-steps", type=int, default=DEFAULT_INT_STEPS)
    parser.add_argument("--ncc-window", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--checkpoint-every", type=int, default=25)
    parser.add_argument("--val-every", type=int, default=100)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    import neurite as ne
    import voxelmorph as vxm
    from InverseRegLib.data import (augment_intensity, discover_subjects, load_on_grid, split_subjects,
                                    synthesize_from_labels, training_grid)
    from InverseRegLib.intensity import DEFAULT_NORMALIZATION
    from InverseRegLib.metrics import FREESURFER_EVAL_LABELS

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint_path = out / "checkpoint.pt"
    config = {k: v for k, v in vars(args).items() if k not in ("resume", "threads", "out")}
    if checkpoint_path.exists() and not args.resume:
        raise SystemExit(f"{out} already holds a run; pass --resume")
    state = None
    if args.resume and checkpoint_path.exists():
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        for key in ("lr", "seed", "spacing", "augment", "synth", "reg_lambda", "int_steps", "ncc_window", "val"):
            if state["config"].get(key) != config.get(key):
                raise SystemExit(f"--resume: {key} differs from the checkpoint "
                                 f"({state['config'].get(key)!r} vs {config.get(key)!r})")

    subjects = discover_subjects(args.data)
    train_subjects, val_subjects = split_subjects(subjects, args.val)
    normalization = dict(DEFAULT_NORMALIZATION)
    geometry = training_grid(train_subjects, args.spacing)
    train_images, train_labels, val_images, val_labels = [], [], [], []
    for group, images, labels in ((train_subjects, train_images, train_labels), (val_subjects, val_images, val_labels)):
        for s in group:
            image, label = load_on_grid(s, geometry, normalization)
            images.append(torch.from_numpy(image))
            labels.append(label)
    arch = {"nb_features": DEFAULT_FEATURES, "integration_steps": args.int_steps,
            "network": "voxelmorph.nn.models.VxmPairwise", "voxelmorph_version": vxm.__version__,
            "neurite_version": ne.__version__}
    grid = {"size": list(geometry.size), "spacing": list(geometry.spacing), "direction": list(geometry.direction)}

    torch.manual_seed(args.seed)
    network = build_network(arch)
    optimizer = torch.optim.Adam(network.parameters(), lr=args.lr)
    ncc = ne.nn.modules.NCC(window_size=args.ncc_window)
    gradient = ne.nn.modules.SpatialGradient(penalty="l2")
    start, elapsed, best = 0, 0.0, -1.0
    if state is not None:
        network.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, elapsed, best = int(state["step"]), float(state["elapsed"]), float(state["best_val"])
    (out / "config.json").write_text(json.dumps({**config, "arch": arch, "grid": grid,
                                                 "train_subjects": [s.name for s in train_subjects],
                                                 "val_subjects": [s.name for s in val_subjects]}, indent=2))
    training = {"data": str(args.data), "train_subjects": [s.name for s in train_subjects],
                "val_subjects": [s.name for s in val_subjects], "lr": args.lr, "seed": args.seed,
                "augment": args.augment, "synth": args.synth, "reg_lambda": args.reg_lambda,
                "threads": args.threads}
    pairs = [(i, j) for i in range(len(train_images)) for j in range(len(train_images)) if i != j]
    synth_ok = all(label is not None for label in train_labels)
    log_path, val_path = out / "log.csv", out / "val.csv"
    network.train()
    t_last = time.perf_counter()

    def save_checkpoint(step):
        atomic_save({"step": step, "model": network.state_dict(), "optimizer": optimizer.state_dict(),
                     "config": config, "elapsed": elapsed, "best_val": best}, checkpoint_path)

    for step in range(start, args.steps):
        # the very same draw order as InverseRegLib.train (rank 0)
        rng = np.random.default_rng([args.seed, step, 0])
        i, j = pairs[int(rng.integers(len(pairs)))]
        if synth_ok and rng.random() < args.synth:
            source, target = synthesize_from_labels([train_labels[i], train_labels[j]], rng, normalization)
        else:
            source, target = train_images[i], train_images[j]
            if rng.random() < args.augment:
                source = augment_intensity(source, rng, normalization)
            if rng.random() < args.augment:
                target = augment_intensity(target, rng, normalization)
        source, target = source[None, None], target[None, None]
        velocity, moved = network(source, target, return_warped_source=True, return_field_type="velocity")
        similarity = ncc(moved, target).reshape(())
        smooth = gradient(velocity)
        loss = -similarity + args.reg_lambda * smooth
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss, similarity, smooth = float(loss.detach()), float(similarity.detach()), float(smooth.detach())
        now = time.perf_counter()
        elapsed += now - t_last
        t_last = now
        done = step + 1
        new = not log_path.exists()
        with log_path.open("a", newline="") as handle:
            writer = csv.writer(handle)
            if new:
                writer.writerow(["step", "loss", "ncc", "grad", "seconds"])
            writer.writerow([done, f"{float(loss):.6f}", f"{float(similarity):.6f}", f"{float(smooth):.6f}",
                             f"{elapsed:.1f}"])
        if val_images and (done % args.val_every == 0 or done == args.steps):
            score = validation_dice(network, val_images, val_labels, list(FREESURFER_EVAL_LABELS))
            if score is not None:
                export(out / "snapshots" / f"model_step{done:06d}.pt", network, arch, grid, normalization,
                       {**training, "steps": done, "val_dice_model_grid": score, "seconds": round(elapsed, 1)})
                with val_path.open("a", newline="") as handle:
                    writer = csv.writer(handle)
                    if handle.tell() == 0:
                        writer.writerow(["step", "dice"])
                    writer.writerow([done, f"{score:.5f}"])
                best = max(best, score)
            print(f"step {done}: loss {float(loss):.4f} val dice {score}", flush=True)
        elif done % 25 == 0:
            print(f"step {done}: loss {float(loss):.4f} ({elapsed / done:.1f} s/step)", flush=True)
        if done % args.checkpoint_every == 0 or done == args.steps:
            save_checkpoint(done)
    export(out / "model.pt", network, arch, grid, normalization,
           {**training, "steps": args.steps, "seconds": round(elapsed, 1)})
    print(f"done: {out / 'model.pt'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
