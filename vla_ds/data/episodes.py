"""One episode directory: finding episodes, reading and validating their files.

An episode is any directory holding ``metadata.json`` (SPEC section 3)::

    <episode>/
      metadata.json                 every key optional
      robot_states.csv              timestamp, pose_x..pose_r (mm, degrees), optional gripper
      images/<view>/<time>.jpg|png  file stem = capture time in seconds
      sensor_data.npz               optional: timestamps (N,), data (N, C) or (N, Wp, C)

Everything cheap is read once, when the episode is loaded: metadata, the robot
states (a few thousand rows), the image file names (a directory listing, no
decoding) and the sensor file's index (timestamps plus the shape and byte offset
of ``data``). Images are decoded and sensor rows read per sample, by the dataset.
Sensor ``data`` held in memory (memory maps, decompressed arrays) is bounded per
process by one LRU (:data:`MAX_OPEN_SENSOR_MAPS`, :data:`MAX_DECOMPRESSED_SENSOR_BYTES`).
Every problem is a :class:`~vla_ds.errors.DatasetError` whose one-line message
starts with the full path of the file at fault.
"""

from __future__ import annotations

import collections
import csv
import errno
import io
import json
import logging
import math
import os
import threading
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from vla_ds.data import npz
from vla_ds.data.actions import (
    ACTION_DIM,
    DELTA_POSE_NAMES,
    DELTA_POSE_UNITS,
    EpisodeSamples,
    compute_action_chunks,
)
from vla_ds.data.lerobot import is_lerobot_root
from vla_ds.errors import DatasetError

logger = logging.getLogger(__name__)

METADATA_FILE = "metadata.json"
ROBOT_STATES_FILE = "robot_states.csv"
IMAGES_DIR = "images"
SENSOR_FILE = "sensor_data.npz"

POSE_COLUMNS = ("pose_x", "pose_y", "pose_z", "pose_a", "pose_b", "pose_r")
GRIPPER_COLUMN = "gripper"
TIMESTAMP_COLUMN = "timestamp"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

DEFAULT_ACTION = {"type": "delta_pose", "hz": 10}
SUPPORTED_ACTION_TYPES = ("delta_pose",)

# Tolerance when comparing times read from different files: timestamps around 1.7e9 s
# have a float64 resolution of ~2.4e-7 s, so "<= t" is evaluated as "<= t + TIME_EPS".
TIME_EPS = 1e-6

# At most this many sensor files have their ``data`` open at once per process: memory
# maps (each holds a file descriptor, and a large dataset has more episodes than the
# default fd limit) and decompressed arrays of compressed files share one LRU.
MAX_OPEN_SENSOR_MAPS = 64
# Decompressed arrays in that LRU are also evicted, oldest first, while together they
# exceed this many bytes (the array in use is always kept). Maps do not count: their
# pages are the OS page cache, reclaimable.
MAX_DECOMPRESSED_SENSOR_BYTES = 2 << 30
# sample_rows streams a compressed member in blocks of about this many bytes.
STREAM_BLOCK_BYTES = 16 << 20
# A compressed ``data`` member is unpacked once, by whichever process needs it first, into
# an uncompressed .npy in the user cache (vla_ds.user_cache.unpacked_sensor_dir(): never
# the dataset, which may be shared or read-only) and memory-mapped from there by every
# worker and rank: their pages are the OS page cache, shared and reclaimable, instead of
# one decompressed copy of the stream per worker. False: decompress in memory per process
# (bounded by the LRU above).
UNPACK_COMPRESSED_SENSOR = True


# --------------------------------------------------------------------------- finding


