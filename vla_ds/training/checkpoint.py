"""Engine checkpoints: save, load, resume.

Layout written by :func:`save_checkpoint` (DeepSpeed's own, plus our client state)::

    <output_dir>/
      config.json                      resolved run config (written once at start)
      metrics.jsonl
      latest                           text file: the newest complete tag
      global_step<N>/
        mp_rank_00_model_states.pt     trainable weights + buffers (the frozen backbone is
                                       excluded) and the client state below
        *_optim_states.pt              ZeRO optimizer shards, one per rank
        .vla_ds_incomplete             only while the save runs (or after it was killed)

Saves are atomic: rank 0 marks the tag dir incomplete before any rank writes, every rank
writes (DeepSpeed, ending in a barrier), then rank 0 syncs the files to disk, removes the
mark, and only then points ``latest`` at the tag (write to a temporary file + rename). A
process killed at any moment leaves ``latest`` on the previous complete checkpoint, and a
half-written tag dir keeps its mark, so loading it is refused with a message.

Client state (plain Python values and tensors: the file loads with
``torch.load(weights_only=True)``): ``step``, ``epoch`` (completed epochs),
``micro_step_in_epoch`` (position inside the current epoch), ``micro_batch_size`` and
``world_size`` (a mid-epoch position only means something for the same layout), ``seed``,
``norm_stats``, ``config`` (resolved run config), ``backbone_fingerprint``,
``vla_ds_version``. Random state needs no saving: the trainer reseeds every micro step from
(seed, rank, step), which is what makes ``--resume`` continue exactly.

ZeRO optimizer shards load only on the number of ranks that wrote them. A universal
checkpoint (``scripts/convert_checkpoint.py DIR OUT --to universal``: DeepSpeed's layout,
``<tag>/zero/<param>/*.pt`` next to the same model-states file) loads on any number; the
run sets DeepSpeed's ``checkpoint.load_universal`` for it (:func:`is_universal`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from vla_ds.errors import CheckpointError
from vla_ds.models.action_expert import LEGACY_HEAD, ActionExpertConfig, stored_section
from vla_ds.models.policy import state_dict_problems
from vla_ds.training.config import PROJECT_KEY, zero_stage
from vla_ds.training.ema import ema_weights

logger = logging.getLogger(__name__)

LATEST_FILE = "latest"
INCOMPLETE_MARK = ".vla_ds_incomplete"
TAG_PATTERN = re.compile(r"global_step(\d+)")
# Rank 0's module + client state: ZeRO-1/2 write the first name, ZeRO-3 the second.
MODEL_STATES_FILES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
# The client state every checkpoint carries (the module docstring says what each means): where
# the run is, the layout a mid-epoch position needs unchanged, and what the run was.
POSITION_KEYS = ("step", "epoch", "micro_step_in_epoch")
LAYOUT_KEYS = ("world_size", "micro_batch_size", "grad_accum", "train_samples", "seed")
CLIENT_KEYS = (*POSITION_KEYS, "norm_stats", "config")  # required to resume or convert
# What ds_to_universal adds to a tag dir: per-parameter fp32 weights and optimizer states.
UNIVERSAL_STATE_FILE = Path("zero") / "optimizer_state.pt"
# Module prefixes Stage 2 takes from Stage 1 (the heads and the normalisation statistics).
STAGE1_PARTS = ("sensor_encoder", "action_expert")
STAGE1_BUFFERS = ("action_norm", "sensor_norm")


def tag_for_step(step: int) -> str:
    return f"global_step{step}"


def save_checkpoint(engine, output_dir: str | Path, step: int, client_state: dict[str, Any],
                    keep_last: int = 0) -> Path:
    """Save an engine checkpoint as ``<output_dir>/global_step<step>``, atomically (see the
    module docstring). Collective: call on every rank.

    The frozen base model is excluded (``exclude_frozen_parameters``): a checkpoint holds
    what training changed, not another copy of the 3B backbone. With ``keep_last`` K > 0,
    older checkpoints beyond the newest K are deleted, only once this one is complete.
    """
    import deepspeed.comm as dist

    out, tag = Path(output_dir), tag_for_step(step)
    tag_dir = out / tag
    is_main = dist.get_rank() == 0
    if is_main:
        tag_dir.mkdir(parents=True, exist_ok=True)
        _write_durably(tag_dir / INCOMPLETE_MARK, "a save of this checkpoint started and has not finished\n")
    dist.barrier()  # nobody writes into the tag dir before it is marked
    engine.save_checkpoint(str(out), tag=tag, client_state=client_state, save_latest=False,
                           exclude_frozen_parameters=True)  # ends with a barrier: every rank's files are written
    from vla_ds.training.distributed import long_phase

    with long_phase("checkpoint sync to disk", str(out)):  # minutes on a slow shared filesystem
        if is_main:
            for file in sorted(p for p in tag_dir.rglob("*") if p.is_file()):
                _fsync(file)
            (tag_dir / INCOMPLETE_MARK).unlink()
            _fsync(tag_dir)
            _write_durably(out / LATEST_FILE, tag)
            if keep_last > 0:
                prune_checkpoints(out, keep_last)
    logger.info("saved checkpoint %s", tag_dir)
    return tag_dir


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically: a reader sees the old or the new content."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)


def checkpoint_tags(output_dir: str | Path) -> list[tuple[int, Path, bool]]:
    """``(step, tag dir, complete)`` of every ``global_stepN`` in ``output_dir``, by step."""
    out = []
    for p in Path(output_dir).glob("global_step*"):
        m = TAG_PATTERN.fullmatch(p.name)
        if m and p.is_dir():
            out.append((int(m[1]), p, not (p / INCOMPLETE_MARK).exists()))
    return sorted(out)


def prune_checkpoints(output_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints, and half-written ones
    older than the newest complete one. The one ``latest`` names is always kept."""
    output_dir = Path(output_dir)
    latest = (output_dir / LATEST_FILE).read_text().strip() if (output_dir / LATEST_FILE).is_file() else None
    tags = checkpoint_tags(output_dir)
    complete = [(step, p) for step, p, ok in tags if ok]
    keep = {p for _, p in complete[-keep_last:]}
    newest = complete[-1][0] if complete else None
    removed = []
    for step, p, ok in tags:
        if p in keep or p.name == latest or (not ok and (newest is None or step > newest)):
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    if removed:
        logger.info("removed %d older checkpoint(s) (save_total_limit %d): %s", len(removed), keep_last,
                    ", ".join(p.name for p in removed))
    return removed


