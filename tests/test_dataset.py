"""Samples: views, sensor window, action chunk, padding; mixture weights; split; collate."""

import logging
import pickle

import numpy as np
import pytest
import torch
from data_helpers import corrupt_compressed_member, write_episode, write_mixture

from vla_ds.data.dataset import (
    ACTION_DIM,
    DataConfig,
    VLADataset,
    collate_numeric,
    compute_action_chunk,
    split_train_val,
    wrap_degrees,
)
from vla_ds.data.episodes import load_episode
from vla_ds.data.sampler import DistributedWeightedSampler
from vla_ds.errors import ConfigError, DatasetError, user_message


def cfg(root, **kw):
    kw.setdefault("sensor_window_size", 4)
    return DataConfig(dataset_dir=str(root), **kw)


def coarse_states(x, r=None):
    """States at t = 0, 1, 2, 3 s with pose_x = x and pose_r = r (others 0)."""
    t = np.arange(4.0)
    poses = np.zeros((4, 6))
    poses[:, 0] = x
    if r is not None:
        poses[:, 5] = r
    return t, poses


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("field, value", [
    ("sensor_window_size", 0), ("action_horizon", -1), ("frame_stride", 1.5), ("view_tolerance_s", -0.1),
    ("val_split", 1.0), ("val_split", -0.1), ("num_workers", -1), ("on_bad_sample", "ignore"),
    ("action_horizon", True),
])
def test_data_config_rejects_bad_values(field, value):
    with pytest.raises(ConfigError) as e:
        DataConfig(**{field: value})
    assert f"DataConfig.{field}" in str(e.value) and repr(value) in str(e.value)


def test_data_config_defaults():
    c = DataConfig()
    assert (c.sensor_window_size, c.action_horizon, c.frame_stride, c.view_tolerance_s, c.val_split,
            c.num_workers, c.on_bad_sample) == (650, 8, 1, 0.1, 0.1, 2, "error")
    assert ACTION_DIM == 7


# ---------------------------------------------------------------- action maths


def test_wrap_degrees():
    np.testing.assert_allclose(wrap_degrees(np.array([180, -180, 190, -190, 540, 0.5, -179.5])),
                               [180, 180, -170, 170, 180, 0.5, -179.5])


def test_action_chunk_linear_interpolation_and_gripper():
    t, poses = coarse_states([0, 10, 10, 40])
    gripper = np.array([0.0, 1.0, 1.0, 1.0])
    actions, is_pad = compute_action_chunk(t, poses, gripper, t=0.5, horizon=8, hz=10)
    assert actions.shape == (8, 7) and actions.dtype == np.float32 and is_pad.dtype == np.bool_
    # x rises 10 mm/s on [0, 1] then stays: five 0.1 s steps of 1 mm, then 0
    np.testing.assert_allclose(actions[:, 0], [1, 1, 1, 1, 1, 0, 0, 0], atol=1e-5)
    np.testing.assert_allclose(actions[:, 1:6], 0, atol=1e-6)
    # gripper at the END of each step: t + (k+1) * 0.1
    np.testing.assert_allclose(actions[:, 6], [0.6, 0.7, 0.8, 0.9, 1, 1, 1, 1], atol=1e-6)
    assert not is_pad.any()


def test_action_chunk_angle_wrap_is_small_step():
    # pose_r 178 -> -176 between t=1 and t=2 is +6 degrees, not -354
    t, poses = coarse_states([0, 0, 0, 0], r=[170, 178, -176, -170])
    poses[:, 5] = np.unwrap(poses[:, 5], period=360)  # as read_robot_states stores them
    actions, _ = compute_action_chunk(t, poses, None, t=1.0, horizon=8, hz=10)
    np.testing.assert_allclose(actions[:, 5], 0.6, atol=1e-5)
    np.testing.assert_allclose(actions[:, 6], 1.0)  # no gripper column


def test_action_chunk_padding_positions():
    t = np.round(np.arange(26) * 0.1, 6)  # states end at 2.5 s
    poses = np.stack([t, 2 * t, 3 * t] + [np.zeros_like(t)] * 3, 1)
    actions, is_pad = compute_action_chunk(t, poses, None, t=2.0, horizon=8, hz=10)
    # steps end at 2.1 .. 2.8; those ending after 2.5 are padding
    np.testing.assert_array_equal(is_pad, [False] * 5 + [True] * 3)
    np.testing.assert_allclose(actions[:5, :3], np.tile([0.1, 0.2, 0.3], (5, 1)), atol=1e-5)
    np.testing.assert_array_equal(actions[5:], 0)


