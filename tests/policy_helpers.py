"""Write exported policy directories (docs/policy_format.md) from in-memory policies.

The inference and evaluation tests load what these helpers write, so they do not depend
on ``scripts/convert_checkpoint.py``. Three variants:

- heads only (Stage 1 / ``--finetune-vl none``);
- LoRA: ``adapter/`` written by peft's ``save_pretrained`` after ``apply_finetune``, with
  LoRA B set non-zero so the adapter actually changes the features;
- merged: additionally ``merged_backbone/`` from ``merge_and_unload`` + ``save_pretrained``,
  with the base model's tokenizer and image-processor files copied next to it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

import vla_ds
from vla_ds.models.action_expert import ActionExpertConfig
from vla_ds.models.backbone import BackboneConfig, VLBackbone, VLInputBuilder
from vla_ds.models.finetune import FinetuneConfig
from vla_ds.models.policy import HEAD_PREFIXES, POLICY_FORMAT_VERSION, VLAPolicy
from vla_ds.models.sensor_encoder import SensorEncoderConfig
from vla_ds.training.config import MODEL_PRESETS

WINDOW = 32  # the demo dataset's sensor window
# Base-model files that are not the tokenizer or the image processor.
_MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json")


def build_policy(backbone_dir, norm_stats, sensor_channels: int, finetune: FinetuneConfig | None = None,
                 seed: int = 0, window: int = WINDOW, **head) -> VLAPolicy:
    """A tiny-preset policy on the float32 tiny backbone, in eval mode, ``input_builder`` set.
    ``head``: ActionExpertConfig fields over the tiny preset (``objective``, ...).

    With a LoRA ``finetune`` the adapters get non-zero B weights (drawn from ``seed``), as
    after training; fresh LoRA B is zero and would make the adapter invisible.
    """
    bcfg = BackboneConfig(model_name_or_path=str(backbone_dir), dtype="float32")
    preset = MODEL_PRESETS["tiny"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        policy = VLAPolicy(VLBackbone(bcfg), SensorEncoderConfig(**preset["sensor_encoder"]),
                           ActionExpertConfig(**{**preset["action_expert"], **head}), norm_stats,
                           sensor_channels=sensor_channels, sensor_window_size=window)
        policy.backbone.freeze()
        # As train.py does: the fingerprint of the base weights, before anything trains them.
        policy.base_fingerprint = policy.backbone.fingerprint()
        if finetune is not None and finetune.mode != "none":
            policy.backbone.setup_finetune(finetune)
            for name, param in policy.backbone.named_parameters():
                if "lora_B" in name:
                    with torch.no_grad():
                        param.normal_(0.0, 0.05)
    policy.finetune_config = finetune or FinetuneConfig()
    policy.input_builder = VLInputBuilder.from_pretrained(bcfg)
    return policy.eval()


def write_policy_dir(policy: VLAPolicy, out_dir, *, stage: str = "stage1", data: dict | None = None,
                     seed: int | None = None, merged: bool = False, with_adapter: bool = True) -> Path:
    """Write ``policy`` as an exported policy directory and return its path.

    ``data`` (DataConfig fields) and ``seed`` go into config.json's ``data`` section and
    top-level ``seed`` (what evaluate.py needs to rebuild the training split). ``merged``
    also writes ``merged_backbone/``; ``with_adapter=False`` leaves ``adapter/`` out (a
    merged-only export).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    finetune: FinetuneConfig = getattr(policy, "finetune_config", FinetuneConfig())
    backbone = policy.backbone
    bcfg: BackboneConfig = backbone.backbone_config
    config = {
        "format": "vla_ds-policy",
        "format_version": POLICY_FORMAT_VERSION,
        "vla_ds_version": vla_ds.__version__,
        "stage": stage,
        "finetune": dataclasses.asdict(finetune),
        "backbone": {**dataclasses.asdict(bcfg), "fingerprint": policy.base_fingerprint},
        "sensor_encoder": dataclasses.asdict(policy.sensor_encoder.config),
        "action_expert": dataclasses.asdict(policy.action_expert.config),
        "sensor_loss_weight": policy.sensor_loss_weight,
        "source_checkpoint": "tests/policy_helpers.py (in-memory policy)",
        "step": 0,
    }
    if data is not None:
        config["data"] = dict(data)
    if seed is not None:
        config["seed"] = seed
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    state = policy.state_dict()
    keep = HEAD_PREFIXES
    if finetune.mode == "full":
        n = len(backbone.vl_model.language_model.layers)
        keep += tuple(f"backbone.model.model.language_model.layers.{i}."
                      for i in range(n - finetune.unfreeze_last_n, n))
    tensors = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous().clone()
               for k, v in state.items() if k.startswith(keep)}
    save_file(tensors, str(out / "model.safetensors"))

    stats = {"action_mean": policy.action_norm.mean, "action_std": policy.action_norm.std,
             "sensor_mean": policy.sensor_norm.mean, "sensor_std": policy.sensor_norm.std}
    if policy.action_norm.has_range:
        stats.update(action_min=policy.action_norm.low, action_max=policy.action_norm.high)
    stats = {k: [float(x) for x in v] for k, v in stats.items()}
    for key in ("action_names", "action_units", "camera_views", "instructions"):  # what convert copies too
        if getattr(policy.norm_stats, key, None) is not None:
            stats[key] = list(getattr(policy.norm_stats, key))
    (out / "norm_stats.json").write_text(json.dumps(stats) + "\n")

    if finetune.mode == "lora":
        if with_adapter:
            backbone.model.save_pretrained(str(out / "adapter"))
        if merged:
            write_merged_backbone(backbone.model, Path(bcfg.model_name_or_path), out / "merged_backbone")
    return out


