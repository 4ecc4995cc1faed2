"""LeRobot datasets (format v2.1 and v3.0), read in place with pyarrow and PyAV.

A LeRobot dataset root holds ``meta/info.json`` (``codebase_version``, ``fps``,
``features``, path templates), per-frame values in parquet and camera streams as MP4::

    v2.1: meta/{info.json, episodes.jsonl, tasks.jsonl}
          data/chunk-000/episode_000000.parquet            one file per episode
          videos/chunk-000/<video_key>/episode_000000.mp4  one file per episode and camera
    v3.0: meta/{info.json, tasks.parquet, episodes/chunk-000/file-000.parquet}
          data/chunk-000/file-000.parquet                  many episodes per file
          videos/<video_key>/chunk-000/file-000.mp4        episodes concatenated; each one's
                                                           start is its from_timestamp

Paths come from info.json's templates; v3 episodes say which file holds them. Everything
but pixels is read when the dataset loads (a few columns of floats per frame); frames are
decoded per sample, in the DataLoader workers, by one open decoder per video file and
process that reads forward when the next frame asked for is just ahead of it.

How features become a sample is :class:`LeRobotConfig` (the data section's ``lerobot``;
docs/lerobot.md): the camera views, the frame's task as the instruction, the action chunk
``action[t .. t+H-1]`` (LeRobot's ``delta_timestamps`` convention: steps past the episode
end repeat the last frame and are padding) or SPEC's delta-pose actions from named pose
components, and optionally float features as the sensor stream (a window of the last W
frames). Every problem is a DatasetError naming the file and, where it applies, the
episode and frame. No ``lerobot`` import: that package pins its own torch.
"""

from __future__ import annotations

import collections
import io
import json
import logging
import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vla_ds.data.actions import (
    DELTA_POSE_NAMES,
    DELTA_POSE_UNITS,
    EpisodeSamples,
    compute_action_chunks,
    index_action_chunks,
    unwrap_degrees,
)
from vla_ds.data.observation import ANGLE_ENCODINGS, ANGLE_UNITS, SensorTransform
from vla_ds.errors import ConfigError, DatasetError

logger = logging.getLogger(__name__)

INFO_FILE = "meta/info.json"
V1_INFO_FILE = "meta_data/info.json"
SUPPORTED_VERSIONS = ("v2.1", "v3.0")
CAMERA_DTYPES = ("video", "image")
ACTION_MODES_HELP = "a feature name (default 'action') or 'delta_pose'"
# Open video files per process (each holds a file descriptor and a decoder).
MAX_OPEN_VIDEOS = 16
# A frame at most this far ahead of a decoder's position is reached by decoding forward
# instead of seeking (a seek lands on a keyframe and decodes from there anyway).
READ_AHEAD_S = 1.0


