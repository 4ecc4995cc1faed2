"""The dataset index: every episode's and every sample's table, built once, memory-mapped.

Opening a dataset used to read every episode's metadata, robot states, image listing and
sensor timestamps into Python objects in every rank and every DataLoader worker (about
180 KB an episode). The index holds what samples need as flat arrays instead:

    <index folder>/
      index.json              version, sources, array names, the first episode's action names and units
      units.json              the units it was built from (episode folders, LeRobot roots) with
                              their sources and file signatures: what an incremental update compares
      episode.<field>.npy     (E,) per-episode columns: source code, path, views, channels, ...
      meta.npy, meta_off.npy  each episode's small JSON record (instruction, sensor layout, ...)
      array.<name>.npy        per-episode variable-length arrays concatenated (frame file names per
      array.<name>_off.npy    view; a LeRobot episode's frame times, tasks and state rows), (E+1,) offsets
      sample_off.npy          (E+1,) each episode's first sample
      sample.<field>.npy      (N, ...) sample time, frame per view, action chunk, padding, and the
                              sensor row its window ends before (no timestamps are read per sample)

It lives in the user cache (:func:`vla_ds.user_cache.index_dir`), keyed by the dataset's
resolved path and the data-config fields that change samples. Every process maps the same
files: the pages are the OS page cache, shared by ranks and workers. An episode is a
short-lived view (:meth:`DatasetIndex.episode`) made from these arrays when it is needed.

Units whose files changed (size or modification time of their files and folders) are
re-indexed; the others' rows are copied from the previous index. Building can be split
across ranks (:func:`build_part` on each, then :func:`merge_parts` on one).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import itertools
import json
import logging
import mmap
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np

from vla_ds.data.episodes import (
    ROBOT_STATES_FILE,
    Episode,
    load_episode,
    read_robot_states_many,
)
from vla_ds.data.lerobot import LeRobotEpisode, is_lerobot_root, load_lerobot_episodes
from vla_ds.errors import DatasetError
from vla_ds.user_cache import index_dir

logger = logging.getLogger(__name__)

INDEX_VERSION = 1
# The per-episode columns (E,) every index has.
EPISODE_FIELDS = ("source", "path", "views", "action_dim", "channels", "invalid", "out_of_range")
SAMPLE_FIELDS = ("time", "frames", "actions", "is_pad", "sensor_end")
SAMPLE_DTYPES = {"time": np.float64, "frames": np.int32, "actions": np.float32, "is_pad": np.bool_,
                 "sensor_end": np.int64}
SAMPLE_FILL = {"frames": -1, "actions": 0}  # what pads a narrower episode's views and action dimensions
BUILD_THREADS = 4  # threads per process where they read faster than one (map_chunks)
STALE_BUILD_S = 3600.0  # a temporary folder older than this is a dead build's
WRITE_CHUNK_BYTES = 1 << 22  # what write_table gathers rows into before writing them


class DatasetIndex:
    """The tables of a set of episodes: in memory (just built) or memory-mapped from a folder.

    ``tables`` maps names to arrays (the file names above without ``.npy``); ``info`` is
    index.json. ``episode(e)`` makes episode e's view; episode e's samples are rows
    ``sample_off[e]:sample_off[e + 1]`` of the ``sample.*`` tables."""

    def __init__(self, tables: dict[str, np.ndarray], info: dict, folder: Path | None = None,
                 resident: list | None = None):
        self.tables = tables
        self.info = info
        self.folder = folder
        self.sample_off = tables["sample_off"]  # (E+1,)
        self.sources: list[str] = info["sources"]
        self.resident = resident  # the episode objects an in-memory index was built from
        self._positions = {id(ep): k for k, ep in enumerate(resident)} if resident is not None else None

    def __getstate__(self):
        if self.folder is None:
            return self.__dict__.copy()
        return {"folder": self.folder}  # a spawned worker maps the files itself (pickling copies a map)

    def __setstate__(self, state):
        if set(state) == {"folder"}:
            self.__dict__.update(DatasetIndex.load(state["folder"]).__dict__)
        else:
            self.__dict__.update(state)

    def id_of(self, episode) -> int:
        """The position in this index of ``episode`` (one of its views, or of its resident episodes)."""
        return self._positions[id(episode)] if self._positions is not None else int(episode.index)

    def __len__(self) -> int:
        return len(self.sample_off) - 1

    @property
    def num_samples(self) -> int:
        return int(self.sample_off[-1])

    def column(self, field: str) -> np.ndarray:
        """(E,) per-episode column ``field`` (one of EPISODE_FIELDS)."""
        return self.tables[f"episode.{field}"]

    def sample_table(self, field: str) -> np.ndarray:
        """(N, ...) sample column ``field`` (one of SAMPLE_FIELDS)."""
        return self.tables[f"sample.{field}"]

    def meta(self, e: int) -> dict:
        off = self.tables["meta_off"]
        return json.loads(self.tables["meta"][off[e]:off[e + 1]].tobytes())

    def array(self, name: str, e: int) -> np.ndarray:
        """Episode e's part of the concatenated array ``name`` (a view of the map)."""
        off = self.tables[f"array.{name}_off"]
        return self.tables[f"array.{name}"][off[e]:off[e + 1]]

    def episode(self, e: int):
        """A view of episode e with the interface VLADataset uses (made now; not kept)."""
        if self.resident is not None:
            return self.resident[e]
        meta = self.meta(e)
        return (Episode if meta["kind"] == "folder" else LeRobotEpisode).from_index(meta, self, e)

    # ---- building

    @classmethod
    def from_episodes(cls, episodes: Sequence, config, units: dict | None = None,
                      resident: bool = False) -> DatasetIndex:
        """Build the index of loaded episodes (each builds its samples under ``config``).
        ``resident``: keep the episode objects and hand them out (an index in memory only)."""
        rows = [episode_row(ep, config, resident) for ep in episodes]
        return cls.from_rows(rows, config, units, resident=list(episodes) if resident else None)

    @classmethod
    def from_rows(cls, rows: list[dict], config, units: dict | None = None,
                  resident: list | None = None) -> DatasetIndex:
        """The index of episodes given as :func:`episode_row` results, in order (in memory)."""
        parts, info = _row_tables(rows)
        parts |= _sample_tables(rows, *_widths(rows), config.action_horizon)
        tables = {name: _concat(pieces, (0, *tail), dtype) for name, (pieces, dtype, tail) in parts.items()}
        return cls(tables, {**info, **({"units": units} if units else {})}, resident=resident)

    @classmethod
    def load(cls, folder: Path) -> DatasetIndex:
        """Map the index in ``folder`` (DatasetError when it is unreadable)."""
        try:
            info = json.loads((folder / "index.json").read_text())
            names = ["meta", "meta_off", "sample_off", *(f"episode.{f}" for f in EPISODE_FIELDS),
                     *(f"sample.{f}" for f in SAMPLE_FIELDS)]
            names += [f"array.{a}{s}" for a in info["arrays"] for s in ("", "_off")]
            tables = {name: _map(folder / f"{name}.npy") for name in names}
        except (OSError, ValueError, KeyError) as e:
            raise DatasetError(f"{folder}: cannot read the dataset index ({e}); delete the folder to rebuild "
                               "it") from None
        return cls(tables, info, folder)

    def units(self) -> dict:
        """units.json: {"paths", "sources", "signatures", "episodes"} (what the index was built from)."""
        if "units" not in self.info:
            self.info["units"] = json.loads((self.folder / "units.json").read_text()) if self.folder else {}
        return self.info["units"]


