"""Sensor encoder: a window of a high-rate sensor stream -> one feature vector.

The reference sensor is force + optical A-scan: 1026 channels sampled many times per
camera frame, cut into a window of the 650 samples that end at the frame time (SPEC
section 3). The encoder turns that window into a vector of the VL feature size so the
action expert can treat "what the camera and instruction say" and "what the sensor
says" as two condition tokens of the same width.

    sensor_window (B, W, C) --Conv1d/GELU x N (strided)--> (B, L, d_model)
        --+ positions, pre-norm Transformer--> (B, L, d_model)
        --mean over L, MLP--> (B, out_dim)
    rows with has_sensor False -> no_sensor_embedding (out_dim,)

Samples from episodes without a sensor file still train the rest of the policy; they
get a learned "no sensor" vector instead of an encoding of a zero window, so the
action expert can tell "no sensor" apart from "the sensor read zeros".

This file imports torch only: the device and the dtype come from outside.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from vla_ds.errors import ConfigError
from vla_ds.models._checks import check_transformer, require_positive_int


def conv_output_length(length: int, kernel_size: int, stride: int, num_convs: int) -> int:
    """Sequence length after ``num_convs`` Conv1d layers with padding ``kernel_size // 2``."""
    padding = kernel_size // 2
    for _ in range(num_convs):
        length = (length + 2 * padding - kernel_size) // stride + 1
    return length


