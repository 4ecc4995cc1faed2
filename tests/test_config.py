"""Run config: JSON + guide flags + --set -> a validated RunConfig."""

import json
from pathlib import Path

import pytest

from vla_ds.errors import ConfigError
from vla_ds.training import config as config_lib
from vla_ds.training.config import build_parser, load_run_config

STAGE1 = Path(__file__).resolve().parent.parent / "ds_configs" / "stage1.json"


def resolve(argv, world_size=1):
    args = build_parser().parse_args(["--ds_config", str(STAGE1), *argv])
    return load_run_config(args, world_size)


def test_guide_flags_override_the_json():
    cfg = resolve(["--dataset_dir", "/data/x", "--batch_size", "3", "--grad_accum", "5", "--lr", "3e-4",
                   "--epochs", "7", "--val_split", "0.2", "--diffusion_timesteps", "50",
                   "--sensor_loss_weight", "2.5", "--training-stage", "stage1"], world_size=2)
    assert cfg.data.dataset_dir == "/data/x"
    assert cfg.micro_batch_size == 3 and cfg.grad_accum == 5
    assert cfg.deepspeed["train_batch_size"] == 3 * 5 * 2
    assert cfg.optimizer_groups["other"].lr == pytest.approx(3e-4)
    assert cfg.train.epochs == 7
    assert cfg.data.val_split == pytest.approx(0.2)
    assert cfg.action_expert.num_train_timesteps == 50
    assert cfg.train.sensor_loss_weight == pytest.approx(2.5)


def test_both_dataset_dir_spellings():
    assert resolve(["--dataset-dir", "/a"]).data.dataset_dir == "/a"
    assert resolve(["--dataset_dir", "/b"]).data.dataset_dir == "/b"


def test_set_reaches_any_field_with_types():
    cfg = resolve(["--dataset_dir", "/d", "--set", "train.log_every=5", "--set", "vla_ds.data.frame_stride=2",
                   "--set", "zero_optimization.stage=1", "--set", "action_expert.clip_sample=2.5",
                   "--set", "train.progress_bar=false"])
    assert cfg.train.log_every == 5 and isinstance(cfg.train.log_every, int)
    assert cfg.data.frame_stride == 2
    assert cfg.deepspeed["zero_optimization"]["stage"] == 1
    assert cfg.action_expert.clip_sample == pytest.approx(2.5)
    assert cfg.train.progress_bar is False


def test_preset_then_explicit_values():
    cfg = resolve(["--dataset_dir", "/d", "--model-preset", "tiny", "--set", "sensor_encoder.d_model=32"])
    assert cfg.action_expert.d_model == config_lib.MODEL_PRESETS["tiny"]["action_expert"]["d_model"]
    assert cfg.sensor_encoder.d_model == 32
    ref = resolve(["--dataset_dir", "/d"])
    assert ref.action_expert.d_model == 1024 and ref.sensor_encoder.out_dim == 3072


def test_unknown_key_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"vla_ds\.train\.epohcs.*did you mean 'epochs'"):
        resolve(["--dataset_dir", "/d", "--set", "train.epohcs=3"])


def test_bad_value_names_the_field():
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        resolve(["--dataset_dir", "/d", "--epochs", "0"])
    with pytest.raises(ConfigError, match=r"train\.log_every='often'"):
        resolve(["--dataset_dir", "/d", "--set", "train.log_every=often"])


@pytest.mark.parametrize("value", ["five", "1x"])
def test_zero_stage_that_is_not_a_number_is_refused(value):
    with pytest.raises(ConfigError, match=rf"stage1\.json: zero_optimization\.stage='{value}': expected 0, 1, 2 or 3"):
        resolve(["--dataset_dir", "/d", "--set", f"zero_optimization.stage={value}"])


