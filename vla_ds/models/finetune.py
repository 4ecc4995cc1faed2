"""How much of the VL backbone Stage 2 trains: LoRA adapters, the last N layers, or nothing.

Model code only (torch, transformers, peft). The same function sets up training and
counts parameters for ``scripts/estimate_memory.py`` (on the meta device), so the two
cannot disagree about what is trainable.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field

from torch import nn

from vla_ds.errors import ConfigError

logger = logging.getLogger(__name__)

FINETUNE_MODES = ("none", "lora", "full")
# Attention projections of the vision tower (Qwen2.5-VL: visual.blocks.N.attn.{qkv,proj}).
VISION_LORA_MODULES = ("qkv", "proj")


@dataclass
class FinetuneConfig:
    """VL backbone training mode (``--finetune-vl``) for Stage 2.

    Fields:
        mode: ``lora`` (peft adapters; the base stays frozen), ``full`` (unfreeze the last
            ``unfreeze_last_n`` decoder layers of the language model) or ``none`` (frozen).
            Stage 1 always runs ``none``.
        lora_r, lora_alpha, lora_dropout: LoRA rank, scale numerator and dropout
            (``--lora-r``, ``--lora-alpha``, ``--lora-dropout``).
        lora_target_modules: leaf names of the language model's linear layers that get
            adapters (default the attention projections q/k/v/o).
        lora_vision: also put adapters on the vision tower's attention (``qkv``, ``proj``).
        unfreeze_last_n: decoder layers trained in ``full`` mode (``--unfreeze-last-n``).
        gradient_checkpointing: recompute the backbone's layer activations in backward
            (non-reentrant) instead of storing them.
    """

    mode: str = "none"
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    lora_vision: bool = False
    unfreeze_last_n: int = 2
    gradient_checkpointing: bool = False

    def __post_init__(self):
        if self.mode not in FINETUNE_MODES:
            raise ConfigError(f"finetune.mode={self.mode!r}: expected one of {', '.join(FINETUNE_MODES)}")
        if self.lora_r < 1:
            raise ConfigError(f"finetune.lora_r={self.lora_r}: must be >= 1")
        if self.lora_alpha <= 0:
            raise ConfigError(f"finetune.lora_alpha={self.lora_alpha}: must be > 0")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"finetune.lora_dropout={self.lora_dropout}: must be in [0, 1)")
        if not self.lora_target_modules or not all(isinstance(m, str) and m for m in self.lora_target_modules):
            raise ConfigError(f"finetune.lora_target_modules={self.lora_target_modules!r}: a non-empty list of names")
        if self.unfreeze_last_n < 1:
            raise ConfigError(f"finetune.unfreeze_last_n={self.unfreeze_last_n}: must be >= 1")


def lora_target_regex(config: FinetuneConfig) -> str:
    """peft ``target_modules`` regex (full match on module names) for the configured modules."""
    lm = "|".join(config.lora_target_modules)
    pattern = rf".*language_model\..*\.({lm})"
    if config.lora_vision:
        pattern = rf"(?:{pattern}|.*visual\.blocks\.\d+\.attn\.({'|'.join(VISION_LORA_MODULES)}))"
    return pattern


def apply_finetune(model: nn.Module, config: FinetuneConfig) -> nn.Module:
    """Set up a ``Qwen2_5_VLForConditionalGeneration`` for training; returns the model to use.

    Every base parameter is frozen first. ``lora`` returns a ``peft.PeftModel`` whose
    adapters are the only trainable parameters (LoRA B starts at zero, so the features
    equal the base model's until the first update); ``full`` unfreezes the last N decoder
    layers in place; ``none`` leaves everything frozen. Gradient checkpointing is enabled
    afterwards, non-reentrant, without peft's input-grad hook: that hook would also make
    the frozen vision tower's output require grad and keep its activations for a backward
    pass that trains nothing.
    """
    model.requires_grad_(False)
    if config.mode == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=lora_target_regex(config),
            bias="none",
        )
        with warnings.catch_warnings():  # peft probes transformers 5's deprecated is_gradient_checkpointing
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = get_peft_model(model, lora)
        if not any(p.requires_grad for p in model.parameters()):
            raise ConfigError(f"finetune.lora_target_modules={config.lora_target_modules}: matched no module")
    elif config.mode == "full":
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        layers = base.model.language_model.layers
        if config.unfreeze_last_n > len(layers):
            raise ConfigError(f"finetune.unfreeze_last_n={config.unfreeze_last_n}: the model has {len(layers)} layers")
        for layer in layers[-config.unfreeze_last_n:]:
            layer.requires_grad_(True)
    if config.gradient_checkpointing and config.mode != "none":
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        # peft/transformers may have registered the input-grad hook; remove it (see docstring).
        if hasattr(base, "disable_input_require_grads"):
            base.disable_input_require_grads()
    return model
