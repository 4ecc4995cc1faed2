"""VLAPolicy: Qwen2.5-VL backbone + sensor encoder + diffusion action expert.

``policy(batch)`` is the training path (returns ``{"loss", ...}``); ``predict_actions``
is the inference path (returns de-normalised action chunks). Normalisation lives here,
as fp32 buffers, so the statistics travel with every checkpoint and inference needs
nothing but the policy. :meth:`VLAPolicy.from_pretrained` loads an exported policy
directory (docs/policy_format.md).

Batch keys read by :meth:`VLAPolicy.forward` (produced by ``vla_ds.data.collate`` and
``VLInputBuilder``)::

    input_ids, attention_mask  (B, L)        prompt tokens (one user turn: views, then the instruction)
    pixel_values               (P, D)        patches of every view of every sample
    image_grid_thw             (B*V, 3)
    vl_hidden                  (B, Hvl)      optional: cached backbone features (replaces the four above);
                               (B, T, Hvl)   ...with action_expert.vl_conditioning "tokens"
    sensor_window              (B, W, C)     raw sensor values
    sensor_pad                 (B,) long     optional: the window's first rows that are padding (no reading yet)
    has_sensor                 (B,) bool
    actions                    (B, H, D)     raw actions (D = 7 delta pose, or the data's own)
    action_is_pad              (B, H) bool
    confidence                 (B,)
    noise, timesteps           optional: fixed diffusion noise (B, H, D) / steps (B,) for comparable validation
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vla_ds.batch import (
    ACTION_IS_PAD,
    ACTIONS,
    CONFIDENCE,
    HAS_SENSOR,
    SENSOR_PAD,
    SENSOR_WINDOW,
    VL_HIDDEN,
    VL_INPUT_KEYS,
)
from vla_ds.data.observation import SensorTransform
from vla_ds.dataclass_io import dataclass_from_dict
from vla_ds.errors import CheckpointError, ConfigError, VLAError
from vla_ds.models.action_expert import (
    ActionExpert,
    ActionExpertConfig,
    check_vl_features,
    stored_section,
)
from vla_ds.models.backbone import BackboneConfig, VLBackbone, VLInputBuilder
from vla_ds.models.finetune import FinetuneConfig
from vla_ds.models.sensor_encoder import SensorEncoder, SensorEncoderConfig

logger = logging.getLogger(__name__)


# Exported policy directory (docs/policy_format.md).
POLICY_FORMAT = "vla_ds-policy"
POLICY_FORMAT_VERSION = 2  # 2: head objective, EMA weights, action range (version 1 = a DDPM epsilon head)
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
NORM_STATS_FILE = "norm_stats.json"
ADAPTER_DIR = "adapter"
MERGED_BACKBONE_DIR = "merged_backbone"
REQUIRED_FILES = (CONFIG_FILE, NORM_STATS_FILE, WEIGHTS_FILE)
# Prefixes of the trained non-backbone parts: every tensor under them must be in model.safetensors.
HEAD_PREFIXES = ("sensor_encoder.", "action_expert.", "action_norm.", "sensor_norm.")
_NORM_KEYS = ("action_mean", "action_std", "sensor_mean", "sensor_std")
_RANGE_KEYS = ("action_min", "action_max")


class Normalizer(nn.Module):
    """Per-dimension mean/std normalisation with fp32 buffers (saved in every checkpoint).

    ``low``/``high`` (optional): the raw range of the training data, kept as buffers that
    are not saved in the state dict (they travel in the norm stats, and policies written
    before they existed load unchanged); :meth:`normalized_range` gives it in model units.
    """

    def __init__(self, mean: np.ndarray, std: np.ndarray, low: np.ndarray | None = None,
                 high: np.ndarray | None = None):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(np.asarray(mean), dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(np.asarray(std), dtype=torch.float32))
        self.has_range = low is not None and high is not None
        if self.has_range:
            self.register_buffer("low", torch.as_tensor(np.asarray(low), dtype=torch.float32), persistent=False)
            self.register_buffer("high", torch.as_tensor(np.asarray(high), dtype=torch.float32), persistent=False)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean.float()) / self.std.float()

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() * self.std.float() + self.mean.float()

    def normalized_range(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(low, high) of the training data in normalised units, or None when unknown."""
        if not self.has_range:
            return None
        return self.normalize(self.low), self.normalize(self.high)


