"""Finding and reading one episode directory (SPEC section 3)."""

import io
import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
from data_helpers import corrupt_compressed_member, write_csv, write_episode

from vla_ds.data.episodes import (
    SensorData,
    _states,
    find_episode_dirs,
    index_view_frames,
    load_episode,
    nearest_frames,
    read_metadata,
    read_robot_states,
    read_robot_states_many,
)
from vla_ds.errors import DatasetError

# ---------------------------------------------------------------- finding


def test_find_episode_dirs_any_depth_sorted_and_not_inside_episodes(tmp_path):
    for rel in ["b/ep1", "a/deep/er/ep0", "a/ep2", "c"]:
        (tmp_path / rel).mkdir(parents=True)
        (tmp_path / rel / "metadata.json").write_text("{}")
    (tmp_path / "c" / "images" / "nested").mkdir(parents=True)
    (tmp_path / "c" / "images" / "nested" / "metadata.json").write_text("{}")  # inside an episode: ignored
    (tmp_path / "not_an_episode").mkdir()
    found = [p.relative_to(tmp_path).as_posix() for p in find_episode_dirs(tmp_path)]
    assert found == ["a/deep/er/ep0", "a/ep2", "b/ep1", "c"]


def test_find_episode_dirs_missing_root(tmp_path):
    with pytest.raises(DatasetError, match="dataset directory not found"):
        find_episode_dirs(tmp_path / "nope")


# ---------------------------------------------------------------- metadata


def test_metadata_defaults(tmp_path):
    ep = tmp_path / "Needle_insertion_eye_trocar" / "ep0"
    (ep / "images" / "wrist").mkdir(parents=True)
    (ep / "images" / "front").mkdir(parents=True)
    (ep / "metadata.json").write_text("{}")
    meta = read_metadata(ep)
    assert meta.instruction == "Needle insertion eye trocar"
    assert meta.camera_views == ["front", "wrist"]
    assert (meta.action_type, meta.action_hz, meta.confidence) == ("delta_pose", 10.0, 1.0)


def test_metadata_explicit_values(tmp_path):
    ep = tmp_path / "x"
    ep.mkdir()
    (ep / "metadata.json").write_text(json.dumps({
        "instruction": "pick", "camera_views": ["wrist", "front"], "action": {"hz": 20}, "confidence": 0.5}))
    meta = read_metadata(ep)
    assert (meta.instruction, meta.camera_views, meta.action_hz, meta.confidence) == (
        "pick", ["wrist", "front"], 20.0, 0.5)


@pytest.mark.parametrize("content, message", [
    ('{"action": {"type": "joint_pos"}}', "unsupported action type 'joint_pos'"),
    ('{"action": {"hz": 0}}', "'hz' must be a positive number"),
    ('{"confidence": -1}', "'confidence' must be a number >= 0"),
    ('{"camera_views": []}', "'camera_views' must be a non-empty list"),
    ('{"instruction": 3}', "'instruction' must be a string"),
    ('{"instruction": ', "invalid JSON"),
    ('[1, 2]', "expected a JSON object"),
])
def test_metadata_errors_name_file(tmp_path, content, message):
    ep = tmp_path / "ep"
    (ep / "images" / "front").mkdir(parents=True)
    (ep / "metadata.json").write_text(content)
    with pytest.raises(DatasetError) as e:
        read_metadata(ep)
    assert str(e.value).startswith(f"{ep / 'metadata.json'}: ")
    assert message in str(e.value)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- robot states


def test_robot_states_columns_gripper_and_extra_ignored(tmp_path):
    path = write_csv(tmp_path / "robot_states.csv",
                     ["joint_1", "timestamp", "pose_x", "pose_y", "pose_z", "pose_a", "pose_b", "pose_r", "gripper"],
                     [[9, 0.0, 1, 2, 3, 4, 5, 6, 0.5], [9, 0.1, 1.5, 2, 3, 4, 5, 6, 0.25]])
    s = read_robot_states(path)
    np.testing.assert_array_equal(s.times, [0.0, 0.1])
    np.testing.assert_array_equal(s.poses, [[1, 2, 3, 4, 5, 6], [1.5, 2, 3, 4, 5, 6]])
    np.testing.assert_array_equal(s.gripper, [0.5, 0.25])


def test_robot_states_without_gripper(tmp_path):
    path = write_csv(tmp_path / "r.csv", ["timestamp", "pose_x", "pose_y", "pose_z", "pose_a", "pose_b", "pose_r"],
                     [[0, 0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0]])
    assert read_robot_states(path).gripper is None