def load_unit(path: Path, source: str, config, states=None) -> list:
    """The episodes of one unit of a dataset (``config``: a DataConfig): an episode folder, or
    every episode of a LeRobot root. ``states``: an episode folder's robot states, when read."""
    if is_lerobot_root(path):
        return load_lerobot_episodes(path, config.lerobot, source, config.on_bad_sample)
    return [load_episode(path, source=source, states=states)]


def episode_row(ep, config, resident: bool = False) -> dict:
    """What the index holds of one loaded episode: its samples under ``config`` (built now:
    a broken file raises its DatasetError here), its columns, its record and arrays."""
    built = ep.build_samples(config)
    meta, arrays = ({"kind": "resident", "path": str(ep.path)}, {}) if resident else ep.index_record()
    return {
        "source": ep.source, "path": os.fsencode(str(ep.path)), "views": len(ep.camera_views),
        "action_dim": ep.action_dim, "channels": ep.sensor.channels if ep.sensor is not None else 0,
        "invalid": built.invalid, "out_of_range": built.out_of_range,
        "action_names": list(ep.action_names), "action_units": list(ep.action_units),
        "meta": json.dumps(meta, separators=(",", ":")).encode(), "arrays": arrays, "samples": len(built.times),
        "time": np.asarray(built.times, dtype=np.float64),
        "frames": np.asarray(built.frames, dtype=np.int32),
        "actions": np.asarray(built.actions, dtype=np.float32),
        "is_pad": np.asarray(built.is_pad, dtype=np.bool_),
        "sensor_end": (ep.sensor.end_rows(built.times) if ep.sensor is not None
                       else np.zeros(len(built.times), np.int64)),
    }


def _widths(rows: list[dict]) -> tuple[int, int]:
    """(views, action dimension) of the index of ``rows``: the widest (VLADataset refuses a
    mixture, by name; the narrower episodes' rows are padded)."""
    return max((row["views"] for row in rows), default=0), max((row["action_dim"] for row in rows), default=0)


