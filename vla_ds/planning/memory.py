"""Per-GPU memory estimate of a training config, before anything is allocated.

``scripts/estimate_memory.py`` answers "which ``ds_configs/*.json`` fits my GPUs?" without
a GPU: it builds the reference policy on the meta device (:func:`count_policy_parameters`,
exact parameter counts, no weights), then the pure functions here turn counts and shapes
into bytes. Everything below :func:`count_policy_parameters` is arithmetic on ints and
small dataclasses, so it is unit-tested without building a model.

Per GPU, the estimate is the sum of (bytes)::

    weights           bf16 parameters resident on the GPU
    gradients         trainable parameters only, plus DeepSpeed's reduction buckets
    optimizer states  fp32 master + Adam m + v (12 bytes per trainable parameter)
    activations       what the forward keeps for backward at micro batch B
    fixed overhead    CUDA context + allocator fragmentation (FIXED_OVERHEAD_BYTES)

How DeepSpeed 0.19.8 holds gradients (read in ``runtime/zero/stage_1_and_2.py`` and
``stage3.py``; the model is bf16 and ``data_types.grad_accum_dtype`` is fp32 in every
shipped config):

- ZeRO-2: ``setup_buckets`` allocates the reduction bucket in the compute dtype (bf16),
  ``reduce_bucket_size`` elements, twice when ``overlap_comm`` (double buffering). With an
  fp32 accumulation dtype, ``_use_compact_grad_partition_buffer`` is true, so the rank's
  gradient partition is one fp32 buffer of trainable/N elements on the GPU
  (``_build_compact_grad_partition_buffer``, allocated on the current device even with
  ``offload_optimizer``). With ``offload_optimizer`` the step copies it into a pinned fp32
  CPU partition (``initialize_optimizer_states``) and a bf16 staging buffer of the
  largest trainable tensor stays on the GPU (``temp_grad_buffer_for_gpu_offload``).
  With a bf16 accumulation dtype the partition is bf16 (``grads_in_partition``).
- ZeRO-3: one bf16 bucket of ``reduce_bucket_size`` on the GPU (``contiguous_gradients``)
  and ``grad_partitions_flat_buffer``, fp32, trainable/N elements, on the GPU, or in
  pinned CPU memory with ``offload_optimizer``. ``initialize_optimizer_states`` adds a
  gradient buffer for the fp32 master weights of the largest sub-group (<= trainable/N):
  on the GPU without offload; with offload, per-sub-group pinned buffers on the CPU, so
  about 3 x 4 bytes per partitioned trainable parameter there.
- ZeRO-1 (and ZeRO-0, modelled as plain data parallel): gradients are not partitioned;
  every rank holds bf16 gradients and an fp32 accumulator for all trainable parameters.
- Every stage: one in-flight bf16 gradient (the largest trainable tensor) before it is
  copied into a bucket.
- vla_ds's ``train.coalesce_grad_reduction`` (on by default) with gradient accumulation
  under ZeRO-2: the gradients are reduced once per step, so until then a rank holds every
  trainable parameter's gradient whole: the current micro batch's (bf16) and vla_ds's
  running sum (fp32 when ``grad_accum_dtype`` is fp32).

Activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models", eq. 1): a transformer layer keeps s*b*h*(34 + 5*a*s/h) bytes in 16-bit
(s tokens, b samples, h hidden, a heads). The 5as/h term is the materialised attention
scores, softmax and dropout mask; the backbone runs with sdpa (flash / memory-efficient
kernels), which never materialises them, so that term is dropped for it. The formula
assumes a 4h GELU MLP and dropout; Qwen2.5's SwiGLU MLP (11008 = 5.4h) keeps more, while
its frozen LoRA base linears and absent dropout keep less, so treat it as +-30 %.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from vla_ds.errors import ConfigError
from vla_ds.models.backbone import REFERENCE_MAX_PIXELS, REFERENCE_MIN_PIXELS

if TYPE_CHECKING:  # the model code imports torch; the arithmetic below does not need it
    from vla_ds.models.finetune import FinetuneConfig

GiB = 1024**3
# CUDA context, cuBLAS/NCCL workspaces and caching-allocator fragmentation; measured values
# for a PyTorch + NCCL process are 0.8-2 GB, so this is a round middle.
FIXED_OVERHEAD_BYTES = int(1.5 * GiB)

BF16_BYTES = 2
FP32_BYTES = 4
# Mixed-precision Adam: fp32 master weight + exp_avg + exp_avg_sq.
ADAM_BYTES_PER_PARAM = 3 * FP32_BYTES

# LM tokens of the chat template plus a typical instruction (system prompt, role markers
# and ~20 instruction tokens); each view adds <|vision_start|> and <|vision_end|> around
# its image tokens.
PROMPT_TEXT_TOKENS = 40
VISION_MARKER_TOKENS_PER_VIEW = 2


# Fastest first: the recommendation is the first of these that fits.
STAGE2_CONFIG_PREFERENCE = ("stage2.json", "stage2_offload.json", "stage3_offload.json")

# DeepSpeed 0.19.8 defaults (runtime/zero/config.py) for keys a JSON may leave out.
_DS_REDUCE_BUCKET_SIZE = int(5e8)
_DS_PREFETCH_BUCKET_SIZE = int(5e7)
_DS_PARAM_PERSISTENCE_THRESHOLD = int(1e5)
_DS_SUB_GROUP_SIZE = int(1e9)


# --------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class ParamCounts:
    """Parameter elements of the policy (shared tensors counted once).

    Attributes:
        trainable_vl: trained elements inside the VL backbone (LoRA adapters, or the
            unfrozen decoder layers); the "vl" optimizer group.
        trainable_other: trained elements outside it (sensor encoder + action expert).
        frozen: elements never trained (the frozen base model).
        trainable_vl_tensors, trainable_other_tensors: number of trained tensors per group.
        largest_module: elements of the biggest single module's own parameters (ZeRO-3
            gathers one module at a time; the token embedding for Qwen2.5-VL).
        largest_trainable: elements of the biggest trainable tensor (in-flight gradient).
        param_numels: every tensor's element count, for ZeRO-3's persistence threshold
            (parameters smaller than it are never partitioned). Empty: none persistent.
    """

    trainable_vl: int
    trainable_other: int
    frozen: int
    trainable_vl_tensors: int = 0
    trainable_other_tensors: int = 0
    largest_module: int = 0
    largest_trainable: int = 0
    param_numels: tuple[int, ...] = field(default=(), repr=False)

    @property
    def trainable(self) -> int:
        return self.trainable_vl + self.trainable_other

    @property
    def total(self) -> int:
        return self.trainable + self.frozen

    def persistent(self, threshold: int) -> int:
        """Elements in tensors smaller than ``threshold`` (kept whole on every GPU by ZeRO-3)."""
        return sum(n for n in self.param_numels if n < threshold)


@dataclass(frozen=True)
class ZeroSettings:
    """The parts of a DeepSpeed JSON that decide where bytes live.

    Attributes:
        stage: ZeRO stage 0-3.
        offload_optimizer: ``zero_optimization.offload_optimizer.device`` is cpu/nvme.
        offload_param: ``zero_optimization.offload_param.device`` is cpu/nvme (ZeRO-3).
        grad_accum_fp32: ``data_types.grad_accum_dtype`` is fp32 (else the compute dtype).
        reduce_bucket_size: elements per gradient reduction bucket.
        overlap_comm: double-buffered buckets (DeepSpeed's default: on for ZeRO-3 only).
        prefetch_bucket_size: ZeRO-3 parameter elements fetched ahead of use.
        param_persistence_threshold: ZeRO-3 keeps tensors smaller than this unpartitioned.
        sub_group_size: ZeRO-3 optimizer sub-group size (elements).
        coalesce: ZeRO-2 with gradient accumulation (or ``"auto"`` steps, counted as accumulating)
            and ``vla_ds.train.coalesce_grad_reduction`` (the default): gradients are reduced
            once per step, so kept whole until then.
    """

    stage: int = 2
    offload_optimizer: bool = False
    offload_param: bool = False
    grad_accum_fp32: bool = True
    reduce_bucket_size: int = _DS_REDUCE_BUCKET_SIZE
    overlap_comm: bool = False
    prefetch_bucket_size: int = _DS_PREFETCH_BUCKET_SIZE
    param_persistence_threshold: int = _DS_PARAM_PERSISTENCE_THRESHOLD
    sub_group_size: int = _DS_SUB_GROUP_SIZE
    coalesce: bool = False

    def __post_init__(self) -> None:
        if self.stage not in (0, 1, 2, 3):
            raise ConfigError(f"zero_optimization.stage={self.stage!r}: expected 0, 1, 2 or 3")
        if self.offload_param and self.stage != 3:
            raise ConfigError(f"zero_optimization.offload_param needs ZeRO stage 3, got stage {self.stage}")

    @classmethod
    def from_ds_config(cls, ds: dict[str, Any]) -> "ZeroSettings":
        """Read the ``zero_optimization`` and ``data_types`` keys of a DeepSpeed JSON."""
        from vla_ds.training.config import zero_stage

        zero = ds.get("zero_optimization") or {}
        stage = zero_stage(ds)

        def offloaded(key: str) -> bool:
            device = (zero.get(key) or {}).get("device", "none")
            return str(device).lower() in ("cpu", "nvme")

        accum = str((ds.get("data_types") or {}).get("grad_accum_dtype") or "bf16").lower()
        overlap = zero.get("overlap_comm")
        steps = ds.get("gradient_accumulation_steps", 1)
        coalesce = ((ds.get("vla_ds") or {}).get("train") or {}).get("coalesce_grad_reduction", True)
        return cls(
            stage=stage,
            offload_optimizer=offloaded("offload_optimizer"),
            offload_param=offloaded("offload_param"),
            grad_accum_fp32=accum in ("fp32", "float32", "float"),
            reduce_bucket_size=int(float(zero.get("reduce_bucket_size", _DS_REDUCE_BUCKET_SIZE))),
            overlap_comm=(stage == 3) if overlap is None else bool(overlap),
            prefetch_bucket_size=int(float(zero.get("stage3_prefetch_bucket_size",
                                                    zero.get("prefetch_bucket_size", _DS_PREFETCH_BUCKET_SIZE)))),
            param_persistence_threshold=int(float(zero.get(
                "stage3_param_persistence_threshold",
                zero.get("param_persistence_threshold", _DS_PARAM_PERSISTENCE_THRESHOLD)))),
            sub_group_size=int(float(zero.get("sub_group_size", _DS_SUB_GROUP_SIZE))),
            coalesce=bool(coalesce) and stage == 2 and (not isinstance(steps, int) or steps > 1),
        )

    def describe(self) -> str:
        off = [name for name, on in (("optimizer", self.offload_optimizer), ("params", self.offload_param)) if on]
        return f"ZeRO-{self.stage}" + (f", offload {'+'.join(off)}" if off else "")


def finetune_config(raw: dict[str, Any]) -> "FinetuneConfig":
    """The :class:`~vla_ds.models.finetune.FinetuneConfig` of a whole JSON, parsed as training
    parses its ``vla_ds.finetune`` section; stage 1 trains no backbone weight (mode "none")."""
    from vla_ds.dataclass_io import dataclass_from_dict
    from vla_ds.models.finetune import FinetuneConfig
    from vla_ds.training.config import MODEL_PRESETS, PROJECT_KEY

    project = raw.get(PROJECT_KEY) or {}
    if project.get("stage", "stage1") == "stage1":
        return FinetuneConfig(mode="none", gradient_checkpointing=False)
    where = f"{PROJECT_KEY}.finetune."
    preset = MODEL_PRESETS.get(project.get("model_preset", "reference"), {})
    base = dataclass_from_dict(FinetuneConfig, preset.get("finetune", {}), where)
    return dataclass_from_dict(FinetuneConfig, project.get("finetune") or {}, where, base)


@dataclass(frozen=True)
class ActivationShape:
    """Sizes that decide activation memory, per sample.

    Attributes:
        lm_tokens: s, language-model tokens of one sample (image tokens + markers + text).
        lm_layers, lm_hidden, lm_heads: decoder depth, width and attention heads.
        vision_tokens: patches one sample sends through the vision tower (before the 2x2 merge).
        vision_layers, vision_hidden, vision_heads: vision tower depth, width and heads.
        lm_grad_layers: decoder layers whose activations backward needs (all of them with
            LoRA on the LM, the unfrozen ones in "full" mode, 0 when frozen).
        vision_grad_layers: vision blocks whose activations backward needs (LoRA on vision).
        head_bytes_per_sample: sensor encoder + action expert activations of one sample.
        sdpa: fused attention (drops the 5as/h term of the backbone's layers).
    """

    lm_tokens: int
    lm_layers: int
    lm_hidden: int
    lm_heads: int
    vision_tokens: int = 0
    vision_layers: int = 0
    vision_hidden: int = 1
    vision_heads: int = 1
    lm_grad_layers: int = 0
    vision_grad_layers: int = 0
    head_bytes_per_sample: int = 0
    sdpa: bool = True


# --------------------------------------------------------------------------------------
# Tokens


def _smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's resize rule: both sides multiples of ``factor``, pixels within [min, max]."""
    try:  # the PIL processor module, importable without torchvision
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            smart_resize,
        )
    except ImportError:
        smart_resize = None
    if smart_resize is not None:
        return tuple(smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels))
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass(frozen=True)
class ImageTokens:
    """One view after the processor: resized size, vision-tower patches, LM tokens."""

    resized_height: int
    resized_width: int
    patches: int
    tokens: int


