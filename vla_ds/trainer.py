"""The training loop: fetch -> step -> log -> (per epoch) validate and save.

Works on any number of ranks; the functions that talk to other ranks say so and gate
rank-0 work (metrics, progress bar) inside.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from vla_ds.cache import VL_HIDDEN
from vla_ds.checkpoint import save_checkpoint
from vla_ds.config import RunConfig
from vla_ds.data.dataset import collate_numeric
from vla_ds.metrics import MetricsLogger

logger = logging.getLogger(__name__)


class PolicyCollator:
    """DataLoader collate: numeric fields stacked, images + instruction turned into
    backbone inputs (tokenised prompt, processed patches), or, for samples from the VL
    feature cache, the cached features stacked (``vl_hidden`` (B, hidden)) and no prompt
    built at all. Runs in the workers; picklable."""

    def __init__(self, input_builder):
        self.input_builder = input_builder

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collate_numeric(samples)
        images, instructions = batch.pop("images"), batch.pop("instruction")
        if VL_HIDDEN in batch:
            batch[VL_HIDDEN] = torch.from_numpy(np.stack(batch[VL_HIDDEN]))  # (B, hidden)
        else:
            batch.update(self.input_builder(images, instructions))
        return batch


def to_device(batch: dict[str, Any], device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor)}


def validation_noise(batch: dict[str, torch.Tensor], seed: int, horizon: int, action_dim: int,
                     num_timesteps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed diffusion noise and timestep per validation sample, derived from the sample's
    identity (episode, frame time) and the seed, so every epoch (and every rank layout)
    scores the same problem and validation losses are comparable."""
    noise, steps = [], []
    for ep, t in zip(batch["episode_index"].tolist(), batch["frame_time"].tolist()):
        g = torch.Generator().manual_seed((seed * 1_000_003 + ep * 100_003 + round(t * 1000)) % (2**63))
        noise.append(torch.randn(horizon, action_dim, generator=g))
        steps.append(torch.randint(0, num_timesteps, (1,), generator=g))
    return torch.stack(noise), torch.cat(steps)