def test_action_chunk_other_rate():
    t = np.round(np.arange(31) * 0.1, 6)
    poses = np.stack([t] + [np.zeros_like(t)] * 5, 1)
    actions, is_pad = compute_action_chunk(t, poses, None, t=0.0, horizon=4, hz=2)  # 0.5 s steps
    np.testing.assert_allclose(actions[:, 0], 0.5, atol=1e-6)
    assert not is_pad.any()


# ---------------------------------------------------------------- samples


def test_dataset_action_chunks_equal_per_sample_computation(tmp_path):
    """The dataset interpolates every sample's chunk once, per episode: each one must equal
    compute_action_chunk at that sample's time exactly (angles across the wrap, a gripper,
    another action rate, steps past the episode end)."""
    rng = np.random.default_rng(0)
    t = np.round(np.arange(0, 26) * 0.1, 6)  # states end at 2.5 s: the last frames' chunks are padded
    poses = np.cumsum(rng.normal(0, 3, (len(t), 6)), axis=0)
    poses[:, 5] += 175.0 + 4 * np.arange(len(t))  # pose_r runs past 180 degrees
    write_episode(tmp_path / "A" / "ep0", state_times=t, poses=poses, gripper=rng.uniform(0, 1, len(t)))
    write_episode(tmp_path / "B" / "ep1", metadata={"action": {"type": "delta_pose", "hz": 4}})
    ds = VLADataset.from_config(cfg(tmp_path))
    assert len(ds) > 30 and {ep.action_hz for ep in ds.episodes} == {4, 10}
    padded = 0
    for i in range(len(ds)):
        sample = ds.get_item(i, with_images=False)
        ep = ds.episodes[sample["episode_index"]]
        states = load_episode(ep.path).states  # the dataset's episodes are views of its index: no states
        expected = compute_action_chunk(states.times, states.poses, states.gripper, sample["frame_time"],
                                        ds.config.action_horizon, ep.action_hz)
        actions, is_pad = ds.get_actions(i)
        np.testing.assert_array_equal(actions, expected[0])
        np.testing.assert_array_equal(is_pad, expected[1])
        np.testing.assert_array_equal(sample["actions"], expected[0])
        padded += int(is_pad.any())
    assert padded > 0
    actions, _ = ds.get_actions(0)
    actions[:] = 1e9  # a caller's copy: the dataset's table is not changed through it
    assert np.abs(ds.get_actions(0)[0]).max() < 1e9


def test_sample_contents(tmp_path):
    t = np.round(np.arange(26) * 0.1, 6)  # states end at 2.5 s
    poses = np.stack([t, 2 * t, 3 * t] + [np.zeros_like(t)] * 3, 1)
    ep = write_episode(tmp_path / "Pick_the_cube" / "ep0", state_times=t, poses=poses, gripper=0.1 * t,
                       extra_columns={"force_z": np.ones_like(t)}, metadata={"confidence": 0.5})
    ds = VLADataset.from_config(cfg(tmp_path))
    assert len(ds) == 21 and ds.num_views == 2 and ds.sensor_channels == 1
    s = ds[20]  # t = 2.0
    assert s["instruction"] == "Pick the cube"
    assert s["frame_time"] == pytest.approx(2.0) and s["episode_index"] == 0 and s["confidence"] == 0.5
    assert s["has_sensor"] is False
    assert s["sensor_window"].shape == (4, 1) and s["sensor_window"].dtype == np.float32
    assert not s["sensor_window"].any()
    np.testing.assert_array_equal(s["action_is_pad"], [False] * 5 + [True] * 3)
    np.testing.assert_allclose(s["actions"][:5, :3], np.tile([0.1, 0.2, 0.3], (5, 1)), atol=1e-5)
    np.testing.assert_allclose(s["actions"][:5, 6], 0.1 * (2.0 + 0.1 * np.arange(1, 6)), atol=1e-6)
    np.testing.assert_array_equal(s["actions"][5:], 0)
    # images: nearest frames, views in camera_views order; red = frame index, green = view index
    assert [img.shape for img in s["images"]] == [(3, 4, 3), (3, 4, 3)]
    assert all(img.dtype == np.uint8 for img in s["images"])
    assert (s["images"][0][0, 0, :2].tolist(), s["images"][1][0, 0, :2].tolist()) == ([20, 0], [20, 1])
    assert ds[-1]["frame_time"] == s["frame_time"]
    with pytest.raises(IndexError):
        ds.get_item(21)
    assert ep.exists()


