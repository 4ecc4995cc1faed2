"""The policy's modules: torch, transformers and peft only (no deepspeed, no torch.distributed)."""

from torch import nn


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    """Number of parameter elements in ``module`` (shared parameters counted once).

    Works on the meta device, so reference sizes can be counted without allocating.
    """
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
