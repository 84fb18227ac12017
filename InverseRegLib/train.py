"""Training: pairwise N x (N-1) sampling, Adam, resumable checkpoints, CSV logs, export.

Every step draws its pair and its augmentation from ``numpy.random.default_rng([seed, step,
rank])``, so a resumed run repeats exactly the samples an uninterrupted one would have seen: with
the model and optimiser state restored, ``--resume`` continues bit for bit on the same device.

Distributed training: start with ``torchrun --nproc_per_node N -m InverseRegLib.cli train ...``;
each process trains on its own pairs, gradients are averaged by DistributedDataParallel (NCCL on
GPUs, gloo on CPUs), and rank 0 alone writes logs, checkpoints and the model file.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .device import resolve_device
from .data import (Subject, augment_intensity, discover_subjects, load_on_grid, split_subjects,
                   synthesize_from_labels, training_grid)
from .errors import InverseRegError
from .grid import Geometry
from .imageio import write_text_atomic
from .intensity import DEFAULT_NORMALIZATION
from .losses import one_hot_labels, registration_loss
from .metrics import dice_per_label
from .model import InverseNet
from .modelfile import ModelGridSpec, atomic_torch_save, export_model
from .presets import get_preset
from .warp import warp


@dataclass
class TrainConfig:
    data_dir: str
    run_dir: str
    preset: str = "default"
    steps: int = 1000
    lr: float = 1e-4
    seed: int = 0
    spacing: float = 2.0
    val_subjects: list[str] | None = None
    val_every: int = 100
    checkpoint_every: int = 25
    augment: float = 0.5  # probability of intensity augmentation per image
    synth: float = 0.1  # probability of a label-synthesised pair (needs labels)
    weights: dict = field(default_factory=dict)  # overrides of the preset's loss weights
    ncc_window: int | None = None
    device: str = "auto"
    init: str | None = None  # an exported model file whose weights start the run (fine-tuning)
    init_regrid: bool = False  # allow ``init`` from another model grid size/spacing (same axes)
    cascade: float = 0.0  # probability of training on the source already warped by one no-grad pass
    lr_schedule: str = "constant"  # or "cosine": lr * (1 + cos(pi * step / steps)) / 2, down to 0 at ``steps``

    def to_dict(self) -> dict:
        return dict(self.__dict__)


_CONFIG_DEFAULTS = TrainConfig(data_dir="", run_dir="").to_dict()


LR_SCHEDULES = ("constant", "cosine")


def learning_rate(config: TrainConfig, step: int) -> float:
    """The learning rate of step ``step`` (0-based): ``config.lr`` throughout, or a cosine decay
    from it to 0 at ``config.steps`` (an annealed end to a fine-tuning stage). A resumed run with a
    larger step budget stretches what is left of the cosine."""
    if config.lr_schedule == "cosine":
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * min(step, config.steps) / config.steps))
    return config.lr


def _distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    return (dist.get_rank(), dist.get_world_size()) if world > 1 else (0, 1)


def _load_subjects(subjects: list[Subject], geometry: Geometry, normalization: dict):
    images, labels = [], []
    for s in subjects:
        image, label = load_on_grid(s, geometry, normalization)
        images.append(torch.from_numpy(image))
        labels.append(label)
    return images, labels


def _truncate_log(path: Path, last_step: int) -> None:
    """Drop the rows of a step CSV (first column ``step``) after ``last_step``: a run stopped
    between checkpoints logged steps that the resumed run does again."""
    if not path.exists():
        return
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    # a row cut short by a crash in the middle of an append has fewer fields than the header
    kept = rows[:1] + [row for row in rows[1:] if len(row) == len(rows[0]) and _step(row) <= last_step]
    if len(kept) == len(rows):
        return
    buffer = io.StringIO()
    csv.writer(buffer).writerows(kept)
    write_text_atomic(buffer.getvalue(), path)


def _step(row: list[str]) -> float:
    try:
        return int(row[0])
    except ValueError:  # a damaged row: dropped like one after the checkpoint
        return math.inf


def _best_recorded(path: Path) -> float:
    """The validation score recorded in an existing ``best_model.pt`` (-1 without one).

    A run stopped after writing a better best_model.pt but before its next checkpoint resumes
    with the checkpoint's older best score; taking the larger of the two keeps that better model
    from being overwritten by a worse one."""
    if not path.is_file():
        return -1.0
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        return float(payload["training"]["val_dice_model_grid"])
    except Exception:  # damaged or foreign: the checkpoint's score alone decides
        return -1.0


def _initialise_from(network: InverseNet, path: str, preset, geometry: Geometry, normalization: dict,
                     regrid: bool = False) -> dict:
    """Load an exported model's weights into ``network`` (a fresh optimiser follows).

    The model must share the network settings of ``preset`` (field type, coupling, channels,
    integration) and the model grid, else fine-tuning would silently change what the weights mean.
    Loss weights and NCC window may differ: that changes the objective, not the meaning of the
    weights, and the old ones are recorded. With ``regrid`` the grid's size and spacing may differ
    (not its axes): the network is fully convolutional, and its fields are in voxels of the model
    grid, so both heads are rescaled by old / new spacing per axis to keep the initial fields' size
    in mm."""
    from .modelfile import load_model

    loaded = load_model(path)
    if _network_settings(loaded.preset) != _network_settings(preset):
        raise InverseRegError(f"--init: {path} was trained with another preset ({loaded.preset.name}: "
                              f"another network or field type); train with the same preset or start fresh")
    same_grid = (tuple(loaded.grid.size) == tuple(geometry.size)
                 and np.allclose(loaded.grid.spacing, geometry.spacing))
    if not same_grid and not regrid:
        raise InverseRegError(f"--init: {path} has model grid {list(loaded.grid.size)} at "
                              f"{list(loaded.grid.spacing)} mm, this run uses {list(geometry.size)} at "
                              f"{list(geometry.spacing)} mm (add --init-regrid to fine-tune across grids)")
    if not np.allclose(loaded.grid.direction, geometry.direction):
        raise InverseRegError(f"--init: {path} has model grid axes {list(loaded.grid.direction)}, this run "
                              f"{list(geometry.direction)}; its fields would point along other axes")
    if loaded.normalization != normalization:
        raise InverseRegError(f"--init: {path} uses another intensity normalisation ({loaded.normalization})")
    state = loaded.network.state_dict()
    info = {}
    if not same_grid:
        # output channel c moves along grid axis c (x, y, z): a field of u voxels at the old spacing
        # is u * old / new voxels at the new one
        scale = torch.as_tensor(np.asarray(loaded.grid.spacing, dtype=np.float64)
                                / np.asarray(geometry.spacing, dtype=np.float64), dtype=torch.float32)
        # the two output convolutions, addressed as attributes so a renamed model fails loudly
        heads = [f"{decoder}.head.{name}" for decoder in ("decoder_st", "decoder_ts")
                 for name, _ in getattr(network, decoder).head.named_parameters()]
        for key in heads:
            state[key] = state[key] * scale.view(-1, *([1] * (state[key].dim() - 1)))
        info = {"init_regrid": {"from_size": list(loaded.grid.size), "from_spacing": list(loaded.grid.spacing)}}
    network.load_state_dict(state)
    previous = loaded.training.get("steps")
    if _loss_settings(loaded.preset) != _loss_settings(preset):
        # same network, another objective (e.g. less smoothing): a legitimate fine-tune, on record
        info["init_loss"] = _loss_settings(loaded.preset)
    return {"init_model": Path(path).name, "init_model_id": loaded.model_id,
            "init_steps": int(previous) if previous is not None else None, **info}


#: preset fields that only enter the training objective: the network's weights mean the same
#: whatever they are (a preset's name means nothing to the weights either)
_LOSS_FIELDS = ("weights", "ncc_window")


def _loss_settings(preset) -> dict:
    return {key: value for key, value in preset.to_dict().items() if key in _LOSS_FIELDS}


def _network_settings(preset) -> dict:
    return {key: value for key, value in preset.to_dict().items() if key not in (*_LOSS_FIELDS, "name")}


def validation_dice(network: InverseNet, images, labels, device, label_set=None) -> float | None:
    """Mean Dice over ordered validation pairs on the model grid (labels warped by nearest)."""
    pairs = [(i, j) for i in range(len(images)) for j in range(len(images)) if i != j
             and labels[i] is not None and labels[j] is not None]
    if not pairs:
        return None
    scores = []
    network.eval()
    with torch.no_grad():
        for i, j in pairs:  # i: source (moving), j: target (fixed)
            u_st, _, _ = network(images[i][None, None].to(device), images[j][None, None].to(device))
            moved = warp(torch.from_numpy(labels[i]).float()[None, None].to(device), u_st, mode="nearest")
            per_label = dice_per_label(moved[0, 0].round().long().cpu().numpy(), labels[j], label_set)
            scores.append(np.mean(list(per_label.values())))
    network.train()
    return float(np.mean(scores))


def train(config: TrainConfig, progress: bool = True, label_set=None, resume: bool = False) -> Path:
    """Train (or, with ``resume``, continue) and export ``run_dir/model.pt``; returns that path."""
    rank, world = _distributed()
    device = resolve_device(config.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    for name in ("augment", "synth", "cascade"):
        value = getattr(config, name)
        if not 0.0 <= float(value) <= 1.0:
            raise InverseRegError(f"--{name} is a probability between 0 and 1, got {value}")
    if config.lr_schedule not in LR_SCHEDULES:
        raise InverseRegError(f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}, got {config.lr_schedule!r}")
    run_dir = Path(config.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise InverseRegError(f"run folder path exists and is not a folder: {run_dir}")
    checkpoint_path = run_dir / "checkpoint.pt"
    resume_state = None
    if checkpoint_path.exists() and not resume:
        raise InverseRegError(f"{run_dir} already holds a training run; pass --resume to continue it "
                              "or choose a new run folder")
    if resume and not checkpoint_path.exists():
        raise InverseRegError(f"--resume: no checkpoint in {run_dir}")
    if checkpoint_path.exists():
        try:
            resume_state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise InverseRegError(f"cannot read checkpoint {checkpoint_path} ({type(exc).__name__}); "
                                  "it may be from another program or damaged") from None
        saved = resume_state["config"]
        # the resumed run must be the same run; only the step budget may grow
        for key in ("preset", "lr", "seed", "spacing", "augment", "synth", "weights", "ncc_window", "init",
                    "init_regrid", "cascade", "lr_schedule"):
            # a setting added after the checkpoint was written counts as its default
            if saved.get(key, _CONFIG_DEFAULTS.get(key)) != config.to_dict().get(key):
                raise InverseRegError(f"--resume: '{key}' differs from the checkpointed run "
                                      f"({saved.get(key)!r} vs {config.to_dict().get(key)!r})")
    preset = get_preset(config.preset).with_weights(**config.weights)
    if config.ncc_window:
        import dataclasses
        preset = dataclasses.replace(preset, ncc_window=int(config.ncc_window))

    subjects = discover_subjects(config.data_dir)
    train_subjects, val_subjects = split_subjects(subjects, config.val_subjects)
    normalization = dict(DEFAULT_NORMALIZATION)
    geometry = training_grid(train_subjects, config.spacing)
    train_images, train_labels = _load_subjects(train_subjects, geometry, normalization)
    val_images, val_labels = _load_subjects(val_subjects, geometry, normalization)

    torch.manual_seed(config.seed)
    network = InverseNet(preset).to(device)
    if device.type == "cuda":
        network = network.to(memory_format=torch.channels_last_3d)
    optimizer = torch.optim.Adam(network.parameters(), lr=config.lr)
    start_step = 0
    init_info = {}
    if config.init and resume_state is None:
        init_info = _initialise_from(network, config.init, preset, geometry, normalization, config.init_regrid)
    elif config.init:
        init_info = resume_state.get("init_info", {})
    if resume_state is not None:
        network.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        start_step = int(resume_state["step"])
    trainable = network
    if world > 1:
        trainable = torch.nn.parallel.DistributedDataParallel(
            network, device_ids=[device.index] if device.type == "cuda" else None)
    use_amp = device.type == "cuda"

    grid_spec = ModelGridSpec(geometry.size, geometry.spacing, geometry.direction)
    training_info = {
        "data": str(config.data_dir), "train_subjects": [s.name for s in train_subjects],
        "val_subjects": [s.name for s in val_subjects], "lr": config.lr, "seed": config.seed,
        "device": device.type, "world_size": world, "augment": config.augment, "synth": config.synth,
        **({"cascade": config.cascade} if config.cascade else {}),
        **({"lr_schedule": config.lr_schedule} if config.lr_schedule != "constant" else {}),
        **init_info,
    }
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(json.dumps(config.to_dict(), indent=2), run_dir / "config.json")
    log_path, val_path = run_dir / "log.csv", run_dir / "val.csv"
    if rank == 0:
        # rows after the step this run starts from (the checkpoint's, or 0 for a folder whose
        # earlier run stopped before its first checkpoint) are redone, so they must not stay
        _truncate_log(log_path, start_step)
        _truncate_log(val_path, start_step)
    pairs = [(i, j) for i in range(len(train_images)) for j in range(len(train_images)) if i != j]
    synth_ok = all(label is not None for label in train_labels)
    # the label term (weight "dice"): the training subjects' label maps carried through both fields
    use_labels = preset.weights.get("dice", 0.0) > 0
    if use_labels:
        if not synth_ok:
            missing = [s.name for s, label in zip(train_subjects, train_labels) if label is None]
            raise InverseRegError(f"--weight-dice needs a label map for every training subject; none for {missing}")
        present = set(np.unique(np.concatenate([np.unique(label) for label in train_labels]))) - {0}
        label_channels = [int(v) for v in (label_set if label_set is not None else sorted(present))]
        if not set(label_channels) & present:
            raise InverseRegError(f"--weight-dice: none of the labels {label_channels} is in the training label maps")
        train_label_tensors = [torch.from_numpy(label) for label in train_labels]

    bar = None
    if progress and rank == 0:
        from tqdm import tqdm
        bar = tqdm(total=config.steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
    elapsed = float(resume_state.get("elapsed", 0.0)) if resume_state else 0.0
    best = float(resume_state.get("best_val", -1.0)) if resume_state else -1.0
    if resume_state is not None and val_images:
        best = max(best, _best_recorded(run_dir / "best_model.pt"))
    t_last = time.perf_counter()
    network.train()

    def save_checkpoint(step: int) -> None:
        atomic_torch_save({"step": step, "model": network.state_dict(), "optimizer": optimizer.state_dict(),
                           "config": config.to_dict(), "elapsed": elapsed, "best_val": best,
                           "init_info": init_info}, checkpoint_path)

    for step in range(start_step, config.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        rng = np.random.default_rng([config.seed, step, rank])
        i, j = pairs[int(rng.integers(len(pairs)))]
        if synth_ok and rng.random() < config.synth:
            source, target = synthesize_from_labels([train_labels[i], train_labels[j]], rng, normalization)
        else:
            source, target = train_images[i], train_images[j]
            if rng.random() < config.augment:
                source = augment_intensity(source, rng, normalization)
            if rng.random() < config.augment:
                target = augment_intensity(target, rng, normalization)
        source = source[None, None].to(device)
        target = target[None, None].to(device)
        pair_labels = None
        if use_labels:
            pair_labels = (one_hot_labels(train_label_tensors[i], label_channels).to(device),
                           one_hot_labels(train_label_tensors[j], label_channels).to(device))
        if config.cascade and rng.random() < config.cascade:
            # what a second pass sees at registration (pipeline.run_network): the source after one
            # pass of the current network, so the network also learns the small residual motions
            with torch.no_grad(), torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
                first, _, _ = network(source, target)
            source = warp(source, first.float())
            if pair_labels is not None:  # the source's labels go where its voxels went
                pair_labels = (warp(pair_labels[0], first.float()), pair_labels[1])
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
            u_st, u_ts, aux = trainable(source, target)
        loss, parts = registration_loss(source, target, u_st.float(), u_ts.float(),
                                        {k: v.float() for k, v in aux.items()}, preset, labels=pair_labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        now = time.perf_counter()
        elapsed += now - t_last
        t_last = now
        done = step + 1
        if rank == 0:
            new = not log_path.exists()
            with log_path.open("a", newline="", encoding="utf-8") as handle:
                writer = csv.writer(handle)
                keys = ["loss", "ncc_st", "ncc_ts", "cycle", "smooth"] + (["dice"] if use_labels else [])
                if new:
                    writer.writerow(["step", *keys, "seconds"])
                writer.writerow([done, *[f"{parts.get(k, 0.0):.6f}" for k in keys], f"{elapsed:.1f}"])
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k: f"{v:.4f}" for k, v in parts.items() if k != "loss"})
            if val_images and (done % config.val_every == 0 or done == config.steps):
                score = validation_dice(network, val_images, val_labels, device, label_set)
                if score is not None:
                    # snapshots let a peer trained for the same number of steps be compared fairly
                    export_model(run_dir / "snapshots" / f"model_step{done:06d}.pt", network, grid_spec,
                                 normalization, {**training_info, "steps": done, "val_dice_model_grid": score})
                    with val_path.open("a", newline="", encoding="utf-8") as handle:
                        writer = csv.writer(handle)
                        if handle.tell() == 0:
                            writer.writerow(["step", "dice"])
                        writer.writerow([done, f"{score:.5f}"])
                    if score > best:
                        best = score
                        export_model(run_dir / "best_model.pt", network, grid_spec, normalization,
                                     {**training_info, "steps": done, "val_dice_model_grid": score,
                                      "seconds": round(elapsed, 1)})
            if done % config.checkpoint_every == 0 or done == config.steps:
                save_checkpoint(done)
    if bar is not None:
        bar.close()
    final = run_dir / "model.pt"
    if rank == 0:
        export_model(final, network, grid_spec, normalization,
                     {**training_info, "steps": config.steps, "seconds": round(elapsed, 1),
                      "best_val_dice_model_grid": best if best >= 0 else None})
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return final
