"""Write LeRobot v3.0 datasets, frame by frame, without the ``lerobot`` package.

The API follows ``lerobot.datasets.LeRobotDataset``'s recording calls::

    from vla_ds.data.lerobot_writer import LeRobotDatasetWriter

    features = {
        "observation.images.front": {"dtype": "video", "shape": [480, 640, 3],
                                     "names": ["height", "width", "channels"]},
        "observation.state": {"dtype": "float32", "shape": [7], "names": ["x", "y", "z", ...]},
        "action": {"dtype": "float32", "shape": [7], "names": [...]},
    }
    writer = LeRobotDatasetWriter.create("data/my_robot", fps=30, features=features, robot_type="my_arm")
    for episode in recording:
        for t in episode:
            writer.add_frame({"observation.images.front": rgb, "observation.state": state,
                              "action": action, "task": "pick up the cup"})
        writer.save_episode()            # or writer.clear_episode_buffer() to drop it
    writer.finalize()                    # closes the files: the dataset is complete

What it writes is LeRobot's v3.0 layout (checked against LeRobot's own source:
``datasets/{dataset_writer,dataset_metadata,io_utils,utils,feature_utils,video_utils,
compute_stats}.py``, ``configs/video.py``)::

    meta/info.json                      codebase_version v3.0, fps, features (+ video info), totals
    meta/stats.json                     per-feature min/max/mean/std/count/q01..q99, aggregated
    meta/tasks.parquet                  task strings (pandas index "task") -> task_index
    meta/episodes/chunk-000/file-000.parquet   one row per episode: length, tasks, where its
                                        rows and video frames are, its stats
    data/chunk-000/file-000.parquet     the frames' numeric features (image features as
                                        PNG bytes), many episodes per file
    videos/<key>/chunk-000/file-000.mp4 the episodes of a camera one after the other; an
                                        episode starts at its from_timestamp

Video frames are encoded as they arrive (H.264 or AV1, yuv420p, a keyframe every ``g``
frames as LeRobot's defaults) into a file per episode and camera, which ``save_episode``
appends to the camera's current file by stream copy, as LeRobot's concatenation does. A data
or video file is closed and the next one started when it passes its size limit (100 / 200
MB, LeRobot's defaults). ``finalize`` must run: parquet and MP4 files are complete only once
closed (the recorder calls it also when interrupted).

The helpers at the bottom (stats, arrow schemas, video info) are shared with the
tests' reference writer (tests/lerobot_writer.py), which also writes v2.1.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vla_ds.errors import DatasetError

logger = logging.getLogger(__name__)

CODEBASE_VERSION = "v3.0"
DEFAULT_CHUNK_SIZE = 1000  # files per chunk directory
DEFAULT_DATA_FILE_SIZE_IN_MB = 100
DEFAULT_VIDEO_FILE_SIZE_IN_MB = 200
CHUNK_FILE_PATTERN = "chunk-{chunk_index:03d}/file-{file_index:03d}"
INFO_PATH = "meta/info.json"
STATS_PATH = "meta/stats.json"
TASKS_PATH = "meta/tasks.parquet"
EPISODES_PATH = "meta/episodes/" + CHUNK_FILE_PATTERN + ".parquet"
DATA_PATH = "data/" + CHUNK_FILE_PATTERN + ".parquet"
VIDEO_PATH = "videos/{video_key}/" + CHUNK_FILE_PATTERN + ".mp4"
METADATA_BUFFER_SIZE = 10  # meta/episodes rows per row group (LeRobot's metadata_buffer_size)

# utils/constants.py DEFAULT_FEATURES: appended after the user's features.
DEFAULT_FEATURES = {
    "timestamp": {"dtype": "float32", "shape": [1], "names": None},
    "frame_index": {"dtype": "int64", "shape": [1], "names": None},
    "episode_index": {"dtype": "int64", "shape": [1], "names": None},
    "index": {"dtype": "int64", "shape": [1], "names": None},
    "task_index": {"dtype": "int64", "shape": [1], "names": None},
}
DEFAULT_QUANTILES = [0.01, 0.10, 0.50, 0.90, 0.99]  # compute_stats.DEFAULT_QUANTILES
CAMERA_DTYPES = ("video", "image")
# codec -> (PyAV encoder, crf, preset). AV1 as LeRobot's default (libsvtav1, crf 30, preset
# 12); H.264 with x264's "fast" preset, B-frames off so that every episode's packets can be
# appended to a file by plain stream copy.
VIDEO_CODECS = {"h264": ("libx264", 23, "fast"), "av1": ("libsvtav1", 30, 12)}
VIDEO_GOP = 2  # LeRobot's g: a keyframe every 2 frames, for random access in training


class LeRobotDatasetWriter:
    """Records a LeRobot v3.0 dataset under ``root`` (see the module docstring).

    Use :meth:`create`; then :meth:`add_frame` per time step, :meth:`save_episode` per
    episode and :meth:`finalize` once. ``features`` maps names to ``{"dtype", "shape",
    "names"}`` as LeRobot's ``create``: ``"video"`` or ``"image"`` cameras of shape
    (H, W, 3) uint8 RGB, numeric features of shape (D,) (``float32``, ``int64``, ``bool``,
    ...). The default features (timestamp, frame/episode/global index, task_index) are
    added; a frame must carry every user feature plus ``"task"`` (a string).
    """

    def __init__(self, root: Path, fps: int, features: dict, robot_type: str | None, video_codec: str,
                 crf: int | None, data_file_mb: float, video_file_mb: float, chunks_size: int):
        self.root = root
        self.fps = fps
        self.features = features
        self.robot_type = robot_type
        self.video_keys = [k for k, f in features.items() if f["dtype"] == "video"]
        self.image_keys = [k for k, f in features.items() if f["dtype"] == "image"]
        encoder, default_crf, preset = VIDEO_CODECS[video_codec]
        self.encoder_config = {"vcodec": encoder, "pix_fmt": "yuv420p", "g": VIDEO_GOP,
                               "crf": default_crf if crf is None else crf, "preset": preset,
                               "fast_decode": 0, "video_backend": "pyav", "extra_options": {}}
        self.data_file_bytes = data_file_mb * 2 ** 20
        self.video_file_bytes = video_file_mb * 2 ** 20
        self.chunks_size = chunks_size
        self.tasks: list[str] = []
        self.num_episodes = 0
        self.num_frames = 0
        self.episode_rows: list[dict] = []
        self.episode_stats: list[dict] = []
        self._tmp = Path(tempfile.mkdtemp(prefix=".recording-", dir=root))
        self._data = _RollingParquet(root, DATA_PATH, self.data_file_bytes, chunks_size)
        self._videos = {k: _RollingVideo(root, k, self.video_file_bytes, chunks_size) for k in self.video_keys}
        self._buffer: dict[str, list] = {}
        self._encoders: dict[str, _EpisodeVideo] = {}
        self._finalized = False

    @classmethod
    def create(cls, root: str | os.PathLike, fps: int, features: dict, robot_type: str | None = None,
               video_codec: str = "h264", crf: int | None = None,
               data_files_size_in_mb: float = DEFAULT_DATA_FILE_SIZE_IN_MB,
               video_files_size_in_mb: float = DEFAULT_VIDEO_FILE_SIZE_IN_MB,
               chunks_size: int = DEFAULT_CHUNK_SIZE) -> LeRobotDatasetWriter:
        """A writer for a new dataset at ``root`` (missing or empty: a dataset is never
        overwritten). ``video_codec``: "h264" (libx264) or "av1" (libsvtav1, LeRobot's
        default); ``crf`` overrides the codec's quality setting."""
        root = Path(root)
        if root.exists() and (not root.is_dir() or any(root.iterdir())):
            raise DatasetError(f"{root}: exists and is not an empty directory; a recording never overwrites data")
        if video_codec not in VIDEO_CODECS:
            raise DatasetError(f"video codec must be one of {', '.join(VIDEO_CODECS)}, got {video_codec!r}")
        if isinstance(fps, bool) or not isinstance(fps, int) or fps <= 0:
            raise DatasetError(f"{root}: fps must be a positive integer, got {fps!r}")
        checked = {}
        for name, spec in features.items():
            checked[name] = _check_feature(name, spec)
        for name in DEFAULT_FEATURES:
            if name in checked:
                raise DatasetError(f"feature '{name}' is one of LeRobot's default features; it is added for you")
        checked.update(json.loads(json.dumps(DEFAULT_FEATURES)))
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DatasetError(f"{root}: cannot create the dataset directory ({e.strerror or e})") from None
        return cls(root, fps, checked, robot_type, video_codec, crf, data_files_size_in_mb,
                   video_files_size_in_mb, chunks_size)

    # -- recording ---------------------------------------------------------------------

    @property
    def episode_buffer_size(self) -> int:
        """Frames added since the last :meth:`save_episode` / :meth:`clear_episode_buffer`."""
        return len(self._buffer.get("task", []))

    def add_frame(self, frame: dict[str, Any]) -> None:
        """Add one time step: every user feature (camera images uint8 (H, W, 3)) and ``task``."""
        if self._finalized:
            raise DatasetError(f"{self.root}: the dataset is finalized; no more frames can be added")
        expected = [k for k in self.features if k not in DEFAULT_FEATURES] + ["task"]
        missing = [k for k in expected if k not in frame]
        extra = [k for k in frame if k not in expected]
        if missing or extra:
            raise DatasetError(f"{self.root}: frame {self.episode_buffer_size} of episode {self.num_episodes}: "
                               + (f"missing {missing}" if missing else "") + ("; " if missing and extra else "")
                               + (f"unknown {extra}" if extra else ""))
        task = frame["task"]
        if not isinstance(task, str) or not task:
            raise DatasetError(f"{self.root}: 'task' must be a non-empty string, got {task!r}")
        index = self.episode_buffer_size
        values = {name: _check_value(name, self.features[name], frame[name],
                                     f"episode {self.num_episodes} frame {index}") for name in expected[:-1]}
        for name, value in values.items():  # all checked: a refused frame leaves the episode as it was
            if name in self.video_keys:
                if name not in self._encoders:
                    self._encoders[name] = _EpisodeVideo(self._tmp / f"{_safe(name)}.mp4", self.fps,
                                                         self.encoder_config)
                self._encoders[name].add(value)
                value = _sample_image(value)  # all stats need of it
            self._buffer.setdefault(name, []).append(value)
        self._buffer.setdefault("task", []).append(task)

    def clear_episode_buffer(self) -> None:
        """Drop the frames added since the last :meth:`save_episode`."""
        for encoder in self._encoders.values():
            encoder.discard()
        self._encoders = {}
        self._buffer = {}

    def save_episode(self) -> None:
        """Write the buffered frames as the next episode."""
        length = self.episode_buffer_size
        if length == 0:
            raise DatasetError(f"{self.root}: save_episode with no frames added")
        e, start = self.num_episodes, self.num_frames
        frame_tasks = self._buffer["task"]
        for task in frame_tasks:
            if task not in self.tasks:
                self.tasks.append(task)
        columns: dict[str, Any] = {}
        for name, spec in self.features.items():
            if name in self.video_keys:
                continue
            if name in self.image_keys:
                columns[name] = [{"bytes": png_bytes(img), "path": f"frame-{k:06d}.png"}
                                 for k, img in enumerate(self._buffer[name])]
            elif name == "timestamp":
                columns[name] = np.arange(length) / self.fps  # add_frame: frame_index / fps
            elif name in ("frame_index", "episode_index", "index", "task_index"):
                columns[name] = {"frame_index": np.arange(length), "episode_index": np.full(length, e),
                                 "index": np.arange(start, start + length),
                                 "task_index": np.array([self.tasks.index(t) for t in frame_tasks])}[name]
            else:
                columns[name] = np.stack(self._buffer[name]).astype(spec["dtype"])
                if spec["shape"] == [1]:
                    columns[name] = columns[name].reshape(length)
        row: dict[str, Any] = {"episode_index": e, "tasks": list(dict.fromkeys(frame_tasks)), "length": length}
        chunk, file = self._data.append(episode_table(columns, self.features, fingerprint=f"vla_ds-{e:06d}"))
        row.update({"data/chunk_index": chunk, "data/file_index": file,
                    "dataset_from_index": start, "dataset_to_index": start + length})
        for key in self.video_keys:
            path = self._encoders.pop(key).close()
            chunk, file, from_ts, to_ts = self._videos[key].append(path)
            row.update({f"videos/{key}/chunk_index": chunk, f"videos/{key}/file_index": file,
                        f"videos/{key}/from_timestamp": from_ts, f"videos/{key}/to_timestamp": to_ts})
        stats = {}
        for name, spec in self.features.items():
            if spec["dtype"] in CAMERA_DTYPES:
                images = self._buffer[name]
                shrink = (lambda x: x) if name in self.video_keys else _sample_image
                data = np.stack([shrink(images[i]) for i in _sample_indices(length)])  # (N, 3, h, w)
                stats[name] = feature_stats(data, True, DEFAULT_QUANTILES)
            else:
                stats[name] = feature_stats(np.asarray(columns[name]), False, DEFAULT_QUANTILES)
        for feat, st in stats.items():  # flatten_dict({"stats": episode_stats}, sep="/")
            for sk, sv in st.items():
                row[f"stats/{feat}/{sk}"] = np.asarray(sv).tolist()
        self.episode_rows.append(row)
        self.episode_stats.append(stats)
        self.num_episodes += 1
        self.num_frames += length
        self._buffer = {}

    def finalize(self) -> None:
        """Close the data and video files and write the metadata: the dataset is complete.
        Frames added since the last :meth:`save_episode` are dropped."""
        if self._finalized:
            return
        self.clear_episode_buffer()
        self._finalized = True
        self._data.close()
        for video in self._videos.values():
            video.close()
        shutil.rmtree(self._tmp, ignore_errors=True)
        import pyarrow as pa
        import pyarrow.parquet as pq

        features = json.loads(json.dumps(self.features))
        for key in self.video_keys:
            first = self.root / VIDEO_PATH.format(video_key=key, chunk_index=0, file_index=0)
            if first.is_file():
                features[key]["info"] = video_info(first, "v3.0", self.encoder_config)
        if self.episode_rows:
            path = self.root / EPISODES_PATH.format(chunk_index=0, file_index=0)
            path.parent.mkdir(parents=True, exist_ok=True)
            for row in self.episode_rows:
                row["meta/episodes/chunk_index"], row["meta/episodes/file_index"] = 0, 0
            writer = None
            for start in range(0, len(self.episode_rows), METADATA_BUFFER_SIZE):  # one flush = one row group
                rows = self.episode_rows[start:start + METADATA_BUFFER_SIZE]
                table = pa.Table.from_pydict({k: [r[k] for r in rows] for k in rows[0]})
                if writer is None:
                    writer = pq.ParquetWriter(path, schema=table.schema, compression="snappy", use_dictionary=True)
                writer.write_table(table.select(writer.schema.names))
            writer.close()
        pq.write_table(pandas_tasks_table(self.tasks), self.root / TASKS_PATH)
        aggregated = None
        for stats in self.episode_stats:
            aggregated = stats if aggregated is None else aggregate_stats([aggregated, stats])
        write_json(serialize_stats(aggregated or {}), self.root / STATS_PATH)
        info = {
            "codebase_version": CODEBASE_VERSION,
            "fps": self.fps,
            "features": features,
            "total_episodes": self.num_episodes,
            "total_frames": self.num_frames,
            "total_tasks": len(self.tasks),
            "chunks_size": self.chunks_size,
            "data_files_size_in_mb": self.data_file_bytes / 2 ** 20,
            "video_files_size_in_mb": self.video_file_bytes / 2 ** 20,
            "data_path": DATA_PATH,
            "video_path": VIDEO_PATH if self.video_keys else None,
            "robot_type": self.robot_type,
            "splits": {"train": f"0:{self.num_episodes}"},
        }
        for key in ("data_files_size_in_mb", "video_files_size_in_mb"):
            if float(info[key]).is_integer():
                info[key] = int(info[key])
        write_json(info, self.root / INFO_PATH)
        logger.info("LeRobot v3.0 dataset %s: %d episodes, %d frames, %d task(s)", self.root, self.num_episodes,
                    self.num_frames, len(self.tasks))

    def __enter__(self) -> LeRobotDatasetWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.finalize()


