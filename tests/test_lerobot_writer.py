"""Checks of the LeRobot dataset test writer (tests/lerobot_writer.py) against the LeRobot
on-disk format itself - not against any reader. Fast: tiny images, a few episodes."""

import io
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("av")  # PyAV and pyarrow: the LeRobot reader's dependencies
pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq
from lerobot_writer import (
    DEFAULT_FEATURES,
    decode_video_frames,
    lerobot_pyav_decode,
    mean_abs_error,
    video_duration_s,
    write_lerobot_dataset,
)
from PIL import Image

# Codec error budget: the writer's flat-colour frames decode to within ~2.5 grey levels on average
# (colour conversion + chroma upsampling + lossy coding); distinct frames differ by >40.
MAX_CODEC_MAE = 8.0
MIN_DISTINCT_MAE = 25.0


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module", params=["av1", "h264"])
def v30(request, tmp_path_factory):
    return write_lerobot_dataset(tmp_path_factory.mktemp("v30") / request.param, version="v3.0", codec=request.param)


@pytest.fixture(scope="module", params=["av1", "h264"])
def v21(request, tmp_path_factory):
    return write_lerobot_dataset(tmp_path_factory.mktemp("v21") / request.param, version="v2.1", codec=request.param)


def _check_data_table(table: pa.Table, ds, episodes) -> None:
    """Columns, arrow types and values of data rows belonging to ``episodes``."""
    feats = ds.features
    expected_cols = [k for k, ft in feats.items() if ft["dtype"] != "video"]
    assert table.column_names == expected_cols
    assert table.schema.field("timestamp").type == pa.float32()
    for k in ("frame_index", "episode_index", "index", "task_index"):
        assert table.schema.field(k).type == pa.int64()
    for name in ("action", "observation.state"):
        t = table.schema.field(name).type
        assert pa.types.is_fixed_size_list(t) and t.list_size == feats[name]["shape"][0]
        assert t.value_type == pa.float32()
    hf = json.loads(table.schema.metadata[b"huggingface"])["info"]["features"]
    assert hf["action"]["_type"] == ("Sequence" if ds.version == "v2.1" else "List")
    ep_col = table.column("episode_index").to_numpy()
    for ep in episodes:
        m = ep_col == ep.episode_index
        assert m.sum() == ep.length
        np.testing.assert_array_equal(table.column("index").to_numpy()[m], ep.index)
        np.testing.assert_array_equal(table.column("frame_index").to_numpy()[m], np.arange(ep.length))
        np.testing.assert_array_equal(table.column("timestamp").to_numpy()[m], ep.timestamps)
        np.testing.assert_array_equal(table.column("task_index").to_numpy()[m], ep.task_index)
        for name, values in ep.columns.items():
            got = np.asarray(table.column(name).filter(pa.array(m)).to_pylist(), dtype=values.dtype)
            np.testing.assert_array_equal(got, values)


def _check_frames(ds, cam, ep, video_path: Path) -> None:
    pts, frames = decode_video_frames(video_path)
    for k in range(ep.length):
        q = ep.video_from_timestamp[cam] + float(ep.timestamps[k])
        j = int(np.argmin(np.abs(pts - q)))
        assert abs(pts[j] - q) <= 1e-4, (cam, ep.episode_index, k, pts[j], q)
        assert mean_abs_error(frames[j], ep.frames[cam][k]) < MAX_CODEC_MAE
        if k > 0:  # neighbouring frames must be told apart easily
            assert mean_abs_error(frames[j], ep.frames[cam][k - 1]) > MIN_DISTINCT_MAE


# --------------------------------------------------------------------------------------------
# v2.1
# --------------------------------------------------------------------------------------------


