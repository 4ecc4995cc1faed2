"""The training loop: fetch -> step -> log -> (per epoch) validate and save.

Works on any number of ranks; the functions that talk to other ranks say so and gate
rank-0 work (metrics, progress bar) inside.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from vla_ds import engine as engine_lib
from vla_ds.cache import VL_HIDDEN
from vla_ds.checkpoint import save_checkpoint
from vla_ds.config import RunConfig
from vla_ds.data.dataset import collate_numeric
from vla_ds.data.loading import BAD_SAMPLE, for_transfer
from vla_ds.ema import CLIENT_KEY as EMA_CLIENT_KEY
from vla_ds.ema import ParameterEMA
from vla_ds.errors import DatasetError, TrainingError
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
        # With on_bad_sample="skip" the dataset hands back {BAD_SAMPLE: message} for a sample
        # it could not load: drop it, and carry the message to the trainer's per-file count.
        bad = [s[BAD_SAMPLE] for s in samples if BAD_SAMPLE in s]
        samples = [s for s in samples if BAD_SAMPLE not in s]
        if not samples:  # nothing to stack; the caller decides (the cache build skips it)
            return for_transfer({BAD_SAMPLE: bad})
        batch = collate_numeric(samples)
        images, instructions = batch.pop("images"), batch.pop("instruction")
        if VL_HIDDEN in batch:
            batch[VL_HIDDEN] = torch.from_numpy(np.stack(batch[VL_HIDDEN]))  # (B, hidden)
        else:
            batch.update(self.input_builder(images, instructions))
        batch[BAD_SAMPLE] = bad
        return for_transfer(batch)  # leaves a worker in one piece


def to_device(batch: dict[str, Any], device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor)}


def validation_noise(batch: dict[str, torch.Tensor], seed: int, horizon: int,
                     action_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed noise (B, H, A) and a uniform draw u (B,) in [0, 1) per validation sample,
    derived from the sample's identity (episode, frame time) and the seed, so every epoch
    (and every rank layout) scores the same problem and validation losses are comparable.
    The action expert turns u into its own kind of timestep (``timesteps_from_uniform``)."""
    noise, uniform = [], []
    for ep, t in zip(batch["episode_index"].tolist(), batch["frame_time"].tolist()):
        g = torch.Generator().manual_seed((seed * 1_000_003 + ep * 100_003 + round(t * 1000)) % (2**63))
        noise.append(torch.randn(horizon, action_dim, generator=g))
        uniform.append(torch.rand(1, generator=g))
    return torch.stack(noise), torch.cat(uniform)


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
    expert = engine.module.action_expert
    total = torch.zeros(2, dtype=torch.float64, device=engine.device)  # (sum of losses, count)
    seen = 0
    for batch in loader:
        pop_bad_samples(batch)
        noise, uniform = validation_noise(batch, cfg.train.seed, expert.config.horizon, expert.config.action_dim)
        batch = to_device(batch, engine.device)
        batch["noise"] = noise.to(engine.device)
        batch["timesteps"] = expert.timesteps_from_uniform(uniform).to(engine.device)
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


def seed_generators(seed: int, device: torch.device) -> None:
    """``torch.manual_seed(seed)`` for the generators a micro step draws from: the CPU
    one and ``device``'s (its current device). ``torch.manual_seed`` also visits every
    other backend torch is built with, capturing a Python stack for each one not
    initialised: half a millisecond per call on a CPU host, on every micro batch."""
    torch.default_generator.manual_seed(seed)
    if device.type != "cpu":
        torch.get_device_module(device.type).manual_seed(seed)


