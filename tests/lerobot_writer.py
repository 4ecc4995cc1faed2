"""Write small LeRobot datasets to disk, laid out as the LeRobot library lays them out.

Test helper only: it lets a LeRobot reader be tested against the documented on-disk format
without depending on ``lerobot``, ``datasets`` or ``pandas`` (none of them is installed here).
Everything below was checked against LeRobot's own source code (github huggingface/lerobot):

* v3.0: main branch ``src/lerobot/datasets/{dataset_writer,dataset_metadata,io_utils,utils,
  feature_utils,video_utils,compute_stats}.py``, ``src/lerobot/configs/video.py``,
  ``src/lerobot/utils/constants.py`` (``DEFAULT_FEATURES``) and
  ``src/lerobot/scripts/convert_dataset_v21_to_v30.py``.
* v2.1: the same files at the parent of the "Dataset v3" commit (``lerobot_dataset.py``,
  ``utils.py``, ``video_utils.py``, ``compute_stats.py``, ``image_writer.py``).
* HF ``datasets`` (what LeRobot uses to build the parquet tables): ``features/features.py``,
  ``features/image.py``, ``arrow_writer.py``, ``io/parquet.py`` at tags 3.6.0 (LeRobot v2.1 pins
  ``datasets<=3.6.0``) and 4.8.x (LeRobot main pins ``datasets>=4.8``). The resulting arrow
  schemas and metadata were compared with files written by real ``datasets`` 4.8.5 /
  ``pandas`` 2.3.3 (see the notes at each writer).

Layouts
-------
v2.1::

    meta/info.json  meta/episodes.jsonl  meta/tasks.jsonl  meta/episodes_stats.jsonl
    data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet          (one per episode)
    videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4  (one per episode+camera)

v3.0::

    meta/info.json  meta/stats.json  meta/tasks.parquet
    meta/episodes/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet   (one row per episode)
    data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet            (several episodes' rows)
    videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4  (several episodes, concatenated)

Where LeRobot decides by file size (v3 data/video/episodes-metadata file rollover) this writer
decides by episode count (``episodes_per_file`` / ``video_episodes_per_file`` /
``meta_episodes_per_file``), so that tiny test datasets still span several files. The chunk/file
counters advance exactly like ``utils.update_chunk_file_indices``.

Images: frames are flat, 16-px-aligned blocks of random colours (one draw per camera, episode and
frame), so lossy coding barely touches them (mean abs error ~2.5 grey levels per frame, at most ~6,
mostly from RGB<->YUV 4:2:0 conversion at block edges) while two different frames differ by ~60
grey levels on average (>40 at worst). Keep H and W multiples of 16 for that fidelity (they must be
even for yuv420p anyway). ``WrittenEpisode.frames`` holds the exact uint8 RGB
frames handed to the encoder (or PNG-encoded for ``camera_dtype="image"``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vla_ds.data.lerobot_writer import (  # the helpers this reference writer shares with vla_ds's writer
    DATA_PATH as V30_DATA_PATH,
)
from vla_ds.data.lerobot_writer import (
    DEFAULT_FEATURES,
    DEFAULT_QUANTILES,
    aggregate_stats,
    episode_table,
    feature_stats,
    pandas_tasks_table,
    png_bytes,
    quiet_svt,
    sample_images,
    serialize_stats,
    update_chunk_file_indices,
    video_duration_s,
    video_info,
    write_json,
)
from vla_ds.data.lerobot_writer import (
    EPISODES_PATH as V30_EPISODES_PATH,
)
from vla_ds.data.lerobot_writer import (
    INFO_PATH as V30_INFO_PATH,
)
from vla_ds.data.lerobot_writer import (
    STATS_PATH as V30_STATS_PATH,
)
from vla_ds.data.lerobot_writer import (
    TASKS_PATH as V30_TASKS_PATH,
)
from vla_ds.data.lerobot_writer import (
    VIDEO_PATH as V30_VIDEO_PATH,
)

# ------------------------------------------------------------------------------------------------
# Constants copied from LeRobot
# ------------------------------------------------------------------------------------------------

DEFAULT_CHUNK_SIZE = 1000  # v2.1: max episodes per chunk dir; v3.0: max files per chunk dir
# v3.0 (main utils.py; 500 for video at the v3.0 release commit)
DEFAULT_DATA_FILE_SIZE_IN_MB = 100
DEFAULT_VIDEO_FILE_SIZE_IN_MB = 200

# v2.1 (utils.py before "Dataset v3")
V21_DATA_PATH = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
V21_VIDEO_PATH = "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"
V21_INFO_PATH = "meta/info.json"
V21_EPISODES_PATH = "meta/episodes.jsonl"
V21_EPISODES_STATS_PATH = "meta/episodes_stats.jsonl"
V21_TASKS_PATH = "meta/tasks.jsonl"

# SO-100/SO-101 follower motor names, as in current recordings (`f"{motor}.pos"`).
SO101_MOTORS = ["shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper"]

DEFAULT_TASKS = ["Pick up the red cube.", "Put the cube in the box."]


# Codec name -> (PyAV encoder, default crf, default preset). LeRobot's defaults (configs/video.py):
# libsvtav1, crf=30, g=2, svtav1 preset 12 (h264 preset: x264's default). "ultrafast" is used for
# h264 here because the frames are tiny and the tests want speed (it also disables B-frames;
# pass preset="medium" to get B-frames / pts != dts, which concatenation handles as well).
_CODECS = {
    "av1": ("libsvtav1", 30, 12),
    "h264": ("libx264", 30, "ultrafast"),
}


# ------------------------------------------------------------------------------------------------
# Result types
# ------------------------------------------------------------------------------------------------


@dataclass
class WrittenEpisode:
    episode_index: int
    task: str  # the episode's (first) task string
    task_index: np.ndarray  # (T,) int64 per frame
    timestamps: np.ndarray  # (T,) float32, frame_index / fps
    frames: dict[str, np.ndarray]  # camera key -> (T, H, W, 3) uint8, the exact frames encoded
    # non-video feature -> values as written to parquet: (T, D) for shape (D,) features,
    # (T,) for shape (1,) features (stored as a scalar column)
    columns: dict[str, np.ndarray]
    # --- extras (filled by the writer) ---
    tasks: list[str] = field(default_factory=list)  # unique tasks of the episode, in metadata order
    frame_tasks: list[str] = field(default_factory=list)  # (T,) task string per frame
    index: np.ndarray | None = None  # (T,) int64 global index
    dataset_from_index: int = 0
    dataset_to_index: int = 0
    data_file: Path | None = None  # parquet holding the episode (relative to root)
    video_files: dict[str, Path] = field(default_factory=dict)  # camera -> mp4 (relative to root)
    # camera -> start time of the episode inside its mp4 (v3; always 0.0 in v2.1)
    video_from_timestamp: dict[str, float] = field(default_factory=dict)
    video_to_timestamp: dict[str, float] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return len(self.timestamps)


@dataclass
class WrittenDataset:
    root: Path
    version: str  # "v2.1" or "v3.0"
    fps: int
    episodes: list[WrittenEpisode]
    features: dict  # info.json "features" as written
    tasks: list[str]  # task_index -> task
    info: dict = field(default_factory=dict)  # the whole info.json as written
    codec: str | None = None  # "av1" / "h264" when there are video cameras

    @property
    def total_frames(self) -> int:
        return sum(ep.length for ep in self.episodes)

    @property
    def video_keys(self) -> list[str]:
        return [k for k, ft in self.features.items() if ft["dtype"] == "video"]

    @property
    def image_keys(self) -> list[str]:
        return [k for k, ft in self.features.items() if ft["dtype"] == "image"]

    @property
    def camera_keys(self) -> list[str]:
        return [k for k, ft in self.features.items() if ft["dtype"] in ("video", "image")]

    def frame(self, global_index: int) -> tuple[WrittenEpisode, int]:
        """(episode, frame_index) of a global ``index`` value."""
        for ep in self.episodes:
            if ep.dataset_from_index <= global_index < ep.dataset_to_index:
                return ep, global_index - ep.dataset_from_index
        raise IndexError(global_index)


# ------------------------------------------------------------------------------------------------
# Deterministic content
# ------------------------------------------------------------------------------------------------


def _rng(seed: int, *parts: Any) -> np.random.Generator:
    key = [int(seed) & 0xFFFFFFFF] + [zlib.crc32(str(p).encode()) for p in parts]
    return np.random.default_rng(key)


def make_frames(seed: int, camera: str, episode_index: int, length: int, hw: tuple[int, int]) -> np.ndarray:
    """(T, H, W, 3) uint8: flat colour blocks (16-px grid, aligned for 4:2:0 chroma), colours in
    [32, 224) drawn from (seed, camera, episode, frame) - smooth for codecs, distinct per frame."""
    h, w = hw
    rows, cols = max(1, h // 16), max(1, w // 16)
    rb = np.minimum(np.arange(h) // 16, rows - 1)
    cb = np.minimum(np.arange(w) // 16, cols - 1)
    out = np.empty((length, h, w, 3), dtype=np.uint8)
    for k in range(length):
        colors = _rng(seed, "frame", camera, episode_index, k).integers(32, 224, size=(rows, cols, 3))
        out[k] = colors[rb[:, None], cb[None, :]].astype(np.uint8)
    return out


def random_walk(seed: int, name: str, episode_index: int, length: int, dim: int, dtype="float32") -> np.ndarray:
    """(T, dim) smooth random walk: start in [-1, 1], N(0, 0.05) steps."""
    rng = _rng(seed, "walk", name, episode_index)
    start = rng.uniform(-1.0, 1.0, size=(1, dim))
    steps = rng.normal(0.0, 0.05, size=(length, dim))
    steps[0] = 0.0
    return (start + np.cumsum(steps, axis=0)).astype(dtype)


def default_motor_names(dim: int) -> list[str]:
    if dim == len(SO101_MOTORS):
        return [f"{m}.pos" for m in SO101_MOTORS]
    return [f"motor_{i}" for i in range(dim)]


# ------------------------------------------------------------------------------------------------
# Stats (compute_stats.py)
# ------------------------------------------------------------------------------------------------


def _feature_stats_v21(data: np.ndarray, is_image: bool) -> dict:
    """compute_stats.get_feature_stats / compute_episode_stats (v2.1)."""
    axis, keepdims = ((0, 2, 3), True) if is_image else (0, data.ndim == 1)
    st = {
        "min": np.min(data, axis=axis, keepdims=keepdims),
        "max": np.max(data, axis=axis, keepdims=keepdims),
        "mean": np.mean(data, axis=axis, keepdims=keepdims),
        "std": np.std(data, axis=axis, keepdims=keepdims),
        "count": np.array([len(data)]),
    }
    if is_image:
        st = {k: v if k == "count" else np.squeeze(v / 255.0, axis=0) for k, v in st.items()}
    return st


# ------------------------------------------------------------------------------------------------
# Parquet helpers
# ------------------------------------------------------------------------------------------------


def _append_jsonl(obj: Any, path: Path) -> None:
    # jsonlines.Writer defaults: ensure_ascii=False, separators (", ", ": ")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(obj, ensure_ascii=False) + "\n")


# ------------------------------------------------------------------------------------------------
# Video (video_utils.py)
# ------------------------------------------------------------------------------------------------


def _codec_options(encoder: str, g: int, crf: Any, preset: Any) -> dict[str, str]:
    # configs/video.py VideoEncoderConfig.get_codec_options(as_strings=True)
    opts = {"g": str(g)}
    if crf is not None:
        opts["crf"] = str(crf)
    if preset is not None:
        opts["preset"] = str(preset)
    if encoder == "libsvtav1":
        opts["svtav1-params"] = "fast-decode=0"
    return opts


_SVT_POOL = None


def encode_video(path: Path, frames: np.ndarray, fps: int, encoder: str, options: dict[str, str]) -> None:
    """video_utils.encode_video_frames: PyAV stream at ``fps``, yuv420p, rgb24 frames in.

    SVT-AV1 runs in a separate (spawned, reused) process: after an SVT-AV1 encoder has run in
    a process, processes it later starts that fork again (DeepSpeed's launcher -> rank ->
    py-cpuinfo) were seen to hang on this machine, so the test process itself never loads it."""
    global _SVT_POOL
    if encoder == "libsvtav1" and os.environ.get("_LEROBOT_WRITER_CHILD") != "1":
        import concurrent.futures
        import multiprocessing

        if _SVT_POOL is None:
            os.environ["_LEROBOT_WRITER_CHILD"] = "1"  # inherited by the spawned worker only
            try:
                _SVT_POOL = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
                _SVT_POOL.submit(os.getpid).result()  # start it while the variable is set
            finally:
                os.environ.pop("_LEROBOT_WRITER_CHILD", None)
        _SVT_POOL.submit(encode_video, Path(path), np.asarray(frames), fps, encoder, dict(options)).result()
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with quiet_svt(), av.open(str(path), "w") as out:
        stream = out.add_stream(encoder, fps, options=options)
        stream.pix_fmt = "yuv420p"
        stream.width = frames.shape[2]
        stream.height = frames.shape[1]
        for img in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def concatenate_videos(inputs: list[Path], output: Path) -> None:
    """video_utils.concatenate_video_files: ffmpeg concat demuxer + stream copy (no re-encode),
    ``movflags=faststart``; written to a temp file first so ``output`` may be one of the inputs."""
    fd, lst = tempfile.mkstemp(suffix=".ffconcat")
    with os.fdopen(fd, "w") as f:
        f.write("ffconcat version 1.0\n")
        for p in inputs:
            f.write(f"file '{Path(p).resolve()}'\n")
    fd, tmp_out = tempfile.mkstemp(suffix=".mp4", dir=str(Path(output).parent))
    os.close(fd)
    try:
        with av.open(lst, mode="r", format="concat", options={"safe": "0"}) as inp, av.open(
            tmp_out, mode="w", format="mp4", options={"movflags": "faststart"}
        ) as out:
            stream_map = {}
            for s in inp.streams:
                if s.type in ("video", "audio", "subtitle"):
                    stream_map[s.index] = out.add_stream_from_template(template=s, opaque=True)
                    stream_map[s.index].time_base = s.time_base
            for packet in inp.demux():
                if packet.stream.index not in stream_map or packet.dts is None:
                    continue
                packet.stream = stream_map[packet.stream.index]
                out.mux(packet)
        shutil.move(tmp_out, output)
    finally:
        Path(lst).unlink(missing_ok=True)
        Path(tmp_out).unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------
# Main entry point
# ------------------------------------------------------------------------------------------------


def _default_lengths(n: int) -> list[int]:
    base = [12, 9, 15, 11, 14, 10, 13, 8]
    return [base[i % len(base)] for i in range(n)]


def _normalise_extra(name: str, spec: Any, seed: int) -> tuple[dict, Callable[[int, int], np.ndarray]]:
    """extra_features spec -> (feature dict, fn(episode_index, length) -> values)."""
    if isinstance(spec, int):
        spec = {"shape": (spec,)}
    elif isinstance(spec, tuple):
        spec = {"shape": spec}
    elif callable(spec):
        spec = {"fn": spec}
    spec = dict(spec)
    fn = spec.pop("fn", None)
    dtype = spec.pop("dtype", None)
    shape = spec.pop("shape", None)
    names = spec.pop("names", None)
    if fn is None:
        dim = int(shape[0]) if shape else 1
        dtype = dtype or "float32"

        def fn(e: int, t: int, _n=name, _d=dim, _dt=dtype, _sc=shape) -> np.ndarray:
            v = random_walk(seed, _n, e, t, _d, dtype="float64")
            if np.dtype(_dt) == np.bool_:
                v = v > 0
            v = v.astype(_dt)
            return v[:, 0] if list(_sc or [1]) == [1] else v

    probe = None
    if dtype is None or shape is None:
        probe = np.asarray(fn(0, 2))
        dtype = dtype or str(probe.dtype)
        shape = shape or ((1,) if probe.ndim == 1 else (probe.shape[1],))
    shape = [int(x) for x in shape]
    if names is None and shape != [1]:
        names = default_motor_names(shape[0]) if shape[0] != 1 else None
    ft = {"dtype": str(np.dtype(dtype)), "shape": shape, "names": names}
    return ft, fn


def write_lerobot_dataset(
    root: str | Path,
    *,
    version: str = "v3.0",
    num_episodes: int = 3,
    lengths: Sequence[int] | None = None,
    fps: int = 10,
    cameras: Sequence[str] = ("observation.images.top", "observation.images.wrist"),
    image_hw: tuple[int, int] = (48, 64),
    codec: str = "av1",
    camera_dtype: str | Mapping[str, str] = "video",
    action_dim: int = 6,
    state_dim: int = 6,
    action_names: list[str] | None = None,
    state_names: list[str] | None = None,
    tasks: Sequence[str] | None = None,
    episodes_per_file: int = 2,
    extra_features: Mapping[str, Any] | None = None,
    seed: int = 0,
    # ---- optional extras ----
    video_episodes_per_file: int | None = None,
    meta_episodes_per_file: int | None = None,
    chunks_size: int = DEFAULT_CHUNK_SIZE,
    crf: int | None = None,
    gop: int = 2,
    preset: Any = None,
    robot_type: str | None = "so101_follower",
    frame_tasks: Callable[[int, int], Sequence[str]] | None = None,
    feature_fps: bool = True,
    quantiles: bool = True,
    stats_json_v21: bool = False,
) -> WrittenDataset:
    """Write a LeRobot dataset under ``root`` (must not exist or be empty) and describe it.

    Args (beyond the obvious):
        version: "v2.1" or "v3.0" (aliases "v2"/"2.1", "v3"/"3.0").
        codec: "av1" (libsvtav1, LeRobot's default) or "h264" (libx264).
        camera_dtype: "video" (mp4) or "image" (PNG bytes embedded in parquet as
            ``struct<bytes, path>``), or a mapping camera -> dtype.
        tasks: task strings; episode e uses ``tasks[e % len(tasks)]``.
        episodes_per_file: v3 - episodes per data parquet (and per mp4 unless
            ``video_episodes_per_file`` is given).
        video_episodes_per_file: v3 - episodes per mp4, independent of the data files.
        meta_episodes_per_file: v3 - rows per ``meta/episodes`` parquet (default: one file).
        chunks_size: info.json ``chunks_size``; v2.1 episodes per chunk dir, v3 files per chunk dir.
        extra_features: name -> spec. A spec is an int D (float32 (D,) random walk), a shape tuple,
            a dict ``{"dtype", "shape", "names", "fn"}`` or a callable ``fn(episode_index, length)``
            returning (T,) or (T, D) values. Shape (1,) features are written as scalar columns.
        crf / gop / preset: encoder settings (defaults: av1 crf 30 preset 12, h264 crf 30
            preset ultrafast, g=2 as LeRobot).
        frame_tasks: optional ``fn(episode_index, length) -> list of T task strings`` to switch
            task inside an episode (LeRobot allows per-frame tasks); overrides ``tasks``.
        feature_fps: v3 - add ``"fps"`` to every non-video feature, as the v2.1->v3.0 converter
            does (``convert_info``); natively recorded v3 datasets don't have it.
        quantiles: v3 - include q01..q99 stats (LeRobot main computes them; the v3.0 release
            did not).
        stats_json_v21: v2.1 - also write ``meta/stats.json`` (aggregated); native v2.1 does not.
    """
    version = {"v2": "v2.1", "2.1": "v2.1", "v2.1": "v2.1", "v3": "v3.0", "3.0": "v3.0", "v3.0": "v3.0"}[version]
    is_v3 = version == "v3.0"
    root = Path(root)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty")
    root.mkdir(parents=True, exist_ok=True)

    if lengths is None:
        lengths = _default_lengths(num_episodes)
    lengths = [int(t) for t in lengths]
    if len(lengths) != num_episodes:
        raise ValueError(f"{len(lengths)} lengths for {num_episodes} episodes")
    tasks_in = list(tasks) if tasks is not None else list(DEFAULT_TASKS)
    if codec not in _CODECS:
        raise ValueError(f"codec must be one of {list(_CODECS)}")
    encoder, default_crf, default_preset = _CODECS[codec]
    crf = default_crf if crf is None else crf
    preset = default_preset if preset is None else preset
    video_episodes_per_file = video_episodes_per_file or episodes_per_file
    cam_dtypes = {c: (camera_dtype[c] if isinstance(camera_dtype, Mapping) else camera_dtype) for c in cameras}
    for c, d in cam_dtypes.items():
        if d not in ("video", "image"):
            raise ValueError(f"camera dtype must be 'video' or 'image', got {d!r} for {c}")
    h, w = image_hw

    # ---- features (user features first, then DEFAULT_FEATURES, as LeRobotDatasetMetadata.create) ----
    features: dict[str, dict] = {}
    gens: dict[str, Callable[[int, int], np.ndarray]] = {}
    for key, dim, names in (("action", action_dim, action_names), ("observation.state", state_dim, state_names)):
        if dim:
            features[key] = {"dtype": "float32", "shape": [dim],
                             "names": list(names) if names else default_motor_names(dim)}
            gens[key] = lambda e, t, key=key, dim=dim: random_walk(seed, key, e, t, dim)
    for name, spec in (extra_features or {}).items():
        if "/" in name:
            raise ValueError("feature names must not contain '/' (LeRobot _validate_feature_names)")
        features[name], gens[name] = _normalise_extra(name, spec, seed)
    for cam in cameras:
        features[cam] = {"dtype": cam_dtypes[cam], "shape": [h, w, 3], "names": ["height", "width", "channels"]}
    for k, v in DEFAULT_FEATURES.items():
        features[k] = json.loads(json.dumps(v))
    video_keys = [c for c in cameras if cam_dtypes[c] == "video"]
    image_keys = [c for c in cameras if cam_dtypes[c] == "image"]

    encoder_cfg = {
        "pix_fmt": "yuv420p",
        "g": gop,
        "crf": crf,
        "preset": preset,
        "fast_decode": 0,
        "video_backend": "pyav",
        "extra_options": {},
    }
    opts = _codec_options(encoder, gop, crf, preset)

    # ---- generate episodes ----
    episodes: list[WrittenEpisode] = []
    task_list: list[str] = []
    global_idx = 0
    for e, t_len in enumerate(lengths):
        if frame_tasks is not None:
            ftasks = [str(s) for s in frame_tasks(e, t_len)]
            if len(ftasks) != t_len:
                raise ValueError("frame_tasks must return one task per frame")
        else:
            ftasks = [tasks_in[e % len(tasks_in)]] * t_len
        ep_tasks = list(dict.fromkeys(ftasks))  # LeRobot: list(set(tasks)); first-seen order here
        for tk in ep_tasks:
            if tk not in task_list:
                task_list.append(tk)
        task_index = np.array([task_list.index(tk) for tk in ftasks], dtype=np.int64)
        frame_index = np.arange(t_len, dtype=np.int64)
        ts64 = frame_index / fps  # add_frame: timestamp = frame_index / fps (python float)
        cols: dict[str, np.ndarray] = {}
        for name, fn in gens.items():
            v = np.asarray(fn(e, t_len))
            ft = features[name]
            v = v.astype(ft["dtype"], copy=False)
            if ft["shape"] == [1]:
                v = v.reshape(t_len)
            elif v.shape != (t_len, ft["shape"][0]):
                raise ValueError(f"{name}: values of shape {v.shape}, expected {(t_len, ft['shape'][0])}")
            cols[name] = v
        frames = {cam: make_frames(seed, cam, e, t_len, image_hw) for cam in cameras}
        ep = WrittenEpisode(
            episode_index=e,
            task=ftasks[0],
            task_index=task_index,
            timestamps=ts64.astype(np.float32),
            frames=frames,
            columns=cols,
            tasks=ep_tasks,
            frame_tasks=ftasks,
            index=np.arange(global_idx, global_idx + t_len, dtype=np.int64),
            dataset_from_index=global_idx,
            dataset_to_index=global_idx + t_len,
        )
        ep._ts64 = ts64  # type: ignore[attr-defined]
        episodes.append(ep)
        global_idx += t_len

    # ---- per-episode buffers & stats (save_episode) ----
    png_name = "frame-{:06d}.png" if is_v3 else "frame_{:06d}.png"  # DEFAULT_IMAGE_PATH basename
    ep_tables_data: list[dict] = []
    ep_stats_list: list[dict] = []
    for ep in episodes:
        t_len = ep.length
        buf: dict[str, Any] = {}
        for key, ft in features.items():
            if key in ep.columns:
                buf[key] = ep.columns[key]
            elif key in image_keys:
                buf[key] = [
                    {"bytes": png_bytes(ep.frames[key][k]), "path": png_name.format(k)} for k in range(t_len)
                ]
            elif key == "timestamp":
                buf[key] = ep._ts64  # type: ignore[attr-defined]
            elif key == "frame_index":
                buf[key] = np.arange(t_len, dtype=np.int64)
            elif key == "episode_index":
                buf[key] = np.full((t_len,), ep.episode_index, dtype=np.int64)
            elif key == "index":
                buf[key] = ep.index
            elif key == "task_index":
                buf[key] = ep.task_index
        ep_tables_data.append(buf)
        stats = {}
        qs = DEFAULT_QUANTILES if quantiles else []
        for key, ft in features.items():
            is_img = ft["dtype"] in ("video", "image")
            data = sample_images(ep.frames[key]) if is_img else buf[key]
            stats[key] = feature_stats(data, is_img, qs) if is_v3 else _feature_stats_v21(data, is_img)
        ep_stats_list.append(stats)

    if is_v3:
        info = _write_v30(
            root, features, episodes, ep_tables_data, ep_stats_list, task_list, fps=fps,
            video_keys=video_keys, episodes_per_file=episodes_per_file,
            video_episodes_per_file=video_episodes_per_file, meta_episodes_per_file=meta_episodes_per_file,
            chunks_size=chunks_size, encoder=encoder, opts=opts, encoder_cfg=encoder_cfg, robot_type=robot_type,
            feature_fps=feature_fps, seed=seed,
        )
    else:
        info = _write_v21(
            root, features, episodes, ep_tables_data, ep_stats_list, task_list, fps=fps, video_keys=video_keys,
            chunks_size=chunks_size, encoder=encoder, opts=opts, robot_type=robot_type,
            stats_json=stats_json_v21,
        )
    for ep in episodes:
        del ep._ts64  # type: ignore[attr-defined]
    return WrittenDataset(
        root=root,
        version=version,
        fps=fps,
        episodes=episodes,
        features=info["features"],
        tasks=task_list,
        info=info,
        codec=codec if video_keys else None,
    )


def _write_v21(root, features, episodes, tables, stats_list, task_list, *, fps, video_keys, chunks_size,
               encoder, opts, robot_type, stats_json) -> dict:
    features = json.loads(json.dumps(features))
    n = len(episodes)
    # create_empty_dataset_info (v2.1) key order
    info = {
        "codebase_version": "v2.1",
        "robot_type": robot_type,
        "total_episodes": n,
        "total_frames": sum(ep.length for ep in episodes),
        "total_tasks": len(task_list),
        "total_videos": n * len(video_keys),
        "total_chunks": (n - 1) // chunks_size + 1 if n else 0,
        "chunks_size": chunks_size,
        "fps": fps,
        "splits": {"train": f"0:{n}"},
        "data_path": V21_DATA_PATH,
        "video_path": V21_VIDEO_PATH if video_keys else None,
        "features": features,
    }
    for ep, buf, stats in zip(episodes, tables, stats_list):
        chunk = ep.episode_index // chunks_size
        rel = Path(V21_DATA_PATH.format(episode_chunk=chunk, episode_index=ep.episode_index))
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        # Dataset.to_parquet (datasets 3.6): ParquetWriter(schema=features.arrow_schema), default
        # options, batches of 1000 rows (100 when an Image feature is present).
        table = episode_table(buf, features, "v2.1", None)
        has_img = any(ft["dtype"] == "image" for ft in features.values())
        pq.write_table(table, root / rel, row_group_size=100 if has_img else 1000)
        ep.data_file = rel
        for vk in video_keys:
            vrel = Path(V21_VIDEO_PATH.format(episode_chunk=chunk, video_key=vk, episode_index=ep.episode_index))
            encode_video(root / vrel, ep.frames[vk], fps, encoder, opts)
            ep.video_files[vk] = vrel
            ep.video_from_timestamp[vk] = 0.0
            ep.video_to_timestamp[vk] = video_duration_s(root / vrel)
        _append_jsonl({"episode_index": ep.episode_index, "tasks": ep.tasks, "length": ep.length},
                      root / V21_EPISODES_PATH)
        _append_jsonl({"episode_index": ep.episode_index, "stats": serialize_stats(stats)}, root / V21_EPISODES_STATS_PATH)
    for i, tk in enumerate(task_list):
        _append_jsonl({"task_index": i, "task": tk}, root / V21_TASKS_PATH)
    for vk in video_keys:  # update_video_info: probed from episode 0's video
        features[vk]["info"] = video_info(root / episodes[0].video_files[vk], "v2.1", {})
    if stats_json:
        write_json(serialize_stats(aggregate_stats(stats_list)), root / "meta/stats.json")
    write_json(info, root / V21_INFO_PATH)
    return info


def _write_v30(root, features, episodes, tables, stats_list, task_list, *, fps, video_keys, episodes_per_file,
               video_episodes_per_file, meta_episodes_per_file, chunks_size, encoder, opts, encoder_cfg,
               robot_type, feature_fps, seed) -> dict:
    features = json.loads(json.dumps(features))
    n = len(episodes)

    # ---- data files: ParquetWriter per file, one write_table (= one row group) per episode ----
    writer: pq.ParquetWriter | None = None
    chunk_idx = file_idx = 0
    ep_meta: list[dict] = []
    for i, (ep, buf) in enumerate(zip(episodes, tables)):
        if i > 0 and i % episodes_per_file == 0:
            writer.close()
            writer = None
            chunk_idx, file_idx = update_chunk_file_indices(chunk_idx, file_idx, chunks_size)
        fingerprint = hashlib.sha256(f"{seed}/{ep.episode_index}".encode()).hexdigest()[:16]
        table = episode_table(buf, features, "v3.0", fingerprint)
        rel = Path(V30_DATA_PATH.format(chunk_index=chunk_idx, file_index=file_idx))
        if writer is None:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            writer = pq.ParquetWriter(root / rel, schema=table.schema, compression="snappy", use_dictionary=True)
        writer.write_table(table)
        ep.data_file = rel
        ep_meta.append({
            "data/chunk_index": chunk_idx,
            "data/file_index": file_idx,
            "dataset_from_index": ep.dataset_from_index,
            "dataset_to_index": ep.dataset_to_index,
        })
    if writer is not None:
        writer.close()

    # ---- videos: encode each episode, then append to the current file by stream copy ----
    tmp_dir = Path(tempfile.mkdtemp(dir=root))
    try:
        for vk in video_keys:
            chunk_idx = file_idx = 0
            latest_to = 0.0
            for i, ep in enumerate(episodes):
                ep_path = tmp_dir / f"{vk}_{ep.episode_index:03d}.mp4"
                encode_video(ep_path, ep.frames[vk], fps, encoder, opts)
                ep_duration = video_duration_s(ep_path)
                if i == 0 or i % video_episodes_per_file == 0:
                    if i > 0:
                        chunk_idx, file_idx = update_chunk_file_indices(chunk_idx, file_idx, chunks_size)
                    from_ts = 0.0
                    rel = Path(V30_VIDEO_PATH.format(video_key=vk, chunk_index=chunk_idx, file_index=file_idx))
                    (root / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.move(str(ep_path), str(root / rel))
                else:
                    from_ts = latest_to
                    rel = Path(V30_VIDEO_PATH.format(video_key=vk, chunk_index=chunk_idx, file_index=file_idx))
                    concatenate_videos([root / rel, ep_path], root / rel)
                    ep_path.unlink()
                to_ts = from_ts + ep_duration
                latest_to = to_ts
                ep.video_files[vk] = rel
                ep.video_from_timestamp[vk] = from_ts
                ep.video_to_timestamp[vk] = to_ts
                ep_meta[i].update({
                    f"videos/{vk}/chunk_index": chunk_idx,
                    f"videos/{vk}/file_index": file_idx,
                    f"videos/{vk}/from_timestamp": from_ts,
                    f"videos/{vk}/to_timestamp": to_ts,
                })
            # update_video_info probes videos/<key>/chunk-000/file-000.mp4
            features[vk]["info"] = video_info(
                root / V30_VIDEO_PATH.format(video_key=vk, chunk_index=0, file_index=0), "v3.0", encoder_cfg
            )
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)

    # ---- meta/episodes: dataset_metadata.save_episode / _save_episode_metadata / _flush ----
    rows = []
    m_chunk = m_file = 0
    for i, (ep, stats) in enumerate(zip(episodes, stats_list)):
        if meta_episodes_per_file and i > 0 and i % meta_episodes_per_file == 0:
            m_chunk, m_file = update_chunk_file_indices(m_chunk, m_file, chunks_size)
        row: dict[str, Any] = {"episode_index": ep.episode_index, "tasks": list(ep.tasks), "length": ep.length}
        row.update(ep_meta[i])
        for feat, st in stats.items():  # flatten_dict({"stats": episode_stats}, sep="/")
            for sk, sv in st.items():
                row[f"stats/{feat}/{sk}"] = np.asarray(sv).tolist()
        row["meta/episodes/chunk_index"] = m_chunk
        row["meta/episodes/file_index"] = m_file
        rows.append(row)
    by_file: dict[tuple[int, int], list[dict]] = {}
    for r in rows:
        by_file.setdefault((r["meta/episodes/chunk_index"], r["meta/episodes/file_index"]), []).append(r)
    for (c, f), rs in by_file.items():
        cols = {k: [r[k] for r in rs] for k in rs[0]}
        path = root / V30_EPISODES_PATH.format(chunk_index=c, file_index=f)
        path.parent.mkdir(parents=True, exist_ok=True)
        ep_writer = None
        for start in range(0, len(rs), 10):  # metadata_buffer_size=10: one flush = one row group
            batch = {k: v[start : start + 10] for k, v in cols.items()}
            table = pa.Table.from_pydict(batch)  # types inferred by pyarrow, as LeRobot does
            if ep_writer is None:
                ep_writer = pq.ParquetWriter(path, schema=table.schema, compression="snappy", use_dictionary=True)
            ep_writer.write_table(table.select(ep_writer.schema.names))
        ep_writer.close()

    # ---- tasks.parquet (pandas DataFrame indexed by task string) ----
    pq.write_table(pandas_tasks_table(task_list), root / V30_TASKS_PATH)

    # ---- stats.json: running aggregate over episodes ----
    agg = None
    for st in stats_list:
        agg = st if agg is None else aggregate_stats([agg, st])
    write_json(serialize_stats(agg or {}), root / V30_STATS_PATH)

    # ---- info.json (DatasetInfo.to_dict field order) ----
    if feature_fps:
        for ft in features.values():
            if ft["dtype"] != "video":
                ft["fps"] = fps
    info = {
        "codebase_version": "v3.0",
        "fps": fps,
        "features": features,
        "total_episodes": n,
        "total_frames": sum(ep.length for ep in episodes),
        "total_tasks": len(task_list),
        "chunks_size": chunks_size,
        "data_files_size_in_mb": DEFAULT_DATA_FILE_SIZE_IN_MB,
        "video_files_size_in_mb": DEFAULT_VIDEO_FILE_SIZE_IN_MB,
        "data_path": V30_DATA_PATH,
        "video_path": V30_VIDEO_PATH if video_keys else None,
        "robot_type": robot_type,
        "splits": {"train": f"0:{n}"},
    }
    write_json(info, root / V30_INFO_PATH)
    return info


# ------------------------------------------------------------------------------------------------
# Helpers for tests
# ------------------------------------------------------------------------------------------------


def decode_video_frames(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """All frames of an mp4 as (pts_seconds (N,), frames (N, H, W, 3) uint8), in display order."""
    pts, frames = [], []
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        for fr in c.decode(s):
            pts.append(float(fr.pts * s.time_base))
            frames.append(fr.to_ndarray(format="rgb24"))
    order = np.argsort(pts, kind="stable")
    return np.asarray(pts)[order], np.stack(frames)[order]


def lerobot_pyav_decode(path: str | Path, timestamps: Sequence[float], tolerance_s: float = 1e-4) -> np.ndarray:
    """Re-implementation of LeRobot's ``video_utils.decode_video_frames_pyav`` (v3 main): seek to
    the keyframe before the first query, decode forward, take the nearest frame per query and
    require it within ``tolerance_s``. Returns (N, H, W, 3) uint8. A reference oracle for tests."""
    first_ts, last_ts = min(timestamps), max(timestamps)
    loaded, loaded_ts = [], []
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        c.seek(round(first_ts / s.time_base) - 1, backward=True, any_frame=False, stream=s)
        for fr in c.decode(s):
            if fr.pts is None:
                continue
            ts = float(fr.pts * s.time_base)
            loaded.append(fr.to_ndarray(format="rgb24"))
            loaded_ts.append(ts)
            if ts >= last_ts:
                break
    dist = np.abs(np.asarray(timestamps, dtype=np.float64)[:, None] - np.asarray(loaded_ts)[None, :])
    idx = dist.argmin(axis=1)
    if not (dist[np.arange(len(idx)), idx] <= tolerance_s).all():
        raise AssertionError(f"query {list(timestamps)} vs loaded {loaded_ts} violates tolerance {tolerance_s}")
    return np.stack([loaded[i] for i in idx])


def mean_abs_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())