def test_v21_metadata(v21):
    root = v21.root
    info = json.loads((root / "meta/info.json").read_text())
    assert info["codebase_version"] == "v2.1"
    n = len(v21.episodes)
    assert info["total_episodes"] == n and info["total_frames"] == v21.total_frames == sum([12, 9, 15])
    assert info["total_tasks"] == len(v21.tasks) == 2
    assert info["total_videos"] == n * 2 and info["total_chunks"] == 1 and info["chunks_size"] == 1000
    assert info["splits"] == {"train": f"0:{n}"} and info["fps"] == 10
    assert "{episode_chunk" in info["data_path"] and "{video_key}" in info["video_path"]
    for k, ft in DEFAULT_FEATURES.items():
        assert info["features"][k] == ft
    cam = info["features"]["observation.images.top"]
    assert cam["dtype"] == "video" and cam["shape"] == [48, 64, 3]
    assert cam["names"] == ["height", "width", "channels"]
    assert cam["info"]["video.codec"] == v21.codec and cam["info"]["video.pix_fmt"] == "yuv420p"
    assert cam["info"]["video.fps"] == 10 and cam["info"]["video.is_depth_map"] is False
    assert info["features"]["action"]["names"][0] == "shoulder_pan.pos"

    eps = _read_jsonl(root / "meta/episodes.jsonl")
    assert [e["length"] for e in eps] == [ep.length for ep in v21.episodes]
    assert [e["tasks"] for e in eps] == [[ep.task] for ep in v21.episodes]
    tasks = _read_jsonl(root / "meta/tasks.jsonl")
    assert [(t["task_index"], t["task"]) for t in tasks] == list(enumerate(v21.tasks))
    assert not (root / "meta/stats.json").exists()

    stats = _read_jsonl(root / "meta/episodes_stats.jsonl")
    for line, ep in zip(stats, v21.episodes):
        assert line["episode_index"] == ep.episode_index
        st = line["stats"]
        assert set(st) == {k for k in info["features"]}
        img = st["observation.images.wrist"]
        assert np.asarray(img["mean"]).shape == (3, 1, 1)
        assert 0.0 <= np.min(img["min"]) and np.max(img["max"]) <= 1.0
        np.testing.assert_allclose(
            np.asarray(img["mean"]).ravel(), ep.frames["observation.images.wrist"].reshape(-1, 3).mean(0) / 255
        )
        act = st["action"]
        np.testing.assert_allclose(act["mean"], ep.columns["action"].mean(0), rtol=1e-5)
        assert act["count"] == [ep.length] and st["index"]["min"] == [ep.dataset_from_index]


