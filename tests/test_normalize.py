"""NormStats and compute_norm_stats."""

import json

import numpy as np
import pytest
import torch
from data_helpers import corrupt_compressed_member, write_episode

from vla_ds.data.dataset import DataConfig, VLADataset
from vla_ds.data.normalize import NormStats, compute_norm_stats
from vla_ds.errors import CheckpointError, DatasetError


def _dataset(root, with_sensor=True):
    t = np.round(np.arange(26) * 0.1, 6)  # states end at 2.5 s: samples after 1.7 s have padded steps
    poses = np.stack([t, np.zeros_like(t), t ** 2, np.zeros_like(t), np.zeros_like(t), np.zeros_like(t)], 1)
    raw = np.stack([np.arange(10), np.full(10, 5.0)], 1)  # (10, 2)
    windows = np.stack([np.arange(12).reshape(3, 4), np.full((3, 4), 5.0)], 2)  # (3, 4, 2): rows 0..11
    write_episode(root / "a", state_times=t, poses=poses, gripper=t / 2.5,
                  sensor=(np.arange(10) * 0.3, raw) if with_sensor else None)
    write_episode(root / "b", state_times=t, poses=poses, gripper=t / 2.5,
                  sensor=(np.array([1.0, 2.0, 3.0]), windows) if with_sensor else None)
    return VLADataset.from_config(DataConfig(dataset_dir=str(root), sensor_window_size=4))


def test_action_stats_exclude_padding(tmp_path):
    ds = _dataset(tmp_path)
    stats = compute_norm_stats(ds)
    # dx = 0.1 on every real step; padded zeros would pull the mean down and give a std
    assert stats.action_mean[0] == pytest.approx(0.1)
    assert stats.action_std[0] == 1.0  # constant -> 1.0
    np.testing.assert_array_equal(stats.action_mean[[1, 3, 4, 5]], 0)
    np.testing.assert_array_equal(stats.action_std[[1, 3, 4, 5]], 1.0)
    steps = np.concatenate([ds[i]["actions"][~ds[i]["action_is_pad"]] for i in range(len(ds))]).astype(np.float64)
    assert len(steps) < len(ds) * 8  # the dataset does have padded steps
    np.testing.assert_allclose(stats.action_mean[[2, 6]], steps[:, [2, 6]].mean(0), rtol=1e-6)
    np.testing.assert_allclose(stats.action_std[[2, 6]], steps[:, [2, 6]].std(0), rtol=1e-6)


def test_action_range_covers_every_sample_not_the_subsample(tmp_path):
    ds = _dataset(tmp_path)
    steps = np.concatenate([ds[i]["actions"][~ds[i]["action_is_pad"]] for i in range(len(ds))]).astype(np.float64)
    for stats in (compute_norm_stats(ds), compute_norm_stats(ds, max_samples=3, seed=1)):
        np.testing.assert_array_equal(stats.action_min, steps.min(0))
        np.testing.assert_array_equal(stats.action_max, steps.max(0))
    assert stats.action_min[0] == stats.action_max[0] == pytest.approx(0.1)  # a dimension that never changes


def test_sensor_stats_over_rows_of_both_layouts(tmp_path):
    stats = compute_norm_stats(_dataset(tmp_path))
    rows = np.concatenate([np.arange(10), np.arange(12)]).astype(np.float64)  # channel 0 of both files
    np.testing.assert_allclose(stats.sensor_mean, [rows.mean(), 5.0])
    np.testing.assert_allclose(stats.sensor_std, [rows.std(), 1.0])  # channel 1 constant -> 1.0


def test_no_sensor_data_gives_identity(tmp_path):
    stats = compute_norm_stats(_dataset(tmp_path, with_sensor=False))
    np.testing.assert_array_equal(stats.sensor_mean, [0.0])
    np.testing.assert_array_equal(stats.sensor_std, [1.0])


def test_subsample_is_deterministic(tmp_path):
    ds = _dataset(tmp_path)
    a = compute_norm_stats(ds, max_samples=5, seed=1)
    b = compute_norm_stats(ds, max_samples=5, seed=1)
    full = compute_norm_stats(ds)
    np.testing.assert_array_equal(a.action_mean, b.action_mean)
    assert not np.allclose(a.action_mean[2], full.action_mean[2])


