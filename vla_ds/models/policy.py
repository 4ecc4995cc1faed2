"""VLAPolicy: Qwen2.5-VL backbone + sensor encoder + diffusion action expert.

``policy(batch)`` is the training path (returns ``{"loss", ...}``); ``predict_actions``
is the inference path (returns de-normalised action chunks). Normalisation lives here,
as fp32 buffers, so the statistics travel with every checkpoint and inference needs
nothing but the policy.

Batch keys read by :meth:`VLAPolicy.forward` (produced by ``vla_ds.data.collate`` and
``VLInputBuilder``)::

    input_ids, attention_mask  (B, L)        prompt tokens (one user turn: views, then the instruction)
    pixel_values               (P, D)        patches of every view of every sample
    image_grid_thw             (B*V, 3)
    vl_hidden                  (B, Hvl)      optional: cached pooled backbone features (replaces the four above)
    sensor_window              (B, W, C)     raw sensor values
    has_sensor                 (B,) bool
    actions                    (B, H, 7)     raw delta actions
    action_is_pad              (B, H) bool
    confidence                 (B,)
    noise, timesteps           optional: fixed diffusion noise (B, H, 7) / steps (B,) for comparable validation
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import numpy as np
import torch
from torch import nn

from vla_ds.models.action_expert import ActionExpert, ActionExpertConfig
from vla_ds.models.backbone import VLBackbone, VLInputBuilder
from vla_ds.models.sensor_encoder import SensorEncoder, SensorEncoderConfig

VL_INPUT_KEYS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")


class Normalizer(nn.Module):
    """Per-dimension mean/std normalisation with fp32 buffers (saved in every checkpoint)."""

    def __init__(self, mean: np.ndarray, std: np.ndarray):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(np.asarray(mean), dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(np.asarray(std), dtype=torch.float32))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean.float()) / self.std.float()

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() * self.std.float() + self.mean.float()


def _drop_tied_aliases(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """List each tensor once: drop the second name of tied weights (Qwen's ``lm_head`` is
    ``embed_tokens``). DeepSpeed's ``exclude_frozen_parameters`` walks ``named_parameters()``,
    which names a tied weight once, so without this the frozen 600 MB embedding of the 3B
    model would be written into every checkpoint under its ``lm_head`` alias."""
    first = {name for name, _ in module.named_parameters()}
    for name, _ in module.named_parameters(remove_duplicate=False):
        if name not in first:
            state_dict.pop(prefix + name, None)


class VLAPolicy(nn.Module):
    """The whole policy.

    Args:
        backbone: the (frozen in Stage 1) Qwen2.5-VL wrapper; its ``hidden_size`` sizes the
            action expert's VL projection.
        sensor_encoder_config, action_expert_config: head sizes; ``in_channels``,
            ``window_size``, ``vl_hidden_size`` and ``sensor_feature_dim`` are filled here
            from the backbone, the data and the sensor encoder.
        norm_stats: ``vla_ds.data.NormStats`` from the training split.
        sensor_channels, sensor_window_size: from the dataset.
        sensor_loss_weight: loss weight of samples with sensor data (x confidence).
    """

    def __init__(
        self,
        backbone: VLBackbone,
        sensor_encoder_config: SensorEncoderConfig,
        action_expert_config: ActionExpertConfig,
        norm_stats: Any,
        sensor_channels: int,
        sensor_window_size: int,
        sensor_loss_weight: float = 1.0,
    ):
        super().__init__()
        # Sizes that follow from the data and the other parts (re-validated by replace()).
        sensor_encoder_config = dataclasses.replace(
            sensor_encoder_config, in_channels=sensor_channels, window_size=sensor_window_size)
        action_expert_config = dataclasses.replace(
            action_expert_config, vl_hidden_size=backbone.hidden_size, sensor_feature_dim=sensor_encoder_config.out_dim)
        self.backbone = backbone
        self.sensor_encoder = SensorEncoder(sensor_encoder_config)
        self.action_expert = ActionExpert(action_expert_config)
        self.action_norm = Normalizer(norm_stats.action_mean, norm_stats.action_std)
        self.sensor_norm = Normalizer(norm_stats.sensor_mean, norm_stats.sensor_std)
        self.sensor_loss_weight = sensor_loss_weight
        self.input_builder: VLInputBuilder | None = None  # set for inference (predict_actions)
        self.register_state_dict_post_hook(_drop_tied_aliases)

    # -- features ---------------------------------------------------------------------

    def vl_features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Pooled backbone hidden state (B, Hvl) fp32, from the cache when the batch has it."""
        if "vl_hidden" in batch:
            return batch["vl_hidden"].float()
        # A frozen backbone needs no graph: skipping it saves the activations of 36 layers.
        frozen = not any(p.requires_grad for p in self.backbone.parameters())
        with torch.no_grad() if frozen else contextlib.nullcontext():
            return self.backbone(*(batch[k] for k in VL_INPUT_KEYS))

    def sensor_features(self, sensor_window: torch.Tensor, has_sensor: torch.Tensor) -> torch.Tensor:
        sensor = self.sensor_norm.normalize(sensor_window)  # (B, W, C)
        # Rows without sensor data get the learned no-sensor embedding inside the encoder.
        return self.sensor_encoder(sensor, has_sensor)  # (B, sensor_feature_dim)

    # -- training ---------------------------------------------------------------------

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Diffusion training loss of one batch.

        Returns ``loss`` (scalar, fp32: mean over samples of weight x masked noise MSE)
        and ``per_sample_loss`` (B,) (unweighted, detached) for validation averages.
        """
        vl_hidden = self.vl_features(batch)  # (B, Hvl)
        has_sensor = batch["has_sensor"].bool()
        sensor_features = self.sensor_features(batch["sensor_window"], has_sensor)
        actions = self.action_norm.normalize(batch["actions"])  # (B, H, 7)
        weight = batch["confidence"].float() * torch.where(
            has_sensor, torch.full_like(batch["confidence"].float(), self.sensor_loss_weight), 1.0
        )  # (B,)
        loss, per_sample = self.action_expert.compute_loss(
            actions,
            batch["action_is_pad"].bool(),
            weight,
            vl_hidden,
            sensor_features,
            noise=batch.get("noise"),
            timesteps=batch.get("timesteps"),
        )
        return {"loss": loss, "per_sample_loss": per_sample.detach(), "sample_weight": weight.detach()}

    # -- inference --------------------------------------------------------------------

    @torch.no_grad()
    def predict_actions(
        self,
        images: list[np.ndarray] | list[list[np.ndarray]],
        instruction: str | list[str],
        sensor_window: np.ndarray | torch.Tensor | None = None,
        num_inference_steps: int | None = None,
        method: str = "ddim",
        generator: torch.Generator | None = None,
    ) -> np.ndarray:
        """De-normalised action chunks.

        Single form: ``images`` is one uint8 (h, w, 3) array per view, ``instruction`` a
        string, ``sensor_window`` (W, C) or None -> returns (H, 7). Batched form: lists of
        those (sensor (B, W, C) or None) -> (B, H, 7).
        """
        if self.input_builder is None:
            raise RuntimeError("predict_actions needs policy.input_builder (VLInputBuilder) to be set")
        single = isinstance(instruction, str)
        if single:
            images, instruction = [images], [instruction]
            if sensor_window is not None:
                sensor_window = np.asarray(sensor_window)[None]
        device = next(self.action_expert.parameters()).device
        batch = {k: v.to(device) for k, v in self.input_builder(images, instruction).items()}
        bsz = len(instruction)
        w, c = self.sensor_encoder.config.window_size, self.sensor_encoder.config.in_channels
        if sensor_window is None:
            sensor = torch.zeros(bsz, w, c, device=device)
            has_sensor = torch.zeros(bsz, dtype=torch.bool, device=device)
        else:
            sensor = torch.as_tensor(np.asarray(sensor_window), dtype=torch.float32, device=device)
            has_sensor = torch.ones(bsz, dtype=torch.bool, device=device)
        vl_hidden = self.vl_features(batch)
        sensor_features = self.sensor_features(sensor, has_sensor)
        actions = self.action_expert.sample(vl_hidden, sensor_features, num_inference_steps=num_inference_steps,
                                            method=method, generator=generator)  # (B, H, 7) normalised
        out = self.action_norm.denormalize(actions).cpu().numpy()
        return out[0] if single else out