def _row_tables(rows: list[dict]) -> tuple[dict, dict]:
    """Every table of the index of ``rows`` (:func:`episode_row` results, with or without their
    samples) but the ``sample.*`` ones (:func:`_sample_tables`), as the pieces it is the
    concatenation of: ``{name: (pieces, dtype, row shape)}``; and index.json's fields."""
    sources = sorted({row["source"] for row in rows})
    code = {s: i for i, s in enumerate(sources)}
    names = sorted({name for row in rows for name in row["arrays"]})
    metas = [row["meta"] for row in rows]

    def whole(array: np.ndarray) -> tuple[list[np.ndarray], np.dtype, tuple]:
        return [array], array.dtype, array.shape[1:]

    tables = {
        "episode.source": whole(np.asarray([code[row["source"]] for row in rows], dtype=np.int32)),
        "episode.path": whole(np.asarray([row["path"] for row in rows], dtype=np.bytes_) if rows
                              else np.zeros(0, "S1")),
        **{f"episode.{f}": whole(np.asarray([row[f] for row in rows], dtype=np.int64)) for f in EPISODE_FIELDS[2:]},
        "meta": whole(np.frombuffer(b"".join(metas), dtype=np.uint8)),
        "meta_off": whole(np.cumsum([0] + [len(m) for m in metas], dtype=np.int64)),
        "sample_off": whole(np.cumsum([0] + [row["samples"] for row in rows], dtype=np.int64)),
    }
    for name in names:  # an array an episode lacks (fewer views, another format) is empty there
        like = next(row["arrays"][name] for row in rows if name in row["arrays"])
        pieces = [row["arrays"].get(name, np.zeros((0, *like.shape[1:]), like.dtype)) for row in rows]
        dtypes = {piece.dtype for piece in pieces}
        dtype = np.result_type(*dtypes) if like.dtype.kind != "S" else np.dtype(f"S{max(t.itemsize for t in dtypes)}")
        tables[f"array.{name}"] = (pieces, dtype, like.shape[1:])
        tables[f"array.{name}_off"] = whole(np.cumsum([0] + [len(piece) for piece in pieces], dtype=np.int64))
    info = {"version": INDEX_VERSION, "sources": sources, "arrays": names,
            "action_names": rows[0]["action_names"] if rows else [],
            "action_units": rows[0]["action_units"] if rows else []}
    return tables, info


def _write_tables(folder: Path, tables: dict, info: dict, units: dict) -> None:
    """Write :func:`_row_tables`' ``tables`` and the JSON files into ``folder``, index.json last
    (a folder without it is incomplete). No table is ever whole in memory: it is written from
    its pieces (a copy into fresh memory and ``np.save`` took longer than the writes)."""
    for name, (pieces, dtype, tail) in tables.items():
        write_table(folder / f"{name}.npy", pieces, dtype, (sum(len(piece) for piece in pieces), *tail))
    (folder / "units.json").write_text(json.dumps(units))
    (folder / "index.json").write_text(json.dumps(info, indent=1))


def _sample_tails(views: int, action_dim: int, horizon: int) -> dict[str, tuple]:
    """The row shape of each ``sample.*`` table."""
    return {"time": (), "frames": (views,), "actions": (horizon, action_dim), "is_pad": (horizon,), "sensor_end": ()}


def _sample_tables(rows: list[dict], views: int, action_dim: int, horizon: int) -> dict:
    """The ``sample.*`` tables of ``rows`` as their pieces (:func:`_row_tables`); a narrower
    episode's frames and actions widened with SAMPLE_FILL."""
    return {f"sample.{field}": ([_widen(row[field], tail[-1], SAMPLE_FILL[field]) if field in SAMPLE_FILL
                                 else row[field] for row in rows], np.dtype(SAMPLE_DTYPES[field]), tail)
            for field, tail in _sample_tails(views, action_dim, horizon).items()}


class FileBytes(NamedTuple):
    """Rows that are already in a file, as :func:`write_table` takes them: ``count`` bytes at
    ``start`` of ``path`` (copied by the kernel, never through this process's memory).
    ``movable``: the file is this build's own and may be taken whole (renamed, not copied)."""

    path: Path
    start: int
    count: int
    movable: bool = False


def _npy_header(dtype: np.dtype, shape: tuple) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape})
    return buf.getvalue()


def _takes_whole(piece, header: bytes) -> bool:
    """``piece`` is a movable file's every row, after a header as long as ``header``."""
    return (isinstance(piece, FileBytes) and piece.movable and piece.start == len(header)
            and os.stat(piece.path).st_size == piece.start + piece.count)


