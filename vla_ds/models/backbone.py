"""Qwen2.5-VL backbone: loading, prompt building, pooled VL features.

Two halves that meet at one batch dict:

- :class:`VLInputBuilder` (CPU, picklable, runs in DataLoader workers) turns camera views and
  an instruction into Qwen2.5-VL inputs: the chat prompt with one image per view, image pads
  expanded to the number of merged patches, right padding, and the flattened image patches.
- :class:`VLBackbone` (an ``nn.Module``) runs the Qwen2.5-VL base model (vision tower + language
  model, never the LM head) and returns one feature per sample: the masked mean of the last
  hidden layer over the real tokens, in float32.

Batch produced by the builder (B samples, V_b views for sample b, N = sum of views)::

    input_ids       (B, L)            long   prompt tokens, right padded with the pad token
    attention_mask  (B, L)            long   1 for real tokens, 0 for padding
    pixel_values    (sum_patches, D)  float32 flattened patches of all views, sample-major, view order;
                                             D = 3 * temporal_patch * patch**2 (1176 for Qwen2.5-VL)
    image_grid_thw  (N, 3)            long   (t, h, w) patch grid of each view, same order

Facts from transformers 5.23 this module relies on (checked in its sources):

- ``Qwen2_5_VLForConditionalGeneration.model`` is ``Qwen2_5_VLModel`` with ``.visual`` (vision tower)
  and ``.language_model`` (text decoder); the LM head is ``.lm_head`` on the outer model.
- ``from_pretrained`` takes ``dtype=`` (``torch_dtype=`` is deprecated).
- Multimodal RoPE positions are only built when ``mm_token_type_ids`` (0 text, 1 image, 2 video)
  is passed with ``input_ids``; otherwise plain 1-D positions are silently used. Positions are
  computed from the attention mask, so right padding does not change real tokens' features.
- The image processor is ``Qwen2VLImageProcessorPil`` when loaded with ``backend="pil"`` (the
  default ``Qwen2VLImageProcessor`` needs torchvision). ``min_pixels``/``max_pixels`` are stored
  as ``size["shortest_edge"]``/``size["longest_edge"]``.
- Each image takes ``grid_t * grid_h * grid_w // merge_size**2`` pad tokens
  (``Qwen2_5_VLProcessor.replace_image_token``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vla_ds.batch import ATTENTION_MASK, IMAGE_GRID_THW, INPUT_IDS, PIXEL_VALUES
from vla_ds.errors import BackboneError, ConfigError

logger = logging.getLogger(__name__)

# Identifies the prompt format below; a VL-feature cache keys on it, so bump it whenever
# the prompt text, the special tokens used or the truncation rule changes.
PROMPT_TEMPLATE_VERSION = "qwen2.5-vl-chat-v1"

QWEN2_5_VL_MODEL_TYPE = "qwen2_5_vl"
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
_ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3")



DEFAULT_MAX_PIXELS = 320 * 28 * 28  # at most 320 LM tokens per camera view


@dataclass
class BackboneConfig:
    """Which Qwen2.5-VL to load and how to feed it.

    Attributes:
        model_name_or_path: Local directory or hub id of a Qwen2.5-VL checkpoint (``--vl-model``).
            A local directory is loaded with ``local_files_only`` (no network).
        min_pixels: Lower bound on the pixels of each view after resizing; ``None`` keeps the
            checkpoint's image processor setting (3136 for Qwen2.5-VL-3B-Instruct).
        max_pixels: Upper bound on the pixels of each view after resizing. Each 28x28 pixel
            block becomes one LM token, so the default, 320 x 28 x 28 = 250880, is at most
            320 tokens per view: the guide's 640x360 cameras keep their size (299 tokens),
            a 1920x1080 camera is scaled down to the same budget. ``None`` keeps the
            processor's setting (12845056: about 2,700 tokens for 1920x1080, a memory blow-up).
        dtype: Dtype the weights are loaded in: ``"bfloat16"`` or ``"float32"``.
        attn_implementation: transformers attention backend (``"sdpa"``, ``"eager"``,
            ``"flash_attention_2"``, ``"flash_attention_3"``).
        max_text_tokens: Instructions longer than this many tokens (the instruction text only,
            not the template or image tokens) are truncated.
    """

    model_name_or_path: str = "Qwen/Qwen2.5-VL-3B-Instruct"
    min_pixels: int | None = None
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    dtype: str = "bfloat16"
    attn_implementation: str = "sdpa"
    max_text_tokens: int = 256

    def __post_init__(self) -> None:
        if not isinstance(self.model_name_or_path, (str, os.PathLike)) or not str(self.model_name_or_path).strip():
            raise ConfigError(f"backbone.model_name_or_path must be a non-empty path or hub id, got {self.model_name_or_path!r}")
        self.model_name_or_path = str(self.model_name_or_path)
        for name in ("min_pixels", "max_pixels"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ConfigError(f"backbone.{name} must be a positive integer or null, got {value!r}")
        if self.min_pixels is not None and self.max_pixels is not None and self.min_pixels > self.max_pixels:
            raise ConfigError(
                f"backbone.min_pixels ({self.min_pixels}) must not exceed backbone.max_pixels ({self.max_pixels})"
            )
        if self.dtype not in _DTYPES:
            raise ConfigError(f"backbone.dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.attn_implementation not in _ATTN_IMPLEMENTATIONS:
            raise ConfigError(
                f"backbone.attn_implementation must be one of {list(_ATTN_IMPLEMENTATIONS)}, "
                f"got {self.attn_implementation!r}"
            )
        if isinstance(self.max_text_tokens, bool) or not isinstance(self.max_text_tokens, int) or self.max_text_tokens < 1:
            raise ConfigError(f"backbone.max_text_tokens must be an integer >= 1, got {self.max_text_tokens!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]


# --------------------------------------------------------------------------------------
# Loading


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _looks_like_local_path(path: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else is meant as a filesystem path."""
    return (
        os.path.isabs(path)
        or path.startswith((".", "~"))
        or "\\" in path
        or path.count("/") > 1
    )