def find_episode_dirs(root: str | os.PathLike, describe=None) -> list:
    """All episode directories (holding ``metadata.json``) and LeRobot dataset roots (holding
    ``meta/info.json``) under ``root``, any depth, sorted by path.

    ``root`` itself counts if it is one. The walk does not descend into an episode or a
    LeRobot root (their folders can hold thousands of files) and follows symbolic links to
    folders, visiting each real folder once. With ``describe(folder, its os.DirEntry list)``
    the result is ``[(folder, what describe returned), ...]``: a caller that needs each
    folder's files (the dataset index's signatures) reuses this walk's listing of it.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset directory not found")
    found = []
    st = os.stat(root)
    seen = {(st.st_dev, st.st_ino)}
    stack = [(str(root), st.st_dev)]
    while stack:  # one listing per folder; a stat only for a symbolic link (to visit its target once)
        dirpath, dev = stack.pop()
        try:
            with os.scandir(dirpath) as it:
                entries = list(it)
        except OSError:
            continue  # unreadable: skipped, as os.walk does
        names = {e.name for e in entries}
        if METADATA_FILE in names or ("meta" in names and is_lerobot_root(dirpath)):
            found.append((dirpath, describe(dirpath, entries) if describe is not None else None))
            continue
        for e in entries:
            try:
                if e.name.startswith(".") or not e.is_dir():
                    continue
                if e.is_symlink():
                    target = e.stat()
                    key, child_dev = (target.st_dev, target.st_ino), target.st_dev
                else:
                    key, child_dev = (dev, e.inode()), dev
            except OSError:
                continue
            if key not in seen:  # a symlink loop or a folder linked twice is visited once
                seen.add(key)
                stack.append((e.path, child_dev))
    found.sort(key=lambda item: item[0].split(os.sep))  # Path order, without comparing 100k Path objects
    return [(Path(d), value) for d, value in found] if describe is not None else [Path(d) for d, _ in found]


# --------------------------------------------------------------------------- metadata


@dataclass
class EpisodeMetadata:
    """Parsed ``metadata.json`` with SPEC defaults applied.

    Fields:
        instruction: language instruction; default is the episode's parent folder name
            with ``_`` replaced by spaces.
        camera_views: view folder names under ``images/``, in the order images are given
            to the model; default is the sorted folder names.
        action_type: only ``"delta_pose"`` is supported.
        action_hz: action rate; one action step spans ``1 / action_hz`` seconds.
        confidence: per-sample loss weight (>= 0), default 1.0.
    """

    instruction: str
    camera_views: list[str]
    action_type: str
    action_hz: float
    confidence: float


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def read_metadata(episode_dir: Path) -> EpisodeMetadata:
    """Read and validate ``episode_dir/metadata.json``; missing keys get SPEC defaults."""
    path = episode_dir / METADATA_FILE
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: invalid JSON ({e})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot read ({e})") from None
    if not isinstance(meta, dict):
        raise DatasetError(f"{path}: expected a JSON object, got {type(meta).__name__}")

    instruction = meta.get("instruction")
    if instruction is None:
        instruction = episode_dir.resolve().parent.name.replace("_", " ")
    elif not isinstance(instruction, str):
        raise DatasetError(f"{path}: 'instruction' must be a string, got {instruction!r}")

    views = meta.get("camera_views")
    if views is None:
        images = episode_dir / IMAGES_DIR
        views = sorted(d.name for d in images.iterdir() if d.is_dir() and not d.name.startswith(".")) \
            if images.is_dir() else []
        if not views:
            raise DatasetError(f"{images}: no camera view folders (and no 'camera_views' in {path})")
    elif (not isinstance(views, list) or not views
          or not all(isinstance(v, str) and v for v in views)):
        raise DatasetError(f"{path}: 'camera_views' must be a non-empty list of folder names, got {views!r}")
    elif len(set(views)) != len(views):
        raise DatasetError(f"{path}: 'camera_views' lists a view twice: {views!r}")

    action = meta.get("action", DEFAULT_ACTION)
    if not isinstance(action, dict):
        raise DatasetError(f"{path}: 'action' must be an object like {json.dumps(DEFAULT_ACTION)}, got {action!r}")
    action_type = action.get("type", DEFAULT_ACTION["type"])
    if action_type not in SUPPORTED_ACTION_TYPES:
        raise DatasetError(f"{path}: unsupported action type {action_type!r} (supported: {', '.join(SUPPORTED_ACTION_TYPES)})")
    hz = action.get("hz", DEFAULT_ACTION["hz"])
    if not _is_number(hz) or hz <= 0:
        raise DatasetError(f"{path}: action 'hz' must be a positive number, got {hz!r}")

    confidence = meta.get("confidence", 1.0)
    if not _is_number(confidence) or confidence < 0:
        raise DatasetError(f"{path}: 'confidence' must be a number >= 0, got {confidence!r}")

    return EpisodeMetadata(instruction, list(views), action_type, float(hz), float(confidence))


# --------------------------------------------------------------------------- robot states


@dataclass
class RobotStates:
    """The used columns of ``robot_states.csv``.

    Fields:
        times: (T,) float64 seconds, strictly increasing.
        poses: (T, 6) float64 ``[x, y, z, a, b, r]`` in mm and degrees; the angle columns
            are unwrapped (no 360 degree jumps) so linear interpolation across +-180 works.
        gripper: (T,) float64, or None when the file has no ``gripper`` column.
    """

    times: np.ndarray
    poses: np.ndarray
    gripper: np.ndarray | None


def _parse_csv_slow(path: Path, header: list[str], columns: list[str]) -> np.ndarray:
    """Parse ``columns`` of a CSV row by row with exact line numbers in errors. Returns (T, len(columns))."""
    idx = [header.index(c) for c in columns]
    rows = []
    prev_t = -math.inf
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        next(reader)  # header
        for fields in reader:
            line = reader.line_num
            if not any(s.strip() for s in fields):
                continue  # blank line
            if len(fields) <= max(idx):
                raise DatasetError(f"{path}: line {line}: {len(fields)} fields, expected {len(header)}")
            values = []
            for c, i in zip(columns, idx):
                s = fields[i].strip()
                try:
                    v = float(s)
                except ValueError:
                    raise DatasetError(f"{path}: line {line}: column '{c}' is {s!r}, not a number") from None
                if not math.isfinite(v):
                    raise DatasetError(f"{path}: line {line}: column '{c}' is {s} (NaN/inf not allowed)")
                values.append(v)
            if values[0] <= prev_t:
                raise DatasetError(f"{path}: line {line}: timestamp {values[0]!r} does not increase "
                                   f"(previous row: {prev_t!r})")
            prev_t = values[0]
            rows.append(values)
    if not rows:
        raise DatasetError(f"{path}: no data rows")
    return np.asarray(rows, dtype=np.float64)


def read_robot_states(path: Path) -> RobotStates:
    """Read ``robot_states.csv``: required columns, finite values, strictly increasing timestamps.

    Good files take a fast path (``np.loadtxt`` on the used columns); anything it
    rejects or any failed check is re-parsed row by row to name the exact line.
    """
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            text = f.read()  # read once: the header here, the rows by np.loadtxt below
        header = next(csv.reader(io.StringIO(text[:text.find("\n") + 1 or len(text)])), None)
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot read ({e})") from None
    if not header:
        raise DatasetError(f"{path}: empty file (expected a header row)")
    header = [h.strip() for h in header]
    for c in (TIMESTAMP_COLUMN, *POSE_COLUMNS):
        if c not in header:
            raise DatasetError(f"{path}: missing required column '{c}'")
    columns = _state_columns(header)

    table = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "input contained no data" is handled below
            table = np.loadtxt(io.StringIO(text), delimiter=",", skiprows=1, dtype=np.float64, ndmin=2,
                               usecols=[header.index(c) for c in columns])
        if not _rows_ok(table):
            table = None
    except (ValueError, IndexError):
        table = None
    if table is None:
        table = _parse_csv_slow(path, header, columns)  # raises with the exact line, or parses quoted files
    return _states(table)


def _state_columns(header: list[str]) -> list[str]:
    """The columns a robot-state file is read for: timestamp, the six pose columns[, gripper]."""
    return [TIMESTAMP_COLUMN, *POSE_COLUMNS] + ([GRIPPER_COLUMN] if GRIPPER_COLUMN in header else [])


def _rows_ok(table: np.ndarray) -> bool:
    """Rows the fast parsers may keep: some, all finite, timestamps strictly increasing."""
    return (len(table) > 0 and bool(np.isfinite(table).all())
            and (len(table) < 2 or bool((np.diff(table[:, 0]) > 0).all())))


def _states(table: np.ndarray) -> RobotStates:
    """RobotStates of a checked (T, 7 or 8) table: timestamp, the six pose columns[, gripper]."""
    poses = table[:, 1:7].copy()
    angles = poses[:, 3:6]  # pose_a/b/r, degrees
    if (np.abs(np.diff(angles, axis=0)) < 180.0).all():
        angles[1:] += 0.0  # no jump to unwrap: what np.unwrap returns then (-0.0 becomes 0.0), 4x faster
    else:
        poses[:, 3:6] = np.unwrap(angles, period=360.0, axis=0)
    gripper = table[:, 7].copy() if table.shape[1] == 8 else None
    return RobotStates(times=table[:, 0].copy(), poses=poses, gripper=gripper)


def _plain_csv(path: Path) -> tuple[bytes, bytes] | None:
    """(header line, rows) of a robot-state file the batched parser may take: ASCII (pyarrow does
    not decode the columns it skips, :func:`read_robot_states` decodes them all), no quotes,
    carriage returns or blank lines, the rows ending in a newline; None for anything else."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    data = data.removeprefix(b"\xef\xbb\xbf")
    end = data.find(b"\n")
    if end < 0 or not data.isascii() or b'"' in data or b"\r" in data:
        return None
    rows = data[end + 1:]
    if not rows or rows.startswith(b"\n") or b"\n\n" in rows:
        return None
    return data[:end], rows if rows.endswith(b"\n") else rows + b"\n"