def write_table(path: Path, pieces: Iterable, dtype: np.dtype, shape: tuple, fill=0) -> None:
    """Write the .npy file (``shape``, ``dtype``) of the concatenation of ``pieces``: arrays (or
    maps) of rows, gathered into writes of about WRITE_CHUNK_BYTES, or :class:`FileBytes`. An
    array narrower than a row (a mixture's fewer views or action dimensions) is padded with ``fill``.
    A first piece that is a movable file's every row, after room for this header, becomes the
    file (renamed to ``path``, the header written over its room): nothing is copied."""
    shape, dtype = tuple(int(n) for n in shape), np.dtype(dtype)
    tail = shape[1:]
    header = _npy_header(dtype, shape)
    pieces = iter(pieces)
    first = next(pieces, None)
    if _takes_whole(first, header):  # the file becomes this table: its rows stay where they are
        os.replace(first.path, path)
        fd = os.open(path, os.O_WRONLY)
        at, first = first.start + first.count, None
    else:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        at = len(header)
    try:
        _write_all(fd, header, 0)
        batch, size = [], 0
        for piece in itertools.chain([first] if first is not None else [], pieces):
            if isinstance(piece, FileBytes):
                if batch:
                    at = _write_all(fd, np.concatenate(batch).data, at)
                    batch, size = [], 0
                at = _copy_bytes(piece, fd, at)
                continue
            step = max(1, WRITE_CHUNK_BYTES // max(1, piece[:1].nbytes))
            for k in range(0, len(piece), step):
                rows = np.ascontiguousarray(piece[k:k + step], dtype=dtype)
                if rows.shape[1:] != tail:
                    wide = np.full((len(rows), *tail), fill, dtype)
                    wide[(slice(None), *(slice(0, n) for n in rows.shape[1:]))] = rows
                    rows = wide
                batch.append(rows)
                size += rows.nbytes
                if size >= WRITE_CHUNK_BYTES:
                    at = _write_all(fd, np.concatenate(batch).data, at)
                    batch, size = [], 0
        if batch:
            at = _write_all(fd, np.concatenate(batch).data, at)
        expected = len(header) + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if at != expected:
            raise RuntimeError(f"{path}: wrote {at} bytes for a {shape} {dtype} table of {expected}")
    finally:
        os.close(fd)


def _write_all(fd: int, data, at: int) -> int:
    """Write ``data`` at offset ``at`` of ``fd``; returns the offset after it."""
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, at)
        view, at = view[n:], at + n
    return at


def _copy_bytes(src: FileBytes, fd: int, at: int) -> int:
    """Copy ``src`` to offset ``at`` of ``fd`` (``copy_file_range``: in the kernel, 10x faster than
    through a map here; read and written where the file systems cannot); returns the offset after it."""
    with open(src.path, "rb", buffering=0) as f:
        start, left = src.start, src.count
        try:
            if not hasattr(os, "copy_file_range"):
                raise OSError("no copy_file_range on this system")
            while left:
                n = os.copy_file_range(f.fileno(), fd, left, start, at)
                if n == 0:
                    raise EOFError(f"{src.path} ends before byte {src.start + src.count}")
                start, left, at = start + n, left - n, at + n
        except OSError:  # not across these file systems (or not on this kernel): through memory
            while left:
                chunk = os.pread(f.fileno(), min(left, WRITE_CHUNK_BYTES), start)
                if not chunk:
                    raise EOFError(f"{src.path} ends before byte {src.start + src.count}") from None
                at = _write_all(fd, chunk, at)
                start, left = start + len(chunk), left - len(chunk)
    return at


def _widen(array: np.ndarray, width: int, fill) -> np.ndarray:
    """``array`` padded with ``fill`` along its last axis to ``width`` (a mixture of V or D)."""
    missing = width - array.shape[-1]
    if not missing:
        return array
    return np.pad(array, [(0, 0)] * (array.ndim - 1) + [(0, missing)], constant_values=fill)


def _concat(parts: list[np.ndarray], empty_shape: tuple, dtype) -> np.ndarray:
    return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(empty_shape, dtype)


def _map(path: Path) -> np.ndarray:
    array = np.load(path, mmap_mode="r", allow_pickle=False)
    return array if array.size else np.load(path, allow_pickle=False)  # an empty file cannot be mapped


# --------------------------------------------------------------------------- where, and whether it is current


