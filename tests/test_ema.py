"""The moving average of the trained weights (vla_ds.training.ema), without any engine."""

import json
from pathlib import Path

import pytest
import torch
from checkpoint_helpers import (
    capture_starting_weights,
    fp32_masters_from_shards,
    model_states,
    same_schedule,
)

from vla_ds.errors import CheckpointError, ConfigError
from vla_ds.policy_tools.convert import main as convert_main
from vla_ds.policy_tools.evaluate import main as evaluate_main
from vla_ds.training.ema import EMAConfig, ParameterEMA, ema_weights


def test_decay_warms_up_to_its_ceiling():
    config = EMAConfig(enabled=True, decay=0.999, warmup_power=0.75)
    decays = [config.decay_at(t) for t in (0, 19, 459, 100_000)]
    assert decays[0] == 0.0  # the first update copies the weights
    assert decays[1] == pytest.approx(1 - 20 ** -0.75) and 0.89 < decays[1] < 0.91
    assert decays[2] == pytest.approx(0.99, abs=1e-3)
    assert decays[3] == 0.999
    assert EMAConfig(enabled=True, decay=0.9, warmup_power=0).decay_at(0) == 0.9


def test_update_is_the_exponential_average_in_fp32():
    config = EMAConfig(enabled=True, decay=0.5, warmup_power=0)
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.bfloat16))
    ema = ParameterEMA(config, [("w", w)])
    assert ema.shadow["w"].dtype == torch.float32
    expected = torch.tensor([1.0, 2.0])
    for value in ([3.0, 2.0], [5.0, -2.0], [5.0, -2.0]):
        with torch.no_grad():
            w.copy_(torch.tensor(value))
        ema.update([("w", w)])
        expected = 0.5 * expected + 0.5 * torch.tensor(value)
        torch.testing.assert_close(ema.shadow["w"], expected, rtol=0, atol=0)
    assert ema.step == 3


def test_state_round_trip_is_exact_and_strict():
    config = EMAConfig(enabled=True)
    a = torch.randn(3, 2)
    ema = ParameterEMA(config, [("a", a)])
    for _ in range(5):
        ema.update([("a", a + torch.randn(3, 2))])
    other = ParameterEMA(config, [("a", torch.zeros(3, 2))])
    other.load_state_dict(ema.state_dict())
    assert other.step == 5 and torch.equal(other.shadow["a"], ema.shadow["a"])
    assert ema_weights({"ema": ema.state_dict()})["a"] is ema.shadow["a"]
    assert ema_weights({}) is None
    with pytest.raises(CheckpointError, match=r"ckpt: the EMA weights do not match .* 1 missing \(a\); 1 unknown \(b\)"):
        other.load_state_dict({"step": 1, "shadow": {"b": torch.zeros(3, 2)}}, source="ckpt")
    with pytest.raises(CheckpointError, match=r"shape mismatches \(a \(2,\) vs \(3, 2\)\)"):
        other.load_state_dict({"step": 1, "shadow": {"a": torch.zeros(2)}})
    with pytest.raises(RuntimeError, match="parameters changed"):
        ema.update([("a", a), ("b", a)])


@pytest.mark.parametrize("field, value, message", [
    ("decay", 1.0, r"ema.decay=1.0: must be in \[0, 1\)"),
    ("warmup_power", -1, r"ema.warmup_power=-1: must be >= 0"),
    ("enabled", "yes", r"ema.enabled must be true or false"),
])
def test_config_rejects_bad_values(field, value, message):
    with pytest.raises(ConfigError, match=message):
        EMAConfig(**{field: value})


# --------------------------------------------------------------------------- through the real entry point

REPO = Path(__file__).resolve().parent.parent
# A flow-matching head with the EMA on: the non-default choices, end to end.
HEAD_AND_EMA = ["--set", "ema.enabled=true", "--set", "ema.decay=0.9", "--set", "action_expert.objective=flow_matching"]


def run_args(config, dataset, backbone, out, *extra):
    return ["--ds_config", str(REPO / "ds_configs" / config), "--dataset_dir", str(dataset), "--vl-model",
            str(backbone), "--model-preset", "tiny", "--sensor-window-size", "32", "--num_workers", "0",
            "--batch_size", "8", "--output_dir", str(out), "--set", "train.progress_bar=false", *extra]