# --------------------------------------------------------------------------- files


class _RollingParquet:
    """Data files: one ParquetWriter open at a time, one row group per episode, the next
    file once the current one passes its size limit (``utils.update_chunk_file_indices``)."""

    def __init__(self, root: Path, template: str, max_bytes: float, chunks_size: int):
        self.root, self.template, self.max_bytes, self.chunks_size = root, template, max_bytes, chunks_size
        self.chunk = self.file = 0
        self.writer = None
        self.path: Path | None = None

    def append(self, table) -> tuple[int, int]:
        import pyarrow.parquet as pq

        if self.writer is not None and self.path.stat().st_size >= self.max_bytes:
            self.writer.close()
            self.writer = None
            self.chunk, self.file = update_chunk_file_indices(self.chunk, self.file, self.chunks_size)
        if self.writer is None:
            self.path = self.root / self.template.format(chunk_index=self.chunk, file_index=self.file)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.writer = pq.ParquetWriter(self.path, schema=table.schema, compression="snappy", use_dictionary=True)
        self.writer.write_table(table)
        return self.chunk, self.file

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class _EpisodeVideo:
    """One episode of one camera, encoded as frames arrive (video_utils.encode_video_frames:
    yuv420p, the codec's crf / preset, a keyframe every g frames)."""

    def __init__(self, path: Path, fps: int, config: dict):
        import av

        self.path = path
        options = {"g": str(config["g"]), "crf": str(config["crf"]), "preset": str(config["preset"])}
        if config["vcodec"] == "libx264":
            options["bf"] = "0"
        elif config["vcodec"] == "libsvtav1":
            options["svtav1-params"] = "fast-decode=0"
        with quiet_svt():
            self.container = av.open(str(path), "w")
            self.stream = self.container.add_stream(config["vcodec"], fps, options=options)
        self.stream.pix_fmt = "yuv420p"
        self.started = False

    def add(self, image: np.ndarray) -> None:
        import av

        if not self.started:
            self.stream.height, self.stream.width = image.shape[:2]
            self.started = True
        with quiet_svt():
            for packet in self.stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")):
                self.container.mux(packet)

    def close(self) -> Path:
        with quiet_svt():
            for packet in self.stream.encode():
                self.container.mux(packet)
            self.container.close()
        return self.path

    def discard(self) -> None:
        with contextlib.suppress(Exception):
            self.container.close()
        self.path.unlink(missing_ok=True)