def config_key(config) -> str:
    """16 hex digits of what changes a dataset's samples (not the split, workers or window size)."""
    from dataclasses import asdict

    fields = {k: v for k, v in asdict(config).items() if k not in ("dataset_dir", "val_split", "num_workers")}
    if not getattr(config.lerobot, "sensor_features", None):
        fields.pop("sensor_window_size")  # only a LeRobot state window decides which samples are valid
    blob = json.dumps({"version": INDEX_VERSION, **fields}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def index_folder(config) -> Path:
    return index_dir(config.dataset_dir) / config_key(config)


EPISODE_FILES = ("metadata.json", "robot_states.csv", "sensor_data.npz", "images")


def _entry_stat(entry: os.DirEntry) -> str:
    try:
        st = entry.stat()
    except OSError:
        return "-"
    return f"{st.st_size}:{st.st_mtime_ns}"


def _stat(path: str) -> str:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "-"
    return f"{st.st_size}:{st.st_mtime_ns}"


def unit_signature(path: Path | str, entries: list[os.DirEntry] | None = None) -> str:
    """Size and modification time of every file and folder a unit's index depends on: an
    episode folder's metadata, robot states, sensor file and image folders (a folder's time
    changes when a frame is added, removed or renamed); a LeRobot root's metadata, data and
    video files. ``entries``: the folder's listing, when the caller has it."""
    parts = []
    if (entries is None or any(e.name == "meta" for e in entries)) and is_lerobot_root(path):
        for sub in ("meta", "data", "videos"):
            for dirpath, dirnames, filenames in os.walk(os.path.join(path, sub)):
                dirnames.sort()
                parts += [f"{name}={_stat(os.path.join(dirpath, name))}" for name in sorted(filenames)]
        return hashlib.sha1("|".join(parts).encode()).hexdigest()[:16]
    # An episode folder: one listing of it, one of images/, a stat per file and view folder.
    try:
        if entries is None:
            with os.scandir(path) as it:
                entries = list(it)
    except OSError:
        return "-"
    entries = {e.name: e for e in entries if e.name in EPISODE_FILES}
    for name in EPISODE_FILES:
        entry = entries.get(name)
        parts.append(_entry_stat(entry) if entry is not None else "-")
        if name == "images" and entry is not None:
            try:
                with os.scandir(entry.path) as it:
                    parts += sorted(f"{e.name}={_entry_stat(e)}" for e in it if e.is_dir())
            except OSError:
                pass
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:16]


def map_chunks(fn: Callable[[Sequence], list], chunks: Sequence[Sequence], threads: int = BUILD_THREADS) -> Iterator:
    """``fn`` of each chunk, in order (yielded as they are done), the faster of two ways, measured:
    the first chunk runs in this thread untimed (it pays the one-time costs: imports, first calls),
    the second in this thread timed, the next ``threads`` on as many threads; the rest runs on
    threads only if they were 1.5x as fast per item or more. Threads overlap a file system's waits
    (a network one's latency); where reading does not wait, parsing holds the GIL and threads only
    hand it back and forth (one process indexing from the page cache here: 4 threads 1.65x slower
    than one). Timing the first chunk as the one alone made it look 1.6-2.4x slower than it is
    (pyarrow's import) and chose threads on every build here, 12% slower than one thread."""
    if len(chunks) <= 2 + threads or threads <= 1:
        yield from (fn(chunk) for chunk in chunks)
        return
    yield fn(chunks[0])
    start = time.perf_counter()
    second = fn(chunks[1])
    alone = (time.perf_counter() - start) / max(1, len(chunks[1]))  # (not the caller's work on it)
    yield second
    with ThreadPoolExecutor(max_workers=threads) as pool:
        probe = chunks[2:2 + threads]
        start = time.perf_counter()
        done = list(pool.map(fn, probe))
        threaded = (time.perf_counter() - start) / max(1, sum(len(c) for c in probe))
        yield from done
        rest = chunks[2 + threads:]
        if 1.5 * threaded <= alone:
            logger.debug("reading on %d threads: %.2f ms an item, %.2f ms alone", threads, 1e3 * threaded, 1e3 * alone)
            yield from pool.map(fn, rest)
            return
    yield from (fn(chunk) for chunk in rest)


def signatures(paths: Sequence[Path], threads: int = BUILD_THREADS) -> list[str]:
    """:func:`unit_signature` of each path (:func:`map_chunks`)."""
    chunks = [paths[k:k + 512] for k in range(0, len(paths), 512)]
    return [sig for part in map_chunks(lambda chunk: [unit_signature(p) for p in chunk], chunks, threads)
            for sig in part]


class Plan:
    """What opening a dataset's index needs: the units now, which of them the index at
    ``folder`` already holds (``reused``: unit -> its episode range there) and which are stale."""

    def __init__(self, config, pairs: list[tuple[Path, str]], unit_signatures: list[str] | None = None,
                 job: str = ""):
        self.config = config
        self.folder = index_folder(config)
        self.job = job  # names this build's part folders (two jobs building at once do not share them)
        self.paths = [str(p) for p, _ in pairs]
        self.sources = [s for _, s in pairs]
        self.signatures = unit_signatures if unit_signatures is not None else signatures([p for p, _ in pairs])
        self.old, self.old_units = None, 0
        self.reused: dict[int, tuple[int, int]] = {}
        if (self.folder / "index.json").is_file():
            try:
                self.old = DatasetIndex.load(self.folder)
            except DatasetError as e:
                logger.warning("%s; rebuilding it", e)
        if self.old is not None:
            units = self.old.units()
            starts = units.get("episodes", [])
            known = {(p, s, g): (starts[k], starts[k + 1])
                     for k, (p, s, g) in enumerate(zip(units.get("paths", []), units.get("sources", []),
                                                       units.get("signatures", [])))}
            for u, key in enumerate(zip(self.paths, self.sources, self.signatures)):
                if key in known:
                    self.reused[u] = known[key]
            self.old_units = len(units.get("paths", []))
            self.old.info.pop("units", None)  # 100k paths and signatures: not kept for the run
        self.stale = [u for u in range(len(self.paths)) if u not in self.reused]

    @property
    def current(self) -> bool:
        """The index at ``folder`` is exactly these units, in this order."""
        return self.old is not None and not self.stale and self.old_units == len(self.paths)


