"""Estimate per-GPU memory of a training config and say which shipped config fits.

    python scripts/estimate_memory.py --ds_config ds_configs/stage2.json --num_gpus 4 --gpu-memory 24GB

Builds the policy on the meta device (exact parameter counts, nothing allocated), applies
the config's finetune mode, and prints weights / gradients / optimizer states / activations /
overhead per GPU, then the same estimate for every shipped ``ds_configs/*.json`` with the
same flags and the fastest stage-2 config that fits. The arithmetic is in ``vla_ds.planning.memory``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from vla_ds.errors import ConfigError, run_command
from vla_ds.models.finetune import FINETUNE_MODES, FinetuneConfig
from vla_ds.planning import memory
from vla_ds.training.config import SHIPPED_CONFIG_DIR as SHIPPED_DIR

SHIPPED_CONFIGS = ("stage1.json", "stage2.json", "stage2_offload.json", "stage3_offload.json")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ds_config", "--ds-config", required=True, help="DeepSpeed JSON with a vla_ds section")
    p.add_argument("--num_gpus", "--num-gpus", type=int, default=None,
                   help="data-parallel ranks (default: visible GPUs, or 1)")
    p.add_argument("--micro-batch", "--micro_batch", type=int, default=None,
                   help="micro batch per GPU (default: the JSON's train_micro_batch_size_per_gpu)")
    p.add_argument("--gpu-memory", default=None, help="memory of one GPU, e.g. 24GB (default: this GPU's, or 24GB)")
    p.add_argument("--finetune-vl", choices=FINETUNE_MODES, default=None,
                   help="override the stage-2 configs' finetune mode")
    p.add_argument("--lora-r", type=int, default=None, help="override the LoRA rank")
    p.add_argument("--no-checkpointing", action="store_true", help="gradient checkpointing off for the VL model")
    p.add_argument("--image-size", default="640x360", help="camera image WIDTHxHEIGHT before the processor")
    p.add_argument("--views", type=int, default=2, help="camera views per sample")
    p.add_argument("--text-tokens", type=int, default=memory.PROMPT_TEXT_TOKENS,
                   help="chat template + instruction tokens per sample")
    p.add_argument("--vl-model", default=None,
                   help="Qwen2.5-VL directory or hub id whose config.json to use (default: the reference 3B)")
    p.add_argument("--json", default=None, help="also write the numbers (bytes) to this file")
    return p


def _default_gpu() -> tuple[int, int]:
    """(visible GPUs, memory of GPU 0 in bytes) where torch sees CUDA, else (1, 24 GB)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.device_count(), torch.cuda.get_device_properties(0).total_memory
    return 1, 24 * memory.GiB


def _parse_image_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
        if width < 1 or height < 1:
            raise ValueError
    except ValueError:
        raise ConfigError(f"--image-size {text!r}: expected WIDTHxHEIGHT, e.g. 640x360") from None
    return width, height


