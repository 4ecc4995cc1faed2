"""vla_ds's LeRobot v3.0 writer (vla_ds.data.lerobot_writer): what it writes, frame by frame,
is laid out as tests/lerobot_writer.py writes the same content (that reference follows
LeRobot's source), and vla_ds's reader reads it back."""

import json

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq
from lerobot_writer import DEFAULT_FEATURES, write_lerobot_dataset

from vla_ds.data.lerobot import LeRobotConfig, load_lerobot_episodes
from vla_ds.data.lerobot_writer import LeRobotDatasetWriter
from vla_ds.errors import DatasetError

MAX_CODEC_MAE = 8.0  # the reference frames decode within ~2.5 grey levels; distinct frames differ by > 40


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The same three episodes written by the reference writer and, frame by frame, by ours."""
    root = tmp_path_factory.mktemp("writer")
    ref = write_lerobot_dataset(root / "reference", version="v3.0", codec="h264", num_episodes=3, lengths=[7, 5, 9],
                                episodes_per_file=10, feature_fps=False, cameras=("observation.images.top",),
                                image_hw=(32, 48),
                                frame_tasks=lambda e, t: ["task A"] * (t // 2) + ["task B"] * (t - t // 2))
    features = {k: {"dtype": v["dtype"], "shape": v["shape"], "names": v["names"]}
                for k, v in ref.features.items() if k not in DEFAULT_FEATURES}
    writer = LeRobotDatasetWriter.create(root / "ours", fps=ref.fps, features=features, robot_type="so101_follower")
    for ep in ref.episodes:
        for k in range(ep.length):
            frame = {name: values[k] for name, values in ep.columns.items()}
            frame["observation.images.top"] = ep.frames["observation.images.top"][k]
            frame["task"] = ep.frame_tasks[k]
            writer.add_frame(frame)
        writer.save_episode()
    # A dropped episode leaves nothing behind.
    writer.add_frame({**frame, "task": "never saved"})
    writer.clear_episode_buffer()
    writer.finalize()
    return ref, root / "ours"


def test_layout_matches_the_reference_writer(pair):
    ref, ours = pair
    info = json.loads((ours / "meta/info.json").read_text())
    for key, value in ref.info.items():
        if key != "features":
            assert info[key] == value, key
    assert list(info["features"]) == list(ref.features)
    for key, spec in ref.features.items():
        got = dict(info["features"][key])
        if "info" in spec:  # the encoder settings differ on purpose (H.264 crf 23 / fast, no B-frames)
            differ = {"video.crf", "video.preset"}
            assert {k: v for k, v in got.pop("info").items() if k not in differ} == \
                   {k: v for k, v in spec["info"].items() if k not in differ}
            spec = {k: v for k, v in spec.items() if k != "info"}
        assert got == spec, key
    data = [pq.read_table(p / "data/chunk-000/file-000.parquet") for p in (ref.root, ours)]
    assert data[0].schema.equals(data[1].schema, check_metadata=False) and data[0].equals(data[1])
    hf = [json.loads(t.schema.metadata[b"huggingface"])["info"] for t in data]
    assert hf[0] == hf[1]
    episodes = [pq.read_table(p / "meta/episodes/chunk-000/file-000.parquet").to_pydict() for p in (ref.root, ours)]
    assert list(episodes[0]) == list(episodes[1])
    for column, values in episodes[0].items():
        assert episodes[1][column] == values, column  # indices, video spans, per-episode stats
    assert json.loads((ours / "meta/stats.json").read_text()) == json.loads((ref.root / "meta/stats.json").read_text())
    assert pq.read_table(ours / "meta/tasks.parquet").equals(pq.read_table(ref.root / "meta/tasks.parquet"))
    assert not list(ours.glob(".recording-*")), "the temporary episode files are removed"


def test_the_reader_reads_back_every_frame(pair):
    ref, ours = pair
    episodes = load_lerobot_episodes(ours, LeRobotConfig())
    assert [e.entry.length for e in episodes] == [e.length for e in ref.episodes]
    for episode, written in zip(episodes, ref.episodes):
        np.testing.assert_array_equal(episode.actions, written.columns["action"])
        assert [episode.instruction_at(float(t)) for t in written.timestamps] == written.frame_tasks
        for k in range(written.length):
            image = episode.decode_views(np.array([k]))[0]
            error = np.abs(image.astype(float) - written.frames["observation.images.top"][k]).mean()
            assert error < MAX_CODEC_MAE, (written.episode_index, k, error)


def test_bad_frames_and_places_are_refused_by_name(tmp_path):
    features = {"observation.state": {"dtype": "float32", "shape": [2], "names": ["a", "b"]},
                "cam": {"dtype": "video", "shape": [16, 16, 3], "names": ["height", "width", "channels"]}}
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(DatasetError, match="full: exists and is not an empty directory"):
        LeRobotDatasetWriter.create(tmp_path / "full", fps=10, features=features)
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    with pytest.raises(DatasetError, match="'cam'.*even"):
        LeRobotDatasetWriter.create(tmp_path / "odd", fps=10, features={"cam": {**features["cam"], "shape": [15, 16, 3]}})
    writer = LeRobotDatasetWriter.create(tmp_path / "new", fps=10, features=features)
    good = {"observation.state": np.zeros(2, np.float32), "cam": np.zeros((16, 16, 3), np.uint8), "task": "t"}
    with pytest.raises(DatasetError, match=r"missing \['cam'\]"):
        writer.add_frame({k: v for k, v in good.items() if k != "cam"})
    with pytest.raises(DatasetError, match=r"'observation.state' at episode 0 frame 0: expected shape \(2,\)"):
        writer.add_frame({**good, "observation.state": np.zeros(3)})
    with pytest.raises(DatasetError, match="'observation.state'.*NaN"):
        writer.add_frame({**good, "observation.state": np.array([0.0, np.nan])})
    with pytest.raises(DatasetError, match="'cam'.*uint8"):
        writer.add_frame({**good, "cam": np.zeros((16, 16, 3), np.float32)})
    with pytest.raises(DatasetError, match="save_episode with no frames"):
        writer.save_episode()
    writer.add_frame(good)
    writer.save_episode()
    writer.finalize()
    assert json.loads((tmp_path / "new/meta/info.json").read_text())["total_frames"] == 1
    with pytest.raises(DatasetError, match="finalized"):
        writer.add_frame(good)