def build_part(plan: Plan, rank: int = 0, world: int = 1) -> None:
    """Index this rank's share of the stale units (a contiguous 1/world of them) into a part folder
    beside the index. Raises the first broken episode's DatasetError (nothing is written).

    The samples' tables are streamed to their files chunk by chunk (:class:`SampleStream`): a
    rank holds its episodes' small fields, not their samples (on threads, also the chunks read
    ahead of the writer)."""
    mine = plan.stale[slice(*_share(len(plan.stale), rank, world))]
    part = _part_folder(plan, rank)
    shutil.rmtree(part, ignore_errors=True)
    if not mine:
        return
    start = time.perf_counter()

    def index_units(units: list[int]) -> list[list[dict]]:
        paths = [Path(plan.paths[u]) for u in units]
        states = read_robot_states_many([p / ROBOT_STATES_FILE for p in paths])  # one parse for the chunk
        return [[episode_row(ep, plan.config) for ep in load_unit(path, plan.sources[u], plan.config, st)]
                for u, path, st in zip(units, paths, states)]

    part.parent.mkdir(parents=True, exist_ok=True)
    tmp = part.parent / f"{part.name}.{uuid.uuid4().hex}.tmp"  # swept as a part folder if the build dies
    tmp.mkdir()
    try:
        rows, starts = [], [0]
        with SampleStream(tmp) as stream:
            for chunk in map_chunks(index_units, [mine[k:k + 32] for k in range(0, len(mine), 32)]):
                for unit_rows in chunk:
                    rows += [stream.add(row) for row in unit_rows]
                    starts.append(len(rows))
            stream.finish(*_widths(rows), plan.config.action_horizon)
        tables, info = _row_tables(rows)
        _write_tables(tmp, tables, info, {"units": mine, "episodes": starts})
        os.replace(tmp, part)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("indexed %d of %d units (%d episodes, %d samples) of %s in %.1f s", len(mine), len(plan.paths),
                len(rows), sum(row["samples"] for row in rows), plan.config.dataset_dir,
                time.perf_counter() - start)


class SampleStream:
    """The ``sample.*`` tables of an index folder, written as episodes are indexed: each
    episode's sample arrays are appended to a file per table and dropped (:meth:`add`), after
    room for the .npy header that :meth:`finish` writes. The build then holds no samples, and it
    copies them nowhere: on the machine measured, a page's first touch costs 10 us, 0.4 s of a
    5000-episode part when the rows were kept, and a copy of the files (a header first) 1-2 s
    of a 50,000-episode part."""

    HEADER_BYTES = 128  # numpy's header of any (N, V) or (N, H, D) table: a dict padded to 64 bytes

    def __init__(self, folder: Path):
        self.folder = folder
        self.files = {}
        try:
            for f in SAMPLE_FIELDS:
                self.files[f] = open(folder / f"sample.{f}.npy", "wb", buffering=1 << 20,
                                     opener=lambda path, flags: os.open(path, flags, 0o644))  # as write_table's
                self.files[f].write(bytes(self.HEADER_BYTES))
        except OSError:
            self.__exit__()
            raise
        self.shapes: list[tuple[int, int, int]] = []  # each episode's (samples, views, action dim)
        self.touched = time.monotonic()

    def add(self, row: dict) -> dict:
        """Append ``row``'s samples (an :func:`episode_row` result); returns it without them."""
        n = len(row["time"])
        for f in SAMPLE_FIELDS:
            self.files[f].write(np.ascontiguousarray(row[f], dtype=SAMPLE_DTYPES[f]).data)
        self.shapes.append((n, row["frames"].shape[1], row["actions"].shape[2]) if n else (0, -1, -1))
        if time.monotonic() - self.touched > 60:  # a build's folder older than STALE_BUILD_S is a dead one's
            os.utime(self.folder)
            self.touched = time.monotonic()
        return {k: v for k, v in row.items() if k not in SAMPLE_FIELDS}

    def finish(self, views: int, action_dim: int, horizon: int) -> None:
        """Give each table's file its .npy header; the rows of an episode with fewer views or
        action dimensions (a mixture VLADataset refuses, written to be refused by name) padded
        as :meth:`DatasetIndex.from_rows` pads them, the file rewritten."""
        for f in self.files.values():
            f.close()
        n = sum(k for k, _, _ in self.shapes)
        uniform = all(k == 0 or (v == views and d == action_dim) for k, v, d in self.shapes)
        for field, tail in _sample_tails(views, action_dim, horizon).items():
            path, dtype = self.folder / f"sample.{field}.npy", np.dtype(SAMPLE_DTYPES[field])
            if uniform or field not in SAMPLE_FILL:  # the file taken whole when numpy's header fits its room
                pieces = [FileBytes(path, self.HEADER_BYTES, path.stat().st_size - self.HEADER_BYTES, movable=True)]
            else:  # each episode's rows at its own width, widened
                flat, pieces, at = np.fromfile(path, dtype=dtype, offset=self.HEADER_BYTES), [], 0
                for k, v, d in self.shapes:
                    if k:
                        shape = (k, *_sample_tails(v, d, horizon)[field])
                        size = int(np.prod(shape))
                        pieces.append(_widen(flat[at:at + size].reshape(shape), tail[-1], SAMPLE_FILL[field]))
                        at += size
            final = self.folder / f"sample.{field}.npy.tmp"
            write_table(final, pieces, dtype, (n, *tail))
            os.replace(final, path)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for f in self.files.values():
            f.close()


