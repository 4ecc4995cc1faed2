"""The generated demo dataset loads through the real dataset code and is learnable."""

import time

import numpy as np
import pytest

from vla_ds.data.dataset import DataConfig, VLADataset, split_train_val
from vla_ds.data.demo import (
    ANGULAR_SPEED,
    FRAME_HZ,
    LINEAR_SPEED,
    SENSOR_WINDOW,
    main,
    make_demo_dataset,
)
from vla_ds.data.episodes import load_episode
from vla_ds.errors import DatasetError


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "data"
    start = time.perf_counter()
    make_demo_dataset(out)
    elapsed = time.perf_counter() - start
    ds = VLADataset.from_config(DataConfig(dataset_dir=str(out), sensor_window_size=SENSOR_WINDOW))
    return out, ds, elapsed


def test_demo_is_fast_and_loads(demo):
    out, ds, elapsed = demo
    assert elapsed < 3.0
    assert sorted({ep.source for ep in ds.episodes}) == ["Needle_insertion_eye_trocar", "White_silicone_white_circle"]
    assert ds.source_weights == {"Needle_insertion_eye_trocar": 3.0, "White_silicone_white_circle": 2.0}
    assert ds.sensor_channels == 16 and ds.num_views == 2 and len(ds.episodes) == 7
    n_front = sum(len(list((ep.path / "images" / "front").iterdir())) for ep in ds.episodes)
    assert len(ds) == n_front and 7 * 40 <= n_front <= 7 * 60 and not ds.invalid_samples
    assert not ds.out_of_range_frames  # robot states cover every frame
    sensors = [ep.sensor for ep in ds.episodes if ep.sensor is not None]
    assert len(sensors) == 4
    assert any(s.is_windows for s in sensors) and any(not s.is_windows for s in sensors)
    assert any(s.compressed for s in sensors)
    confidences = {ep.confidence for ep in ds.episodes}
    assert 1.0 in confidences and len(confidences) > 1
    assert {ep.instruction for ep in ds.episodes} == {"Insert the needle into the eye trocar",
                                                      "White silicone white circle"}
    suffixes = {p.suffix for ep in ds.episodes for p in (ep.path / "images" / "wrist").iterdir()}
    assert suffixes == {".jpg", ".png"}
    s = ds[0]
    assert [img.shape for img in s["images"]] == [(48, 64, 3), (48, 64, 3)]
    assert s["sensor_window"].shape == (SENSOR_WINDOW, 16) and s["has_sensor"]
    train, val = split_train_val(ds, 0.1, seed=0)
    assert len(train.episodes) == 6 and len(val.episodes) == 1


def test_demo_pose_r_wraps(demo):
    _, ds, _ = demo
    for ep in ds.episodes:
        r = np.loadtxt(ep.path / "robot_states.csv", delimiter=",", skiprows=1, usecols=6)
        assert r.max() > 170 and r.min() < -170  # crosses +-180 in the file
        assert np.abs(np.diff(load_episode(ep.path).states.poses[:, 5])).max() < 5  # unwrapped on load


def test_demo_actions_predictable_from_sensor(demo):
    _, ds, _ = demo
    scale = np.array([LINEAR_SPEED] * 3 + [ANGULAR_SPEED] * 3) / FRAME_HZ
    actions, predicted = [], []
    for i in range(len(ds)):
        s = ds.get_item(i, with_images=False)
        if s["has_sensor"] and not s["action_is_pad"][0]:
            actions.append(s["actions"][0, :6])
            predicted.append(s["sensor_window"][-1, :6] * scale)  # current velocity x step length
    actions, predicted = np.array(actions), np.array(predicted)
    assert len(actions) > 150
    for d in range(6):
        assert np.corrcoef(actions[:, d], predicted[:, d])[0, 1] > 0.95


def test_demo_deterministic_and_refuses_to_clobber(tmp_path):
    a = make_demo_dataset(tmp_path / "a", episodes_per_source=(1, 1), seed=3)
    b = make_demo_dataset(tmp_path / "b", episodes_per_source=(1, 1), seed=3)
    rel = "Needle_insertion_eye_trocar/episode_000/robot_states.csv"
    assert (a / rel).read_bytes() == (b / rel).read_bytes()
    with pytest.raises(DatasetError, match="not empty"):
        make_demo_dataset(a)
    make_demo_dataset(a, episodes_per_source=(1, 1), seed=4, overwrite=True)
    assert (a / rel).read_bytes() != (b / rel).read_bytes()
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "precious.txt").write_text("x")
    with pytest.raises(DatasetError, match="not a demo dataset"):
        make_demo_dataset(tmp_path / "user", overwrite=True)
    assert (tmp_path / "user" / "precious.txt").exists()


def test_cli_names_an_output_it_cannot_write(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main([str(blocker / "demo")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {blocker / 'demo'}: cannot write the demo dataset (Not a directory)"