class StridedConv1d(nn.Conv1d):
    """``nn.Conv1d`` (same parameters, same state-dict keys) that runs a one-sample input
    with stride 1.

    A length-1 input with odd ``kernel_size`` and padding ``kernel_size // 2`` gives one
    output sample, the centre tap, whatever the stride, so stride 1 computes the same
    thing. It sidesteps a CPU bug: the bf16 weight gradient of a strided Conv1d over a
    length-1 input is garbage or NaN in torch 2.13 (oneDNN), measured on every call. Short
    sensor windows (1 or 2 samples) reach a conv layer at length 1; before this, a third
    of the steps of a ``--sensor-window-size 1`` run were skipped as non-finite and the
    rest trained on gradient norms near 1e12.
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] == 1 and self.stride[0] > 1 and self.kernel_size[0] % 2 == 1 \
                and self.padding[0] == self.kernel_size[0] // 2 and self.dilation[0] == 1 \
                and self.padding_mode == "zeros":
            return F.conv1d(x, self.weight, self.bias, 1, self.padding, self.dilation, self.groups)
        return super().forward(x)


@dataclass
class SensorEncoderConfig:
    """Sizes of the sensor encoder. Defaults are the reference sizes (SPEC section 1).

    Attributes:
        in_channels: C, channels per sensor sample. Filled from the data at build time
            (1026 for force + A-scan).
        window_size: W, samples per window (the samples ending at the frame time). The
            learned position embedding is sized for exactly this window.
        conv_channels: output channels of each strided Conv1d (each followed by GELU).
            Every layer divides the sequence length by about ``stride``, so the
            Transformer sees a short sequence (650 -> 325 -> 163 with the defaults).
        kernel_size: Conv1d kernel size (padding ``kernel_size // 2``).
        stride: Conv1d stride, the downsampling factor of each layer.
        d_model: Transformer width. When it differs from ``conv_channels[-1]`` a Linear
            maps the conv output to it.
        num_layers: pre-norm Transformer encoder layers.
        num_heads: attention heads; must divide ``d_model``.
        dim_feedforward: hidden size of each Transformer feed-forward block.
        dropout: dropout in the Transformer and after the position embedding, in [0, 1).
        out_dim: size of the output vector; equal to the VL feature dim (3072) so both
            condition the action expert at the same width.
    """

    in_channels: int = 1026
    window_size: int = 650
    conv_channels: tuple[int, ...] = (512, 1024)
    kernel_size: int = 5
    stride: int = 2
    d_model: int = 1024
    num_layers: int = 2
    num_heads: int = 8
    dim_feedforward: int = 4096
    dropout: float = 0.1
    out_dim: int = 3072

    def __post_init__(self) -> None:
        owner = type(self).__name__
        # A JSON round trip turns the tuple into a list; accept it and store a tuple.
        if isinstance(self.conv_channels, list):
            self.conv_channels = tuple(self.conv_channels)
        if not isinstance(self.conv_channels, tuple) or not self.conv_channels:
            raise ConfigError(
                f"{owner}.conv_channels must be a non-empty list of positive integers, "
                f"got {self.conv_channels!r}"
            )
        for i, channels in enumerate(self.conv_channels):
            require_positive_int(owner, f"conv_channels[{i}]", channels)
        for name in ("in_channels", "window_size", "kernel_size", "stride", "d_model",
                     "num_layers", "num_heads", "dim_feedforward", "out_dim"):
            require_positive_int(owner, name, getattr(self, name))
        check_transformer(owner, self.d_model, self.num_heads, self.dropout)

    @property
    def downsampled_length(self) -> int:
        """L, the sequence length the Transformer sees."""
        return conv_output_length(self.window_size, self.kernel_size, self.stride,
                                  len(self.conv_channels))


class SensorEncoder(nn.Module):
    """Encodes a sensor window into one ``out_dim`` vector per sample (see module doc)."""

    def __init__(self, config: SensorEncoderConfig) -> None:
        super().__init__()
        self.config = config
        c = config

        convs: list[nn.Module] = []
        channels = c.in_channels
        for out_channels in c.conv_channels:
            convs += [
                StridedConv1d(channels, out_channels, c.kernel_size, stride=c.stride,
                              padding=c.kernel_size // 2),
                nn.GELU(),
            ]
            channels = out_channels
        self.conv = nn.Sequential(*convs)
        self.conv_to_model = (nn.Identity() if channels == c.d_model
                              else nn.Linear(channels, c.d_model))

        # Learned positions: the window length is fixed by the config (the data pipeline
        # front-pads short windows), so a table over the downsampled length suffices.
        self.pos_embedding = nn.Parameter(torch.zeros(1, c.downsampled_length, c.d_model))
        self.pos_dropout = nn.Dropout(c.dropout)
        layer = nn.TransformerEncoderLayer(
            c.d_model, c.num_heads, c.dim_feedforward, c.dropout,
            activation="gelu", batch_first=True, norm_first=True,
        )
        # enable_nested_tensor only helps with padding masks, which we never pass, and
        # warns with norm_first=True.
        self.transformer = nn.TransformerEncoder(layer, c.num_layers, enable_nested_tensor=False)
        # The pre-norm residual stream is un-normalised, so the head starts with LayerNorm.
        self.head = nn.Sequential(
            nn.LayerNorm(c.d_model),
            nn.Linear(c.d_model, c.out_dim),
            nn.GELU(),
            nn.Linear(c.out_dim, c.out_dim),
        )
        self.no_sensor_embedding = nn.Parameter(torch.zeros(c.out_dim))

        nn.init.normal_(self.pos_embedding, std=0.02)
        nn.init.normal_(self.no_sensor_embedding, std=0.02)

    def forward(self, sensor_window: Tensor, has_sensor: Tensor) -> Tensor:
        """Encode a batch of sensor windows.

        Args:
            sensor_window: (B, W, C) normalised sensor samples, any float dtype; cast to
                the module's dtype here because the engine may run the module in bf16
                while the data pipeline produces fp32.
            has_sensor: (B,) bool; False for samples from episodes without sensor data.

        Returns:
            (B, out_dim) in the module's dtype. Rows with ``has_sensor`` False equal
            ``no_sensor_embedding`` exactly and carry no gradient into the encoder.
        """
        c = self.config
        if sensor_window.ndim != 3:
            raise ValueError(
                f"sensor_window must be (B, W, C), got shape {tuple(sensor_window.shape)}"
            )
        B, W, C = sensor_window.shape
        if C != c.in_channels:
            raise ValueError(
                f"sensor_window has {C} channels but the sensor encoder expects "
                f"in_channels={c.in_channels}"
            )
        if W != c.window_size:
            raise ValueError(
                f"sensor_window has {W} samples but the sensor encoder expects "
                f"window_size={c.window_size}"
            )
        if has_sensor.shape != (B,):
            raise ValueError(
                f"has_sensor must be ({B},) to match sensor_window, got {tuple(has_sensor.shape)}"
            )
        has_sensor = has_sensor.to(device=sensor_window.device, dtype=torch.bool)

        x = sensor_window.to(self.conv[0].weight.dtype)
        # Zero the windows of sensorless rows so that whatever the pipeline put there
        # (zeros, or NaN from a bad file) cannot reach the conv weight gradients through
        # 0 * NaN. Those rows are replaced below anyway. We still run them through the
        # encoder rather than skipping it so every parameter is used on every step
        # (a batch with no sensor rows must not leave the encoder out of the graph).
        x = torch.where(has_sensor[:, None, None], x, torch.zeros((), dtype=x.dtype,
                                                                  device=x.device))

        x = self.conv(x.transpose(1, 2))                        # (B, C_last, L)
        x = self.conv_to_model(x.transpose(1, 2))               # (B, L, d_model)
        x = self.pos_dropout(x + self.pos_embedding)            # (B, L, d_model)
        x = self.transformer(x)                                 # (B, L, d_model)
        x = self.head(x.mean(dim=1))                            # (B, out_dim)

        # torch.where routes gradient only to the selected branch: sensorless rows train
        # the no-sensor embedding and nothing else.
        no_sensor = self.no_sensor_embedding.to(x.dtype).expand_as(x)  # (B, out_dim)
        return torch.where(has_sensor[:, None], x, no_sensor)