def read_robot_states_many(paths: list[Path]) -> list[RobotStates | None]:
    """:func:`read_robot_states` of each plain file, the same arrays, about 5x faster: files with
    the same header are parsed as one CSV by pyarrow (numpy's parser costs 0.6 ms a file, most
    of it per call), then checked one by one. None for a file the batch cannot take or whose
    rows fail a check: :func:`load_episode` reads it alone, in its turn (naming the line)."""
    import pyarrow as pa
    import pyarrow.csv as pa_csv

    out: list[RobotStates | None] = [None] * len(paths)
    groups: dict[bytes, list[tuple[int, bytes]]] = {}
    for k, path in enumerate(paths):
        plain = _plain_csv(path)
        if plain is not None:
            groups.setdefault(plain[0], []).append((k, plain[1]))
    for header_line, members in groups.items():
        try:
            header = [h.strip() for h in header_line.decode("utf-8").split(",")]
        except UnicodeDecodeError:
            continue
        if not all(c in header for c in (TIMESTAMP_COLUMN, *POSE_COLUMNS)):
            continue  # read_robot_states names the missing column
        names = [f"c{i}" for i in range(len(header))]
        used = [names[header.index(c)] for c in _state_columns(header)]
        options = dict(
            read_options=pa_csv.ReadOptions(column_names=names, use_threads=False, block_size=1 << 26),
            parse_options=pa_csv.ParseOptions(quote_char=False),
            convert_options=pa_csv.ConvertOptions(include_columns=used, column_types={n: pa.float64() for n in used}))
        batches = [members]
        while batches:
            batch = batches.pop()
            try:
                table = pa_csv.read_csv(pa.py_buffer(b"".join(rows for _, rows in batch)), **options)
                values = np.stack([table.column(n).to_numpy() for n in used], axis=1)
            except (pa.ArrowException, ValueError):
                if len(batch) > 1:  # a bad row somewhere: each file alone
                    batches += [[member] for member in batch]
                continue
            lengths = [rows.count(b"\n") for _, rows in batch]
            if sum(lengths) != len(values):
                continue
            start = 0
            for (k, _), n in zip(batch, lengths):
                part = values[start:start + n]
                start += n
                if _rows_ok(part):
                    out[k] = _states(part)
    return out


# --------------------------------------------------------------------------- images


def index_view_frames(view_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """List one view folder: capture times from the file stems, without decoding anything.

    Returns ``(times, names)``: times (F,) float64 sorted ascending, names (F,) bytes
    (``os.fsencode`` file names, a numpy array so forked data-loader workers share it
    instead of copying a Python list). Non-image files are ignored.
    """
    try:
        listed = os.listdir(os.fsencode(view_dir))
    except OSError as e:
        if e.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):  # what Path.is_dir takes for "not a folder"
            raise
        raise DatasetError(f"{view_dir}: camera view folder not found") from None
    # The names as bytes, their stems parsed by numpy in one call (a large dataset lists
    # millions of frames); a name it cannot parse is parsed, or named in the error, one by one.
    stems = _stems_one_suffix(listed)
    if stems is None:  # several suffixes, capitals, other files: name by name
        listed = [n for n in listed if n.lower().endswith(_SUFFIXES)]
        stems = [n[:n.rfind(b".")] for n in listed]
    try:
        times = np.array(stems, dtype=np.bytes_).astype(np.float64) if listed else np.zeros(0)
    except ValueError:
        times = None
    if times is None or not np.isfinite(times).all():
        times = np.array([_capture_time(view_dir, os.fsdecode(n)) for n in listed], dtype=np.float64)
    order = np.argsort(times, kind="stable")
    times = times[order]
    names = np.array(listed, dtype=np.bytes_)[order] if listed else np.zeros(0, dtype="S1")
    dup = np.flatnonzero(np.diff(times) == 0)
    if len(dup):
        i = dup[0]
        raise DatasetError(f"{view_dir}: two frames with the same capture time: "
                           f"{os.fsdecode(names[i])} and {os.fsdecode(names[i + 1])}")
    return times, names


