"""Checkpoint conversion: a ZeRO engine checkpoint -> weights other tools load.

``scripts/convert_checkpoint.py CKPT_DIR OUT --to FORMAT`` calls :func:`convert`. The
source is a training output dir (its ``latest``, or ``--tag global_stepN``) or one
``global_stepN`` dir. What each format writes::

    fp32, bf16  OUT/model.safetensors   consolidated trainable weights + normalisation buffers,
                                        keys as in VLAPolicy.state_dict(); with include_base also
                                        the frozen base model under its VLAPolicy names
    stage1      OUT (a .pt path, or a dir -> OUT/diffusion_step<N>.pt): the guide's
                {"sensor_encoder": sd, "action_expert": sd, "training_stage": "stage1", "norm_stats": dict,
                 "head": {"objective", "prediction_type", "vl_conditioning"[, "vl_grid"]}}
    stage2      same naming: {"model_state_dict": sd, "training_stage": "stage2", "norm_stats": dict, "head": dict},
                sd = the trainable state (LoRA + heads + normalisation buffers; + the base with include_base)
    policy      OUT/ as docs/policy_format.md: config.json, model.safetensors, norm_stats.json,
                adapter/ (LoRA runs), merged_backbone/ (merge_lora)
    universal   OUT/global_step<N>/       DeepSpeed universal checkpoint (ds_to_universal): the rank-0
                                          model-states file with our client state, zero/<param>/
                                          {fp32,exp_avg,exp_avg_sq}.pt, zero/optimizer_state.pt
                OUT/latest, OUT/latest_universal   both name global_step<N>; ``--resume OUT`` works
                                          on any number of ranks

The ``.pt`` files hold tensors and plain dicts only (``torch.load(weights_only=True)``).
Consolidation is DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint`` (fp32 master
weights, exact; for ZeRO-1 + bf16 checkpoints, which it does not read, the same weights
from the shards' own slice maps) and the universal format its ``ds_to_universal``. The
first half of this module is pure functions over state dicts; the second half reads
checkpoints and builds models.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import vla_ds
from vla_ds.errors import CheckpointError
from vla_ds.models.policy import (
    ADAPTER_DIR,
    CONFIG_FILE,
    MERGED_BACKBONE_DIR,
    NORM_STATS_FILE,
    POLICY_FORMAT,
    POLICY_FORMAT_VERSION,
    WEIGHTS_FILE,
    derived_head_configs,
    state_dict_problems,
)
from vla_ds.training import checkpoint as ckpt_lib
from vla_ds.training.checkpoint import (
    SourceCheckpoint,
    cast_floating,
    consolidated_state,
    deepspeed_output_to_log,
    open_checkpoint,
)
from vla_ds.training.config import RunConfig

logger = logging.getLogger(__name__)

FORMATS = ("fp32", "bf16", "stage1", "stage2", "policy", "universal")

HEAD_PARTS = (*ckpt_lib.STAGE1_PARTS, *ckpt_lib.STAGE1_BUFFERS)
# Tokenizer, image-processor and chat-template files a merged backbone directory needs next to its weights.
PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.json", "chat_template.jinja", "preprocessor_config.json",
                   "video_preprocessor_config.json", "processor_config.json")


# ---------------------------------------------------------------------------------------
# Pure functions over state dicts


def is_lora_key(key: str) -> bool:
    return ".lora_" in key


def split_policy_state(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Split VLAPolicy state into ``heads`` (sensor encoder, action expert, normalisation
    buffers), ``lora`` (adapter tensors) and ``backbone`` (other backbone tensors: unfrozen
    layers of ``--finetune-vl full``, or the base model). Keys are kept as they are."""
    parts: dict[str, dict[str, torch.Tensor]] = {"heads": {}, "lora": {}, "backbone": {}}
    for key, value in state.items():
        if key.startswith("backbone."):
            parts["lora" if is_lora_key(key) else "backbone"][key] = value
        elif key.split(".", 1)[0] in HEAD_PARTS:
            parts["heads"][key] = value
        else:
            raise CheckpointError(f"tensor '{key}' belongs to no part of the policy (expected backbone.*, "
                                  f"{', '.join(p + '.*' for p in HEAD_PARTS)})")
    return parts