class MicroSteps:
    """Drives the micro batches of each optimizer step on the engine: reseed (see
    :func:`micro_step_seed`), forward, backward, ``engine.step()`` (an update at the
    accumulation boundary).

    With ``coalesce`` and gradient accumulation under ZeRO-1/2, the cycle's gradients are
    reduced once, after its last backward (DeepSpeed's ``engine.coalesce_grad_reduction``),
    instead of once per micro batch: ZeRO-2 otherwise reduce-scatters every micro batch's
    gradients, accumulation-1 extra reductions (and their per-parameter hooks) per step,
    for a memory saving that is small when only the heads, LoRA or a few modules train.

    Inside that context DeepSpeed leaves each backward's gradient on its parameter, where
    autograd would add the next one in the parameters' dtype (bf16). When the config asks
    for a wider accumulation dtype (``data_types.grad_accum_dtype``: fp32 in every shipped
    config), the sums are kept here instead: each micro batch's gradient is added into an
    fp32 sum per parameter, and after the last one the sum goes back onto the parameter for
    the reduction, rounded once to the parameter dtype, as each micro batch's gradient is
    for a per-micro-batch reduction. The cycle's ``engine.step()`` calls run after the
    reduction (all but the last only advance DeepSpeed's micro-step count), so the engine's
    counters, schedule and checkpoints are those of the uncoalesced run.
    """

    def __init__(self, engine, seed: int, rank: int, accum: int, coalesce: bool):
        self.engine, self.seed, self.rank, self.accum = engine, seed, rank, accum
        # ZeRO-1/2's optimizer only (BF16_Optimizer, which ZeRO-1 + bf16 uses, reduces once
        # per step anyway). ZeRO-3 would hold whole gradients on partitioned parameters.
        self.coalesce = (coalesce and accum > 1 and engine.zero_optimization_stage() in (1, 2)
                         and engine.managed_gradient_accumulation()
                         and hasattr(engine.optimizer, "_coalesce_grad_reduction"))
        self._cycle = None  # the open coalesce_grad_reduction context, between micro batches 0 and accum-1
        self._params: list[torch.Tensor] = []
        self._sums: list[torch.Tensor | None] = []
        if self.coalesce:
            accum_dtype = engine.get_data_types()[1]
            self._params = [p for p in engine.module.parameters()
                            if p.requires_grad and p.dtype.itemsize < accum_dtype.itemsize]
            self._sums = [None] * len(self._params)
            self._accum_dtype = accum_dtype

    def __call__(self, batch: dict[str, Any], step: int, k: int):
        """Micro batch ``k`` (0-based) of optimizer step ``step``. Returns ``(outputs, lrs)``:
        ``lrs`` are the rates the update used at a boundary, else None."""
        engine = self.engine
        seed_generators(micro_step_seed(self.seed, self.rank, step * self.accum + k), engine.device)
        if not self.coalesce:
            out = engine(to_device(batch, engine.device))
            engine.backward(out["loss"])
            lrs = engine.get_lr() if engine.is_gradient_accumulation_boundary() else None
            engine.step()
            return out, lrs
        if k == 0:
            self._cycle = engine.coalesce_grad_reduction()
            self._cycle.__enter__()
        out = engine(to_device(batch, engine.device))
        engine.backward(out["loss"])
        last = k == self.accum - 1
        self._add_gradients(last)
        if not last:
            return out, None
        cycle, self._cycle = self._cycle, None
        cycle.__exit__(None, None, None)  # the cycle's one gradient reduction
        for _ in range(self.accum - 1):
            engine.step()  # not a boundary: advances the micro-step count only
        lrs = engine.get_lr()
        engine.step()
        return out, lrs

    def _add_gradients(self, last: bool) -> None:
        """Move this micro batch's gradients into the wide sums; after the last micro batch,
        put the sums back on the parameters (for the reduction) and drop them."""
        for i, p in enumerate(self._params):
            total, grad = self._sums[i], p.grad
            if grad is not None:
                if total is None:
                    total = grad.to(self._accum_dtype)  # a new tensor: the dtypes differ
                else:
                    total.add_(grad)
            if not last:
                self._sums[i] = total
                p.grad = None
            elif total is not None:
                self._sums[i] = None
                if grad is not None:
                    grad.copy_(total)  # rounded once, into this micro batch's gradient buffer
                else:
                    p.grad = total.to(p.dtype)