def strict_trainable_load(src: dict[str, torch.Tensor], dst: nn.Module) -> None:
    """Load a checkpoint's module state into ``dst``: strict about everything it saved.

    Every saved tensor must exist in ``dst`` with the same shape, and every trainable
    parameter and buffer of ``dst`` must be in the checkpoint; only frozen parameters
    (the backbone base, re-loaded from ``--vl-model``) may be absent. Used as
    DeepSpeed's ``custom_load_fn`` instead of a silent ``strict=False``.
    """
    own = dst.state_dict()
    frozen = {n for n, p in dst.named_parameters() if not p.requires_grad}
    problems = state_dict_problems(src, own, optional=frozen)
    if problems:
        raise CheckpointError("checkpoint does not match the model: " + "; ".join(problems))
    dst.load_state_dict(src, strict=False)


def resolve_checkpoint_dir(path: str | Path) -> tuple[Path, str]:
    """An output dir (its ``latest``) or one ``global_stepN`` dir -> (load_dir, tag)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint directory does not exist")
    if (path / LATEST_FILE).is_file():
        tag = (path / LATEST_FILE).read_text().strip()
        if not (path / tag).is_dir():
            raise CheckpointError(f"{path / LATEST_FILE}: names '{tag}', which does not exist in {path}")
        _refuse_incomplete(path / tag)
        return path, tag
    if (path / INCOMPLETE_MARK).exists():
        _refuse_incomplete(path)
    if path.is_dir() and any((path / name).is_file() for name in MODEL_STATES_FILES):
        return path.parent, path.name
    raise CheckpointError(f"{path}: not a checkpoint (no '{LATEST_FILE}' file and no {MODEL_STATES_FILES[0]} inside)")


def _refuse_incomplete(tag_dir: Path) -> None:
    if not (tag_dir / INCOMPLETE_MARK).exists():
        return
    complete = [p for _, p, ok in checkpoint_tags(tag_dir.parent) if ok]
    hint = (f"resume from {tag_dir.parent} (its '{LATEST_FILE}' names the last complete one) or {complete[-1]}"
            if complete else "no complete checkpoint is next to it")
    raise CheckpointError(f"{tag_dir}: half-written checkpoint (its save was interrupted; {INCOMPLETE_MARK} is "
                          f"still there), not loaded; {hint}")


def is_universal(tag_dir: str | Path) -> bool:
    """Whether ``tag_dir`` (one ``global_stepN``) is a DeepSpeed universal checkpoint."""
    return (Path(tag_dir) / UNIVERSAL_STATE_FILE).is_file()


def model_states_file(tag_dir: Path) -> Path:
    for name in MODEL_STATES_FILES:
        if (tag_dir / name).is_file():
            return tag_dir / name
    raise CheckpointError(f"{tag_dir}: incomplete checkpoint (no {MODEL_STATES_FILES[0]})")


def read_model_states(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """The rank-0 model-states file of a checkpoint dir (module weights + client state),
    read on the CPU without DeepSpeed; for checks before any process group starts."""
    load_dir, tag = resolve_checkpoint_dir(path)
    file = model_states_file(load_dir / tag)
    try:
        states = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated / not a torch file / not from vla_ds
        raise CheckpointError(f"{file}: cannot read checkpoint ({str(e).splitlines()[0][:200]})") from None
    missing = [k for k in ("module", *CLIENT_KEYS) if k not in states]
    if missing:
        raise CheckpointError(f"{file}: not a vla_ds checkpoint (missing {', '.join(missing)})")
    return file, states


def run_layout(cfg, world_size: int, train_samples: int) -> dict[str, int]:
    """The ``LAYOUT_KEYS`` of a run: saved in its checkpoints, compared on resume."""
    layout = {"world_size": world_size, "micro_batch_size": cfg.micro_batch_size, "grad_accum": cfg.grad_accum,
              "train_samples": train_samples, "seed": cfg.train.seed}
    assert tuple(layout) == LAYOUT_KEYS
    return layout


def client_state(position: dict[str, int], layout: dict[str, int], extra: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's client state: ``position`` (``POSITION_KEYS``), ``layout``
    (:func:`run_layout`) and ``extra`` (norm stats, config, fingerprint, version, EMA)."""
    return {**{k: position[k] for k in POSITION_KEYS}, **layout, **extra}