def image_tokens(height: int, width: int, patch_size: int = 14, merge_size: int = 2,
                 min_pixels: int = REFERENCE_MIN_PIXELS, max_pixels: int = REFERENCE_MAX_PIXELS) -> ImageTokens:
    """Tokens of one ``height`` x ``width`` image (a still image: temporal grid 1).

    The processor resizes to multiples of patch*merge (28) within [min_pixels, max_pixels];
    the vision tower sees one patch per 14x14 pixels, the LM one token per 2x2 patches.
    """
    factor = patch_size * merge_size
    h, w = _smart_resize(height, width, factor, min_pixels, max_pixels)
    patches = (h // patch_size) * (w // patch_size)
    return ImageTokens(h, w, patches, patches // merge_size**2)


def lm_tokens_per_sample(tokens_per_view: int, views: int, text_tokens: int = PROMPT_TEXT_TOKENS) -> int:
    """Language-model sequence length of one sample: views' image tokens, markers and text."""
    return views * (tokens_per_view + VISION_MARKER_TOKENS_PER_VIEW) + text_tokens


def grad_layers(finetune: FinetuneConfig, lm_layers: int, vision_layers: int) -> tuple[int, int]:
    """(LM layers, vision blocks) whose activations backward needs under ``finetune``.

    LoRA on every decoder layer puts all of them in the graph. "full" trains only the last
    N decoder layers: nothing before them needs a gradient, so their forward keeps nothing.
    The vision tower is in the graph only with LoRA on it; otherwise it runs without grad.
    """
    if finetune.mode == "lora":
        return lm_layers, (vision_layers if finetune.lora_vision else 0)
    if finetune.mode == "full":
        return min(finetune.unfreeze_last_n, lm_layers), 0
    return 0, 0


# --------------------------------------------------------------------------------------
# Bytes


def transformer_layer_activation_bytes(tokens: int, batch: int, hidden: int, heads: int, sdpa: bool = True) -> int:
    """Korthikanti et al. 2022: s*b*h*(34 + 5*a*s/h) bytes in 16-bit; sdpa drops 5as/h."""
    per_token = 34 * hidden + (0 if sdpa else 5 * heads * tokens)
    return tokens * batch * per_token


def checkpointed_layer_bytes(tokens: int, batch: int, hidden: int) -> int:
    """What a checkpointed layer keeps: its bf16 input, 2*s*b*h bytes."""
    return 2 * tokens * batch * hidden


def head_activation_bytes_per_sample(sensor_config, action_config) -> int:
    """Rough activations of the sensor encoder + action expert for one sample (bf16 compute).

    Takes a ``SensorEncoderConfig`` and an ``ActionExpertConfig``. Counts the fp32 window and
    its bf16 copy, each conv's output before and after GELU, the position-embedding sum and
    dropout mask, and each Transformer layer with the full Korthikanti formula (the heads'
    ``nn.TransformerEncoderLayer`` has a 4d MLP and dropout, as the formula assumes).
    """
    se, ae = sensor_config, action_config
    total = se.window_size * se.in_channels * (FP32_BYTES + 2 * BF16_BYTES)  # fp32 input, bf16 cast, masked
    length = se.window_size
    for channels in se.conv_channels:
        length = (length + 2 * (se.kernel_size // 2) - se.kernel_size) // se.stride + 1
        total += 2 * length * channels * BF16_BYTES  # conv output and GELU output
    total += length * se.d_model * (BF16_BYTES + 1)  # + positions, dropout mask
    total += se.num_layers * transformer_layer_activation_bytes(length, 1, se.d_model, se.num_heads, sdpa=False)
    total += 3 * se.out_dim * BF16_BYTES  # pooled -> MLP
    tokens = ae.num_vl_tokens + 2 + ae.horizon  # [vl tokens, sensor, timestep] + actions
    total += 4 * ae.num_vl_tokens * (ae.vl_feature_dim + ae.d_model) * BF16_BYTES  # VL projections
    total += 4 * 2 * ae.d_model * BF16_BYTES  # sensor and timestep projections
    total += ae.num_layers * transformer_layer_activation_bytes(tokens, 1, ae.d_model, ae.num_heads, sdpa=False)
    return int(total)


def cache_bytes_per_sample(action_config, hidden_size: int) -> int:
    """Disk (and page cache) of one sample's Stage 1 cached VL features: one float32 pooled
    vector, or the tokens conditioning's tokens in bfloat16 (``vla_ds.training.cache``)."""
    if action_config.vl_conditioning == "pooled":
        return hidden_size * FP32_BYTES
    return action_config.num_vl_tokens * hidden_size * BF16_BYTES


def activation_bytes(shape: ActivationShape, micro_batch: int, checkpointing: bool) -> int:
    """Activation bytes of one micro batch on one GPU.

    Kept for backward: every grad-needing decoder layer (its full activations, or only its
    bf16 input when checkpointed) and likewise every grad-needing vision block. On top, the
    largest *transient* layer: the layer recomputed in backward when checkpointing, or one
    layer of a part that runs without grad (its activations are freed layer by layer).
    Plus the pooled fp32 hidden state (masked mean) and the heads.
    """
    b = micro_batch
    s, h = shape.lm_tokens, shape.lm_hidden
    sv, hv = shape.vision_tokens, shape.vision_hidden
    lm_layer = transformer_layer_activation_bytes(s, b, h, shape.lm_heads, shape.sdpa)
    vision_layer = transformer_layer_activation_bytes(sv, b, hv, shape.vision_heads, shape.sdpa) if sv else 0

    kept = 0
    transient = 0
    for n_grad, n_all, layer, ckpt_layer in (
        (shape.lm_grad_layers, shape.lm_layers, lm_layer, checkpointed_layer_bytes(s, b, h)),
        (shape.vision_grad_layers, shape.vision_layers, vision_layer, checkpointed_layer_bytes(sv, b, hv)),
    ):
        if n_all == 0 or layer == 0:
            continue
        if n_grad and checkpointing:
            kept += n_grad * ckpt_layer
            transient = max(transient, layer)
        elif n_grad:
            kept += n_grad * layer
        if n_grad < n_all:  # the no-grad part still runs, one layer at a time
            transient = max(transient, layer)
    pooled = 2 * s * b * h * FP32_BYTES  # last hidden state in fp32 and the masked copy
    return kept + transient + pooled + b * shape.head_bytes_per_sample


def weight_bytes(counts: ParamCounts, zero: ZeroSettings, num_gpus: int) -> int:
    """bf16 parameters resident on one GPU.

    ZeRO-0/1/2 replicate every parameter. ZeRO-3 keeps 1/N of each partitioned tensor,
    every tensor below the persistence threshold whole, and a working set while a module
    runs: the largest module gathered plus the prefetch bucket. With ``offload_param`` the
    1/N shards live in CPU memory and only the working set and persistent tensors remain.
    """
    if zero.stage < 3:
        return counts.total * BF16_BYTES
    persistent = counts.persistent(zero.param_persistence_threshold)
    working_set = counts.largest_module + zero.prefetch_bucket_size
    shards = 0 if zero.offload_param else math.ceil((counts.total - persistent) / num_gpus)
    return (shards + persistent + working_set) * BF16_BYTES


def gradient_bytes(counts: ParamCounts, zero: ZeroSettings, num_gpus: int) -> int:
    """Gradient memory of one GPU (see the module docstring for DeepSpeed's buffers)."""
    trainable = counts.trainable
    if trainable == 0:
        return 0
    partition = math.ceil(trainable / num_gpus)
    accum_bytes = FP32_BYTES if zero.grad_accum_fp32 else BF16_BYTES
    in_flight = counts.largest_trainable * BF16_BYTES
    if zero.stage <= 1:
        # Not partitioned: bf16 grads + the fp32 accumulator for every trainable parameter.
        fp32 = trainable * FP32_BYTES if zero.grad_accum_fp32 else 0
        return trainable * BF16_BYTES + fp32
    if zero.stage == 2:
        buckets = (2 if zero.overlap_comm else 1) * zero.reduce_bucket_size * BF16_BYTES
        # The compact fp32 partition is on the GPU with or without offload; with a bf16
        # accumulation dtype the bf16 partition is, too.
        staging = counts.largest_trainable * BF16_BYTES if zero.offload_optimizer else 0
        # Coalesced: each micro batch's bf16 gradients, plus the running sum in the accumulation dtype.
        held = trainable * (BF16_BYTES + (FP32_BYTES if zero.grad_accum_fp32 else 0)) if zero.coalesce else 0
        return buckets + partition * accum_bytes + staging + in_flight + held
    # ZeRO-3
    buckets = zero.reduce_bucket_size * BF16_BYTES
    if zero.offload_optimizer:
        return buckets + in_flight
    master_grad = min(partition, zero.sub_group_size) * FP32_BYTES
    return buckets + partition * accum_bytes + master_grad + in_flight


def optimizer_bytes(counts: ParamCounts, zero: ZeroSettings, num_gpus: int) -> int:
    """fp32 master + Adam states on one GPU: 12 bytes per trainable parameter, /N for ZeRO>=1."""
    if zero.offload_optimizer:
        return 0
    trainable = counts.trainable if zero.stage == 0 else math.ceil(counts.trainable / num_gpus)
    return trainable * ADAM_BYTES_PER_PARAM


def cpu_bytes(counts: ParamCounts, zero: ZeroSettings, num_gpus: int) -> dict[str, int]:
    """CPU RAM one rank needs for what the config offloads (pinned host memory)."""
    out = {"optimizer_states": 0, "gradients": 0, "params": 0}
    partition = math.ceil(counts.trainable / num_gpus)
    if zero.offload_optimizer:
        out["optimizer_states"] = partition * ADAM_BYTES_PER_PARAM
        # ZeRO-2: the fp32 gradient partition the CPU Adam reads. ZeRO-3: the fp32 grad
        # partitions, the per-sub-group copies and the largest sub-group's buffer.
        out["gradients"] = partition * FP32_BYTES * (3 if zero.stage == 3 else 1)
    if zero.offload_param:
        persistent = counts.persistent(zero.param_persistence_threshold)
        out["params"] = math.ceil((counts.total - persistent) / num_gpus) * BF16_BYTES
    return out


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU (and per rank in CPU memory) for one config.

    ``activations_checkpointed`` / ``activations_not_checkpointed`` are both computed;
    ``checkpointing`` picks the one in :attr:`total`.
    """

    weights: int
    gradients: int
    optimizer_states: int
    activations_checkpointed: int
    activations_not_checkpointed: int
    checkpointing: bool
    overhead: int
    cpu_optimizer_states: int = 0
    cpu_gradients: int = 0
    cpu_params: int = 0
    ema: int = 0

    @property
    def activations(self) -> int:
        return self.activations_checkpointed if self.checkpointing else self.activations_not_checkpointed

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer_states + self.ema + self.activations + self.overhead

    @property
    def cpu_total(self) -> int:
        return self.cpu_optimizer_states + self.cpu_gradients + self.cpu_params

    def fits(self, gpu_memory: int) -> bool:
        return self.total <= gpu_memory

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "activations": self.activations, "total": self.total, "cpu_total": self.cpu_total}


def estimate(counts: ParamCounts, zero: ZeroSettings, num_gpus: int, micro_batch: int,
             shape: ActivationShape, checkpointing: bool,
             overhead: int = FIXED_OVERHEAD_BYTES, ema: bool = False) -> MemoryEstimate:
    """Per-GPU memory of training ``counts`` under ``zero`` on ``num_gpus`` ranks; ``ema``
    adds the moving average of the weights (``vla_ds.training.ema``: fp32, every trainable
    parameter, on every rank)."""
    if num_gpus < 1:
        raise ConfigError(f"num_gpus={num_gpus!r}: expected a positive integer")
    if micro_batch < 1:
        raise ConfigError(f"micro batch={micro_batch!r}: expected a positive integer")
    cpu = cpu_bytes(counts, zero, num_gpus)
    return MemoryEstimate(
        weights=weight_bytes(counts, zero, num_gpus),
        gradients=gradient_bytes(counts, zero, num_gpus),
        optimizer_states=optimizer_bytes(counts, zero, num_gpus),
        activations_checkpointed=activation_bytes(shape, micro_batch, True),
        activations_not_checkpointed=activation_bytes(shape, micro_batch, False),
        checkpointing=checkpointing,
        overhead=overhead,
        cpu_optimizer_states=cpu["optimizer_states"],
        cpu_gradients=cpu["gradients"],
        cpu_params=cpu["params"],
        ema=counts.trainable * FP32_BYTES if ema else 0,
    )


def parse_memory_size(text: str) -> int:
    """``"24GB"``, ``"24 GiB"``, ``"24"`` (GB), ``"80000MB"`` -> bytes.

    GB means 1024**3 bytes, as nvidia-smi and the GPU's marketing size do (a "24 GB" card
    has 24 GiB).
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(I?B)?\s*", str(text).upper())
    if not match:
        raise ConfigError(f"--gpu-memory {text!r}: expected a size such as 24GB or 80GB")
    value, prefix = float(match.group(1)), match.group(2) or "G"
    return int(value * 1024 ** ("KMGT".index(prefix) + 1))


def recommend(fits_by_config: dict[str, bool]) -> str | None:
    """The fastest stage-2 config that fits (stage2 > stage2_offload > stage3_offload)."""
    for name in STAGE2_CONFIG_PREFERENCE:
        if fits_by_config.get(name):
            return name
    return None


# --------------------------------------------------------------------------------------
# Counting the real architecture on the meta device


def _largest_module(*modules) -> int:
    best = 0
    for root in modules:
        for module in root.modules():
            best = max(best, sum(p.numel() for p in module.parameters(recurse=False)))
    return best


def count_policy_parameters(hf_config, finetune: FinetuneConfig, sensor_config, action_config) -> ParamCounts:
    """Build backbone + sensor encoder + action expert on the meta device and count.

    No weights are read or allocated. ``hf_config`` is a ``Qwen2_5_VLConfig`` (e.g.
    ``reference_backbone_config()``). The finetune mode is applied by the function training
    uses, :func:`vla_ds.models.finetune.apply_finetune`, so the two cannot disagree about
    what is trainable (gradient checkpointing, which it may also enable, changes no count).
    """
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from vla_ds.models.action_expert import ActionExpert
    from vla_ds.models.finetune import apply_finetune
    from vla_ds.models.sensor_encoder import SensorEncoder

    with torch.device("meta"):
        vl = Qwen2_5_VLForConditionalGeneration(hf_config)
        heads = torch.nn.ModuleList([SensorEncoder(sensor_config), ActionExpert(action_config)])
    with torch.device("meta"):  # peft's LoRA tensors on meta too
        vl = apply_finetune(vl, finetune)

    vl_params = list(vl.parameters())  # deduplicated: the tied lm_head counts once
    head_params = list(heads.parameters())
    vl_train = [p for p in vl_params if p.requires_grad]
    other_train = [p for p in head_params if p.requires_grad]
    frozen = [p for p in vl_params + head_params if not p.requires_grad]
    trainable = vl_train + other_train
    return ParamCounts(
        trainable_vl=sum(p.numel() for p in vl_train),
        trainable_other=sum(p.numel() for p in other_train),
        frozen=sum(p.numel() for p in frozen),
        trainable_vl_tensors=len(vl_train),
        trainable_other_tensors=len(other_train),
        largest_module=_largest_module(vl, heads),
        largest_trainable=max((p.numel() for p in trainable), default=0),
        param_numels=tuple(p.numel() for p in vl_params + head_params),
    )


def activation_shape(hf_config, finetune: FinetuneConfig, lm_tokens: int, vision_tokens: int,
                     head_bytes_per_sample: int, sdpa: bool = True) -> ActivationShape:
    """The :class:`ActivationShape` of a Qwen2.5-VL config under ``finetune``."""
    text, vision = hf_config.text_config, hf_config.vision_config
    lm_grad, vision_grad = grad_layers(finetune, text.num_hidden_layers, vision.depth)
    return ActivationShape(
        lm_tokens=lm_tokens, lm_layers=text.num_hidden_layers, lm_hidden=text.hidden_size,
        lm_heads=text.num_attention_heads, vision_tokens=vision_tokens, vision_layers=vision.depth,
        vision_hidden=vision.hidden_size, vision_heads=vision.num_heads, lm_grad_layers=lm_grad,
        vision_grad_layers=vision_grad, head_bytes_per_sample=head_bytes_per_sample, sdpa=sdpa,
    )


# --------------------------------------------------------------------------------------
# Report


def gb(n_bytes: int) -> str:
    return f"{n_bytes / GiB:.2f}"


def format_estimate(name: str, est: MemoryEstimate, gpu_memory: int, num_gpus: int) -> str:
    """The per-component table of one config."""
    ckpt = "on" if est.checkpointing else "off"
    other = est.activations_not_checkpointed if est.checkpointing else est.activations_checkpointed
    rows = [
        ("weights (bf16)", est.weights, ""),
        ("gradients", est.gradients, ""),
        ("optimizer states", est.optimizer_states, "offloaded to CPU" if est.cpu_optimizer_states else ""),
        *([("EMA of the weights (fp32)", est.ema, "ema.enabled")] if est.ema else []),
        (f"activations (checkpointing {ckpt})", est.activations,
         f"checkpointing {'off' if est.checkpointing else 'on'}: {gb(other)}" if other != est.activations else ""),
        ("fixed overhead", est.overhead, "CUDA context + fragmentation"),
    ]
    verdict = "fits" if est.fits(gpu_memory) else "does NOT fit"
    lines = [f"  {'per GPU':<34}{'GB':>8}"]
    lines += [f"  {label:<34}{gb(value):>8}" + (f"   ({note})" if note else "") for label, value, note in rows]
    lines.append(f"  {'total':<34}{gb(est.total):>8}   {verdict} in {gb(gpu_memory)} GB")
    if est.cpu_total:
        parts = ", ".join(f"{k} {gb(v)}" for k, v in (("optimizer states", est.cpu_optimizer_states),
                                                       ("gradients", est.cpu_gradients),
                                                       ("params", est.cpu_params)) if v)
        lines.append(f"  {'CPU RAM per GPU':<34}{gb(est.cpu_total):>8}   ({parts}; "
                     f"x{num_gpus} GPUs = {gb(est.cpu_total * num_gpus)} GB on one node)")
    return "\n".join(lines)


def format_comparison(rows: list[tuple[str, MemoryEstimate, str]], gpu_memory: int) -> str:
    """One line per (config name, estimate, setup text): total per GPU, CPU RAM per GPU, fits."""
    lines = [f"  {'config':<22}{'setup':<38}{'total GB':>9}{'CPU GB':>8}  fits"]
    for name, est, setup in rows:
        lines.append(f"  {name:<22}{setup:<38}{gb(est.total):>9}{gb(est.cpu_total):>8}  "
                     f"{'yes' if est.fits(gpu_memory) else 'no'}")
    return "\n".join(lines)