def stage1_checkpoint(state: dict[str, torch.Tensor], norm_stats: dict[str, Any],
                      head: dict[str, str] | None = None) -> dict[str, Any]:
    """The guide's Stage 1 ``.pt`` dict from VLAPolicy state (heads only; the rest is ignored),
    plus ``head`` (objective, prediction_type) so Stage 2 continues the same head."""
    out: dict[str, Any] = {}
    for part in ckpt_lib.STAGE1_PARTS:
        sub = {k[len(part) + 1:]: v for k, v in state.items() if k.startswith(part + ".")}
        if not sub:
            raise CheckpointError(f"the checkpoint has no {part} tensors")
        out[part] = sub
    return {**out, "training_stage": "stage1", "norm_stats": norm_stats, "head": dict(head or ckpt_lib.LEGACY_HEAD)}


def stage2_checkpoint(state: dict[str, torch.Tensor], norm_stats: dict[str, Any],
                      head: dict[str, str] | None = None) -> dict[str, Any]:
    """The guide's Stage 2 ``.pt`` dict: ``model_state_dict`` in VLAPolicy.state_dict() names,
    plus ``head`` so ``--resume`` of it continues the same head."""
    return {"model_state_dict": dict(state), "training_stage": "stage2", "norm_stats": norm_stats,
            "head": dict(head or ckpt_lib.LEGACY_HEAD)}


def policy_config(run_config: dict[str, Any], norm_stats: dict[str, Any], state: dict[str, torch.Tensor], *,
                  fingerprint: str, model_name_or_path: str, source: str, step: int,
                  weights: str = "trained") -> dict[str, Any]:
    """``config.json`` of a policy directory (docs/policy_format.md) from a checkpoint's
    resolved run config, norm stats and (heads) state; the sizes the policy fills at build
    time are filled here the same way."""
    cfg = RunConfig.from_dict(run_config)
    vl_proj = state.get("action_expert.vl_proj.weight")
    if vl_proj is None:
        raise CheckpointError("the checkpoint has no action_expert.vl_proj.weight (not a vla_ds policy?)")
    sensor, action = derived_head_configs(cfg.sensor_encoder, cfg.action_expert, len(norm_stats["sensor_mean"]),
                                          cfg.data.sensor_window_size, int(vl_proj.shape[1]),
                                          action_dim=len(norm_stats["action_mean"]))
    backbone = {**dataclasses.asdict(cfg.backbone), "model_name_or_path": model_name_or_path,
                "fingerprint": fingerprint}
    return {
        "format": POLICY_FORMAT,
        "format_version": POLICY_FORMAT_VERSION,
        "vla_ds_version": vla_ds.__version__,
        "stage": cfg.stage,
        "finetune": dataclasses.asdict(cfg.finetune),  # mode "none" in Stage 1 (the config checks)
        "backbone": backbone,
        "sensor_encoder": {**dataclasses.asdict(sensor), "conv_channels": list(sensor.conv_channels)},
        "action_expert": dataclasses.asdict(action),
        "sensor_loss_weight": cfg.train.sensor_loss_weight,
        # The data settings and seed of the run, so evaluate.py rebuilds the same episode split.
        "data": dataclasses.asdict(cfg.data),
        "seed": cfg.train.seed,
        "source_checkpoint": source,
        "step": step,
        "weights": weights,  # "ema": the moving average of the run's weights; "trained": the weights themselves
    }


def pt_output_path(out: str | Path, step: int) -> Path:
    """Where a guide ``.pt`` goes: ``out`` itself when it ends in ``.pt``, else ``out/diffusion_step<step>.pt``."""
    out = Path(out)
    return out if out.suffix == ".pt" else out / f"diffusion_step{step}.pt"


# ---------------------------------------------------------------------------------------
# Reading checkpoints


def export_state(ckpt: SourceCheckpoint, use_ema: bool = True) -> tuple[dict[str, torch.Tensor], str]:
    """The weights a conversion writes: :func:`consolidated_state`, with the run's moving
    average in place of the trained weights when the checkpoint has one and ``use_ema``.
    Returns ``(state, "ema" or "trained")``."""
    state = consolidated_state(ckpt)
    averaged = ckpt.ema if use_ema else None
    if averaged is None:
        return state, "trained"
    unknown = sorted(set(averaged) - set(state))
    if unknown:
        raise CheckpointError(f"{ckpt.tag_dir}: the EMA holds tensors the checkpoint does not ({', '.join(unknown[:3])})")
    logger.info("writing the EMA of the weights (%d tensors; --no-ema writes the trained weights)", len(averaged))
    return {**state, **cast_floating(averaged, torch.float32)}, "ema"