def is_local_backbone(path: str) -> bool:
    """True when ``path`` names a local directory (loaded with ``local_files_only``)."""
    return os.path.isdir(os.path.expanduser(path))


def load_backbone_error_message(path: str, problem: str) -> str:
    """The one-line message of a :class:`BackboneError` for ``path``."""
    return f"VL backbone {path!r}: {problem}"


def load_backbone_config(path: str):
    """Read and check a Qwen2.5-VL config from a local directory or hub id.

    Returns a ``transformers.Qwen2_5_VLConfig``. Raises :class:`BackboneError` (one line naming
    ``path``) when the path is missing, has no ``config.json``, or is another kind of model.
    """
    from transformers import AutoConfig

    local_dir = os.path.expanduser(path)
    if os.path.isdir(local_dir):
        config_file = Path(local_dir) / "config.json"
        if not config_file.is_file():
            raise BackboneError(
                load_backbone_error_message(path, "no config.json in this directory (not a Hugging Face model directory)")
            )
        try:
            raw = json.loads(config_file.read_text())
        except (OSError, ValueError) as exc:
            raise BackboneError(load_backbone_error_message(path, f"config.json is unreadable: {_first_line(exc)}")) from exc
        model_type = raw.get("model_type") if isinstance(raw, dict) else None
        if model_type != QWEN2_5_VL_MODEL_TYPE:
            raise BackboneError(
                load_backbone_error_message(
                    path,
                    f"config.json has model_type {model_type!r}, expected {QWEN2_5_VL_MODEL_TYPE!r} "
                    "(a Qwen2.5-VL checkpoint such as Qwen/Qwen2.5-VL-3B-Instruct)",
                )
            )
        try:
            return AutoConfig.from_pretrained(local_dir, local_files_only=True)
        except Exception as exc:  # any parse/validation failure is "cannot load this backbone"
            raise BackboneError(load_backbone_error_message(path, f"invalid config.json: {_first_line(exc)}")) from exc

    if os.path.exists(local_dir):
        raise BackboneError(load_backbone_error_message(path, "is a file, expected a model directory or hub id"))
    if _looks_like_local_path(path):
        raise BackboneError(load_backbone_error_message(path, "directory does not exist"))
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as exc:
        raise BackboneError(
            load_backbone_error_message(
                path,
                "not a local directory, and loading it from the model hub failed "
                f"(pass a local model directory when offline): {_first_line(exc)}",
            )
        ) from exc
    if getattr(config, "model_type", None) != QWEN2_5_VL_MODEL_TYPE:
        raise BackboneError(
            load_backbone_error_message(
                path, f"model_type is {getattr(config, 'model_type', None)!r}, expected {QWEN2_5_VL_MODEL_TYPE!r}"
            )
        )
    return config