@dataclass
class LeRobotConfig:
    """How a LeRobot dataset's features become a sample (docs/lerobot.md).

    The defaults train on any typical dataset without configuration: every camera, the
    frame's task, the recorded ``action``, no sensor stream.

    Fields:
        views: camera features (``observation.images.*``, dtype video or image) in the
            order the model sees them; empty = every camera feature in info.json order.
        actions: the feature whose values are the action (its own dimension D), or
            ``"delta_pose"``: SPEC's 7-D ``[dx, dy, dz, da, db, dr, gripper]`` (mm,
            degrees) from the pose components below.
        pose_feature: delta_pose: the feature holding the pose (usually observation.state).
        pose_components: delta_pose: six names (from the feature's ``names``) or indices:
            x, y, z, roll, pitch, yaw.
        gripper_component: delta_pose: the gripper's name or index; "" = none (1.0).
        position_scale: delta_pose: multiplies positions into mm (1000 for metres).
        angle_unit: "rad" or "deg": the unit of recorded angles (pose and sensor_angles).
        sensor_features: float features concatenated per frame into the sensor stream;
            the window is the last W = sensor_window_size frames. Empty = no sensor.
        sensor_angles: components of sensor features that are angles which wrap at ±180°,
            as ``"feature:component"`` (a name or index), e.g. ``"observation.state:yaw"``.
        sensor_angle_encoding: how those angles enter the stream: "sincos" (two channels,
            continuous everywhere), "unwrap" (continuous within an episode) or "raw".
        tolerance_s: a video frame must lie this close to the frame's timestamp (LeRobot's
            ``tolerance_s``, 1e-4 s).
    """

    views: list[str] = field(default_factory=list)
    actions: str = "action"
    pose_feature: str = "observation.state"
    pose_components: list[str] = field(default_factory=list)
    gripper_component: str = ""
    position_scale: float = 1000.0
    angle_unit: str = "rad"
    sensor_features: list[str] = field(default_factory=list)
    sensor_angles: list[str] = field(default_factory=list)
    sensor_angle_encoding: str = "sincos"
    tolerance_s: float = 1e-4

    def __post_init__(self):
        for name in ("views", "pose_components", "sensor_features", "sensor_angles"):
            value = getattr(self, name)
            if value is None:
                value = []
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, (str, int)) for v in value):
                raise ConfigError(f"data.lerobot.{name} must be a list of names, got {value!r}")
            setattr(self, name, [str(v) for v in value])
        if not isinstance(self.actions, str) or not self.actions:
            raise ConfigError(f"data.lerobot.actions must be {ACTION_MODES_HELP}, got {self.actions!r}")
        if self.actions == "delta_pose" and len(self.pose_components) != 6:
            raise ConfigError("data.lerobot.actions='delta_pose' needs data.lerobot.pose_components: six names or "
                              f"indices of {self.pose_feature} (x, y, z, roll, pitch, yaw), got {self.pose_components}")
        if self.angle_unit not in ANGLE_UNITS:
            raise ConfigError(f"data.lerobot.angle_unit must be one of {ANGLE_UNITS}, got {self.angle_unit!r}")
        if self.sensor_angle_encoding not in ANGLE_ENCODINGS:
            raise ConfigError(f"data.lerobot.sensor_angle_encoding must be one of {ANGLE_ENCODINGS}, "
                              f"got {self.sensor_angle_encoding!r}")
        for entry in self.sensor_angles:
            feature = entry.rpartition(":")[0]
            if not feature or feature not in self.sensor_features:
                raise ConfigError(f"data.lerobot.sensor_angles entry {entry!r} must be 'feature:component' with a "
                                  f"feature of data.lerobot.sensor_features {self.sensor_features}")
        for name in ("position_scale", "tolerance_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 \
                    or (name == "position_scale" and v == 0):
                raise ConfigError(f"data.lerobot.{name} must be a number > 0, got {v!r}")


# --------------------------------------------------------------------------- metadata


def is_lerobot_root(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a LeRobot dataset root (any version: v1.x is refused later, by name)."""
    path = Path(path)
    return (path / INFO_FILE).is_file() or (path / V1_INFO_FILE).is_file()


def _read_json(path: Path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DatasetError(f"{path}: not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot read ({e})") from None
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: invalid JSON ({e})") from None


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DatasetError(f"{path}: line {n}: invalid JSON ({e})") from None
                    if not isinstance(row, dict):
                        raise DatasetError(f"{path}: line {n}: expected a JSON object")
                    rows.append(row)
    except FileNotFoundError:
        raise DatasetError(f"{path}: not found (a LeRobot v2.1 dataset lists its episodes there)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot read ({e})") from None
    return rows


def read_info(root: Path) -> dict:
    """``meta/info.json``, checked: a supported ``codebase_version``, ``fps``, ``features``,
    ``data_path`` (and ``video_path`` when a feature is a video)."""
    if not (root / INFO_FILE).is_file() and (root / V1_INFO_FILE).is_file():
        v1 = _read_json(root / V1_INFO_FILE)
        version = v1.get("codebase_version", "v1.x") if isinstance(v1, dict) else "v1.x"
        raise DatasetError(f"{root / V1_INFO_FILE}: LeRobot dataset version {version}; vla_ds reads "
                           f"{' and '.join(SUPPORTED_VERSIONS)} (convert it with LeRobot's "
                           "convert_dataset_v1_to_v2, convert_dataset_v20_to_v21 and convert_dataset_v21_to_v30)")
    path = root / INFO_FILE
    info = _read_json(path)
    if not isinstance(info, dict):
        raise DatasetError(f"{path}: expected a JSON object, got {type(info).__name__}")
    version = info.get("codebase_version")
    if not isinstance(version, str):
        raise DatasetError(f"{path}: no 'codebase_version' (a LeRobot dataset's info.json names its format version)")
    if version not in SUPPORTED_VERSIONS:
        hint = {"v2.0": "convert it with LeRobot's convert_dataset_v20_to_v21 (or on to v3.0)"}.get(
            version, "convert it with LeRobot's dataset conversion scripts")
        raise DatasetError(f"{path}: LeRobot dataset version {version}; vla_ds reads "
                           f"{' and '.join(SUPPORTED_VERSIONS)} ({hint})")
    fps = info.get("fps")
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
        raise DatasetError(f"{path}: 'fps' must be a number > 0, got {fps!r}")
    features = info.get("features")
    if not isinstance(features, dict) or not all(isinstance(v, dict) and "dtype" in v for v in features.values()):
        raise DatasetError(f"{path}: 'features' must map each feature name to {{dtype, shape, names}}")
    if not isinstance(info.get("data_path"), str):
        raise DatasetError(f"{path}: no 'data_path' template")
    if any(f["dtype"] == "video" for f in features.values()) and not isinstance(info.get("video_path"), str):
        raise DatasetError(f"{path}: has video features but no 'video_path' template")
    return info


def _template(info: dict, key: str, **values) -> str:
    try:
        return info[key].format(**values)
    except (KeyError, IndexError, ValueError) as e:
        raise DatasetError(f"{INFO_FILE}: cannot fill the '{key}' template {info[key]!r} ({e!r})") from None


@dataclass
class _EpisodeEntry:
    """Where one episode lives: its data file and, per video feature, (mp4, start in it)."""

    index: int
    length: int
    data_file: Path
    videos: dict[str, tuple[Path, float]]


def _read_tasks(root: Path, version: str) -> dict[int, str]:
    if version == "v2.1":
        path = root / "meta/tasks.jsonl"
        rows = _read_jsonl(path)
        try:
            return {int(r["task_index"]): str(r["task"]) for r in rows}
        except (KeyError, TypeError, ValueError):
            raise DatasetError(f"{path}: every line needs 'task_index' and 'task'") from None
    import pyarrow.parquet as pq

    path = root / "meta/tasks.parquet"
    table = _read_parquet(pq, path)
    # pandas writes the task string, its index, as a column named "task" ("__index_level_0__"
    # when the index had no name); task_index is a plain column.
    names = table.column_names
    column = "task" if "task" in names else "__index_level_0__" if "__index_level_0__" in names else None
    if column is None or "task_index" not in names:
        raise DatasetError(f"{path}: expected columns 'task' and 'task_index', found {names}")
    return dict(zip((int(i) for i in table.column("task_index").to_pylist()),
                    (str(t) for t in table.column(column).to_pylist())))


def _schema_names(pq, path: Path) -> list[str]:
    if not path.is_file():
        raise DatasetError(f"{path}: not found")
    try:
        return pq.read_schema(path).names
    except Exception as e:  # ArrowInvalid, OSError, ... for a damaged file
        raise DatasetError(f"{path}: cannot read parquet ({type(e).__name__}: {' '.join(str(e).split())[:200]})") \
            from None


def _read_parquet(pq, path: Path, columns: list[str] | None = None, filters=None):
    if not path.is_file():
        raise DatasetError(f"{path}: not found")
    try:
        return pq.read_table(path, columns=columns, filters=filters)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for a damaged file
        raise DatasetError(f"{path}: cannot read parquet ({type(e).__name__}: {' '.join(str(e).split())[:200]})") \
            from None


def _read_episode_entries(root: Path, info: dict, video_keys: list[str]) -> list[_EpisodeEntry]:
    version = info["codebase_version"]
    if version == "v2.1":
        path = root / "meta/episodes.jsonl"
        chunks_size = int(info.get("chunks_size", 1000))
        entries = []
        for row in _read_jsonl(path):
            try:
                e, length = int(row["episode_index"]), int(row["length"])
            except (KeyError, TypeError, ValueError):
                raise DatasetError(f"{path}: every line needs 'episode_index' and 'length', got {row}") from None
            chunk = e // chunks_size
            data = root / _template(info, "data_path", episode_chunk=chunk, episode_index=e)
            videos = {k: (root / _template(info, "video_path", episode_chunk=chunk, video_key=k, episode_index=e), 0.0)
                      for k in video_keys}
            entries.append(_EpisodeEntry(e, length, data, videos))
        return sorted(entries, key=lambda x: x.index)

    import pyarrow.parquet as pq

    files = sorted((root / "meta/episodes").glob("*/*.parquet"))
    if not files:
        raise DatasetError(f"{root / 'meta/episodes'}: no episode metadata (chunk-XXX/file-XXX.parquet)")
    entries = []
    for path in files:
        names = _schema_names(pq, path)
        needed = ["episode_index", "length", "data/chunk_index", "data/file_index"] + [
            f"videos/{k}/{c}" for k in video_keys for c in ("chunk_index", "file_index", "from_timestamp")]
        missing = [c for c in needed if c not in names]
        if missing:
            raise DatasetError(f"{path}: missing column '{missing[0]}' of the v3.0 episode metadata")
        cols = _read_parquet(pq, path, columns=needed).to_pydict()
        for i, e in enumerate(cols["episode_index"]):
            data = root / _template(info, "data_path", chunk_index=cols["data/chunk_index"][i],
                                    file_index=cols["data/file_index"][i])
            videos = {k: (root / _template(info, "video_path", video_key=k,
                                            chunk_index=cols[f"videos/{k}/chunk_index"][i],
                                            file_index=cols[f"videos/{k}/file_index"][i]),
                          float(cols[f"videos/{k}/from_timestamp"][i])) for k in video_keys}
            entries.append(_EpisodeEntry(int(e), int(cols["length"][i]), data, videos))
    return sorted(entries, key=lambda x: x.index)


def component_names(feature: str, spec: dict) -> list[str]:
    """The names of a 1-D feature's components (``names`` may be a list, ``{"motors": [...]}``,
    a nested list or null; missing names are ``feature[i]``)."""
    shape = spec.get("shape") or [1]
    size = int(np.prod(shape)) if shape else 1
    names = spec.get("names")
    if isinstance(names, dict):
        names = next(iter(names.values()), None) if len(names) == 1 else None
    if isinstance(names, list) and len(names) == 1 and isinstance(names[0], list):
        names = names[0]
    if isinstance(names, list) and len(names) == size and all(isinstance(n, str) for n in names):
        return list(names)
    return [f"{feature}[{i}]" for i in range(size)]


def _component_index(entry: str, feature: str, names: list[str], where: str) -> int:
    if entry in names:
        return names.index(entry)
    if entry.lstrip("-").isdigit() and -len(names) <= int(entry) < len(names):
        return int(entry) % len(names)
    raise DatasetError(f"{where}: '{feature}' has no component '{entry}' (names: {', '.join(names)})")


# --------------------------------------------------------------------------- parquet columns


def _column_array(table, name: str, path: Path) -> np.ndarray:
    """A numeric column as (rows, D) float64: scalars, fixed-size or variable lists (nested
    lists are flattened per row); nulls become NaN."""
    import pyarrow as pa

    col = table.column(name).combine_chunks()
    n = len(col)
    while pa.types.is_list(col.type) or pa.types.is_large_list(col.type) or pa.types.is_fixed_size_list(col.type):
        col = col.flatten()
    try:
        values = col.to_numpy(zero_copy_only=False).astype(np.float64)
    except (pa.ArrowInvalid, TypeError, ValueError) as e:
        raise DatasetError(f"{path}: column '{name}' is not numeric ({e})") from None
    if n == 0:
        return values.reshape(0, 1)
    if len(values) % n:
        raise DatasetError(f"{path}: column '{name}' has rows of different lengths")
    return values.reshape(n, -1)


# --------------------------------------------------------------------------- video frames


class _VideoReader:
    """One open video file: a decoder and where it stands, so frames just ahead are reached
    by decoding forward, not by a seek."""

    def __init__(self, path: Path):
        import av

        self.path = path
        self.container = av.open(str(path))
        self.stream = self.container.streams.video[0]
        try:
            import torch.utils.data

            if torch.utils.data.get_worker_info() is not None:  # one thread per DataLoader worker
                self.stream.codec_context.thread_count = 1
        except ImportError:
            pass
        self.time_base = float(self.stream.time_base)
        self.frames = None          # the decode iterator
        self.position = -math.inf   # time of the last frame decoded
        self.recent: collections.OrderedDict[float, object] = collections.OrderedDict()  # time -> av frame

    def close(self):
        self.container.close()

    def _seek(self, t: float):
        target = max(0, int(math.floor(t / self.time_base)) - 1)
        self.container.seek(target, stream=self.stream, backward=True, any_frame=False)
        self.frames = self.container.decode(self.stream)
        self.position = -math.inf
        self.recent.clear()

    def _next(self):
        frame = next(self.frames, None)
        if frame is not None:
            self.position = float(frame.pts * self.time_base) if frame.pts is not None else float(frame.time)
            self.recent[self.position] = frame
            while len(self.recent) > 4:
                self.recent.popitem(last=False)
        return frame

    def _decode_to(self, t: float):
        """Decode until the last frame is at or past t (or the stream ends)."""
        while self.position < t and self._next() is not None:
            pass

    def frame(self, t: float, tolerance_s: float, where: str) -> np.ndarray:
        """The frame nearest time t (seconds in this file) as uint8 (h, w, 3) RGB, or a
        DatasetError naming the file, ``where`` (episode, frame) and the nearest frame time."""
        import av

        try:
            if not any(abs(ft - t) <= tolerance_s for ft in self.recent):
                if self.frames is None or not self.position < t <= self.position + READ_AHEAD_S:
                    self._seek(t - tolerance_s)
                self._decode_to(t)
                if self.recent and min(self.recent) > t + tolerance_s and t > 0:
                    self._seek(0.0)  # the seek overshot (an unusual index): read from the start
                    self._decode_to(t)
        except (av.error.FFmpegError, ValueError, RuntimeError) as e:
            self.frames = None
            raise DatasetError(f"{self.path}: {where}: cannot decode the video at t={t:.4f} s ({e})") from None
        if not self.recent:
            raise DatasetError(f"{self.path}: {where}: no video frames (empty or undecodable stream)")
        nearest = min(self.recent, key=lambda ft: abs(ft - t))
        if abs(nearest - t) > tolerance_s:
            raise DatasetError(f"{self.path}: {where}: no frame within {tolerance_s:g} s of t={t:.6f} s "
                               f"(nearest at {nearest:.6f} s); data.lerobot.tolerance_s sets the tolerance")
        return self.recent[nearest].to_ndarray(format="rgb24")


class _OpenVideos:
    """This process's open video files (an LRU); emptied in a forked child."""

    def __init__(self):
        self._readers: collections.OrderedDict[Path, _VideoReader] = collections.OrderedDict()
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._inherited: list[_VideoReader] = []

    def frame(self, path: Path, t: float, tolerance_s: float, where: str) -> np.ndarray:
        with self._lock:
            if self._pid != os.getpid():  # a forked DataLoader worker: never share the parent's decoders,
                # and never close them either: closing joins decoder threads that only exist in
                # the parent, which would hang this process. They stay referenced, unused.
                self._inherited.extend(self._readers.values())
                self._readers = collections.OrderedDict()
                self._pid = os.getpid()
            reader = self._readers.pop(path, None)
            if reader is None:
                reader = _open_video(path, where)
            self._readers[path] = reader
            while len(self._readers) > MAX_OPEN_VIDEOS:
                self._readers.popitem(last=False)[1].close()
            return reader.frame(t, tolerance_s, where)


def _open_video(path: Path, where: str) -> _VideoReader:
    import av

    if not path.is_file():
        raise DatasetError(f"{path}: {where}: video file not found")
    try:
        return _VideoReader(path)
    except (av.error.FFmpegError, IndexError, ValueError, OSError) as e:
        raise DatasetError(f"{path}: {where}: cannot open the video ({e if str(e) else 'no video stream'})") from None


def video_duration_s(path: Path) -> float:
    """A video's duration in seconds (stream duration, else the container's), or DatasetError."""
    import av

    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            if stream.duration is not None:
                return float(stream.duration * stream.time_base)
            if container.duration is not None:
                return container.duration / av.time_base
            return math.inf
    except (av.error.FFmpegError, IndexError, ValueError, OSError) as e:
        raise DatasetError(f"{path}: cannot open the video ({e if str(e) else 'no video stream'})") from None


_VIDEOS = _OpenVideos()
_IMAGE_CACHE: collections.OrderedDict = collections.OrderedDict()
_IMAGE_CACHE_LOCK = threading.Lock()


def _episode_images(data_file: Path, key: str, episode: int) -> list:
    """PNG/JPEG bytes of an image-dtype feature for one episode (embedded in the data
    parquet as ``{bytes, path}`` structs), in frame order; a few episodes are kept."""
    import pyarrow.parquet as pq

    cache_key = (os.getpid(), data_file, key, episode)
    with _IMAGE_CACHE_LOCK:
        if cache_key in _IMAGE_CACHE:
            _IMAGE_CACHE.move_to_end(cache_key)
            return _IMAGE_CACHE[cache_key]
    table = _read_parquet(pq, data_file, columns=[key, "frame_index"], filters=[("episode_index", "=", episode)])
    order = np.argsort(table.column("frame_index").to_numpy())
    cells = table.column(key).to_pylist()
    images = [cells[i] for i in order]
    with _IMAGE_CACHE_LOCK:
        _IMAGE_CACHE[cache_key] = images
        while len(_IMAGE_CACHE) > 8:
            _IMAGE_CACHE.popitem(last=False)
    return images


def _decode_image_cell(cell, root: Path, data_file: Path, key: str, where: str) -> np.ndarray:
    from PIL import Image

    try:
        if isinstance(cell, dict) and cell.get("bytes"):
            source = io.BytesIO(cell["bytes"])
        elif isinstance(cell, dict) and cell.get("path"):
            source = root / cell["path"]
        else:
            raise ValueError("no image bytes or path")
        with Image.open(source) as img:
            img.load()
            return np.array(img.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DatasetError(f"{data_file}: {where}: cannot decode image '{key}' ({e})") from None


# --------------------------------------------------------------------------- sensor


class FrameSensor:
    """A sensor stream made of per-frame features: the raw feature rows at the frame
    timestamps, made into windows by the policy's :class:`SensorTransform` (the function a
    served policy applies to a robot's raw state). Offers what VLADataset and the norm
    stats use of a sensor file."""

    def __init__(self, path: Path, times: np.ndarray, values: dict[str, np.ndarray], transform: SensorTransform):
        self.path = path
        self.times = times            # (T,) float64
        self.values = values          # feature -> (T, D) float64 raw rows
        self.transform = transform
        self.channel_names = transform.channel_names
        self.channels = transform.channels

    def padded_window(self, t: float, size: int) -> tuple[np.ndarray, int]:
        """The window of the last ``size`` frames at or before t, front zero-padded:
        ((size, C), padded rows)."""
        return self.window_before(int(self.end_rows([t])[0]), size, t)

    def end_rows(self, times) -> np.ndarray:
        """(S,) int64: for each time, the frame its window ends before (frames at or before it)."""
        return np.searchsorted(self.times, np.asarray(times, dtype=np.float64) + 1e-9, side="right").astype(np.int64)

    def window_before(self, end: int, size: int, t: float) -> tuple[np.ndarray, int]:
        """:meth:`padded_window` from the frame the window ends before (:meth:`end_rows`)."""
        if end == 0:
            return np.zeros((size, self.channels), dtype=np.float32), size
        return self.transform.window({f: v[max(0, end - size):end] for f, v in self.values.items()}, size)

    def window(self, t: float, size: int) -> np.ndarray:
        return self.padded_window(t, size)[0]

    def sample_rows(self, rng: np.random.Generator, max_rows: int) -> np.ndarray:
        n = len(self.times)
        idx = np.sort(rng.choice(n, size=min(n, max_rows), replace=False)) if n > max_rows else np.arange(n)
        return self.transform.rows({f: v[idx] for f, v in self.values.items()}).astype(np.float64)


def sensor_transform(config: LeRobotConfig, names: dict[str, list[str]], where: Path | str) -> SensorTransform:
    """The transform ``data.lerobot``'s sensor settings describe, with the features' component
    names (from ``meta/info.json``): what the policy records and applies to raw frames."""
    angles = []
    for entry in config.sensor_angles:
        feature, _, component = entry.rpartition(":")
        angles.append((feature, _component_index(component, feature, names[feature], str(where))))
    return SensorTransform(tuple((f, tuple(names[f])) for f in config.sensor_features), tuple(sorted(set(angles))),
                           config.sensor_angle_encoding, config.angle_unit)


class FrameHistory:
    """The raw sensor features of the last W frames, kept as they arrive (a simulator, a
    robot): what a ``"state"`` request carries. The policy makes its window of them with the
    :class:`SensorTransform` its training samples were made with, so the two cannot differ.

    Args:
        features: the raw features to keep (the server metadata's ``state.features``).
        window_size: W, the frames kept.
    """

    def __init__(self, features: list[str], window_size: int):
        self.features = list(features)
        self.window_size = window_size
        self.values: dict[str, list[np.ndarray]] = {f: [] for f in self.features}

    @property
    def has_sensor(self) -> bool:
        return bool(self.features)

    def reset(self) -> None:
        self.values = {f: [] for f in self.features}

    def append(self, frame: dict) -> None:
        """Add the next frame (its sensor features; other keys are not kept)."""
        for f in self.features:
            rows = self.values[f]
            rows.append(np.asarray(frame[f], dtype=np.float64).reshape(-1))  # as the reader holds columns
            del rows[:-self.window_size]

    def state(self) -> dict[str, np.ndarray] | None:
        """{feature: (T, D) float64} of the last T <= W frames, oldest first; None without
        features or frames."""
        if not self.has_sensor or not self.values[self.features[0]]:
            return None
        return {f: np.stack(v) for f, v in self.values.items()}


# --------------------------------------------------------------------------- episodes


class LeRobotEpisode:
    """One episode of a LeRobot dataset, with the interface VLADataset uses of an episode
    (``build_samples``, ``decode_views``, ``view_sources``, ``instruction_at``, ``sensor``).

    ``path`` is ``<root>/episode_NNNNNN``: a name for messages, splits and reports (the files
    it reads are in messages about them). A sample's ``frames`` row holds the episode frame
    (row) each view shows: the same frame for every view, matched in the video by time.
    """

    confidence = 1.0

    def __init__(self, root: Path, entry: _EpisodeEntry, source: str, fps: float, views: list[tuple[str, str]],
                 timestamps: np.ndarray, task_index: np.ndarray, tasks: dict[int, str], actions: np.ndarray | None,
                 poses: tuple[np.ndarray, np.ndarray | None] | None, action_names, action_units,
                 sensor: FrameSensor | None, bad_rows: np.ndarray, config: LeRobotConfig,
                 missing_video: str = ""):
        self.root = root
        self.entry = entry
        self.path = root / f"episode_{entry.index:06d}"
        self.source = source
        self.index = -1
        self.action_hz = float(fps)
        self.views = views                      # [(feature, "video" | "image")]
        self.camera_views = [k for k, _ in views]
        self.timestamps = timestamps            # (T,) float64, the parquet's per-episode times
        self.task_index = task_index            # (T,) int64
        self.tasks = tasks
        self.actions = actions                  # (T, D) recorded action, or None with delta_pose
        self.poses = poses                      # ((T, 6) mm/deg unwrapped, gripper (T,) or None) with delta_pose
        self.action_dim = len(action_names)
        self.action_names = tuple(action_names)
        self.action_units = tuple(action_units)
        self.sensor = sensor
        self.bad_rows = bad_rows                # (T,) rows with NaN in a used feature (skipped samples)
        self.config = config
        self.missing_video = missing_video      # with on_bad_sample="skip": why no sample can be read

    @property
    def has_sensor(self) -> bool:
        return self.sensor is not None

    def __eq__(self, other) -> bool:  # an episode and a view of it made from the index are equal
        return isinstance(other, LeRobotEpisode) and (self.path, self.index) == (other.path, other.index)

    def __hash__(self) -> int:
        return hash((self.path, self.index))

    def index_record(self) -> tuple[dict, dict[str, np.ndarray]]:
        """(small JSON-able record, per-frame arrays) for the dataset index: what reading a
        sample needs (frame times and tasks, the sensor features' rows), not the actions,
        which the index holds per sample. :meth:`from_index` makes the view back."""
        used = {int(i): self.tasks[int(i)] for i in np.unique(self.task_index)}
        meta = {"kind": "lerobot", "root": str(self.root), "index": self.entry.index, "length": self.entry.length,
                "data_file": str(self.entry.data_file),
                "videos": {k: [str(path), offset] for k, (path, offset) in self.entry.videos.items()},
                "fps": self.action_hz, "views": [list(v) for v in self.views], "tasks": used,
                "action_names": list(self.action_names), "action_units": list(self.action_units),
                "tolerance_s": self.config.tolerance_s,
                "transform": self.sensor.transform.to_dict() if self.sensor is not None else None}
        arrays = {"lerobot.timestamp": self.timestamps, "lerobot.task_index": self.task_index}
        if self.sensor is not None:
            arrays.update({f"lerobot.{f}": np.asarray(v, dtype=np.float64) for f, v in self.sensor.values.items()})
        return meta, arrays

    @classmethod
    def from_index(cls, meta: dict, index, e: int) -> LeRobotEpisode:
        """Episode ``e`` of a :class:`~vla_ds.data.index.DatasetIndex`, from its record: its
        arrays are views of the index's map; it reads samples, it does not build them."""
        entry = _EpisodeEntry(meta["index"], meta["length"], Path(meta["data_file"]),
                              {k: (Path(path), float(offset)) for k, (path, offset) in meta["videos"].items()})
        times = index.array("lerobot.timestamp", e)
        sensor = None
        if meta["transform"] is not None:
            transform = SensorTransform.from_dict(meta["transform"])
            values = {f: index.array(f"lerobot.{f}", e) for f, _ in transform.features}
            sensor = FrameSensor(entry.data_file, times, values, transform)
        episode = cls(Path(meta["root"]), entry, index.sources[int(index.column("source")[e])], meta["fps"],
                      [tuple(v) for v in meta["views"]], times, index.array("lerobot.task_index", e),
                      {int(k): v for k, v in meta["tasks"].items()}, None, None, meta["action_names"],
                      meta["action_units"], sensor, np.zeros(0, dtype=bool),
                      LeRobotConfig(tolerance_s=meta["tolerance_s"]))
        episode.index = e
        return episode

    @property
    def instruction(self) -> str:
        return self.instruction_at(float(self.timestamps[0]))

    @property
    def start_time(self) -> float:
        return float(self.timestamps[0])

    @property
    def duration_s(self) -> float:
        return float(self.timestamps[-1] - self.timestamps[0])

    @property
    def instructions(self) -> list[str]:
        """The distinct tasks of the episode's frames, in task_index order."""
        return [self.tasks[int(i)] for i in np.unique(self.task_index)]

    def instruction_at(self, t: float) -> str:
        row = min(int(np.searchsorted(self.timestamps, t - 1e-9)), len(self.timestamps) - 1)
        return self.tasks[int(self.task_index[row])]

    def build_samples(self, config) -> EpisodeSamples:
        """A sample at every ``frame_stride``-th frame; its chunk is the next H actions
        (padded past the end). Rows with NaN were refused at load, or (skip) the samples
        whose chunk or sensor window reads them are dropped and counted."""
        h, w = config.action_horizon, config.sensor_window_size
        n = len(self.timestamps)
        rows = np.arange(0, n, config.frame_stride)
        if self.actions is not None:
            actions, is_pad = index_action_chunks(self.actions, rows, h)
            reach = h - 1
        else:
            poses, gripper = self.poses
            actions, is_pad = compute_action_chunks(self.timestamps, poses, gripper, self.timestamps[rows], h,
                                                    self.action_hz)
            reach = h
        ok = np.ones(len(rows), dtype=bool)
        if self.missing_video:
            ok[:] = False
        elif self.bad_rows.any():
            bad = np.concatenate([[0], np.cumsum(self.bad_rows)])  # bad rows before each row
            ok &= bad[np.minimum(rows + reach + 1, n)] == bad[rows]
            if self.sensor is not None:
                ok &= bad[rows + 1] == bad[np.maximum(rows + 1 - w, 0)]
        frames = np.repeat(rows[:, None], len(self.views), axis=1)  # (S, V)
        return EpisodeSamples(self.timestamps[rows[ok]], frames[ok], actions[ok], is_pad[ok],
                              invalid=int((~ok).sum()))

    def _row(self, frames) -> int:
        return int(frames[0])

    def view_sources(self, frames) -> list[tuple[str, Path, str]]:
        row = self._row(frames)
        out = []
        for key, dtype in self.views:
            if dtype == "video":
                path, offset = self.entry.videos[key]
                out.append((key, path, f"t={offset + float(self.timestamps[row]):.6f}"))
            else:
                out.append((key, self.entry.data_file, f"episode={self.entry.index},frame={row}"))
        return out

    def decode_views(self, frames) -> list[np.ndarray]:
        row = self._row(frames)
        where = f"episode {self.entry.index} frame {row} (t={float(self.timestamps[row]):.4f} s)"
        images = []
        for key, dtype in self.views:
            if dtype == "video":
                path, offset = self.entry.videos[key]
                images.append(_VIDEOS.frame(path, offset + float(self.timestamps[row]), self.config.tolerance_s,
                                            where))
            else:
                cells = _episode_images(self.entry.data_file, key, self.entry.index)
                if row >= len(cells):
                    raise DatasetError(f"{self.entry.data_file}: {where}: no '{key}' image for this frame")
                images.append(_decode_image_cell(cells[row], self.root, self.entry.data_file, key, where))
        return images


def _camera_views(config: LeRobotConfig, features: dict, info_path: Path) -> list[tuple[str, str]]:
    cameras = [k for k, f in features.items() if f["dtype"] in CAMERA_DTYPES]
    if not config.views:
        views = [k for k in cameras if k.startswith("observation.image")] or cameras
        if not views:
            raise DatasetError(f"{info_path}: no camera features (dtype video or image); the policy needs at "
                               "least one view")
        return [(k, features[k]["dtype"]) for k in views]
    for k in config.views:
        if k not in features:
            raise DatasetError(f"{info_path}: data.lerobot.views names '{k}', which the dataset does not have "
                               f"(cameras: {', '.join(cameras) or 'none'})")
        if features[k]["dtype"] not in CAMERA_DTYPES:
            raise DatasetError(f"{info_path}: data.lerobot.views names '{k}', a {features[k]['dtype']} feature, "
                               "not a camera (dtype video or image)")
    return [(k, features[k]["dtype"]) for k in config.views]


def _numeric_feature(name: str, features: dict, info_path: Path, role: str) -> dict:
    if name not in features:
        numeric = [k for k, f in features.items() if f["dtype"] not in CAMERA_DTYPES + ("string", "language")]
        raise DatasetError(f"{info_path}: {role} '{name}' is not a feature of this dataset "
                           f"(numeric features: {', '.join(numeric)})")
    spec = features[name]
    if spec["dtype"] in CAMERA_DTYPES or spec["dtype"] in ("string", "language"):
        raise DatasetError(f"{info_path}: {role} '{name}' is a {spec['dtype']} feature, not numbers")
    return spec


def load_lerobot_episodes(root: str | os.PathLike, config: LeRobotConfig, source: str = "",
                          on_bad_sample: str = "error") -> list[LeRobotEpisode]:
    """Every episode of the LeRobot dataset at ``root``: metadata, the per-frame columns the
    config uses and each video's presence and length (no frame is decoded). Problems are a
    DatasetError naming the file, episode and frame; with ``on_bad_sample="skip"`` a frame
    with NaN, or an episode whose video is missing or too short, drops the samples that need
    it (counted by VLADataset, reported per episode)."""
    import pyarrow.parquet as pq

    root = Path(root)
    info = read_info(root)
    info_path = root / INFO_FILE
    features = info["features"]
    fps = float(info["fps"])
    views = _camera_views(config, features, info_path)
    video_keys = [k for k, dtype in views if dtype == "video"]
    tasks = _read_tasks(root, info["codebase_version"])
    entries = _read_episode_entries(root, info, video_keys)
    if not entries:
        raise DatasetError(f"{info_path}: the dataset lists no episodes")

    # What each frame needs, by feature.
    if config.actions == "delta_pose":
        _numeric_feature(config.pose_feature, features, info_path, "data.lerobot.pose_feature")
        pose_names = component_names(config.pose_feature, features[config.pose_feature])
        pose_idx = [_component_index(c, config.pose_feature, pose_names, str(info_path))
                    for c in config.pose_components]
        grip_idx = (_component_index(config.gripper_component, config.pose_feature, pose_names, str(info_path))
                    if config.gripper_component else None)
        action_names, action_units = DELTA_POSE_NAMES, DELTA_POSE_UNITS
        used = [config.pose_feature]
    else:
        spec = _numeric_feature(config.actions, features, info_path, "the action feature (data.lerobot.actions)")
        action_names = component_names(config.actions, spec)
        action_units = ("",) * len(action_names)
        used = [config.actions]
    names = {}
    for feature in config.sensor_features:
        names[feature] = component_names(feature, _numeric_feature(feature, features, info_path,
                                                                   "data.lerobot.sensor_features entry"))
        if feature not in used:
            used.append(feature)
    transform = sensor_transform(config, names, info_path) if config.sensor_features else None

    by_file: dict[Path, list[_EpisodeEntry]] = collections.defaultdict(list)
    for entry in entries:
        by_file[entry.data_file].append(entry)
    durations: dict[Path, float] = {}
    episodes = []
    for data_file, file_entries in by_file.items():
        if not data_file.is_file():
            raise DatasetError(f"{data_file}: data file not found (episode {file_entries[0].index}, "
                               f"from {INFO_FILE}'s data_path)")
        schema = _schema_names(pq, data_file)
        for column in ["timestamp", "frame_index", "episode_index", "task_index"] + used:
            if column not in schema:
                raise DatasetError(f"{data_file}: no column '{column}'")
        table = _read_parquet(pq, data_file, columns=["timestamp", "frame_index", "episode_index", "task_index"] + used)
        ep_col = table.column("episode_index").to_numpy()
        order = np.lexsort((table.column("frame_index").to_numpy(), ep_col))
        ep_sorted = ep_col[order]
        values_all = {f: _column_array(table, f, data_file)[order] for f in used}
        times_all = table.column("timestamp").to_numpy().astype(np.float64)[order]
        frame_all = table.column("frame_index").to_numpy()[order]
        task_all = table.column("task_index").to_numpy()[order]
        for entry in file_entries:
            lo, hi = np.searchsorted(ep_sorted, entry.index, "left"), np.searchsorted(ep_sorted, entry.index, "right")
            if hi == lo:
                raise DatasetError(f"{data_file}: no rows for episode {entry.index} (meta lists {entry.length} frames)")
            where = f"{data_file}: episode {entry.index}"
            values = {f: v[lo:hi] for f, v in values_all.items()}
            times = times_all[lo:hi]
            if not np.isfinite(times).all() or (np.diff(times) <= 0).any():
                raise DatasetError(f"{where}: timestamps are not finite and increasing")
            unknown = sorted(set(np.unique(task_all[lo:hi]).tolist()) - set(tasks))
            if unknown:
                raise DatasetError(f"{where}: task_index {unknown[0]} is not in the dataset's tasks "
                                   f"({'meta/tasks.jsonl' if info['codebase_version'] == 'v2.1' else 'meta/tasks.parquet'})")
            bad_rows = np.zeros(hi - lo, dtype=bool)
            for f, v in values.items():
                nan = ~np.isfinite(v).all(axis=1)
                if nan.any():
                    first = int(np.flatnonzero(nan)[0])
                    if on_bad_sample == "error":
                        raise DatasetError(f"{where} frame {int(frame_all[lo + first])}: '{f}' has NaN or inf "
                                           f"({int(nan.sum())} frames); on_bad_sample='skip' drops the samples "
                                           "that use them")
                    bad_rows |= nan
            missing_video = ""
            for key in video_keys:
                path, offset = entry.videos[key]
                if not path.is_file():
                    missing_video = f"{path}: video file not found (episode {entry.index}, '{key}')"
                else:
                    if path not in durations:
                        durations[path] = video_duration_s(path)
                    need = offset + float(times[-1]) - config.tolerance_s
                    if durations[path] < need:
                        missing_video = (f"{path}: the video lasts {durations[path]:.4f} s, but episode "
                                         f"{entry.index} needs a frame at {offset + float(times[-1]):.4f} s")
                if missing_video:
                    if on_bad_sample == "error":
                        raise DatasetError(missing_video)
                    logger.warning("%s; the episode's samples are skipped", missing_video)
                    break
            if config.actions == "delta_pose":
                pose = values[config.pose_feature]
                deg = 1.0 if config.angle_unit == "deg" else 180.0 / math.pi
                xyz = pose[:, pose_idx[:3]] * config.position_scale
                angles = unwrap_degrees(np.nan_to_num(pose[:, pose_idx[3:]]) * deg)
                poses = (np.concatenate([xyz, angles], axis=1), pose[:, grip_idx] if grip_idx is not None else None)
                actions = None
            else:
                poses, actions = None, values[config.actions].astype(np.float32)
            sensor = None
            if config.sensor_features:
                sensor = FrameSensor(data_file, times, {f: values[f] for f in config.sensor_features}, transform)
            episodes.append(LeRobotEpisode(
                root, entry, source, fps, views, times, task_all[lo:hi].astype(np.int64), tasks, actions, poses,
                action_names, action_units, sensor, bad_rows, config, missing_video))
    episodes.sort(key=lambda ep: ep.entry.index)
    logger.info("LeRobot %s dataset %s: %d episodes, %g fps, views %s, actions '%s' (D=%d)%s",
                info["codebase_version"], root, len(episodes), fps, ", ".join(k for k, _ in views), config.actions,
                len(action_names), f", sensor {', '.join(config.sensor_features)}" if config.sensor_features else "")
    return episodes