def _drop_tied_aliases(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """List each tensor once: drop the second name of tied weights (Qwen's ``lm_head`` is
    ``embed_tokens``). DeepSpeed's ``exclude_frozen_parameters`` walks ``named_parameters()``,
    which names a tied weight once, so without this the frozen 600 MB embedding of the 3B
    model would be written into every checkpoint under its ``lm_head`` alias."""
    first = {name for name, _ in module.named_parameters()}
    for name, _ in module.named_parameters(remove_duplicate=False):
        if name not in first:
            state_dict.pop(prefix + name, None)


def derived_head_configs(sensor_encoder_config: SensorEncoderConfig, action_expert_config: ActionExpertConfig,
                         sensor_channels: int, sensor_window_size: int, vl_hidden_size: int,
                         action_dim: int | None = None) -> tuple[SensorEncoderConfig, ActionExpertConfig]:
    """The head configs with the sizes that follow from the data and the other parts filled in
    (and re-validated by ``replace``): the sensor encoder's input channels and window, the
    action expert's action dimension (the data's; None keeps the config's), VL width and
    sensor feature width. The one place that rule is written."""
    sensor = dataclasses.replace(sensor_encoder_config, in_channels=sensor_channels, window_size=sensor_window_size)
    action = dataclasses.replace(action_expert_config, vl_hidden_size=vl_hidden_size, sensor_feature_dim=sensor.out_dim,
                                 action_dim=action_dim or action_expert_config.action_dim)
    return sensor, action


class VLAPolicy(nn.Module):
    """The whole policy.

    Args:
        backbone: the (frozen in Stage 1) Qwen2.5-VL wrapper; its ``hidden_size`` sizes the
            action expert's VL projection.
        sensor_encoder_config, action_expert_config: head sizes; ``in_channels``,
            ``window_size``, ``action_dim``, ``vl_hidden_size`` and ``sensor_feature_dim``
            are filled here from the backbone, the data and the sensor encoder.
        norm_stats: ``vla_ds.data.NormStats`` from the training split; its length sets the
            action dimension D.
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
        sensor_encoder_config, action_expert_config = derived_head_configs(
            sensor_encoder_config, action_expert_config, sensor_channels, sensor_window_size, backbone.hidden_size,
            action_dim=len(norm_stats.action_mean))
        self.backbone = backbone
        self.sensor_encoder = SensorEncoder(sensor_encoder_config)
        self.action_expert = ActionExpert(action_expert_config)
        self.action_norm = Normalizer(norm_stats.action_mean, norm_stats.action_std,
                                      getattr(norm_stats, "action_min", None), getattr(norm_stats, "action_max", None))
        self.sensor_norm = Normalizer(norm_stats.sensor_mean, norm_stats.sensor_std)
        self.sensor_loss_weight = sensor_loss_weight
        self.norm_stats = norm_stats  # what the training data was: names of actions and views, instructions
        # Parsed once: it is applied to every served request with a raw state.
        self._sensor_transform = SensorTransform.stored(getattr(norm_stats, "sensor_transform", None))
        self.input_builder: VLInputBuilder | None = None  # set for inference (predict_actions)
        self.policy_config: dict[str, Any] | None = None  # config.json, when loaded by from_pretrained
        self.policy_dir: Path | None = None
        self.register_state_dict_post_hook(_drop_tied_aliases)

    # -- features ---------------------------------------------------------------------

    def vl_features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The backbone features the action expert reads, fp32, from the cache when the batch
        has them: (B, Hvl) pooled, or (B, T, Hvl) tokens (``action_expert.vl_conditioning``)."""
        if VL_HIDDEN in batch:
            features = batch[VL_HIDDEN].float()
            check_vl_features(self.action_expert.config, features)
            return features
        # A frozen backbone needs no graph: skipping it saves the activations of 36 layers.
        frozen = not any(p.requires_grad for p in self.backbone.parameters())
        with torch.no_grad() if frozen else contextlib.nullcontext():
            return self.backbone(*(batch[k] for k in VL_INPUT_KEYS), grid=self.action_expert.config.vl_grid_size)

    def sensor_features(self, sensor_window: torch.Tensor, has_sensor: torch.Tensor,
                        sensor_pad: torch.Tensor | None = None) -> torch.Tensor:
        """Sensor encoder features (B, sensor_feature_dim) of raw windows (B, W, C).

        ``sensor_pad`` (B,): how many of each window's first rows are front padding (the
        episode had no reading yet). They read 0 after normalisation, i.e. the training mean,
        not the raw zeros of the padding, which normalise to -mean/std (several standard
        deviations for an offset channel) and would enter the encoder as real readings.
        """
        sensor = self.sensor_norm.normalize(sensor_window)  # (B, W, C)
        if sensor_pad is not None:
            rows = torch.arange(sensor.shape[1], device=sensor.device)  # (W,)
            is_pad = rows[None, :] < sensor_pad.to(sensor.device)[:, None]  # (B, W)
            sensor = sensor.masked_fill(is_pad[..., None], 0.0)
        # Rows without sensor data get the learned no-sensor embedding inside the encoder.
        return self.sensor_encoder(sensor, has_sensor)  # (B, sensor_feature_dim)

    # -- training ---------------------------------------------------------------------

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Diffusion training loss of one batch.

        Returns ``loss`` (scalar, fp32: mean over samples of weight x masked noise MSE)
        and ``per_sample_loss`` (B,) (unweighted, detached) for validation averages.
        """
        vl_hidden = self.vl_features(batch)  # (B, Hvl)
        has_sensor = batch[HAS_SENSOR].bool()
        sensor_features = self.sensor_features(batch[SENSOR_WINDOW], has_sensor, batch.get(SENSOR_PAD))
        actions = self.action_norm.normalize(batch[ACTIONS])  # (B, H, D)
        weight = batch[CONFIDENCE].float() * torch.where(
            has_sensor, torch.full_like(batch[CONFIDENCE].float(), self.sensor_loss_weight), 1.0
        )  # (B,)
        loss, per_sample = self.action_expert.compute_loss(
            actions,
            batch[ACTION_IS_PAD].bool(),
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
        method: str | None = None,
        generator: torch.Generator | None = None,
        has_sensor: bool | list[bool] | np.ndarray | None = None,
        sensor_pad: int | list[int] | np.ndarray | None = None,
        initial_noise: np.ndarray | torch.Tensor | None = None,
        vl_inputs: dict[str, torch.Tensor] | None = None,
        state: dict[str, np.ndarray] | list[dict[str, np.ndarray] | None] | None = None,
    ) -> np.ndarray:
        """De-normalised action chunks.

        Single form: ``images`` is one uint8 (h, w, 3) array per view, ``instruction`` a
        string, ``sensor_window`` (W, C) raw values or None -> returns (H, D). Batched form:
        lists of those (sensor (B, W, C) or None) -> (B, H, D).

        ``num_inference_steps`` sets the sampling steps (DDIM steps of a diffusion head,
        Euler steps of a flow-matching head; default the action expert's
        ``num_inference_steps``); for a diffusion head ``method`` "ddpm" runs all T
        ancestral steps instead. Chunks stay within the training data's range per
        dimension (``ActionExpertConfig.clip_to_data_range``).
        ``generator`` (on the policy's device) fixes the initial noise: the same generator
        state gives the same chunks. ``has_sensor`` marks which samples have sensor data
        (a bool, or one per sample in the batched form); by default every sample has it
        when ``sensor_window`` is given and none does without it. Samples without it use
        the learned no-sensor embedding, as in training. ``sensor_pad`` (an int, or one per
        sample) says how many of the window's first rows are padding because the stream
        started less than W samples ago; they are read as the training mean (default 0).
        ``initial_noise`` ((H, D), or (B, H, D) in the batched form) is the sampler's starting
        noise instead of a draw from ``generator``: a chunk then depends only on its own
        inputs and noise, whatever else is in the batch (the policy server relies on it).
        ``vl_inputs``: the backbone inputs of these samples built ahead of time
        (``input_builder.batch_processed`` of each sample's ``process_views``, e.g. in
        another thread while the model was busy); ``images`` is then not read.
        ``state``, instead of ``sensor_window``: a robot's raw features, ``{feature: (T, D)}``
        of the last T frames (a list of those, or None for no sensor, in the batched form),
        made into the window by the policy's own :meth:`state_window`, the function its
        training samples were made with (policies trained on LeRobot sensor features).
        """
        if self.input_builder is None:
            raise RuntimeError("predict_actions needs policy.input_builder (VLInputBuilder) to be set")
        if state is not None:
            if sensor_window is not None or sensor_pad is not None or has_sensor is not None:
                raise ValueError("give state (raw features) or sensor_window / sensor_pad / has_sensor, not both")
            sensor_window, sensor_pad, has_sensor = self._state_windows(state, isinstance(instruction, str))
        single = isinstance(instruction, str)
        if single:
            images, instruction = [images], [instruction]
            if sensor_window is not None:
                sensor_window = torch.as_tensor(sensor_window)[None]
            if has_sensor is not None:
                has_sensor = [bool(has_sensor)]
            if sensor_pad is not None:
                sensor_pad = [int(sensor_pad)]
            if initial_noise is not None:
                initial_noise = torch.as_tensor(initial_noise)[None]
        device = next(self.action_expert.parameters()).device
        expert_config = self.action_expert.config
        if vl_inputs is None:
            if expert_config.vl_conditioning == "tokens":
                for b, views in enumerate(images):
                    if len(views) != expert_config.num_views:
                        raise ValueError(f"sample {b} has {len(views)} camera views, but this policy reads "
                                         f"{expert_config.num_views} (one token grid per view; vl_conditioning tokens)")
            vl_inputs = self.input_builder(images, instruction)
        batch = {k: v.to(device) for k, v in vl_inputs.items()}
        bsz = len(instruction)
        w, c = self.sensor_encoder.config.window_size, self.sensor_encoder.config.in_channels
        if sensor_window is None:
            sensor = torch.zeros(bsz, w, c, device=device)  # (B, W, C)
        else:
            sensor = torch.as_tensor(sensor_window, dtype=torch.float32).to(device)  # (B, W, C)
            if tuple(sensor.shape) != (bsz, w, c):
                raise ValueError(f"sensor_window has shape {tuple(sensor.shape)}, expected ({bsz}, {w}, {c}) "
                                 f"(batch, sensor window size, sensor channels of this policy)")
        if has_sensor is None:
            has_sensor = torch.full((bsz,), sensor_window is not None, dtype=torch.bool, device=device)
        else:
            has_sensor = torch.as_tensor(np.asarray(has_sensor, dtype=bool), device=device).reshape(-1)  # (B,)
            if has_sensor.numel() != bsz:
                raise ValueError(f"has_sensor has {has_sensor.numel()} values for {bsz} samples")
            if sensor_window is None and bool(has_sensor.any()):
                raise ValueError("has_sensor is True for a sample but no sensor_window was given")
        if sensor_pad is not None:
            sensor_pad = torch.as_tensor(np.asarray(sensor_pad, dtype=np.int64), device=device).reshape(-1)  # (B,)
            if sensor_pad.numel() != bsz or bool(((sensor_pad < 0) | (sensor_pad > w)).any()):
                raise ValueError(f"sensor_pad must be {bsz} counts in 0..{w} (padded rows of each window), "
                                 f"got {sensor_pad.tolist()}")
        vl_hidden = self.vl_features(batch)
        sensor_features = self.sensor_features(sensor, has_sensor, sensor_pad)
        actions = self.action_expert.sample(vl_hidden, sensor_features, num_inference_steps=num_inference_steps,
                                            method=method, generator=generator,
                                            clip_range=self.action_norm.normalized_range(),
                                            initial_noise=None if initial_noise is None
                                            else torch.as_tensor(initial_noise))  # (B, H, D) normalised
        out = self.action_norm.denormalize(actions).cpu().numpy()
        return out[0] if single else out

    @property
    def sensor_transform(self) -> SensorTransform | None:
        """How the policy makes its sensor window from raw per-frame features (recorded in
        its norm stats when it was trained on LeRobot sensor features), or None."""
        return self._sensor_transform

    def state_window(self, state: dict[str, Any], where: str = "state") -> tuple[np.ndarray, int]:
        """((W, C) float32 window, padded rows) from a robot's raw features ``{feature: (T, D)}``
        of its last T frames: the function the training samples were made with. ValueError
        names a missing or misshapen feature, or a policy without a recorded transform."""
        transform = self.sensor_transform
        if transform is None:
            raise ValueError(f"'{where}': this policy's sensor stream is not made from named raw features (it was "
                             "trained on sensor files, or exported before vla_ds recorded the transform); send the "
                             "sensor window itself")
        w = self.sensor_encoder.config.window_size
        return transform.window(transform.check(state, w, where), w)

    def _state_windows(self, state, single: bool) -> tuple[np.ndarray | None, list[int], list[bool]]:
        """predict_actions' ``state`` as (sensor windows (B, W, C), pads, has_sensor)."""
        states = [state] if single else list(state)
        w, c = self.sensor_encoder.config.window_size, self.sensor_encoder.config.in_channels
        windows, pads = np.zeros((len(states), w, c), dtype=np.float32), []
        for b, one in enumerate(states):
            if one is not None:
                windows[b], pad = self.state_window(one)
                pads.append(pad)
            else:
                pads.append(0)
        has = [one is not None for one in states]
        return (windows[0] if single else windows), (pads[0] if single else pads), (has[0] if single else has)

    # -- loading an exported policy directory ---------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        policy_dir: str | os.PathLike,
        vl_model: str | os.PathLike | None = None,
        device: str | torch.device | None = "cpu",
        dtype: str | torch.dtype | None = None,
    ) -> VLAPolicy:
        """Load a policy directory written by ``convert_checkpoint.py --to policy``.

        The layout is docs/policy_format.md. Steps, each refusing with a
        :class:`~vla_ds.errors.CheckpointError` (or ``BackboneError``) that names the file:

        1. ``config.json``, ``norm_stats.json`` and ``model.safetensors`` must exist.
        2. The backbone comes from ``vl_model`` if given, else ``merged_backbone/`` if the
           directory has one, else ``backbone.model_name_or_path`` of config.json. Unless it
           is the merged one, its :meth:`VLBackbone.fingerprint` must equal the stored
           ``backbone.fingerprint`` (the weights the policy was trained on).
        3. ``adapter/`` (LoRA) is applied with ``peft.PeftModel.from_pretrained`` on the
           generation model, unless the merged backbone (which contains it) is used.
        4. Sensor encoder and action expert are built from the stored configs and
           ``model.safetensors`` is loaded strictly: every head tensor present, no unknown
           tensor, every shape equal, finite values.

        Args:
            policy_dir: the exported directory.
            vl_model: a local Qwen2.5-VL directory or hub id to use as the base backbone
                (when the training path no longer exists, e.g. on another machine).
            device: where the policy runs (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...); None: CUDA
                if torch sees a GPU, else the CPU (the command lines' default).
            dtype: backbone weight dtype (``"bfloat16"``/``"float32"`` or the torch dtype);
                default the stored ``backbone.dtype``. The heads stay float32.

        Returns the policy in eval mode, every parameter frozen, with ``input_builder``
        set (ready for :meth:`predict_actions`) and ``policy_config`` holding config.json.
        """
        device = _checked_device(device)
        policy_dir = Path(policy_dir)
        stored = _StoredPolicy.read(policy_dir)
        config, finetune = stored.config, stored.finetune
        sensor_config, expert_config = stored.sensor_config, stored.expert_config
        use_merged, source = stored.backbone_source(vl_model)
        overrides: dict[str, Any] = {"model_name_or_path": source}
        if dtype is not None:
            overrides["dtype"] = _dtype_name(dtype)
        backbone_config = dataclasses.replace(stored.backbone_config, **overrides)

        logger.info("loading policy %s (%s, finetune %s) with VL backbone %s%s", policy_dir,
                    config.get("stage", "?"), finetune.mode, source, " (LoRA merged)" if use_merged else "")
        # A GPU gets the backbone's tensors as they are read, not via a host copy.
        backbone = VLBackbone(backbone_config, device=device if device.type == "cuda" else None)
        stored.check_fingerprint(backbone, source, use_merged)
        backbone.freeze()
        if stored.has_adapter and not use_merged:
            backbone.model = load_lora_adapter(backbone.model, policy_dir / ADAPTER_DIR)
        norm_stats = stored.norm_stats

        # Initialising the heads draws random numbers that the weights then replace; keep the
        # caller's RNG state as it was so loading a policy never changes what a seed means.
        with torch.random.fork_rng(devices=[]):
            policy = cls(backbone, sensor_config, expert_config, norm_stats,
                         sensor_channels=sensor_config.in_channels, sensor_window_size=sensor_config.window_size,
                         sensor_loss_weight=float(config.get("sensor_loss_weight", 1.0)))
        required = set(_unfrozen_layer_prefixes(policy, finetune)) if finetune.mode == "full" else set()
        load_policy_weights(policy, policy_dir / WEIGHTS_FILE, required_backbone_prefixes=required)
        _check_norm_buffers(policy, norm_stats, policy_dir)

        policy.input_builder = VLInputBuilder.from_pretrained(backbone_config)
        policy.policy_config = config
        policy.policy_dir = policy_dir
        policy.requires_grad_(False)
        return policy.to(device).eval()


# ----------------------------------------------------------------------------------------
# Exported policy directory helpers (docs/policy_format.md)


@dataclasses.dataclass
class PolicyNormStats:
    """The arrays of norm_stats.json (the fields of ``vla_ds.data.NormStats``, which this
    model file does not import): (A,) action and (C,) sensor mean/std, float64, and the
    (A,) action range when the file has it (written since vla_ds records it)."""

    action_mean: np.ndarray
    action_std: np.ndarray
    sensor_mean: np.ndarray
    sensor_std: np.ndarray
    action_min: np.ndarray | None = None
    action_max: np.ndarray | None = None
    action_names: list[str] | None = None
    action_units: list[str] | None = None
    camera_views: list[str] | None = None
    instructions: list[str] | None = None
    sensor_transform: dict | None = None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read ({exc})") from None
    except ValueError as exc:
        raise CheckpointError(f"{path}: invalid JSON ({exc})") from None


def _checked_device(device: str | torch.device | None) -> torch.device:
    """``device`` (None: CUDA if available, else the CPU) as a torch.device that this machine
    has, or one ConfigError line."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        checked = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device {str(device)!r}: not a torch device (cpu, cuda, cuda:1, ...)") from None
    if checked.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {str(device)!r}: torch sees no CUDA GPU on this machine (use cpu)")
    if checked.type == "cuda" and checked.index is not None and checked.index >= torch.cuda.device_count():
        raise ConfigError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return checked


@dataclasses.dataclass
class _StoredPolicy:
    """What a policy directory says before any weights load: its config.json sections parsed,
    its norm stats, and which backbone it needs (:meth:`VLAPolicy.from_pretrained`)."""

    policy_dir: Path
    config: dict[str, Any]
    finetune: FinetuneConfig
    backbone_config: BackboneConfig
    fingerprint: str | None
    sensor_config: SensorEncoderConfig
    expert_config: ActionExpertConfig
    norm_stats: PolicyNormStats

    @classmethod
    def read(cls, policy_dir: Path) -> _StoredPolicy:
        config = read_policy_config(policy_dir)
        config_file = policy_dir / CONFIG_FILE
        finetune = _dataclass_from_section(FinetuneConfig, config.get("finetune") or {}, "finetune", config_file)
        backbone_section = dict(config["backbone"])
        fingerprint = backbone_section.pop("fingerprint", None)
        backbone_config = _dataclass_from_section(BackboneConfig, backbone_section, "backbone", config_file)
        sensor_config = _dataclass_from_section(SensorEncoderConfig, config["sensor_encoder"], "sensor_encoder",
                                                config_file)
        expert_config = _dataclass_from_section(ActionExpertConfig, stored_section(config["action_expert"]),
                                                "action_expert", config_file)
        norm_stats = read_norm_stats(policy_dir / NORM_STATS_FILE, expert_config.action_dim, sensor_config.in_channels)
        return cls(policy_dir, config, finetune, backbone_config, fingerprint, sensor_config, expert_config, norm_stats)

    @property
    def has_adapter(self) -> bool:
        return (self.policy_dir / ADAPTER_DIR).is_dir()

    def backbone_source(self, vl_model) -> tuple[bool, str]:
        """``(use_merged, source)``: ``vl_model`` if given, else ``merged_backbone/``, else the
        stored path; refuses an adapter that does not match ``finetune.mode``."""
        policy_dir, mode = self.policy_dir, self.finetune.mode
        merged_dir = policy_dir / MERGED_BACKBONE_DIR
        use_merged = vl_model is None and merged_dir.is_dir()
        if self.has_adapter and mode != "lora":
            raise CheckpointError(f"{policy_dir}: has {ADAPTER_DIR}/ but {CONFIG_FILE} says finetune.mode "
                                  f"is {mode!r}, not 'lora'")
        if mode == "lora" and not self.has_adapter and not use_merged:
            raise CheckpointError(f"{policy_dir}: {CONFIG_FILE} says finetune.mode is 'lora' but there is no "
                                  f"{ADAPTER_DIR}/ (the LoRA weights)"
                                  + (f" and {MERGED_BACKBONE_DIR}/ is not used because vl_model was given"
                                     if merged_dir.is_dir() else f" and no {MERGED_BACKBONE_DIR}/"))
        if use_merged:
            return True, str(merged_dir)
        return False, os.fspath(vl_model) if vl_model is not None else self.backbone_config.model_name_or_path

    def check_fingerprint(self, backbone: VLBackbone, source: str, use_merged: bool) -> None:
        """The base backbone must be the one the policy was trained on (not checked for a merged one)."""
        config_file = self.policy_dir / CONFIG_FILE
        if use_merged:
            logger.info("using %s: the LoRA merged into the base; the base fingerprint check does not apply",
                        self.policy_dir / MERGED_BACKBONE_DIR)
        elif not self.fingerprint:
            logger.warning("%s has no backbone.fingerprint: cannot check that %s is the backbone the policy "
                           "was trained on", config_file, source)
        else:
            actual = backbone.fingerprint()
            if actual != self.fingerprint:
                raise CheckpointError(
                    f"VL backbone {source} has fingerprint {actual}, but the policy in {self.policy_dir} was trained "
                    f"on a backbone with fingerprint {self.fingerprint} (backbone.fingerprint in {config_file}); pass "
                    "the base model it was trained with (vl_model / --vl-model)")


def read_policy_config(policy_dir: str | os.PathLike) -> dict[str, Any]:
    """config.json of a policy directory, after checking the directory is complete.

    Refuses a missing directory, a missing ``config.json`` / ``norm_stats.json`` /
    ``model.safetensors``, another format or a newer format version, and missing
    ``backbone`` / ``sensor_encoder`` / ``action_expert`` sections.
    """
    policy_dir = Path(policy_dir)
    if not policy_dir.is_dir():
        raise CheckpointError(f"{policy_dir}: policy directory does not exist")
    for name in REQUIRED_FILES:
        if not (policy_dir / name).is_file():
            raise CheckpointError(f"{policy_dir}: not a complete policy directory: {name} is missing "
                                  f"(write one with scripts/convert_checkpoint.py CKPT_DIR OUT --to policy)")
    path = policy_dir / CONFIG_FILE
    config = _read_json(path)
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(config).__name__}")
    if config.get("format") != POLICY_FORMAT:
        raise CheckpointError(f"{path}: 'format' is {config.get('format')!r}, expected {POLICY_FORMAT!r}")
    version = config.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= POLICY_FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {version!r} is not supported by this vla_ds "
                              f"(it reads version {POLICY_FORMAT_VERSION})")
    for section in ("backbone", "sensor_encoder", "action_expert"):
        if not isinstance(config.get(section), dict):
            raise CheckpointError(f"{path}: missing the '{section}' section")
    if "finetune" in config and not isinstance(config["finetune"], (dict, type(None))):
        raise CheckpointError(f"{path}: 'finetune' must be an object")
    return config


def _dataclass_from_section(cls: type, section: dict[str, Any], name: str, path: Path) -> Any:
    """Build a config dataclass from a config.json section with the run config's parser: unknown
    keys are logged and ignored (the weights are checked strictly anyway), invalid values are a
    CheckpointError naming the file."""
    try:
        return dataclass_from_dict(cls, section, f"{name}.", unknown="warn", source=str(path))
    except VLAError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: invalid '{name}' section ({exc})") from None


def read_norm_stats(path: str | os.PathLike, action_dim: int, sensor_channels: int) -> PolicyNormStats:
    """norm_stats.json (``NormStats.to_dict()``) with shapes (action_dim,) and (sensor_channels,),
    finite values and positive standard deviations."""
    path = Path(path)
    raw = _read_json(path)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    arrays = {}
    for key, size in zip(_NORM_KEYS, (action_dim, action_dim, sensor_channels, sensor_channels)):
        if key not in raw:
            raise CheckpointError(f"{path}: missing '{key}'")
        try:
            value = np.asarray(raw[key], dtype=np.float64)
        except (TypeError, ValueError):
            raise CheckpointError(f"{path}: '{key}' is not a list of numbers") from None
        if value.shape != (size,):
            raise CheckpointError(f"{path}: '{key}' has shape {value.shape}, expected ({size},)")
        if not np.isfinite(value).all():
            raise CheckpointError(f"{path}: '{key}' has NaN or inf values")
        if key.endswith("_std") and (value <= 0).any():
            raise CheckpointError(f"{path}: '{key}' has values <= 0")
        arrays[key] = value
    present = [key for key in _RANGE_KEYS if key in raw]
    if len(present) == 1:
        raise CheckpointError(f"{path}: '{present[0]}' without its pair ({' and '.join(_RANGE_KEYS)})")
    for key in present:
        try:
            value = np.asarray(raw[key], dtype=np.float64)
        except (TypeError, ValueError):
            raise CheckpointError(f"{path}: '{key}' is not a list of numbers") from None
        if value.shape != (action_dim,) or not np.isfinite(value).all():
            raise CheckpointError(f"{path}: '{key}' must be {action_dim} finite numbers, got shape {value.shape}")
        arrays[key] = value
    if present and (arrays["action_min"] > arrays["action_max"]).any():
        raise CheckpointError(f"{path}: 'action_min' exceeds 'action_max'")
    for key in ("action_names", "action_units"):
        if raw.get(key) is not None:
            if not isinstance(raw[key], list) or len(raw[key]) != action_dim:
                raise CheckpointError(f"{path}: '{key}' must list {action_dim} strings")
            arrays[key] = [str(x) for x in raw[key]]
    for key in ("camera_views", "instructions"):
        if raw.get(key) is not None:
            if not isinstance(raw[key], list) or not all(isinstance(x, str) for x in raw[key]):
                raise CheckpointError(f"{path}: '{key}' must be a list of strings")
            arrays[key] = list(raw[key])
    if raw.get("sensor_transform") is not None:
        try:
            transform = SensorTransform.from_dict(raw["sensor_transform"])
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from None
        if transform.channels != sensor_channels:
            raise CheckpointError(f"{path}: 'sensor_transform' makes {transform.channels} sensor channels, the "
                                  f"policy reads {sensor_channels}")
        arrays["sensor_transform"] = transform.to_dict()
    return PolicyNormStats(**arrays)


def _dtype_name(dtype: str | torch.dtype) -> str:
    names = {torch.bfloat16: "bfloat16", torch.float32: "float32"}
    if isinstance(dtype, torch.dtype):
        if dtype not in names:
            raise ValueError(f"dtype must be torch.bfloat16 or torch.float32, got {dtype}")
        return names[dtype]
    return str(dtype)


def load_lora_adapter(model: nn.Module, adapter_dir: str | os.PathLike) -> nn.Module:
    """``peft.PeftModel.from_pretrained(model, adapter_dir)`` for inference, refusing an
    adapter whose weights do not cover every LoRA module it configures (peft itself only
    warns). Returns the ``PeftModel``."""
    from peft import PeftModel
    from safetensors import safe_open

    adapter_dir = Path(adapter_dir)
    weights = adapter_dir / "adapter_model.safetensors"
    for path in (adapter_dir / "adapter_config.json", weights):
        if not path.is_file():
            raise CheckpointError(f"{adapter_dir}: incomplete PEFT adapter, {path.name} is missing")
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
        with safe_open(str(weights), framework="pt") as f:
            saved = set(f.keys())
    except Exception as exc:  # peft / safetensors raise many types for a bad adapter
        raise CheckpointError(f"{adapter_dir}: cannot load the LoRA adapter: {str(exc).strip().splitlines()[0]}") \
            from exc
    name = peft_model.active_adapter
    expected = {k.replace(f".{name}.", ".") for k in peft_model.state_dict() if "lora_" in k}
    missing = sorted(expected - saved)
    if not expected or missing:
        raise CheckpointError(f"{weights}: the adapter does not match the backbone: {len(missing)} of "
                              f"{len(expected)} LoRA tensors missing (e.g. {', '.join(missing[:3])})")
    logger.info("applied LoRA adapter %s (%d tensors)", adapter_dir, len(expected))
    return peft_model


def _unfrozen_layer_prefixes(policy: VLAPolicy, finetune: FinetuneConfig) -> list[str]:
    """State-dict prefixes of the decoder layers ``--finetune-vl full`` trained (exported too)."""
    inner = policy.backbone.vl_model
    n = len(inner.language_model.layers)
    prefix = "backbone.model.model.language_model.layers"
    return [f"{prefix}.{i}." for i in range(max(0, n - finetune.unfreeze_last_n), n)]


def state_dict_problems(saved: dict[str, torch.Tensor], own: dict[str, torch.Tensor],
                        required_prefixes: tuple[str, ...] | set[str] | list[str] = ("",),
                        optional: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """What keeps ``saved`` (a checkpoint, an exported policy) from loading strictly into a
    model whose state dict is ``own``. The one check every loader of vla_ds uses.

    Every ``own`` tensor under ``required_prefixes`` (default: all) and not in ``optional``
    must be in ``saved``; every ``saved`` tensor must exist in ``own`` with the same shape and
    hold finite values. Returns one line per kind of problem, naming up to three tensors
    (empty: loadable).
    """
    required_prefixes = tuple(required_prefixes)
    unexpected = [k for k in saved if k not in own]
    mismatched = [f"{k} is {tuple(saved[k].shape)} in the file but {tuple(own[k].shape)} in the model"
                  for k in saved if k in own and saved[k].shape != own[k].shape]
    missing = [k for k in own if k.startswith(required_prefixes) and k not in optional and k not in saved]
    non_finite = [k for k, v in saved.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensors missing ({', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unknown tensors ({', '.join(unexpected[:3])})")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches ({'; '.join(mismatched[:3])})")
    if non_finite:
        problems.append(f"{len(non_finite)} tensors with NaN/inf ({', '.join(non_finite[:3])})")
    return problems


def load_policy_weights(policy: VLAPolicy, path: str | os.PathLike, required_backbone_prefixes=()) -> None:
    """Load ``model.safetensors`` into ``policy`` strictly (see :func:`state_dict_problems`):
    the heads and norm buffers (``HEAD_PREFIXES``) plus ``required_backbone_prefixes``
    must all be there; backbone tensors not in the file keep the loaded base weights."""
    from safetensors.torch import load_file

    path = Path(path)
    try:
        saved = load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own error types for truncated/corrupt files
        raise CheckpointError(f"{path}: cannot read ({str(exc).strip().splitlines()[0]})") from exc
    own = policy.state_dict()
    problems = state_dict_problems(saved, own, HEAD_PREFIXES + tuple(sorted(required_backbone_prefixes)))
    if problems:
        raise CheckpointError(f"{path} does not match the policy built from its config.json: " + "; ".join(problems)
                              + _conditioning_hint(saved, own, policy.action_expert.config))
    result = policy.load_state_dict(saved, strict=False)
    if result.unexpected_keys:  # cannot happen after the check above; never load silently
        raise CheckpointError(f"{path}: unknown tensors {result.unexpected_keys[:3]}")
    n_backbone = sum(k.startswith("backbone.") for k in saved)
    logger.info("loaded %d tensors from %s%s", len(saved), path,
                f" ({n_backbone} of them backbone layers)" if n_backbone else "")


def _conditioning_hint(saved: dict, own: dict, expert_config: ActionExpertConfig) -> str:
    """When the weights were trained on the other VL conditioning than the config says: that, in words."""
    key = "action_expert.vl_embed"
    if (key in saved) == (key in own):
        return ""
    trained = "VL tokens" if key in saved else "the pooled VL vector"
    return (f" (the weights were trained on {trained}; config.json says action_expert.vl_conditioning "
            f"{expert_config.vl_conditioning!r})")


def _check_norm_buffers(policy: VLAPolicy, stats: PolicyNormStats, policy_dir: Path) -> None:
    """norm_stats.json and the normaliser buffers in model.safetensors must agree."""
    pairs = (("action_norm", policy.action_norm, stats.action_mean, stats.action_std),
             ("sensor_norm", policy.sensor_norm, stats.sensor_mean, stats.sensor_std))
    for name, norm, mean, std in pairs:
        for field, buffer, value in (("mean", norm.mean, mean), ("std", norm.std, std)):
            if not np.allclose(buffer.detach().cpu().double().numpy(), value, rtol=1e-5, atol=1e-6):
                raise CheckpointError(f"{policy_dir}: {NORM_STATS_FILE} and {WEIGHTS_FILE} ({name}.{field}) "
                                      "disagree; the directory mixes files of different runs")
