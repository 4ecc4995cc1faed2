"""The dataset index: built once per dataset, reused, updated per changed episode, split across
ranks, memory-mapped; and the same samples as indexing in memory."""

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from data_helpers import write_episode, write_mixture

import vla_ds.data.index as index_lib
from vla_ds.data.dataset import DataConfig, VLADataset, split_train_val
from vla_ds.data.episodes import load_episode
from vla_ds.errors import DatasetError

KEYS = ("sensor_window", "sensor_pad", "has_sensor", "actions", "action_is_pad", "confidence", "episode_index",
        "frame_time", "instruction")


def make_dataset(root, n=5):
    rng = np.random.default_rng(0)
    for e in range(n):
        t = np.round(np.arange(0, 31) * 0.1, 6)
        poses = np.cumsum(rng.normal(0, 2, (len(t), 6)), axis=0)
        sensor_t = np.arange(0, 3.0, 0.01)
        write_episode(root / ("A" if e % 2 else "B") / f"ep{e}", state_times=t, poses=poses,
                      gripper=rng.uniform(0, 1, len(t)), metadata={"instruction": f"task {e % 3}"},
                      sensor=(sensor_t, rng.normal(size=(len(sensor_t), 3)).astype(np.float32)), compressed=e == 3)
    return root


def cfg(root, **kw):
    kw.setdefault("sensor_window_size", 6)
    return DataConfig(dataset_dir=str(root), **kw)


def samples(ds):
    return [ds.get_item(i) for i in range(len(ds))]