def check_resume_compatible(states: dict[str, Any], file: Path, fingerprint: str, layout: dict[str, int]) -> None:
    """Refuse a resume that could not continue exactly: another base backbone, or a
    mid-epoch position under another batch layout or training split (``layout``: the
    :func:`run_layout` of the run about to start)."""
    saved = states.get("backbone_fingerprint")
    if saved and saved != fingerprint:
        raise CheckpointError(f"{file}: saved with another VL backbone (fingerprint {saved}, the --vl-model "
                              f"given now has {fingerprint}); pass the --vl-model the run was started with")
    saved_ranks = states.get("dp_world_size")
    if (saved_ranks and saved_ranks != layout["world_size"] and not is_universal(file.parent)
            and any(file.parent.glob("*optim_states.pt"))):
        raise CheckpointError(f"{file.parent}: saved by {saved_ranks} ranks and ZeRO's optimizer shards only load on "
                              f"as many ({layout['world_size']} now); convert it with scripts/convert_checkpoint.py "
                              f"{file.parent.parent} OUT --tag {file.parent.name} --to universal, then --resume OUT")
    if states["micro_step_in_epoch"]:
        changed = [f"{k} {states.get(k)} -> {v}" for k, v in layout.items() if states.get(k) != v]
        if changed:
            raise CheckpointError(f"{file}: saved mid-epoch; resuming there needs the same batch layout and "
                                  f"training split, but {', '.join(changed)}")