class _RollingVideo:
    """A camera's video files: each episode's packets appended by stream copy (pts and dts
    moved to the episode's from_timestamp), the next file past the size limit."""

    def __init__(self, root: Path, key: str, max_bytes: float, chunks_size: int):
        self.root, self.key, self.max_bytes, self.chunks_size = root, key, max_bytes, chunks_size
        self.chunk = self.file = 0
        self.container = None
        self.stream = None
        self.path: Path | None = None
        self.end_s = 0.0
        self.bytes = 0

    def append(self, episode_file: Path) -> tuple[int, int, float, float]:
        import av

        if self.container is not None and self.bytes >= self.max_bytes:
            self.close()
            self.chunk, self.file = update_chunk_file_indices(self.chunk, self.file, self.chunks_size)
        with av.open(str(episode_file)) as source:
            stream = source.streams.video[0]
            duration = float(stream.duration * stream.time_base)  # get_video_duration_in_s
            if self.container is None:
                self.path = self.root / VIDEO_PATH.format(video_key=self.key, chunk_index=self.chunk,
                                                          file_index=self.file)
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.container = av.open(str(self.path), "w", format="mp4", options={"movflags": "faststart"})
                self.stream = self.container.add_stream_from_template(template=stream, opaque=True)
                self.stream.time_base = stream.time_base
                self.end_s = 0.0
                self.bytes = 0
            from_s = self.end_s
            offset = round(from_s / stream.time_base)
            for packet in source.demux(stream):
                if packet.dts is None:
                    continue
                packet.pts += offset
                packet.dts += offset
                packet.stream = self.stream
                self.bytes += packet.size
                self.container.mux(packet)
        episode_file.unlink()
        self.end_s = from_s + duration
        return self.chunk, self.file, from_s, self.end_s

    def close(self) -> None:
        if self.container is not None:
            self.container.close()
            self.container = None