_SUFFIXES = tuple(s.encode() for s in IMAGE_SUFFIXES)


def _stems_one_suffix(names: list[bytes]) -> list[bytes] | None:
    """The stems of ``names`` when every one ends with the same image suffix as written in
    IMAGE_SUFFIXES (a camera's folder), cut in one pass over their join (a third faster than
    name by name); None otherwise."""
    blob = b"\n".join(names) + b"\n"
    if blob.count(b"\n") != len(names):  # a name holding a newline
        return None
    for suffix in _SUFFIXES:
        end = suffix + b"\n"
        if blob.count(end) == len(names):  # each line ends with it, once
            return blob.replace(end, b"\n").split(b"\n")[:-1]
    return None


def _capture_time(view_dir: Path, name: str) -> float:
    try:
        t = float(os.path.splitext(name)[0])
    except ValueError:
        raise DatasetError(f"{view_dir / name}: image file name must be the capture time "
                           f"in seconds (e.g. 1730000000.125000.jpg)") from None
    if not math.isfinite(t):
        raise DatasetError(f"{view_dir / name}: capture time in the file name is not finite")
    return t


def nearest_frames(frame_times: np.ndarray, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each query time, the index of the nearest frame and its distance in seconds.

    frame_times (F,) sorted, query (S,) -> (idx (S,) int64, dist (S,) float64). With no
    frames the distance is inf.
    """
    if len(frame_times) == 0:
        return np.zeros(len(query), dtype=np.int64), np.full(len(query), np.inf)
    right = np.clip(np.searchsorted(frame_times, query), 0, len(frame_times) - 1)
    left = np.clip(right - 1, 0, len(frame_times) - 1)
    d_right = np.abs(frame_times[right] - query)
    d_left = np.abs(frame_times[left] - query)
    idx = np.where(d_left <= d_right, left, right)
    return idx, np.minimum(d_left, d_right)


# --------------------------------------------------------------------------- sensor file

# A sensor file's key (path and data offset) -> its open data (a map or a decompressed array),
# least recently used first. Keyed by file, not by object: episode views are made per sample.
_OPEN_ARRAYS: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
_OPEN_ARRAYS_LOCK = threading.Lock()


def _reset_lock_after_fork() -> None:
    global _OPEN_ARRAYS_LOCK
    _OPEN_ARRAYS_LOCK = threading.Lock()  # a forked data-loader worker never inherits it held


os.register_at_fork(after_in_child=_reset_lock_after_fork)


def _lookup(key: str, touch: bool = True) -> np.ndarray | None:
    """The open data of ``key`` (marked most recently used), or None."""
    with _OPEN_ARRAYS_LOCK:
        array = _OPEN_ARRAYS.get(key)
        if array is not None and touch:
            _OPEN_ARRAYS.move_to_end(key)
        return array


def _forget(key: str) -> None:
    with _OPEN_ARRAYS_LOCK:
        _OPEN_ARRAYS.pop(key, None)


def _remember(key: str, array: np.ndarray) -> None:
    """Keep ``array`` as ``key``'s open data and evict the least recently used others:
    beyond MAX_OPEN_SENSOR_MAPS entries, or while decompressed arrays exceed
    MAX_DECOMPRESSED_SENSOR_BYTES. An evicted array is freed (a map closed) once no view
    of it is alive."""
    with _OPEN_ARRAYS_LOCK:
        _OPEN_ARRAYS[key] = array
        _OPEN_ARRAYS.move_to_end(key)
        while len(_OPEN_ARRAYS) > max(1, MAX_OPEN_SENSOR_MAPS):
            _OPEN_ARRAYS.popitem(last=False)
        held = sum(a.nbytes for a in _OPEN_ARRAYS.values() if _in_memory(a))
        for other, a in list(_OPEN_ARRAYS.items()):
            if held <= MAX_DECOMPRESSED_SENSOR_BYTES:
                break
            if other == key or not _in_memory(a):
                continue
            held -= a.nbytes
            del _OPEN_ARRAYS[other]


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        logger.warning("%s", message)


def _in_memory(array) -> bool:
    """A decompressed array held in this process (not a map of a file)."""
    return array is not None and not isinstance(array, np.memmap)


def open_sensor_arrays() -> int:
    """How many sensor files have their data open (mapped or decompressed) in this process."""
    return len(_OPEN_ARRAYS)


class SensorData:
    """Index of one ``sensor_data.npz`` and access to its windows.

    ``timestamps`` is loaded fully at open. ``data`` is never loaded whole when it is
    stored uncompressed (``np.savez``): it is memory-mapped at the member's byte offset
    inside the zip file (``np.load(mmap_mode=...)`` ignores mmap for .npz), so a sample
    reads only its own rows. A compressed member (``np.savez_compressed``) cannot be
    mapped; it is decompressed on use, per process. Maps and decompressed arrays share
    one per-process LRU (``MAX_OPEN_SENSOR_MAPS`` entries, decompressed arrays also
    capped at ``MAX_DECOMPRESSED_SENSOR_BYTES``); an evicted one is reopened on next use.

    Any failure to read or decode the file (bad zip, zlib/CRC errors, truncated member)
    is a DatasetError naming the file and, where known, the member: at open, when
    ``data`` is read for a window, and in :meth:`sample_rows`.

    Fields:
        path: the .npz file.
        timestamps: (N,) float64 seconds, non-decreasing; for pre-cut windows, window end times.
        shape: shape of ``data``: (N, C) raw stream or (N, Wp, C) pre-cut windows.
        channels: C.
        is_windows: True for the (N, Wp, C) pre-cut layout.
        compressed: True when ``data`` is stored deflated.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        opened = npz.read_direct(self.path) or npz.read_with_zipfile(self.path)
        ts, shape, fortran, dtype, header_len, data_start, member_size, file_size, self.compressed, stamp = opened
        if dtype.kind not in "biuf":
            raise DatasetError(f"{self.path}: 'data' must be a numeric array, got dtype {dtype}")
        if ts.ndim != 1 or ts.dtype.kind not in "biuf":
            raise DatasetError(f"{self.path}: 'timestamps' must be a 1-D numeric array, got shape {ts.shape}")
        if len(shape) not in (2, 3) or shape[0] != len(ts):
            raise DatasetError(f"{self.path}: 'data' must have shape (N, C) or (N, W, C) with N = "
                               f"len(timestamps) = {len(ts)}, got {tuple(shape)}")
        ts = ts.astype(np.float64)
        if not np.isfinite(ts).all():
            raise DatasetError(f"{self.path}: 'timestamps' row {int(np.flatnonzero(~np.isfinite(ts))[0])} is not finite")
        back = np.flatnonzero(np.diff(ts) < 0)
        if len(back):
            raise DatasetError(f"{self.path}: 'timestamps' decrease at row {int(back[0]) + 1}")
        if not self.compressed:
            nbytes = int(np.prod(shape)) * dtype.itemsize
            if data_start + nbytes > file_size or header_len + nbytes > member_size:
                raise DatasetError(f"{self.path}: file is truncated ('data' needs {nbytes} bytes)")

        self._timestamps = ts
        self.shape = tuple(int(s) for s in shape)
        self.channels = self.shape[-1]
        self.is_windows = len(self.shape) == 3
        self._dtype = dtype
        self._fortran = bool(fortran)
        self._offset = data_start
        self._stamp = stamp  # which version of the file the open data is

    def index_record(self) -> dict:
        """What :meth:`from_index` needs to read the file again without opening it now."""
        return {"shape": list(self.shape), "dtype": self._dtype.str, "fortran": self._fortran,
                "offset": self._offset, "compressed": self.compressed, "stamp": self._stamp}

    @classmethod
    def from_index(cls, path: Path, record: dict) -> SensorData:
        """The sensor file as indexed: no file is opened until data (or timestamps) are read."""
        self = cls.__new__(cls)
        self.path = path
        self._timestamps = None
        self.shape = tuple(record["shape"])
        self.channels = self.shape[-1]
        self.is_windows = len(self.shape) == 3
        self._dtype = np.dtype(record["dtype"])
        self._fortran = bool(record["fortran"])
        self._offset = int(record["offset"])
        self.compressed = bool(record["compressed"])
        self._stamp = record["stamp"]
        return self

    @property
    def timestamps(self) -> np.ndarray:
        """(N,) float64 seconds (read from the file on first use by an indexed view)."""
        if self._timestamps is None:
            try:
                with zipfile.ZipFile(self.path) as zf, zf.open("timestamps.npy") as f:
                    self._timestamps = npz.read_npy(f, f"{self.path}: sensor file member 'timestamps.npy'").astype(
                        np.float64)
            except Exception as e:
                raise DatasetError(npz.read_error(self.path, "timestamps.npy", e)) from None
        return self._timestamps

    def end_rows(self, times: np.ndarray) -> np.ndarray:
        """(S,) int64: for each time, the row its window ends before (rows with timestamp <= t,
        ``TIME_EPS`` slack): what a sample stores instead of searching the timestamps."""
        return np.searchsorted(self.timestamps, np.asarray(times, dtype=np.float64) + TIME_EPS,
                               side="right").astype(np.int64)

    @property
    def _key(self) -> str:
        return f"{self.path}@{self._offset}@{self._stamp}"

    @property
    def _array(self) -> np.ndarray | None:
        """This file's open data in this process, or None (does not open it)."""
        return _lookup(self._key, touch=False)

    @_array.setter
    def _array(self, value) -> None:
        if value is None:
            _forget(self._key)
        else:
            _remember(self._key, value)

    def __getstate__(self):
        # Pickled without timestamps when indexed; the data is reopened per process.
        return self.__dict__.copy()

    @property
    def data(self) -> np.ndarray:
        """``data`` as an array: a read-only memmap (stored) or the decompressed array (compressed).

        Opened on first use and kept in the per-process LRU (see the class docstring).
        Hold the result only briefly: an evicted array stays alive while a view of it does.
        """
        array = _lookup(self._key)
        if array is not None:
            return array
        if int(np.prod(self.shape)) == 0:
            return np.zeros(self.shape, dtype=self._dtype)
        if not self.compressed:
            array = self._map()
        else:
            unpacked = self._unpacked() if UNPACK_COMPRESSED_SENSOR else None
            array = self._map_unpacked(unpacked) if unpacked is not None else self._decompress()
        _remember(self._key, array)
        return array

    def _identity(self) -> str:
        """What the unpacked copy is keyed by: the .npz's size and mtime and the member's CRC."""
        st = os.stat(self.path)
        with zipfile.ZipFile(self.path) as zf:
            crc = zf.getinfo("data.npy").CRC
        return f"{st.st_size}-{st.st_mtime_ns}-{crc:08x}"

    def _unpacked(self) -> Path | None:
        """The uncompressed copy of the ``data`` member (an .npy) in the user cache, made now
        if missing; None when that folder cannot be written to."""
        import fcntl
        import hashlib
        import shutil
        import uuid

        from vla_ds.user_cache import unpacked_sensor_dir

        try:
            identity = self._identity()
        except Exception as e:
            raise DatasetError(npz.read_error(self.path, "data.npy", e)) from None
        path_hash = hashlib.sha1(str(self.path.resolve()).encode()).hexdigest()[:16]
        folder = unpacked_sensor_dir()
        prefix = f"{path_hash}.{self.path.stem}"
        file = f"{prefix}.{identity}.npy"
        target = folder / file
        if target.is_file():
            return target
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with open(folder / f".{file}.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # one process unpacks, the others wait for it
                if target.is_file():
                    return target
                tmp = folder / f".{file}.{uuid.uuid4().hex}.tmp"
                try:
                    with zipfile.ZipFile(self.path) as zf, zf.open("data.npy") as src, open(tmp, "wb") as dst:
                        shutil.copyfileobj(src, dst, STREAM_BLOCK_BYTES)  # the CRC is checked at the end
                    os.replace(tmp, target)
                except (zipfile.BadZipFile, EOFError, ValueError) as e:  # the .npz itself is bad
                    raise DatasetError(npz.read_error(self.path, "data.npy", e)) from None
                finally:
                    tmp.unlink(missing_ok=True)
            for old in folder.glob(f"{prefix}.*.npy"):
                if old != target:  # unpacked from an earlier version of this file
                    old.unlink(missing_ok=True)
            logger.info("%s: unpacked the compressed sensor data to %s (memory-mapped from there)",
                        self.path, target)
            return target
        except DatasetError:
            raise
        except OSError:
            pass  # read-only or full: decompress in memory
        except Exception as e:  # zlib.error and the like: the member is corrupt
            raise DatasetError(npz.read_error(self.path, "data.npy", e)) from None
        _warn_once(f"{self.path}: cannot write an unpacked copy of its compressed sensor data to {folder} "
                   "(set VLA_DS_CACHE to a writable folder); decompressing it in memory in every process instead")
        return None

    def _map_unpacked(self, path: Path) -> np.ndarray:
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as e:
            raise DatasetError(f"{path}: cannot map the unpacked sensor data of {self.path} ({e}); delete it "
                               "to unpack again") from None
        self._check_unchanged(array.shape, array.dtype)
        return array

    def _map(self) -> np.ndarray:
        try:
            return np.memmap(self.path, dtype=self._dtype, mode="r", offset=self._offset,
                             shape=self.shape, order="F" if self._fortran else "C")
        except MemoryError:
            raise
        except Exception as e:  # the file changed or vanished since it was indexed
            raise DatasetError(npz.read_error(self.path, "data.npy", e)) from None

    def _decompress(self) -> np.ndarray:
        """Decompress the whole ``data`` member (not cached here)."""
        try:
            with zipfile.ZipFile(self.path) as zf, zf.open("data.npy") as f:
                array = np.lib.format.read_array(f, allow_pickle=False)
        except MemoryError:
            raise
        except Exception as e:  # zlib.error, BadZipFile (CRC), ValueError (truncated), OSError, ...
            raise DatasetError(npz.read_error(self.path, "data.npy", e)) from None
        self._check_unchanged(array.shape, array.dtype)
        return array

    def _check_unchanged(self, shape, dtype) -> None:
        if tuple(shape) != self.shape or np.dtype(dtype) != self._dtype:
            raise DatasetError(f"{self.path}: sensor file member 'data.npy' changed since the dataset was "
                               f"indexed (now {tuple(shape)} {np.dtype(dtype)}, was {self.shape} {self._dtype})")

    def _stream_rows(self, flat: np.ndarray, per: int) -> np.ndarray:
        """Rows ``flat`` (sorted flat row indices, ``per`` rows per first-axis entry) of a
        compressed C-order member, decompressed block by block: memory stays about
        ``STREAM_BLOCK_BYTES`` whatever the file size. Reads the member to its end, so a
        corrupt tail (zlib or CRC error) is reported here too. Returns (n, C) in file dtype."""
        entry_bytes = int(np.prod(self.shape[1:])) * self._dtype.itemsize  # bytes per data[i]
        block = max(1, STREAM_BLOCK_BYTES // max(1, entry_bytes))  # first-axis entries per read
        first = flat // per  # (n,) first-axis index of each wanted row
        out = np.empty((len(flat), self.channels), dtype=self._dtype)
        try:
            with zipfile.ZipFile(self.path) as zf, zf.open("data.npy") as f:
                shape, _, dtype = npz.read_npy_header(f, f"{self.path}: sensor file member 'data.npy'")
                self._check_unchanged(shape, dtype)
                for start in range(0, self.shape[0], block):
                    stop = min(start + block, self.shape[0])
                    buf = f.read((stop - start) * entry_bytes)
                    if len(buf) != (stop - start) * entry_bytes:
                        raise ValueError(f"member ends after {start * entry_bytes + len(buf)} of "
                                         f"{self.shape[0] * entry_bytes} data bytes")
                    lo, hi = np.searchsorted(first, [start, stop])
                    if hi > lo:
                        part = np.frombuffer(buf, dtype=self._dtype).reshape((stop - start,) + self.shape[1:])
                        if self.is_windows:
                            out[lo:hi] = part[first[lo:hi] - start, flat[lo:hi] % per]
                        else:
                            out[lo:hi] = part[first[lo:hi] - start]
                    del buf
                while f.read(STREAM_BLOCK_BYTES):  # to the end: zipfile checks the CRC there
                    pass
        except (DatasetError, MemoryError):
            raise
        except Exception as e:
            raise DatasetError(npz.read_error(self.path, "data.npy", e)) from None
        return out

    def window(self, t: float, size: int) -> np.ndarray:
        """The sensor window ending at time ``t``: (size, C) float32, raw values.

        Raw stream: the last ``size`` samples with timestamp <= t, front zero-padded.
        Pre-cut windows: the last window whose end time <= t, its last ``size`` rows,
        front zero-padded if it is shorter; all zeros when no window ends by t.
        Both compare with ``TIME_EPS`` slack.
        """
        return self.padded_window(t, size)[0]

    def padded_window(self, t: float, size: int) -> tuple[np.ndarray, int]:
        """:meth:`window` and how many of its first rows are padding (no reading yet)."""
        end = int(np.searchsorted(self.timestamps, t + TIME_EPS, side="right"))
        return self.window_before(end, size, t)

    def window_before(self, end: int, size: int, t: float) -> tuple[np.ndarray, int]:
        """:meth:`padded_window` from the row the window ends before (:meth:`end_rows`);
        ``t`` only names the time in messages."""
        out = np.zeros((size, self.channels), dtype=np.float32)
        if self.is_windows:
            if end == 0:
                return out, size
            rows = self.data[end - 1, -size:]  # (<=size, C)
        else:
            rows = self.data[max(0, end - size):end]  # (<=size, C)
        if len(rows):
            out[size - len(rows):] = rows
        if not np.isfinite(out).all():
            bad = int(np.flatnonzero(~np.isfinite(out).all(axis=1))[0]) - (size - len(rows))  # into ``rows``
            channel = int(np.flatnonzero(~np.isfinite(out[size - len(rows) + bad]))[0])
            where = (f"window {end - 1} row {self.data.shape[1] - len(rows) + bad}" if self.is_windows
                     else f"row {max(0, end - size) + bad}")
            raise DatasetError(f"{self.path}: 'data' {where}, channel {channel} is not finite (NaN/inf), in the "
                               f"sensor window ending at t={t:.6f}")
        return out, size - len(rows)

    def sample_rows(self, rng: np.random.Generator, max_rows: int) -> np.ndarray:
        """Up to ``max_rows`` random rows of the stream (windows flattened): (n, C) float64.

        For statistics, in the main process: a compressed member that is not already
        open is streamed block by block (never decompressed whole, never kept), so
        computing stats over many files holds at most one block at a time.
        """
        n_windows = self.shape[0]
        per = self.shape[1] if self.is_windows else 1
        total = n_windows * per
        if total == 0:
            return np.zeros((0, self.channels))
        flat = np.sort(rng.choice(total, size=min(max_rows, total), replace=False))
        data = self._array  # already open in this process: use it, else do not open it for good
        if data is None and self.compressed:
            if self._fortran:  # column-major: cannot stream by rows; decompress, use, drop
                data = self._decompress()
            else:
                return self._checked_rows(self._stream_rows(flat, per))
        if data is None:
            data = self.data  # a memory map: cheap, bounded by the LRU
        if self.is_windows:
            rows = data[flat // per, flat % per]
        else:
            rows = data[flat]
        del data
        return self._checked_rows(rows)

    def _checked_rows(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.float64)
        if not np.isfinite(rows).all():
            raise DatasetError(f"{self.path}: 'data' contains NaN/inf values")
        return rows


# --------------------------------------------------------------------------- episode


@dataclass(eq=False)
class Episode:
    """One loaded episode: everything needed to build its samples, read once.

    Fields:
        path: the episode directory.
        source: the mixture source it belongs to (mixture.yaml ``path``, or the
            top-level folder under the dataset root without a mixture.yaml).
        index: position in the full dataset's episode list (stable across splits);
            reported as ``episode_index`` in samples.
        meta: parsed metadata.json (instruction, camera_views, action_hz, confidence).
        states: robot states (times, unwrapped poses, gripper).
        frame_times: per camera view (in ``meta.camera_views`` order), (F_v,) float64 sorted.
        frame_names: per camera view, (F_v,) bytes file names aligned with ``frame_times``.
        sensor: the sensor file index, or None when the episode has no sensor_data.npz.
        span: (first, last) robot-state time, when ``states`` is not loaded.

    A view made from the dataset index (:meth:`from_index`) has its samples already built:
    ``states`` and ``frame_times`` are None there, ``frame_names`` are views of the index's map.
    """

    path: Path
    source: str
    index: int
    meta: EpisodeMetadata
    states: RobotStates | None
    frame_times: list[np.ndarray] | None
    frame_names: list[np.ndarray]
    sensor: SensorData | None = None
    span: tuple[float, float] | None = None
    _match_cache: dict = field(default_factory=dict, repr=False)

    def __eq__(self, other) -> bool:  # an episode and a view of it made from the index are equal
        return isinstance(other, Episode) and (self.path, self.index) == (other.path, other.index)

    def __hash__(self) -> int:
        return hash((self.path, self.index))

    def index_record(self) -> tuple[dict, dict[str, np.ndarray]]:
        """(small JSON-able record, per-episode arrays) for the dataset index; :meth:`from_index`
        makes the view back from them."""
        meta = {"kind": "folder", "path": str(self.path), "instruction": self.meta.instruction,
                "views": self.meta.camera_views, "action_type": self.meta.action_type,
                "action_hz": self.meta.action_hz, "confidence": self.meta.confidence,
                "span": [self.start_time, self.start_time + self.duration_s],
                "sensor": self.sensor.index_record() if self.sensor is not None else None}
        return meta, {f"frame_names_{v}": names for v, names in enumerate(self.frame_names)}

    @classmethod
    def from_index(cls, meta: dict, index, e: int) -> Episode:
        """Episode ``e`` of a :class:`~vla_ds.data.index.DatasetIndex`, from its record."""
        path = Path(meta["path"])
        info = EpisodeMetadata(meta["instruction"], meta["views"], meta["action_type"], meta["action_hz"],
                               meta["confidence"])
        names = [index.array(f"frame_names_{v}", e) for v in range(len(info.camera_views))]
        sensor = SensorData.from_index(path / SENSOR_FILE, meta["sensor"]) if meta["sensor"] else None
        return cls(path=path, source=index.sources[int(index.column("source")[e])], index=e, meta=info,
                   states=None, frame_times=None, frame_names=names, sensor=sensor, span=tuple(meta["span"]))

    @property
    def camera_views(self) -> list[str]:
        return self.meta.camera_views

    @property
    def instruction(self) -> str:
        return self.meta.instruction

    @property
    def instructions(self) -> list[str]:
        """Every instruction of the episode (one for an episode folder)."""
        return [self.meta.instruction]

    @property
    def confidence(self) -> float:
        return self.meta.confidence

    @property
    def action_hz(self) -> float:
        return self.meta.action_hz

    @property
    def has_sensor(self) -> bool:
        return self.sensor is not None

    @property
    def duration_s(self) -> float:
        """Time spanned by robot_states.csv, in seconds."""
        if self.states is None:
            return float(self.span[1] - self.span[0])
        return float(self.states.times[-1] - self.states.times[0])

    def image_path(self, view_index: int, frame_index: int) -> Path:
        name = os.fsdecode(self.frame_names[view_index][frame_index])
        return self.path / IMAGES_DIR / self.camera_views[view_index] / name

    def match_frames(self, frame_stride: int, tolerance_s: float):
        """Sample times and, per view, the nearest frame (cached per (stride, tolerance)).

        Sample times are every ``frame_stride``-th frame time of the first view. Returns
        ``(times (S,) float64, frame_idx (S, V) int64, dist (S, V) float64)``; a sample is
        valid when every ``dist <= tolerance_s``.
        """
        key = (frame_stride, tolerance_s)
        if key not in self._match_cache:
            times = self.frame_times[0][::frame_stride]
            idx, dist = zip(*(nearest_frames(ft, times) for ft in self.frame_times))
            self._match_cache[key] = (times, np.stack(idx, axis=1), np.stack(dist, axis=1))
        return self._match_cache[key]

    # ---- the episode interface VLADataset uses (shared with LeRobotEpisode)

    action_dim = ACTION_DIM
    action_names = DELTA_POSE_NAMES
    action_units = DELTA_POSE_UNITS

    @property
    def start_time(self) -> float:
        return float(self.states.times[0]) if self.states is not None else float(self.span[0])

    def build_samples(self, config) -> EpisodeSamples:
        """Every sample of this episode under ``config`` (a DataConfig): times, frames per view
        and action chunks. Frames outside the robot_states time range are not samples
        (counted in ``out_of_range``); a sample with a view lacking a frame within
        ``view_tolerance_s`` is a DatasetError, or dropped and counted with on_bad_sample="skip"."""
        cfg = config
        chunk_s = cfg.action_horizon / self.action_hz
        if self.duration_s + 1e-9 < chunk_s:
            raise DatasetError(f"{self.path}: robot_states.csv spans {self.duration_s:.3f} s, shorter than one "
                               f"action chunk ({cfg.action_horizon} steps at {self.action_hz:g} Hz = {chunk_s:.3f} s)")
        if len(self.frame_times[0]) == 0 and cfg.on_bad_sample == "error":
            raise DatasetError(f"{self.path / IMAGES_DIR / self.camera_views[0]}: no .jpg/.png frames "
                               f"(the first camera view sets the sample times)")
        tol = cfg.view_tolerance_s + 1e-9
        t, idx, dist = self.match_frames(cfg.frame_stride, cfg.view_tolerance_s)  # (S,), (S, V), (S, V)
        # Before the first state the pose would be held (zero deltas labelled valid), after
        # the last every step is padding: such frames are not samples. Ends included.
        state_t = self.states.times
        in_range = (t >= state_t[0] - TIME_EPS) & (t <= state_t[-1] + TIME_EPS)  # (S,)
        out_of_range = int((~in_range).sum())
        t, idx, dist = t[in_range], idx[in_range], dist[in_range]
        ok = (dist <= tol).all(axis=1)  # (S,)
        if not ok.all() and cfg.on_bad_sample == "error":
            s = int(np.flatnonzero(~ok)[0])
            v = int(np.flatnonzero(dist[s] > tol)[0])
            near = f"nearest is {dist[s, v]:.3f} s away" if math.isfinite(dist[s, v]) else "the view has no frames"
            raise DatasetError(f"{self.path}: view '{self.camera_views[v]}' has no frame within "
                               f"{cfg.view_tolerance_s:g} s of t={t[s]:.6f} ({near}); "
                               f"on_bad_sample='skip' drops such samples")
        t, idx = t[ok], idx[ok]
        # Every sample's action chunk, once: a sample then reads its row instead of
        # interpolating the robot states again (about 35 us a sample, every epoch).
        actions, is_pad = compute_action_chunks(state_t, self.states.poses, self.states.gripper,
                                                t.astype(np.float64, copy=False), cfg.action_horizon, self.action_hz)
        return EpisodeSamples(t, idx, actions, is_pad, invalid=int((~ok).sum()), out_of_range=out_of_range)

    def view_sources(self, frames: np.ndarray) -> list[tuple[str, Path, str]]:
        """(view name, file, locator within the file) of each view's frame; images are whole files."""
        return [(view, self.image_path(v, frames[v]), "") for v, view in enumerate(self.camera_views)]

    def decode_views(self, frames: np.ndarray) -> list[np.ndarray]:
        """Each view's frame (one row of the sample's frame indices) as uint8 (h, w, 3) RGB."""
        return [decode_image(self.image_path(v, frames[v])) for v in range(len(self.camera_views))]

    def instruction_at(self, t: float) -> str:
        return self.meta.instruction


def decode_image(path: Path) -> np.ndarray:
    """Decode one image file to uint8 (h, w, 3) RGB; a corrupt or truncated file is a DatasetError."""
    try:
        with Image.open(path) as img:
            img.load()
            return np.array(img.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DatasetError(f"{path}: cannot decode image ({e})") from None


def load_episode(episode_dir: str | os.PathLike, source: str = "", index: int = -1,
                 states: RobotStates | None = None) -> Episode:
    """Read one episode directory (metadata, robot states, image index, sensor index);
    ``states``: its robot states when already read (:func:`read_robot_states_many`)."""
    episode_dir = Path(episode_dir)
    meta = read_metadata(episode_dir)
    if states is None:
        states = read_robot_states(episode_dir / ROBOT_STATES_FILE)
    frame_times, frame_names = [], []
    for view in meta.camera_views:
        times, names = index_view_frames(episode_dir / IMAGES_DIR / view)
        frame_times.append(times)
        frame_names.append(names)
    sensor_path = episode_dir / SENSOR_FILE
    sensor = SensorData(sensor_path) if sensor_path.exists() else None
    return Episode(path=episode_dir, source=source, index=index, meta=meta, states=states,
                   frame_times=frame_times, frame_names=frame_names, sensor=sensor)