def test_views_order_and_nearest_frame(tmp_path):
    write_episode(tmp_path / "ep", frame_times={"front": [0.0, 0.1, 0.2, 0.3, 0.4], "wrist": [0.0, 0.25, 0.4]},
                  metadata={"camera_views": ["front", "wrist"]})
    ds = VLADataset.from_config(cfg(tmp_path, action_horizon=2))
    wrist_frame = [ds[i]["images"][1][0, 0, 0] for i in range(len(ds))]
    assert wrist_frame == [0, 0, 1, 1, 2]  # t=0.1 -> 0.0 (0.10 < 0.15), t=0.2 -> 0.25, t=0.3 -> 0.25


def test_first_camera_view_sets_sample_times(tmp_path):
    write_episode(tmp_path / "ep", frame_times={"front": [0.0, 0.1, 0.2, 0.3], "wrist": [0.05, 0.25]},
                  metadata={"camera_views": ["wrist", "front"]})
    ds = VLADataset.from_config(cfg(tmp_path, action_horizon=2))
    assert [ds[i]["frame_time"] for i in range(len(ds))] == [0.05, 0.25]
    s = ds[1]
    assert s["images"][0][0, 0].tolist() == [1, 1, 0]  # wrist frame 1 first
    assert s["images"][1][0, 0, 1] == 0  # then a front frame (green = 0)
    assert s["images"][1][0, 0, 0] in (2, 3)  # 0.2 or 0.3, both 0.05 s away


def test_frame_stride(tmp_path):
    write_episode(tmp_path / "ep")
    ds = VLADataset.from_config(cfg(tmp_path, frame_stride=3))
    np.testing.assert_allclose([ds[i]["frame_time"] for i in range(len(ds))], [0, 0.3, 0.6, 0.9, 1.2, 1.5, 1.8])


def test_invalid_sample_error_and_skip(tmp_path):
    ep = write_episode(tmp_path / "ep", frame_times={"front": list(np.round(np.arange(21) * 0.1, 6)),
                                                      "wrist": [0.0, 0.5, 1.0, 1.5, 2.0]})
    with pytest.raises(DatasetError) as e:
        VLADataset.from_config(cfg(tmp_path))
    assert str(e.value).startswith(f"{ep}: view 'wrist' has no frame within 0.1 s of t=0.200000 "
                                   f"(nearest is 0.200 s away)")
    ds = VLADataset.from_config(cfg(tmp_path, on_bad_sample="skip"))
    assert len(ds) == 13 and ds.invalid_samples == {str(ep): 8}
    np.testing.assert_allclose([ds[i]["frame_time"] for i in range(len(ds))],
                               [0, 0.1, 0.4, 0.5, 0.6, 0.9, 1.0, 1.1, 1.4, 1.5, 1.6, 1.9, 2.0])
    assert "8 invalid skipped" in ds.describe()


def test_all_samples_invalid_is_empty_dataset(tmp_path):
    write_episode(tmp_path / "ep", frame_times={"front": [0.0, 0.1], "wrist": [5.0]})
    with pytest.raises(DatasetError) as e:
        VLADataset.from_config(cfg(tmp_path, on_bad_sample="skip"))
    assert str(e.value) == f"{tmp_path}: no valid samples in 1 episodes (2 skipped as invalid)"