def test_robot_states_angles_unwrapped(tmp_path):
    header = ["timestamp", "pose_x", "pose_y", "pose_z", "pose_a", "pose_b", "pose_r"]
    path = write_csv(tmp_path / "r.csv", header, [[0, 0, 0, 0, 179, -170, 0], [1, 0, 0, 0, -179, 170, 0],
                                                   [2, 0, 0, 0, -175, 160, 0]])
    poses = read_robot_states(path).poses
    np.testing.assert_allclose(poses[:, 3], [179, 181, 185])
    np.testing.assert_allclose(poses[:, 4], [-170, -190, -200])


def test_robot_states_missing_column(tmp_path):
    path = write_csv(tmp_path / "robot_states.csv", ["timestamp", "pose_x", "pose_y", "pose_a", "pose_b", "pose_r"],
                     [[0, 0, 0, 0, 0, 0]])
    with pytest.raises(DatasetError) as e:
        read_robot_states(path)
    assert str(e.value) == f"{path}: missing required column 'pose_z'"


@pytest.mark.parametrize("bad_row, message", [
    (["0.2", "nan", "0", "0", "0", "0", "0"], "line 4: column 'pose_x' is nan (NaN/inf not allowed)"),
    (["0.2", "0", "0", "inf", "0", "0", "0"], "line 4: column 'pose_z' is inf"),
    (["0.2", "0", "abc", "0", "0", "0", "0"], "line 4: column 'pose_y' is 'abc', not a number"),
    (["0.1", "0", "0", "0", "0", "0", "0"], "line 4: timestamp 0.1 does not increase"),
    (["0.2", "0", "0"], "line 4: 3 fields, expected 7"),
])
def test_robot_states_bad_rows_name_line_and_column(tmp_path, bad_row, message):
    header = ["timestamp", "pose_x", "pose_y", "pose_z", "pose_a", "pose_b", "pose_r"]
    path = write_csv(tmp_path / "robot_states.csv", header,
                     [["0.0"] + ["0"] * 6, ["0.1"] + ["0"] * 6, bad_row, ["0.3"] + ["0"] * 6])
    with pytest.raises(DatasetError) as e:
        read_robot_states(path)
    assert str(e.value).startswith(f"{path}: ")
    assert message in str(e.value)


def test_robot_states_empty_and_header_only(tmp_path):
    empty = tmp_path / "a.csv"
    empty.write_text("")
    with pytest.raises(DatasetError, match="empty file"):
        read_robot_states(empty)
    header_only = write_csv(tmp_path / "b.csv", ["timestamp", "pose_x", "pose_y", "pose_z", "pose_a", "pose_b",
                                                 "pose_r"], [])
    with pytest.raises(DatasetError, match="no data rows"):
        read_robot_states(header_only)


