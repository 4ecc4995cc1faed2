"""Offline tiny Qwen2.5-VL: random weights, a small trained tokenizer, a small image processor.

``make_tiny_backbone(out_dir)`` writes a directory that loads through exactly the same
``from_pretrained`` calls as the real Qwen2.5-VL-3B-Instruct checkpoint, so every code path
(prompt building, image patching, mrope positions, LoRA, checkpoints) runs on CPU with no
model hub. Nothing is downloaded: the tokenizer is a byte-level BPE trained here with the
``tokenizers`` library on a small built-in corpus, with the Qwen special tokens appended in
Qwen's order, and the model has the real architecture at toy sizes.

Directory written::

    OUT_DIR/
      config.json               Qwen2_5_VLConfig (model_type "qwen2_5_vl"), token ids match the tokenizer
      generation_config.json    written by save_pretrained
      model.safetensors         random weights, deterministic given the seed
      tokenizer.json            byte-level BPE + Qwen special tokens
      tokenizer_config.json     tokenizer_class Qwen2Tokenizer, eos <|im_end|>, pad <|endoftext|>
      preprocessor_config.json  Qwen2VLImageProcessor settings with small min/max pixels

The whole thing takes well under a second and about 1 MB.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

# Qwen2.5 special tokens in the order (and so the relative ids) of the real tokenizer,
# where they start at 151643. "<tool_call>"/"</tool_call>" are not special there.
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
QWEN_NON_SPECIAL_ADDED_TOKENS = ("<tool_call>", "</tool_call>")

TINY_BPE_VOCAB_SIZE = 500  # byte-level base vocabulary (256 bytes + merges), before special tokens
TINY_MIN_PIXELS = 56 * 56
TINY_MAX_PIXELS = 112 * 112

# The Qwen2 pre-tokenizer regex (transformers' Qwen2Tokenizer uses the same one, so the
# trained merges are consistent with how the tokenizer splits text when it is loaded).
_QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

_CORPUS = """
system user assistant You are a helpful assistant.
pick up the red cube and place it in the bowl
push the green block to the left
insert the needle into the eye trocar
move the gripper above the white silicone circle
grasp the white silicone and lift it slowly
open the gripper, close the gripper, rotate the wrist by 90 degrees
place the tool on the tray; retract the arm to the home position
align the needle with the target and advance 5 mm
stack the blue cube on top of the yellow cube
wipe the table with the sponge
pour the water into the cup
Needle insertion eye trocar. White silicone white circle.
move forward, move backward, move up, move down, stop.
The robot should approach the object carefully and avoid collisions.
Describe the image. What is in the picture? 0 1 2 3 4 5 6 7 8 9 10 100
"""


def _train_bpe_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train the byte-level BPE on the built-in corpus; returns (vocab, merges)."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )

    tokenizer = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_BPE_VOCAB_SIZE,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    lines = [line for line in _CORPUS.strip().splitlines() if line]
    # Repeat the corpus so frequent words merge fully; the data is tiny either way.
    tokenizer.train_from_iterator(lines * 4, trainer=trainer)
    model = json.loads(tokenizer.to_str())["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return dict(model["vocab"]), merges


def _build_tokenizer(out_dir: Path):
    """Write tokenizer.json / tokenizer_config.json; returns the loaded-back tokenizer."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer, Qwen2Tokenizer

    vocab, merges = _train_bpe_vocab()
    # Special tokens get the ids right after the BPE vocabulary, in Qwen's order.
    next_id = max(vocab.values()) + 1
    for token in QWEN_SPECIAL_TOKENS + QWEN_NON_SPECIAL_ADDED_TOKENS:
        vocab[token] = next_id
        next_id += 1

    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=32768,
    )
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN_NON_SPECIAL_ADDED_TOKENS])
    tokenizer.padding_side = "right"
    tokenizer.save_pretrained(str(out_dir))

    loaded = AutoTokenizer.from_pretrained(str(out_dir), local_files_only=True)
    for token in QWEN_SPECIAL_TOKENS:
        if loaded.convert_tokens_to_ids(token) != vocab[token]:
            raise RuntimeError(f"tiny tokenizer: {token} did not keep id {vocab[token]} after saving")
    return loaded


def tiny_backbone_config(tokenizer) -> "transformers.Qwen2_5_VLConfig":  # noqa: F821
    """The toy-size Qwen2.5-VL config whose token ids match ``tokenizer``."""
    from transformers import Qwen2_5_VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    vocab_size = -(-len(tokenizer) // 64) * 64  # round up, as the real 151936 rounds up its 151665 tokens
    text_config = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "use_sliding_window": False,
        "sliding_window": 4096,
        "max_window_layers": 2,
        # mrope sections are in rotary frequency pairs: they sum to head_dim // 2.
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    vision_config = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": 64,  # = text hidden size
        "in_channels": 3,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "tokens_per_second": 2,
        "window_size": 112,
        "fullatt_block_indexes": [1],
        "hidden_act": "silu",
    }
    return Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=True,
    )


