"""vla_ds.planning.memory: exact meta-device counts, ZeRO byte accounting, the estimate_memory script."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from vla_ds.errors import ConfigError
from vla_ds.models import count_parameters
from vla_ds.models.action_expert import ActionExpert, ActionExpertConfig
from vla_ds.models.backbone import reference_backbone_config
from vla_ds.models.finetune import FinetuneConfig
from vla_ds.models.sensor_encoder import SensorEncoder, SensorEncoderConfig
from vla_ds.planning import estimate_memory, flops, memory
from vla_ds.planning.memory import ActivationShape, ParamCounts, ZeroSettings

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "ds_configs"
SHIPPED = ("stage1.json", "stage2.json", "stage2_offload.json", "stage3_offload.json")
REFERENCE_VL_PARAMS = 3_754_622_976  # vision 668,684,288 + text 3,085,938,688 (tied embeddings once)
REFERENCE_LORA_R16_QKVO = 7_372_800


# ---------------------------------------------------------------- meta-device counts (reference sizes)


@pytest.fixture(scope="module")
def reference_heads_params() -> int:
    with torch.device("meta"):
        heads = [SensorEncoder(SensorEncoderConfig()), ActionExpert(ActionExpertConfig())]
    return sum(count_parameters(m) for m in heads)


def _count(finetune: FinetuneConfig) -> ParamCounts:
    return memory.count_policy_parameters(reference_backbone_config(), finetune, SensorEncoderConfig(),
                                          ActionExpertConfig())


def test_reference_lora_counts(reference_heads_params):
    counts = _count(FinetuneConfig(mode="lora", lora_r=16))
    assert counts.trainable_vl == REFERENCE_LORA_R16_QKVO
    assert counts.trainable_vl_tensors == 36 * 4 * 2  # lora_A + lora_B per projection per layer
    assert counts.trainable_other == reference_heads_params
    assert counts.frozen == REFERENCE_VL_PARAMS
    assert abs(counts.total - reference_heads_params - 3.75e9) / 3.75e9 < 0.01
    assert counts.largest_module == 151936 * 2048  # the token embedding, gathered whole by ZeRO-3


def test_reference_full_unfreezes_exactly_last_two_layers():
    from transformers import Qwen2_5_VLForConditionalGeneration

    with torch.device("meta"):
        vl = Qwen2_5_VLForConditionalGeneration(reference_backbone_config())
    layer = vl.model.language_model.layers[-1]
    per_layer, tensors = sum(p.numel() for p in layer.parameters()), len(list(layer.parameters()))

    counts = _count(FinetuneConfig(mode="full", unfreeze_last_n=2))
    assert counts.trainable_vl == 2 * per_layer
    assert counts.trainable_vl_tensors == 2 * tensors
    assert counts.frozen + counts.trainable_vl == REFERENCE_VL_PARAMS


def test_lora_on_vision_attention_and_frozen_mode():
    lora = _count(FinetuneConfig(mode="lora", lora_r=16, lora_vision=True))
    # 32 blocks x r x ((1280 -> 3840 qkv) + (1280 -> 1280 proj))
    assert lora.trainable_vl == REFERENCE_LORA_R16_QKVO + 32 * 16 * ((1280 + 3840) + (1280 + 1280))
    assert _count(FinetuneConfig(mode="none")).trainable_vl == 0


# ---------------------------------------------------------------- pure byte accounting


COUNTS = ParamCounts(trainable_vl=8_000_000, trainable_other=100_000_000, frozen=3_750_000_000,
                     largest_module=311_000_000, largest_trainable=10_000_000,
                     param_numels=(3_750_000_000, 100_000_000, 8_000_000, 50_000))
SHAPE = ActivationShape(lm_tokens=642, lm_layers=36, lm_hidden=2048, lm_heads=16, vision_tokens=2392,
                        vision_layers=32, vision_hidden=1280, vision_heads=16, lm_grad_layers=36,
                        head_bytes_per_sample=20_000_000)
ZERO2 = ZeroSettings(stage=2, reduce_bucket_size=50_000_000, overlap_comm=True)


def test_zero2_optimizer_states_partition_and_offload():
    one = memory.optimizer_bytes(COUNTS, ZERO2, 1)
    assert one == 12 * COUNTS.trainable
    assert memory.optimizer_bytes(COUNTS, ZERO2, 2) == one // 2
    offload = ZeroSettings(stage=2, offload_optimizer=True)
    assert memory.optimizer_bytes(COUNTS, offload, 2) == 0
    assert memory.cpu_bytes(COUNTS, offload, 2)["optimizer_states"] == one // 2


def test_weights_shard_with_zero3_only():
    assert memory.weight_bytes(COUNTS, ZERO2, 1) == memory.weight_bytes(COUNTS, ZERO2, 8) == 2 * COUNTS.total
    zero3 = ZeroSettings(stage=3)
    w1, w2, w8 = (memory.weight_bytes(COUNTS, zero3, n) for n in (1, 2, 8))
    assert w1 > w2 > w8
    offload = ZeroSettings(stage=3, offload_optimizer=True, offload_param=True)
    assert memory.weight_bytes(COUNTS, offload, 4) < w8  # only the working set stays
    assert memory.cpu_bytes(COUNTS, offload, 4)["params"] > 0


def test_zero2_gradients_fp32_partition_plus_buckets():
    buckets = 2 * 50_000_000 * 2  # overlap_comm: two bf16 buckets
    in_flight = 2 * COUNTS.largest_trainable
    assert memory.gradient_bytes(COUNTS, ZERO2, 4) == buckets + 4 * COUNTS.trainable // 4 + in_flight
    bf16 = ZeroSettings(stage=2, reduce_bucket_size=50_000_000, overlap_comm=True, grad_accum_fp32=False)
    assert memory.gradient_bytes(COUNTS, bf16, 4) < memory.gradient_bytes(COUNTS, ZERO2, 4)
    frozen = ParamCounts(trainable_vl=0, trainable_other=0, frozen=10)
    assert memory.gradient_bytes(frozen, ZERO2, 4) == 0


def test_one_reduction_per_step_keeps_whole_fp32_gradients():
    """train.coalesce_grad_reduction with accumulation: ZeRO-2 holds every trainable gradient
    whole until the step (bf16, plus the fp32 sum); read from the JSON, off without
    accumulation or under ZeRO-3."""
    raw = json.loads((CONFIGS / "stage2.json").read_text())
    assert raw["gradient_accumulation_steps"] > 1
    zero = ZeroSettings.from_ds_config(raw)
    assert zero.coalesce
    uncoalesced = dataclasses.replace(zero, coalesce=False)
    extra = memory.gradient_bytes(COUNTS, zero, 4) - memory.gradient_bytes(COUNTS, uncoalesced, 4)
    assert extra == (2 + 4) * COUNTS.trainable
    bf16_sums = dataclasses.replace(zero, grad_accum_fp32=False)
    assert memory.gradient_bytes(COUNTS, bf16_sums, 4) - memory.gradient_bytes(
        COUNTS, dataclasses.replace(bf16_sums, coalesce=False), 4) == 2 * COUNTS.trainable
    off = {**raw, "vla_ds": {**raw["vla_ds"], "train": {**raw["vla_ds"]["train"], "coalesce_grad_reduction": False}}}
    assert not ZeroSettings.from_ds_config(off).coalesce
    assert not ZeroSettings.from_ds_config({**raw, "gradient_accumulation_steps": 1}).coalesce
    assert ZeroSettings.from_ds_config({**raw, "gradient_accumulation_steps": "auto"}).coalesce
    assert not ZeroSettings.from_ds_config(json.loads((CONFIGS / "stage3_offload.json").read_text())).coalesce


def test_activations_checkpointing_and_linear_in_batch():
    full = memory.activation_bytes(SHAPE, 4, checkpointing=False)
    ckpt = memory.activation_bytes(SHAPE, 4, checkpointing=True)
    assert ckpt < full / 3
    for checkpointing in (False, True):
        a1 = memory.activation_bytes(SHAPE, 1, checkpointing)
        assert memory.activation_bytes(SHAPE, 2, checkpointing) == 2 * a1
        assert memory.activation_bytes(SHAPE, 8, checkpointing) == 8 * a1


def test_frozen_backbone_keeps_only_a_transient_layer():
    frozen = ActivationShape(**{**SHAPE.__dict__, "lm_grad_layers": 0})
    on, off = (memory.activation_bytes(frozen, 4, c) for c in (True, False))
    assert on == off  # checkpointing changes nothing when nothing is kept for backward
    lm_layer = memory.transformer_layer_activation_bytes(642, 4, 2048, 16)
    vision_layer = memory.transformer_layer_activation_bytes(2392, 4, 1280, 16)
    assert on == max(lm_layer, vision_layer) + 8 * 642 * 4 * 2048 + 4 * 20_000_000


def test_korthikanti_formula_and_sdpa():
    s, b, h, a = 100, 2, 64, 4
    # s*b*h*(34 + 5as/h), multiplied out so it stays exact in integers
    assert memory.transformer_layer_activation_bytes(s, b, h, a, sdpa=False) == s * b * h * 34 + 5 * a * s * s * b
    assert memory.transformer_layer_activation_bytes(s, b, h, a, sdpa=True) == 34 * s * b * h


def test_estimate_total_is_the_sum():
    est = memory.estimate(COUNTS, ZERO2, 4, 4, SHAPE, checkpointing=True)
    assert est.total == est.weights + est.gradients + est.optimizer_states + est.activations + est.overhead
    assert est.overhead == memory.FIXED_OVERHEAD_BYTES
    assert est.activations == est.activations_checkpointed < est.activations_not_checkpointed
    with pytest.raises(ConfigError, match="num_gpus"):
        memory.estimate(COUNTS, ZERO2, 0, 4, SHAPE, checkpointing=True)


def test_image_tokens_follow_qwen_smart_resize():
    view = memory.image_tokens(360, 640)  # the guide's 640x360 frames
    assert (view.resized_height, view.resized_width, view.patches, view.tokens) == (364, 644, 26 * 46, 13 * 23)
    assert memory.lm_tokens_per_sample(view.tokens, 2) == 2 * (299 + 2) + memory.PROMPT_TEXT_TOKENS
    big = memory.image_tokens(4000, 4000, max_pixels=1_000_000)
    assert big.resized_height * big.resized_width <= 1_000_000
    assert big.resized_height % 28 == 0 and big.resized_width % 28 == 0


def test_settings_from_shipped_json():
    raw = {name: json.loads((REPO / "ds_configs" / name).read_text()) for name in SHIPPED}
    z2, z2o, z3o = (ZeroSettings.from_ds_config(raw[n]) for n in SHIPPED[1:])
    assert (z2.stage, z2.offload_optimizer, z2.grad_accum_fp32, z2.overlap_comm) == (2, False, True, True)
    assert z2.reduce_bucket_size == 50_000_000
    assert (z2o.stage, z2o.offload_optimizer, z2o.offload_param) == (2, True, False)
    assert (z3o.stage, z3o.offload_optimizer, z3o.offload_param) == (3, True, True)
    assert memory.finetune_config(raw["stage1.json"]).mode == "none"
    ft = memory.finetune_config(raw["stage2.json"])
    assert isinstance(ft, FinetuneConfig)
    assert (ft.mode, ft.lora_r, ft.gradient_checkpointing) == ("lora", 16, True)
    assert memory.finetune_config(raw["stage3_offload.json"]).mode == "lora"
    bad = {"vla_ds": {"stage": "stage2", "finetune": {"mode": "partial"}}}
    with pytest.raises(ConfigError, match="finetune.mode"):
        memory.finetune_config(bad)
    with pytest.raises(ConfigError, match="vla_ds.finetune.lora_rank"):
        memory.finetune_config({"vla_ds": {"stage": "stage2", "finetune": {"lora_rank": 8}}})


def test_parse_memory_size_and_recommendation():
    assert memory.parse_memory_size("24GB") == 24 * 1024**3
    assert memory.parse_memory_size("80") == 80 * 1024**3
    assert memory.parse_memory_size("40 GiB") == 40 * 1024**3
    assert memory.parse_memory_size("512MB") == 512 * 1024**2
    with pytest.raises(ConfigError, match="gpu-memory"):
        memory.parse_memory_size("lots")
    assert memory.recommend({"stage2.json": False, "stage2_offload.json": True, "stage3_offload.json": True}) \
        == "stage2_offload.json"
    assert memory.recommend({"stage1.json": True, "stage2.json": False}) is None


# ---------------------------------------------------------------- the script, in-process


@pytest.mark.parametrize("config", SHIPPED)
def test_script_table_for_each_shipped_config(config, capsys, tmp_path):
    script = estimate_memory
    out_json = tmp_path / "estimate.json"
    code = script.main(["--ds_config", str(REPO / "ds_configs" / config), "--num_gpus", "4",
                        "--gpu-memory", "24GB", "--json", str(out_json)])
    assert code == 0
    text = capsys.readouterr().out
    for name in SHIPPED:
        assert name in text
    for part in ("weights", "gradients", "optimizer states", "activations", "fixed overhead", "total"):
        assert part in text
    assert "Recommendation:" in text
    data = json.loads(out_json.read_text())
    assert data["estimate_bytes"]["total"] > 0
    assert [row["config"] for row in data["comparison"]] == list(SHIPPED)


def test_script_counts_the_vl_tokens_and_the_cache_per_sample(tmp_path):
    """Tokens: 2 + views x grid^2 bf16 tokens of the 3B's 2048 per sample in the cache, and a
    longer action-expert sequence (more head activations); pooled: one float32 vector."""
    def estimate(views: int, **action_expert) -> dict:
        raw = json.loads((CONFIGS / "stage1.json").read_text())
        raw.setdefault("vla_ds", {}).setdefault("action_expert", {}).update(action_expert)
        path = tmp_path / "stage1.json"
        path.write_text(json.dumps(raw))
        out = tmp_path / "estimate.json"
        assert estimate_memory.main(["--ds_config", str(path), "--views", str(views), "--gpu-memory", "80GB",
                                     "--json", str(out)]) == 0
        return json.loads(out.read_text())

    tokens, three_views = estimate(2), estimate(3, vl_grid=2)
    pooled = estimate(2, vl_conditioning="pooled")
    assert (tokens["vl_conditioning"], tokens["vl_tokens_per_sample"]) == ("tokens", 2 + 2 * 16)
    assert tokens["cache_bytes_per_sample"] == 34 * 2048 * 2
    assert three_views["vl_tokens_per_sample"] == 2 + 3 * 4
    assert (pooled["vl_tokens_per_sample"], pooled["cache_bytes_per_sample"]) == (1, 2048 * 4)
    assert tokens["estimate_bytes"]["activations"] > pooled["estimate_bytes"]["activations"]


def test_script_rejects_bad_flags(capsys):
    script = estimate_memory
    code = script.main(["--ds_config", str(REPO / "ds_configs" / "stage2.json"), "--image-size", "640"])
    assert code == 2
    assert "--image-size" in capsys.readouterr().err


def test_script_reads_the_vl_model_config(tiny_backbone_dir, tmp_path, capsys):
    script = estimate_memory
    out_json = tmp_path / "estimate.json"
    code = script.main(["--ds_config", str(REPO / "ds_configs" / "stage2.json"), "--vl-model", str(tiny_backbone_dir),
                        "--num_gpus", "2", "--gpu-memory", "8GB", "--micro-batch", "2", "--json", str(out_json)])
    assert code == 0, capsys.readouterr().err
    data = json.loads(out_json.read_text())
    assert data["micro_batch"] == 2 and data["num_gpus"] == 2
    assert 0 < data["parameters"]["trainable_vl"] < 1_000_000  # LoRA on the tiny model, not the 3B
    assert data["parameters"]["total"] < 1e9


def test_backbone_flop_formula_matches_torch_flop_counter(tiny_backbone_dir):
    """The architecture FLOP count (used by the benchmarks' MFU) against torch's FlopCounterMode
    on a real forward of the tiny backbone: its matmuls exactly. (The counter does not see
    the CPU SDPA kernel, so the attention terms are compared by their own formula only.)"""
    import numpy as np
    from torch.utils.flop_counter import FlopCounterMode

    from vla_ds.models.backbone import BackboneConfig, VLBackbone, VLInputBuilder

    cfg = BackboneConfig(model_name_or_path=str(tiny_backbone_dir), dtype="float32")
    builder, backbone = VLInputBuilder.from_pretrained(cfg), VLBackbone(cfg)
    inputs = builder([[np.zeros((112, 112, 3), np.uint8)] * 2], ["insert the needle"])
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        backbone(*(inputs[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")))
    counted = {name: sum(c.values()) for name, c in counter.get_flop_counts().items()}
    tokens = int(inputs["attention_mask"].sum())
    patches_per_view = int(inputs["image_grid_thw"].prod(dim=1)[0])
    est = flops.backbone_forward_flops(backbone.vl_model.config, tokens, patches_per_view, 2)
    assert est["lm"] == counted["VLBackbone.model.model.language_model"]
    assert est["vision"] + est["merger"] == counted["VLBackbone.model.model.visual"]
    assert est["lm_attention"] > 0 and est["vision_attention"] > 0


def test_zero_stage_that_is_not_a_number_is_one_message(tmp_path, capsys):
    ds_config = tmp_path / "z.json"
    ds_config.write_text(json.dumps({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": "1x"}}))
    with pytest.raises(ConfigError, match=r"zero_optimization\.stage='1x': expected 0, 1, 2 or 3"):
        memory.ZeroSettings.from_ds_config(json.loads(ds_config.read_text()))
    assert estimate_memory.main(["--ds_config", str(ds_config)]) == 2
    assert "error: zero_optimization.stage='1x'" in capsys.readouterr().err