# --------------------------------------------------------------------------- checks


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


def _check_feature(name: str, spec: Any) -> dict:
    if not isinstance(name, str) or not name or "/" in name:
        raise DatasetError(f"feature name {name!r}: must be a non-empty string without '/' (LeRobot's rule)")
    if not isinstance(spec, dict) or "dtype" not in spec or "shape" not in spec:
        raise DatasetError(f"feature '{name}': must be a dict with 'dtype', 'shape' and 'names', got {spec!r}")
    shape = list(spec["shape"])
    dtype = spec["dtype"]
    if dtype in CAMERA_DTYPES:
        if len(shape) != 3 or shape[2] != 3 or min(shape) < 1:
            raise DatasetError(f"feature '{name}': a camera's shape is [height, width, 3], got {shape}")
        if dtype == "video" and (shape[0] % 2 or shape[1] % 2):
            raise DatasetError(f"feature '{name}': video height and width must be even (yuv420p), got {shape}")
    else:
        try:
            np.dtype(dtype)
        except TypeError:
            raise DatasetError(f"feature '{name}': unknown dtype {dtype!r}") from None
        if len(shape) != 1 or shape[0] < 1:
            raise DatasetError(f"feature '{name}': numeric features are 1-D, shape [D], got {shape}")
    return {"dtype": dtype, "shape": shape, "names": spec.get("names")}


