"""vla_ds.policy_tools.evaluate (masked error maths, sample selection, split settings) and scripts/evaluate.py."""

import json

import numpy as np
import pytest
from policy_helpers import build_policy, write_policy_dir

from vla_ds.data import DataConfig, VLADataset, compute_norm_stats, split_train_val
from vla_ds.errors import ConfigError, DatasetError
from vla_ds.policy_tools.evaluate import (
    ErrorAccumulator,
    format_report_table,
    masked_errors,
    select_samples,
    split_settings,
)
from vla_ds.policy_tools.evaluate import main as evaluate_main

REPORT_KEYS = {"policy", "mean_baseline", "zero_baseline", "mse_ratio_to_mean_baseline", "smoothness", "episodes",
               "samples", "action_names", "action_units"}
ERROR_KEYS = {"mse", "mae", "mse_per_dim", "mae_per_dim"}
VAL_SPLIT, SEED = 0.3, 5


# --------------------------------------------------------------------------- maths on toy arrays


def toy():
    """One sample, 3 steps, 7 dims; target 0; the last step is padding (and wildly wrong)."""
    target = np.zeros((1, 3, 7))
    pred = np.zeros((1, 3, 7))
    pred[0, 0, :] = 1.0  # every dim off by 1
    pred[0, 1, 0] = 3.0  # dx off by 3
    pred[0, 1, 6] = -2.0  # gripper off by -2
    pred[0, 2, :] = 100.0  # padded: must not count
    is_pad = np.array([[False, False, True]])
    return pred, target, is_pad


def test_masked_errors_exclude_padded_steps_per_dim():
    r = masked_errors(*toy())
    # Two valid steps: dx (1^2 + 3^2) / 2 = 5, dims 1-5 (1 + 0) / 2 = 0.5, gripper (1 + 4) / 2 = 2.5.
    np.testing.assert_allclose(r["mse_per_dim"], [5, 0.5, 0.5, 0.5, 0.5, 0.5, 2.5])
    np.testing.assert_allclose(r["mae_per_dim"], [2, 0.5, 0.5, 0.5, 0.5, 0.5, 1.5])
    assert r["mse"] == pytest.approx(10 / 7) and r["mae"] == pytest.approx(6 / 7)
    assert set(r) == ERROR_KEYS


def test_accumulating_batches_equals_one_pass():
    rng = np.random.default_rng(0)
    pred, target = rng.normal(size=(5, 4, 7)), rng.normal(size=(5, 4, 7))
    is_pad = rng.random((5, 4)) < 0.3
    acc = ErrorAccumulator()
    acc.update(pred[:2], target[:2], is_pad[:2])
    acc.update(pred[2:], target[2:], is_pad[2:])
    one = masked_errors(pred, target, is_pad)
    for key in ERROR_KEYS:
        np.testing.assert_allclose(acc.result()[key], one[key])
    valid = ~is_pad
    np.testing.assert_allclose(one["mae_per_dim"], np.abs(pred - target)[valid].mean(axis=0))


def test_all_padded_is_an_error_not_nan():
    pred, target, _ = toy()
    with pytest.raises(DatasetError, match="no valid"):
        masked_errors(pred, target, np.ones((1, 3), dtype=bool))


def test_select_samples_spreads_the_budget_over_episodes():
    assert select_samples([3, 2], None) == [[0, 1, 2], [0, 1]]
    assert select_samples([10, 3, 0], 7) == [[0, 3, 6, 9], [0, 1, 2], []]
    assert select_samples([10, 10], 2) == [[0], [0]]
    with pytest.raises(ConfigError):
        select_samples([4], 0)


def test_split_settings_come_from_config_or_flags():
    config = {"data": {"val_split": 0.2}, "seed": 3}
    assert split_settings(config) == (0.2, 3)
    assert split_settings({"train": {"seed": 9}, "data": {"val_split": 0.1}}) == (0.1, 9)
    assert split_settings({}, val_split=0.25, split_seed=1) == (0.25, 1)
    with pytest.raises(ConfigError, match="--val-split"):
        split_settings({"seed": 3})
    with pytest.raises(ConfigError, match="--split-seed"):
        split_settings({"data": {"val_split": 0.1}})


# --------------------------------------------------------------------------- scripts/evaluate.py


