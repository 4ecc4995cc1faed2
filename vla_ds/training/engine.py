"""The one place that starts DeepSpeed: parameter groups, ``deepspeed.initialize``, the micro step.

The process group it runs in is :mod:`vla_ds.training.distributed`.

Everything DeepSpeed-specific (ZeRO stage, bf16, fused Adam, clipping, accumulation,
scheduler, monitors) comes from the resolved JSON in ``RunConfig.deepspeed``; nothing here
re-declares those settings in Python.
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vla_ds.errors import ConfigError
from vla_ds.training.config import ParamGroupConfig, RunConfig, zero_stage
from vla_ds.training.distributed import launcher_env

logger = logging.getLogger(__name__)

# Display names for the guide's "Optimizer config" log lines.
_GROUP_TITLES = {"vl": "VL params", "other": "Other params"}


def backbone_device(cfg: RunConfig) -> str | None:
    """Where this rank loads the VL backbone: straight onto its own GPU (``cuda:LOCAL_RANK``),
    so N ranks of a node never hold N host copies of the model while they start. None (the
    CPU) without CUDA, and under ZeRO-3, which partitions the model from host memory (its
    configs are for GPUs too small to hold it whole); on the CPU the weights stay
    memory-mapped from the checkpoint files, shared by the node's ranks."""
    if not torch.cuda.is_available() or zero_stage(cfg.deepspeed) == 3:
        return None
    return f"cuda:{int(launcher_env().get('LOCAL_RANK', '0'))}"


@dataclass
class GroupSummary:
    name: str
    lr: float
    weight_decay: float
    num_tensors: int
    num_params: int


def build_param_groups(policy: nn.Module, groups: dict[str, ParamGroupConfig]) -> tuple[list[dict], list[GroupSummary]]:
    """Split the policy's trainable parameters into the configured named groups.

    A group lists top-level module names (``backbone``, ``sensor_encoder``,
    ``action_expert``) or ``"*"`` for whatever earlier groups left. Groups that end up
    empty (the VL group while the backbone is frozen) are dropped. Every trainable
    parameter must land in exactly one group.
    """
    trainable = [(n, p) for n, p in policy.named_parameters() if p.requires_grad]
    top_level = {n.split(".", 1)[0] for n, _ in policy.named_parameters()}
    taken: set[str] = set()
    out, summary = [], []
    for name, g in groups.items():
        for m in g.modules:
            if m != "*" and m not in top_level:
                raise ConfigError(f"optimizer_groups.{name}.modules: unknown module '{m}' "
                                  f"(the policy has: {', '.join(sorted(top_level))}, or '*')")
        params = [
            (n, p) for n, p in trainable
            if n not in taken and ("*" in g.modules or n.split(".", 1)[0] in g.modules)
        ]
        taken.update(n for n, _ in params)
        if not params:
            logger.info("parameter group '%s' has no trainable parameters; skipped", name)
            continue
        out.append({"name": name, "params": [p for _, p in params], "lr": g.lr, "weight_decay": g.weight_decay})
        summary.append(GroupSummary(name, g.lr, g.weight_decay, len(params), sum(p.numel() for _, p in params)))
    left = [n for n, _ in trainable if n not in taken]
    if left:
        raise ConfigError(f"optimizer_groups: {len(left)} trainable parameters belong to no group "
                          f"(e.g. {left[0]}); add a group with modules [\"*\"]")
    if not out:
        raise ConfigError("optimizer_groups: the policy has no trainable parameters")
    return out, summary


def log_param_groups(summary: list[GroupSummary]) -> None:
    logger.info("Optimizer config:")
    for s in summary:
        title = _GROUP_TITLES.get(s.name, f"{s.name} params")
        logger.info("   %s: %d tensors, %s parameters (lr=%g, weight_decay=%g)",
                    title, s.num_tensors, f"{s.num_params:,}", s.lr, s.weight_decay)
    logger.info("   Total trainable: %s parameters", f"{sum(s.num_params for s in summary):,}")


def discard_skipped_gradients(engine) -> None:
    """After DeepSpeed skipped an update for non-finite gradients: make sure they are gone.

    DeepSpeed 0.19's ZeRO-1/2 optimizer clears its fp32 gradient partition
    (``averaged_gradients``) on a skipped step only without ``offload_optimizer``; with it
    (``stage2_offload.json``) the NaN/inf stays in the partition, the next steps add to it,
    and every later update is skipped as well. Clear it as the branch without offload does.
    """
    optimizer = engine.optimizer
    grads = getattr(optimizer, "averaged_gradients", None)
    if getattr(optimizer, "cpu_offload", False) and isinstance(grads, dict):
        for key in grads:
            grads[key] = None


@contextlib.contextmanager
def process_patches_undone():
    """Undo, on exit, what DeepSpeed patches process-wide and never restores: ZeRO-3 swaps
    ``torch.nn.functional.linear`` for its memory-efficient version ("This will persist unless
    manually reset"), so a later run in the same process (a notebook, a test session) would
    compute every linear layer through it."""
    linear = torch.nn.functional.linear
    try:
        yield
    finally:
        torch.nn.functional.linear = linear