def _check_value(name: str, spec: dict, value: Any, where: str) -> np.ndarray:
    array = np.asarray(value)
    shape = tuple(spec["shape"])
    if spec["dtype"] in CAMERA_DTYPES:
        if array.dtype != np.uint8 or array.shape != shape:
            raise DatasetError(f"'{name}' at {where}: expected a uint8 {shape} RGB image, got {array.dtype} "
                               f"{array.shape}")
        return array
    if array.shape == () and shape == (1,):
        array = array.reshape(1)
    if array.shape != shape:
        raise DatasetError(f"'{name}' at {where}: expected shape {shape}, got {array.shape}")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise DatasetError(f"'{name}' at {where}: NaN or inf values")
    return array.astype(spec["dtype"], copy=False)


def _sample_indices(t: int) -> np.ndarray:
    """compute_stats.sample_indices: every frame for T <= 100, else
    ``max(100, min(int(T**0.75), 10000))`` evenly spaced ones."""
    num = max(min(100, t), min(int(t ** 0.75), 10_000))
    return np.round(np.linspace(0, t - 1, num)).astype(int)


def _sample_image(image: np.ndarray) -> np.ndarray:
    """One frame as compute_stats samples it: (3, h, w), every ``int(side / 150)``-th pixel
    when the longer side is >= 300 px."""
    chw = image.transpose(2, 0, 1)
    h, w = chw.shape[1:]
    if max(h, w) >= 300:
        f = int(w / 150) if w > h else int(h / 150)
        chw = chw[:, ::f, ::f]
    return np.ascontiguousarray(chw)