def validation_indices(num_samples: int, rank: int, world_size: int) -> tuple[list[int], int]:
    """This rank's validation samples, padded (by repeating its first) to the same count on
    every rank so each rank runs the same number of forward passes (ZeRO-3 gathers
    parameters collectively, so unequal counts would hang). Returns (indices, real count)."""
    own = list(range(rank, num_samples, world_size))
    per_rank = -(-num_samples // world_size)
    return own + [own[0] if own else 0] * (per_rank - len(own)), len(own)


@torch.no_grad()
def validate(engine, loader: DataLoader, num_real: int, cfg: RunConfig) -> float:
    """Mean weighted validation loss over every rank's share (padding excluded). Collective."""
    import deepspeed.comm as dist

    engine.eval()
    ae = cfg.action_expert
    total = torch.zeros(2, dtype=torch.float64, device=engine.device)  # (sum of losses, count)
    seen = 0
    for batch in loader:
        noise, steps = validation_noise(batch, cfg.train.seed, ae.horizon, ae.action_dim, ae.num_train_timesteps)
        batch = to_device(batch, engine.device)
        batch["noise"], batch["timesteps"] = noise.to(engine.device), steps.to(engine.device)
        out = engine(batch)
        keep = max(0, min(len(noise), num_real - seen))  # the rest of the batch is padding
        seen += len(noise)
        total[0] += (out["per_sample_loss"] * out["sample_weight"])[:keep].double().sum()
        total[1] += keep
    dist.all_reduce(total)
    engine.train()
    return float(total[0] / total[1].clamp(min=1))


def micro_step_seed(seed: int, rank: int, micro_step: int) -> int:
    """Seed of the global RNGs for one micro step (diffusion noise and timesteps, dropout).

    A function of (seed, rank, micro step) alone: ranks draw different noise, and a resumed
    run draws exactly what the uninterrupted run drew, whatever happened in between
    (DataLoader iterators, validation) and without saving RNG states."""
    return (seed * 1_000_003 + rank * 7_919 + micro_step * 104_729) % (2**63 - 1)


@dataclass
class TrainState:
    """Where the run is; saved in every checkpoint's client state."""

    step: int = 0                 # optimizer steps done (one per accumulation cycle)
    epoch: int = 0                # completed epochs
    micro_step_in_epoch: int = 0  # micro batches consumed in the current epoch
    history: list[float] = field(default_factory=list)  # train/loss per logged step (rank 0)


def _all_reduce_mean(value: torch.Tensor) -> float:
    import deepspeed.comm as dist

    value = value.detach().float().clone()
    dist.all_reduce(value)
    return float(value) / dist.get_world_size()


def train(
    cfg: RunConfig,
    engine,
    train_loader: DataLoader,
    val_loader: tuple[DataLoader, int] | None,
    sampler,
    group_names: list[str],
    state: TrainState,
    client_extra: dict[str, Any],
    total_steps: int,
) -> TrainState:
    """Run epochs ``state.epoch .. cfg.train.epochs - 1`` (or until ``max_steps``). Collective.

    ``val_loader`` is (loader, this rank's real sample count) from :func:`validation_indices`.
    """
    import deepspeed.comm as dist

    rank = dist.get_rank()
    is_main = rank == 0
    accum = cfg.grad_accum
    steps_per_epoch = len(sampler) // cfg.micro_batch_size // accum
    global_batch = cfg.deepspeed["train_batch_size"]
    metrics = MetricsLogger(cfg.train.output_dir, engine.monitor, is_main, resume_step=state.step if state.step else None)
    bar = None
    if is_main and cfg.train.progress_bar:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=state.step, desc="train", unit="step", dynamic_ncols=True)

    def checkpoint() -> None:
        client = {"step": state.step, "epoch": state.epoch, "micro_step_in_epoch": state.micro_step_in_epoch,
                  "micro_batch_size": cfg.micro_batch_size, "world_size": dist.get_world_size(),
                  "grad_accum": accum, "train_samples": len(train_loader.dataset),
                  "seed": cfg.train.seed, **client_extra}
        save_checkpoint(engine, cfg.train.output_dir, state.step, client)

    def run_validation() -> None:
        if val_loader is None:
            return
        val_loss = validate(engine, *val_loader, cfg)
        metrics.log({"step": state.step, "epoch": state.epoch, "val/loss": val_loss})
        logger.info("epoch %d step %d: val/loss %.4f", state.epoch, state.step, val_loss)

    if state.step == 0 and cfg.stage == "stage2":
        # The guide: Stage 2 starts below Stage 1's final validation loss (LoRA B is zero,
        # so before the first update this *is* Stage 1's model); logged as the step-0 row.
        run_validation()
    engine.train()
    done = False
    while state.epoch < cfg.train.epochs and not done:
        sampler.set_epoch(state.epoch, start_index=state.micro_step_in_epoch * cfg.micro_batch_size)
        loss_sum = torch.zeros((), device=engine.device)
        data_wait, step_start, steps_since_log = 0.0, time.perf_counter(), 0
        it = iter(train_loader)
        while state.micro_step_in_epoch < steps_per_epoch * accum:
            torch.manual_seed(micro_step_seed(cfg.train.seed, rank, state.step * accum + state.micro_step_in_epoch % accum))
            t0 = time.perf_counter()
            batch = next(it)
            data_wait += time.perf_counter() - t0
            out = engine(to_device(batch, engine.device))
            engine.backward(out["loss"])
            boundary = engine.is_gradient_accumulation_boundary()
            lrs = engine.get_lr() if boundary else None  # the rates this update uses
            engine.step()
            loss_sum += out["loss"].detach()
            state.micro_step_in_epoch += 1
            if not boundary:
                continue
            # One optimizer step done: one host sync (the loss average), not one per micro step.
            state.step += 1
            steps_since_log += 1
            if state.step % cfg.train.log_every == 0 or state.step == total_steps:
                loss = _all_reduce_mean(loss_sum / accum)
                elapsed = time.perf_counter() - step_start
                row = {"step": state.step, "epoch": state.epoch + 1, "train/loss": loss}
                row.update({f"train/lr/{n}": float(lr) for n, lr in zip(group_names, lrs)})
                grad_norm = engine.get_global_grad_norm()
                if grad_norm is not None:
                    row["train/grad_norm"] = float(grad_norm)
                row["samples_per_s"] = global_batch * steps_since_log / max(elapsed, 1e-9)
                row["data_share"] = data_wait / max(elapsed, 1e-9)
                metrics.log(row)
                state.history.append(loss)
                if bar is not None:
                    bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
                data_wait, step_start, steps_since_log = 0.0, time.perf_counter(), 0
            loss_sum.zero_()
            if bar is not None:
                bar.update(1)
            if cfg.train.max_steps and state.step >= cfg.train.max_steps:
                done = True
                break
        epoch_finished = state.micro_step_in_epoch >= steps_per_epoch * accum
        if epoch_finished:  # also when max_steps lands exactly on the last step of an epoch
            state.epoch += 1
            state.micro_step_in_epoch = 0
        if done or state.epoch % cfg.train.validate_every_epochs == 0 or state.epoch == cfg.train.epochs:
            run_validation()
        checkpoint()
    if bar is not None:
        bar.close()
    metrics.close()
    return state


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