def test_no_episodes_is_error(tmp_path):
    (tmp_path / "empty_folder").mkdir()
    with pytest.raises(DatasetError) as e:
        VLADataset.from_config(cfg(tmp_path))
    assert str(e.value) == f"{tmp_path}: no episodes found (no folder holds metadata.json)"
    with pytest.raises(DatasetError, match="dataset directory not found"):
        VLADataset.from_config(cfg(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="dataset_dir is empty"):
        VLADataset.from_config(DataConfig())


def test_episode_shorter_than_chunk(tmp_path):
    ep = write_episode(tmp_path / "ep", state_times=[0.0, 0.25, 0.5], frame_times={"front": [0.0]})
    with pytest.raises(DatasetError) as e:
        VLADataset.from_config(cfg(tmp_path))
    assert str(e.value) == (f"{ep}: robot_states.csv spans 0.500 s, shorter than one action chunk "
                            f"(8 steps at 10 Hz = 0.800 s)")


# ---------------------------------------------------------------- frames outside the robot states


def test_frames_outside_robot_states_range_are_not_samples(tmp_path, caplog):
    """Before the first state the pose is held (zero deltas marked valid), after the last every
    step is padding: such frames are dropped and counted; frames at the ends stay."""
    t = np.round(np.arange(10, 21) * 0.1, 6)  # states over [1.0, 2.0] s, pose_x = t
    ep = write_episode(tmp_path / "A" / "ep0", state_times=t,
                       frame_times={"front": [0.5, 0.9, 1.0, 1.5, 2.0, 2.1, 2.5]})
    write_episode(tmp_path / "A" / "ep1", frame_times={"front": [0.0, 0.1]})  # all inside
    with caplog.at_level(logging.INFO, logger="vla_ds.data.dataset"):
        ds = VLADataset.from_config(cfg(tmp_path))
    times = [ds[i]["frame_time"] for i in range(len(ds)) if ds[i]["episode_index"] == 0]
    assert times == [1.0, 1.5, 2.0]  # exactly at the first and the last state: kept
    assert ds.out_of_range_frames == {str(ep): 4}
    first = ds.get_actions(0)  # t = 1.0: every step real, dx = 0.1 (no held pose)
    np.testing.assert_allclose(first[0][:, 0], 0.1, atol=1e-6)
    assert not first[1].any()
    actions, is_pad = ds.get_actions(1)  # t = 1.5: partly past the end, still a sample with padding
    np.testing.assert_array_equal(is_pad, [False] * 5 + [True] * 3)
    for i in range(len(ds)):  # no sample has a valid step from a held pose
        a, pad = ds.get_actions(i)
        assert (a[~pad, 0] > 0.05).all()
    assert "4 frames outside their episode's robot_states time range not used (1 episodes)" in ds.describe()
    lines = [r for r in caplog.records if "robot_states time range" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO
    assert lines[0].getMessage().startswith(
        "4 frames outside their episode's robot_states time range were not used")
    train, val = split_train_val(ds, 0.5, seed=0)  # the split halves count their own episodes
    assert sum(train.out_of_range_frames.values()) + sum(val.out_of_range_frames.values()) == 4


def test_out_of_range_frames_are_not_checked_for_view_tolerance(tmp_path):
    """A frame that is not a sample cannot make on_bad_sample='error' fail."""
    t = np.round(np.arange(10, 31) * 0.1, 6)  # states over [1.0, 3.0] s
    write_episode(tmp_path / "ep", state_times=t,
                  frame_times={"front": [0.0, 1.0, 1.1], "wrist": [1.0, 1.1]})  # wrist has nothing near 0.0
    ds = VLADataset.from_config(cfg(tmp_path))
    assert len(ds) == 2 and not ds.invalid_samples and sum(ds.out_of_range_frames.values()) == 1


def test_all_frames_out_of_range_is_empty_dataset(tmp_path):
    t = np.round(np.arange(10, 21) * 0.1, 6)
    write_episode(tmp_path / "ep", state_times=t, frame_times={"front": [0.0, 0.1, 2.5]})
    with pytest.raises(DatasetError) as e:
        VLADataset.from_config(cfg(tmp_path))
    assert str(e.value) == (f"{tmp_path}: no valid samples in 1 episodes "
                            f"(3 frames outside their episode's robot_states time range)")


def test_sensor_windows_in_samples_and_channels(tmp_path):
    ts = np.round(np.arange(301) * 0.01, 6)  # 100 Hz over [0, 3]
    data = np.stack([np.arange(301), -np.arange(301)], 1).astype(np.float32)  # (N, 2): row i = [i, -i]
    write_episode(tmp_path / "a" / "ep0", sensor=(ts, data))
    write_episode(tmp_path / "b" / "ep1")
    ds = VLADataset.from_config(cfg(tmp_path))
    assert ds.sensor_channels == 2
    s0 = ds[0]  # t = 0: only sample 0 exists
    assert s0["has_sensor"] is True and s0["sensor_pad"] == 3  # the 3 rows before it are padding
    np.testing.assert_array_equal(s0["sensor_window"], [[0, 0], [0, 0], [0, 0], [0, 0]])
    s5 = ds[5]  # t = 0.5: samples 47..50
    np.testing.assert_array_equal(s5["sensor_window"][:, 0], [47, 48, 49, 50])
    assert s5["sensor_pad"] == 0
    other = ds[21]  # episode without sensor: zeros with the dataset's C
    assert other["has_sensor"] is False and other["sensor_window"].shape == (4, 2) and not other["sensor_window"].any()
    assert other["sensor_pad"] == 4
    assert collate_numeric([s0, s5, other])["sensor_pad"].tolist() == [3, 0, 4]


def test_sensor_channel_mismatch_names_both_files(tmp_path):
    ts = np.arange(10) * 0.1
    a = write_episode(tmp_path / "a", sensor=(ts, np.zeros((10, 2))))
    b = write_episode(tmp_path / "b", sensor=(ts, np.zeros((10, 3))))
    with pytest.raises(DatasetError) as e:
        VLADataset.from_config(cfg(tmp_path))
    assert str(e.value) == (f"{b / 'sensor_data.npz'}: 3 sensor channels, but {a / 'sensor_data.npz'} has 2; "
                            f"every sensor file needs the same channels")


def test_view_count_mismatch(tmp_path):
    a = write_episode(tmp_path / "a")
    b = write_episode(tmp_path / "b", frame_times={"front": [0.0, 0.1]})
    with pytest.raises(DatasetError) as e:
        VLADataset.from_config(cfg(tmp_path))
    assert str(e.value).startswith(f"{b}: 1 camera views (front) but {a} has 2 (front, wrist)")


def test_images_decoded_per_sample_and_corrupt_image_error(tmp_path):
    ep = write_episode(tmp_path / "ep", suffix=".jpg")
    ds = VLADataset.from_config(cfg(tmp_path))
    bad = ep / "images" / "wrist" / "0.320000.jpg"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated JPEG
    garbage = ep / "images" / "front" / "0.500000.jpg"
    garbage.write_bytes(b"\x00not an image")
    assert ds.get_item(3, with_images=False)["images"] == []
    assert ds.get_item(3, with_images=False)["actions"].shape == (8, 7)
    with pytest.raises(DatasetError) as e:
        ds[3]
    assert str(e.value).startswith(f"{bad}: cannot decode image")
    with pytest.raises(DatasetError) as e:
        ds[5]
    assert str(e.value).startswith(f"{garbage}: cannot decode image")
    assert len(ds[4]["images"]) == 2


def test_files_read_once(tmp_path):
    ep = write_episode(tmp_path / "ep")
    ds = VLADataset.from_config(cfg(tmp_path))
    before = ds.get_item(7, with_images=False)
    (ep / "robot_states.csv").write_text("garbage")  # never re-read
    (ep / "images" / "front" / "9.000000.png").write_bytes(b"")  # the index is fixed at load
    after = ds.get_item(7, with_images=False)
    np.testing.assert_array_equal(before["actions"], after["actions"])
    assert len(ds) == 21


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_compressed_sensor_is_a_dataset_error_in_loader(tmp_path, monkeypatch, num_workers):
    """zlib.error from a damaged member, read in a worker, arrives as one DatasetError line."""
    import gc

    import torch.utils.data._utils as loader_utils

    # torch waits this long per worker that raised before it gives up joining it (default 5 s)
    monkeypatch.setattr(loader_utils, "MP_STATUS_CHECK_INTERVAL", 0.2)
    ts = np.round(np.arange(3001) * 0.001, 6)
    data = np.random.default_rng(0).normal(size=(3001, 8)).astype(np.float32)
    ep = write_episode(tmp_path / "ep", sensor=(ts, data), compressed=True)
    path = corrupt_compressed_member(ep / "sensor_data.npz", "data.npy")
    ds = VLADataset.from_config(cfg(tmp_path))  # the index is intact: loads
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=num_workers, collate_fn=collate_numeric)
    it = iter(loader)
    with pytest.raises(DatasetError) as e:
        next(it)
    message = user_message(e.value)
    del e, it  # shut the workers down now, while the short interval applies
    gc.collect()
    assert message.startswith(f"{path}: cannot read sensor file member 'data.npy' (")


def test_corrupt_compressed_sensor_index_fails_at_load(tmp_path):
    ts = np.round(np.arange(3001) * 0.001, 6)
    ep = write_episode(tmp_path / "ep", sensor=(ts, np.ones((3001, 2), np.float32)), compressed=True)
    path = corrupt_compressed_member(ep / "sensor_data.npz", "timestamps.npy", start_fraction=0.0)
    with pytest.raises(DatasetError) as e:
        VLADataset.from_config(cfg(tmp_path))
    assert str(e.value).startswith(f"{path}: cannot read sensor file member 'timestamps.npy' (")


def test_dataset_pickles_for_workers(tmp_path):
    ts = np.round(np.arange(301) * 0.01, 6)
    write_episode(tmp_path / "ep", sensor=(ts, np.arange(602, dtype=np.float32).reshape(301, 2)))
    ds = VLADataset.from_config(cfg(tmp_path))
    _ = ds[3]  # opens the memory map
    clone = pickle.loads(pickle.dumps(ds))
    for key in ("sensor_window", "actions", "action_is_pad"):
        np.testing.assert_array_equal(clone[3][key], ds[3][key])


# ---------------------------------------------------------------- mixture and weights


def _three_sources(root):
    write_episode(root / "A" / "ep0", frame_times={"front": [0.0, 0.1, 0.2, 0.3]})
    write_episode(root / "A" / "sub" / "ep1", frame_times={"front": [0.0, 0.1, 0.2, 0.3]})
    write_episode(root / "B" / "ep0", frame_times={"front": [0.0, 0.1]})
    write_episode(root / "C" / "ep0", frame_times={"front": [0.0, 0.1, 0.2]})


def test_uniform_weights_without_mixture(tmp_path):
    _three_sources(tmp_path)
    ds = VLADataset.from_config(cfg(tmp_path))
    assert len(ds) == 13 and [ep.source for ep in ds.episodes] == ["A", "A", "B", "C"]
    np.testing.assert_allclose(ds.sample_weights, np.full(13, 1 / 13))
    # no mixture.yaml: source_weights is None (the trainer then samples a permutation, not
    # with replacement from sample_weights), in the split halves too
    assert ds.source_weights is None
    train, val = split_train_val(ds, 0.25, seed=0)
    assert train.source_weights is None and val.source_weights is None
    assert "uniform" in ds.describe()
    sampler = DistributedWeightedSampler(len(ds), seed=0, weights=None if ds.source_weights is None
                                         else ds.sample_weights)
    assert sorted(sampler) == list(range(len(ds)))  # every sample exactly once per epoch


def test_mixture_selects_sources_and_weights(tmp_path):
    _three_sources(tmp_path)
    write_mixture(tmp_path, [("A", 3.0), ("B", 1.0)])
    ds = VLADataset.from_config(cfg(tmp_path))
    assert [ep.source for ep in ds.episodes] == ["A", "A", "B"] and len(ds) == 10
    # A's 8 samples share 3/4 of the probability, B's 2 share 1/4
    np.testing.assert_allclose(ds.sample_weights, [0.75 / 8] * 8 + [0.25 / 2] * 2)
    text = ds.describe()
    assert "source A: 2 episodes, 8 samples, weight 3, 75.0% of draws" in text
    assert "source B: 1 episodes, 2 samples, weight 1, 25.0% of draws" in text


@pytest.mark.parametrize("content, message", [
    ("sources:\n  - {path: Z, weight: 1}\n", "source path 'Z' not found"),
    ("sources:\n  - {path: A, weight: 0}\n", "source 'A': weight must be a number > 0, got 0"),
    ("sources:\n  - {path: A, weigth: 2}\n", "source 'A': unknown key 'weigth'"),
    ("sources: [\n", "invalid YAML"),
    ("weights: {A: 1}\n", "expected a non-empty source list"),
    ("sources:\n  - {path: A}\n  - {path: A}\n", "source 'A' is listed twice"),
    ("sources:\n  - {path: A}\n  - {path: A/sub}\n", "sources 'A' and 'A/sub' overlap"),
])
def test_mixture_errors_name_file(tmp_path, content, message):
    _three_sources(tmp_path)
    (tmp_path / "mixture.yaml").write_text(content)
    with pytest.raises(DatasetError) as e:
        VLADataset.from_config(cfg(tmp_path))
    assert str(e.value).startswith(f"{tmp_path / 'mixture.yaml'}: ")
    assert message in str(e.value)


# ---------------------------------------------------------------- split


def _many(root, n_a, n_b):
    for i in range(n_a):
        write_episode(root / "A" / f"ep{i:02d}", frame_times={"front": [0.0, 0.1]},
                      sensor=(np.arange(5) * 0.1, np.zeros((5, 3))) if i == 0 else None)
    for i in range(n_b):
        write_episode(root / "B" / f"ep{i:02d}", frame_times={"front": [0.0, 0.1, 0.2]})


def test_split_by_episode_stratified_deterministic(tmp_path):
    _many(tmp_path, 10, 5)
    ds = VLADataset.from_config(cfg(tmp_path))
    train, val = split_train_val(ds, 0.2, seed=0)
    names = lambda d: [str(ep.path) for ep in d.episodes]  # noqa: E731
    assert sorted(names(train) + names(val)) == sorted(names(ds)) and not set(names(train)) & set(names(val))
    assert [ep.source for ep in val.episodes].count("A") == 2 and [ep.source for ep in val.episodes].count("B") == 1
    assert len(train) + len(val) == len(ds)
    assert train.sensor_channels == val.sensor_channels == 3
    assert names(split_train_val(ds, 0.2, seed=0)[1]) == names(val)
    assert any(names(split_train_val(ds, 0.2, seed=s)[1]) != names(val) for s in range(1, 6))
    # episode_index refers to the full dataset's episode list
    idx = {val[i]["episode_index"] for i in range(len(val))}
    assert idx == {ds.episodes.index(ep) for ep in val.episodes}
    # train weights renormalised over the train samples
    assert train.sample_weights.sum() == pytest.approx(1.0)


def test_split_edge_cases(tmp_path):
    _many(tmp_path, 2, 0)
    ds = VLADataset.from_config(cfg(tmp_path))
    train, val = split_train_val(ds, 0.0, seed=0)
    assert len(val) == 0 and val.episodes == [] and len(train) == len(ds)
    assert val.sensor_channels == 3 and val.num_views == 1
    train, val = split_train_val(ds, 0.01, seed=0)  # rounds to 0, but >= 2 episodes: one val episode
    assert len(val.episodes) == 1 and len(train.episodes) == 1
    train, val = split_train_val(ds, 0.9, seed=0)  # never takes every training episode
    assert len(val.episodes) == 1 and len(train.episodes) == 1
    train_eps, val_eps = split_train_val(ds.episodes, 0.5, seed=0)
    assert len(train_eps) == 1 and len(val_eps) == 1


def test_split_single_episode_keeps_it_for_training(tmp_path):
    _many(tmp_path, 1, 0)
    train, val = split_train_val(VLADataset.from_config(cfg(tmp_path)), 0.5, seed=0)
    assert len(train.episodes) == 1 and len(val) == 0


# ---------------------------------------------------------------- collate


def test_collate_numeric(tmp_path):
    ts = np.round(np.arange(301) * 0.01, 6)
    write_episode(tmp_path / "a", sensor=(ts, np.ones((301, 2), np.float32)), metadata={"confidence": 0.25})
    write_episode(tmp_path / "b")
    ds = VLADataset.from_config(cfg(tmp_path))
    samples = [ds[0], ds[20], ds[21]]
    batch = collate_numeric(samples)
    assert batch["sensor_window"].shape == (3, 4, 2) and batch["sensor_window"].dtype == torch.float32
    assert batch["has_sensor"].tolist() == [True, True, False]
    assert batch["actions"].shape == (3, 8, 7) and batch["actions"].dtype == torch.float32
    assert batch["action_is_pad"].dtype == torch.bool and batch["action_is_pad"].shape == (3, 8)
    assert batch["confidence"].tolist() == [0.25, 0.25, 1.0] and batch["confidence"].dtype == torch.float32
    assert batch["episode_index"].tolist() == [0, 0, 1] and batch["episode_index"].dtype == torch.long
    assert batch["frame_time"].dtype == torch.float64 and batch["frame_time"][1].item() == pytest.approx(2.0)
    assert batch["images"][0] is samples[0]["images"] and len(batch["images"]) == 3
    assert batch["instruction"] == [s["instruction"] for s in samples]
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate_numeric)
    first = next(iter(loader))
    assert first["actions"].shape == (4, 8, 7)