# --------------------------------------------------------------------------- shared helpers


def sample_images(frames: np.ndarray) -> np.ndarray:
    """compute_stats.sample_images on (T, H, W, 3) frames -> (N, 3, h, w) uint8: the frames of
    :func:`_sample_indices`, each shrunk as :func:`_sample_image`."""
    return np.stack([_sample_image(frames[i]) for i in _sample_indices(len(frames))])


def _quantile_from_hist(hist: np.ndarray, edges: np.ndarray, target: float) -> float:
    # RunningQuantileStats._compute_single_quantile
    cumsum = np.cumsum(hist)
    idx = np.searchsorted(cumsum, target)
    if idx == 0:
        return edges[0]
    if idx >= len(cumsum):
        return edges[-1]
    before = cumsum[idx - 1]
    in_bin = cumsum[idx] - before
    if in_bin == 0:
        return edges[idx]
    return edges[idx] + (target - before) / in_bin * (edges[idx + 1] - edges[idx])


def _running_stats_one_batch(batch: np.ndarray, quantiles: Sequence[float], num_bins: int = 5000) -> dict:
    """``RunningQuantileStats().update(batch); get_statistics()`` for a single batch."""
    batch = batch.reshape(-1, batch.shape[-1])
    batch = batch.astype(np.result_type(batch.dtype, np.float32), copy=False)
    n = batch.shape[0]
    mean = np.mean(batch, axis=0)
    mean_sq = np.mean(batch ** 2, axis=0)
    mn, mx = np.min(batch, axis=0), np.max(batch, axis=0)
    stats = {"min": mn.copy(), "max": mx.copy(), "mean": mean.copy(),
             "std": np.sqrt(np.maximum(0, mean_sq - mean ** 2)), "count": np.array([n])}
    hists, edges = [], []
    for i in range(batch.shape[1]):
        e = np.linspace(mn[i] - 1e-10, mx[i] + 1e-10, num_bins + 1)
        hists.append(np.histogram(batch[:, i], bins=e)[0].astype(np.float64))
        edges.append(e)
    for q in quantiles:
        stats[f"q{int(q * 100):02d}"] = np.array([_quantile_from_hist(h, e, q * n) for h, e in zip(hists, edges)])
    return stats


