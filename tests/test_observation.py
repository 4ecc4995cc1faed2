"""The raw-observation contract: a policy trained on LeRobot sensor features records how its
window is made from the raw features (order, angle encoding, padding) and applies it to a
robot's raw state; training samples and served requests made from the same raw rows are
the same tensors."""

from pathlib import Path

import numpy as np
import pytest
import torch
from lerobot_writer import write_lerobot_dataset
from policy_helpers import build_policy
from test_lerobot import POSE

from vla_ds.batch import SENSOR_PAD, SENSOR_WINDOW
from vla_ds.data import DataConfig, NormStats, VLADataset, compute_norm_stats
from vla_ds.data.lerobot import LeRobotConfig
from vla_ds.serving import wire
from vla_ds.serving.server import ServeConfig, observation_spec, server_metadata
from vla_ds.serving.spec import BadRequest

WINDOW = 4
LENGTHS = [12, 10]


@pytest.fixture(scope="module")
def pose_data(tmp_path_factory):
    """A LeRobot dataset whose 7-D pose (yaw crossing +-pi) is the sensor stream, concatenated
    after the 6-D state: what the raw 13 values per frame become differs by encoding."""
    return write_lerobot_dataset(tmp_path_factory.mktemp("obs") / "pose", version="v3.0", codec="h264",
                                 num_episodes=2, lengths=LENGTHS, cameras=("observation.images.top",),
                                 extra_features={"observation.pose": POSE})


def _dataset(written, encoding):
    lerobot = LeRobotConfig(sensor_features=["observation.pose", "observation.state"],
                            sensor_angles=["observation.pose:yaw"], sensor_angle_encoding=encoding)
    return VLADataset(DataConfig(dataset_dir=str(written.root), sensor_window_size=WINDOW, action_horizon=4,
                                 lerobot=lerobot))


def _raw_state(written, episode: int, frame: int, frames: int) -> dict:
    """What a robot holds at ``frame``: the raw rows of its last ``frames`` frames, as written."""
    cols = written.episodes[episode].columns
    lo = max(0, frame + 1 - frames)
    return {"observation.pose": np.asarray(cols["observation.pose"][lo:frame + 1], dtype=np.float32),
            "observation.state": np.asarray(cols["observation.state"][lo:frame + 1], dtype=np.float32)}


@pytest.mark.parametrize("encoding", ["sincos", "unwrap", "raw"])
def test_training_samples_and_served_requests_are_the_same_tensors(encoding, pose_data, tiny_backbone_dir):
    ds = _dataset(pose_data, encoding)
    stats = compute_norm_stats(ds)
    transform = stats.sensor_transform
    assert [f["name"] for f in transform["features"]] == ["observation.pose", "observation.state"]
    assert len(transform["channel_names"]) == ds.sensor_channels == 13 + (encoding == "sincos")
    # Through the exported form (norm_stats.json) into a policy and its server's request parser.
    policy = build_policy(tiny_backbone_dir, NormStats.from_dict(stats.to_dict()), ds.sensor_channels, window=WINDOW, num_views=1)
    spec = observation_spec(policy, views=["observation.images.top"])
    image = np.zeros((48, 64, 3), dtype=np.uint8)
    for episode, frame in [(0, 0), (0, 2), (0, 3), (0, 7), (0, 11), (1, 5)]:  # padded, crossing +-pi, later
        sample = ds[sum(LENGTHS[:episode]) + frame]
        for frames in (WINDOW, frame + 1, 50):  # exactly W, the whole history, more than it has
            raw = _raw_state(pose_data, episode, frame, frames)
            message = wire.unpackb(wire.packb({"images": {"observation.images.top": image}, "state": raw, "seed": 1,
                                                       "prompt": "x"}))
            request = spec.parse(message, torch.Generator())
            assert request.sensor.dtype == np.float32
            np.testing.assert_array_equal(request.sensor, sample[SENSOR_WINDOW])
            assert request.sensor_pad == sample[SENSOR_PAD] == max(0, WINDOW - 1 - frame)
            window, pad = policy.state_window(raw)
            np.testing.assert_array_equal(window, sample[SENSOR_WINDOW])
    # predict_actions on the raw state == on the training sample's window (same noise).
    sample, raw = ds[3], _raw_state(pose_data, 0, 3, WINDOW)
    noise = torch.randn(policy.action_expert.config.horizon, policy.action_expert.config.action_dim)
    with torch.no_grad():
        from_state = policy.predict_actions([image], "x", state=raw, initial_noise=noise)
        from_window = policy.predict_actions([image], "x", sensor_window=sample[SENSOR_WINDOW],
                                             sensor_pad=sample[SENSOR_PAD], initial_noise=noise)
        batched = policy.predict_actions([[image], [image]], ["x", "x"], state=[raw, None],
                                         initial_noise=torch.stack([noise, noise]))
    np.testing.assert_array_equal(from_state, from_window)
    np.testing.assert_allclose(batched[0], from_state, atol=1e-5)
    assert not np.allclose(batched[1], batched[0])  # None: the no-sensor embedding