def test_dict_round_trip_and_errors():
    stats = NormStats(np.arange(7.0), np.ones(7) * 2, np.array([1.0, 2.0]), np.array([3.0, 4.0]))
    d = json.loads(json.dumps(stats.to_dict()))
    back = NormStats.from_dict(d)
    for k in ("action_mean", "action_std", "sensor_mean", "sensor_std"):
        np.testing.assert_array_equal(getattr(back, k), getattr(stats, k))
    with pytest.raises(CheckpointError, match="missing key 'sensor_std'"):
        NormStats.from_dict({k: v for k, v in d.items() if k != "sensor_std"})
    # Any action dimension D, but every action array must have it.
    with pytest.raises(CheckpointError, match=r"'action_std' has shape \(7,\), expected \(6,\)"):
        NormStats.from_dict({**d, "action_mean": [0.0] * 6})
    six = NormStats.from_dict({**d, "action_mean": [0.0] * 6, "action_std": [1.0] * 6, "action_names": list("abcdef")})
    assert six.action_dim == 6 and six.action_names == list("abcdef")
    with pytest.raises(CheckpointError, match="'action_names' must list 6 strings"):
        NormStats.from_dict({**six.to_dict(), "action_names": ["a"]})
    assert back.action_min is None and "action_min" not in d  # stats written before the range existed
    ranged = NormStats(stats.action_mean, stats.action_std, stats.sensor_mean, stats.sensor_std,
                       np.full(7, -1.0), np.arange(7.0))
    back = NormStats.from_dict(json.loads(json.dumps(ranged.to_dict())))
    np.testing.assert_array_equal(back.action_min, ranged.action_min)
    np.testing.assert_array_equal(back.action_max, ranged.action_max)
    with pytest.raises(CheckpointError, match="'action_min' without its pair"):
        NormStats.from_dict({k: v for k, v in ranged.to_dict().items() if k != "action_max"})


def test_normalize_round_trip_numpy_and_torch():
    stats = NormStats(np.arange(7.0), np.full(7, 2.0), np.array([1.0]), np.array([4.0]))
    a = np.ones((3, 8, 7), dtype=np.float32)
    n = stats.normalize_actions(a)
    assert n.dtype == np.float32
    np.testing.assert_allclose(n[0, 0], (1 - np.arange(7.0)) / 2)
    np.testing.assert_allclose(stats.denormalize_actions(n), a)
    t = torch.ones(2, 8, 7, dtype=torch.bfloat16)
    assert stats.normalize_actions(t).dtype == torch.bfloat16
    torch.testing.assert_close(stats.normalize_sensor(torch.full((2, 5, 1), 9.0)), torch.full((2, 5, 1), 2.0))


def test_sensor_stats_of_compressed_files_are_streamed_not_kept(tmp_path):
    import vla_ds.data.episodes as episodes

    ts = np.round(np.arange(301) * 0.01, 6)
    data = np.random.default_rng(1).normal(size=(301, 3)).astype(np.float32)
    write_episode(tmp_path / "packed" / "a", sensor=(ts, data), compressed=True)
    write_episode(tmp_path / "plain" / "a", sensor=(ts, data))
    packed_ds = VLADataset.from_config(DataConfig(dataset_dir=str(tmp_path / "packed"), sensor_window_size=4))
    before = episodes.open_sensor_arrays()
    packed = compute_norm_stats(packed_ds)
    sensor = packed_ds.episodes[0].sensor
    assert sensor.compressed and sensor._array is None and id(sensor) not in episodes._OPEN_ARRAYS
    assert episodes.open_sensor_arrays() == before  # the stats kept no decompressed array
    plain_ds = VLADataset.from_config(DataConfig(dataset_dir=str(tmp_path / "plain"), sensor_window_size=4))
    plain = compute_norm_stats(plain_ds)
    np.testing.assert_allclose(packed.sensor_mean, data.astype(np.float64).mean(0), rtol=1e-6)
    np.testing.assert_array_equal(packed.sensor_mean, plain.sensor_mean)
    np.testing.assert_array_equal(packed.sensor_std, plain.sensor_std)


def test_corrupt_compressed_sensor_in_stats_is_dataset_error(tmp_path):
    ts = np.round(np.arange(3001) * 0.001, 6)
    data = np.random.default_rng(0).normal(size=(3001, 8)).astype(np.float32)
    ep = write_episode(tmp_path / "ep", sensor=(ts, data), compressed=True)
    path = corrupt_compressed_member(ep / "sensor_data.npz", "data.npy")
    ds = VLADataset.from_config(DataConfig(dataset_dir=str(tmp_path), sensor_window_size=4))
    with pytest.raises(DatasetError) as e:
        compute_norm_stats(ds)
    assert str(e.value).startswith(f"{path}: cannot read sensor file member 'data.npy' (")


def test_running_moments_equal_one_pass_stats():
    from vla_ds.data.normalize import _mean_std, _RunningMoments

    rng = np.random.default_rng(0)
    blocks = [1e4 + rng.normal(size=(n, 3)) * [1.0, 1e-3, 0.0] for n in (5, 0, 1, 200, 37)]  # large offset
    moments = _RunningMoments(3)
    for b in blocks:
        moments.add(b)
    mean, std = moments.mean_std()
    want_mean, want_std = _mean_std(np.concatenate(blocks), 3)
    assert moments.count == 243
    np.testing.assert_allclose(mean, want_mean, rtol=1e-12)
    np.testing.assert_allclose(std, want_std, rtol=1e-8)
    assert std[2] == 1.0  # constant channel
    empty = _RunningMoments(2).mean_std()
    np.testing.assert_array_equal(empty[0], [0, 0])
    np.testing.assert_array_equal(empty[1], [1, 1])