def test_robot_states_quoted_values_parse(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text('timestamp,pose_x,pose_y,pose_z,pose_a,pose_b,pose_r\n"0.0",1,2,3,4,5,6\n\n"0.5",2,2,3,4,5,6\n')
    s = read_robot_states(path)
    np.testing.assert_array_equal(s.times, [0.0, 0.5])
    np.testing.assert_array_equal(s.poses[:, 0], [1, 2])


def test_angles_are_unwrapped_exactly_as_numpy_unwraps_them():
    """The states' angle columns, bit for bit np.unwrap's (period 360), whether they jump by
    180 degrees or more somewhere (np.unwrap itself) or nowhere (the shortcut: +0.0)."""
    rng = np.random.default_rng(0)
    makers = [lambda n: rng.uniform(-180, 180, (n, 3)), lambda n: np.cumsum(rng.normal(0, 30, (n, 3)), 0),
              lambda n: rng.choice([-0.0, 0.0, 180.0, -180.0, 179.999, -179.5], (n, 3)),
              lambda n: np.round(rng.uniform(-200, 200, (n, 3)))]
    shortcut = 0
    for k in range(400):
        n = int(rng.integers(1, 30))
        angles = makers[k % 4](n)
        table = np.concatenate([np.cumsum(rng.random((n, 1)) + 0.01, 0), rng.normal(size=(n, 3)), angles], 1)
        expected = np.unwrap(table[:, 4:7], period=360.0, axis=0)
        assert _states(table).poses[:, 3:6].tobytes() == expected.tobytes(), k
        shortcut += bool((np.abs(np.diff(angles, axis=0)) < 180).all())
    assert 50 < shortcut < 350  # both ways were taken


def test_robot_states_many_same_arrays_as_one_by_one_and_leaves_the_rest(tmp_path):
    """The batched reader gives every plain file the bytes read_robot_states gives it, and
    returns None for any file read_robot_states must read itself (to parse it or name its line)."""
    rng = np.random.default_rng(0)
    header = ["timestamp", "pose_x", "pose_y", "pose_z", "pose_a", "pose_b", "pose_r", "gripper"]

    def table(n, ndigits):
        values = rng.standard_normal((n, 8)) * 10.0 ** rng.integers(-9, 9, (n, 8))
        values[:, 0] = 0.02 * np.arange(n) + rng.uniform(0, 1)
        values[:, 4:7] = rng.uniform(-180, 180, (n, 3))  # angles that wrap
        values[0, 1] = -0.0
        return [[f"{v:.{ndigits}g}" if ndigits else repr(float(v)) for v in row] for row in values]

    plain = [write_csv(tmp_path / "a.csv", header, table(50, 0)),
             write_csv(tmp_path / "b.csv", header, table(30, 6)),
             write_csv(tmp_path / "c.csv", header, table(1, 17)),
             write_csv(tmp_path / "d.csv", ["pose_x", "timestamp", "pose_y", "pose_z", "pose_a", "pose_b", "pose_r",
                                            "joint"], [[r[1], r[0], *r[2:]] for r in table(20, 9)]),
             write_csv(tmp_path / "e.csv", header[:7], [row[:7] for row in table(20, 0)])]
    bom = tmp_path / "f.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + (tmp_path / "a.csv").read_bytes().rstrip(b"\n"))  # BOM, no last newline
    plain.append(bom)
    rows = "0.0,0,0,0,0,0,0\n0.1,1,2,3,4,5,6\n"
    odd = {"quoted": '"0.0",1,2,3,4,5,6\n0.5,2,2,3,4,5,6\n', "crlf": rows.replace("\n", "\r\n"),
           "blank": rows.replace("\n", "\n\n", 1), "nan": rows + "0.2,nan,0,0,0,0,0\n",
           "backwards": rows + "0.05,0,0,0,0,0,0\n", "short": rows + "0.2,0,0\n", "word": rows + "0.2,x,0,0,0,0,0\n",
           "header_only": "", "latin1_column": "0.0,0,0,0,0,0,0,caf\xe9\n"}
    others = []
    for name, body in odd.items():
        others.append(tmp_path / f"{name}.csv")
        columns = header[:7] + (["note"] if name == "latin1_column" else [])
        others[-1].write_bytes((",".join(columns) + "\n" + body).encode("latin-1"))
    others += [write_csv(tmp_path / "no_pose_z.csv", ["timestamp", "pose_x", "pose_y"], [[0, 0, 0]]),
               tmp_path / "missing.csv"]
    order = [plain[0], others[0], plain[1], others[3], plain[2], others[4], plain[3], plain[4], *others[1:], plain[5]]
    many = read_robot_states_many(order)
    for path, states in zip(order, many):
        if path in plain:
            one = read_robot_states(path)
            for field in ("times", "poses", "gripper"):
                a, b = getattr(one, field), getattr(states, field)
                assert (a is None and b is None) or (a.dtype == b.dtype and a.tobytes() == b.tobytes()), (path, field)
        else:
            assert states is None, path
    assert sorted(p.name for p, st in zip(order, many) if st is not None) == sorted(p.name for p in plain)


# ---------------------------------------------------------------- images


def test_index_view_frames_sorted_ignores_other_files(tmp_path):
    for name in ["3.5.png", "1730000000.125000.jpg", "2.0.JPG", "notes.txt", ".DS_Store"]:
        (tmp_path / name).write_bytes(b"")
    times, names = index_view_frames(tmp_path)
    np.testing.assert_array_equal(times, [2.0, 3.5, 1730000000.125])
    assert [n.decode() for n in names] == ["2.0.JPG", "3.5.png", "1730000000.125000.jpg"]


def test_index_view_frames_one_suffix_as_name_by_name(tmp_path):
    """A camera's folder (every name with the same suffix) is cut in one pass over the names'
    join; the same times and names as the per-name path, also for names it must not cut."""
    from vla_ds.data.episodes import _stems_one_suffix

    names = ["10.25.jpg", "2.jpg", "1730000000.125000.jpg", "0.5.jpg"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    times, got = index_view_frames(tmp_path)
    np.testing.assert_array_equal(times, [0.5, 2.0, 10.25, 1730000000.125])
    assert [n.decode() for n in got] == ["0.5.jpg", "2.jpg", "10.25.jpg", "1730000000.125000.jpg"]
    assert _stems_one_suffix([n.encode() for n in names]) == [b"10.25", b"2", b"1730000000.125000", b"0.5"]
    assert _stems_one_suffix([b"1.jpg", b"2.png"]) is None  # two suffixes
    assert _stems_one_suffix([b"1.jpg", b"2.JPG"]) is None  # a capital: the per-name path lowers it
    assert _stems_one_suffix([b"1.jpg\n2.jpg"]) is None  # a name holding a newline is not two names
    assert _stems_one_suffix([b"1.jpg\n", b"2.jpg"]) is None
    (tmp_path / "3.0.jpg\n4.jpg").write_bytes(b"")  # so it is read name by name, and named
    with pytest.raises(DatasetError, match="image file name must be the capture time"):
        index_view_frames(tmp_path)


def test_index_view_frames_errors(tmp_path):
    (tmp_path / "frame_01.jpg").write_bytes(b"")
    with pytest.raises(DatasetError) as e:
        index_view_frames(tmp_path)
    assert str(e.value).startswith(f"{tmp_path / 'frame_01.jpg'}: image file name must be the capture time")
    (tmp_path / "frame_01.jpg").unlink()
    (tmp_path / "1.5.jpg").write_bytes(b"")
    (tmp_path / "1.500.png").write_bytes(b"")
    with pytest.raises(DatasetError, match="two frames with the same capture time"):
        index_view_frames(tmp_path)
    with pytest.raises(DatasetError, match="camera view folder not found"):
        index_view_frames(tmp_path / "missing")
    with pytest.raises(DatasetError, match="camera view folder not found"):  # a file, not a folder
        index_view_frames(tmp_path / "1.5.jpg")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(DatasetError, match="camera view folder not found"):  # a link to itself
        index_view_frames(tmp_path / "loop")


def test_nearest_frames():
    idx, dist = nearest_frames(np.array([0.0, 1.0, 2.0]), np.array([-1.0, 0.4, 0.6, 1.5, 9.0]))
    np.testing.assert_array_equal(idx, [0, 0, 1, 1, 2])  # a tie (1.5) picks the earlier frame
    np.testing.assert_allclose(dist, [1.0, 0.4, 0.4, 0.5, 7.0])
    idx, dist = nearest_frames(np.zeros(0), np.array([1.0]))
    assert np.isinf(dist[0])


# ---------------------------------------------------------------- sensor file


def _stream(n=10, c=3):
    ts = 100.0 + np.arange(n) * 0.01  # (N,)
    data = (np.arange(n)[:, None] * 10 + np.arange(c)[None, :]).astype(np.float32)  # row i = [10i, 10i+1, ...]
    return ts, data


def test_sensor_raw_stored_is_memory_mapped_and_windows_exact(tmp_path):
    ts, data = _stream()
    np.savez(tmp_path / "s.npz", timestamps=ts, data=data)
    s = SensorData(tmp_path / "s.npz")
    assert (s.channels, s.is_windows, s.compressed) == (3, False, False)
    assert isinstance(s.data, np.memmap)
    np.testing.assert_array_equal(s.data, data)
    # t equals sample 5's timestamp: samples 2..5 (the last 4 with timestamp <= t)
    np.testing.assert_array_equal(s.window(ts[5], 4), data[2:6])
    # between samples 5 and 6: still ends at sample 5
    np.testing.assert_array_equal(s.window(ts[5] + 0.005, 4), data[2:6])
    # only 2 samples so far: front zero-padded
    w = s.window(ts[1], 4)
    np.testing.assert_array_equal(w[:2], 0)
    np.testing.assert_array_equal(w[2:], data[0:2])
    np.testing.assert_array_equal(s.window(ts[0] - 1, 4), np.zeros((4, 3)))
    assert s.window(ts[9], 4).dtype == np.float32
    # ...and how many rows are that padding
    assert [s.padded_window(t, 4)[1] for t in (ts[5], ts[1], ts[0] - 1)] == [0, 2, 4]


def test_sensor_compressed_is_unpacked_once_and_mapped(tmp_path, monkeypatch):
    """A compressed stream is unpacked to an .npy in the user cache (not the dataset) on first
    use and memory-mapped (every worker and rank shares its pages) instead of decompressed
    whole per process; a changed file is unpacked again and its stale copy removed."""
    monkeypatch.setenv("VLA_DS_CACHE", str(tmp_path / "user_cache"))
    unpacked = tmp_path / "user_cache" / "sensor"
    ts, data = _stream()
    (tmp_path / "ds").mkdir()
    np.savez_compressed(tmp_path / "ds" / "s.npz", timestamps=ts, data=data)
    s = SensorData(tmp_path / "ds" / "s.npz")
    assert s.compressed and isinstance(s.data, np.memmap)
    np.testing.assert_array_equal(s.window(ts[7], 3), data[5:8])
    copies = sorted(unpacked.glob("*.s.*.npy"))
    assert len(copies) == 1 and np.array_equal(np.load(copies[0]), data)
    assert [p.name for p in unpacked.iterdir() if p.suffix == ".tmp"] == []
    assert [p.name for p in (tmp_path / "ds").iterdir()] == ["s.npz"]  # nothing written beside it
    again = SensorData(tmp_path / "ds" / "s.npz")  # another process / worker: maps the same copy
    assert Path(again.data.filename) == copies[0]
    np.savez_compressed(tmp_path / "ds" / "s.npz", timestamps=ts, data=data + 1)
    changed = SensorData(tmp_path / "ds" / "s.npz")
    np.testing.assert_array_equal(changed.window(ts[7], 3), data[5:8] + 1)
    now = sorted(unpacked.glob("*.s.*.npy"))
    assert len(now) == 1 and now != copies


def test_sensor_compressed_without_a_writable_cache(tmp_path, monkeypatch, caplog):
    ts, data = _stream()
    np.savez_compressed(tmp_path / "s.npz", timestamps=ts, data=data)
    (tmp_path / "not_a_folder").write_text("")  # as unwritable as a read-only mount
    monkeypatch.setenv("VLA_DS_CACHE", str(tmp_path / "not_a_folder"))
    # Nowhere to write: decompressed in memory, said once.
    nowhere = SensorData(tmp_path / "s.npz")
    for _ in range(2):
        np.testing.assert_array_equal(nowhere.window(ts[7], 3), data[5:8])
        nowhere._array = None
    assert not isinstance(nowhere.data, np.memmap)
    said = [r.getMessage() for r in caplog.records if "cannot write an unpacked copy" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith(str(tmp_path / "s.npz")) and "VLA_DS_CACHE" in said[0]


def test_sensor_fortran_order_and_int_dtype(tmp_path):
    ts, data = _stream()
    np.savez(tmp_path / "s.npz", timestamps=ts, data=np.asfortranarray(data.astype(np.int16)))
    np.testing.assert_array_equal(SensorData(tmp_path / "s.npz").window(ts[4], 2), data[3:5])


def test_sensor_precut_windows(tmp_path):
    # 3 windows of 4 rows, ending at 1.0, 2.0, 3.0; window j's rows are 100j + [0, 1, 2, 3]
    ends = np.array([1.0, 2.0, 3.0])
    windows = (100 * np.arange(3)[:, None, None] + np.arange(4)[None, :, None]
               + np.zeros((1, 1, 2))).astype(np.float32)  # (3, 4, 2)
    np.savez(tmp_path / "w.npz", timestamps=ends, data=windows)
    s = SensorData(tmp_path / "w.npz")
    assert s.is_windows and s.channels == 2
    np.testing.assert_array_equal(s.window(0.99, 4), np.zeros((4, 2)))  # no window ends by t
    np.testing.assert_array_equal(s.window(2.0, 4), windows[1])  # ends exactly at t
    np.testing.assert_array_equal(s.window(2.0 + 5e-7, 4), windows[1])
    np.testing.assert_array_equal(s.window(2.99, 2), windows[1, 2:])  # last W rows
    assert [s.padded_window(t, 6)[1] for t in (0.99, 3.5)] == [6, 2]
    w = s.window(3.5, 6)  # Wp = 4 < W = 6: front zero-padded
    np.testing.assert_array_equal(w[:2], 0)
    np.testing.assert_array_equal(w[2:], windows[2])


def test_sensor_errors_name_file(tmp_path):
    ts, data = _stream()
    path = tmp_path / "sensor_data.npz"
    np.savez(path, times=ts, data=data)
    with pytest.raises(DatasetError) as e:
        SensorData(path)
    assert str(e.value) == f"{path}: missing key 'timestamps' (found: ['data', 'times'])"

    np.savez(path, timestamps=ts[:5], data=data)
    with pytest.raises(DatasetError, match=r"must have shape \(N, C\) or \(N, W, C\)"):
        SensorData(path)

    np.savez(path, timestamps=ts[::-1], data=data)
    with pytest.raises(DatasetError, match="'timestamps' decrease at row 1"):
        SensorData(path)

    np.savez(path, timestamps=ts, data=data)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])  # truncated: the zip directory is gone
    with pytest.raises(DatasetError) as e:
        SensorData(path)
    assert str(e.value).startswith(f"{path}: cannot read sensor file")

    path.write_bytes(b"not a zip at all")
    with pytest.raises(DatasetError, match="cannot read sensor file"):
        SensorData(path)


def test_sensor_fast_open_reads_what_zipfile_reads(tmp_path):
    """The central-directory reader (most of a sensor file's indexing time) gives the same
    timestamps, layout and data offset as zipfile for the files np.savez writes, and leaves
    every other file (compressed data, a bad checksum) to the zipfile path and its errors."""
    from vla_ds.data.npz import read_direct, read_with_zipfile

    ts, data = _stream(n=300)
    cases = {"savez": lambda p: np.savez(p, timestamps=ts, data=data),
             "windows_int_fortran": lambda p: np.savez(p, timestamps=ts.astype(np.float32),
                                                       data=np.asfortranarray(np.zeros((300, 5, 3), np.int16))),
             "comment_and_extra_member": lambda p: _zip(p, {"notes.txt": b"x", "timestamps.npy": _npy_bytes(ts),
                                                            "data.npy": _npy_bytes(data)}, comment=b"made by hand"),
             "deflated_timestamps": lambda p: _zip(p, {"timestamps.npy": (_npy_bytes(ts), zipfile.ZIP_DEFLATED),
                                                       "data.npy": _npy_bytes(data)})}
    for name, write in cases.items():
        path = tmp_path / f"{name}.npz"
        write(path)
        fast, slow = read_direct(path), read_with_zipfile(path)
        assert fast is not None, name
        assert fast[0].dtype == slow[0].dtype and fast[0].tobytes() == slow[0].tobytes(), name
        assert fast[1:] == slow[1:], name
        np.testing.assert_array_equal(SensorData(path).timestamps, slow[0].astype(np.float64))

    compressed = tmp_path / "compressed.npz"
    np.savez_compressed(compressed, timestamps=ts, data=data)
    assert read_direct(compressed) is None and read_with_zipfile(compressed)[8] is True

    bad_crc = tmp_path / "bad_crc.npz"
    np.savez(bad_crc, timestamps=ts, data=data)
    raw = bytearray(bad_crc.read_bytes())
    raw[raw.find(_npy_bytes(ts)) + 200] ^= 0xFF  # a timestamp byte: zipfile's CRC check fails
    bad_crc.write_bytes(bytes(raw))
    assert read_direct(bad_crc) is None
    with pytest.raises(DatasetError) as e:
        SensorData(bad_crc)
    assert str(e.value).startswith(f"{bad_crc}: cannot read sensor file member 'timestamps.npy'")


def _zip(path: Path, members: dict, comment: bytes = b"") -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, content in members.items():
            content, method = content if isinstance(content, tuple) else (content, zipfile.ZIP_STORED)
            zf.writestr(name, content, compress_type=method)
        zf.comment = comment


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def test_sensor_truncated_member_detected(tmp_path):
    """A readable zip whose stored 'data' member is shorter than its .npy header says."""
    ts, data = _stream(n=200)
    path = tmp_path / "s.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("timestamps.npy", _npy_bytes(ts))
        zf.writestr("data.npy", _npy_bytes(data)[:-100])
    with pytest.raises(DatasetError) as e:
        SensorData(path)
    assert str(e.value).startswith(f"{path}: file is truncated")


def test_sensor_nan_in_window_is_error(tmp_path):
    ts, data = _stream()
    data[3, 1] = np.nan
    np.savez(tmp_path / "s.npz", timestamps=ts, data=data)
    s = SensorData(tmp_path / "s.npz")
    np.testing.assert_array_equal(s.window(ts[9], 4), data[6:10])  # NaN row not in this window
    with pytest.raises(DatasetError) as e:
        s.window(ts[4], 4)
    assert str(e.value).startswith(f"{tmp_path / 's.npz'}: 'data' row 3, channel 1 is not finite (NaN/inf)")
    windows = np.stack([data[i:i + 4] for i in range(len(data) - 3)])  # (N, 4, C): window k ends at row k + 3
    np.savez(tmp_path / "w.npz", timestamps=ts[3:], data=windows)
    w = SensorData(tmp_path / "w.npz")
    with pytest.raises(DatasetError, match=r"'data' window 2 row 1, channel 1 is not finite"):
        w.window(ts[5], 4)  # window 2 covers rows 2..5: the NaN row 3 is its row 1


def test_sensor_pickles_without_data(tmp_path):
    ts, data = _stream()
    np.savez(tmp_path / "s.npz", timestamps=ts, data=data)
    s = SensorData(tmp_path / "s.npz")
    _ = s.data
    blob = pickle.dumps(s)
    assert len(blob) < 2000 + ts.nbytes
    np.testing.assert_array_equal(pickle.loads(blob).window(ts[9], 10), data)


# ---------------------------------------------------------------- whole episode


def test_load_episode(tmp_path):
    ts, data = _stream(n=5, c=2)
    ep_dir = write_episode(tmp_path / "Pick_cube" / "ep0", gripper=np.linspace(0, 1, 31),
                           metadata={"camera_views": ["wrist", "front"], "confidence": 0.7},
                           sensor=(ts, data))
    ep = load_episode(ep_dir, source="Pick_cube", index=3)
    assert (ep.instruction, ep.camera_views, ep.confidence, ep.index, ep.source) == (
        "Pick cube", ["wrist", "front"], 0.7, 3, "Pick_cube")
    assert ep.duration_s == pytest.approx(3.0)
    assert ep.sensor.channels == 2
    np.testing.assert_allclose(ep.frame_times[0][:2], [0.02, 0.12])  # wrist is listed first
    assert ep.image_path(1, 2) == ep_dir / "images" / "front" / "0.200000.png"
    times, idx, dist = ep.match_frames(frame_stride=5, tolerance_s=0.1)
    np.testing.assert_allclose(times, [0.02, 0.52, 1.02, 1.52, 2.02])
    np.testing.assert_array_equal(idx[:, 1], [0, 5, 10, 15, 20])  # front frame nearest to each wrist time
    np.testing.assert_allclose(dist[:, 1], 0.02, atol=1e-9)


def test_load_episode_missing_files(tmp_path):
    ep_dir = write_episode(tmp_path / "ep")
    (ep_dir / "robot_states.csv").unlink()
    with pytest.raises(DatasetError) as e:
        load_episode(ep_dir)
    assert str(e.value) == f"{ep_dir / 'robot_states.csv'}: file not found"

    ep_dir = write_episode(tmp_path / "ep2", metadata={"camera_views": ["front", "side"]})
    with pytest.raises(DatasetError) as e:
        load_episode(ep_dir)
    assert str(e.value) == f"{ep_dir / 'images' / 'side'}: camera view folder not found"


def test_sensor_maps_are_bounded(tmp_path, monkeypatch):
    import vla_ds.data.episodes as episodes

    monkeypatch.setattr(episodes, "MAX_OPEN_SENSOR_MAPS", 2)
    ts, data = _stream()
    sensors = []
    for i in range(3):
        np.savez(tmp_path / f"s{i}.npz", timestamps=ts, data=data + i)
        sensors.append(SensorData(tmp_path / f"s{i}.npz"))
        sensors[-1].window(ts[9], 2)
    assert sensors[0]._array is None and sensors[2]._array is not None  # the oldest map was closed
    np.testing.assert_array_equal(sensors[0].window(ts[9], 2), data[8:10])  # and reopens on use
    assert sensors[1]._array is None


# ---------------------------------------------------------------- corrupt compressed files


def _noisy(n=3000, c=8):
    ts = 100.0 + np.arange(n) * 0.01  # (N,)
    data = np.random.default_rng(0).normal(size=(n, c)).astype(np.float32)  # incompressible-ish
    return ts, data


def test_sensor_corrupt_compressed_member_at_open_names_file_and_member(tmp_path):
    """Damaged deflate bytes raise zlib.error inside zipfile: a DatasetError, not a traceback."""
    ts, data = _noisy()
    path = tmp_path / "sensor_data.npz"
    np.savez_compressed(path, timestamps=ts, data=data)
    corrupt_compressed_member(path, "timestamps.npy", start_fraction=0.0)
    with pytest.raises(DatasetError) as e:
        SensorData(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: cannot read sensor file member 'timestamps.npy' (") and "\n" not in msg


def test_sensor_corrupt_compressed_data_at_window_and_sample_rows(tmp_path):
    ts, data = _noisy()
    path = tmp_path / "sensor_data.npz"
    np.savez_compressed(path, timestamps=ts, data=data)
    corrupt_compressed_member(path, "data.npy", start_fraction=0.5)
    s = SensorData(path)  # the index (timestamps, data header) is intact
    for read in (lambda: s.window(ts[50], 4), lambda: s.sample_rows(np.random.default_rng(0), 100)):
        with pytest.raises(DatasetError) as e:
            read()
        assert str(e.value).startswith(f"{path}: cannot read sensor file member 'data.npy' (")
    assert s._array is None


def test_sensor_crc_mismatch_is_reported_by_window_and_sample_rows(tmp_path):
    """A member that inflates fine but fails its CRC check: streaming reads to the end to see it."""
    ts, data = _noisy()  # large enough that reading the .npy header at open does not reach the end
    path = tmp_path / "s.npz"
    np.savez_compressed(path, timestamps=ts, data=data)
    raw = bytearray(path.read_bytes())
    eocd = raw.rindex(b"PK\x05\x06")
    entry = int.from_bytes(raw[eocd + 16:eocd + 20], "little")  # start of the central directory
    while raw[entry + 46:entry + 54] != b"data.npy":
        name_len, extra_len, comment_len = (int.from_bytes(raw[entry + k:entry + k + 2], "little") for k in (28, 30, 32))
        entry += 46 + name_len + extra_len + comment_len
    raw[entry + 16] ^= 0xFF  # its CRC-32 (zipfile checks this one)
    path.write_bytes(bytes(raw))
    s = SensorData(path)
    with pytest.raises(DatasetError, match=r"s\.npz: cannot read sensor file member 'data\.npy' \(Bad CRC"):
        s.sample_rows(np.random.default_rng(0), 5)
    with pytest.raises(DatasetError, match=r"member 'data\.npy' \(Bad CRC"):
        s.window(ts[9], 2)


# ---------------------------------------------------------------- memory held by sensor data


def test_decompressed_arrays_share_the_bounded_lru(tmp_path, monkeypatch):
    import vla_ds.data.episodes as episodes

    monkeypatch.setattr(episodes, "UNPACK_COMPRESSED_SENSOR", False)  # the in-memory fallback

    monkeypatch.setattr(episodes, "MAX_OPEN_SENSOR_MAPS", 2)
    ts, data = _stream()
    sensors = []
    for i in range(3):
        np.savez_compressed(tmp_path / f"c{i}.npz", timestamps=ts, data=data + i)
        sensors.append(SensorData(tmp_path / f"c{i}.npz"))
        np.testing.assert_array_equal(sensors[-1].window(ts[9], 2), data[8:10] + i)
    assert sensors[0]._array is None and sensors[1]._array is not None and sensors[2]._array is not None
    np.testing.assert_array_equal(sensors[0].window(ts[9], 2), data[8:10])  # decompressed again on use
    assert sensors[1]._array is None


def test_decompressed_bytes_are_capped_maps_are_not(tmp_path, monkeypatch):
    import vla_ds.data.episodes as episodes

    monkeypatch.setattr(episodes, "UNPACK_COMPRESSED_SENSOR", False)  # the in-memory fallback

    ts, data = _stream()  # data: 120 bytes
    monkeypatch.setattr(episodes, "MAX_DECOMPRESSED_SENSOR_BYTES", data.nbytes + 1)
    np.savez(tmp_path / "m.npz", timestamps=ts, data=data)
    mapped = SensorData(tmp_path / "m.npz")
    mapped.window(ts[9], 2)
    packed = []
    for i in range(3):
        np.savez_compressed(tmp_path / f"c{i}.npz", timestamps=ts, data=data + i)
        packed.append(SensorData(tmp_path / f"c{i}.npz"))
        packed[-1].window(ts[9], 2)
    assert [s._array is not None for s in packed] == [False, False, True]  # only the newest fits
    assert mapped._array is not None
    monkeypatch.setattr(episodes, "MAX_DECOMPRESSED_SENSOR_BYTES", 0)
    np.testing.assert_array_equal(packed[0].window(ts[9], 2), data[8:10])  # the one in use is kept
    assert packed[0]._array is not None and packed[2]._array is None


@pytest.mark.parametrize("layout", ["raw", "windows", "fortran"])
def test_sample_rows_streams_compressed_without_keeping_it(tmp_path, monkeypatch, layout):
    import vla_ds.data.episodes as episodes

    monkeypatch.setattr(episodes, "STREAM_BLOCK_BYTES", 100)  # many blocks
    ts, data = _stream(n=50, c=3)
    if layout == "windows":
        data = np.stack([data[i:i + 4] for i in range(47)])  # (47, 4, 3)
        ts = ts[3:]
    elif layout == "fortran":
        data = np.asfortranarray(data)
    np.savez(tmp_path / "m.npz", timestamps=ts, data=data)
    np.savez_compressed(tmp_path / "c.npz", timestamps=ts, data=data)
    before = episodes.open_sensor_arrays()
    packed = SensorData(tmp_path / "c.npz")
    got = packed.sample_rows(np.random.default_rng(3), 40)
    assert packed._array is None and episodes.open_sensor_arrays() == before  # nothing kept
    want = SensorData(tmp_path / "m.npz").sample_rows(np.random.default_rng(3), 40)  # same draw, mapped
    assert got.dtype == np.float64 and got.shape == (40, 3)
    np.testing.assert_array_equal(got, want)
    packed.window(ts[-1], 2)  # once open for windows, sample_rows uses the open array
    np.testing.assert_array_equal(packed.sample_rows(np.random.default_rng(3), 40), want)