def test_metadata_names_the_raw_channels_and_requests_are_checked(pose_data, tiny_backbone_dir):
    ds = _dataset(pose_data, "sincos")
    stats = compute_norm_stats(ds)
    policy = build_policy(tiny_backbone_dir, stats, ds.sensor_channels, window=WINDOW, num_views=1)
    spec = observation_spec(policy, views=["observation.images.top"])
    meta = server_metadata(policy, spec, ServeConfig(), steps=4)
    state = meta["state"]
    assert state["features"]["observation.pose"] == {
        "size": 7, "components": ["x", "y", "z", "roll", "pitch", "yaw", "gripper"], "angles": ["yaw"]}
    assert state["features"]["observation.state"]["size"] == 6 and state["angle_unit"] == "rad"
    assert state["window_frames"] == WINDOW and state["model_channels"][5:7] == ["sin(yaw)", "cos(yaw)"]
    assert "state" in meta["observation"] and "sensor" not in meta["observation"] and meta["lerobot"] is None
    image = {"observation.images.top": np.zeros((48, 64, 3), dtype=np.uint8)}
    raw = _raw_state(pose_data, 0, 5, WINDOW)
    cases = [
        ({"state": {**raw, "observation.pose": raw["observation.pose"][:, :6]}},
         "'state.observation.pose': expected (T, 7) rows"),
        ({"state": {"observation.pose": raw["observation.pose"]}}, "missing feature 'observation.state' (6 values"),
        ({"state": {**raw, "observation.velocity": raw["observation.state"]}}, "unknown feature 'observation.velocity'"),
        ({"state": {**raw, "observation.state": raw["observation.state"][:2]}}, "the same number of frames"),
        ({"sensor": np.zeros((WINDOW, ds.sensor_channels), np.float32)},  # a guessed window: refused, not misread
         "'sensor': this policy makes its sensor window from raw features itself; send 'state'"),
        ({"state": raw, "sensor_pad": 1}, "'sensor_pad': give 'state' (raw features) or 'sensor_pad', not both"),
    ]
    for extra, message in cases:
        with pytest.raises(BadRequest, match=message.replace("(", r"\(").replace(")", r"\)")):
            spec.parse({"images": image, "prompt": "x", **extra}, torch.Generator())
    # One frame as a (D,) array is a one-frame history.
    request = spec.parse({"images": image, "prompt": "x", "state": {k: v[-1] for k, v in raw.items()}},
                         torch.Generator())
    assert request.sensor_pad == WINDOW - 1


def test_a_policy_without_a_recorded_transform_keeps_the_window_contract(pose_data, tiny_backbone_dir):
    """Older policies (and sensor-file ones) take the window; a 'state' request is refused."""
    ds = _dataset(pose_data, "raw")
    stats = compute_norm_stats(ds)
    stats.sensor_transform = None  # as exported before vla_ds recorded it
    policy = build_policy(tiny_backbone_dir, NormStats.from_dict(stats.to_dict()), ds.sensor_channels, window=WINDOW, num_views=1)
    assert policy.sensor_transform is None
    spec = observation_spec(policy, views=["observation.images.top"])
    image = {"observation.images.top": np.zeros((48, 64, 3), dtype=np.uint8)}
    window = ds[5][SENSOR_WINDOW]
    assert np.array_equal(spec.parse({"images": image, "prompt": "x", "sensor": window}, torch.Generator()).sensor, window)
    with pytest.raises(BadRequest, match="not made from named raw features; send 'sensor'"):
        spec.parse({"images": image, "prompt": "x", "state": _raw_state(pose_data, 0, 5, WINDOW)},
                   torch.Generator())
    with pytest.raises(ValueError, match="not made from named raw features"):
        policy.state_window(_raw_state(pose_data, 0, 5, WINDOW))