def write_merged_backbone(peft_model, base_dir: Path, out_dir: Path) -> Path:
    """``merge_and_unload`` a copy of ``peft_model`` and save it with the base's tokenizer and
    image-processor files (the in-memory model is left as it is)."""
    merged = copy.deepcopy(peft_model).merge_and_unload()
    merged.save_pretrained(str(out_dir))
    for f in Path(base_dir).iterdir():
        if f.is_file() and f.name not in _MODEL_FILES:
            shutil.copy2(f, out_dir / f.name)
    return out_dir


def stage1_policy_and_batches(backbone_dir, micro_batch: int, accum: int, overrides: list[str] = (),
                              channels: int = 16, window: int = 32):
    """``(cfg, policy, batches)``: ds_configs/stage1.json with the tiny preset, the policy built as
    train.py builds it (vla_ds.training.assembly.build_policy), and ``accum`` synthetic cached-feature
    micro batches of ``micro_batch`` samples (no dataset)."""
    import numpy as np

    from vla_ds.batch import random_batch
    from vla_ds.data.normalize import NormStats
    from vla_ds.training import config as config_lib
    from vla_ds.training.assembly import build_policy

    repo = Path(__file__).resolve().parent.parent
    sets = ["train.progress_bar=false", *overrides]
    cfg = config_lib.run_config_from_flags(
        ["--ds_config", str(repo / "ds_configs" / "stage1.json"), "--vl-model", str(backbone_dir), "--model-preset",
         "tiny", "--batch_size", str(micro_batch), "--grad_accum", str(accum), "--dataset_dir", "(synthetic)",
         "--sensor-window-size", str(window), *(arg for item in sets for arg in ("--set", item))])
    config_lib.resolve_schedule(cfg, steps_per_epoch=1000)
    stats = NormStats(np.zeros(7), np.ones(7), np.zeros(channels), np.ones(channels))
    policy, _, _ = build_policy(cfg, stats, channels)
    g = torch.Generator().manual_seed(1)
    batches = [random_batch(micro_batch, window, channels, cfg.action_expert.horizon,
                            hidden=policy.backbone.hidden_size, generator=g,
                            vl_tokens=policy.action_expert.config.feature_tokens) for _ in range(accum)]
    return cfg, policy, batches
