"""The policy learns what the data says: a short Stage 1 run of the demo's recipe through the
real entry point, exported as a policy and scored on held-out episodes against the
mean-action baseline (what scripts/demo.sh ends with), with the default head."""

import json
from pathlib import Path

import pytest

from vla_ds.data.demo import make_demo_dataset
from vla_ds.policy_tools.convert import main as convert_main
from vla_ds.policy_tools.evaluate import main as evaluate_main
from vla_ds.training.train import main

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def evaluated(tiny_backbone_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("learning")
    data = make_demo_dataset(root / "data", episodes_per_source=(10, 10))  # as scripts/demo.sh
    out = root / "run"
    assert main(["--ds_config", str(REPO / "ds_configs" / "stage1.json"), "--dataset_dir", str(data),
                 "--vl-model", str(tiny_backbone_dir), "--model-preset", "tiny", "--sensor-window-size", "32",
                 "--num_workers", "0", "--batch_size", "16", "--lr", "1e-3", "--epochs", "15", "--output_dir", str(out),
                 "--set", "train.progress_bar=false", "--set", "train.validate_every_epochs=100"]) == 0
    assert convert_main([str(out), str(root / "policy"), "--to", "policy"]) == 0
    reports = {}
    for steps in (10, 50):
        assert evaluate_main([
            "--policy", str(root / "policy"), "--output", str(root / f"eval{steps}"), "--steps", str(steps),
            "--plots", "0", "--no-progress", "--device", "cpu"]) == 0
        reports[steps] = json.loads((root / f"eval{steps}" / "report.json").read_text())
    return reports


def test_held_out_error_is_well_below_the_mean_action_baseline(evaluated):
    report = evaluated[10]
    assert report["episodes"] == 2 and report["samples"] > 50  # held-out episodes only
    assert report["mse_ratio_to_mean_baseline"] <= 0.3, report["mse_ratio_to_mean_baseline"]
    # Every dimension, the gripper included (its switch time is random: only its state is observed).
    for d, (policy, baseline) in enumerate(zip(report["policy"]["mse_per_dim"], report["mean_baseline"]["mse_per_dim"])):
        assert policy < baseline, (d, policy, baseline)
    # Chunks are no more jagged than the recordings (a residue of sampling noise would be).
    assert report["smoothness"]["policy"]["mean"] <= report["smoothness"]["recorded"]["mean"]


def test_more_sampling_steps_are_not_worse(evaluated):
    assert evaluated[50]["mse_ratio_to_mean_baseline"] <= 1.05 * evaluated[10]["mse_ratio_to_mean_baseline"]