def test_evaluation_data_must_make_the_policys_window(pose_data, tiny_backbone_dir):
    """evaluate.py and predict.py cut windows from recorded data with the reader's settings; data
    whose raw features make other channels (here: sin/cos yaw vs raw yaw) is refused by name."""
    from vla_ds.errors import ConfigError
    from vla_ds.policy_tools.evaluate import check_sensor_transform

    trained = _dataset(pose_data, "sincos")
    policy = build_policy(tiny_backbone_dir, compute_norm_stats(trained), trained.sensor_channels, window=WINDOW,
                          num_views=1)
    check_sensor_transform(policy, trained, "same data")  # the training data passes
    with pytest.raises(ConfigError, match=r"other data: its sensor features make the channels .*yaw, gripper.* but "
                                          r"the policy was trained on .*sin\(yaw\), cos\(yaw\)"):
        check_sensor_transform(policy, _dataset(pose_data, "raw"), "other data")


def test_sources_that_name_components_differently_make_one_layout():
    """Two LeRobot sources whose info.json name the same components differently (or not at all)
    make the same windows: one transform is recorded. Another order or encoding is refused."""
    from types import SimpleNamespace

    from vla_ds.data.normalize import _sensor_transform
    from vla_ds.data.observation import SensorTransform
    from vla_ds.errors import DatasetError

    named = SensorTransform((("observation.state", ("x", "y", "yaw")),), (("observation.state", 2),), "sincos", "rad")
    unnamed = SensorTransform((("observation.state", ("s0", "s1", "s2")),), (("observation.state", 2),), "sincos", "rad")
    other = SensorTransform((("observation.state", ("x", "y", "yaw")),), (("observation.state", 2),), "raw", "rad")
    streams = [SimpleNamespace(transform=t, path=f"src{i}/data.parquet") for i, t in enumerate((named, unnamed))]
    assert _sensor_transform(streams) == named.to_dict()
    with pytest.raises(DatasetError, match=r"src0/data.parquet and src2/data.parquet: .* made differently"):
        _sensor_transform([*streams, SimpleNamespace(transform=other, path="src2/data.parquet")])
    # Mixed with a sensor file: no raw-state contract (the window contract, as before).
    assert _sensor_transform([*streams, SimpleNamespace(transform=None, path="ep/sensor_data.npz")]) is None


def test_resuming_on_data_that_makes_other_windows_is_refused(pose_data, tiny_backbone_dir, tmp_path, capsys):
    """--resume (and Stage 2) keep the checkpoint's transform: data whose features make the same
    number of channels differently (raw angles where the run unwrapped them) is refused in one
    line before anything starts."""
    from vla_ds.training.train import main

    common = ["--ds_config", str(Path(__file__).resolve().parent.parent / "ds_configs" / "stage1.json"), "--dataset_dir", str(pose_data.root), "--vl-model",
              str(tiny_backbone_dir), "--model-preset", "tiny", "--sensor-window-size", str(WINDOW),
              "--num_workers", "0", "--batch_size", "4", "--max_steps", "1", "--output_dir", str(tmp_path / "run"),
              "--set", "train.progress_bar=false", "--set", 'data.lerobot.sensor_features=["observation.pose"]',
              "--set", 'data.lerobot.sensor_angles=["observation.pose:yaw"]']
    assert main([*common, "--set", "data.lerobot.sensor_angle_encoding=unwrap"]) == 0
    capsys.readouterr()
    assert main([*common, "--set", "data.lerobot.sensor_angle_encoding=raw", "--max_steps", "2",
                 "--resume", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "its sensor features make the channels" in err and "unwrapped(yaw)" in err and "Traceback" not in err