def _model_source(path: str) -> tuple[str, bool]:
    """(what to pass to from_pretrained, local_files_only)."""
    local_dir = os.path.expanduser(path)
    if os.path.isdir(local_dir):
        return local_dir, True
    return path, False


# Image processor pixel bounds of Qwen2.5-VL-3B-Instruct (SPEC section 1).
REFERENCE_MIN_PIXELS = 3136
REFERENCE_MAX_PIXELS = 12845056


def reference_backbone_config():
    """The public Qwen2.5-VL-3B-Instruct architecture (SPEC section 1), built offline.

    Enough to instantiate the model on the meta device (parameter counts, sharding plans)
    or with random weights; about 3.75 B parameters.
    """
    from transformers import Qwen2_5_VLConfig

    text_config = {
        "vocab_size": 151936,
        "hidden_size": 2048,
        "intermediate_size": 11008,
        "num_hidden_layers": 36,
        "num_attention_heads": 16,
        "num_key_value_heads": 2,
        "hidden_act": "silu",
        "max_position_embeddings": 128000,
        "rms_norm_eps": 1e-6,
        "use_sliding_window": False,
        "sliding_window": 32768,
        "max_window_layers": 70,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
        "bos_token_id": 151643,
        "eos_token_id": 151645,
    }
    vision_config = {
        "depth": 32,
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "out_hidden_size": 2048,
        "in_channels": 3,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "tokens_per_second": 2,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "hidden_act": "silu",
    }
    return Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=151655,
        video_token_id=151656,
        vision_start_token_id=151652,
        vision_end_token_id=151653,
        bos_token_id=151643,
        eos_token_id=151645,
        tie_word_embeddings=True,
    )


# --------------------------------------------------------------------------------------
# Inputs