def test_inconsistent_batch_settings_are_refused(tmp_path):
    raw = json.loads(STAGE1.read_text())
    raw["train_batch_size"] = 10
    raw["vla_ds"]["data"]["dataset_dir"] = "/d"
    with pytest.raises(ConfigError, match=r"train_batch_size=10.*4 x gradient_accumulation_steps=1 x 2 ranks = 8"):
        config_lib.resolve_config(raw, world_size=2)
    raw["train_batch_size"] = 16  # consistent with micro 4 x accum 2 x 2 ranks
    raw["gradient_accumulation_steps"] = "auto"
    assert config_lib.resolve_config(raw, world_size=2).grad_accum == 2


def test_missing_dataset_dir_is_refused():
    with pytest.raises(ConfigError, match="--dataset_dir"):
        resolve([])


def test_schedule_auto_values_and_round_trip(tmp_path):
    cfg = resolve(["--dataset_dir", "/d", "--epochs", "4"])
    total = config_lib.resolve_schedule(cfg, steps_per_epoch=25)
    params = cfg.deepspeed["scheduler"]["params"]
    assert total == 100 and params["total_num_steps"] == 100
    assert params["warmup_num_steps"] == round(cfg.train.warmup_ratio * 100)
    cfg.save(tmp_path / "config.json")
    again = config_lib.RunConfig.from_dict(json.loads((tmp_path / "config.json").read_text()))
    assert again.to_dict() == cfg.to_dict()
    assert "vla_ds" not in again.deepspeed and "description" not in again.deepspeed


@pytest.mark.parametrize("epochs, max_steps, expect_epochs", [(1000, 2000, 2), (1, 2000, 2), (4, 20, 1), (4, 30, 2)])
def test_max_steps_sizes_the_schedule_and_overrides_the_epochs(epochs, max_steps, expect_epochs):
    """As in HF Trainer: --max_steps is the run's length whatever --epochs says (the issue's
    `--max_steps 2000 --epochs 1000` built a 1000-epoch schedule: warmup alone 7,500 steps)."""
    cfg = resolve(["--dataset_dir", "/d", "--epochs", str(epochs), "--max_steps", str(max_steps)])
    total = config_lib.resolve_schedule(cfg, steps_per_epoch=1216 if max_steps > 100 else 25)
    params = cfg.deepspeed["scheduler"]["params"]
    assert total == max_steps and params["total_num_steps"] == max_steps
    assert params["warmup_num_steps"] == round(cfg.train.warmup_ratio * max_steps)
    assert config_lib.run_epochs(cfg, 1216 if max_steps > 100 else 25) == expect_epochs  # the epochs those steps start
    assert cfg.train.epochs == epochs  # the config keeps what the user said
    described = config_lib.describe_schedule(cfg)
    assert f"warmup {params['warmup_num_steps']}, total {max_steps} steps" in described


def test_a_schedule_given_as_numbers_is_kept_under_max_steps():
    """A run meant to stop before its schedule ends (the first half of a longer run)."""
    cfg = resolve(["--dataset_dir", "/d", "--max_steps", "10", "--set", "scheduler.params.total_num_steps=40",
                   "--set", "scheduler.params.warmup_num_steps=4"])
    assert config_lib.resolve_schedule(cfg, steps_per_epoch=25) == 10
    assert cfg.deepspeed["scheduler"]["params"]["total_num_steps"] == 40
    assert cfg.deepspeed["scheduler"]["params"]["warmup_num_steps"] == 4


def test_deepspeed_key_typos_are_named_before_any_process_group():
    for override, expect in [("zero_optimisation.stage=3", "did you mean 'zero_optimization'"),
                             ("optimizer.params.betaz=[0.9,0.95]", "did you mean 'betas'"),
                             ("zero_optimization.stagee=2", "stagee")]:
        cfg = resolve(["--dataset_dir", "/d", "--set", override])
        config_lib.resolve_schedule(cfg, steps_per_epoch=10)
        with pytest.raises(ConfigError, match=expect):
            config_lib.validate_deepspeed(cfg)
    cfg = resolve(["--dataset_dir", "/d"])
    config_lib.resolve_schedule(cfg, steps_per_epoch=10)
    config_lib.validate_deepspeed(cfg)  # the shipped config passes
