"""VL backbone: config validation, input building, pooled features, loading errors, reference sizes."""

import json
import pickle

import numpy as np
import pytest
import torch

from vla_ds.errors import BackboneError, ConfigError
from vla_ds.models.backbone import (
    PROMPT_TEMPLATE_VERSION,
    BackboneConfig,
    VLBackbone,
    VLInputBuilder,
    reference_backbone_config,
)
from vla_ds.models.tiny_backbone import make_tiny_backbone

SHORT = "pick up the red cube"
LONG = "push the green block to the left, then stack the blue cube on top of the yellow cube and wipe the table"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_backbone(tmp_path_factory.mktemp("tiny_vl"), seed=0)


@pytest.fixture(scope="module")
def config(tiny_dir):
    return BackboneConfig(model_name_or_path=str(tiny_dir), dtype="float32")


@pytest.fixture(scope="module")
def builder(config):
    return VLInputBuilder.from_pretrained(config)


@pytest.fixture(scope="module")
def backbone(config):
    model = VLBackbone(config)
    model.eval()
    return model


def _image(seed, h, w):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"dtype": "float16x"}, "dtype"),
        ({"min_pixels": 5000, "max_pixels": 4000}, "min_pixels"),
        ({"max_pixels": 0}, "max_pixels"),
        ({"max_text_tokens": 0}, "max_text_tokens"),
        ({"attn_implementation": "magic"}, "attn_implementation"),
        ({"model_name_or_path": ""}, "model_name_or_path"),
    ],
)
def test_config_rejects_bad_values(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        BackboneConfig(**kwargs)


def test_prompt_template_version_is_a_string():
    assert isinstance(PROMPT_TEMPLATE_VERSION, str) and PROMPT_TEMPLATE_VERSION


# ---------------------------------------------------------------- input builder


def test_builder_shapes_pads_and_prompt(builder):
    images = [[_image(0, 64, 80), _image(1, 100, 60)], [_image(2, 30, 30), _image(3, 120, 90)]]
    batch = builder(images, [SHORT, LONG])
    ids, mask, pixels, grid = (batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw"))

    assert ids.dtype == mask.dtype == grid.dtype == torch.long and pixels.dtype == torch.float32
    assert ids.shape == mask.shape and ids.shape[0] == 2
    assert grid.shape == (4, 3)
    assert pixels.shape == (int(grid.prod(-1).sum()), 3 * 2 * 14 * 14)

    merge = builder.image_processor.merge_size
    for b in range(2):
        n_pad = int((ids[b] == builder.image_token_id).sum())
        assert n_pad == int(grid[2 * b : 2 * b + 2].prod(-1).sum()) // merge**2

    # Right padding: real tokens first, then pad tokens only.
    lengths = mask.sum(1)
    for b in range(2):
        assert mask[b, : lengths[b]].all() and not mask[b, lengths[b] :].any()
        assert (ids[b, lengths[b] :] == builder.pad_token_id).all()
    assert lengths[1] == ids.shape[1] > lengths[0]

    # Exactly the Qwen2.5-VL chat-template prompt: system, user turn with both views then the text.
    tok = builder.tokenizer
    n0, n1 = (int(g.prod()) // merge**2 for g in grid[:2])
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        + "<|vision_start|>" + "<|image_pad|>" * n0 + "<|vision_end|>"
        + "<|vision_start|>" + "<|image_pad|>" * n1 + "<|vision_end|>"
        + SHORT + "<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok.decode(ids[0, : lengths[0]].tolist()) == expected
    # Assembling ids piecewise gives the same ids as tokenizing the whole prompt string.
    assert ids[0, : lengths[0]].tolist() == tok(expected, add_special_tokens=False)["input_ids"]


def test_views_processed_one_sample_at_a_time_batch_the_same(builder):
    """What the policy server does (each request's views processed on arrival, batched later)
    gives exactly the batch the builder makes from all images at once."""
    images = [[_image(0, 64, 80), _image(1, 100, 60)], [_image(2, 30, 30), _image(3, 120, 90)],
              [_image(4, 48, 48), _image(5, 64, 64)]]
    instructions = [SHORT, LONG, SHORT]
    whole = builder(images, instructions)
    piecewise = builder.batch_processed([builder.process_views(views) for views in images], instructions)
    assert whole.keys() == piecewise.keys()
    for key in whole:
        assert whole[key].dtype == piecewise[key].dtype and torch.equal(whole[key], piecewise[key]), key
    with pytest.raises(ValueError, match="2 samples and 3 instructions"):
        builder.batch_processed([builder.process_views(v) for v in images[:2]], instructions)


def test_builder_truncates_instruction_and_keeps_special_text_as_text(tiny_dir):
    config = BackboneConfig(model_name_or_path=str(tiny_dir), dtype="float32", max_text_tokens=3)
    builder = VLInputBuilder.from_pretrained(config)
    assert builder.instruction_ids(LONG) == builder.tokenizer(LONG, add_special_tokens=False)["input_ids"][:3]
    batch = builder([[_image(0, 56, 56)]], [LONG])
    full = VLInputBuilder.from_pretrained(BackboneConfig(model_name_or_path=str(tiny_dir)))([[_image(0, 56, 56)]], [LONG])
    assert full["input_ids"].shape[1] > batch["input_ids"].shape[1]

    injected = builder.instruction_ids("<|image_pad|>")
    assert builder.image_token_id not in injected and len(injected) > 1


def test_builder_pixel_limits_override(tiny_dir):
    config = BackboneConfig(model_name_or_path=str(tiny_dir), min_pixels=28 * 28, max_pixels=28 * 28 * 2)
    builder = VLInputBuilder.from_pretrained(config)
    grid = builder([[_image(0, 300, 300), _image(1, 5, 5)]], [SHORT])["image_grid_thw"]
    pixels = grid[:, 1:].prod(-1) * 14 * 14
    assert int(pixels.max()) <= 28 * 28 * 2 and int(pixels.min()) >= 28 * 28


def test_default_image_budget_keeps_640x360_and_caps_1080p(tiny_dir):
    """backbone.max_pixels defaults to 320 tokens per view (not the processor's 12.8 MP): the
    guide's 640x360 cameras keep their size, a 1920x1080 camera is scaled into the budget."""
    builder = VLInputBuilder.from_pretrained(BackboneConfig(model_name_or_path=str(tiny_dir)))
    per_view, total = builder.token_counts([_image(0, 360, 640), _image(1, 1080, 1920)], SHORT)
    assert per_view == [(364, 644, 299), (364, 644, 299)]
    assert total == len(builder([[_image(0, 360, 640), _image(1, 1080, 1920)]], [SHORT])["input_ids"][0])


def test_builder_pickles(builder):
    clone = pickle.loads(pickle.dumps(builder))
    images = [[_image(0, 64, 64)]]
    a, b = builder(images, [SHORT]), clone(images, [SHORT])
    for key in a:
        assert torch.equal(a[key], b[key])


# ---------------------------------------------------------------- backbone


def test_features_shape_dtype_and_mrope(backbone, builder):
    batch = builder([[_image(0, 112, 56), _image(1, 56, 112)]] * 2, [SHORT, LONG])
    with torch.no_grad():
        features = backbone(**batch)
    assert features.shape == (2, backbone.hidden_size) and features.dtype == torch.float32
    # Multimodal RoPE ran: image tokens share positions, so the text positions end before L.
    deltas = backbone.vl_model.rope_deltas
    assert deltas is not None and (deltas < 0).all()


def test_padding_invariance(backbone, builder):
    sample_images, sample_text = [_image(0, 64, 80), _image(1, 100, 60)], SHORT
    alone = builder([sample_images], [sample_text])
    batched = builder([sample_images, [_image(2, 112, 112), _image(3, 90, 120)]], [sample_text, LONG])
    assert batched["input_ids"].shape[1] > alone["input_ids"].shape[1]
    with torch.no_grad():
        f_alone = backbone(**alone)
        f_batched = backbone(**batched)
    torch.testing.assert_close(f_batched[0], f_alone[0], atol=1e-5, rtol=0)


def test_different_images_give_different_features(backbone, builder):
    batch = builder([[_image(0, 64, 64)], [_image(1, 64, 64)]], [SHORT, SHORT])
    with torch.no_grad():
        features = backbone(**batch)
    assert (features[0] - features[1]).abs().max() > 1e-4


def test_view_cells_pool_each_views_token_grid_in_raster_order(backbone):
    """Token (t, r, c) of view v holds (v, r, c): each cell must be the mean of its block."""
    m = backbone.merge_size
    grids = torch.tensor([[1, 4 * m, 8 * m], [2, 2 * m, 2 * m]])  # a 4x8 token grid, and 2 frames of 2x2
    tokens = []
    for v, (t, h, w) in enumerate(grids.tolist()):
        r, c = torch.meshgrid(torch.arange(h // m), torch.arange(w // m), indexing="ij")
        grid = torch.stack([torch.full_like(r, v), r, c], dim=-1).float()  # (h', w', 3)
        tokens.append(grid.reshape(1, -1, 3).expand(t, -1, -1).reshape(-1, 3))
    cells = backbone.view_cells(torch.cat(tokens), grids, grid=2)  # (2 views, 4 cells, 3)
    assert cells.shape == (2, 4, 3)
    # view 0: rows 0-1 / 2-3, columns 0-3 / 4-7 -> block means (0.5 or 2.5, 1.5 or 5.5)
    torch.testing.assert_close(cells[0], torch.tensor([[0, 0.5, 1.5], [0, 0.5, 5.5], [0, 2.5, 1.5], [0, 2.5, 5.5]]))
    # view 1: a 2x2 grid is its own cells, the two frames averaged
    torch.testing.assert_close(cells[1], torch.tensor([[1, 0, 0], [1, 0, 1], [1, 1, 0], [1, 1, 1.0]]))
    up = backbone.view_cells(tokens[1], grids[1:], grid=4)  # a grid finer than the tokens repeats them
    assert up.shape == (1, 16, 3) and torch.equal(up[0, 0], up[0, 1]) and not torch.equal(up[0, 0], up[0, 2])


def test_tokens_are_the_pooled_vector_the_instruction_and_where_things_are(backbone, builder):
    """Tokens mode: token 0 is the pooled feature; token 1 changes with the instruction only;
    moving a square from one corner of view 0 to the other changes that view's cells there most."""
    def square(x, y):
        image = np.full((112, 112, 3), 90, dtype=np.uint8)
        image[y:y + 28, x:x + 28] = (240, 20, 20)
        return image

    images = [[square(0, 0), _image(5, 56, 56)], [square(84, 84), _image(5, 56, 56)], [square(0, 0), _image(5, 56, 56)]]
    batch = builder(images, [SHORT, SHORT, LONG])
    with torch.no_grad():
        pooled = backbone(**batch)
        tokens = backbone(**batch, grid=4)
    assert tokens.shape == (3, 2 + 2 * 16, backbone.hidden_size) and tokens.dtype == torch.float32
    torch.testing.assert_close(tokens[:, 0], pooled, atol=1e-6, rtol=0)
    assert (tokens[2, 1] - tokens[0, 1]).abs().max() > 1e-3  # another instruction
    change = (tokens[1, 2:18] - tokens[0, 2:18]).norm(dim=-1).reshape(4, 4)  # view 0's cells
    assert change[0, 0] > change[1:3, 1:3].max() and change[3, 3] > change[1:3, 1:3].max(), change


def test_bfloat16_load_returns_float32(tiny_dir, builder):
    model = VLBackbone(BackboneConfig(model_name_or_path=str(tiny_dir), dtype="bfloat16"))
    assert model.vl_model.visual.dtype == torch.bfloat16
    with torch.no_grad():
        features = model(**builder([[_image(0, 64, 64)]], [SHORT]))
    assert features.dtype == torch.float32 and torch.isfinite(features).all()


def test_freeze(config):
    model = VLBackbone(config)
    assert any(p.requires_grad for p in model.parameters())
    model.freeze()
    assert not any(p.requires_grad for p in model.parameters())


def test_fingerprint_stable_and_specific(backbone, config, tmp_path):
    fp = backbone.fingerprint()
    assert isinstance(fp, str) and len(fp) == 16
    assert VLBackbone(config).fingerprint() == fp  # same weights, another load
    other = make_tiny_backbone(tmp_path / "seed1", seed=1)
    assert VLBackbone(BackboneConfig(model_name_or_path=str(other), dtype="float32")).fingerprint() != fp


def test_lora_through_peft_keeps_forward_and_fingerprint(config, builder):
    from peft import LoraConfig, get_peft_model

    model = VLBackbone(config)
    fp = model.fingerprint()
    model.freeze()
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)")
    model.model = get_peft_model(model.model, lora)
    assert model.fingerprint() == fp
    features = model(**builder([[_image(0, 64, 64)]], [SHORT]))
    features.sum().backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, _ in trainable)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for _, p in trainable)


# ---------------------------------------------------------------- loading errors


def _expect_backbone_error(path, *fragments):
    with pytest.raises(BackboneError) as info:
        VLBackbone(BackboneConfig(model_name_or_path=str(path), dtype="float32"))
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    for fragment in fragments:
        assert fragment in message
    return message


def test_error_for_other_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    _expect_backbone_error(tmp_path, "llama", "qwen2_5_vl")


def test_error_for_dir_without_config(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0")
    _expect_backbone_error(tmp_path, "config.json")
    with pytest.raises(BackboneError, match="config.json"):
        VLInputBuilder.from_pretrained(BackboneConfig(model_name_or_path=str(tmp_path)))


def test_error_for_missing_path(tmp_path):
    _expect_backbone_error(tmp_path / "nope", "does not exist")


def test_error_for_qwen_config_without_weights(tiny_dir, tmp_path):
    (tmp_path / "config.json").write_bytes((tiny_dir / "config.json").read_bytes())
    _expect_backbone_error(tmp_path, "weights")


# ---------------------------------------------------------------- reference architecture (meta device)


@pytest.fixture(scope="module")
def reference_meta_model():
    from transformers import Qwen2_5_VLForConditionalGeneration

    with torch.device("meta"):
        return Qwen2_5_VLForConditionalGeneration(reference_backbone_config())


def test_reference_config_facts():
    cfg = reference_backbone_config()
    text, vision = cfg.text_config, cfg.vision_config
    assert (text.hidden_size, text.intermediate_size, text.num_hidden_layers) == (2048, 11008, 36)
    assert (text.num_attention_heads, text.num_key_value_heads, text.vocab_size) == (16, 2, 151936)
    assert text.rope_parameters["rope_theta"] == 1e6 and text.rope_parameters["mrope_section"] == [16, 24, 24]
    assert cfg.tie_word_embeddings
    assert (vision.depth, vision.hidden_size, vision.intermediate_size, vision.num_heads) == (32, 1280, 3420, 16)
    assert (vision.out_hidden_size, vision.patch_size, vision.spatial_merge_size) == (2048, 14, 2)
    assert (vision.temporal_patch_size, vision.window_size, list(vision.fullatt_block_indexes)) == (2, 112, [7, 15, 23, 31])
    assert (cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id) == (
        151655, 151656, 151652, 151653,
    )


def test_reference_parameter_count(reference_meta_model):
    model = reference_meta_model
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight  # tied
    # (the fixture is shared with the LoRA test, which injects adapters: count the base only)
    n_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    assert n_params == 3_754_622_976  # vision 668,684,288 + text 3,085,938,688 (embeddings shared with lm_head)
    assert abs(n_params - 3.75e9) / 3.75e9 < 0.01


def test_reference_lora_parameter_count(reference_meta_model):
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.05, target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)"
    )
    with torch.device("meta"):
        peft_model = get_peft_model(reference_meta_model, lora)
    lora_params = {n: p.numel() for n, p in peft_model.named_parameters() if "lora_" in n}
    assert all(".language_model." in n for n in lora_params)
    # per layer r * (in + out): q 16*(2048+2048) + k,v 16*(2048+256) + o 16*(2048+2048) = 204,800; x 36 layers
    assert sum(lora_params.values()) == 7_372_800


def test_backbone_loads_onto_the_given_device_and_stays_mapped_on_the_cpu(tiny_backbone_dir):
    """``device`` places every tensor as it is read (here the CPU, the one device CI has);
    without it, bf16 weights stay views of the checkpoint's memory-mapped file."""
    cfg = BackboneConfig(model_name_or_path=str(tiny_backbone_dir))
    placed = VLBackbone(cfg, device="cpu")
    default = VLBackbone(cfg)
    assert all(p.device.type == "cpu" for p in placed.parameters())
    assert placed.fingerprint() == default.fingerprint()


def test_each_rank_loads_the_backbone_onto_its_own_gpu(monkeypatch):
    import torch

    from vla_ds.training import config as config_lib
    from vla_ds.training.engine import backbone_device

    raw = config_lib.load_json(config_lib.SHIPPED_CONFIG_DIR / "stage2.json")
    cfg = config_lib.resolve_config(raw, 1, for_run=False)
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert backbone_device(cfg) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert backbone_device(cfg) == "cuda:3"
    config_lib.apply_override(raw, "zero_optimization.stage", 3)
    assert backbone_device(config_lib.resolve_config(raw, 1, for_run=False)) is None  # ZeRO-3: from host memory