@pytest.fixture(scope="module")
def runs(tiny_backbone_dir, demo_dataset_dir, tmp_path_factory):
    """Stage 1, 2 epochs: straight, and stopped mid-epoch 2 then resumed."""
    from vla_ds.training.train import main

    root = tmp_path_factory.mktemp("ema")
    common = [*HEAD_AND_EMA, "--epochs", "2", "--lr", "1e-3", "--set", f"cache.dir={root / 'cache'}"]
    assert main(run_args("stage1.json", demo_dataset_dir, tiny_backbone_dir, root / "straight", *common)) == 0
    total = model_states(root / "straight")["step"]
    stop = total // 2 + 1
    resumed = root / "resumed"
    assert main(run_args("stage1.json", demo_dataset_dir, tiny_backbone_dir, resumed, *common,
                         "--max_steps", str(stop), *same_schedule(root / "straight"))) == 0
    # Resumed with the shipped head setting: the checkpoint's flow-matching head continues.
    assert main(run_args("stage1.json", demo_dataset_dir, tiny_backbone_dir, resumed, *common[:4], *common[6:],
                         "--resume", str(resumed))) == 0
    return {"straight": root / "straight", "resumed": resumed, "total": total, "stop": stop, "root": root}


def test_the_average_is_saved_and_continued_by_resume(runs):
    straight, resumed = model_states(runs["straight"]), model_states(runs["resumed"])
    trainable = {k for k in straight["module"] if k.startswith(("sensor_encoder.", "action_expert."))}
    for states in (straight, resumed):
        assert states["ema"]["step"] == runs["total"]  # a resume that restarted the average would count fewer
        assert states["ema"]["shadow"].keys() == trainable
        assert all(v.dtype == torch.float32 for v in states["ema"]["shadow"].values())
    moved = 0.0
    for name, want in straight["ema"]["shadow"].items():
        assert torch.equal(resumed["ema"]["shadow"][name], want), name  # resume is exact, the average too
        moved = max(moved, float((want - straight["module"][name].float()).abs().max()))
    assert moved > 1e-3  # the average is not the weights themselves


def test_export_writes_the_average_and_no_ema_the_trained_weights(runs, tmp_path):
    from safetensors.torch import load_file

    assert convert_main([str(runs["straight"]), str(tmp_path / "policy"), "--to", "policy"]) == 0
    assert convert_main([str(runs["straight"]), str(tmp_path / "trained"), "--to", "fp32", "--no-ema"]) == 0
    config = json.loads((tmp_path / "policy" / "config.json").read_text())
    assert config["weights"] == "ema" and config["action_expert"]["objective"] == "flow_matching"
    exported = load_file(str(tmp_path / "policy" / "model.safetensors"))
    shadow = model_states(runs["straight"])["ema"]["shadow"]
    for name, value in shadow.items():
        assert torch.equal(exported[name], value), name
    trained = load_file(str(tmp_path / "trained" / "model.safetensors"))
    masters = fp32_masters_from_shards(runs["straight"], ranks=1)["fp32"]
    for name, value in masters.items():
        assert torch.equal(trained[name], value), name
    # The policy (a flow-matching head) evaluates through the command line.
    assert evaluate_main(["--policy", str(tmp_path / "policy"), "--output", str(tmp_path / "eval"), "--steps", "3",
                     "--max-samples", "4", "--plots", "0", "--no-progress", "--device", "cpu"]) == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["mse_ratio_to_mean_baseline"] == pytest.approx(report["policy"]["mse"] / report["mean_baseline"]["mse"])


def test_stage2_starts_from_the_average(runs, tiny_backbone_dir, demo_dataset_dir, tmp_path, monkeypatch):
    from vla_ds.training.metrics import read_metrics
    from vla_ds.training.train import main

    out = tmp_path / "s2"
    start = capture_starting_weights(monkeypatch)
    assert main(run_args("stage2.json", demo_dataset_dir, tiny_backbone_dir, out, *HEAD_AND_EMA,
                         "--stage1-checkpoint", str(runs["straight"]), "--max_steps", "1", "--lora-r", "4")) == 0
    shadow = model_states(runs["straight"])["ema"]["shadow"]
    for name, value in shadow.items():  # the masters start as the Stage 1 average
        assert torch.equal(start["fp32"][name], value), name
    # Validation scores the average in both runs: Stage 2's step-0 row is Stage 1's last one.
    stage1_val = [r["val/loss"] for r in read_metrics(runs["straight"]) if "val/loss" in r]
    first = read_metrics(out)[0]
    assert first["step"] == 0 and first["val/loss"] == pytest.approx(stage1_val[-1], rel=1e-4)


def test_resume_continues_the_checkpoints_head(runs):
    """The resumed run was started without the flow-matching flag: it took the checkpoint's head
    (and its losses went on as the straight run's, checked above through the average)."""
    saved = json.loads((runs["resumed"] / "config.json").read_text())["vla_ds"]["action_expert"]
    assert saved["objective"] == "flow_matching"
