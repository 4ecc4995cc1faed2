"""Run configuration: one DeepSpeed JSON with a ``vla_ds`` project section.

A run is described by one JSON file per stage (``ds_configs/stage1.json``): DeepSpeed's
own keys (ZeRO, bf16, optimizer, scheduler, batch sizes, monitors) next to a ``vla_ds``
section holding the recipe (stage, model sizes, data, training loop, parameter groups).
The guide's command-line flags and ``--set dotted.key=value`` override the JSON, then
:func:`resolve_config` fills the "auto" values, checks every value and returns a
:class:`RunConfig`. All of this happens before any process group starts, so a bad value
is one message and a non-zero exit, not a hang on the other ranks.

Precedence (lowest first): dataclass defaults -> ``model_preset`` -> the JSON's ``vla_ds``
section -> command-line flags / ``--set``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vla_ds.data.dataset import DataConfig
from vla_ds.dataclass_io import dataclass_from_dict, unknown_key_error
from vla_ds.errors import ConfigError
from vla_ds.models.action_expert import ActionExpertConfig, stored_section
from vla_ds.models.backbone import BackboneConfig
from vla_ds.models.finetune import FinetuneConfig
from vla_ds.models.sensor_encoder import SensorEncoderConfig
from vla_ds.training.cache import CacheConfig
from vla_ds.training.ema import EMAConfig

logger = logging.getLogger(__name__)

PROJECT_KEY = "vla_ds"
# Keys of the JSON that are ours, not DeepSpeed's; removed before deepspeed.initialize.
NON_DEEPSPEED_KEYS = (PROJECT_KEY, "description")
STAGES = ("stage1", "stage2")

# Small sizes that train in seconds on a CPU; the reference sizes are the dataclass defaults.
MODEL_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "reference": {},
    "tiny": {
        "sensor_encoder": {"conv_channels": [32, 64], "d_model": 64, "num_layers": 1, "num_heads": 4,
                           "dim_feedforward": 128, "dropout": 0.0, "out_dim": 128},
        "action_expert": {"vl_feature_dim": 128, "d_model": 64, "num_layers": 2, "num_heads": 4,
                          "dim_feedforward": 128, "dropout": 0.0},
    },
}


@dataclass
class ParamGroupConfig:
    """One optimizer parameter group.

    Fields:
        modules: top-level policy modules whose trainable parameters join this group
            (``backbone``, ``sensor_encoder``, ``action_expert``); ``"*"`` takes every
            trainable parameter no earlier group took.
        lr: peak learning rate of the group (the scheduler scales every group by the same
            factor, so ratios between groups hold through warmup and decay).
        weight_decay: AdamW weight decay of the group.
    """

    modules: list[str] = field(default_factory=lambda: ["*"])
    lr: float = 1e-4
    weight_decay: float = 0.01

    def __post_init__(self):
        if not self.modules:
            raise ConfigError("optimizer_groups: a group needs at least one entry in 'modules'")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"optimizer_groups: lr must be a positive number, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"optimizer_groups: weight_decay must be >= 0, got {self.weight_decay}")


def _default_groups() -> dict[str, ParamGroupConfig]:
    return {"other": ParamGroupConfig(modules=["*"], lr=1e-4, weight_decay=0.01)}


@dataclass
class TrainConfig:
    """The training loop.

    Fields:
        epochs: total epochs of the run (a resumed run trains up to this many in all).
        seed: seeds the split, sampling order, noise and initialisation.
        output_dir: where checkpoints, metrics.jsonl and the resolved config go.
        stage1_checkpoint: Stage 2 only: the Stage 1 output dir (its ``latest``), one of its
            ``global_stepN`` dirs, or a guide-format ``.pt`` with ``sensor_encoder`` and
            ``action_expert`` (``--stage1-checkpoint``).
        resume: continue this run from an output dir (its ``latest``) or a ``global_stepN``
            dir (``--resume``); ``epochs`` stays the total of the whole run.
        sensor_loss_weight: per-sample loss weight of samples that have sensor data
            (multiplied with the episode's confidence).
        warmup_ratio: fraction of the total optimizer steps used for warmup when the
            scheduler's ``warmup_num_steps`` is "auto".
        log_every: optimizer steps between metrics.jsonl rows.
        max_steps: the run's length in optimizer steps (0 = ``epochs`` whole epochs). As in HF
            Trainer it overrides ``epochs`` and sizes the learning-rate schedule: warmup and
            decay ("auto") span exactly these steps. ``--resume`` with the same value
            continues the schedule exactly; to stop a longer schedule early, give the
            scheduler's ``total_num_steps`` as a number.
        validate_every_epochs: run validation every N epochs (and after the last one).
        val_batch_size: micro batch size of validation (0 = the training micro batch).
        dist_timeout_minutes: process-group timeout; a dead rank ends the job after this.
        long_phase_minutes: how long live ranks are waited for in a phase one rank works
            through alone (its share of the Stage 1 feature cache, rank 0 syncing a checkpoint
            to disk): those waits poll heartbeats instead of blocking in a collective, so they
            are not cut off by ``dist_timeout_minutes``, which still bounds a dead rank.
        save_steps: also checkpoint every N optimizer steps (0 = only at epoch ends and at
            ``max_steps``).
        save_total_limit: keep only the newest K checkpoints (0 = keep all); older ones are
            deleted only after a newer one is complete.
        max_consecutive_skips: stop the run (with a checkpoint of the last good weights)
            after this many consecutive optimizer steps skipped for a non-finite loss or
            gradient norm.
        coalesce_grad_reduction: with gradient accumulation under ZeRO-2, reduce the gradients
            once per optimizer step (after the last micro batch) instead of once per micro batch,
            adding the micro batches up in ``data_types.grad_accum_dtype`` meanwhile. Holds every
            trainable gradient whole until then (the micro batch's bf16 one and the fp32 sum);
            set false to keep ZeRO-2's per-micro-batch gradient partitioning when they do not
            fit. ZeRO-1 with bf16 reduces once per step anyway; ZeRO-3 always per micro batch.
        save_on_signal: on SIGTERM / SIGINT (scancel, docker stop, a preemption, Ctrl-C) every
            rank finishes its optimizer step, writes a checkpoint there (a normal one:
            ``--resume`` continues exactly) and exits with 143 / 130, naming it. False stops at
            the step without one. The step and the save must fit in the grace period before
            SIGKILL: SLURM's KillWait (30 s by default), docker stop's 10 s, the deepspeed
            launcher's 30 s per rank.
        progress_bar: show a tqdm bar on rank 0.
    """

    epochs: int = 20
    seed: int = 42
    output_dir: str = "checkpoints/stage1"
    stage1_checkpoint: str = ""
    resume: str = ""
    sensor_loss_weight: float = 1.0
    warmup_ratio: float = 0.05
    log_every: int = 1
    max_steps: int = 0
    validate_every_epochs: int = 1
    val_batch_size: int = 0
    dist_timeout_minutes: float = 5.0
    long_phase_minutes: float = 240.0
    save_steps: int = 0
    save_total_limit: int = 0
    max_consecutive_skips: int = 10
    coalesce_grad_reduction: bool = True
    save_on_signal: bool = True
    progress_bar: bool = True

    def __post_init__(self):
        _check(self.epochs >= 1, "train.epochs", self.epochs, "must be >= 1")
        _check(self.sensor_loss_weight >= 0, "train.sensor_loss_weight", self.sensor_loss_weight, "must be >= 0")
        _check(0 <= self.warmup_ratio < 1, "train.warmup_ratio", self.warmup_ratio, "must be in [0, 1)")
        _check(self.log_every >= 1, "train.log_every", self.log_every, "must be >= 1")
        _check(self.max_steps >= 0, "train.max_steps", self.max_steps, "must be >= 0")
        _check(self.validate_every_epochs >= 1, "train.validate_every_epochs", self.validate_every_epochs, "must be >= 1")
        _check(self.val_batch_size >= 0, "train.val_batch_size", self.val_batch_size, "must be >= 0")
        _check(self.dist_timeout_minutes > 0, "train.dist_timeout_minutes", self.dist_timeout_minutes, "must be > 0")
        _check(self.long_phase_minutes > 0, "train.long_phase_minutes", self.long_phase_minutes, "must be > 0")
        _check(bool(self.output_dir), "train.output_dir", self.output_dir, "must not be empty")
        _check(self.save_steps >= 0, "train.save_steps", self.save_steps, "must be >= 0")
        _check(self.save_total_limit >= 0, "train.save_total_limit", self.save_total_limit, "must be >= 0")
        _check(self.max_consecutive_skips >= 1, "train.max_consecutive_skips", self.max_consecutive_skips,
               "must be >= 1")


@dataclass
class RunConfig:
    """Everything a run needs: the recipe (the JSON's ``vla_ds`` section) plus the
    resolved DeepSpeed config that :mod:`vla_ds.training.engine` hands to ``deepspeed.initialize``.

    Fields:
        stage: ``stage1`` (backbone frozen; sensor encoder + action expert trained from
            scratch) or ``stage2`` (heads loaded from Stage 1; the backbone trained as
            ``finetune`` says).
        model_preset: ``reference`` (SPEC sizes) or ``tiny`` (CPU-sized heads).
        backbone, finetune, sensor_encoder, action_expert, data, cache, train, ema: component
            configs (``ema``: the moving average of the weights that exported policies use).
        optimizer_groups: named parameter groups (``train/lr/<name>`` in the metrics).
        deepspeed: the DeepSpeed part of the JSON, "auto" values resolved.
        world_size: number of ranks the config was resolved for.
    """

    stage: str = "stage1"
    model_preset: str = "reference"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    sensor_encoder: SensorEncoderConfig = field(default_factory=SensorEncoderConfig)
    action_expert: ActionExpertConfig = field(default_factory=ActionExpertConfig)
    data: DataConfig = field(default_factory=DataConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    optimizer_groups: dict[str, ParamGroupConfig] = field(default_factory=_default_groups)
    deepspeed: dict[str, Any] = field(default_factory=dict)
    world_size: int = 1

    @property
    def micro_batch_size(self) -> int:
        return int(self.deepspeed["train_micro_batch_size_per_gpu"])

    @property
    def grad_accum(self) -> int:
        return int(self.deepspeed["gradient_accumulation_steps"])

    def project_dict(self) -> dict[str, Any]:
        """The ``vla_ds`` section, fully expanded (every field, JSON types)."""
        out = {}
        for f in dataclasses.fields(self):
            if f.name in ("deepspeed", "world_size"):
                continue
            out[f.name] = _to_jsonable(getattr(self, f.name))
        return out

    def to_dict(self) -> dict[str, Any]:
        """The whole resolved JSON: DeepSpeed keys plus the expanded ``vla_ds`` section."""
        return {**copy.deepcopy(self.deepspeed), PROJECT_KEY: self.project_dict()}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, d: dict[str, Any], world_size: int = 1) -> "RunConfig":
        """Build from a resolved dict (as written by :meth:`to_dict`); no "auto" values expected.

        A stored config lists every field, so a field it lacks did not exist when it was
        written: such a run trained the DDPM epsilon head without an EMA, whatever today's
        defaults are (``stored_section``)."""
        ds = {k: v for k, v in d.items() if k not in NON_DEEPSPEED_KEYS}
        project = copy.deepcopy(d.get(PROJECT_KEY, {}))
        if isinstance(project, dict):
            project["action_expert"] = stored_section(project.get("action_expert") or {})
            project.setdefault("ema", {"enabled": False})
        cfg = project_config(project)
        cfg.deepspeed = ds
        cfg.world_size = world_size
        return cfg


def _check(ok: bool, name: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"{name}={value!r}: {why}")


def _to_jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: _to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_jsonable(v) for v in obj]
    return obj


_SECTIONS = {
    "backbone": BackboneConfig,
    "finetune": FinetuneConfig,
    "sensor_encoder": SensorEncoderConfig,
    "action_expert": ActionExpertConfig,
    "data": DataConfig,
    "cache": CacheConfig,
    "train": TrainConfig,
    "ema": EMAConfig,
}


def project_config(section: dict[str, Any]) -> RunConfig:
    """The ``vla_ds`` JSON section -> RunConfig (presets applied first, then explicit values)."""
    if not isinstance(section, dict):
        raise ConfigError(f"'{PROJECT_KEY}' must be a JSON object")
    valid = ["stage", "model_preset", "optimizer_groups", *_SECTIONS]
    for key in section:
        if key not in valid:
            raise unknown_key_error(f"{PROJECT_KEY}.", key, valid)
    stage = section.get("stage", "stage1")
    if stage not in STAGES:
        raise ConfigError(f"{PROJECT_KEY}.stage={stage!r}: expected one of {', '.join(STAGES)}")
    preset = section.get("model_preset", "reference")
    if preset not in MODEL_PRESETS:
        raise ConfigError(f"{PROJECT_KEY}.model_preset={preset!r}: expected one of {', '.join(MODEL_PRESETS)}")

    parts = {}
    for name, cls in _SECTIONS.items():
        base = dataclass_from_dict(cls, MODEL_PRESETS[preset].get(name, {}), f"{PROJECT_KEY}.{name}.")
        parts[name] = dataclass_from_dict(cls, section.get(name, {}), f"{PROJECT_KEY}.{name}.", base)

    groups_raw = section.get("optimizer_groups")
    if groups_raw is None:
        groups = _default_groups()
    else:
        if not isinstance(groups_raw, dict) or not groups_raw:
            raise ConfigError(f"{PROJECT_KEY}.optimizer_groups must be a non-empty object of named groups")
        groups = {name: dataclass_from_dict(ParamGroupConfig, g, f"{PROJECT_KEY}.optimizer_groups.{name}.")
                  for name, g in groups_raw.items()}
    return RunConfig(stage=stage, model_preset=preset, optimizer_groups=groups, **parts)


# ---------------------------------------------------------------------------------------
# Loading, overriding and resolving


# The shipped per-stage JSONs (a source checkout; ``pip install -e .`` keeps them there).
SHIPPED_CONFIG_DIR = Path(__file__).resolve().parents[2] / "ds_configs"


def stage_config_path(stage: str, cwd: str | Path | None = None) -> Path:
    """The JSON a run without ``--ds_config`` uses (the guide's command lines have none):
    ``ds_configs/<stage>.json`` in the working directory when there is one (a user's edited
    copy), else the shipped one."""
    local = Path(cwd or Path.cwd()) / "ds_configs" / f"{stage}.json"
    if local.is_file():
        return local
    shipped = SHIPPED_CONFIG_DIR / f"{stage}.json"
    if shipped.is_file():
        return shipped
    raise ConfigError(f"no --ds_config given and neither {local} nor {shipped} exists; "
                      f"pass --ds_config PATH (a DeepSpeed JSON with a {PROJECT_KEY} section)")


def load_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a JSON object")
    return raw


def _parse_scalar(text: str) -> Any:
    """A --set value: JSON first (so 1e-4 is a float), then YAML (so bare words are strings
    and [a, b] a list). YAML 1.1's on/off/yes/no stay words: fields typed bool accept them."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        if text.strip().lower() in ("on", "off", "yes", "no", "y", "n"):
            return text.strip()
        return yaml.safe_load(text)


def apply_override(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``dotted`` (e.g. ``vla_ds.train.epochs`` or ``zero_optimization.stage``) in ``raw``.

    Keys under the project section may leave out the ``vla_ds.`` prefix
    (``train.epochs=3``). String values are parsed (``"3"`` -> 3, ``"1e-4"`` -> 1e-4).
    """
    keys = dotted.split(".")
    if keys[0] in _SECTIONS or keys[0] in ("stage", "model_preset", "optimizer_groups"):
        keys = [PROJECT_KEY, *keys]
    if isinstance(value, str):
        value = _parse_scalar(value)
    node = raw
    for key in keys[:-1]:
        nxt = node.setdefault(key, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {dotted}: '{key}' is not a section")
        node = nxt
    node[keys[-1]] = value


def _resolve_batch(ds: dict[str, Any], world_size: int, source: str) -> None:
    """Fill/check train_batch_size = micro x accumulation x world size."""
    def as_int(key: str, default: Any) -> int | None:
        v = ds.get(key, default)
        if v in (None, "auto"):
            return None
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{source}: {key}={v!r} must be a positive integer or \"auto\"")
        return v

    micro = as_int("train_micro_batch_size_per_gpu", "auto")
    accum = as_int("gradient_accumulation_steps", "auto")
    total = as_int("train_batch_size", "auto")
    if micro is None and accum is None:
        raise ConfigError(f"{source}: set train_micro_batch_size_per_gpu (--batch_size) or "
                          "gradient_accumulation_steps (--grad_accum)")
    if micro is None:
        micro = 1 if total is None else total // (accum * world_size)
    if accum is None:
        accum = 1 if total is None else total // (micro * world_size)
    if micro < 1 or accum < 1:
        raise ConfigError(f"{source}: train_batch_size={total} is smaller than one sample per rank "
                          f"({world_size} ranks)")
    if total is not None and total != micro * accum * world_size:
        raise ConfigError(
            f"{source}: inconsistent batch settings: train_batch_size={total} but "
            f"train_micro_batch_size_per_gpu={micro} x gradient_accumulation_steps={accum} x "
            f"{world_size} ranks = {micro * accum * world_size}; set train_batch_size to \"auto\" "
            "or make the product match")
    ds["train_micro_batch_size_per_gpu"] = micro
    ds["gradient_accumulation_steps"] = accum
    ds["train_batch_size"] = micro * accum * world_size


def resolve_config(raw: dict[str, Any], world_size: int, source: str = "config", for_run: bool = True) -> RunConfig:
    """Validate the (already overridden) JSON for ``world_size`` ranks and resolve "auto" values.

    The scheduler's step counts stay "auto" until :func:`resolve_schedule` knows the
    number of optimizer steps per epoch (which needs the dataset). ``for_run`` False skips
    what only a training run needs (a dataset directory, Stage 2's Stage 1 weights): for
    tools that read a config without training it (estimate_memory.py, benchmarks).
    """
    raw = copy.deepcopy(raw)
    if PROJECT_KEY not in raw:
        raise ConfigError(f"{source}: no '{PROJECT_KEY}' section (see ds_configs/stage1.json)")
    cfg = project_config(raw[PROJECT_KEY])
    ds = {k: v for k, v in raw.items() if k not in NON_DEEPSPEED_KEYS}
    _resolve_batch(ds, world_size, source)

    opt = ds.get("optimizer")
    if not isinstance(opt, dict) or "type" not in opt:
        raise ConfigError(f"{source}: an 'optimizer' section with a 'type' is required (e.g. AdamW)")
    # The JSON's optimizer lr is DeepSpeed's default; every parameter group carries its own.
    first_group = next(iter(cfg.optimizer_groups.values()))
    opt.setdefault("params", {}).setdefault("lr", first_group.lr)
    for key in ("lr", "weight_decay", "eps"):
        v = opt["params"].get(key)
        if v == "auto":
            opt["params"][key] = {"lr": first_group.lr, "weight_decay": first_group.weight_decay, "eps": 1e-8}[key]
    if ds.get("gradient_clipping") == "auto":
        ds["gradient_clipping"] = 1.0
    for section in ("tensorboard", "csv_monitor", "wandb"):
        mon = ds.get(section)
        if isinstance(mon, dict) and mon.get("output_path") == "auto":
            mon["output_path"] = str(Path(cfg.train.output_dir) / "monitor")
    for section in ("tensorboard", "csv_monitor"):
        mon = ds.get(section)
        if isinstance(mon, dict) and mon.get("job_name") == "auto":
            mon["job_name"] = cfg.stage

    cfg.deepspeed = ds
    cfg.world_size = world_size
    _check_consistency(cfg, source, for_run)
    return cfg


def _check_consistency(cfg: RunConfig, source: str, for_run: bool = True) -> None:
    """Cross-field checks the single dataclasses cannot do."""
    if for_run and not cfg.data.dataset_dir:
        raise ConfigError(f"{source}: no dataset directory: pass --dataset_dir DIR")
    if cfg.stage == "stage1" and cfg.finetune.mode != "none":
        raise ConfigError(f"{source}: stage1 keeps the VL model frozen, but finetune.mode={cfg.finetune.mode!r} "
                          "(use --training-stage stage2 with --finetune-vl)")
    if cfg.stage == "stage2" and cfg.cache.mode == "on":
        raise ConfigError(f"{source}: the VL feature cache is for Stage 1 only: in Stage 2 the VL model "
                          "trains, so its features change every step; drop cache.mode=on (or use --no-cache)")
    if cfg.stage == "stage1" and cfg.cache.mode != "off" and zero_stage(cfg.deepspeed, source) == 3:
        raise ConfigError(f"{source}: the Stage 1 VL feature cache is built with ZeRO-1/2 (under ZeRO-3 every "
                          "forward is collective and ranks build different shares); use stage1.json, or --no-cache")
    if for_run and cfg.stage == "stage2" and not (cfg.train.stage1_checkpoint or cfg.train.resume):
        raise ConfigError(f"{source}: stage2 needs the Stage 1 weights: pass --stage1-checkpoint PATH "
                          "(a Stage 1 output dir or its .pt)")
    ae = cfg.action_expert
    if ae.horizon != cfg.data.action_horizon:
        raise ConfigError(f"action_expert.horizon={ae.horizon} differs from data.action_horizon="
                          f"{cfg.data.action_horizon}; set both (the chunk the model predicts is the one the data makes)")
    bf16 = cfg.deepspeed.get("bf16", {}).get("enabled", False)
    fp16 = cfg.deepspeed.get("fp16", {}).get("enabled", False)
    if fp16:
        raise ConfigError(f"{source}: fp16 is not supported (bf16 compute with fp32 master weights is the recipe)")
    if bf16 and cfg.backbone.dtype != "bfloat16":
        raise ConfigError(f"{source}: bf16 is enabled but backbone.dtype={cfg.backbone.dtype!r}; "
                          "use bfloat16 (or disable bf16 for an fp32 run)")


def resolve_schedule(cfg: RunConfig, steps_per_epoch: int) -> int:
    """Fill the scheduler's "auto" step counts from the run's length, and return it.

    The run is ``train.max_steps`` optimizer steps when that is set (as in HF Trainer, it
    overrides the epochs: :func:`run_epochs`), else ``epochs x steps_per_epoch``. Warmup
    ("auto") is ``train.warmup_ratio`` of that total. Scheduler values given as numbers are
    kept: a run meant to stop before its schedule ends sets ``total_num_steps`` itself.
    """
    total = cfg.train.max_steps or steps_per_epoch * cfg.train.epochs
    sched = cfg.deepspeed.get("scheduler")
    if isinstance(sched, dict):
        params = sched.setdefault("params", {})
        # Schedulers that decay over the run need its length; fill it when asked ("auto") or absent.
        if params.get("total_num_steps") == "auto" or (
                "total_num_steps" not in params and sched.get("type") in _SCHEDULERS_WITH_TOTAL):
            params["total_num_steps"] = max(1, total)
        if params.get("warmup_num_steps") == "auto":
            params["warmup_num_steps"] = max(1, round(cfg.train.warmup_ratio * total))
    return total


def run_epochs(cfg: RunConfig, steps_per_epoch: int) -> int:
    """The epochs the run starts: those ``train.max_steps`` needs when set (the last one
    possibly cut short, whatever ``train.epochs`` says), else ``train.epochs``."""
    return -(-cfg.train.max_steps // steps_per_epoch) if cfg.train.max_steps else cfg.train.epochs


def describe_schedule(cfg: RunConfig) -> str:
    """The resolved schedule in words, for the start-of-run log: its type, warmup and
    total steps (only the keys the scheduler has)."""
    sched = cfg.deepspeed.get("scheduler")
    if not isinstance(sched, dict):
        return "no learning-rate scheduler (constant rate)"
    params = sched.get("params", {})
    parts = [f"{label} {params[key]}" for key, label in (("warmup_num_steps", "warmup"),
                                                          ("total_num_steps", "total"))
             if key in params]
    return f"learning-rate schedule {sched.get('type', '?')}: " + (", ".join(parts) + " steps" if parts else
                                                                    "no step counts")


_SCHEDULERS_WITH_TOTAL = ("WarmupCosineLR", "WarmupDecayLR")


def _find_auto(node: Any, path: str = "") -> str | None:
    if node == "auto":
        return path
    if isinstance(node, dict):
        for k, v in node.items():
            found = _find_auto(v, f"{path}.{k}" if path else k)
            if found:
                return found
    return None


# Top-level sections DeepSpeed reads that are not in deepspeed.runtime.constants.
_DEEPSPEED_SECTIONS = {
    "zero_optimization", "tensorboard", "csv_monitor", "wandb", "comet", "flops_profiler",
    "activation_checkpointing", "aio", "autotuning", "compression_training", "data_efficiency",
    "elasticity", "nebula", "amp", "weight_quantization", "hybrid_engine", "compile", "timers",
    "pipeline", "sparse_attention", "curriculum_learning", "eigenvalue", "progressive_layer_drop",
    "sequence_parallel_size", "zenflow", "checkpoint", "tensor_parallel", "expert_parallel",
}


def _check_deepspeed_keys(ds: dict[str, Any], source: str) -> None:
    """DeepSpeed ignores unknown top-level keys and passes optimizer params straight to the
    optimizer's constructor: catch typos here. A key close to a known one is an error
    (naming the likely intent); an unrecognised one without a close match only warns, so a
    newer DeepSpeed key is not refused."""
    import inspect
    import logging

    import deepspeed.runtime.constants as constants
    import torch

    known = {v for k, v in vars(constants).items() if k.isupper() and isinstance(v, str)} | _DEEPSPEED_SECTIONS
    for key in ds:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.8)
            if close:
                raise ConfigError(f"{source}: unknown DeepSpeed key '{key}' (did you mean '{close[0]}'?)")
            logging.getLogger(__name__).warning("%s: DeepSpeed key '%s' is not one vla_ds knows; passed on as is",
                                                source, key)
    opt = ds.get("optimizer", {})
    if str(opt.get("type", "")).lower() in ("adam", "adamw"):
        from deepspeed.ops.adam import FusedAdam

        allowed = (set(inspect.signature(torch.optim.AdamW).parameters)
                   | set(inspect.signature(FusedAdam.__init__).parameters)
                   | {"torch_adam", "adam_w_mode", "fp32_optimizer_states"}) - {"self", "params"}
        for key in opt.get("params", {}):
            if key not in allowed:
                close = difflib.get_close_matches(key, sorted(allowed), n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ConfigError(f"{source}: unknown optimizer parameter 'optimizer.params.{key}'{hint}")


def cache_enabled(cfg: RunConfig) -> bool:
    """The VL feature cache is on in Stage 1 unless turned off; never in Stage 2."""
    return cfg.stage == "stage1" and cfg.cache.mode != "off"


def zero_stage(ds: dict[str, Any], source: str | None = None) -> int:
    """The ZeRO stage a DeepSpeed config asks for (0 when it has none), or one ConfigError line
    (prefixed with ``source``, the config's file, when given)."""
    value = (ds.get("zero_optimization") or {}).get("stage", 0)
    try:
        return int(value)
    except (TypeError, ValueError):
        prefix = f"{source}: " if source else ""
        raise ConfigError(f"{prefix}zero_optimization.stage={value!r}: expected 0, 1, 2 or 3") from None


def validate_deepspeed(cfg: RunConfig, source: str = "config") -> None:
    """Let DeepSpeed's own config parser check its keys now, before the engine starts, so a
    typo (``zero_optimization.stagee``) is one message instead of a traceback on every rank.
    Call after :func:`resolve_schedule`."""
    import deepspeed.comm as dist
    from deepspeed.runtime.config import DeepSpeedConfig

    _check_deepspeed_keys(cfg.deepspeed, source)
    left = _find_auto(cfg.deepspeed)
    if left:
        raise ConfigError(f"{source}: {left}=\"auto\" cannot be resolved by vla_ds; set a value")
    # DeepSpeedConfig checks the batch product against the world size it sees (the process
    # group's, or 1 before one starts).
    probe = copy.deepcopy(cfg.deepspeed)
    probe["train_batch_size"] = cfg.micro_batch_size * cfg.grad_accum * (
        dist.get_world_size() if dist.is_initialized() else 1)
    try:
        DeepSpeedConfig(probe)
    except Exception as e:  # pydantic ValidationError, AssertionError, ...: all mean a bad key or value
        lines = [line.strip() for line in str(e).splitlines() if line.strip() and "errors.pydantic" not in line]
        raise ConfigError(f"{source}: DeepSpeed rejects the config: {'; '.join(lines[:3])}") from None


# ---------------------------------------------------------------------------------------
# Command-line flags (train.py, build_cache.py, preflight, benchmarks)


# The guide's flags -> dotted config keys (DeepSpeed keys at the top level, ours under vla_ds.).
FLAG_TO_KEY = {
    "training_stage": "vla_ds.stage",
    "batch_size": "train_micro_batch_size_per_gpu",
    "grad_accum": "gradient_accumulation_steps",
    "lr": "vla_ds.optimizer_groups.other.lr",
    "epochs": "vla_ds.train.epochs",
    "val_split": "vla_ds.data.val_split",
    "diffusion_timesteps": "vla_ds.action_expert.num_train_timesteps",
    "sensor_loss_weight": "vla_ds.train.sensor_loss_weight",
    "dataset_dir": "vla_ds.data.dataset_dir",
    "vl_model": "vla_ds.backbone.model_name_or_path",
    "model_preset": "vla_ds.model_preset",
    "output_dir": "vla_ds.train.output_dir",
    "seed": "vla_ds.train.seed",
    "sensor_window_size": "vla_ds.data.sensor_window_size",
    "num_workers": "vla_ds.data.num_workers",
    "max_steps": "vla_ds.train.max_steps",
    "vl_lr": "vla_ds.optimizer_groups.vl.lr",
    "stage1_checkpoint": "vla_ds.train.stage1_checkpoint",
    "resume": "vla_ds.train.resume",
    "finetune_vl": "vla_ds.finetune.mode",
    "lora_r": "vla_ds.finetune.lora_r",
    "lora_alpha": "vla_ds.finetune.lora_alpha",
    "lora_dropout": "vla_ds.finetune.lora_dropout",
    "unfreeze_last_n": "vla_ds.finetune.unfreeze_last_n",
    "save_steps": "vla_ds.train.save_steps",
    "save_total_limit": "vla_ds.train.save_total_limit",
    "on_bad_sample": "vla_ds.data.on_bad_sample",
}
# Flags that set one parameter group's lr: the group must exist in the JSON.
GROUP_FLAGS = {"lr": "other", "vl_lr": "vl"}


def build_parser(prog: str = "train.py") -> argparse.ArgumentParser:
    """The guide's flags (train.py, build_cache.py)."""
    p = argparse.ArgumentParser(
        prog=prog,
        description="Train a VLA policy (Qwen2.5-VL + sensor encoder + diffusion action expert) with DeepSpeed."
        if prog == "train.py" else "Build the Stage 1 VL feature cache ahead of training, with train.py's flags.",
    )
    p.add_argument("--ds_config", "--ds-config",
                   help="DeepSpeed JSON with a vla_ds section (default: ds_configs/<training stage>.json, "
                        "from the working directory if it has one, else the shipped one)")
    p.add_argument("--dataset_dir", "--dataset-dir", help="dataset root (SPEC section 3 format)")
    p.add_argument("--training-stage", "--training_stage", dest="training_stage", choices=STAGES)
    p.add_argument("--vl-model", "--vl_model", dest="vl_model", help="Qwen2.5-VL dir or hub id")
    p.add_argument("--model-preset", "--model_preset", dest="model_preset", choices=list(MODEL_PRESETS))
    p.add_argument("--batch_size", "--batch-size", type=int, help="micro batch per GPU")
    p.add_argument("--grad_accum", "--grad-accum", type=int, help="gradient accumulation steps")
    p.add_argument("--lr", type=float, help="learning rate of the sensor encoder + action expert ('other' group)")
    p.add_argument("--vl-lr", "--vl_lr", dest="vl_lr", type=float, help="learning rate of the VL model ('vl' group)")
    p.add_argument("--stage1-checkpoint", "--stage1_checkpoint", dest="stage1_checkpoint",
                   help="Stage 2: Stage 1 output dir or its .pt")
    p.add_argument("--finetune-vl", "--finetune_vl", dest="finetune_vl", choices=["lora", "full", "none"])
    p.add_argument("--lora-r", "--lora_r", dest="lora_r", type=int)
    p.add_argument("--lora-alpha", "--lora_alpha", dest="lora_alpha", type=float)
    p.add_argument("--lora-dropout", "--lora_dropout", dest="lora_dropout", type=float)
    p.add_argument("--unfreeze-last-n", "--unfreeze_last_n", dest="unfreeze_last_n", type=int,
                   help="decoder layers trained with --finetune-vl full (default 2)")
    p.add_argument("--epochs", type=int, help="total epochs of the run")
    p.add_argument("--val_split", "--val-split", type=float)
    p.add_argument("--diffusion_timesteps", "--diffusion-timesteps", type=int)
    p.add_argument("--sensor_loss_weight", "--sensor-loss-weight", type=float)
    p.add_argument("--sensor-window-size", "--sensor_window_size", dest="sensor_window_size", type=int)
    p.add_argument("--num_workers", "--num-workers", type=int)
    p.add_argument("--output_dir", "--output-dir")
    p.add_argument("--seed", type=int)
    p.add_argument("--max_steps", "--max-steps", type=int,
                   help="train N optimizer steps; overrides --epochs and sizes the learning-rate schedule "
                        "(warmup train.warmup_ratio x N, decay to step N), as in HF Trainer")
    p.add_argument("--save_steps", "--save-steps", type=int,
                   help="also checkpoint every N optimizer steps (default: at the end of every epoch only)")
    p.add_argument("--save_total_limit", "--save-total-limit", type=int,
                   help="keep only the newest K checkpoints (older ones go once a newer one is complete)")
    p.add_argument("--on-bad-sample", "--on_bad_sample", dest="on_bad_sample", choices=["error", "skip"],
                   help="error (default): stop at a bad sample, naming its file; skip: drop it, count it per "
                        "file and list the files at the end of every epoch")
    p.add_argument("--no-cache", "--no_cache", dest="no_cache", action="store_true", default=None,
                   help="Stage 1: run the backbone every step instead of caching its features")
    p.add_argument("--resume", help="output dir (its 'latest'), a global_stepN dir, or a universal checkpoint "
                                    "(convert_checkpoint.py --to universal: any number of ranks) to continue from; "
                                    "or the guide's weights-only .pt: its weights with a fresh optimizer")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. --set train.log_every=10 --set zero_optimization.stage=1")
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)  # from the launcher
    return p


def load_run_config(args: argparse.Namespace, world_size: int) -> RunConfig:
    """The run config of parsed flags (:func:`build_parser`; any Namespace with some of its
    attributes, e.g. preflight's): ``--ds_config`` (or the stage's shipped JSON), then the
    guide's flags, ``--no-cache`` and ``--set`` over it, resolved for ``world_size`` ranks."""
    if not args.ds_config:  # the guide's command lines: the stage picks the JSON
        stage = args.training_stage or "stage1"
        args.ds_config = str(stage_config_path(stage))
        logger.info("no --ds_config: using %s (training stage %s)", args.ds_config, stage)
    raw = load_json(args.ds_config)
    groups = raw.get(PROJECT_KEY, {}).get("optimizer_groups", {"other": {}})
    for flag, group in GROUP_FLAGS.items():
        if getattr(args, flag, None) is not None and group not in groups:
            raise ConfigError(
                f"{args.ds_config}: --{flag.replace('_', '-')} sets the '{group}' parameter group, which this config "
                f"does not have (it has: {', '.join(groups)}); use a stage-2 config or --set optimizer_groups.NAME.lr=")
    for flag, key in FLAG_TO_KEY.items():
        value = getattr(args, flag, None)
        if value is not None:
            apply_override(raw, key, value)
    if getattr(args, "no_cache", None):
        apply_override(raw, "vla_ds.cache.mode", "off")
    for item in args.overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        apply_override(raw, key.strip(), value)
    return resolve_config(raw, world_size, source=str(args.ds_config))


def run_config_from_flags(argv: list[str], world_size: int = 1) -> RunConfig:
    """:func:`load_run_config` of a train.py command line given as a list, e.g.
    ``["--ds_config", "ds_configs/stage1.json", "--model-preset", "tiny", "--set", "train.seed=1"]``."""
    return load_run_config(build_parser().parse_args(argv), world_size)
