"""An exponential moving average (EMA) of the trained weights: what a policy is exported with.

Diffusion and flow policies are usually evaluated and deployed with an EMA of their weights
(Diffusion Policy, pi0, GR00T): it averages out the last steps' noise. Here it is an fp32
copy of every trainable parameter, on the parameters' device, updated after each optimizer
step from the weights the engine holds::

    decay_t = min(decay, 1 - (1 + t) ** -warmup_power)        t = optimizer steps done
    ema     = decay_t * ema + (1 - decay_t) * weights

The warm-up keeps the first steps from being dominated by the random initialisation (with
the default power 0.75, decay_t passes 0.9 at step 20 and 0.99 at step 460). The average
is saved in every checkpoint's client state (``"ema"``: ``{"step", "shadow": {name:
tensor}}``), restored by ``--resume``, and written by ``convert_checkpoint.py`` as the
weights of exported policies.

This file imports torch only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from vla_ds.errors import CheckpointError, ConfigError

CLIENT_KEY = "ema"  # where the average sits in a checkpoint's client state


@dataclass
class EMAConfig:
    """The ``ema`` section of a run config.

    Fields:
        enabled: keep the average (an fp32 copy of the trainable weights on their device)
            and export it as the policy's weights.
        decay: the decay the average settles at (0.999 averages over about the last 1000
            optimizer steps).
        warmup_power: warm-up of the decay, ``decay_t = min(decay, 1 - (1 + t)^-power)``;
            0 turns the warm-up off (``decay`` from the first step).
    """

    enabled: bool = False
    decay: float = 0.999
    warmup_power: float = 0.75

    def __post_init__(self):
        if not isinstance(self.enabled, bool):
            raise ConfigError(f"ema.enabled must be true or false, got {self.enabled!r}")
        for name, ok, why in (("decay", 0 <= self.decay < 1, "must be in [0, 1)"),
                              ("warmup_power", self.warmup_power >= 0, "must be >= 0")):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok:
                raise ConfigError(f"ema.{name}={value!r}: {why}")

    def decay_at(self, step: int) -> float:
        """The decay of the update after ``step`` optimizer steps (0-based: the first update is step 0)."""
        if self.warmup_power == 0:
            return float(self.decay)
        return min(float(self.decay), 1.0 - (1.0 + step) ** -self.warmup_power)


class ParameterEMA:
    """fp32 moving averages of named parameters (see the module docstring).

    Args:
        config: decay and warm-up.
        named_parameters: ``(name, parameter)`` pairs, e.g. the trainable ones of a policy;
            the average starts at their current values.
    """

    def __init__(self, config: EMAConfig, named_parameters: Iterable[tuple[str, Tensor]]):
        self.config = config
        self.step = 0  # updates done
        self.shadow: dict[str, Tensor] = {name: p.detach().float().clone() for name, p in named_parameters}

    @torch.no_grad()
    def update(self, named_parameters: Iterable[tuple[str, Tensor]]) -> None:
        """Move every average towards its parameter's current value (after an optimizer step)."""
        decay = self.config.decay_at(self.step)
        params = dict(named_parameters)
        if params.keys() != self.shadow.keys():
            raise RuntimeError(f"EMA: parameters changed since the average started "
                               f"({len(params)} now, {len(self.shadow)} averaged)")
        for name, average in self.shadow.items():  # one fp32 copy of a weight at a time, not of all
            average.lerp_(params[name].detach().float(), 1.0 - decay)  # ema += (1 - decay) (value - ema)
        self.step += 1

    def state_dict(self) -> dict:
        """``{"step", "shadow"}`` for a checkpoint's client state (the tensors as they are)."""
        return {"step": self.step, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict, source: str = "checkpoint") -> None:
        """Restore a :meth:`state_dict`, strictly: the same names and shapes."""
        shadow = state.get("shadow") if isinstance(state, dict) else None
        if not isinstance(shadow, dict) or not isinstance(state.get("step"), int):
            raise CheckpointError(f"{source}: the EMA state is not {{'step': int, 'shadow': {{name: tensor}}}}")
        missing = sorted(self.shadow.keys() - shadow.keys())
        unknown = sorted(shadow.keys() - self.shadow.keys())
        shapes = [f"{k} {tuple(shadow[k].shape)} vs {tuple(v.shape)}" for k, v in self.shadow.items()
                  if k in shadow and shadow[k].shape != v.shape]
        if missing or unknown or shapes:
            details = [f"{len(missing)} missing ({', '.join(missing[:3])})" if missing else "",
                       f"{len(unknown)} unknown ({', '.join(unknown[:3])})" if unknown else "",
                       f"shape mismatches ({'; '.join(shapes[:3])})" if shapes else ""]
            raise CheckpointError(f"{source}: the EMA weights do not match the trainable parameters: "
                                  + "; ".join(d for d in details if d))
        for name, value in shadow.items():
            self.shadow[name].copy_(value)
        self.step = state["step"]


def ema_weights(client_state: dict) -> dict[str, Tensor] | None:
    """The averaged weights (name -> fp32 tensor) a checkpoint's client state holds, or None."""
    state = client_state.get(CLIENT_KEY)
    if state is None:
        return None
    shadow = state.get("shadow") if isinstance(state, dict) else None
    if not isinstance(shadow, dict) or not all(isinstance(v, Tensor) for v in shadow.values()):
        raise CheckpointError("the checkpoint's EMA state is not {'step': int, 'shadow': {name: tensor}}")
    return shadow
