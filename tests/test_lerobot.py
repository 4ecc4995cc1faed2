"""LeRobot datasets (v2.1 and v3.0) as a --dataset_dir: frames, chunks, mapping options,
mixtures and every bad input, against datasets written by tests/lerobot_writer.py from
LeRobot's documented layout (not from our reader's assumptions)."""

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from lerobot_writer import write_lerobot_dataset

from vla_ds.batch import (
    ACTION_IS_PAD,
    ACTIONS,
    HAS_SENSOR,
    IMAGES,
    INSTRUCTION,
    SENSOR_PAD,
    SENSOR_WINDOW,
)
from vla_ds.data import DataConfig, VLADataset, compute_norm_stats
from vla_ds.data.actions import compute_action_chunks, unwrap_degrees
from vla_ds.data.lerobot import LeRobotConfig
from vla_ds.errors import ConfigError, DatasetError

MAX_CODEC_MAE = 8.0  # the writer's frames decode within ~2.5 grey levels; distinct frames differ by > 40


def mae(a, b):
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def dataset(root, horizon=4, window=3, **kw):
    lerobot = kw.pop("lerobot", {})
    return VLADataset(DataConfig(dataset_dir=str(root), action_horizon=horizon, sensor_window_size=window,
                                 lerobot=LeRobotConfig(**lerobot), **kw))


def written_episode(ds, written, i):
    """(written episode, frame row) of sample i."""
    ep = ds.episodes[ds._sample_episode[i]]
    return written.episodes[ep.entry.index], int(ds._sample_frames[i, 0])


@pytest.fixture(scope="module")
def lerobot_root(tmp_path_factory):
    return tmp_path_factory.mktemp("lerobot")


@pytest.mark.parametrize("version,codec", [("v2.1", "av1"), ("v2.1", "h264"), ("v3.0", "av1"), ("v3.0", "h264")])
def test_frame_k_of_episode_e_decodes_to_the_written_frame(version, codec, lerobot_root):
    written = write_lerobot_dataset(lerobot_root / f"{version}_{codec}", version=version, codec=codec,
                                    num_episodes=3, lengths=[12, 9, 15], episodes_per_file=2)
    ds = dataset(written.root)
    assert len(ds.episodes) == 3 and len(ds) == 36 and ds.num_views == 2 and ds.action_dim == 6
    assert ds.action_names == tuple(written.features["action"]["names"])
    # Random order (a seek per read), then in order (read forward), then the same frame twice.
    order = np.random.default_rng(0).permutation(len(ds)).tolist() + list(range(len(ds))) + [5, 5]
    for i in order:
        sample = ds[i]
        ep, row = written_episode(ds, written, i)
        for v, key in enumerate(ds.episodes[0].camera_views):
            got = sample[IMAGES][v]
            assert got.shape == written.episodes[0].frames[key].shape[1:] and got.dtype == np.uint8
            assert mae(got, ep.frames[key][row]) < MAX_CODEC_MAE, (i, key)
            others = [k for k in (row - 1, row + 1) if 0 <= k < len(ep.frames[key])]
            assert all(mae(got, ep.frames[key][k]) > 3 * MAX_CODEC_MAE for k in others)