def merge_parts(plan: Plan, world: int = 1) -> DatasetIndex:
    """Write the index of ``plan``'s units: the reused units' rows from the previous index and
    the stale ones' from the parts :func:`build_part` wrote (on ``world`` ranks); returns it mapped."""
    runs: list[tuple[DatasetIndex, int, int]] = []  # (index, first episode, end episode), in unit order
    parts: dict[int, DatasetIndex] = {}
    where: dict[int, tuple[int, int]] = {}  # stale unit -> (rank, position among that rank's units)
    for rank in range(world):
        first, end = _share(len(plan.stale), rank, world)
        where.update((plan.stale[k], (rank, k - first)) for k in range(first, end))
    starts = [0]
    for u in range(len(plan.paths)):
        if u in plan.reused:
            src, (lo, hi) = plan.old, plan.reused[u]
        else:
            rank, k = where[u]
            if rank not in parts:
                if not (_part_folder(plan, rank) / "index.json").is_file():
                    # That rank's cache is not this one (a node-local VLA_DS_CACHE): index its share here.
                    logger.warning("%s: no index part from rank %d (is VLA_DS_CACHE on a filesystem every node "
                                   "sees?); indexing its share on this rank", plan.folder, rank)
                    build_part(plan, rank, world)
                parts[rank] = DatasetIndex.load(_part_folder(plan, rank))
            src = parts[rank]
            first = src.units()["episodes"]
            lo, hi = first[k], first[k + 1]
        if runs and runs[-1][0] is src and runs[-1][2] == lo:
            runs[-1] = (src, runs[-1][1], hi)
        elif hi > lo:
            runs.append((src, lo, hi))
        starts.append(starts[-1] + hi - lo)
    units = {"paths": plan.paths, "sources": plan.sources, "signatures": plan.signatures, "episodes": starts}
    tmp = plan.folder.parent / f".{plan.folder.name}.{uuid.uuid4().hex}.tmp"
    try:
        _write_runs(tmp, runs, units, movable=list(parts.values()))
        old = plan.folder.parent / f".{plan.folder.name}.{uuid.uuid4().hex}.old"
        if plan.folder.exists():
            os.replace(plan.folder, old)  # maps of it stay valid (open files), a new open sees the new one
        os.replace(tmp, plan.folder)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        for rank in range(world):
            shutil.rmtree(_part_folder(plan, rank), ignore_errors=True)
    return DatasetIndex.load(plan.folder)