def load_base_backbone(ckpt: SourceCheckpoint, vl_model: str | None):
    """The frozen base the run trained on (``vl_model`` or the run config's path), with the
    run's fine-tuning applied (peft-wrapped for LoRA, adapters at their init), checked
    against the checkpoint's backbone fingerprint."""
    from vla_ds.models.backbone import VLBackbone

    cfg = RunConfig.from_dict(ckpt.config)
    backbone_cfg = dataclasses.replace(cfg.backbone, model_name_or_path=vl_model) if vl_model else cfg.backbone
    logger.info("loading VL backbone %s", backbone_cfg.model_name_or_path)
    backbone = VLBackbone(backbone_cfg)
    saved, found = ckpt.states.get("backbone_fingerprint"), backbone.fingerprint()
    if saved and saved != found:
        raise CheckpointError(f"{backbone_cfg.model_name_or_path}: not the VL backbone {ckpt.tag_dir} was trained on "
                              f"(fingerprint {found}, the checkpoint has {saved}); pass that one with --vl-model")
    backbone.eval()
    if ckpt.finetune_mode != "none":
        with warnings.catch_warnings():  # peft reads a transformers property deprecated in v5
            warnings.simplefilter("ignore", FutureWarning)
            backbone.setup_finetune(dataclasses.replace(cfg.finetune, gradient_checkpointing=False))
    return backbone