def log_step(metrics: MetricsLogger, engine, step: int, epoch: int, loss: torch.Tensor, lrs, group_names: list[str],
             steps_since_log: int, elapsed: float, data_wait: float, skipped: int) -> float:
    """One metrics row after an optimizer step: the loss averaged over ranks (the one host
    sync of the step), learning rates, gradient norm, skipped steps, throughput.
    Collective. Returns the averaged loss."""
    loss = _all_reduce_mean(loss)
    row = {"step": step, "epoch": epoch, "train/loss": loss}
    row.update({f"train/lr/{n}": float(lr) for n, lr in zip(group_names, lrs)})
    grad_norm = engine.get_global_grad_norm()
    if grad_norm is not None:
        row["train/grad_norm"] = float(grad_norm)
    row["train/skipped_steps"] = skipped
    row["samples_per_s"] = engine.train_batch_size() * steps_since_log / max(elapsed, 1e-9)
    row["data_share"] = data_wait / max(elapsed, 1e-9)
    metrics.log(row)
    return loss


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
    ema: ParameterEMA | None = None,
) -> TrainState:
    """Run epochs ``state.epoch .. cfg.train.epochs - 1`` (or until ``max_steps``). Collective.

    ``val_loader`` is (loader, this rank's real sample count) from :func:`validation_indices`.
    ``ema``, when given, is updated after every optimizer step and saved in every checkpoint.
    """
    import deepspeed.comm as dist

    rank = dist.get_rank()
    is_main = rank == 0
    accum = cfg.grad_accum
    steps_per_epoch = len(sampler) // cfg.micro_batch_size // accum
    micro_step = MicroSteps(engine, cfg.train.seed, rank, accum, cfg.train.coalesce_grad_reduction)
    metrics = MetricsLogger(cfg.train.output_dir, engine.monitor, is_main, resume_step=state.step if state.step else None,
                            samples_per_step=cfg.deepspeed["train_batch_size"])
    bar = None
    if is_main and cfg.train.progress_bar:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=state.step, desc="train", unit="step", dynamic_ncols=True)

    def checkpoint() -> Path:
        client = {"step": state.step, "epoch": state.epoch, "micro_step_in_epoch": state.micro_step_in_epoch,
                  "micro_batch_size": cfg.micro_batch_size, "world_size": dist.get_world_size(),
                  "grad_accum": accum, "train_samples": len(train_loader.dataset),
                  "seed": cfg.train.seed, **client_extra}
        if ema is not None:
            client[EMA_CLIENT_KEY] = ema.state_dict()
        return save_checkpoint(engine, cfg.train.output_dir, state.step, client, keep_last=cfg.train.save_total_limit)

    def run_validation() -> None:
        if val_loader is None:
            return
        # With an EMA, validation scores the averaged weights: the ones the run exports.
        with engine_lib.weights_swapped(engine, ema.shadow) if ema is not None else contextlib.nullcontext():
            val_loss = validate(engine, *val_loader, cfg)
        metrics.log({"step": state.step, "epoch": state.epoch, "val/loss": val_loss})
        logger.info("epoch %d step %d: val/loss %.4f%s", state.epoch, state.step, val_loss,
                    " (EMA weights)" if ema is not None else "")

    if state.step == 0 and cfg.stage == "stage2":
        # The guide: Stage 2 starts below Stage 1's final validation loss (LoRA B is zero,
        # so before the first update this *is* Stage 1's model); logged as the step-0 row.
        run_validation()
    engine.train()
    done = False
    # DeepSpeed skips an update whose gradients are not finite (bf16/fp32 ZeRO: the
    # "check_grad_overflow" of the bf16 section, on by default) and counts it in
    # engine.skipped_steps, which its checkpoints carry across resumes.
    consecutive_skips, first_skip = 0, 0
    while state.epoch < cfg.train.epochs and not done:
        sampler.set_epoch(state.epoch, start_index=state.micro_step_in_epoch * cfg.micro_batch_size)
        loss_sum = torch.zeros((), device=engine.device)
        data_wait, step_start, steps_since_log = 0.0, time.perf_counter(), 0
        bad_samples: dict[str, list] = {}  # file -> [count, first message] (on_bad_sample="skip")
        it = iter(train_loader)
        while state.micro_step_in_epoch < steps_per_epoch * accum:
            t0 = time.perf_counter()
            batch = next(it)
            data_wait += time.perf_counter() - t0
            for message in pop_bad_samples(batch):
                count = bad_samples.setdefault(message.split(": ", 1)[0], [0, message])
                count[0] += 1
            skipped_before = engine.skipped_steps
            out, lrs = micro_step(batch, state.step, state.micro_step_in_epoch % accum)
            loss_sum += out["loss"].detach()
            state.micro_step_in_epoch += 1
            if lrs is None:  # not an accumulation boundary
                continue
            # One optimizer step done: one host sync (the loss average), not one per micro step.
            state.step += 1
            if ema is not None:
                update_ema(ema, engine)
            steps_since_log += 1
            if engine.skipped_steps > skipped_before:  # agreed by all ranks inside DeepSpeed's step
                engine_lib.discard_skipped_gradients(engine)
                consecutive_skips += 1
                first_skip = first_skip or state.step
                logger.warning("step %d: non-finite loss or gradient norm; update skipped (weights unchanged)",
                               state.step)
            else:
                consecutive_skips, first_skip = 0, 0
            if state.step % cfg.train.log_every == 0 or state.step == total_steps or consecutive_skips:
                loss = log_step(metrics, engine, state.step, state.epoch + 1, loss_sum / accum, lrs, group_names,
                                steps_since_log, time.perf_counter() - step_start, data_wait, engine.skipped_steps)
                state.history.append(loss)
                if bar is not None:
                    bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
                data_wait, step_start, steps_since_log = 0.0, time.perf_counter(), 0
            loss_sum.zero_()
            if bar is not None:
                bar.update(1)
            if consecutive_skips >= cfg.train.max_consecutive_skips:
                saved = checkpoint()  # the skipped updates left the weights of the last good step
                raise TrainingError(
                    f"{consecutive_skips} consecutive optimizer steps ({first_skip}..{state.step}) had a non-finite "
                    f"loss or gradient norm (train.max_consecutive_skips {cfg.train.max_consecutive_skips}); stopped. "
                    f"{saved} holds the weights of step {first_skip - 1} (unchanged since); check the data "
                    f"(--on-bad-sample) and lower the learning rate before resuming from it")
            if cfg.train.max_steps and state.step >= cfg.train.max_steps:
                done = True
                break
            if (cfg.train.save_steps and state.step % cfg.train.save_steps == 0
                    and state.micro_step_in_epoch < steps_per_epoch * accum):  # an epoch end saves anyway
                checkpoint()
        report_bad_samples(bad_samples, metrics, state)
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