def load_checkpoint(engine, path: str | Path) -> dict[str, Any]:
    """Restore module, optimizer and scheduler state from ``path``; returns the client state. Collective."""
    load_dir, tag = resolve_checkpoint_dir(path)
    if is_universal(load_dir / tag) and not engine.zero_optimization_partition_weights():
        # DeepSpeed restores a universal checkpoint from zero/ and skips custom_load_fn: check
        # (and load: buffers) the saved module here, so a mismatch is a message, not an assertion.
        _, states = read_model_states(load_dir / tag)
        try:
            strict_trainable_load(states["module"], engine.module)
        except CheckpointError as e:
            raise CheckpointError(f"{load_dir / tag}: {e}") from None
    try:
        load_path, client_state = engine.load_checkpoint(str(load_dir), tag=tag, custom_load_fn=strict_trainable_load)
    except CheckpointError as e:
        raise CheckpointError(f"{load_dir / tag}: {e}") from None
    if load_path is None:
        raise CheckpointError(f"{load_dir / tag}: DeepSpeed could not load this checkpoint")
    from vla_ds.training.engine import replay_adam_step_counter

    replay_adam_step_counter(engine)  # the CPU Adam kernels' beta^t, as the uninterrupted run has it
    scheduler = engine.lr_scheduler
    if scheduler is not None and hasattr(scheduler, "last_batch_iteration"):
        # The loaded optimizer param groups carry the lr the saving run set last (a universal
        # checkpoint always, by DeepSpeed's design); re-apply this run's schedule at the saved
        # position so the next update uses it (they differ when --epochs changed the length).
        scheduler.step(scheduler.last_batch_iteration)
    logger.info("resumed from %s (step %s, %s completed epochs)", load_dir / tag,
                client_state.get("step"), client_state.get("epoch"))
    return client_state


class WeightsFile(NamedTuple):
    """A weights-only ``.pt`` (:func:`read_weights_file`)."""

    source: Path
    stage: str                                    # the run that saved it: stage1 or stage2
    state: dict[str, torch.Tensor]                # VLAPolicy.state_dict() names
    norm_stats: dict[str, Any] | None
    head: dict[str, Any]                          # head_settings: objective, prediction_type, conditioning


def read_weights_file(path: str | Path, what: str = "checkpoint") -> WeightsFile:
    """Read the guide's weights-only ``.pt`` (the research script's, or
    ``convert_checkpoint.py --to stage1/stage2``): Stage 1's ``{"sensor_encoder": sd,
    "action_expert": sd, "training_stage": "stage1"}`` or Stage 2's ``{"model_state_dict":
    sd, "training_stage": "stage2"}``, each optionally with ``norm_stats`` and ``head``.
    Without ``head`` the file is the research script's: the DDPM epsilon head."""
    path = Path(path)
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read the {what} ({str(e).splitlines()[0][:200]})") from None
    if isinstance(raw, dict) and isinstance(raw.get("model_state_dict"), dict):
        state, stage = dict(raw["model_state_dict"]), raw.get("training_stage", "stage2")
    elif isinstance(raw, dict) and all(isinstance(raw.get(k), dict) for k in STAGE1_PARTS):
        state = {f"{part}.{k}": v for part in STAGE1_PARTS for k, v in raw[part].items()}
        stage = raw.get("training_stage", "stage1")
    else:
        keys = ", ".join(map(str, raw.keys())) if isinstance(raw, dict) else type(raw).__name__
        raise CheckpointError(f"{path}: not a Stage 1 or Stage 2 weights file: expected the keys sensor_encoder and "
                              f"action_expert (Stage 1) or model_state_dict (Stage 2), found {keys}")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: {len(bad)} entries are not tensors (e.g. {bad[0]})")
    head = raw.get("head") if isinstance(raw.get("head"), dict) else None
    norm_stats = raw.get("norm_stats") if isinstance(raw.get("norm_stats"), dict) else None
    return WeightsFile(path, str(stage), state, norm_stats, head_settings(head))


def split_parts(state: dict[str, torch.Tensor], parts) -> dict[str, dict[str, torch.Tensor]]:
    """``{"part.name": t}`` -> ``{part: {name: t}}`` for the given top-level parts."""
    return {part: {k[len(part) + 1:]: v for k, v in state.items() if k.startswith(part + ".")} for part in parts}


def load_weights_file(policy: nn.Module, weights: WeightsFile) -> None:
    """Load a weights-only ``.pt`` into ``policy`` (adapters already set up), strictly: every
    tensor it has must fit, and every trainable parameter must be in it."""
    own = policy.state_dict()
    stray_adapters = [k for k in weights.state if k.startswith("backbone.") and k not in own]
    if stray_adapters:
        raise CheckpointError(f"{weights.source}: saved by a {weights.stage} run with VL-model weights "
                              f"(e.g. {stray_adapters[0]}) this run does not train; continue it with the same "
                              "--training-stage and --finetune-vl")
    # Frozen base weights come from --vl-model, the normalisation buffers from the statistics
    # the policy was built with (a Stage 1 .pt carries them as norm_stats, not as tensors).
    optional = {n for n, p in policy.named_parameters() if not p.requires_grad}
    optional |= {k for k in own if k.split(".")[0] in STAGE1_BUFFERS}
    problems = state_dict_problems(weights.state, own, optional=optional)
    if problems:
        raise CheckpointError(f"{weights.source}: does not match the model: {'; '.join(problems)}")
    policy.load_state_dict(weights.state, strict=False)
    logger.info("Loaded %d tensors from %s", len(weights.state), weights.source)


