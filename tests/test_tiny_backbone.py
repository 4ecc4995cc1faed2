"""The offline tiny Qwen2.5-VL maker (vla_ds.models.tiny_backbone, scripts/make_tiny_backbone.py)."""

import json

import numpy as np
import pytest
import torch

from vla_ds.models.backbone import BackboneConfig, VLBackbone, VLInputBuilder
from vla_ds.models.tiny_backbone import (
    QWEN_SPECIAL_TOKENS,
    TINY_MAX_PIXELS,
    TINY_MIN_PIXELS,
    make_tiny_backbone,
)
from vla_ds.models.tiny_backbone import main as make_tiny_backbone_main


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_backbone(tmp_path_factory.mktemp("tiny_vl"), seed=0)


def test_writes_small_hf_directory(tiny_dir):
    names = {p.name for p in tiny_dir.iterdir()}
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        assert name in names
    total = sum(p.stat().st_size for p in tiny_dir.iterdir())
    assert total < 5 * 1024 * 1024
    assert json.loads((tiny_dir / "config.json").read_text())["model_type"] == "qwen2_5_vl"


def test_deterministic_given_seed_and_leaves_global_rng_alone(tmp_path, tiny_dir):
    rng_state = torch.get_rng_state()
    same = make_tiny_backbone(tmp_path / "same", seed=0)
    other = make_tiny_backbone(tmp_path / "other", seed=1)
    assert torch.equal(rng_state, torch.get_rng_state())
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (same / name).read_bytes() == (tiny_dir / name).read_bytes(), name
    assert (other / "model.safetensors").read_bytes() != (tiny_dir / "model.safetensors").read_bytes()


def test_token_ids_in_config_match_tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_dir), local_files_only=True)
    config = json.loads((tiny_dir / "config.json").read_text())
    ids = tokenizer.convert_tokens_to_ids
    assert config["image_token_id"] == ids("<|image_pad|>")
    assert config["video_token_id"] == ids("<|video_pad|>")
    assert config["vision_start_token_id"] == ids("<|vision_start|>")
    assert config["vision_end_token_id"] == ids("<|vision_end|>")
    assert config["eos_token_id"] == tokenizer.eos_token_id == ids("<|im_end|>")
    assert config["pad_token_id"] == tokenizer.pad_token_id == ids("<|endoftext|>")
    assert config["text_config"]["vocab_size"] >= len(tokenizer)
    # Qwen's special tokens are single tokens, consecutive and in Qwen's order.
    special_ids = [ids(t) for t in QWEN_SPECIAL_TOKENS]
    assert special_ids == list(range(special_ids[0], special_ids[0] + len(special_ids)))
    text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>pick up the red cube<|im_end|>\n"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_image_processor_is_pil_and_respects_pixel_limits(tiny_dir):
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(str(tiny_dir), local_files_only=True, backend="pil")
    assert type(processor).__name__ == "Qwen2VLImageProcessorPil"
    images = [np.zeros((480, 640, 3), np.uint8), np.zeros((8, 8, 3), np.uint8)]
    out = processor(images, return_tensors="pt", input_data_format="channels_last")
    pixels = out["image_grid_thw"][:, 1:].prod(-1) * 14 * 14  # resized h * w
    assert pixels[0] <= TINY_MAX_PIXELS
    assert pixels[1] >= TINY_MIN_PIXELS


def test_loads_through_backbone_and_builder(tiny_dir):
    config = BackboneConfig(model_name_or_path=str(tiny_dir), dtype="float32")
    backbone = VLBackbone(config)
    builder = VLInputBuilder.from_pretrained(config)
    assert backbone.hidden_size == 64
    batch = builder([[np.full((56, 56, 3), 128, np.uint8)]], ["pick up the red cube"])
    with torch.no_grad():
        features = backbone(**batch)
    assert features.shape == (1, 64) and torch.isfinite(features).all()


def test_cli_main(tmp_path, capsys):
    assert make_tiny_backbone_main([str(tmp_path / "out"), "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    assert "model.safetensors" in printed and str(tmp_path / "out") in printed
    assert (tmp_path / "out" / "config.json").is_file()


def test_cli_main_names_an_output_it_cannot_write(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert make_tiny_backbone_main([str(blocker / "out")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {blocker / 'out'}: cannot write the backbone (Not a directory)"
