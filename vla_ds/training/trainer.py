"""The training loop: fetch -> step -> log -> (per epoch) validate and save.

Works on any number of ranks; the functions that talk to other ranks say so and gate
rank-0 work (metrics, progress bar) inside. SIGTERM / SIGINT stop it at an optimizer-step
boundary that every rank agrees on, with a checkpoint there (:class:`StopSignals`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from vla_ds.batch import EPISODE_INDEX, FRAME_TIME
from vla_ds.data.loading import STOP_SIGNALS, pop_bad_samples
from vla_ds.errors import TrainingError
from vla_ds.training import engine as engine_lib
from vla_ds.training.checkpoint import (
    LATEST_FILE,
    checkpoint_tags,
    client_state,
    run_layout,
    save_checkpoint,
)
from vla_ds.training.config import RunConfig, run_epochs
from vla_ds.training.ema import CLIENT_KEY as EMA_CLIENT_KEY
from vla_ds.training.ema import ParameterEMA
from vla_ds.training.metrics import MetricsLogger

logger = logging.getLogger(__name__)


def validation_noise(batch: dict[str, torch.Tensor], seed: int, horizon: int,
                     action_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed noise (B, H, A) and a uniform draw u (B,) in [0, 1) per validation sample,
    derived from the sample's identity (episode, frame time) and the seed, so every epoch
    (and every rank layout) scores the same problem and validation losses are comparable.
    The action expert turns u into its own kind of timestep (``timesteps_from_uniform``)."""
    noise, uniform = [], []
    for ep, t in zip(batch[EPISODE_INDEX].tolist(), batch[FRAME_TIME].tolist()):
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
        batch = engine_lib.to_device(batch, engine.device)
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


@dataclass
class TrainState:
    """Where the run is; saved in every checkpoint's client state."""

    step: int = 0                 # optimizer steps done (one per accumulation cycle)
    epoch: int = 0                # completed epochs
    micro_step_in_epoch: int = 0  # micro batches consumed in the current epoch
    history: list[float] = field(default_factory=list)  # train/loss per logged step (rank 0)

    @classmethod
    def from_client(cls, client: dict[str, Any]) -> TrainState:
        """Where a checkpoint's client state says the run was."""
        return cls(step=client["step"], epoch=client["epoch"], micro_step_in_epoch=client["micro_step_in_epoch"])


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


class SkipGuard:
    """Consecutive optimizer steps DeepSpeed skipped for a non-finite loss or gradient norm
    (bf16/fp32 ZeRO: the bf16 section's "check_grad_overflow", on by default; it counts them
    in ``engine.skipped_steps``, which its checkpoints carry across resumes)."""

    def __init__(self, limit: int):
        self.limit, self.count, self.first = limit, 0, 0

    def observe(self, engine, skipped_before: int, step: int) -> None:
        if engine.skipped_steps > skipped_before:  # agreed by all ranks inside DeepSpeed's step
            engine_lib.discard_skipped_gradients(engine)
            self.count += 1
            self.first = self.first or step
            logger.warning("step %d: non-finite loss or gradient norm; update skipped (weights unchanged)", step)
        else:
            self.count, self.first = 0, 0

    def check(self, step: int, save) -> None:
        """Stop the run, after saving the last good weights, once ``limit`` steps in a row were skipped."""
        if self.count < self.limit:
            return
        saved = save()  # the skipped updates left the weights of the last good step
        raise TrainingError(
            f"{self.count} consecutive optimizer steps ({self.first}..{step}) had a non-finite loss or gradient "
            f"norm (train.max_consecutive_skips {self.limit}); stopped. {saved} holds the weights of step "
            f"{self.first - 1} (unchanged since); check the data (--on-bad-sample) and lower the learning rate "
            "before resuming from it")


class BadSampleTally:
    """The samples the collator dropped this epoch (on_bad_sample="skip"), per file."""

    def __init__(self):
        self.by_file: dict[str, list] = {}  # file -> [count, first message]

    def take(self, batch: dict[str, Any]) -> None:
        for message in pop_bad_samples(batch):
            self.by_file.setdefault(message.split(": ", 1)[0], [0, message])[0] += 1