def assert_same_samples(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for key in KEYS:
            np.testing.assert_array_equal(np.asarray(x[key]), np.asarray(y[key]), err_msg=key)
        assert all(np.array_equal(u, v) for u, v in zip(x["images"], y["images"]))


@pytest.fixture
def count_indexed(monkeypatch):
    """The episode folders indexed since the fixture started (each call of episode_row)."""
    seen = []
    real = index_lib.episode_row

    def spy(ep, config, resident=False):
        seen.append(ep.path.name)
        return real(ep, config, resident)

    monkeypatch.setattr(index_lib, "episode_row", spy)
    return seen


def test_index_gives_the_samples_of_an_in_memory_index(tmp_path):
    root = make_dataset(tmp_path / "ds")
    ds = VLADataset.from_config(cfg(root))
    assert ds._index.folder is not None and ds._index.folder.is_relative_to(os.environ["VLA_DS_CACHE"])
    assert isinstance(ds._index.sample_table("actions"), np.memmap)  # mapped, not held by the process
    dirs = sorted((root / s / f"ep{e}" for e in range(5) for s in "AB" if (root / s / f"ep{e}").is_dir()), key=str)
    in_memory = VLADataset(cfg(root), [load_episode(d, source=d.parent.name, index=i) for i, d in enumerate(dirs)])
    assert in_memory._index.folder is None
    assert_same_samples(samples(ds), samples(in_memory))
    # The split by episode is the one the episode-list split makes.
    train, val = split_train_val(ds, 0.4, seed=3)
    train_eps, val_eps = split_train_val(list(in_memory.episodes), 0.4, seed=3)
    assert [str(ep.path) for ep in val.episodes] == [str(ep.path) for ep in val_eps]
    assert [str(ep.path) for ep in train.episodes] == [str(ep.path) for ep in train_eps]
    assert_same_samples(samples(val), samples(in_memory.with_episodes(val_eps)))


def test_the_index_is_reused_and_only_changed_episodes_are_indexed_again(tmp_path, count_indexed):
    root = make_dataset(tmp_path / "ds")
    first = samples(VLADataset.from_config(cfg(root)))
    assert len(count_indexed) == 5
    count_indexed.clear()
    assert_same_samples(samples(VLADataset.from_config(cfg(root))), first)
    assert count_indexed == []  # reused as it is

    def change_states(episode: Path) -> None:
        csv = episode / "robot_states.csv"
        text = csv.read_text().splitlines()
        text[5] = ",".join([text[5].split(",")[0]] + ["9.5"] * (len(text[5].split(",")) - 1))
        csv.write_text("\n".join(text) + "\n")
        os.utime(csv, ns=(os.stat(csv).st_atime_ns, os.stat(csv).st_mtime_ns + 10**9))

    # One episode's robot states change: only it is indexed again, and its actions follow.
    change_states(root / "B" / "ep2")
    updated = VLADataset.from_config(cfg(root))
    assert count_indexed == ["ep2"]
    fresh = VLADataset.from_config(cfg(root, action_horizon=4))  # another data config: its own index, all new
    assert len(count_indexed) == 6 and len(fresh) >= len(updated)
    assert_same_samples(samples(updated), samples(VLADataset(cfg(root), updated.episodes[:])))  # = in memory
    assert not np.array_equal(updated._actions, np.stack([s["actions"] for s in first]))
    count_indexed.clear()

    # The first episode changes: its part's files come first and are moved into the new index,
    # the other rows appended; the index the dataset above maps is left as it was.
    kept = samples(updated)
    change_states(Path(updated.episodes[0].path))
    again = VLADataset.from_config(cfg(root))
    assert count_indexed == [Path(updated.episodes[0].path).name]
    assert_same_samples(samples(updated), kept)
    assert_same_samples(samples(again), samples(VLADataset(cfg(root), again.episodes[:])))
    assert not np.array_equal(again._actions, updated._actions)
    count_indexed.clear()

    # A new episode is indexed alone; a removed one is gone without indexing anything.
    write_episode(root / "A" / "ep9")
    assert len(VLADataset.from_config(cfg(root)).episodes) == 6 and count_indexed == ["ep9"]
    count_indexed.clear()
    (root / "A" / "ep9" / "metadata.json").unlink()
    assert len(VLADataset.from_config(cfg(root)).episodes) == 5 and count_indexed == []


def test_a_new_frame_or_mixture_weight_updates_the_index(tmp_path, count_indexed):
    root = make_dataset(tmp_path / "ds")
    before = VLADataset.from_config(cfg(root))
    count_indexed.clear()
    write_mixture(root, [("A", 3.0), ("B", 1.0)])
    mixed = VLADataset.from_config(cfg(root))
    assert count_indexed == [] and mixed.source_weights == {"A": 3.0, "B": 1.0}
    a = mixed.sample_source() == "A"
    assert mixed.sample_weights[a].sum() == pytest.approx(0.75)
    # A frame added to a view folder changes that folder: the episode is indexed again.
    from PIL import Image

    Image.new("RGB", (8, 8)).save(root / "A" / "ep1" / "images" / "front" / "2.050000.png")
    after = VLADataset.from_config(cfg(root))
    assert count_indexed == ["ep1"] and len(after) == len(before) + 1


def test_a_broken_episode_is_named_at_build_and_nothing_is_kept(tmp_path):
    root = make_dataset(tmp_path / "ds")
    csv = root / "A" / "ep1" / "robot_states.csv"
    good = csv.read_text()
    csv.write_text(good.replace("\n0.5", "\nnot-a-number", 1))
    folder = index_lib.index_folder(cfg(root))
    with pytest.raises(DatasetError, match=f"^{csv}: line 7: column 'timestamp' is 'not-a-number'"):
        VLADataset.from_config(cfg(root))
    assert not folder.exists() and not list(folder.parent.glob(f".{folder.name}*tmp"))
    assert not list(folder.parent.glob(f".{folder.name}.part*"))  # nor a part, nor its temporary folder
    csv.write_text(good)
    assert len(VLADataset.from_config(cfg(root)).episodes) == 5


def test_the_build_split_across_ranks_is_the_single_build(tmp_path):
    root = make_dataset(tmp_path / "ds")
    single = VLADataset.from_config(cfg(root))
    config = cfg(root, frame_stride=2)  # a key not built yet
    from vla_ds.data.dataset import scan_dataset

    plan = index_lib.Plan(config, scan_dataset(root)[0])
    assert not plan.current and len(plan.stale) == 5
    for rank in range(2):
        index_lib.build_part(plan, rank, world=2)
    merged = index_lib.merge_parts(plan, world=2)
    assert not list(plan.folder.parent.glob(f".{plan.folder.name}.part*"))  # parts removed
    strided = VLADataset.from_config(config, merged)
    assert len(strided) < len(single)
    assert_same_samples(samples(strided), samples(VLADataset(config, single.episodes[:])))
    assert index_lib.Plan(config, scan_dataset(root)[0]).current


@pytest.mark.parametrize("kernel_copy,move", [(True, True), (False, True), (True, False)])
def test_the_written_tables_are_the_in_memory_tables(tmp_path, monkeypatch, kernel_copy, move):
    """Tables are streamed to their files in chunks (here a few rows each); a part's file is
    moved into the index whole where its rows come first (``move``; else copied), the other
    rows joined by copy_file_range (or, where a file system refuses it, through memory), by
    one rank and merged from two: the same dtypes, shapes and values as concatenating the
    episodes' rows, an episode with fewer views padded as in memory."""
    monkeypatch.setattr(index_lib, "WRITE_CHUNK_BYTES", 64)
    copied = []
    copy_bytes = index_lib._copy_bytes
    monkeypatch.setattr(index_lib, "_copy_bytes", lambda src, *a: copied.append(src.path.name) or copy_bytes(src, *a))
    if not move:
        monkeypatch.setattr(index_lib, "_takes_whole", lambda *a: False)
    if not kernel_copy:
        import errno

        def refuse(*args):
            raise OSError(errno.EXDEV, "Invalid cross-device link")

        monkeypatch.setattr(os, "copy_file_range", refuse)
    root = make_dataset(tmp_path / "ds")
    write_episode(root / "A" / "ep7", frame_times={"front": list(np.round(np.arange(0, 21) * 0.1, 6))},
                  metadata={"camera_views": ["front"]})
    from vla_ds.data.dataset import scan_dataset

    pairs = scan_dataset(root)[0]
    config = cfg(root)
    episodes = [ep for path, source in pairs for ep in index_lib.load_unit(path, source, config)]
    expected = index_lib.DatasetIndex.from_episodes(episodes, config)
    assert expected.tables["sample.frames"].shape[1] == 2 and (expected.tables["sample.frames"] == -1).any()
    single = index_lib.open_index(config, pairs)
    # One rank's index is its part's files, moved, none copied (a table rewritten, as the frames
    # of the episode with fewer views or the recoded episode.source, is written from memory).
    assert copied == [] if move else {"sample.time.npy", "sample.actions.npy", "meta.npy"} <= set(copied)
    plan = index_lib.Plan(cfg(root, frame_stride=1, view_tolerance_s=config.view_tolerance_s * 1.5), pairs)
    expected_plan = index_lib.DatasetIndex.from_episodes(episodes, plan.config)
    for rank in range(2):
        index_lib.build_part(plan, rank, world=2)
    merged = index_lib.merge_parts(plan, world=2)
    # Each unit its own part: the part of the episode with fewer views is narrower than the
    # others, and its rows are widened in the merge as in memory (frames with -1).
    each_config = cfg(root, action_horizon=3)
    each_plan = index_lib.Plan(each_config, pairs)
    for rank in range(len(pairs)):
        index_lib.build_part(each_plan, rank, world=len(pairs))
    each = index_lib.merge_parts(each_plan, world=len(pairs))
    expected_each = index_lib.DatasetIndex.from_episodes(episodes, each_config)
    for built, want in ((single, expected), (merged, expected_plan), (each, expected_each)):
        assert isinstance(built.tables["sample.actions"], np.memmap)
        assert set(built.tables) == set(want.tables)
        for name, table in want.tables.items():
            assert built.tables[name].dtype == table.dtype, name
            np.testing.assert_array_equal(built.tables[name], table, err_msg=name)


def test_workers_and_pickles_carry_the_index_folder_not_its_tables(tmp_path):
    root = make_dataset(tmp_path / "ds", n=3)
    ds = VLADataset.from_config(cfg(root))
    blob = pickle.dumps(ds)
    assert len(blob) < 20_000  # the folder's name, not the mapped tables
    again = pickle.loads(blob)
    assert isinstance(again._index.sample_table("time"), np.memmap)
    assert_same_samples(samples(again), samples(ds))


def test_an_unwritable_cache_indexes_in_memory(tmp_path, monkeypatch, caplog):
    root = make_dataset(tmp_path / "ds", n=2)
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("VLA_DS_CACHE", str(tmp_path / "file"))
    ds = VLADataset.from_config(cfg(root))
    assert ds._index.folder is None and len(ds.episodes) == 2
    assert any("cannot write the dataset index" in r.getMessage() for r in caplog.records)


def test_a_lerobot_dataset_is_indexed_once_with_its_frame_columns_mapped(tmp_path, count_indexed):
    from lerobot_writer import write_lerobot_dataset

    from vla_ds.data.dataset import load_episodes
    from vla_ds.data.lerobot import LeRobotConfig, LeRobotEpisode

    written = write_lerobot_dataset(tmp_path / "lr", version="v3.0", codec="h264", num_episodes=3,
                                    lengths=[12, 9, 15], episodes_per_file=2)
    config = cfg(written.root, sensor_window_size=3, action_horizon=4,
                 lerobot=LeRobotConfig(sensor_features=["observation.state"]))
    ds = VLADataset.from_config(config)
    assert len(count_indexed) == 3
    count_indexed.clear()
    again = VLADataset.from_config(config)
    assert count_indexed == [] and len(again) == 36
    ep = again.episodes[1]
    assert isinstance(ep, LeRobotEpisode) and ep.entry.index == 1
    assert isinstance(ep.timestamps.base, np.memmap) or isinstance(ep.timestamps, np.memmap)
    in_memory = VLADataset(config, load_episodes([(written.root, "lr")], lerobot=config.lerobot))
    assert in_memory._index.folder is None
    assert_same_samples(samples(again), samples(in_memory))
    assert_same_samples(samples(ds), samples(again))


def test_a_dead_builds_leftovers_are_swept_and_a_live_ones_kept(tmp_path):
    root = make_dataset(tmp_path / "ds", n=2)
    folder = index_lib.index_folder(cfg(root))
    folder.parent.mkdir(parents=True, exist_ok=True)
    dead, live = folder.parent / f".{folder.name}.dead.tmp", folder.parent / f".{folder.name}.live.tmp"
    dead_part = folder.parent / f".{folder.name}.part1.29500"  # a rank's share of a job that died
    for d in (dead, live, dead_part):
        d.mkdir()
        (d / "sample.time.npy").write_bytes(b"")
    old = os.stat(dead).st_mtime - 2 * index_lib.STALE_BUILD_S
    os.utime(dead, (old, old))
    os.utime(dead_part, (old, old))
    VLADataset.from_config(cfg(root))
    assert not dead.exists() and not dead_part.exists() and live.is_dir()


def test_threads_only_where_they_are_faster(monkeypatch):
    """After one chunk alone untimed (it pays the imports), one alone timed and a few on threads,
    the rest runs on threads only when those were 1.5x as fast per item (reading waits, as on a
    network file system), else in the caller's thread (parsing holds the GIL); the order is kept
    either way. The two trials' times are given here, so that the decision does not depend on
    this machine's load."""
    import threading
    from types import SimpleNamespace

    def tag(chunk):
        return [(v, threading.current_thread().name) for v in chunk]

    chunks = [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10], [11, 12], [13]]  # 2 alone, 3 on trial, 3 left
    me = threading.current_thread().name
    for threaded_s, threaded in ((0.7, False), (0.6, True), (1.0, False)):  # s per item; alone: 1.0
        clock = iter([0.0, 2.0, 10.0, 10.0 + 6 * threaded_s])  # before and after each trial
        monkeypatch.setattr(index_lib, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
        out = [row for part in index_lib.map_chunks(tag, chunks, threads=3) for row in part]
        assert [v for v, _ in out] == list(range(14))
        assert {name for _, name in out[:4]} == {me} and me not in {name for _, name in out[4:10]}  # the trials
        assert (me not in {name for _, name in out[10:]}) == threaded, threaded_s