class Stage1Weights(NamedTuple):
    """What Stage 2 starts from (:func:`read_stage1`)."""

    source: Path                                  # the file read
    parts: dict[str, dict[str, torch.Tensor]]     # part name -> its state dict
    norm_stats: dict[str, Any] | None             # NormStats.to_dict(), when the source has them
    head: dict[str, Any]                          # head_settings: objective, prediction_type, conditioning


def head_settings(action_expert_section: dict[str, Any] | None) -> dict[str, Any]:
    """``{"objective", "prediction_type", "vl_conditioning", "vl_attention", "vl_normalize"[, "vl_grid"]}`` of a stored
    action-expert config section (or a ``.pt``'s ``head``); a section written before they
    existed (or none) is the guide's DDPM epsilon head on the pooled vector."""
    section = stored_section(action_expert_section or {})
    head = {k: section.get(k, LEGACY_HEAD[k]) for k in LEGACY_HEAD}
    head["vl_conditioning"] = section["vl_conditioning"]
    head["vl_attention"] = section.get("vl_attention", ActionExpertConfig.vl_attention)
    head["vl_normalize"] = section["vl_normalize"]
    if head["vl_conditioning"] == "tokens":
        head["vl_grid"] = section.get("vl_grid", ActionExpertConfig.vl_grid)
    return head


def read_stage1(path: str | Path) -> Stage1Weights:
    """Read the Stage 1 weights Stage 2 starts from, before any model is built.

    ``path`` is a Stage 1 output dir, one of its ``global_stepN`` dirs, or a guide-format
    ``.pt`` (``{"sensor_encoder": ..., "action_expert": ..., "training_stage": "stage1"}``,
    optionally with ``norm_stats`` and, from ``convert_checkpoint.py --to stage1``,
    ``head``). The parts are ``sensor_encoder``, ``action_expert`` and, from engine
    checkpoints, the normalisation buffers. From an engine checkpoint the weights are the fp32
    master weights (not the module's bf16 copy), or the fp32 EMA of them when the run kept one
    (the weights its exported policy uses); :func:`set_master_weights` puts them into the
    Stage 2 optimizer, whose own masters start from the bf16 module.
    """
    path = Path(path)
    if not path.exists():
        hint = (" (a vla_ds Stage 1 run writes DeepSpeed checkpoints into its --output_dir, checkpoints/stage1 by "
                "default: pass that directory, or make this .pt from it with scripts/convert_checkpoint.py "
                "--to stage1)" if path.suffix == ".pt" else "")
        raise CheckpointError(f"{path}: Stage 1 checkpoint does not exist{hint}")
    if path.is_file():
        weights = read_weights_file(path, "Stage 1 checkpoint")
        if weights.stage != "stage1":
            logger.warning("%s was saved by a %s run; taking its sensor encoder and action expert", path,
                           weights.stage)
        parts = split_parts(weights.state, (*STAGE1_PARTS, *STAGE1_BUFFERS))
        if not all(parts[name] for name in STAGE1_PARTS):
            raise CheckpointError(f"{path}: not a Stage 1 checkpoint: it has no "
                                  f"{' and no '.join(n for n in STAGE1_PARTS if not parts[n])} tensors")
        return Stage1Weights(path, {k: v for k, v in parts.items() if v}, weights.norm_stats, weights.head)
    source, states = read_model_states(path)
    project = states["config"].get("vla_ds", {})
    stage = project.get("stage")
    if stage not in (None, "stage1"):
        logger.warning("%s was saved by a %s run; taking its sensor encoder and action expert", source, stage)
    # The fp32 master weights, gathered from the optimizer shards: the module's own copy is the
    # bf16 one under ZeRO-1/2 (and partitioned under ZeRO-3).
    module = {**states["module"], **consolidated_state(SourceCheckpoint(source.parent.parent, source.parent.name,
                                                                        states))}
    averaged = ema_weights(states)
    if averaged is not None:
        logger.info("%s: taking the EMA of the Stage 1 weights", source)
        module = {**module, **averaged}
    return Stage1Weights(source, split_parts(module, (*STAGE1_PARTS, *STAGE1_BUFFERS)), states["norm_stats"], head_settings(project.get("action_expert")))