def _module_state(module: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` with ``prefix``, each tied weight listed once (as VLAPolicy does)."""
    first = {n for n, _ in module.named_parameters()}
    aliases = {n for n, _ in module.named_parameters(remove_duplicate=False)} - first
    return {prefix + k: v for k, v in module.state_dict().items() if k not in aliases}


def load_lora_into(backbone, lora: dict[str, torch.Tensor], source: Path) -> None:
    """Load VLAPolicy-named LoRA tensors into a peft-wrapped backbone, strictly."""
    own = {k: v for k, v in _module_state(backbone, "backbone.").items() if is_lora_key(k)}
    problems = state_dict_problems(lora, own)
    if problems:
        raise CheckpointError(f"{source}: the LoRA adapters do not match the run's finetune config: "
                              + "; ".join(problems))
    with torch.no_grad():
        for key, value in lora.items():
            own[key].copy_(value)


# ---------------------------------------------------------------------------------------
# Conversions


@dataclass
class ConversionResult:
    source: Path
    stage: str
    step: int
    to: str
    written: list[Path]


def check_request(ckpt: SourceCheckpoint, to: str, merge_lora: bool, include_base: bool) -> None:
    """Refuse combinations that cannot be served, before any heavy work."""
    if to == "stage2" and ckpt.stage != "stage2":
        raise CheckpointError(f"{ckpt.tag_dir}: --to stage2 needs a Stage 2 checkpoint, this one is from {ckpt.stage} "
                              "(--to stage1 writes its heads)")
    if include_base and to not in ("fp32", "bf16", "stage2"):
        raise CheckpointError(f"--include-base: only for --to fp32, bf16 or stage2, not {to}")
    if merge_lora:
        if to != "policy":
            raise CheckpointError(f"--merge-lora: only for --to policy, not {to}")
        if ckpt.finetune_mode != "lora":
            raise CheckpointError(f"{ckpt.tag_dir}: --merge-lora needs a LoRA checkpoint, but this {ckpt.stage} run "
                                  f"has no adapter (finetune mode {ckpt.finetune_mode})")


def _out_dir(out: Path, must_be_new: bool) -> Path:
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a directory")
    if must_be_new and out.is_dir() and any(out.iterdir()):
        raise CheckpointError(f"{out}: exists and is not empty; write to a new directory")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _safetensors_metadata(ckpt: SourceCheckpoint) -> dict[str, str]:
    return {"format": "pt", "source_checkpoint": str(ckpt.tag_dir), "stage": ckpt.stage, "step": str(ckpt.step)}


def write_safetensors(state: dict[str, torch.Tensor], path: Path, dtype: torch.dtype, metadata: dict[str, str]) -> Path:
    from safetensors.torch import save_file

    save_file(cast_floating(state, dtype), str(path), metadata=metadata)
    return path


def _with_base(ckpt: SourceCheckpoint, state: dict[str, torch.Tensor], vl_model: str | None) -> dict[str, torch.Tensor]:
    """``state`` plus the frozen base under VLAPolicy names (trained tensors win)."""
    backbone = load_base_backbone(ckpt, vl_model)
    base = {k: v for k, v in _module_state(backbone, "backbone.").items() if not is_lora_key(k)}
    return {**base, **state}


def to_safetensors(ckpt, out: Path, dtype: torch.dtype, include_base: bool, vl_model: str | None,
                   use_ema: bool = True) -> list[Path]:
    state, _ = export_state(ckpt, use_ema)
    if include_base:
        state = _with_base(ckpt, state, vl_model)
    path = write_safetensors(state, _out_dir(out, False) / WEIGHTS_FILE, dtype, _safetensors_metadata(ckpt))
    return [path]


def to_guide_pt(ckpt, out: Path, stage: str, include_base: bool, vl_model: str | None,
                use_ema: bool = True) -> list[Path]:
    state, _ = export_state(ckpt, use_ema)
    if include_base:
        state = _with_base(ckpt, state, vl_model)
    state = cast_floating(state, torch.float32)
    if stage == "stage1":
        payload = stage1_checkpoint(state, ckpt.norm_stats, ckpt.head)
    else:
        payload = stage2_checkpoint(state, ckpt.norm_stats, ckpt.head)
    path = pt_output_path(out, ckpt.step)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)
    return [path]


def _copy_processor_files(model_name_or_path: str, out: Path) -> None:
    """Tokenizer, image processor and chat template next to a merged backbone's weights."""
    from vla_ds.models.backbone import is_local_backbone

    if is_local_backbone(model_name_or_path):
        src = Path(model_name_or_path).expanduser()
        for name in PROCESSOR_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, out / name)
        return
    from transformers import AutoImageProcessor, AutoTokenizer

    AutoTokenizer.from_pretrained(model_name_or_path).save_pretrained(out)
    AutoImageProcessor.from_pretrained(model_name_or_path, backend="pil").save_pretrained(out)


def to_policy(ckpt, out: Path, merge_lora: bool, vl_model: str | None, use_ema: bool = True) -> list[Path]:
    out = _out_dir(out, must_be_new=True)
    state, weights = export_state(ckpt, use_ema)
    parts = split_policy_state(state)
    model_name = vl_model or ckpt.backbone_path
    written = []
    fingerprint = ckpt.states.get("backbone_fingerprint", "")
    config = policy_config(ckpt.config, ckpt.norm_stats, parts["heads"], fingerprint=fingerprint,
                           model_name_or_path=model_name, source=str(ckpt.tag_dir), step=ckpt.step, weights=weights)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    written.append(out / CONFIG_FILE)
    weights = {**parts["heads"], **parts["backbone"]}  # the base is never here; full-mode layers are
    written.append(write_safetensors(weights, out / WEIGHTS_FILE, torch.float32, _safetensors_metadata(ckpt)))
    (out / NORM_STATS_FILE).write_text(json.dumps(ckpt.norm_stats, indent=2) + "\n")
    written.append(out / NORM_STATS_FILE)
    if ckpt.finetune_mode == "lora":
        if not parts["lora"]:
            raise CheckpointError(f"{ckpt.tag_dir}: a LoRA run, but the checkpoint holds no LoRA tensors")
        backbone = load_base_backbone(ckpt, vl_model)
        load_lora_into(backbone, parts["lora"], ckpt.tag_dir)
        backbone.model.save_pretrained(str(out / ADAPTER_DIR))
        written.append(out / ADAPTER_DIR)
        if merge_lora:
            merged = backbone.model.merge_and_unload()
            merged.save_pretrained(str(out / MERGED_BACKBONE_DIR))
            _copy_processor_files(model_name, out / MERGED_BACKBONE_DIR)
            written.append(out / MERGED_BACKBONE_DIR)
    return written


def to_universal(ckpt, out: Path) -> list[Path]:
    """DeepSpeed's ``ds_to_universal`` into ``out/<tag>``, plus ``out/latest``.

    Our checkpoints carry no ``universal_checkpoint_info`` (no tensor/pipeline-parallel
    layout to describe), so it runs with ``inject_missing_state``; workers run in this
    process (no process pool). It copies the model-states file as is, so the client state
    (step, epoch, norm stats, config, fingerprint) travels along.
    """
    from deepspeed.checkpoint import ds_to_universal

    out = _out_dir(out, must_be_new=True)
    args = argparse.Namespace(input_folder=str(ckpt.tag_dir), output_folder=str(out / ckpt.tag),
                              num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                              strict=True, inject_missing_state=True)
    with deepspeed_output_to_log(f"ds_to_universal {ckpt.tag_dir}"):
        ds_to_universal.main(args)
    (out / ckpt_lib.LATEST_FILE).write_text(ckpt.tag)  # ds_to_universal wrote latest_universal
    return [out / ckpt.tag]


def convert(path: str | Path, out: str | Path, to: str, tag: str | None = None, merge_lora: bool = False,
            include_base: bool = False, vl_model: str | None = None, use_ema: bool = True) -> ConversionResult:
    """Convert the checkpoint at ``path`` (``tag``, or its ``latest``) to format ``to`` at ``out``.

    Weights: the run's EMA when the checkpoint has one (``use_ema``; the weights a policy is
    meant to be used with), else the trained weights; ``universal`` keeps both as they are."""
    if to not in FORMATS:
        raise CheckpointError(f"--to {to}: unknown format (expected one of {', '.join(FORMATS)})")
    ckpt = open_checkpoint(path, tag)
    check_request(ckpt, to, merge_lora, include_base)
    out = Path(out)
    logger.info("converting %s (%s, step %d) to %s", ckpt.tag_dir, ckpt.stage, ckpt.step, to)
    if to in ("fp32", "bf16"):
        written = to_safetensors(ckpt, out, torch.float32 if to == "fp32" else torch.bfloat16, include_base, vl_model,
                                 use_ema)
    elif to in ("stage1", "stage2"):
        written = to_guide_pt(ckpt, out, to, include_base, vl_model, use_ema)
    elif to == "policy":
        written = to_policy(ckpt, out, merge_lora, vl_model, use_ema)
    else:
        written = to_universal(ckpt, out)
    return ConversionResult(ckpt.tag_dir, ckpt.stage, ckpt.step, to, written)


# ---------------------------------------------------------------------------------------
# Command line (scripts/convert_checkpoint.py, vla-convert)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="convert_checkpoint.py",
                                description="Convert a training checkpoint (DeepSpeed ZeRO) into weights other tools load.")
    p.add_argument("checkpoint", help="training output dir (its 'latest') or a global_stepN dir")
    p.add_argument("out", help="output dir (or .pt file for --to stage1/stage2)")
    p.add_argument("--to", required=True, metavar="FORMAT", help=f"one of: {', '.join(FORMATS)}")
    p.add_argument("--tag", help="checkpoint tag in CKPT_DIR (default: its 'latest')")
    p.add_argument("--merge-lora", "--merge_lora", dest="merge_lora", action="store_true",
                   help="--to policy: also write the LoRA merged into the backbone (merged_backbone/)")
    p.add_argument("--include-base", "--include_base", dest="include_base", action="store_true",
                   help="--to fp32/bf16/stage2: add the frozen base backbone's weights")
    p.add_argument("--no-ema", "--no_ema", dest="use_ema", action="store_false",
                   help="write the trained weights, not the run's moving average of them (the default when "
                        "the run kept one, ema.enabled)")
    p.add_argument("--vl-model", "--vl_model", dest="vl_model",
                   help="base Qwen2.5-VL dir or hub id (default: the one in the run config)")
    return p


def main(argv: list[str] | None = None) -> int:
    """``scripts/convert_checkpoint.py`` / ``vla-convert``: prints what it wrote; a bad argument is
    one 'error:' line and exit code 2."""
    from vla_ds.errors import run_command
    from vla_ds.log import setup_logging

    args = build_parser().parse_args(argv)
    setup_logging()
    code, result = run_command(lambda a: convert(a.checkpoint, a.out, a.to, tag=a.tag, merge_lora=a.merge_lora,
                                                 include_base=a.include_base, vl_model=a.vl_model,
                                                 use_ema=a.use_ema), args)
    if code:
        return code
    print(f"converted {result.source} ({result.stage}, step {result.step}) to {result.to}:")
    for path in result.written:
        print(f"  {path}")
    return 0