def _write_runs(folder: Path, runs: list[tuple[DatasetIndex, int, int]], units: dict,
                movable: Sequence[DatasetIndex] = ()) -> None:
    """Write the episodes ``runs`` name, in order, as one index folder: every table is streamed
    into its file run by run (never a whole table in memory). A table of ``movable`` indexes (this
    build's parts, removed after) whose rows come first, all of them, is moved here and the other
    runs' rows appended to it: with two ranks, half the copying (the index at 100k episodes is
    2.7 GB)."""
    folder.mkdir(parents=True)
    sources = sorted({src.sources[c] for src, lo, hi in runs for c in np.unique(src.column("source")[lo:hi])})
    code = {s: i for i, s in enumerate(sources)}
    arrays = sorted({a for src, _, _ in runs for a in src.info["arrays"]})

    def offsets(src: DatasetIndex, name: str) -> np.ndarray:
        """(E+1,) where each episode's rows of ``name`` start in ``src`` (all 0: it has none)."""
        if name.startswith("episode."):
            return np.arange(len(src) + 1)
        if name.startswith("sample."):
            return src.sample_off
        key = "meta_off" if name == "meta" else f"{name}_off"
        return src.tables[key] if key in src.tables else np.zeros(len(src) + 1, np.int64)

    names = ["meta", *(f"episode.{f}" for f in EPISODE_FIELDS), *(f"sample.{f}" for f in SAMPLE_FIELDS),
             *(f"array.{a}" for a in arrays)]
    for name in names:
        refs = [src.tables[name] for src, _, _ in runs if name in src.tables]
        dtype = refs[0].dtype if refs[0].dtype.kind != "S" else np.dtype(f"S{max(r.dtype.itemsize for r in refs)}")
        tail = tuple(int(k) for k in np.max([r.shape[1:] for r in refs], axis=0)) if refs[0].ndim > 1 else ()
        # (the widest V and D: a mixture VLADataset refuses is still written, to be refused by name)
        pieces = [(src, int(offsets(src, name)[lo]), int(offsets(src, name)[hi])) for src, lo, hi in runs]

        def rows(pieces=pieces, name=name, dtype=dtype, tail=tail):
            for src, a, b in pieces:
                if b > a:
                    table = src.tables[name]
                    if name == "episode.source":
                        yield np.asarray([code.get(s, -1) for s in src.sources], dtype=np.int32)[table[a:b]]
                    elif isinstance(table.base, mmap.mmap) and table.dtype == dtype and table.shape[1:] == tail:
                        # (a whole mapped table: its .offset is its file's header length)
                        row = table.dtype.itemsize * int(np.prod(tail, dtype=np.int64))  # its rows as they are
                        yield FileBytes(src.folder / f"{name}.npy", table.offset + a * row, (b - a) * row,
                                        movable=any(src is m for m in movable))
                    else:
                        yield table[a:b]

        fill = SAMPLE_FILL.get(name.removeprefix("sample."), 0)  # episode.* tables are never narrower
        write_table(folder / f"{name}.npy", rows(), dtype, (sum(b - a for _, a, b in pieces), *tail), fill)
        if not name.startswith("episode."):  # its offsets, rebased run by run
            parts, base = [np.zeros(1, np.int64)], 0
            for src, lo, hi in runs:
                off = offsets(src, name)
                parts.append(off[lo + 1:hi + 1] - off[lo] + base)
                base += int(off[hi] - off[lo])
            key = {"meta": "meta_off", "sample.time": "sample_off"}.get(name, f"{name}_off")
            if not name.startswith("sample.") or name == "sample.time":
                np.save(folder / f"{key}.npy", np.concatenate(parts))
    info = {k: v for k, v in runs[0][0].info.items() if k != "units"}
    (folder / "units.json").write_text(json.dumps(units))
    (folder / "index.json").write_text(json.dumps({**info, "sources": sources, "arrays": arrays}, indent=1))


def _share(n: int, rank: int, world: int) -> tuple[int, int]:
    """[first, end) of ``rank``'s share of ``n`` stale units: contiguous, so the merge copies one
    run per rank (every ``world``-th unit would make a run per episode)."""
    return rank * n // world, (rank + 1) * n // world


def _part_folder(plan: Plan, rank: int) -> Path:
    return plan.folder.parent / f".{plan.folder.name}.part{rank}{'.' + plan.job if plan.job else ''}"


def _lock_file(folder: Path) -> Path:
    return folder.parent / f".{folder.name}.lock"


@contextlib.contextmanager
def locked(folder: Path):
    """Hold the lock of the index ``folder`` (a file beside it): one process writes it at a
    time. Half-written or replaced copies and ranks' parts left by builds that died more than
    an hour ago are removed under it."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(_lock_file(folder), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for stale in [*folder.parent.glob(f".{folder.name}.*.tmp"), *folder.parent.glob(f".{folder.name}.*.old"),
                      *folder.parent.glob(f".{folder.name}.part*")]:
            try:
                if stale.is_dir() and time.time() - stale.stat().st_mtime > STALE_BUILD_S:
                    shutil.rmtree(stale, ignore_errors=True)
            except OSError:
                pass
        yield


def open_index(config, pairs: list[tuple[Path, str]], unit_signatures: list[str] | None = None) -> DatasetIndex:
    """The index of ``pairs`` (episode folders and LeRobot roots with their sources) under
    ``config``, from the user cache: built if missing, updated if some units changed, else
    mapped as it is. One process at a time builds (a file lock); the others then map its
    result. When the cache cannot be written to, the index is built in memory (a warning)."""
    plan = Plan(config, pairs, unit_signatures)
    if plan.current:
        return plan.old
    try:
        plan.folder.parent.mkdir(parents=True, exist_ok=True)
        _lock_file(plan.folder).touch()  # can this process write the cache?
    except OSError as e:
        logger.warning("cannot write the dataset index to %s (%s; set VLA_DS_CACHE to a writable folder): "
                       "indexing in memory in every process", plan.folder, e)
        episodes = [ep for path, source in pairs for ep in load_unit(Path(path), source, config)]
        for k, ep in enumerate(episodes):
            ep.index = k
        return DatasetIndex.from_episodes(episodes, config, resident=True)
    with locked(plan.folder):
        plan = Plan(config, pairs, plan.signatures)  # another process may have built it while this one waited
        if plan.current:
            return plan.old
        start = time.perf_counter()
        build_part(plan)
        index = merge_parts(plan)
        logger.info("dataset index of %s: %d units, %d re-indexed, in %s (%.1f s)", config.dataset_dir,
                    len(plan.paths), len(plan.stale), plan.folder, time.perf_counter() - start)
        return index
