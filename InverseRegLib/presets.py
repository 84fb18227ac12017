"""Named configurations: network shape, field type and loss weights.

``paper`` reproduces the published method as closely as the paper allows: two decoders predicting
displacements directly, loss = -NCC both ways + cycle L1, no smoothness term.

``default`` is what we ship for real use. It keeps the same encoder and the two add/subtract
decoders, but

* each decoder predicts a stationary velocity field, and the pair is made exactly symmetric:
  ``v = (v_fwd - v_bwd) / 2``, ``φST = exp(v)``, ``φTS = exp(-v)`` (scaling and squaring). The
  backward transform is then the inverse of the forward one up to interpolation error, so
  inverse consistency no longer depends on how well the cycle term was minimised;
* a diffusion (gradient L2) penalty on the velocity keeps the field smooth, and a smooth velocity
  integrates to a diffeomorphism: folding-free in practice, not merely penalised.

``diffeo`` sits between them (two independent velocity fields + cycle + smoothness) so the effect
of the symmetric coupling can be measured separately. The benchmark in ``docs/benchmark.md``
reports what each choice costs and buys.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Preset:
    name: str
    #: ``displacement`` (paper) or ``velocity`` (integrated by scaling and squaring)
    field_type: str = "velocity"
    #: tie the two directions: v = (v_fwd - v_bwd)/2, forward exp(v), backward exp(-v)
    symmetric: bool = True
    integration_steps: int = 7
    #: integrate velocities on a grid this many times coarser, then upsample (as VoxelMorph does):
    #: the squarings dominate the cost at full resolution and a velocity needs no finer grid
    integration_downsize: int = 2
    encoder_channels: tuple[int, ...] = (32, 32, 32, 32)
    decoder_channels: tuple[int, ...] = (32, 32, 8)
    final_channels: int = 8
    #: loss weights: similarity per direction, cycle L1, smoothness of the predicted field
    weights: dict = field(default_factory=lambda: {"ncc": 1.0, "cycle": 1.0, "smooth": 1.0})
    ncc_window: int = 9

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["encoder_channels"] = list(self.encoder_channels)
        data["decoder_channels"] = list(self.decoder_channels)
        return data

    @staticmethod
    def from_dict(data: dict) -> "Preset":
        known = {f.name for f in dataclasses.fields(Preset)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown preset fields: {sorted(unknown)}")
        data = dict(data)
        for key in ("encoder_channels", "decoder_channels"):
            if key in data:
                data[key] = tuple(data[key])
        return Preset(**data)

    def with_weights(self, **weights: float) -> "Preset":
        merged = dict(self.weights)
        merged.update({k: float(v) for k, v in weights.items() if v is not None})
        return dataclasses.replace(self, weights=merged)


PRESETS: dict[str, Preset] = {
    "paper": Preset(
        name="paper",
        field_type="displacement",
        symmetric=False,
        weights={"ncc": 1.0, "cycle": 1.0, "smooth": 0.0},
    ),
    "diffeo": Preset(
        name="diffeo",
        field_type="velocity",
        symmetric=False,
        weights={"ncc": 1.0, "cycle": 1.0, "smooth": 1.0},
    ),
    "default": Preset(
        name="default",
        field_type="velocity",
        symmetric=True,
        # measured on the validation pairs (docs/benchmark.md): with smoothness 1 and a 9-voxel
        # (18 mm at 2 mm) NCC window the fields were smoother than the data needed; 0.5 and 5
        # voxels raised Dice with 0 % folding
        weights={"ncc": 1.0, "cycle": 1.0, "smooth": 0.5},
        ncc_window=5,
    ),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset '{name}'; choose one of {', '.join(PRESETS)}") from None