def load_stage1_weights(policy: nn.Module, source: Path, parts: dict[str, dict[str, torch.Tensor]]) -> None:
    """Load :func:`read_stage1`'s parts into ``policy``, strictly; mismatches are named."""
    logger.info("Loading Stage 1 checkpoint from %s", source)
    for name, state in parts.items():
        target = getattr(policy, name)
        problems = state_dict_problems(state, target.state_dict())
        if problems:
            raise CheckpointError(f"{source}: {name} does not match the model: {'; '.join(problems)}")
        target.load_state_dict(state)
    logger.info("   Loaded Sensor Encoder from Stage 1")
    logger.info("   Loaded Diffusion Action Expert from Stage 1")


# ---------------------------------------------------------------------------------------
# Reading a checkpoint whole: its model states and the weights gathered from every rank's
# ZeRO shard (what --stage1-checkpoint, convert_checkpoint.py and exports read)


BF16_ZERO_SHARDS = "bf16_zero_pp_rank_*_mp_rank_00_optim_states.pt"  # one per rank when bf16 is on


def cast_floating(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Floating tensors cast to ``dtype``, others kept; every tensor a contiguous copy of
    its own (safetensors refuses tensors that share memory, and DeepSpeed's consolidated
    weights are views into one flat buffer)."""
    return {k: v.detach().to(dtype=dtype if v.is_floating_point() else v.dtype, copy=True).contiguous()
            for k, v in state.items()}


@dataclass
class SourceCheckpoint:
    """One engine checkpoint: where it is and its rank-0 model states (module + client state)."""

    load_dir: Path
    tag: str
    states: dict[str, Any] = field(repr=False)

    @property
    def tag_dir(self) -> Path:
        return self.load_dir / self.tag

    @property
    def step(self) -> int:
        return int(self.states["step"])

    @property
    def config(self) -> dict[str, Any]:
        return self.states["config"]

    @property
    def project(self) -> dict[str, Any]:
        return self.config.get(PROJECT_KEY, {})

    @property
    def stage(self) -> str:
        return self.project.get("stage", "stage1")

    @property
    def finetune_mode(self) -> str:
        return self.project.get("finetune", {}).get("mode", "none")

    @property
    def backbone_path(self) -> str:
        return self.project.get("backbone", {}).get("model_name_or_path", "")

    @property
    def norm_stats(self) -> dict[str, Any]:
        return self.states["norm_stats"]

    @property
    def head(self) -> dict[str, str]:
        return head_settings(self.project.get("action_expert"))

    @property
    def ema(self) -> dict[str, torch.Tensor] | None:
        return ema_weights(self.states)


def _tags(path: Path) -> list[str]:
    tags = [p.name for p in path.glob("global_step*") if p.is_dir()]
    return sorted(tags, key=lambda t: int(t[len("global_step"):]) if t[len("global_step"):].isdigit() else -1)


def open_checkpoint(path: str | Path, tag: str | None = None) -> SourceCheckpoint:
    """Resolve ``path`` (an output dir, or one ``global_stepN`` dir) and ``tag`` to a
    checkpoint and read its model states; every problem is a :class:`CheckpointError` naming the path."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory does not exist")
    if tag:
        if path.name == tag and not (path / tag).is_dir():
            target = path
        elif (path / tag).is_dir():
            target = path / tag
        else:
            tags = _tags(path)
            raise CheckpointError(f"{path}: no checkpoint tag '{tag}' (available: {', '.join(tags) or 'none'})")
    else:
        target = path
        has_model_states = any((path / name).is_file() for name in MODEL_STATES_FILES)
        if not (path / LATEST_FILE).is_file() and not has_model_states:
            tags = _tags(path)
            if tags:
                raise CheckpointError(f"{path}: no '{LATEST_FILE}' file; pick a checkpoint with --tag "
                                      f"(available: {', '.join(tags)})")
    file, states = read_model_states(target)
    if is_universal(file.parent):
        raise CheckpointError(f"{file.parent}: already a universal checkpoint; convert the original engine "
                              "checkpoint it was made from")
    return SourceCheckpoint(file.parent.parent, file.parent.name, states)