class VLInputBuilder:
    """Builds Qwen2.5-VL inputs from camera views and instructions (see the module docstring).

    The prompt is what Qwen2.5-VL's chat template gives for one user turn holding the V views
    and then the instruction, with the default system prompt and the generation prompt::

        <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n
        (<|vision_start|><|image_pad|>*n_v<|vision_end|>) for each view v
        INSTRUCTION<|im_end|>\\n<|im_start|>assistant\\n

    It is assembled from token ids rather than one string: the template pieces and the
    instruction are tokenized separately (they are separated by special tokens, so the ids are
    the same as tokenizing the whole string), which lets the instruction be truncated to
    ``max_text_tokens`` exactly and keeps special-token text inside an instruction as plain text.

    Picklable: holds only the tokenizer, the image processor and ints.
    """

    def __init__(self, tokenizer, image_processor, hf_config, max_text_tokens: int = 256):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.max_text_tokens = int(max_text_tokens)
        self.image_token_id = int(hf_config.image_token_id)
        self.vision_start_token_id = int(hf_config.vision_start_token_id)
        self.vision_end_token_id = int(hf_config.vision_end_token_id)
        self.merge_size = int(image_processor.merge_size)
        vision_merge = int(hf_config.vision_config.spatial_merge_size)
        if self.merge_size != vision_merge:
            raise BackboneError(
                f"image processor merge_size {self.merge_size} differs from the model's spatial_merge_size {vision_merge}"
            )

        vocab_size = len(tokenizer)
        for name in ("image_token_id", "vision_start_token_id", "vision_end_token_id"):
            token_id = getattr(self, name)
            if not 0 <= token_id < vocab_size:
                raise BackboneError(f"config {name}={token_id} is outside the tokenizer's {vocab_size} tokens")
        for token in ("<|im_start|>", "<|im_end|>"):
            ids = self._encode(token, parse_special=True)
            if len(ids) != 1:
                raise BackboneError(f"the tokenizer has no single {token} token (not a Qwen2.5 chat tokenizer)")

        # Template pieces around the views and the instruction (special tokens parsed).
        self.prefix_ids = self._encode(
            f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n", parse_special=True
        )
        self.suffix_ids = self._encode("<|im_end|>\n<|im_start|>assistant\n", parse_special=True)
        pad_id = tokenizer.pad_token_id
        if pad_id is None:
            pad_id = getattr(hf_config, "pad_token_id", None)
        if pad_id is None:
            pad_id = tokenizer.eos_token_id
        if pad_id is None:
            raise BackboneError("the tokenizer has neither a pad token nor an eos token to pad with")
        self.pad_token_id = int(pad_id)

    @classmethod
    def from_pretrained(cls, config: BackboneConfig) -> "VLInputBuilder":
        """Load the tokenizer and the (PIL, torchvision-free) image processor of ``config``'s backbone."""
        from transformers import AutoImageProcessor, AutoTokenizer

        path = config.model_name_or_path
        hf_config = load_backbone_config(path)
        source, local_only = _model_source(path)
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
        except Exception as exc:
            raise BackboneError(load_backbone_error_message(path, f"cannot load the tokenizer: {_first_line(exc)}")) from exc
        processor_kwargs: dict[str, Any] = {}
        if config.min_pixels is not None:
            processor_kwargs["min_pixels"] = config.min_pixels
        if config.max_pixels is not None:
            processor_kwargs["max_pixels"] = config.max_pixels
        try:
            image_processor = AutoImageProcessor.from_pretrained(
                source, local_files_only=local_only, backend="pil", **processor_kwargs
            )
        except Exception as exc:
            raise BackboneError(
                load_backbone_error_message(path, f"cannot load the image processor: {_first_line(exc)}")
            ) from exc
        try:
            return cls(tokenizer, image_processor, hf_config, max_text_tokens=config.max_text_tokens)
        except BackboneError as exc:
            raise BackboneError(load_backbone_error_message(path, str(exc))) from exc

    def _encode(self, text: str, parse_special: bool) -> list[int]:
        return list(
            self.tokenizer(text, add_special_tokens=False, split_special_tokens=not parse_special)["input_ids"]
        )

    def instruction_ids(self, instruction: str) -> list[int]:
        """Token ids of the instruction, truncated to ``max_text_tokens``; special-token text stays text."""
        return self._encode(instruction, parse_special=False)[: self.max_text_tokens]

    def num_image_tokens(self, grid_thw) -> int:
        """LM tokens of one image: its patch count over the spatial merge (2x2 patches -> 1 token)."""
        t, h, w = (int(x) for x in grid_thw)
        return t * h * w // self.merge_size**2

    def token_counts(self, views: list[np.ndarray], instruction: str) -> tuple[list[tuple[int, int, int]], int]:
        """For one sample: per view ``(resized height, resized width, LM tokens)`` and the
        prompt's length in LM tokens (views, markers, template and instruction)."""
        grid = self.image_processor([np.asarray(v) for v in views], return_tensors="pt",
                                    input_data_format="channels_last")["image_grid_thw"]  # (V, 3)
        patch = int(self.image_processor.patch_size)
        per_view = [(int(h) * patch, int(w) * patch, self.num_image_tokens((t, h, w))) for t, h, w in grid.tolist()]
        return per_view, len(self.prompt_ids([n for _, _, n in per_view], instruction))

    def prompt_ids(self, image_tokens_per_view: list[int], instruction: str) -> list[int]:
        """Token ids of one sample's prompt, given each view's number of image tokens."""
        ids = list(self.prefix_ids)
        for n in image_tokens_per_view:
            ids.append(self.vision_start_token_id)
            ids.extend([self.image_token_id] * n)
            ids.append(self.vision_end_token_id)
        ids.extend(self.instruction_ids(instruction))
        ids.extend(self.suffix_ids)
        return ids

    def __call__(self, images: list[list[np.ndarray]], instructions: list[str]) -> dict[str, torch.Tensor]:
        """Build the batch (keys and shapes in the module docstring).

        ``images[b][v]`` is view v of sample b, a uint8 array (h, w, 3); ``instructions[b]`` its text.
        """
        if len(images) != len(instructions):
            raise ValueError(f"got images for {len(images)} samples but {len(instructions)} instructions")
        if not images:
            raise ValueError("empty batch")
        flat: list[np.ndarray] = []
        for b, views in enumerate(images):
            if len(views) == 0:
                raise ValueError(f"sample {b} has no camera views")
            for v, image in enumerate(views):
                image = np.asarray(image)
                if image.ndim != 3 or image.shape[-1] != 3:
                    raise ValueError(f"sample {b} view {v}: expected an (h, w, 3) image, got shape {image.shape}")
                flat.append(image)

        processed = self.image_processor(flat, return_tensors="pt", input_data_format="channels_last")
        pixel_values = processed["pixel_values"].to(torch.float32)  # (sum_patches, patch_dim)
        image_grid_thw = processed["image_grid_thw"].to(torch.long)  # (N, 3)
        return self._batch(pixel_values, image_grid_thw, [len(views) for views in images], instructions)

    def process_views(self, views: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """One sample's views as the image processor makes them: ``(pixel_values (patches,
        patch_dim) float32, image_grid_thw (V, 3) long)``. :meth:`batch_processed` joins such
        pairs into the same batch ``__call__`` builds from the images (the processor treats
        each image on its own), so views can be processed as they arrive, e.g. by a server."""
        processed = self.image_processor([np.asarray(v) for v in views], return_tensors="pt",
                                         input_data_format="channels_last")
        return processed["pixel_values"].to(torch.float32), processed["image_grid_thw"].to(torch.long)

    def batch_processed(self, processed: list[tuple[torch.Tensor, torch.Tensor]],
                        instructions: list[str]) -> dict[str, torch.Tensor]:
        """The batch of samples whose views :meth:`process_views` made."""
        if len(processed) != len(instructions) or not processed:
            raise ValueError(f"got processed views of {len(processed)} samples and {len(instructions)} instructions")
        return self._batch(torch.cat([p for p, _ in processed]), torch.cat([g for _, g in processed]),
                           [len(g) for _, g in processed], instructions)

    def _batch(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor, views_per_sample: list[int],
               instructions: list[str]) -> dict[str, torch.Tensor]:
        sequences: list[list[int]] = []
        view_index = 0
        for n_views, instruction in zip(views_per_sample, instructions):
            tokens_per_view = [self.num_image_tokens(image_grid_thw[view_index + v]) for v in range(n_views)]
            view_index += n_views
            sequences.append(self.prompt_ids(tokens_per_view, instruction))

        max_len = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), max_len), self.pad_token_id, dtype=torch.long)  # (B, L)
        attention_mask = torch.zeros((len(sequences), max_len), dtype=torch.long)  # (B, L)
        for b, seq in enumerate(sequences):  # right padding
            input_ids[b, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            attention_mask[b, : len(seq)] = 1
        return {
            INPUT_IDS: input_ids,
            ATTENTION_MASK: attention_mask,
            PIXEL_VALUES: pixel_values,
            IMAGE_GRID_THW: image_grid_thw,
        }


# --------------------------------------------------------------------------------------
# Model


def _masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, L, H) over the positions where ``mask`` (B, L) is true -> (B, H); 0 where none is."""
    weights = mask.to(hidden.dtype).unsqueeze(-1)  # (B, L, 1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)

# Config keys that do not change what the weights compute (paths, versions, runtime switches).
_VOLATILE_CONFIG_KEYS = frozenset(
    {
        "_name_or_path",
        "_commit_hash",
        "transformers_version",
        "dtype",
        "torch_dtype",
        "_attn_implementation",
        "_attn_implementation_internal",
        "attn_implementation",
        "use_cache",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
    }
)


def _stable_config_dict(value):
    if isinstance(value, dict):
        return {k: _stable_config_dict(v) for k, v in sorted(value.items()) if k not in _VOLATILE_CONFIG_KEYS}
    if isinstance(value, (list, tuple)):
        return [_stable_config_dict(v) for v in value]
    return value


class VLBackbone(nn.Module):
    """Qwen2.5-VL wrapped to give one pooled feature per sample.

    ``self.model`` is the ``Qwen2_5_VLForConditionalGeneration`` (so ``save_pretrained``, PEFT and
    gradient checkpointing work on it as usual); the forward pass calls its inner
    ``Qwen2_5_VLModel`` (``self.model.model``) and never computes the LM head. If ``self.model``
    is replaced by a ``peft.PeftModel`` wrapping it, the forward pass still finds the inner model.
    """

    def __init__(self, config: BackboneConfig, device: str | torch.device | None = None):
        """Load the checkpoint. On the CPU its weights stay memory-mapped views of the
        safetensors files when their dtype is ``config.dtype`` (processes on one machine share
        those pages); with ``device`` (e.g. ``"cuda:3"``) every tensor goes straight to that
        device as it is read, so host memory never holds the model."""
        super().__init__()
        from transformers import Qwen2_5_VLForConditionalGeneration

        self.backbone_config = config
        path = config.model_name_or_path
        hf_config = load_backbone_config(path)
        source, local_only = _model_source(path)
        placement = {"device_map": {"": str(device)}} if device is not None else {}
        try:
            model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(
                source,
                config=hf_config,
                dtype=config.torch_dtype,
                attn_implementation=config.attn_implementation,
                local_files_only=local_only,
                output_loading_info=True,
                **placement,
            )
        except Exception as exc:
            raise BackboneError(load_backbone_error_message(path, f"cannot load the weights: {_first_line(exc)}")) from exc
        missing = sorted(k for k in info.get("missing_keys", ()) if not k.startswith("lm_head."))
        mismatched = sorted(str(k) for k in info.get("mismatched_keys", ()))
        if missing or mismatched:
            bad = (missing + mismatched)[:3]
            raise BackboneError(
                load_backbone_error_message(
                    path,
                    f"checkpoint does not match the config: {len(missing)} missing / "
                    f"{len(mismatched)} mismatched tensors, e.g. {bad}",
                )
            )
        if info.get("unexpected_keys"):
            logger.warning("VL backbone %s: %d unexpected tensors ignored", path, len(info["unexpected_keys"]))

        stored = getattr(hf_config, "dtype", None)
        if device is None and isinstance(stored, torch.dtype) and stored != config.torch_dtype:
            logger.info("VL backbone %s is stored as %s and loaded as %s: every process converts a private copy "
                        "(%.1f GB) instead of sharing the memory-mapped checkpoint; a %s checkpoint is shared",
                        path, stored, config.torch_dtype,
                        sum(p.numel() for p in model.parameters()) * config.torch_dtype.itemsize / 1e9, config.dtype)
        self.model = model
        self.hidden_size: int = int(hf_config.text_config.hidden_size)
        self.image_token_id: int = int(hf_config.image_token_id)
        self.vision_end_token_id: int = int(hf_config.vision_end_token_id)
        self.merge_size: int = int(hf_config.vision_config.spatial_merge_size)
        logger.info(
            "loaded VL backbone %s (%s, hidden %d, %.1fM parameters)",
            path, config.dtype, self.hidden_size, sum(p.numel() for p in model.parameters()) / 1e6,
        )

    @property
    def vl_model(self) -> nn.Module:
        """The inner ``Qwen2_5_VLModel`` (vision tower + language model, no LM head)."""
        model = self.model
        if hasattr(model, "get_base_model"):  # a peft.PeftModel around the generation model
            model = model.get_base_model()
        return model.model

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        image_grid_thw: torch.Tensor,
        grid: int | None = None,
    ) -> torch.Tensor:
        """VL features of a :class:`VLInputBuilder` batch, float32, from the last hidden layer.

        ``grid`` None: one pooled vector per sample, the masked mean over the real tokens,
        (B, hidden_size). ``grid`` g: (B, 2 + V g^2, hidden_size) tokens: that mean, the mean
        over the instruction (every real token after the last image: the instruction and the
        chat template's closing tokens), then for each view in
        order its image tokens laid out on their merged patch grid and average-pooled to g x g
        cells (row-major; a grid smaller than g is repeated, one larger is averaged)."""
        inner = self.vl_model
        pixel_values = pixel_values.to(inner.visual.dtype)  # (sum_patches, patch_dim)
        # 1 marks image tokens: without it transformers falls back to 1-D positions (no mrope).
        mm_token_type_ids = (input_ids == self.image_token_id).to(torch.int32)  # (B, L)
        outputs = inner(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            mm_token_type_ids=mm_token_type_ids,
            use_cache=False,
            return_dict=True,
        )
        hidden = outputs.last_hidden_state.float()  # (B, L, H)
        pooled = _masked_mean(hidden, attention_mask.bool())  # (B, H)
        if grid is None:
            return pooled
        B, L = input_ids.shape
        positions = torch.arange(L, device=input_ids.device)  # (L,)
        last_image_end = torch.where(input_ids == self.vision_end_token_id, positions, -1).amax(dim=1)  # (B,)
        instruction = _masked_mean(hidden, attention_mask.bool() & (positions[None] > last_image_end[:, None]))
        cells = self.view_cells(hidden[input_ids == self.image_token_id], image_grid_thw, grid)  # (B*V, g*g, H)
        if cells.shape[0] % B:
            raise ValueError(f"{cells.shape[0]} camera views for {B} samples: every sample needs the same views")
        cells = cells.reshape(B, -1, hidden.shape[-1])  # (B, V*g*g, H)
        return torch.cat([pooled[:, None], instruction[:, None], cells], dim=1)  # (B, 2 + V*g*g, H)

    def view_cells(self, image_tokens: torch.Tensor, image_grid_thw: torch.Tensor, grid: int) -> torch.Tensor:
        """(N, g*g, H): each of the N views' LM image tokens (sample-major, view order, as the
        prompt holds them: ``(sum of tokens, H)``) on its merged (t, h/m, w/m) grid, averaged
        over t and pooled to g x g."""
        m = self.merge_size
        sizes = [(int(t), int(h) // m, int(w) // m) for t, h, w in image_grid_thw.tolist()]
        out = []
        for (t, h, w), tokens in zip(sizes, image_tokens.split([t * h * w for t, h, w in sizes])):
            view = tokens.reshape(t, h, w, -1).mean(dim=0).permute(2, 0, 1)  # (H, h, w)
            out.append(F.adaptive_avg_pool2d(view, grid).flatten(1).transpose(0, 1))  # (g*g, H)
        return torch.stack(out)

    def freeze(self) -> None:
        """Stage 1: no backbone parameter is trained."""
        for param in self.parameters():
            param.requires_grad_(False)

    def setup_finetune(self, config) -> None:
        """Stage 2: make the part ``config`` (a ``FinetuneConfig``) names trainable: LoRA
        adapters (``self.model`` becomes a ``peft.PeftModel``), the last N layers, or nothing."""
        from vla_ds.models.finetune import apply_finetune

        self.model = apply_finetune(self.model, config)

    def fingerprint(self) -> str:
        """Short stable identity of the base model: architecture config + every base weight.

        Hashes the model config (without paths, versions, dtype and runtime switches) and,
        for every base parameter, its name, shape and an evenly strided sample of up to 1024
        of its values in float32: cheap for 3B parameters, yet a change to any tensor (a
        merged adapter in one layer, a different final norm) is very likely to show. The same
        checkpoint gives the same fingerprint wherever it lives and whatever dtype it is
        loaded in (bf16 upcasts exactly). Adapters are skipped (the base weights are hashed).
        A feature cache adds the run dtype, ``PROMPT_TEMPLATE_VERSION`` and the image/text
        budgets to its key itself. Call it before ZeRO-3 partitions the weights.
        """
        digest = hashlib.sha256()
        config_dict = _stable_config_dict(self.model.config.to_dict())
        digest.update(json.dumps(config_dict, sort_keys=True, default=str).encode())
        for name, weight in sorted(self.vl_model.named_parameters()):
            if "lora_" in name:
                continue
            if weight.is_meta or weight.numel() == 0:
                raise RuntimeError(
                    f"cannot fingerprint the backbone: weight {name} is not materialised "
                    "(meta device or partitioned by ZeRO-3); compute the fingerprint before partitioning"
                )
            flat = weight.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 1024)][:1024].to(device="cpu", dtype=torch.float32)
            digest.update(name.replace("base_layer.", "").encode())
            digest.update(str(tuple(weight.shape)).encode())
            digest.update(sample.contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]