def feature_stats(data: np.ndarray, is_image: bool, quantiles: Sequence[float]) -> dict:
    """compute_stats.compute_episode_stats / get_feature_stats (v3): images (N, 3, h, w) uint8
    give (3, 1, 1) stats in [0, 1]; numbers (N,) or (N, D) give (1,) or (D,)."""
    if is_image:
        n, c = data.shape[0], data.shape[1]
        reshaped = data.transpose(0, 2, 3, 1).reshape(-1, c)
        sample_count = n
    else:
        if data.dtype == np.bool_:
            data = data.astype(np.float32)
        reshaped = data.reshape(-1, 1) if data.ndim == 1 else data
        sample_count = data.shape[0]
    if reshaped.shape[0] < 2:
        st = {"min": np.min(reshaped, axis=0), "max": np.max(reshaped, axis=0), "mean": np.mean(reshaped, axis=0),
              "std": np.std(reshaped, axis=0), "count": np.array([sample_count])}
        for q in quantiles:
            st[f"q{int(q * 100):02d}"] = st["mean"].copy()
    else:
        st = _running_stats_one_batch(reshaped, quantiles)
        st["count"] = np.array([sample_count])
    out = {}
    for k, v in st.items():
        if k == "count":
            out[k] = v
        elif is_image:  # keepdims -> (1, C, 1, 1), then / 255 and squeeze(0) -> (C, 1, 1)
            out[k] = np.squeeze(v.reshape(1, -1, 1, 1) / 255.0, axis=0)
        elif data.ndim == 1:
            out[k] = v.reshape(1)
        else:
            out[k] = v
    return out


def aggregate_stats(stats_list: list[dict]) -> dict:
    """compute_stats.aggregate_stats: count-weighted mean, parallel variance, min/max
    envelope, quantile envelope (min for q <= 50, max above)."""
    keys: list[str] = []
    for s in stats_list:
        keys += [k for k in s if k not in keys]
    out = {}
    for key in keys:
        fts = [s[key] for s in stats_list if key in s]
        means = np.stack([s["mean"] for s in fts])
        variances = np.stack([s["std"] ** 2 for s in fts])
        counts = np.stack([s["count"] for s in fts])
        total = counts.sum(axis=0)
        while counts.ndim < means.ndim:
            counts = np.expand_dims(counts, axis=-1)
        mean = (means * counts).sum(axis=0) / total
        var = ((variances + (means - mean) ** 2) * counts).sum(axis=0) / total
        agg = {"min": np.min(np.stack([s["min"] for s in fts]), axis=0),
               "max": np.max(np.stack([s["max"] for s in fts]), axis=0),
               "mean": mean, "std": np.sqrt(var), "count": total}
        for qk in [k for k in fts[0] if k.startswith("q") and k[1:].isdigit()]:
            if all(qk in s for s in fts):
                vals = np.stack([s[qk] for s in fts])
                agg[qk] = np.min(vals, axis=0) if int(qk[1:]) <= 50 else np.max(vals, axis=0)
        out[key] = agg
    return out


def serialize_stats(stats: dict) -> dict:
    return {k: serialize_stats(v) if isinstance(v, dict) else np.asarray(v).tolist() for k, v in stats.items()}


def hf_feature(ft: dict, version: str):
    """(arrow type, HF ``datasets`` feature dict) of ``feature_utils.get_hf_features_from_features``:
    shape (1,) -> a plain scalar column; (N,) -> ``fixed_size_list<dtype>[N]`` ("Sequence" in
    datasets<=3.6, LeRobot v2.1; "List" since 4.x); image -> ``struct<bytes, path>``."""
    import pyarrow as pa

    if ft["dtype"] == "image":
        return pa.struct({"bytes": pa.binary(), "path": pa.string()}), {"_type": "Image"}
    value_type = pa.from_numpy_dtype(np.dtype(ft["dtype"]))
    value_dict = {"dtype": ft["dtype"], "_type": "Value"}
    shape = list(ft["shape"])
    if shape == [1]:
        return value_type, value_dict
    if len(shape) == 1:
        list_type = "Sequence" if version == "v2.1" else "List"
        return pa.list_(value_type, shape[0]), {"feature": value_dict, "length": shape[0], "_type": list_type}
    raise DatasetError(f"feature of shape {shape}: only 1-D numeric features are written")


def hf_schema(features: dict, version: str, fingerprint: str | None):
    """Arrow schema of a data table with the ``huggingface`` metadata ``datasets`` attaches."""
    import pyarrow as pa

    fields, hf = [], {}
    for key, ft in features.items():
        if ft["dtype"] == "video":
            continue
        t, d = hf_feature(ft, version)
        fields.append(pa.field(key, t))
        hf[key] = d
    meta: dict[str, Any] = {"info": {"features": hf}}
    if fingerprint is not None:
        meta["fingerprint"] = fingerprint
    return pa.schema(fields).with_metadata({"huggingface": json.dumps(meta)})


