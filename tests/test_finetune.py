"""Stage 2 VL fine-tuning modes on the tiny backbone, plain and under DeepSpeed ZeRO-2."""

import warnings

import pytest
import torch

from vla_ds.data import DataConfig, VLADataset, compute_norm_stats
from vla_ds.data.loading import PolicyCollator
from vla_ds.errors import ConfigError
from vla_ds.models.action_expert import ActionExpertConfig
from vla_ds.models.backbone import BackboneConfig, VLBackbone, VLInputBuilder
from vla_ds.models.finetune import FinetuneConfig
from vla_ds.models.policy import VLAPolicy
from vla_ds.models.sensor_encoder import SensorEncoderConfig
from vla_ds.training.config import MODEL_PRESETS, ParamGroupConfig

WINDOW = 32


@pytest.fixture(scope="module")
def data(demo_dataset_dir):
    dataset = VLADataset.from_config(DataConfig(dataset_dir=str(demo_dataset_dir), sensor_window_size=WINDOW))
    return dataset, compute_norm_stats(dataset)


def build_policy(tiny_backbone_dir, data, finetune: FinetuneConfig | None, dtype="float32"):
    dataset, stats = data
    torch.manual_seed(0)
    preset = MODEL_PRESETS["tiny"]
    bcfg = BackboneConfig(model_name_or_path=str(tiny_backbone_dir), dtype=dtype)
    policy = VLAPolicy(VLBackbone(bcfg), SensorEncoderConfig(**preset["sensor_encoder"]),
                       ActionExpertConfig(**preset["action_expert"]), stats,
                       sensor_channels=dataset.sensor_channels, sensor_window_size=WINDOW)
    policy.backbone.freeze()
    if finetune is not None:
        policy.backbone.setup_finetune(finetune)
    return policy, PolicyCollator(VLInputBuilder.from_pretrained(bcfg))


def test_lora_adapts_only_adapters_and_starts_as_the_base_model(tiny_backbone_dir, data):
    dataset, _ = data
    base, collate = build_policy(tiny_backbone_dir, data, None)
    with warnings.catch_warnings(record=True) as caught:  # peft's probe of a deprecated transformers property
        warnings.simplefilter("always")
        lora, _ = build_policy(tiny_backbone_dir, data, FinetuneConfig(mode="lora", lora_r=4))
    assert not [w for w in caught if issubclass(w.category, FutureWarning)], [str(w.message) for w in caught]
    trainable = [n for n, p in lora.backbone.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert all(".language_model." in n for n in trainable)  # not the vision tower by default
    lora_b = [p for n, p in lora.backbone.named_parameters() if "lora_B" in n]
    assert lora_b and all(torch.count_nonzero(p) == 0 for p in lora_b)
    batch = collate([dataset[i] for i in range(3)])
    keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")
    with torch.no_grad():
        assert torch.allclose(base.backbone(*(batch[k] for k in keys)), lora.eval().backbone(*(batch[k] for k in keys)))
    with_vision, _ = build_policy(tiny_backbone_dir, data, FinetuneConfig(mode="lora", lora_r=4, lora_vision=True))
    assert any(".visual." in n and p.requires_grad for n, p in with_vision.backbone.named_parameters())


def test_full_unfreezes_exactly_the_last_layers(tiny_backbone_dir, data):
    policy, _ = build_policy(tiny_backbone_dir, data, FinetuneConfig(mode="full", unfreeze_last_n=1))
    layers = policy.backbone.vl_model.language_model.layers
    trainable = {id(p) for p in policy.backbone.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in layers[-1].parameters()}
    with pytest.raises(ConfigError, match="unfreeze_last_n=5"):
        build_policy(tiny_backbone_dir, data, FinetuneConfig(mode="full", unfreeze_last_n=5))


@pytest.mark.parametrize("mode", ["lora", "full", "none"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_every_trainable_parameter_gets_a_gradient_under_zero2(mode, checkpointing, tiny_backbone_dir, data):
    """After one update (LoRA B is zero before it, so A's gradient is too) a second
    backward gives every trainable parameter a non-zero gradient, LoRA A and B included."""
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    from vla_ds.training.distributed import init_distributed
    from vla_ds.training.engine import build_param_groups

    dataset, _ = data
    policy, collate = build_policy(tiny_backbone_dir, data,
                                   FinetuneConfig(mode=mode, lora_r=4, unfreeze_last_n=1,
                                                  gradient_checkpointing=checkpointing), dtype="bfloat16")
    groups = {"vl": ParamGroupConfig(modules=["backbone"], lr=1e-2), "other": ParamGroupConfig(lr=1e-2)}
    param_groups, _ = build_param_groups(policy, groups)
    ds_config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "train_batch_size": 4,
                 "bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"},
                 "zero_optimization": {"stage": 2}, "gradient_clipping": 1.0, "steps_per_print": 10**9,
                 "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "betas": [0.9, 0.95], "weight_decay": 0.01}}}
    init_distributed(5)
    engine, *_ = deepspeed.initialize(model=policy, model_parameters=param_groups, config=ds_config)
    with_sensor = [i for i in range(len(dataset)) if dataset.get_item(i, with_images=False)["has_sensor"]]
    without = [i for i in range(len(dataset)) if i not in set(with_sensor)]
    batch = collate([dataset[i] for i in (with_sensor[0], with_sensor[50], without[0], without[50])])
    engine.train()
    for step in range(2):
        loss = engine(batch)["loss"]
        engine.backward(loss)
        if step == 1:
            names = [n for n, p in policy.named_parameters() if p.requires_grad]
            if mode == "lora":
                assert any("lora_A" in n for n in names) and any("lora_B" in n for n in names)
            if mode == "none":
                assert not any(n.startswith("backbone.") for n in names)
            zero = [n for n, p in policy.named_parameters()
                    if p.requires_grad and torch.count_nonzero(safe_get_full_grad(p)) == 0]
            assert not zero, zero[:5]
        engine.step()


def test_frozen_vision_tower_stays_out_of_the_backward_graph(tiny_backbone_dir, data):
    """LoRA on the language model + checkpointing: the vision tower's output needs no grad
    (peft's input-grad hook would otherwise keep its activations for a useless backward)."""
    dataset, _ = data
    policy, collate = build_policy(tiny_backbone_dir, data,
                                   FinetuneConfig(mode="lora", lora_r=4, gradient_checkpointing=True))
    seen = []
    policy.backbone.vl_model.visual.register_forward_hook(lambda m, i, o: seen.append(
        (o.pooler_output if hasattr(o, "pooler_output") else o[0] if isinstance(o, tuple) else o).requires_grad))
    policy.train()
    batch = collate([dataset[i] for i in range(2)])
    feats = policy.backbone(*(batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")))
    assert feats.requires_grad and seen == [False]