def update_ema(ema: ParameterEMA, engine) -> None:
    """Move the moving average towards the weights of the step just taken (every rank
    keeps the same average: it sees the same weights). Collective under ZeRO-3."""
    with engine_lib.full_trainable_parameters(engine) as named:
        ema.update(named)


def report_bad_samples(bad_samples: dict[str, list], metrics: MetricsLogger, state: TrainState) -> None:
    """End of an epoch with on_bad_sample="skip": every rank's dropped samples, per file,
    in the log and metrics.jsonl (``data/bad_samples``, ``data/bad_sample_files``). Collective."""
    import deepspeed.comm as dist

    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, bad_samples)
    merged: dict[str, list] = {}
    for part in gathered:
        for file, (count, message) in part.items():
            merged.setdefault(file, [0, message])[0] += count
    if not merged or dist.get_rank() != 0:
        return
    total = sum(c for c, _ in merged.values())
    lines = "\n".join(f"  {count:5d}  {message}" for count, message in
                      sorted(merged.values(), key=lambda cm: (-cm[0], cm[1])))
    logger.warning("epoch %d: skipped %d bad sample(s) in %d file(s) (on_bad_sample=skip):\n%s",
                   state.epoch + 1, total, len(merged), lines)
    metrics.log({"step": state.step, "epoch": state.epoch + 1, "data/bad_samples": total,
                 "data/bad_sample_files": {file: count for file, (count, _) in sorted(merged.items())}})


def pop_bad_samples(batch: dict[str, Any]) -> list[str]:
    """Remove and return the messages of the samples the collator dropped
    (on_bad_sample="skip"). A micro batch of only bad samples is an error: every rank must
    take the same steps, so it cannot simply be left out (with a micro batch of several
    samples this is very unlikely)."""
    bad = batch.pop(BAD_SAMPLE, [])
    if not batch:
        raise DatasetError(f"every sample of a micro batch was bad (lower the share of bad files or raise the "
                           f"batch size); the first: {bad[0]}")
    return bad


def describe_worker_death(message: str, datasets: list) -> str:
    """One line for torch's "DataLoader worker (pid(s) N) exited unexpectedly" / "is killed
    by signal" (raised at ``next()`` or, from torch's SIGCHLD handler, anywhere in the main
    process: ``train.py`` catches it around the whole loop), naming the sample that worker
    was loading when one of ``datasets`` tracks it."""
    import re

    line = message.strip().splitlines()[0]
    # "(pid 1234) is killed by signal: ..." or "(pid(s) 1234, 1235) exited unexpectedly"
    found = re.search(r"pid(?:\(s\))?\s+([\d,\s]+)", line)
    pids = [int(p) for p in re.findall(r"\d+", found.group(1))] if found else []
    loading = []
    for pid in pids:
        described = [d.describe_worker(pid) for d in datasets if hasattr(d, "describe_worker")]
        loading += [what for what in described if what][:1]
    what = f" while loading {'; '.join(loading)}" if loading else ""
    return (f"a DataLoader worker died{what} ({line.rstrip('. ')}); out of memory is the usual cause: lower "
            "--num_workers or the batch size, or find what that sample makes the worker do")


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
