"""The multiple-decoder network: one shared encoder, a forward and a backward decoder.

Shapes: the input pair is ``source, target: (B, 1, D, H, W)``; D, H, W should be divisible by 16
(four stride-2 convolutions), which the model grid guarantees. Both outputs are ``(B, 3, D, H, W)``
displacement fields in voxels (see :mod:`InverseRegLib.warp` for the axis convention).

Choices where the paper is not explicit, written down here as the issue asks:

* activations are LeakyReLU(0.2) after every convolution but the last (as in VoxelMorph, which the
  paper builds on);
* decoder block ``k`` upsamples (trilinear, x2) its input and fuses it with the encoder feature of
  the same resolution as ``cat([up, up + skip])`` (forward decoder) or ``cat([up, up - skip])``
  (backward decoder): the addition/subtraction of the paper followed by concatenation, so the
  block sees both the decoder's own features and the fused ones;
* three such blocks (32, 32, 8 channels) bring the features to 1/2 resolution; a last upsampling to
  full resolution is concatenated with the input pair, then the final convolutions (8 and 3
  channels) give the field. The 3-channel head starts at ~zero (N(0, 1e-5)) so training starts
  from the identity transform.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .presets import Preset
from .warp import integrate_velocity, resize_displacement


def _conv(in_ch: int, out_ch: int, stride: int = 1, activation: bool = True) -> nn.Module:
    layers: list[nn.Module] = [nn.Conv3d(in_ch, out_ch, 3, stride=stride, padding=1)]
    if activation:
        layers.append(nn.LeakyReLU(0.2))
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """Four 3x3x3 stride-2 convolutions on the concatenated pair; returns all resolutions."""

    def __init__(self, channels: tuple[int, ...] = (32, 32, 32, 32)):
        super().__init__()
        blocks, in_ch = [], 2
        for ch in channels:
            blocks.append(_conv(in_ch, ch, stride=2))
            in_ch = ch
        self.blocks = nn.ModuleList(blocks)

    def forward(self, pair: torch.Tensor) -> list[torch.Tensor]:
        """(B, 2, D, H, W) -> [pair, 1/2, 1/4, 1/8, 1/16 features]."""
        features = [pair]
        for block in self.blocks:
            features.append(block(features[-1]))
        return features


class Decoder(nn.Module):
    """Upsampling path fusing encoder skips by addition (``sign=+1``) or subtraction (``-1``)."""

    def __init__(self, sign: int, encoder_channels, decoder_channels, final_channels: int):
        super().__init__()
        if sign not in (1, -1):
            raise ValueError("sign must be +1 (addition) or -1 (subtraction)")
        self.sign = sign
        skips = list(encoder_channels[:-1])[::-1]  # 1/8, 1/4, 1/2
        if len(decoder_channels) != len(skips):
            raise ValueError(f"need {len(skips)} decoder blocks, got {len(decoder_channels)}")
        blocks, in_ch = [], encoder_channels[-1]
        for skip_ch, out_ch in zip(skips, decoder_channels):
            if in_ch != skip_ch:
                raise ValueError("addition/subtraction fusion needs equal channel counts")
            blocks.append(_conv(2 * in_ch, out_ch))
            in_ch = out_ch
        self.blocks = nn.ModuleList(blocks)
        self.final = _conv(in_ch + 2, final_channels)
        self.head = nn.Conv3d(final_channels, 3, 3, padding=1)
        nn.init.normal_(self.head.weight, 0.0, 1e-5)
        nn.init.zeros_(self.head.bias)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        pair, skips, h = features[0], features[1:-1][::-1], features[-1]
        for block, skip in zip(self.blocks, skips):
            up = F.interpolate(h, size=skip.shape[2:], mode="trilinear", align_corners=False)
            if up.shape[1] != skip.shape[1]:
                raise ValueError("channel mismatch in skip fusion")
            h = block(torch.cat([up, up + self.sign * skip], dim=1))
        # in the input's precision: CPU trilinear upsampling of bfloat16 is about twice as slow
        up = F.interpolate(h.to(pair.dtype), size=pair.shape[2:], mode="trilinear", align_corners=False)
        return self.head(self.final(torch.cat([up, pair], dim=1)))


def _downsample_field(field: torch.Tensor, factor: int) -> torch.Tensor:
    shape = tuple(max(s // factor, 2) for s in field.shape[2:])
    return resize_displacement(field, shape)


class InverseNet(nn.Module):
    """Encoder + forward (addition) and backward (subtraction) decoders.

    ``forward(source, target)`` returns ``(u_st, u_ts, aux)``: displacement fields of φST (on the
    target grid; warps source onto target) and φTS (warps target onto source), and a dict with the
    raw decoder outputs (``raw_st``, ``raw_ts``: displacements or velocities) that the smoothness
    loss penalises.
    """

    def __init__(self, preset: Preset):
        super().__init__()
        self.preset = preset
        if preset.field_type not in ("displacement", "velocity"):
            raise ValueError(f"field_type must be displacement or velocity, got {preset.field_type}")
        enc, dec = tuple(preset.encoder_channels), tuple(preset.decoder_channels)
        self.encoder = Encoder(enc)
        self.decoder_st = Decoder(+1, enc, dec, preset.final_channels)
        self.decoder_ts = Decoder(-1, enc, dec, preset.final_channels)

    def _exp(self, velocity: torch.Tensor) -> torch.Tensor:
        factor = self.preset.integration_downsize
        if factor <= 1:
            return integrate_velocity(velocity, self.preset.integration_steps)
        coarse = integrate_velocity(_downsample_field(velocity, factor), self.preset.integration_steps)
        return resize_displacement(coarse, tuple(velocity.shape[2:]))

    @property
    def divisor(self) -> int:
        return 2 ** len(self.preset.encoder_channels)

    def forward(self, source: torch.Tensor, target: torch.Tensor):
        if source.shape != target.shape:
            raise ValueError(f"source {tuple(source.shape)} and target {tuple(target.shape)} differ")
        bad = [s for s in source.shape[2:] if s % self.divisor]
        if bad:
            raise ValueError(f"spatial size {tuple(source.shape[2:])} must be divisible by {self.divisor}")
        features = self.encoder(torch.cat([source, target], dim=1))
        # under a caller's autocast (bfloat16 inference) only the convolutions above run in low
        # precision: the coupling and the scaling and squaring stay in the inputs' precision, and
        # in the default layout, where resampling 3-channel fields is about twice as fast as in
        # the channels-last one the convolutions prefer
        raw_st = self.decoder_st(features).to(source.dtype, memory_format=torch.contiguous_format)
        raw_ts = self.decoder_ts(features).to(source.dtype, memory_format=torch.contiguous_format)
        with torch.autocast(source.device.type, enabled=False):
            preset = self.preset
            if preset.symmetric:
                raw_st = 0.5 * (raw_st - raw_ts)
                raw_ts = -raw_st
            if preset.field_type == "velocity":  # both directions in one batch: half the calls
                u_st, u_ts = self._exp(torch.cat([raw_st, raw_ts])).chunk(2)
            else:
                u_st, u_ts = raw_st, raw_ts
        return u_st, u_ts, {"raw_st": raw_st, "raw_ts": raw_ts}