def _micro_batch(ds: dict[str, Any], num_gpus: int) -> int:
    micro = ds.get("train_micro_batch_size_per_gpu", "auto")
    if isinstance(micro, int) and not isinstance(micro, bool):
        return micro
    total, accum = ds.get("train_batch_size"), ds.get("gradient_accumulation_steps", 1)
    if isinstance(total, int) and isinstance(accum, int):
        return max(1, total // (accum * num_gpus))
    return 1


def _pixel_bounds(project: dict[str, Any], vl_model: str | None) -> tuple[int, int]:
    """min/max pixels as training resolves them: the JSON's backbone section, else
    BackboneConfig's default (max_pixels 250880); a null value, or min_pixels, falls back to
    --vl-model's processor, else the reference."""
    from vla_ds.models.backbone import DEFAULT_MAX_PIXELS

    bounds = {"min_pixels": memory.REFERENCE_MIN_PIXELS, "max_pixels": memory.REFERENCE_MAX_PIXELS}
    processor = Path(os.path.expanduser(vl_model)) / "preprocessor_config.json" if vl_model else None
    if processor is not None and processor.is_file():
        saved = json.loads(processor.read_text())
        size = saved.get("size") or {}
        bounds["min_pixels"] = saved.get("min_pixels") or size.get("shortest_edge") or bounds["min_pixels"]
        bounds["max_pixels"] = saved.get("max_pixels") or size.get("longest_edge") or bounds["max_pixels"]
    backbone = {"max_pixels": DEFAULT_MAX_PIXELS, **(project.get("backbone") or {})}
    for key in bounds:
        if backbone.get(key):
            bounds[key] = backbone[key]
    return int(bounds["min_pixels"]), int(bounds["max_pixels"])


def _head_configs(project: dict[str, Any], vl_hidden: int, views: int):
    """Sensor encoder and action expert configs of the JSON's project section, parsed as a run
    parses it (preset, then its sections) and sized as the policy sizes them (``views``
    camera views: the VL tokens the expert attends to)."""
    from vla_ds.models.policy import derived_head_configs
    from vla_ds.training.config import project_config

    cfg = project_config(project)
    action = dataclasses.replace(cfg.action_expert, num_views=views)
    return derived_head_configs(cfg.sensor_encoder, action, cfg.sensor_encoder.in_channels,
                                cfg.data.sensor_window_size, vl_hidden)


class Estimator:
    """Evaluates configs with one set of flags; counts are cached per finetune setup."""

    def __init__(self, args: argparse.Namespace):
        from vla_ds.models.backbone import (
            load_backbone_config,
            reference_backbone_config,
        )

        self.args = args
        self.hf_config = load_backbone_config(args.vl_model) if args.vl_model else reference_backbone_config()
        gpus, gpu_memory = _default_gpu()
        self.num_gpus = args.num_gpus or gpus
        if self.num_gpus < 1:
            raise ConfigError(f"--num_gpus {self.num_gpus}: expected a positive integer")
        self.gpu_memory = memory.parse_memory_size(args.gpu_memory) if args.gpu_memory else gpu_memory
        self.width, self.height = _parse_image_size(args.image_size)
        if args.views < 1:
            raise ConfigError(f"--views {args.views}: expected a positive integer")
        self._counts: dict[Any, memory.ParamCounts] = {}

    def finetune(self, raw: dict[str, Any]) -> FinetuneConfig:
        ft = memory.finetune_config(raw)
        if (raw.get("vla_ds") or {}).get("stage", "stage1") == "stage1":
            return ft  # the flags choose how stage 2 trains; stage 1 never trains the backbone
        changes: dict[str, Any] = {}
        if self.args.finetune_vl:
            changes["mode"] = self.args.finetune_vl
        if self.args.lora_r is not None:
            changes["lora_r"] = self.args.lora_r
        if self.args.no_checkpointing:
            changes["gradient_checkpointing"] = False
        return dataclasses.replace(ft, **changes)

    def evaluate(self, raw: dict[str, Any]) -> dict[str, Any]:
        project = raw.get("vla_ds") or {}
        ft = self.finetune(raw)
        zero = memory.ZeroSettings.from_ds_config(raw)
        text, vision = self.hf_config.text_config, self.hf_config.vision_config
        sensor_cfg, action_cfg = _head_configs(project, text.hidden_size, self.args.views)
        key = (ft.mode, ft.lora_r, tuple(ft.lora_target_modules), ft.lora_vision, ft.unfreeze_last_n,
               repr(sensor_cfg), repr(action_cfg))
        if key not in self._counts:
            self._counts[key] = memory.count_policy_parameters(self.hf_config, ft, sensor_cfg, action_cfg)
        counts = self._counts[key]

        min_pixels, max_pixels = _pixel_bounds(project, self.args.vl_model)
        view = memory.image_tokens(self.height, self.width, vision.patch_size, vision.spatial_merge_size,
                                   min_pixels, max_pixels)
        lm_tokens = memory.lm_tokens_per_sample(view.tokens, self.args.views, self.args.text_tokens)
        heads = memory.head_activation_bytes_per_sample(sensor_cfg, action_cfg)
        attn = (project.get("backbone") or {}).get("attn_implementation", "sdpa")
        shape = memory.activation_shape(self.hf_config, ft, lm_tokens, view.patches * self.args.views, heads,
                                        sdpa=attn != "eager")
        micro = self.args.micro_batch or _micro_batch(raw, self.num_gpus)
        est = memory.estimate(counts, zero, self.num_gpus, micro, shape, ft.gradient_checkpointing,
                              ema=_ema_enabled(project))
        return {"finetune": ft, "zero": zero, "counts": counts, "view": view, "lm_tokens": lm_tokens,
                "micro_batch": micro, "estimate": est, "action_expert": action_cfg,
                "cache_bytes_per_sample": memory.cache_bytes_per_sample(action_cfg, text.hidden_size)}


def _ema_enabled(project: dict[str, Any]) -> bool:
    """``vla_ds.ema.enabled`` of a JSON, parsed as training parses it (its default when absent)."""
    from vla_ds.dataclass_io import dataclass_from_dict
    from vla_ds.training.ema import EMAConfig

    return dataclass_from_dict(EMAConfig, project.get("ema") or {}, "vla_ds.ema.").enabled


def _load(path: Path) -> dict[str, Any]:
    from vla_ds.training.config import load_json

    return load_json(path)


def _header(path: str, raw: dict[str, Any], r: dict[str, Any], est_obj: Estimator) -> str:
    ft, counts, view, est = r["finetune"], r["counts"], r["view"], r["estimate"]
    stage = (raw.get("vla_ds") or {}).get("stage", "stage1")
    if ft.mode == "lora":
        how = f"LoRA r={ft.lora_r} on {','.join(ft.lora_target_modules)}"
        how += " + vision attention" if ft.lora_vision else ""
    elif ft.mode == "full":
        how = f"last {ft.unfreeze_last_n} decoder layers trained"
    else:
        how = "VL backbone frozen"
    text = est_obj.hf_config.text_config
    return "\n".join([
        f"{path}: {stage}, {r['zero'].describe()}, {est_obj.num_gpus} GPU(s), micro batch {r['micro_batch']}",
        f"  finetune: {how}; gradient checkpointing {'on' if est.checkpointing else 'off'}",
        f"  parameters: {counts.total:,} total, {counts.trainable:,} trainable "
        f"(vl {counts.trainable_vl:,} in {counts.trainable_vl_tensors} tensors, "
        f"other {counts.trainable_other:,} in {counts.trainable_other_tensors} tensors)",
        f"  tokens: {est_obj.args.views} view(s) x {est_obj.width}x{est_obj.height} -> {view.resized_width}x"
        f"{view.resized_height}, {view.tokens} LM tokens ({view.patches} vision patches) per view; "
        f"{r['lm_tokens']} LM tokens per sample ({text.num_hidden_layers} layers, hidden {text.hidden_size})",
        f"  action expert: {_describe_conditioning(r['action_expert'])}, "
        f"{r['action_expert'].num_vl_tokens + 2 + r['action_expert'].horizon} tokens per sample; Stage 1 feature cache "
        f"{r['cache_bytes_per_sample'] / 1e3:,.1f} kB per sample ({r['cache_bytes_per_sample'] / 1e3:,.0f} GB per "
        "million samples)",
    ])


def _describe_conditioning(action_cfg) -> str:
    if action_cfg.vl_conditioning == "pooled":
        return "one pooled VL vector"
    g = action_cfg.vl_grid
    return f"{action_cfg.num_vl_tokens} VL tokens (2 + {action_cfg.num_views} views x {g}x{g})"


def run(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """The estimate of ``args.ds_config`` and of every shipped config: (the JSON result, the report text)."""
    lines: list[str] = []
    est_obj = Estimator(args)
    path = Path(args.ds_config)
    raw = _load(path)
    main_result = est_obj.evaluate(raw)
    lines.append(_header(str(path), raw, main_result, est_obj))
    lines.append("")
    lines.append(memory.format_estimate(path.name, main_result["estimate"], est_obj.gpu_memory, est_obj.num_gpus))

    rows, comparison = [], []
    for name in SHIPPED_CONFIGS:
        shipped = SHIPPED_DIR / name
        r = main_result if shipped.resolve() == path.resolve() else est_obj.evaluate(_load(shipped))
        rows.append((name, r["estimate"], f"{r['zero'].describe()}, mb {r['micro_batch']}"))
        comparison.append({"config": name, "total_bytes": r["estimate"].total, "cpu_bytes": r["estimate"].cpu_total,
                           "fits": r["estimate"].fits(est_obj.gpu_memory)})
    lines.append("")
    lines.append(f"Shipped configs at {memory.gb(est_obj.gpu_memory)} GB per GPU ({est_obj.num_gpus} GPU(s), same flags):")
    lines.append(memory.format_comparison(rows, est_obj.gpu_memory))
    best = memory.recommend({c["config"]: c["fits"] for c in comparison})
    if best:
        lines.append(f"Recommendation: ds_configs/{best} (the fastest stage-2 config that fits).")
    else:
        lines.append("Recommendation: no shipped stage-2 config fits; lower --micro-batch (raise gradient_accumulation_steps "
                     "to keep the global batch), use more GPUs, or a GPU with more memory.")

    out = {
        "ds_config": str(path),
        "num_gpus": est_obj.num_gpus,
        "gpu_memory_bytes": est_obj.gpu_memory,
        "micro_batch": main_result["micro_batch"],
        "lm_tokens_per_sample": main_result["lm_tokens"],
        "image_tokens_per_view": dataclasses.asdict(main_result["view"]),
        "vl_conditioning": main_result["action_expert"].vl_conditioning,
        "vl_tokens_per_sample": main_result["action_expert"].num_vl_tokens,
        "cache_bytes_per_sample": main_result["cache_bytes_per_sample"],
        "finetune": dataclasses.asdict(main_result["finetune"]),
        "zero": dataclasses.asdict(main_result["zero"]),
        "parameters": {k: v for k, v in dataclasses.asdict(main_result["counts"]).items() if k != "param_numels"}
        | {"trainable": main_result["counts"].trainable, "total": main_result["counts"].total},
        "estimate_bytes": main_result["estimate"].to_dict(),
        "fits": main_result["estimate"].fits(est_obj.gpu_memory),
        "comparison": comparison,
        "recommendation": best,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return out, "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns 0, or 2 with a one-line message for a bad config or flag."""
    code, result = run_command(run, build_parser().parse_args(argv))
    if result is not None:
        print(result[1])
    return code