@pytest.fixture(scope="module")
def setup(tiny_backbone_dir, demo_dataset_dir, tmp_path_factory):
    dataset = VLADataset.from_config(DataConfig(dataset_dir=str(demo_dataset_dir), sensor_window_size=32))
    train, val = split_train_val(dataset, VAL_SPLIT, SEED)
    stats = compute_norm_stats(train)
    policy = build_policy(tiny_backbone_dir, stats, dataset.sensor_channels)
    root = tmp_path_factory.mktemp("evaluate")
    with_data = write_policy_dir(policy, root / "policy", data={"val_split": VAL_SPLIT}, seed=SEED)
    without_data = write_policy_dir(policy, root / "policy_no_data")
    return {"dataset": dataset, "val": val, "stats": stats, "policy": with_data, "policy_no_data": without_data,
            "root": root}


def test_evaluate_writes_the_report_and_plots(setup, demo_dataset_dir, capsys):
    out = setup["root"] / "eval"
    code = evaluate_main(["--policy", str(setup["policy"]), "--dataset_dir", str(demo_dataset_dir),
                                        "--output", str(out), "--max-samples", "6", "--steps", "2",
                                        "--seed", "1", "--batch-size", "4", "--device", "cpu", "--no-progress"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report) == REPORT_KEYS
    for name in ("policy", "mean_baseline", "zero_baseline"):
        assert set(report[name]) == ERROR_KEYS
        assert len(report[name]["mse_per_dim"]) == 7 and len(report[name]["mae_per_dim"]) == 7
        values = [report[name]["mse"], report[name]["mae"], *report[name]["mse_per_dim"], *report[name]["mae_per_dim"]]
        assert all(np.isfinite(v) and v >= 0 for v in values)
    assert report["samples"] == 6 and report["episodes"] == len(setup["val"].episodes)

    # Only the run's validation episodes (split_train_val with its val_split and seed).
    saved = np.load(out / "predictions.npz")
    assert set(saved["episodes"]) == {str(ep.path) for ep in setup["val"].episodes}
    # The baselines are the masked errors of the training mean and of zero on the same recordings.
    mean = np.broadcast_to(setup["stats"].action_mean, saved["recorded"].shape)
    expected_mean = masked_errors(mean, saved["recorded"], saved["is_pad"])
    np.testing.assert_allclose(report["mean_baseline"]["mse_per_dim"], expected_mean["mse_per_dim"], rtol=1e-5)
    valid = ~saved["is_pad"]
    np.testing.assert_allclose(report["zero_baseline"]["mae"], np.abs(saved["recorded"][valid]).mean(), rtol=1e-5)
    expected_policy = masked_errors(saved["predicted"], saved["recorded"], saved["is_pad"])
    np.testing.assert_allclose(report["policy"]["mae"], expected_policy["mae"], rtol=1e-6)
    assert report["mse_ratio_to_mean_baseline"] == pytest.approx(report["policy"]["mse"] / report["mean_baseline"]["mse"])
    # Smoothness: mean |a[k+1] - a[k]| over consecutive valid steps of the predicted / recorded chunks.
    pairs = valid[:, 1:] & valid[:, :-1]
    for name, chunks in (("policy", saved["predicted"]), ("recorded", saved["recorded"])):
        jumps = np.abs(np.diff(chunks, axis=1))[pairs]
        np.testing.assert_allclose(report["smoothness"][name]["per_dim"], jumps.mean(0), rtol=1e-5)

    pngs = sorted((out / "plots").glob("*.png"))
    assert pngs and all(p.stat().st_size > 20_000 for p in pngs)
    printed = capsys.readouterr().out
    assert "report.json" in printed and "gripper" in printed and "dx [mm]" in printed
    assert f"policy MSE / mean-action MSE: {report['mse_ratio_to_mean_baseline']:.3f}" in printed


def test_evaluate_asks_for_split_settings_a_config_lacks(setup, demo_dataset_dir, capsys):
    base = ["--policy", str(setup["policy_no_data"]), "--dataset_dir", str(demo_dataset_dir),
            "--max-samples", "2", "--steps", "1", "--device", "cpu", "--no-progress", "--plots", "0"]
    assert evaluate_main(base + ["--output", str(setup["root"] / "no_data")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "--val-split" in err[-1] and "config.json" in err[-1]
    out = setup["root"] / "with_flags"
    assert evaluate_main(base + ["--output", str(out), "--val-split", str(VAL_SPLIT), "--split-seed", str(SEED)]) == 0
    saved = np.load(out / "predictions.npz")
    assert set(saved["episodes"]) <= {str(ep.path) for ep in setup["val"].episodes}
    # --split all needs no split settings.
    assert evaluate_main(base + ["--output", str(setup["root"] / "all"), "--split", "all"]) == 0


def test_report_table_lists_every_dimension():
    r = masked_errors(*toy())
    table = format_report_table({"policy": r, "mean_baseline": r, "zero_baseline": r})
    for label in ("dx [mm]", "da [deg]", "gripper", "all", "policy MSE", "zero MAE"):
        assert label in table