def _preprocessor_config() -> dict:
    """The Qwen2-VL image processor settings (same keys as the real checkpoint's file)."""
    return {
        "image_processor_type": "Qwen2VLImageProcessor",
        "min_pixels": TINY_MIN_PIXELS,
        "max_pixels": TINY_MAX_PIXELS,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "do_convert_rgb": True,
        "resample": 3,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
    }


def make_tiny_backbone(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random-weight Qwen2.5-VL (model, tokenizer, image processor) to ``out_dir``.

    The result loads with ``Qwen2_5_VLForConditionalGeneration.from_pretrained``,
    ``AutoTokenizer.from_pretrained`` and ``AutoImageProcessor.from_pretrained(..., backend="pil")``
    (no torchvision needed). The weights are a pure function of ``seed``; the global torch
    RNG state is left untouched. Returns ``out_dir`` as a Path.
    """
    from transformers import Qwen2_5_VLForConditionalGeneration

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_tokenizer(out)
    config = tiny_backbone_config(tokenizer)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
    model.eval()
    model.save_pretrained(str(out))

    with open(out / "preprocessor_config.json", "w") as f:
        json.dump(_preprocessor_config(), f, indent=2, sort_keys=True)
        f.write("\n")

    n_params = sum(p.numel() for p in model.parameters())
    logger.info("tiny Qwen2.5-VL written to %s (%d parameters, seed %d)", out, n_params, seed)
    return out


def make_reference_backbone(out_dir: str | Path, seed: int = 0, device: str | None = None) -> Path:
    """Write the real Qwen2.5-VL-3B architecture with random bf16 weights (about 7.5 GB) and
    the offline tokenizer, for benchmarks on machines that cannot download the checkpoint.

    The config is :func:`vla_ds.models.backbone.reference_backbone_config` with the special
    token ids of this module's tokenizer (so image tokens line up) and the real processor's
    pixel bounds; the weights are initialised on ``device`` (default: CUDA when available).
    """
    from transformers import Qwen2_5_VLForConditionalGeneration

    from vla_ds.models.backbone import (
        REFERENCE_MAX_PIXELS,
        REFERENCE_MIN_PIXELS,
        reference_backbone_config,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_tokenizer(out)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    config = reference_backbone_config()
    config.image_token_id, config.video_token_id = ids["<|image_pad|>"], ids["<|video_pad|>"]
    config.vision_start_token_id, config.vision_end_token_id = ids["<|vision_start|>"], ids["<|vision_end|>"]
    for cfg in (config, config.text_config):
        cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = (ids["<|endoftext|>"], ids["<|im_end|>"],
                                                                ids["<|endoftext|>"])
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    default_dtype = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_default_dtype(torch.bfloat16)
        try:
            with torch.device(device):
                model = Qwen2_5_VLForConditionalGeneration(config)
        finally:
            torch.set_default_dtype(default_dtype)
    model.eval()
    model.save_pretrained(str(out))
    del model
    processor = {**_preprocessor_config(), "min_pixels": REFERENCE_MIN_PIXELS, "max_pixels": REFERENCE_MAX_PIXELS}
    with open(out / "preprocessor_config.json", "w") as f:
        json.dump(processor, f, indent=2, sort_keys=True)
        f.write("\n")
    logger.info("reference-size Qwen2.5-VL with random weights written to %s", out)
    return out


def main(argv: list[str] | None = None) -> int:
    """``scripts/make_tiny_backbone.py`` / ``vla-make-tiny-backbone``: prints what it wrote."""
    import argparse

    parser = argparse.ArgumentParser(prog="make_tiny_backbone.py",
                                     description="Write the offline tiny Qwen2.5-VL (random weights, small tokenizer "
                                                 "and image processor).")
    parser.add_argument("out_dir", type=Path, help="directory to write (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    args = parser.parse_args(argv)

    try:
        out = make_tiny_backbone(args.out_dir, seed=args.seed)
    except OSError as e:
        import sys

        print(f"error: {args.out_dir}: cannot write the backbone ({e.strerror or e})", file=sys.stderr)
        return 2
    files = sorted(p for p in out.iterdir() if p.is_file())
    total = sum(p.stat().st_size for p in files)
    print(f"tiny Qwen2.5-VL backbone (seed {args.seed}) written to {out}:")
    for p in files:
        print(f"  {p.name:28s} {p.stat().st_size:>10,d} bytes")
    print(f"  {'total':28s} {total:>10,d} bytes")
    return 0