@contextlib.contextmanager
def deepspeed_output_to_log(what: str):
    """DeepSpeed's conversion tools print (and draw tqdm bars); send that to the debug log
    so the CLI prints only results, and turn their assertions into one-line errors."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            yield
    except (AssertionError, ValueError, RuntimeError, FileNotFoundError, KeyError) as e:
        logger.debug("%s output:\n%s", what, buffer.getvalue())
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise CheckpointError(f"{what} failed: {first}") from None
    logger.debug("%s output:\n%s", what, buffer.getvalue())


def consolidated_state(ckpt: SourceCheckpoint) -> dict[str, torch.Tensor]:
    """The trainable weights (fp32 master copies, gathered from every rank's ZeRO shard)
    plus the module's buffers, keys as in VLAPolicy.state_dict(); the frozen base is not in
    the checkpoint. DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint``, or for ZeRO-1
    with bf16, which it refuses, :func:`_bf16_zero_state`."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if _uses_bf16_optimizer(ckpt.states.get("ds_config") or {}):
        shards = sorted(ckpt.tag_dir.glob(BF16_ZERO_SHARDS), key=lambda f: int(re.search(r"_pp_rank_(\d+)_", f.name)[1]))
        return cast_floating(_bf16_zero_state(ckpt, shards), torch.float32)
    with deepspeed_output_to_log(f"consolidating {ckpt.tag_dir}"):
        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.load_dir), tag=ckpt.tag,
                                                         exclude_frozen_parameters=True)
    return cast_floating(state, torch.float32)


def _uses_bf16_optimizer(ds_config: dict[str, Any]) -> bool:
    """Whether DeepSpeed trained with ``BF16_Optimizer`` (its rule: ZeRO-1, bf16 weights, fp32
    gradient accumulation, no optimizer offload) rather than its ZeRO optimizers."""
    zero = ds_config.get("zero_optimization") or {}
    offload = str((zero.get("offload_optimizer") or {}).get("device", "none")).lower()
    accum = str((ds_config.get("data_types") or {}).get("grad_accum_dtype") or "").lower()
    return (zero_stage(ds_config) == 1 and bool((ds_config.get("bf16") or {}).get("enabled"))
            and accum in ("fp32", "float32", "float") and offload in ("none", ""))


def _bf16_zero_state(ckpt: SourceCheckpoint, shards: list[Path]) -> dict[str, torch.Tensor]:
    """:func:`consolidated_state` of a ZeRO-1 + bf16 checkpoint (DeepSpeed's ``BF16_Optimizer``,
    ``bf16_zero_pp_rank_<r>_mp_rank_00_optim_states.pt``), whose layout
    ``get_fp32_state_dict_from_zero_checkpoint`` does not read ("is not a zero checkpoint").

    Rank r's file holds its partition of each parameter group's flat fp32 master weights and
    ``param_slice_mappings``: for every parameter with elements in that partition, where
    they lie in it. Taken in rank order, a parameter's pieces are the whole parameter."""
    from deepspeed.utils.tensor_fragment import fragment_address

    pieces: dict[str, list[torch.Tensor]] = {}
    for shard in shards:
        try:
            with torch.serialization.safe_globals([fragment_address]):
                optim = torch.load(shard, map_location="cpu", weights_only=True, mmap=True)["optimizer_state_dict"]
            groups = zip(optim["single_partition_of_fp32_groups"], optim["param_slice_mappings"], strict=True)
        except Exception as e:  # truncated, or not DeepSpeed's BF16_Optimizer layout
            raise CheckpointError(f"{shard}: cannot read optimizer shard ({str(e).splitlines()[0][:200]})") from None
        for flat, slices in groups:
            for name, where in slices.items():
                pieces.setdefault(name, []).append(flat.narrow(0, where.start, where.numel))
    state = {}
    for group in ckpt.states["param_shapes"]:
        for name, shape in group.items():
            whole = torch.cat(pieces.get(name, [torch.empty(0)]))
            if whole.numel() != shape.numel():
                raise CheckpointError(f"{ckpt.tag_dir}: parameter {name} has {whole.numel()} of its {shape.numel()} "
                                      f"elements in the {len(shards)} optimizer shard(s); is a rank's file missing?")
            state[name] = whole.view(shape).clone()  # owns its memory: the shards are memory-mapped
    module = ckpt.states["module"]
    state.update({name: module[name] for name in ckpt.states.get("buffer_names") or [] if name in module})
    return state
