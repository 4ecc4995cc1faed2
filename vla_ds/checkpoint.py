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

Client state (a plain dict of Python / numpy / tensor values, loadable with
``torch.load(weights_only=True)`` except for the RNG states):
``step``, ``epoch`` (completed epochs), ``micro_step_in_epoch`` (position inside the
current epoch, for resumes mid-epoch), ``rng`` (python, numpy, torch RNG states of the
saving rank), ``norm_stats``, ``config`` (resolved run config), ``backbone_fingerprint``,
``vla_ds_version``.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vla_ds.errors import CheckpointError

logger = logging.getLogger(__name__)

LATEST_FILE = "latest"


def tag_for_step(step: int) -> str:
    return f"global_step{step}"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(engine, output_dir: str | Path, step: int, client_state: dict[str, Any]) -> Path:
    """Save an engine checkpoint as ``<output_dir>/global_step<step>``. Collective: call on every rank.

    The frozen base model is excluded (``exclude_frozen_parameters``): a checkpoint holds
    what training changed, not another copy of the 3B backbone.
    """
    tag = tag_for_step(step)
    engine.save_checkpoint(str(output_dir), tag=tag, client_state=client_state, exclude_frozen_parameters=True)
    logger.info("saved checkpoint %s", Path(output_dir) / tag)
    return Path(output_dir) / tag


def strict_trainable_load(src: dict[str, torch.Tensor], dst: nn.Module) -> None:
    """Load a checkpoint's module state into ``dst``: strict about everything it saved.

    Every saved tensor must exist in ``dst`` with the same shape, and every trainable
    parameter and buffer of ``dst`` must be in the checkpoint; only frozen parameters
    (the backbone base, re-loaded from ``--vl-model``) may be absent. Used as
    DeepSpeed's ``custom_load_fn`` instead of a silent ``strict=False``.
    """
    own = dst.state_dict()
    frozen = {n for n, p in dst.named_parameters() if not p.requires_grad}
    unexpected = [k for k in src if k not in own]
    mismatched = [f"{k}: checkpoint {tuple(src[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in src if k in own and src[k].shape != own[k].shape]
    missing = [k for k in own if k not in src and k not in frozen]
    problems = []
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors (e.g. {', '.join(unexpected[:3])})")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches ({'; '.join(mismatched[:3])})")
    if missing:
        problems.append(f"{len(missing)} missing tensors (e.g. {', '.join(missing[:3])})")
    if problems:
        raise CheckpointError("checkpoint does not match the model: " + "; ".join(problems))
    dst.load_state_dict(src, strict=False)


def resolve_resume_dir(path: str | Path) -> tuple[Path, str]:
    """``--resume DIR``: an output dir (its ``latest``) or one ``global_stepN`` dir -> (load_dir, tag)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: resume directory does not exist")
    if (path / LATEST_FILE).is_file():
        tag = (path / LATEST_FILE).read_text().strip()
        if not (path / tag).is_dir():
            raise CheckpointError(f"{path / LATEST_FILE}: names '{tag}', which does not exist in {path}")
        return path, tag
    if path.is_dir() and any(path.glob("*model_states.pt")):
        return path.parent, path.name
    raise CheckpointError(f"{path}: not a checkpoint (no '{LATEST_FILE}' file and no *model_states.pt inside)")


def load_checkpoint(engine, path: str | Path) -> dict[str, Any]:
    """Restore module, optimizer and scheduler state from ``path``; returns the client state. Collective."""
    load_dir, tag = resolve_resume_dir(path)
    load_path, client_state = engine.load_checkpoint(str(load_dir), tag=tag, custom_load_fn=strict_trainable_load)
    if load_path is None:
        raise CheckpointError(f"{load_dir / tag}: DeepSpeed could not load this checkpoint")
    logger.info("resumed from %s (step %s, %s completed epochs)", load_dir / tag,
                client_state.get("step"), client_state.get("epoch"))
    return client_state