class LogWindow:
    """Time and data wait since the last logged step (samples/s and data_share of its row)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.data_wait, self.start, self.steps = 0.0, time.perf_counter(), 0

    def fetch(self, it):
        t0 = time.perf_counter()
        batch = next(it)
        self.data_wait += time.perf_counter() - t0
        return batch


class StopSignals:
    """SIGTERM / SIGINT (scancel, docker stop, a preemption, Ctrl-C) during training: stop at
    an optimizer-step boundary instead of dying mid-step, so the run can save a checkpoint
    there and shut its DataLoader workers down. A context manager around the training loop
    only; the previous handlers are back afterwards (in-process runs: notebooks, tests).

    The handler just records the signal. The loop asks :meth:`agreed` at every optimizer-step
    boundary, one all-reduce of a one-element tensor, so every rank stops after the same step
    although a signal reaches the ranks at different times, or only one of them (the
    deepspeed launcher signals rank 0's process tree, waits up to 30 s for it to end, then
    rank 1's). Later signals while the stop is under way are ignored on purpose: Ctrl-C
    under the launcher delivers SIGINT from the terminal and then SIGTERM from the launcher
    to every rank, and a second signal must not cut the step or its checkpoint short. What
    SLURM and docker send when their grace period is over, SIGKILL, still ends the rank; a
    checkpoint cut short is never ``latest`` (vla_ds.training.checkpoint), so nothing is corrupted.
    """

    def __init__(self):
        self.received = 0  # the first stop signal's number (0: none)
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            logger.debug("training outside the main thread: SIGTERM / SIGINT keep their handlers")
            return self
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():  # None: set outside Python, not restorable; the default
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()

    def _record(self, signum, frame) -> None:
        self.received = self.received or signum

    def agreed(self, device) -> int:
        """The signal every rank stops on: the largest signal number any rank has received
        (SIGTERM over SIGINT), 0 when none has. Collective."""
        import deepspeed.comm as dist

        if not dist.is_initialized() or dist.get_world_size() == 1:
            return self.received
        flag = torch.tensor([self.received], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())


class Stopped(Exception):
    """The run stopped on SIGTERM / SIGINT at an optimizer-step boundary (every rank at the
    same one). ``str()`` is the one line for the user, naming the checkpoint to ``--resume``
    from; ``exit_code`` is 128 + the signal number, the shell's convention for a process
    ended by that signal (143 SIGTERM, 130 SIGINT)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


def mid_epoch_save_due(cfg: RunConfig, step: int, micro_step_in_epoch: int, micro_steps_per_epoch: int) -> bool:
    """``save_steps`` asks for a checkpoint now, and this is not an epoch end (which saves anyway)."""
    return bool(cfg.train.save_steps) and step % cfg.train.save_steps == 0 and micro_step_in_epoch < micro_steps_per_epoch


def validation_due(cfg: RunConfig, epoch: int, stopping: bool, last_epoch: int) -> bool:
    """Validate after this epoch: every ``validate_every_epochs``, the run's last epoch
    (:func:`~vla_ds.training.config.run_epochs`), or a stop."""
    return stopping or epoch % cfg.train.validate_every_epochs == 0 or epoch == last_epoch


@dataclass
class Loop:
    """What the training loop works with: the engine, its data, what it writes."""

    cfg: RunConfig
    engine: Any
    train_loader: DataLoader
    val_loader: tuple[DataLoader, int] | None
    sampler: Any
    group_names: list[str]
    state: TrainState
    client_extra: dict[str, Any]
    total_steps: int
    ema: ParameterEMA | None
    metrics: MetricsLogger
    bar: Any = None
    stop: StopSignals | None = None
    stopped_by: int = 0  # the signal every rank agreed to stop on (0: none)
    saved: tuple[int, Path] | None = None  # (step, tag dir) of this run's last checkpoint

    def save(self) -> Path:
        import deepspeed.comm as dist

        cfg, state = self.cfg, self.state
        extra = {**self.client_extra, **({EMA_CLIENT_KEY: self.ema.state_dict()} if self.ema is not None else {})}
        client = client_state(dataclasses.asdict(state),
                              run_layout(cfg, dist.get_world_size(), len(self.train_loader.dataset)), extra)
        tag_dir = save_checkpoint(self.engine, cfg.train.output_dir, state.step, client,
                                  keep_last=cfg.train.save_total_limit)
        self.saved = (state.step, tag_dir)
        return tag_dir

    def stop_requested(self) -> bool:
        """Whether every rank stops here on a signal (not after the run's last step, which
        ends the run anyway). Collective."""
        if self.stop is None or self.state.step >= self.total_steps:
            return False
        self.stopped_by = self.stop.agreed(self.engine.device)
        if self.stopped_by:
            logger.info("%s: every rank stops after step %d", signal.Signals(self.stopped_by).name, self.state.step)
        return bool(self.stopped_by)

    def finish_stop(self) -> Stopped:
        """After a signal stop: the checkpoint at this step (``train.save_on_signal``; not
        before the first step) and the line that says where to resume. Collective."""
        cfg, step, out = self.cfg, self.state.step, self.cfg.train.output_dir
        name = signal.Signals(self.stopped_by).name
        if step == 0:
            return Stopped(f"stopped by {name} before the first optimizer step: nothing to resume, start the run "
                           "again", self.stopped_by)
        if cfg.train.save_on_signal and (self.saved is None or self.saved[0] != step):
            self.save()
        if self.saved is not None and self.saved[0] == step:
            return Stopped(f"stopped by {name} at step {step}: resume with --resume {out} ({self.saved[1].name})",
                           self.stopped_by)
        latest = Path(out) / LATEST_FILE
        tag = latest.read_text().strip() if latest.is_file() else ""
        unsaved = f"stopped by {name} at step {step} without a checkpoint (train.save_on_signal is false)"
        if tag:
            return Stopped(f"{unsaved}: resume with --resume {out} ({tag}; the steps after it are trained again)",
                           self.stopped_by)
        if cfg.train.resume:
            return Stopped(f"{unsaved}: resume with --resume {cfg.train.resume} again", self.stopped_by)
        return Stopped(f"{unsaved}: no checkpoint to resume from, start the run again", self.stopped_by)

    def validate(self) -> None:
        if self.val_loader is None:
            return
        # With an EMA, validation scores the averaged weights: the ones the run exports.
        swapped = engine_lib.weights_swapped(self.engine, self.ema.shadow) if self.ema is not None else None
        with swapped or contextlib.nullcontext():
            val_loss = validate(self.engine, *self.val_loader, self.cfg)
        # The epoch the training rows name: the one in progress (1-based) when max_steps stops
        # mid-epoch, else the last one completed (0 before the first step).
        epoch = self.state.epoch + (1 if self.state.micro_step_in_epoch else 0)
        self.metrics.log({"step": self.state.step, "epoch": epoch, "val/loss": val_loss})
        logger.info("epoch %d step %d: val/loss %.4f%s", epoch, self.state.step, val_loss,
                    " (EMA weights)" if self.ema is not None else "")

    def log(self, window: LogWindow, loss_sum: torch.Tensor, lrs, guard: SkipGuard) -> None:
        """A metrics row every ``log_every`` steps, at the last step and while steps are skipped."""
        state = self.state
        if state.step % self.cfg.train.log_every and state.step != self.total_steps and not guard.count:
            return
        loss = log_step(self.metrics, self.engine, state.step, state.epoch + 1, loss_sum / self.cfg.grad_accum, lrs,
                        self.group_names, window.steps, time.perf_counter() - window.start, window.data_wait,
                        self.engine.skipped_steps)
        state.history.append(loss)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        window.reset()

    def run_epoch(self, micro_step: engine_lib.MicroSteps, guard: SkipGuard) -> bool:
        """Train the rest of the current epoch; True when ``max_steps`` or a signal
        (``stopped_by``) stopped it. Collective."""
        cfg, engine, state, accum = self.cfg, self.engine, self.state, self.cfg.grad_accum
        micro_steps_per_epoch = len(self.sampler) // cfg.micro_batch_size // accum * accum
        self.sampler.set_epoch(state.epoch, start_index=state.micro_step_in_epoch * cfg.micro_batch_size)
        loss_sum = torch.zeros((), device=engine.device)
        window, tally, it = LogWindow(), BadSampleTally(), iter(self.train_loader)
        stopped = False
        while state.micro_step_in_epoch < micro_steps_per_epoch:
            batch = window.fetch(it)
            tally.take(batch)
            skipped_before = engine.skipped_steps
            out, lrs = micro_step(batch, state.step, state.micro_step_in_epoch % accum)
            loss_sum += out["loss"].detach()
            state.micro_step_in_epoch += 1
            if lrs is None:  # not an accumulation boundary
                continue
            # One optimizer step done: one host sync (the loss average), not one per micro step.
            state.step += 1
            if self.ema is not None:
                update_ema(self.ema, engine)
            window.steps += 1
            guard.observe(engine, skipped_before, state.step)
            self.log(window, loss_sum, lrs, guard)
            loss_sum.zero_()
            if self.bar is not None:
                self.bar.update(1)
            guard.check(state.step, self.save)
            if cfg.train.max_steps and state.step >= cfg.train.max_steps:
                stopped = True
                break
            if mid_epoch_save_due(cfg, state.step, state.micro_step_in_epoch, micro_steps_per_epoch):
                self.save()
            if self.stop_requested():
                stopped = True
                break
        report_bad_samples(tally.by_file, self.metrics, state)
        if state.micro_step_in_epoch >= micro_steps_per_epoch:  # also when max_steps ends on an epoch's last step
            state.epoch += 1
            state.micro_step_in_epoch = 0
        return stopped


def train(cfg: RunConfig, engine, train_loader: DataLoader, val_loader: tuple[DataLoader, int] | None, sampler,
          group_names: list[str], state: TrainState, client_extra: dict[str, Any], total_steps: int,
          ema: ParameterEMA | None = None) -> TrainState:
    """Run epochs ``state.epoch ..`` the run's last (``train.epochs``, or as many as
    ``train.max_steps`` needs: :func:`~vla_ds.training.config.run_epochs`). Collective.

    ``val_loader`` is (loader, this rank's real sample count) from :func:`validation_indices`.
    ``ema``, when given, is updated after every optimizer step and saved in every checkpoint.
    On SIGTERM / SIGINT every rank stops at the same step boundary (no validation), saves
    there (``train.save_on_signal``) and raises :class:`Stopped`; the caller shuts the
    loaders' workers down.
    """
    import deepspeed.comm as dist

    is_main = dist.get_rank() == 0
    metrics = MetricsLogger(cfg.train.output_dir, engine.monitor, is_main, resume_step=state.step or None,
                            samples_per_step=cfg.deepspeed["train_batch_size"])
    bar = None
    if is_main and cfg.train.progress_bar:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=state.step, desc="train", unit="step", dynamic_ncols=True)
    loop = Loop(cfg, engine, train_loader, val_loader, sampler, group_names, state, client_extra, total_steps, ema,
                metrics, bar)
    # Resumed from this output dir: its checkpoint is this step's. A stop before the next step
    # names it instead of writing it again (a SIGKILL mid-write would spoil the only good one).
    # Looked up here, before any rank can save, so that every rank sees the same.
    resumed = [tag for s, tag, complete in checkpoint_tags(cfg.train.output_dir) if s == state.step and complete]
    if state.step and resumed:
        loop.saved = (state.step, resumed[0])
    if state.step == 0 and cfg.stage == "stage2":
        # The guide: Stage 2 starts below Stage 1's final validation loss (LoRA B is zero,
        # so before the first update this *is* Stage 1's model); logged as the step-0 row.
        loop.validate()
    engine.train()
    micro_step = engine_lib.MicroSteps(engine, cfg.train.seed, dist.get_rank(), cfg.grad_accum, cfg.train.coalesce_grad_reduction)
    guard = SkipGuard(cfg.train.max_consecutive_skips)
    epochs = run_epochs(cfg, len(sampler) // cfg.micro_batch_size // cfg.grad_accum)
    stopped = False
    with StopSignals() as signals:
        loop.stop = signals
        try:
            # A stop is also asked for before each epoch: at the start, and after an epoch's
            # validation and checkpoint (then that checkpoint is the one to resume from).
            # A resumed run that already took its last step (its max_steps) has nothing to do.
            while state.epoch < epochs and state.step < total_steps and not stopped and not loop.stop_requested():
                stopped = loop.run_epoch(micro_step, guard)
                if loop.stopped_by:
                    break
                if validation_due(cfg, state.epoch, stopped, epochs):
                    loop.validate()
                loop.save()
            if loop.stopped_by:
                raise loop.finish_stop()
        finally:
            if bar is not None:
                bar.close()
            metrics.close()
    if signals.received:
        logger.warning("%s arrived after the last optimizer step; the run finished",
                       signal.Signals(signals.received).name)
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


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