def test_chunks_padding_tasks_and_stride_follow_delta_timestamps(lerobot_root):
    written = write_lerobot_dataset(
        lerobot_root / "chunks", version="v3.0", codec="h264", num_episodes=2, lengths=[7, 10], cameras=("observation.images.top",),
        frame_tasks=lambda e, n: ["pick"] * (n // 2) + ["place"] * (n - n // 2), episodes_per_file=2)
    h = 5
    ds = dataset(written.root, horizon=h, frame_stride=2)
    assert len(ds) == 4 + 5  # every 2nd frame of 7 and of 10
    for i in range(len(ds)):
        sample = ds[i]
        ep, row = written_episode(ds, written, i)
        action = ep.columns["action"]
        steps = row + np.arange(h)
        # LeRobot's delta_timestamps [0, 1/fps, ..]: past the end, the last frame, flagged as padding.
        np.testing.assert_array_equal(sample[ACTIONS], action[np.minimum(steps, len(action) - 1)])
        np.testing.assert_array_equal(sample[ACTION_IS_PAD], steps >= len(action))
        assert sample[INSTRUCTION] == ep.frame_tasks[row]  # the frame's own task
        assert sample[HAS_SENSOR] is False and sample[SENSOR_WINDOW].shape == (3, 1)


def test_image_features_and_a_chosen_view_order(lerobot_root):
    written = write_lerobot_dataset(lerobot_root / "images", version="v2.1", num_episodes=2, lengths=[6, 5],
                                    camera_dtype={"observation.images.top": "video", "observation.images.wrist": "image"})
    ds = dataset(written.root, lerobot={"views": ["observation.images.wrist", "observation.images.top"]})
    for i in (0, 7, 3):
        images = ds[i][IMAGES]
        ep, row = written_episode(ds, written, i)
        np.testing.assert_array_equal(images[0], ep.frames["observation.images.wrist"][row])  # PNG: lossless
        assert mae(images[1], ep.frames["observation.images.top"][row]) < MAX_CODEC_MAE


def yaw_crossing_pi(e, n):
    """A pose in metres and radians whose yaw crosses +pi -> -pi mid-episode, and a gripper."""
    t = np.arange(n, dtype=np.float64)
    yaw = np.pi - 0.3 + 0.1 * t
    pose = np.stack([0.01 * t, -0.02 * t, 0.005 * t * e, 0.01 * np.sin(t), 0.02 * t, np.arctan2(np.sin(yaw), np.cos(yaw)),
                     (t % 4 > 1).astype(float)], axis=1)
    return pose.astype(np.float32)


POSE = {"dtype": "float32", "shape": [7], "names": ["x", "y", "z", "roll", "pitch", "yaw", "gripper"], "fn": yaw_crossing_pi}


@pytest.fixture(scope="module")
def pose_dataset(lerobot_root):
    return write_lerobot_dataset(lerobot_root / "pose", version="v3.0", codec="h264", num_episodes=2, lengths=[12, 10],
                                 cameras=("observation.images.top",), extra_features={"observation.pose": POSE})


def test_delta_pose_actions_from_named_state_components(pose_dataset):
    ds = dataset(pose_dataset.root, horizon=4, lerobot={
        "actions": "delta_pose", "pose_feature": "observation.pose", "gripper_component": "gripper",
        "pose_components": ["x", "y", "z", "roll", "pitch", "yaw"]})
    assert ds.action_dim == 7 and ds.action_names == ("dx", "dy", "dz", "da", "db", "dr", "gripper")
    pose = pose_dataset.episodes[0].columns["observation.pose"].astype(np.float64)
    times = pose_dataset.episodes[0].timestamps.astype(np.float64)
    poses = np.concatenate([pose[:, :3] * 1000.0, unwrap_degrees(np.degrees(pose[:, 3:6]))], axis=1)
    expected, pad = compute_action_chunks(times, poses, pose[:, 6], times, 4, pose_dataset.fps)
    np.testing.assert_allclose(ds._actions[:12], expected, atol=1e-3)
    np.testing.assert_array_equal(ds._action_is_pad[:12], pad)
    # The yaw wraps from +180 to -180 degrees, but every recorded step turns 0.1 rad = 5.73 degrees.
    dr = ds._actions[:12][~ds._action_is_pad[:12]][:, 5]
    assert np.allclose(dr, math.degrees(0.1), atol=1e-2)
    assert np.allclose(ds._actions[0, :, 0], 10.0, atol=1e-3)  # 0.01 m a frame = 10 mm


@pytest.mark.parametrize("encoding", ["sincos", "unwrap", "raw"])
def test_state_as_sensor_stream_with_wrapped_angles(encoding, pose_dataset):
    w = 4
    ds = dataset(pose_dataset.root, window=w, lerobot={
        "sensor_features": ["observation.pose"], "sensor_angles": ["observation.pose:yaw", "observation.pose:5"][:1],
        "sensor_angle_encoding": encoding})
    channels = {"sincos": 8, "unwrap": 7, "raw": 7}[encoding]
    assert ds.sensor_channels == channels
    pose = pose_dataset.episodes[0].columns["observation.pose"].astype(np.float64)
    sample = ds[6]  # frame 6 of episode 0: rows 3..6
    assert sample[HAS_SENSOR] is True and sample[SENSOR_PAD] == 0
    window = sample[SENSOR_WINDOW]
    np.testing.assert_allclose(window[:, :5], pose[3:7, :5], atol=1e-6)
    # Every window's steps in the yaw channel(s): (samples x (w-1), 1 or 2); some windows cross +-pi.
    windows = [ds[i] for i in range(len(ds)) if ds[i][SENSOR_PAD] == 0]
    yaw_steps = np.concatenate([np.diff(x[SENSOR_WINDOW][:, 5:7], axis=0) for x in windows])
    if encoding == "sincos":
        np.testing.assert_allclose(window[:, 5], np.sin(pose[3:7, 5]), atol=1e-6)
        np.testing.assert_allclose(window[:, 6], np.cos(pose[3:7, 5]), atol=1e-6)
        assert np.abs(yaw_steps).max() < 0.11
    elif encoding == "unwrap":
        assert np.abs(yaw_steps[:, 0]).max() < 0.11  # continuous across +-pi
    else:
        assert np.abs(yaw_steps[:, 0]).max() > 6  # the raw jump the other encodings remove
    first = ds[0]
    assert first[SENSOR_PAD] == w - 1 and np.all(first[SENSOR_WINDOW][:w - 1] == 0)
    np.testing.assert_allclose(first[SENSOR_WINDOW][-1, :5], pose[0, :5], atol=1e-6)
    stats = compute_norm_stats(ds)
    assert stats.sensor_mean.shape == (channels,)
    if encoding == "sincos":  # the wrap no longer inflates the yaw channels' spread
        assert stats.sensor_std[5:channels - 1].max() < 1.5
    # "unwrap" is continuous within each window, which starts at its first frame's angle (a
    # robot sends only the window): its values, and so its spread, are the raw angle's.


def test_mixture_of_a_lerobot_root_and_vla_ds_episodes(lerobot_root, demo_dataset_dir):
    root = lerobot_root / "mixture"
    root.mkdir()
    (root / "demo").symlink_to(demo_dataset_dir, target_is_directory=True)
    write_lerobot_dataset(root / "robot", version="v2.1", codec="h264", num_episodes=2, lengths=[8, 8], action_dim=7,
                          cameras=("observation.images.top", "observation.images.wrist"))
    (root / "mixture.yaml").write_text("sources:\n  - {path: demo, weight: 1.0}\n  - {path: robot, weight: 3.0}\n")
    ds = VLADataset.from_config(DataConfig(dataset_dir=str(root), sensor_window_size=8, action_horizon=4))
    sources = ds.sample_source()
    assert set(sources) == {"demo", "robot"} and ds.action_dim == 7
    assert ds.sample_weights[sources == "robot"].sum() == pytest.approx(0.75)
    robot = next(i for i in range(len(ds)) if sources[i] == "robot")
    demo = next(i for i in range(len(ds)) if sources[i] == "demo")
    assert ds[robot][HAS_SENSOR] is False and ds[demo][SENSOR_WINDOW].shape == ds[robot][SENSOR_WINDOW].shape
    # A 6-D action cannot share a run with 7-D delta-pose episodes.
    shutil.rmtree(root / "robot")
    write_lerobot_dataset(root / "robot", version="v2.1", codec="h264", num_episodes=2, lengths=[8, 8], action_dim=6)
    with pytest.raises(DatasetError, match=r"6-dimensional actions .*7.*same action dimension"):
        VLADataset.from_config(DataConfig(dataset_dir=str(root), sensor_window_size=8, action_horizon=4))


# --------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def good_v3(lerobot_root):
    return write_lerobot_dataset(lerobot_root / "good_v3", version="v3.0", codec="h264", num_episodes=3,
                                 lengths=[8, 6, 7], episodes_per_file=2)


def broken_copy(good, tmp_path, name="broken"):
    dst = tmp_path / name
    shutil.copytree(good.root, dst)
    return dst


def edit_info(root, **changes):
    info = json.loads((root / "meta/info.json").read_text())
    info.update(changes)
    (root / "meta/info.json").write_text(json.dumps(info))


def set_column(path, name, row, value):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    values = table.column(name).to_pylist()
    values[row] = value
    index = table.column_names.index(name)
    table = table.set_column(index, table.field(index), pa.array(values, type=table.schema.field(name).type))
    pq.write_table(table, path)


def test_bad_metadata_names_the_file_and_the_problem(good_v3, tmp_path):
    root = broken_copy(good_v3, tmp_path)
    info = root / "meta/info.json"
    info.write_text("{not json")
    with pytest.raises(DatasetError, match=rf"^{info}: invalid JSON"):
        dataset(root)
    info.write_text(json.dumps({**good_v3.info, "codebase_version": "v2.0"}))
    with pytest.raises(DatasetError, match=rf"^{info}: LeRobot dataset version v2.0; vla_ds reads v2.1 and v3.0"):
        dataset(root)
    info.unlink()
    (root / "meta_data").mkdir()
    (root / "meta_data/info.json").write_text(json.dumps({"codebase_version": "v1.6", "fps": 10, "video": True}))
    with pytest.raises(DatasetError, match=r"meta_data/info.json: LeRobot dataset version v1.6; vla_ds reads"):
        dataset(root)
    shutil.rmtree(root / "meta_data")
    info.write_text(json.dumps({k: v for k, v in good_v3.info.items() if k != "codebase_version"}))
    with pytest.raises(DatasetError, match=rf"^{info}: no 'codebase_version'"):
        dataset(root)


@pytest.mark.parametrize("option,value,message", [
    ("actions", "observation.effort", r"the action feature \(data.lerobot.actions\) 'observation.effort' is not a "
                                      r"feature of this dataset \(numeric features: .*action"),
    ("views", ["observation.images.side"], r"data.lerobot.views names 'observation.images.side', which the dataset does not have"),
    ("sensor_features", ["observation.force"], r"data.lerobot.sensor_features entry 'observation.force' is not a feature"),
])
def test_a_configured_feature_the_dataset_lacks(option, value, message, good_v3):
    with pytest.raises(DatasetError, match=rf"^{good_v3.root / 'meta/info.json'}: {message}"):
        dataset(good_v3.root, lerobot={option: value})


def test_config_errors_are_named():
    with pytest.raises(ConfigError, match="needs data.lerobot.pose_components"):
        LeRobotConfig(actions="delta_pose")
    with pytest.raises(ConfigError, match="sensor_angle_encoding must be one of"):
        LeRobotConfig(sensor_angle_encoding="degrees")


def test_missing_or_undecodable_video(good_v3, tmp_path):
    root = broken_copy(good_v3, tmp_path)
    video = root / good_v3.episodes[2].video_files["observation.images.wrist"]
    video.unlink()
    with pytest.raises(DatasetError, match=rf"^{video}: video file not found \(episode 2, 'observation.images.wrist'\)"):
        dataset(root)
    # Skipped: the episode's samples are counted, the others load.
    ds = dataset(root, on_bad_sample="skip")
    assert len(ds) == 8 + 6 and sum(ds.invalid_samples.values()) == 7
    video.write_bytes(b"\x00" * 1000)
    with pytest.raises(DatasetError, match=rf"^{video}: cannot open the video"):
        dataset(root)


def test_a_timestamp_without_a_frame_within_the_tolerance(good_v3, tmp_path):
    root = broken_copy(good_v3, tmp_path)
    data_file = root / good_v3.episodes[0].data_file
    set_column(data_file, "timestamp", 3, 0.33)  # frame 3 of episode 0 at 0.33 s, its video frame at 0.30 s
    ds = dataset(root)
    video = root / good_v3.episodes[0].video_files["observation.images.top"]
    with pytest.raises(DatasetError, match=rf"^{video}: episode 0 frame 3 \(t=0.3300 s\): no frame within 0.0001 s of "
                                           r"t=0.330000 s \(nearest at 0.300000 s\)"):
        ds[3]
    assert ds[2][IMAGES][0].shape == (48, 64, 3)  # the other frames still read
    # A wider tolerance takes the nearest frame.
    assert dataset(root, lerobot={"tolerance_s": 0.04})[3][IMAGES][0].shape == (48, 64, 3)


def test_nan_in_actions_is_refused_or_skipped(good_v3, tmp_path):
    root = broken_copy(good_v3, tmp_path)
    data_file = root / good_v3.episodes[1].data_file
    rows_before = good_v3.episodes[0].length if good_v3.episodes[0].data_file == good_v3.episodes[1].data_file else 0
    set_column(data_file, "action", rows_before + 4, [float("nan")] * 6)
    with pytest.raises(DatasetError, match=rf"^{data_file}: episode 1 frame 4: 'action' has NaN or inf \(1 frames\)"):
        dataset(root)
    ds = dataset(root, horizon=3, on_bad_sample="skip")
    # Episode 1 (6 frames): the samples at frames 2, 3 and 4 have frame 4 in their chunk.
    assert sum(ds.invalid_samples.values()) == 3 and len(ds) == 8 + 3 + 7
    assert np.isfinite(ds._actions).all()


# --------------------------------------------------------------------------- training and inference


def test_two_rank_stage1_stage2_and_a_six_dimensional_policy(tiny_backbone_dir, lerobot_root, demo_dataset_dir,
                                                              tmp_path, capsys):
    """A LeRobot v3.0 dataset (AV1, 6-D actions, the state as sensor stream) trains Stage 1 on
    two ranks (features cached from decoded video) and Stage 2 with LoRA (video decoded by the
    DataLoader workers); the exported policy predicts 6-D chunks and evaluate/predict name them."""
    import subprocess
    import sys

    from test_train import REPO, free_port, tiny_args

    from vla_ds.models.policy import VLAPolicy
    from vla_ds.policy_tools.convert import main as convert_main
    from vla_ds.policy_tools.evaluate import main as evaluate_main
    from vla_ds.policy_tools.predict import main as predict_main
    from vla_ds.training.metrics import read_metrics
    from vla_ds.training.train import main as train_main

    written = write_lerobot_dataset(lerobot_root / "train", version="v3.0", codec="av1", num_episodes=6,
                                    lengths=[16] * 6, episodes_per_file=3, cameras=("observation.images.top",))
    mapping = ["--set", 'data.lerobot.sensor_features=["observation.state"]', "--set", "data.val_split=0.34"]
    s1, s2 = tmp_path / "s1", tmp_path / "s2"
    launcher = shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")
    cmd = [launcher, "--num_gpus", "2", "--master_port", str(free_port()), str(REPO / "scripts" / "train.py"),
           *tiny_args(written.root, tiny_backbone_dir, s1, "--batch_size", "4", "--lr", "3e-3", "--epochs", "6",
                      "--sensor-window-size", "4", *mapping)]
    log = tmp_path / "launcher.log"
    with open(log, "w") as f:
        proc = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                              timeout=int(os.environ.get("T", 600)))
    assert proc.returncode == 0, log.read_text()[-5000:]
    train = [r["train/loss"] for r in read_metrics(s1) if "train/loss" in r]
    k = len(train) // 3
    assert sum(train[-k:]) / k < 0.8 * sum(train[:k]) / k, train

    assert train_main([*tiny_args(written.root, tiny_backbone_dir, s2, "--training-stage", "stage2", "--batch_size", "4",
                                  "--epochs", "1", "--lora-r", "4", "--stage1-checkpoint", str(s1),
                                  "--sensor-window-size", "4", "--num_workers", "2", *mapping)[2:]]) == 0
    assert [r for r in read_metrics(s2) if "train/loss" in r]
    # The 6-D Stage 1 heads cannot continue on 7-D delta-pose data: one message, nothing trained.
    capsys.readouterr()
    assert train_main([*tiny_args(demo_dataset_dir, tiny_backbone_dir, tmp_path / "s2_7d", "--training-stage", "stage2",
                                  "--stage1-checkpoint", str(s1))[2:]]) == 2
    assert "7-dimensional actions (dx, dy, dz, da, db, dr, gripper), but the checkpoint the run starts from " \
           "predicts 6" in capsys.readouterr().err

    policy_dir = tmp_path / "policy"
    assert convert_main([str(s2), str(policy_dir), "--to", "policy"]) == 0
    stats = json.loads((policy_dir / "norm_stats.json").read_text())
    assert stats["action_names"] == written.features["action"]["names"] and len(stats["action_mean"]) == 6
    policy = VLAPolicy.from_pretrained(policy_dir, device="cpu")
    assert policy.action_expert.config.action_dim == 6 and policy.sensor_encoder.config.in_channels == 6
    ds = dataset(written.root, horizon=8, window=4, lerobot={"sensor_features": ["observation.state"]})
    sample = ds[3]
    chunk = policy.predict_actions(sample[IMAGES], sample[INSTRUCTION], sample[SENSOR_WINDOW], num_inference_steps=2)
    assert chunk.shape == (8, 6) and np.isfinite(chunk).all()

    capsys.readouterr()
    assert evaluate_main(["--policy", str(policy_dir), "--dataset_dir", str(written.root), "--output",
                          str(tmp_path / "eval"), "--steps", "2", "--device", "cpu", "--no-progress"]) == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["action_names"] == stats["action_names"] and len(report["policy"]["mae_per_dim"]) == 6
    assert "shoulder_pan.pos" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "eval" / "plots").glob("*.png"))[0].startswith("train_episode_")
    assert predict_main(["--policy", str(policy_dir), "--episode", str(written.root), "--episode-index", "4",
                         "--frame", "2", "--steps", "2", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "gripper.pos" in printed and "episode_000004" in printed
    assert len([line for line in printed.splitlines() if line.lstrip().startswith("recorded")]) == 8


def test_feature_cache_keys_follow_the_video_file_and_frame_time(lerobot_root):
    from vla_ds.training.cache import sample_keys

    written = write_lerobot_dataset(lerobot_root / "keys", version="v2.1", codec="h264", num_episodes=2, lengths=[5, 6],
                                    cameras=("observation.images.top",))
    ds = dataset(written.root)
    keys = sample_keys(ds, str(written.root))
    assert len(set(keys)) == len(ds) == 11  # one key per frame time
    video = written.root / written.episodes[1].video_files["observation.images.top"]
    data = video.read_bytes()
    video.write_bytes(data)  # rewritten (new mtime): its samples recompute, the other episode's do not
    os.utime(video, ns=(video.stat().st_atime_ns, video.stat().st_mtime_ns + 10**9))
    again = sample_keys(dataset(written.root), str(written.root))
    assert again[:5] == keys[:5] and all(a != b for a, b in zip(again[5:], keys[5:]))


def test_damaged_parquet_and_unknown_task(good_v3, tmp_path):
    root = broken_copy(good_v3, tmp_path)
    data_file = root / good_v3.episodes[2].data_file
    set_column(data_file, "task_index", 0, 7)
    with pytest.raises(DatasetError, match=rf"^{data_file}: episode 2: task_index 7 is not in the dataset's tasks"):
        dataset(root)
    data_file.write_bytes(b"PAR1 not really")
    with pytest.raises(DatasetError, match=rf"^{data_file}: cannot read parquet"):
        dataset(root)
