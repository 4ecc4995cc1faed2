"""Parameter groups built from the JSON's optimizer_groups (no DeepSpeed needed)."""

import pytest
from torch import nn

from vla_ds.errors import ConfigError
from vla_ds.training.config import ParamGroupConfig
from vla_ds.training.engine import build_param_groups


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Linear(4, 4)
        self.sensor_encoder = nn.Linear(4, 3)
        self.action_expert = nn.Sequential(nn.Linear(3, 2), nn.LayerNorm(2))


def test_groups_split_by_module_and_star_takes_the_rest():
    model = Toy()
    groups = {"vl": ParamGroupConfig(modules=["backbone"], lr=1e-5), "other": ParamGroupConfig(modules=["*"], lr=1e-4)}
    out, summary = build_param_groups(model, groups)
    assert [g["name"] for g in out] == ["vl", "other"]
    assert out[0]["lr"] == 1e-5 and out[1]["lr"] == 1e-4
    assert {id(p) for p in out[0]["params"]} == {id(p) for p in model.backbone.parameters()}
    assert summary[1].num_tensors == 2 + 4 and summary[1].num_params == 4 * 3 + 3 + 3 * 2 + 2 + 2 + 2


def test_frozen_module_leaves_its_group_empty_and_dropped():
    model = Toy()
    model.backbone.requires_grad_(False)
    groups = {"vl": ParamGroupConfig(modules=["backbone"], lr=1e-5), "other": ParamGroupConfig(modules=["*"])}
    out, _ = build_param_groups(model, groups)
    assert [g["name"] for g in out] == ["other"]
    assert all(p.requires_grad for p in out[0]["params"])


def test_parameters_without_a_group_or_unknown_modules_are_refused():
    with pytest.raises(ConfigError, match="belong to no group"):
        build_param_groups(Toy(), {"heads": ParamGroupConfig(modules=["action_expert"])})
    with pytest.raises(ConfigError, match="unknown module 'acton_expert'"):
        build_param_groups(Toy(), {"heads": ParamGroupConfig(modules=["acton_expert"])})


def test_engine_start_is_quiet(tiny_backbone_dir, capfd):
    """Building stage1.json's engine prints nothing DeepSpeed says by design: BF16_Optimizer's
    memory reports (ZeRO-1 + bf16, print()ed), WarmupCosineLR's warning about its own
    iteration -1 (logged)."""
    import logging

    from policy_helpers import stage1_policy_and_batches

    from vla_ds.log import setup_logging
    from vla_ds.training import distributed
    from vla_ds.training import engine as engine_lib

    class Records(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    messages: list[str] = []
    setup_logging()
    seen = Records()
    ds_logger = logging.getLogger("DeepSpeed")
    ds_logger.addHandler(seen)
    try:
        cfg, policy, _ = stage1_policy_and_batches(tiny_backbone_dir, 2, 1)
        distributed.init_distributed(5)
        engine, _ = engine_lib.initialize(policy, cfg)
    finally:
        ds_logger.removeHandler(seen)
    assert type(engine.optimizer).__name__ == "BF16_Optimizer" and engine.lr_scheduler is not None
    assert not [m for m in messages if "learning rate from scheduler" in m], messages
    printed = "".join(capfd.readouterr())
    assert "CPU Virtual Memory" not in printed, printed