def replay_adam_step_counter(engine) -> int:
    """Bring DeepSpeed's C++ Adam kernels to where the checkpoint's run left them. Returns
    the optimizer step replayed to (0: nothing to do).

    DeepSpeed's CPU Adam (``DeepSpeedCPUAdam``, the offload configs' optimizer, and
    ``FusedAdam`` on the CPU accelerator) keeps beta1^t and beta2^t for the bias correction
    inside a C++ object and updates them by one float multiplication per step; a fresh
    process starting at step k + 1 computes pow(beta, k + 1) instead, which differs in the
    last bits, so every update after a resume differed from the uninterrupted run's by a
    rounding step and the runs drifted apart. Calling the kernel for steps 1..k on a
    one-element dummy tensor walks the C++ object through the same multiplications. CUDA's
    FusedAdam computes pow(beta, step) on every call and needs nothing.
    """
    from deepspeed.accelerator import get_accelerator
    from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam

    opt = engine.basic_optimizer
    cpu_adam = isinstance(opt, DeepSpeedCPUAdam)
    if not (cpu_adam or (isinstance(opt, FusedAdam) and get_accelerator().device_name() == "cpu")):
        return 0
    steps = [int(state["step"]) for state in opt.state.values() if "step" in state]
    group = next((g for g in opt.param_groups if g["params"]), None)
    if not steps or group is None:
        return 0
    beta1, beta2 = group["betas"]
    bias_correction = bool(group.get("bias_correction", True))
    param, grad, exp_avg, exp_avg_sq = (torch.zeros(1) for _ in range(4))
    for step in range(1, max(steps) + 1):
        if cpu_adam:
            opt.ds_opt_adam.adam_update(opt.opt_id, step, group["lr"], beta1, beta2, group["eps"],
                                        group["weight_decay"], bias_correction, param, grad, exp_avg, exp_avg_sq)
        else:
            opt.multi_tensor_adam(2048, opt._dummy_overflow_buf, [[grad], [param], [exp_avg], [exp_avg_sq]],
                                  group["lr"], beta1, beta2, group["eps"], step, opt.adam_w_mode,
                                  int(bias_correction), group["weight_decay"])
    return max(steps)


def set_master_weights(engine, weights: dict[str, torch.Tensor]) -> int:
    """Put fp32 ``weights`` (name -> tensor, VLAPolicy names) into the optimizer's fp32 master
    copies of the trainable parameters they name. DeepSpeed makes its masters from the module
    after casting it to bf16, so fp32 weights loaded into the module before
    ``deepspeed.initialize`` arrive rounded; this restores them (the bf16 module already holds
    their rounding). Returns how many parameters were set."""
    from deepspeed.utils import safe_set_full_fp32_param

    count = 0
    for name, param in engine.module.named_parameters():
        if param.requires_grad and name in weights:
            safe_set_full_fp32_param(param, weights[name].to(device=param.device, dtype=torch.float32))
            count += 1
    return count


@contextlib.contextmanager
def full_trainable_parameters(engine, modify: bool = False):
    """The engine module's trainable ``(name, parameter)`` pairs, each whole on every rank
    inside the block: ZeRO-3 gathers its partitions (collective), other stages hold whole
    parameters anyway. Changes made inside are kept only with ``modify`` (ZeRO-3 then takes
    rank 0's values and partitions them again)."""
    named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    if not engine.zero_optimization_partition_weights():
        yield named
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=0 if modify else None):
        yield named


@contextlib.contextmanager
def weights_swapped(engine, weights: dict[str, torch.Tensor]):
    """Run the block with the engine module's trainable parameters holding ``weights``
    (name -> tensor, cast to each parameter's dtype), and put the parameters back bit for
    bit afterwards: training continues exactly as if the block had not run. The optimizer's
    fp32 master weights are not touched. Collective under ZeRO-3."""
    with torch.no_grad(), full_trainable_parameters(engine, modify=True) as named:
        saved = [p.detach().clone() for _, p in named]
        for name, p in named:
            p.copy_(weights[name])
    try:
        yield
    finally:
        with torch.no_grad(), full_trainable_parameters(engine, modify=True) as named:
            for (_, p), old in zip(named, saved):
                p.copy_(old)


def initialize(policy: nn.Module, cfg: RunConfig):
    """Wrap ``policy`` in a DeepSpeed engine built from ``cfg.deepspeed``.

    Returns ``(engine, group_summary)``. The engine owns the optimizer (fused AdamW from
    the JSON) and the scheduler (its "auto" step counts filled by the trainer beforehand).
    """
    import deepspeed

    param_groups, summary = build_param_groups(policy, cfg.optimizer_groups)
    log_param_groups(summary)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # BF16_Optimizer print()s memory reports (ZeRO-1 + bf16)
        engine, _, _, _ = deepspeed.initialize(model=policy, model_parameters=param_groups, config=cfg.deepspeed)
    if printed.getvalue().strip():
        logger.debug("deepspeed.initialize printed:\n%s", printed.getvalue().rstrip())
    if engine.lr_scheduler is not None and getattr(engine.lr_scheduler, "last_batch_iteration", 0) == -1:
        # DeepSpeed's warmup schedulers start at iteration -1 (lr 0) and the engine steps them
        # after each update; iteration 0 of a linear warmup from warmup_min_ratio 0 is lr 0 too.
        # Start at iteration 1, so update k runs at iteration k: k / warmup_num_steps of the
        # peak during warmup, and the cosine reaches its floor at update total_num_steps - 1
        # (one update early, where DeepSpeed's own count would spend the first at lr 0). A
        # resume loads the scheduler's saved iteration over this.
        engine.lr_scheduler.step()
        engine.lr_scheduler.step()
    return engine, summary


# ---------------------------------------------------------------------------------------
# Driving the engine: one micro batch at a time


def to_device(batch: dict[str, Any], device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor)}


def micro_step_seed(seed: int, rank: int, micro_step: int) -> int:
    """Seed of the global RNGs for one micro step (diffusion noise and timesteps, dropout).

    A function of (seed, rank, micro step) alone: ranks draw different noise, and a resumed
    run draws exactly what the uninterrupted run drew, whatever happened in between
    (DataLoader iterators, validation) and without saving RNG states."""
    return (seed * 1_000_003 + rank * 7_919 + micro_step * 104_729) % (2**63 - 1)


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