def test_v21_files_follow_templates(v21):
    info = v21.info
    for ep in v21.episodes:
        rel = info["data_path"].format(episode_chunk=ep.episode_index // 1000, episode_index=ep.episode_index)
        assert Path(rel) == ep.data_file
        table = pq.read_table(v21.root / rel)
        _check_data_table(table, v21, [ep])
        for cam in v21.video_keys:
            vrel = info["video_path"].format(
                episode_chunk=ep.episode_index // 1000, video_key=cam, episode_index=ep.episode_index
            )
            assert (v21.root / vrel).is_file()
            assert video_duration_s(v21.root / vrel) == pytest.approx(ep.length / v21.fps, abs=1e-6)
            _check_frames(v21, cam, ep, v21.root / vrel)


# --------------------------------------------------------------------------------------------
# v3.0
# --------------------------------------------------------------------------------------------


def test_v30_metadata(v30):
    root = v30.root
    info = json.loads((root / "meta/info.json").read_text())
    assert info["codebase_version"] == "v3.0"
    assert "total_videos" not in info and "total_chunks" not in info
    assert info["data_files_size_in_mb"] == 100 and info["video_files_size_in_mb"] == 200
    assert info["data_path"] == "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
    assert info["video_path"] == "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
    assert info["total_frames"] == v30.total_frames and info["total_episodes"] == 3
    for ft in info["features"].values():
        assert ("fps" in ft) == (ft["dtype"] != "video")
    vinfo = info["features"]["observation.images.top"]["info"]
    assert vinfo["video.codec"] == v30.codec and vinfo["is_depth_map"] is False and vinfo["video.g"] == 2

    tasks = pq.read_table(root / "meta/tasks.parquet")
    assert tasks.column_names == ["task_index", "task"]
    assert tasks.column("task").to_pylist() == v30.tasks
    assert tasks.column("task_index").to_pylist() == list(range(len(v30.tasks)))
    assert json.loads(tasks.schema.metadata[b"pandas"])["index_columns"] == ["task"]

    stats = json.loads((root / "meta/stats.json").read_text())
    assert stats["index"]["count"] == [v30.total_frames]
    assert stats["index"]["min"] == [0] and stats["index"]["max"] == [v30.total_frames - 1]
    assert np.asarray(stats["observation.images.top"]["q50"]).shape == (3, 1, 1)
    all_actions = np.concatenate([ep.columns["action"] for ep in v30.episodes])
    np.testing.assert_allclose(stats["action"]["mean"], all_actions.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["action"]["std"], all_actions.std(0), rtol=1e-3, atol=1e-5)


def test_v30_episode_rows_and_data_files(v30):
    files = sorted((v30.root / "meta/episodes").glob("*/*.parquet"))
    assert [f.relative_to(v30.root).as_posix() for f in files] == ["meta/episodes/chunk-000/file-000.parquet"]
    rows = pq.read_table(files[0]).to_pylist()
    assert [r["episode_index"] for r in rows] == [0, 1, 2]
    prev_to = 0
    for r, ep in zip(rows, v30.episodes):
        assert r["tasks"] == [ep.task] and r["length"] == ep.length
        assert r["dataset_from_index"] == prev_to and r["dataset_to_index"] - r["dataset_from_index"] == r["length"]
        prev_to = r["dataset_to_index"]
        assert (r["meta/episodes/chunk_index"], r["meta/episodes/file_index"]) == (0, 0)
        assert r["stats/action/count"] == [ep.length]
        assert np.asarray(r["stats/observation.images.top/mean"]).shape == (3, 1, 1)
        # episodes_per_file=2: eps 0,1 in file-000, ep 2 in file-001
        assert (r["data/chunk_index"], r["data/file_index"]) == (0, ep.episode_index // 2)
        rel = v30.info["data_path"].format(chunk_index=r["data/chunk_index"], file_index=r["data/file_index"])
        assert Path(rel) == ep.data_file
        table = pq.read_table(v30.root / rel)
        idx = table.column("index").to_numpy()
        sel = (idx >= r["dataset_from_index"]) & (idx < r["dataset_to_index"])
        assert (table.column("episode_index").to_numpy()[sel] == ep.episode_index).all()
        _check_data_table(table, v30, [ep])
    assert prev_to == v30.total_frames
    # one row group per episode (DatasetWriter: one write_table per episode)
    assert pq.ParquetFile(v30.root / "data/chunk-000/file-000.parquet").num_row_groups == 2
    assert pq.read_table(v30.root / "data/chunk-000/file-000.parquet").column("index").to_pylist() == list(range(21))


def test_v30_video_timestamps_and_frames(v30):
    rows = pq.read_table(v30.root / "meta/episodes/chunk-000/file-000.parquet").to_pylist()
    for cam in v30.video_keys:
        prev = None
        for r, ep in zip(rows, v30.episodes):
            frm, to = r[f"videos/{cam}/from_timestamp"], r[f"videos/{cam}/to_timestamp"]
            fidx = r[f"videos/{cam}/file_index"]
            assert fidx == ep.episode_index // 2
            if prev is not None and prev[0] == fidx:
                assert frm == prev[1]
            else:
                assert frm == 0.0
            assert to - frm == pytest.approx(ep.length / v30.fps, abs=1e-6)
            assert (frm, to) == (ep.video_from_timestamp[cam], ep.video_to_timestamp[cam])
            prev = (fidx, to)
            rel = v30.info["video_path"].format(
                video_key=cam, chunk_index=r[f"videos/{cam}/chunk_index"], file_index=fidx
            )
            assert Path(rel) == ep.video_files[cam]
            _check_frames(v30, cam, ep, v30.root / rel)
    # the concatenated file lasts exactly as long as its episodes
    f0 = v30.root / v30.info["video_path"].format(video_key=cam, chunk_index=0, file_index=0)
    assert video_duration_s(f0) == pytest.approx(rows[1][f"videos/{cam}/to_timestamp"], abs=1e-6)


def test_v30_lerobot_style_seek_decode(v30):
    """LeRobot's PyAV path (seek to keyframe, decode forward, nearest pts within 1e-4 s) finds the
    written frames in the concatenated mp4, e.g. the second episode of file-000."""
    cam = "observation.images.wrist"
    ep = v30.episodes[1]
    ks = [0, 4, ep.length - 1]
    q = [ep.video_from_timestamp[cam] + float(ep.timestamps[k]) for k in ks]
    got = lerobot_pyav_decode(v30.root / ep.video_files[cam], q)
    for g, k in zip(got, ks):
        assert mean_abs_error(g, ep.frames[cam][k]) < MAX_CODEC_MAE


# --------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["v2.1", "v3.0"])
def test_image_dtype_embeds_png(tmp_path, version):
    ds = write_lerobot_dataset(tmp_path / "ds", version=version, camera_dtype="image", num_episodes=2)
    assert not list(ds.root.rglob("*.mp4"))
    assert ds.info["video_path"] is None
    ep = ds.episodes[1]
    table = pq.read_table(ds.root / ep.data_file)
    t = table.schema.field("observation.images.top").type
    assert t == pa.struct({"bytes": pa.binary(), "path": pa.string()})
    rows = table.filter(pa.compute.equal(table["episode_index"], 1)).column("observation.images.top").to_pylist()
    assert len(rows) == ep.length
    for k, cell in enumerate(rows):
        assert cell["path"] == (f"frame-{k:06d}.png" if version == "v3.0" else f"frame_{k:06d}.png")
        png = np.asarray(Image.open(io.BytesIO(cell["bytes"])))
        np.testing.assert_array_equal(png, ep.frames["observation.images.top"][k])
    hf = json.loads(table.schema.metadata[b"huggingface"])["info"]["features"]
    assert hf["observation.images.top"] == {"_type": "Image"}
    if version == "v3.0":
        names = pq.read_schema(ds.root / "meta/episodes/chunk-000/file-000.parquet").names
        assert not any(n.startswith("videos/") for n in names)
        assert "stats/observation.images.top/mean" in names


def test_chunk_and_file_rollover(tmp_path):
    ds = write_lerobot_dataset(
        tmp_path / "v3", version="v3.0", num_episodes=4, cameras=("observation.images.top",),
        episodes_per_file=1, video_episodes_per_file=3, meta_episodes_per_file=2, chunks_size=2, codec="h264",
    )
    rows = []
    for f in sorted((ds.root / "meta/episodes").glob("*/*.parquet")):
        rows += pq.read_table(f).to_pylist()
    rows.sort(key=lambda r: r["episode_index"])
    assert [(r["data/chunk_index"], r["data/file_index"]) for r in rows] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    cam = "observation.images.top"
    assert [(r[f"videos/{cam}/chunk_index"], r[f"videos/{cam}/file_index"]) for r in rows] == [
        (0, 0), (0, 0), (0, 0), (0, 1)
    ]
    assert rows[3][f"videos/{cam}/from_timestamp"] == 0.0 and rows[2][f"videos/{cam}/from_timestamp"] > 0
    assert [(r["meta/episodes/chunk_index"], r["meta/episodes/file_index"]) for r in rows] == [
        (0, 0), (0, 0), (0, 1), (0, 1)
    ]
    for ep in ds.episodes:
        assert (ds.root / ep.data_file).is_file() and (ds.root / ep.video_files[cam]).is_file()
    _check_frames(ds, cam, ds.episodes[2], ds.root / ds.episodes[2].video_files[cam])

    ds2 = write_lerobot_dataset(tmp_path / "v2", version="v2.1", num_episodes=3, chunks_size=2, cameras=(cam,))
    assert ds2.info["total_chunks"] == 2
    assert ds2.episodes[2].data_file.as_posix() == "data/chunk-001/episode_000002.parquet"
    assert ds2.episodes[2].video_files[cam].as_posix() == f"videos/chunk-001/{cam}/episode_000002.mp4"


def test_extra_features_and_task_switch(tmp_path):
    def switch(e, t):
        return ["reach"] * (t // 2) + ["grasp"] * (t - t // 2) if e == 1 else ["reach"] * t

    ds = write_lerobot_dataset(
        tmp_path / "ds", version="v3.0", cameras=(), action_dim=14, state_dim=14,
        extra_features={"observation.effort": 14, "next.reward": {"dtype": "float32", "shape": (1,)},
                        "next.done": {"dtype": "bool", "shape": (1,)}},
        frame_tasks=switch,
    )
    assert ds.info["video_path"] is None
    assert ds.features["action"]["names"][:2] == ["motor_0", "motor_1"]
    assert ds.tasks == ["reach", "grasp"]
    ep = ds.episodes[1]
    assert ep.tasks == ["reach", "grasp"] and set(ep.task_index.tolist()) == {0, 1}
    table = pq.read_table(ds.root / ep.data_file)
    assert table.schema.field("next.reward").type == pa.float32()
    assert table.schema.field("next.done").type == pa.bool_()
    assert table.schema.field("observation.effort").type.list_size == 14
    _check_data_table(table, ds, [e for e in ds.episodes if e.data_file == ep.data_file])
    rows = pq.read_table(ds.root / "meta/episodes/chunk-000/file-000.parquet").to_pylist()
    assert rows[1]["tasks"] == ["reach", "grasp"]
    # deterministic, smooth walks
    again = write_lerobot_dataset(tmp_path / "again", version="v2.1", cameras=(), action_dim=14, state_dim=14)
    np.testing.assert_array_equal(again.episodes[0].columns["action"], ds.episodes[0].columns["action"])
    assert np.abs(np.diff(ds.episodes[0].columns["action"], axis=0)).max() < 0.5