def png_bytes(img: np.ndarray, compress_level: int = 6) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def episode_table(columns: dict[str, Any], features: dict, version: str = "v3.0", fingerprint: str | None = None):
    """One episode's rows as an arrow table of :func:`hf_schema`."""
    import pyarrow as pa

    schema = hf_schema(features, version, fingerprint)
    arrays = []
    for f in schema:
        v = columns[f.name]
        if pa.types.is_fixed_size_list(f.type):
            flat = pa.array(np.ascontiguousarray(v).reshape(-1), type=f.type.value_type)
            arrays.append(pa.FixedSizeListArray.from_arrays(flat, f.type.list_size))
        elif pa.types.is_struct(f.type):
            arrays.append(pa.array(v, type=f.type))
        else:
            arrays.append(pa.array(np.asarray(v), type=f.type))
    return pa.Table.from_arrays(arrays, schema=schema)


PANDAS_VERSION = "2.3.3"  # written into tasks.parquet's pandas metadata, as LeRobot's pandas would


def pandas_tasks_table(tasks: list[str]):
    """What ``pd.DataFrame({"task_index": idx}, index=pd.Index(tasks, name="task")).to_parquet(p)``
    writes (``io_utils.write_tasks``): the named index as a trailing ``task`` column, recorded in
    the ``pandas`` schema metadata's ``index_columns``."""
    import pyarrow as pa

    pandas_meta = {
        "index_columns": ["task"],
        "column_indexes": [{"name": None, "field_name": None, "pandas_type": "unicode", "numpy_type": "object",
                            "metadata": {"encoding": "UTF-8"}}],
        "columns": [
            {"name": "task_index", "field_name": "task_index", "pandas_type": "int64", "numpy_type": "int64",
             "metadata": None},
            {"name": "task", "field_name": "task", "pandas_type": "unicode", "numpy_type": "object", "metadata": None},
        ],
        "attributes": {},
        "creator": {"library": "pyarrow", "version": pa.__version__},
        "pandas_version": PANDAS_VERSION,
    }
    schema = pa.schema([("task_index", pa.int64()), ("task", pa.string())]).with_metadata(
        {"pandas": json.dumps(pandas_meta)})
    return pa.Table.from_arrays([pa.array(np.arange(len(tasks), dtype=np.int64)), pa.array(tasks, type=pa.string())],
                                schema=schema)


def write_json(obj: Any, path: Path) -> None:
    """io_utils.write_json: indent 4, ensure_ascii False."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=4, ensure_ascii=False)


def update_chunk_file_indices(chunk_idx: int, file_idx: int, chunks_size: int) -> tuple[int, int]:
    """utils.update_chunk_file_indices."""
    if file_idx == chunks_size - 1:
        return chunk_idx + 1, 0
    return chunk_idx, file_idx + 1


@contextlib.contextmanager
def quiet_svt():
    """SVT-AV1 prints its whole configuration at every encoder start unless SVT_LOG is low."""
    old = os.environ.get("SVT_LOG")
    if old is None:
        os.environ["SVT_LOG"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("SVT_LOG", None)


def video_duration_s(path: Path) -> float:
    """video_utils.get_video_duration_in_s."""
    import av

    with av.open(str(path)) as c:
        s = c.streams.video[0]
        if s.duration is not None:
            return float(s.duration * s.time_base)
        return float(c.duration / av.time_base) if c.duration is not None else math.inf


def video_info(path: Path, version: str, encoder_config: dict) -> dict:
    """video_utils.get_video_info (+ dataset_metadata.update_video_info in v3): what info.json
    says of a camera's stream."""
    import av

    info: dict[str, Any] = {}
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        info["video.height"] = s.height
        info["video.width"] = s.width
        info["video.codec"] = s.codec.canonical_name
        info["video.pix_fmt"] = s.pix_fmt
        if version == "v2.1":
            info["video.is_depth_map"] = False
        info["video.fps"] = int(s.base_rate)
        info["video.channels"] = len(av.VideoFormat(s.pix_fmt).components)
        has_audio = len(c.streams.audio) > 0
    info["has_audio"] = has_audio
    if version != "v2.1":
        for k in ("pix_fmt", "g", "crf", "preset", "fast_decode", "video_backend", "extra_options"):
            info.setdefault(f"video.{k}", encoder_config[k])
        info["is_depth_map"] = False
    return info
