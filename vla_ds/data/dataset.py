"""Samples: camera views, sensor window, action chunk and padding (SPEC section 3).

A sample is taken at every ``frame_stride``-th frame time t of an episode's first
camera view. ``VLADataset.get_item`` returns one sample as numpy values and
``collate_numeric`` stacks a list of them into a batch. Keys and shapes, per sample
-> per batch (B samples, V views, W = sensor_window_size, C = sensor channels,
H = action_horizon), are the constants below.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import torch
import yaml

from vla_ds.batch import (
    ACTION_IS_PAD,
    ACTIONS,
    CONFIDENCE,
    EPISODE_INDEX,
    FRAME_TIME,
    HAS_SENSOR,
    IMAGES,
    INSTRUCTION,
    SENSOR_PAD,
    SENSOR_WINDOW,
)
from vla_ds.data.actions import (  # noqa: F401  (re-exported: the sample maths' old home)
    ACTION_DIM,
    DELTA_POSE_NAMES,
    DELTA_POSE_UNITS,
    compute_action_chunk,
    compute_action_chunks,
    wrap_degrees,
)
from vla_ds.data.episodes import Episode, decode_image, find_episode_dirs, load_episode  # noqa: F401
from vla_ds.data.index import (
    DatasetIndex,
    Plan,
    build_part,
    load_unit,
    locked,
    merge_parts,
    open_index,
    unit_signature,
)
from vla_ds.data.lerobot import LeRobotConfig
from vla_ds.errors import ConfigError, DatasetError

logger = logging.getLogger(__name__)

MIXTURE_FILE = "mixture.yaml"
BAD_SAMPLE_POLICIES = ("error", "skip")


@dataclass
class DataConfig:
    """How samples are cut from a dataset directory.

    Fields:
        dataset_dir: root of the dataset (SPEC section 3); episodes are found at any depth,
            and an optional ``mixture.yaml`` there selects sources and their weights.
        sensor_window_size: W, sensor samples per window, ending at the sample time
            (front zero-padded when fewer exist).
        action_horizon: H, future action steps per sample (the action chunk).
        frame_stride: take a sample at every n-th frame of the first camera view.
        view_tolerance_s: a view's nearest frame must be within this many seconds of
            the sample time, otherwise the sample is invalid.
        val_split: fraction of episodes (per source) held out for validation, in [0, 1).
        num_workers: data-loader worker processes per rank.
        on_bad_sample: what an invalid sample does: "error" stops with a message naming
            the episode, view and time; "skip" drops it at indexing and counts it.
        lerobot: how a LeRobot dataset's features become views, instruction, actions and
            sensor stream (:class:`~vla_ds.data.lerobot.LeRobotConfig`; docs/lerobot.md).
    """

    dataset_dir: str = ""
    sensor_window_size: int = 650
    action_horizon: int = 8
    frame_stride: int = 1
    view_tolerance_s: float = 0.1
    val_split: float = 0.1
    num_workers: int = 2
    on_bad_sample: str = "error"
    lerobot: LeRobotConfig = field(default_factory=LeRobotConfig)

    def __post_init__(self):
        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        for name in ("sensor_window_size", "action_horizon", "frame_stride"):
            v = getattr(self, name)
            if not is_int(v) or v < 1:
                raise ConfigError(f"DataConfig.{name} must be an integer >= 1, got {v!r}")
        if not is_int(self.num_workers) or self.num_workers < 0:
            raise ConfigError(f"DataConfig.num_workers must be an integer >= 0, got {self.num_workers!r}")
        if not is_num(self.view_tolerance_s) or self.view_tolerance_s < 0:
            raise ConfigError(f"DataConfig.view_tolerance_s must be a number >= 0, got {self.view_tolerance_s!r}")
        if not is_num(self.val_split) or not 0 <= self.val_split < 1:
            raise ConfigError(f"DataConfig.val_split must be in [0, 1), got {self.val_split!r}")
        if self.on_bad_sample not in BAD_SAMPLE_POLICIES:
            raise ConfigError(f"DataConfig.on_bad_sample must be one of {BAD_SAMPLE_POLICIES}, "
                              f"got {self.on_bad_sample!r}")
        if isinstance(self.lerobot, Mapping):
            self.lerobot = LeRobotConfig(**self.lerobot)
        if not isinstance(self.dataset_dir, (str, os.PathLike)):
            raise ConfigError(f"DataConfig.dataset_dir must be a path string, got {self.dataset_dir!r}")
        self.dataset_dir = os.fspath(self.dataset_dir)


# --------------------------------------------------------------------------- finding episodes


def read_mixture(root: Path) -> list[tuple[str, float]] | None:
    """Parse ``root/mixture.yaml`` into [(source path, weight), ...], or None when absent.

    Format: ``sources: [{path: Needle_insertion_eye_trocar, weight: 3.0}, ...]``; paths
    relative to root, weight > 0 (default 1.0).
    """
    path = root / MIXTURE_FILE
    if not path.is_file():
        return None
    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise DatasetError(f"{path}: invalid YAML ({' '.join(str(e).split())})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot read ({e})") from None
    example = "sources: [{path: FOLDER, weight: 1.0}, ...]"
    if not isinstance(doc, dict) or not isinstance(doc.get("sources"), list) or not doc["sources"]:
        raise DatasetError(f"{path}: expected a non-empty source list: {example}")
    unknown = sorted(set(doc) - {"sources"})
    if unknown:
        raise DatasetError(f"{path}: unknown key '{unknown[0]}' (expected: {example})")
    sources = []
    for i, entry in enumerate(doc["sources"]):
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or not entry["path"]:
            raise DatasetError(f"{path}: source {i} must be a mapping with a 'path' string, got {entry!r}")
        bad = sorted(set(entry) - {"path", "weight"})
        if bad:
            raise DatasetError(f"{path}: source '{entry['path']}': unknown key '{bad[0]}' (expected 'path', 'weight')")
        name = str(PurePosixPath(entry["path"]))
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
            raise DatasetError(f"{path}: source '{name}': weight must be a number > 0, got {weight!r}")
        if not (root / name).is_dir():
            raise DatasetError(f"{path}: source path '{name}' not found ({root / name})")
        if name in (s for s, _ in sources):
            raise DatasetError(f"{path}: source '{name}' is listed twice")
        sources.append((name, float(weight)))
    return sources


def _default_source(episode_dir: Path, root: Path | None) -> str:
    """Source name without a mixture: the top-level folder under the root ("." for the root itself)."""
    if root is not None:
        try:
            rel = episode_dir.relative_to(root)
            return rel.parts[0] if rel.parts else "."
        except ValueError:
            pass
    return episode_dir.parent.name


def scan_dataset(root: str | os.PathLike, describe=None) -> tuple[list[tuple], dict[str, float] | None]:
    """Find the episodes a dataset directory uses, without loading them.

    Returns ``([(episode_dir, source), ...] sorted by path, source_weights)``; a LeRobot
    dataset root (``meta/info.json``) stands for all of its episodes.
    ``source_weights`` is None without mixture.yaml (every episode used, uniform sampling);
    with it only the listed sources are used. With ``describe`` (as
    :func:`~vla_ds.data.episodes.find_episode_dirs` takes it) each pair has a third item, what
    ``describe`` returned for that folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset directory not found")

    def found(folder: Path) -> list[tuple]:
        if describe is None:
            return [(d, None) for d in find_episode_dirs(folder)]
        return find_episode_dirs(folder, describe)

    def pair(d: Path, source: str, value) -> tuple:
        return (d, source) if describe is None else (d, source, value)

    mixture = read_mixture(root)
    if mixture is None:
        return [pair(d, _default_source(d, root), value) for d, value in found(root)], None
    owner: dict[str, str] = {}
    pairs = []
    for name, _ in mixture:
        dirs = found(root / name)
        if not dirs:
            raise DatasetError(f"{root / MIXTURE_FILE}: source '{name}' has no episodes "
                               f"(no folder under {root / name} holds metadata.json or meta/info.json)")
        for d, value in dirs:
            key = os.path.realpath(d)
            if key in owner:
                raise DatasetError(f"{root / MIXTURE_FILE}: sources '{owner[key]}' and '{name}' overlap "
                                   f"(both contain {d})")
            owner[key] = name
            pairs.append(pair(d, name, value))
    return sorted(pairs, key=lambda p: (p[0], p[1])), dict(mixture)


def load_episodes(pairs: Sequence[tuple[Path, str]], max_threads: int = 16,
                  lerobot: LeRobotConfig | None = None, on_bad_sample: str = "error") -> list:
    """Load [(episode_dir or LeRobot root, source), ...] in order, ``index`` = position in the
    result (a LeRobot root gives all its episodes). Threads overlap the file-system latency
    (network storage); the first failing episode's error is raised."""
    config = DataConfig(lerobot=lerobot or LeRobotConfig(), on_bad_sample=on_bad_sample)
    with ThreadPoolExecutor(max_workers=max(1, min(max_threads, len(pairs)))) as pool:
        episodes = [ep for group in pool.map(lambda pair: load_unit(*pair, config), pairs) for ep in group]
    for index, ep in enumerate(episodes):
        ep.index = index
    return episodes


def _scan_units(root: Path) -> tuple[list[tuple[Path, str]], list[str], dict[str, float] | None]:
    """(units with their sources, their file signatures, mixture weights) of a dataset: one walk."""
    signed, weights = scan_dataset(root, describe=unit_signature)
    if not signed:
        raise DatasetError(f"{root}: no episodes found (no folder holds metadata.json)")
    return [(p, s) for p, s, _ in signed], [g for _, _, g in signed], weights


def build_index(config: DataConfig, rank: int, world: int, phase, job: str = "") -> DatasetIndex:
    """Collective over ``world`` ranks: the index of ``config``'s dataset, each stale unit
    indexed by one rank (a contiguous share each), merged by rank 0 while the others wait, then
    mapped by all. ``phase(name)`` is a context manager in which a rank works alone and
    at whose end it waits for every rank (the training's long-phase heartbeat); every rank
    enters both phases, whether or not there is work. ``job`` names this run's part folders
    (the launcher's port: another job building the same index keeps its own). One rank
    (``world`` 1) is :func:`open_index`."""
    pairs, signatures, _ = _scan_units(Path(config.dataset_dir))
    if world == 1:
        with phase("dataset index"):
            return open_index(config, pairs, signatures)
    plan = Plan(config, pairs, signatures, job)
    with phase("dataset index build"):
        if not plan.current:
            plan.folder.parent.mkdir(parents=True, exist_ok=True)
            build_part(plan, rank, world)
    with phase("dataset index merge"):
        if rank == 0 and not plan.current:
            start = time.perf_counter()
            with locked(plan.folder):
                merge_parts(plan, world)
            logger.info("dataset index of %s: %d units, %d re-indexed on %d ranks, in %s (merged in %.1f s)",
                        config.dataset_dir, len(plan.paths), len(plan.stale), world, plan.folder,
                        time.perf_counter() - start)
    # Rank 0's merge is what every rank maps; a rank whose cache is not rank 0's (node-local
    # VLA_DS_CACHE) finds it missing or stale here and builds its own under the lock.
    return open_index(config, pairs, plan.signatures)


# --------------------------------------------------------------------------- dataset


class EpisodeList(Sequence):
    """The episodes of a dataset: each a view made from the index when asked for (nothing is
    kept per episode, so forked DataLoader workers copy no pages by touching them)."""

    def __init__(self, index: DatasetIndex, ids: np.ndarray):
        self._index, self._ids = index, ids

    def __len__(self) -> int:
        return len(self._ids)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self._index.episode(int(e)) for e in self._ids[k]]
        return self._index.episode(int(self._ids[k]))

    def index(self, episode, *args) -> int:
        """The position of ``episode`` (one of these) in the list."""
        found = np.flatnonzero(self._ids == self._index.id_of(episode))
        if not len(found):
            raise ValueError(f"{episode.path} is not one of these episodes")
        return int(found[0])

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and len(self) == len(other) and list(self) == list(other)


class VLADataset(torch.utils.data.Dataset):
    """Samples of a set of episodes (a map-style dataset; items are dicts of numpy values).

    Build the full dataset with :meth:`from_config`, then split it by episode with
    :func:`split_train_val`. The samples come from the dataset's index
    (:mod:`vla_ds.data.index`: built once per dataset and data config, memory-mapped by
    every rank and worker). Building it checks everything that can be checked without
    decoding images: each episode's robot states span at least one action chunk, every
    episode has the same number of camera views, sensor channel counts agree, and each
    sample's views have a frame within ``view_tolerance_s``.

    Frame times of the first view outside the episode's robot_states time range
    ``[first timestamp, last timestamp]`` (1e-6 s slack; a frame exactly at either end
    stays) are not samples: their actions cannot be interpolated. They are dropped at
    indexing, counted per episode in ``out_of_range_frames``, reported by
    :meth:`describe` and logged once by :meth:`from_config`; this is not an error.

    Args:
        config: the data config.
        episodes: loaded :class:`Episode` objects or episode directories (loaded here,
            with the top-level folder under ``config.dataset_dir`` as source; indexed in
            memory). None scans ``config.dataset_dir`` like :meth:`from_config`.
        source_weights: mixture weight per source name; None means uniform over samples.
        sensor_channels: force C (a split's halves share their parent's); by default
            read from the episodes' sensor files, 1 when none has one.
        num_views: force the number of camera views (for an empty split half).
        allow_empty: allow zero samples (a validation split); otherwise a DatasetError.
        index, episode_ids: the samples of these episodes of an index (:meth:`with_episodes`).

    Attributes:
        episodes: the episodes, in path order (views made on access: :class:`EpisodeList`).
        sensor_channels: C.
        num_views: V, camera views per sample.
        source_weights: {source: weight} from mixture.yaml (or as given), or **None
            without mixture.yaml**: then every sample is equally likely and the sampler
            should get ``weights=None`` (a permutation per epoch, each sample once),
            not ``sample_weights`` (which would draw with replacement).
        sample_weights: (N,) float64 sampling probability per sample (sums to 1): each
            source's total is proportional to its weight; uniform (1/N) when
            ``source_weights`` is None. Always an array (made on first use).
        invalid_samples: {episode dir: samples dropped} with on_bad_sample="skip".
        out_of_range_frames: {episode dir: sample frame times dropped} for frames outside
            that episode's robot_states time range (episodes with none are absent).
    """

    def __init__(self, config: DataConfig, episodes: Sequence[Episode | str | os.PathLike] | None = None,
                 source_weights: Mapping[str, float] | None = None, *, sensor_channels: int | None = None,
                 num_views: int | None = None, allow_empty: bool = False, action_spec: tuple | None = None,
                 index: DatasetIndex | None = None, episode_ids: Sequence[int] | None = None):
        self.config = config
        root = Path(config.dataset_dir) if config.dataset_dir else None
        if index is None:
            if episodes is None:
                if root is None:
                    raise ConfigError("DataConfig.dataset_dir is empty: set it with --dataset_dir")
                pairs, signatures, scanned_weights = _scan_units(root)
                index = open_index(config, pairs, signatures)
                if source_weights is None:
                    source_weights = scanned_weights
            else:
                loaded = [load_episode(ep, source=_default_source(Path(ep), root), index=i)
                          if isinstance(ep, (str, os.PathLike))
                          else load_episode(ep.path, source=ep.source, index=ep.index)
                          if getattr(ep, "states", True) is None  # a view of another index: read it again
                          else ep for i, ep in enumerate(episodes)]
                index = DatasetIndex.from_episodes(loaded, config, resident=True)
        self._index = index
        self._ids = np.arange(len(index), dtype=np.int64) if episode_ids is None \
            else np.asarray(episode_ids, dtype=np.int64).reshape(-1)
        counts = np.diff(index.sample_off)[self._ids]  # (E,) samples per episode
        self._cum = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # (E+1,)
        self.episodes = EpisodeList(index, self._ids)
        self.source_weights = dict(source_weights) if source_weights is not None else None
        where = str(root) if root is not None else "dataset"
        if not len(self._ids) and not allow_empty:
            raise DatasetError(f"{where}: no episodes given")

        self._check_episodes(num_views, action_spec, sensor_channels)
        if len(self) == 0 and not allow_empty:
            dropped = []
            invalid, out_of_range = (int(index.column(f)[self._ids].sum()) for f in ("invalid", "out_of_range"))
            if invalid:
                dropped.append(f"{invalid} skipped as invalid")
            if out_of_range:
                dropped.append(f"{out_of_range} frames outside their episode's robot_states time range")
            raise DatasetError(f"{where}: no valid samples in {len(self._ids)} episodes"
                               + (f" ({'; '.join(dropped)})" if dropped else ""))
        self._sample_weights = None

    @classmethod
    def from_config(cls, config: DataConfig, index: DatasetIndex | None = None) -> VLADataset:
        """Every episode under ``config.dataset_dir`` (only mixture.yaml's sources if it exists).
        ``index``: that dataset's index, already opened (:func:`vla_ds.data.index.build_index`)."""
        start = time.perf_counter()
        if index is None:
            ds = cls(config)
        else:
            mixture = read_mixture(Path(config.dataset_dir))
            ds = cls(config, index=index, source_weights=dict(mixture) if mixture is not None else None)
        logger.info("loaded %d episodes (%d samples) from %s in %.1f s",
                    len(ds.episodes), len(ds), config.dataset_dir, time.perf_counter() - start)
        for path, n in ds.invalid_samples.items():
            logger.warning("%s: skipped %d samples with a camera view missing a frame within %.3g s",
                           path, n, config.view_tolerance_s)
        out_of_range = ds._index.column("out_of_range")[ds._ids]
        n_out = int(out_of_range.sum())
        if n_out:
            logger.info("%d frames outside their episode's robot_states time range were not used "
                        "(%d of %d episodes)", n_out, int((out_of_range > 0).sum()), len(ds.episodes))
        return ds

    def with_episodes(self, episodes: Sequence[Episode], allow_empty: bool = True) -> VLADataset:
        """A dataset over some of this dataset's episodes, with the same config, weights, C and V."""
        return VLADataset(self.config, source_weights=self.source_weights, sensor_channels=self.sensor_channels,
                          num_views=self.num_views, allow_empty=allow_empty,
                          action_spec=(self.action_dim, self.action_names, self.action_units),
                          index=self._index, episode_ids=[self._index.id_of(ep) for ep in episodes])

    # ---- construction helpers

    def _counted(self, field: str) -> dict[str, int]:
        column = self._index.column(field)[self._ids]
        paths = self._index.column("path")
        return {os.fsdecode(paths[self._ids[k]]): int(column[k]) for k in np.flatnonzero(column)}

    @property
    def invalid_samples(self) -> dict[str, int]:
        return self._counted("invalid")

    @property
    def out_of_range_frames(self) -> dict[str, int]:
        return self._counted("out_of_range")

    def _check_episodes(self, num_views: int | None, action_spec: tuple | None, sensor_channels: int | None):
        index, ids = self._index, self._ids
        codes = index.column("source")[ids]
        if self.source_weights is not None:
            missing = [k for k, c in enumerate(codes) if index.sources[c] not in self.source_weights]
            if missing:
                ep = self.episodes[missing[0]]
                raise DatasetError(f"{ep.path}: source '{ep.source}' has no mixture weight")
        views = index.column("views")[ids]
        first = self.episodes[0] if len(ids) else None
        self.num_views = num_views if num_views is not None else int(views[0]) if first is not None else 0
        bad = np.flatnonzero(views != self.num_views)
        if len(bad):
            ep = self.episodes[int(bad[0])]
            ref = f"{first.path} has {len(first.camera_views)} ({', '.join(first.camera_views)})" \
                if first is not None and num_views is None else f"expected {self.num_views}"
            raise DatasetError(f"{ep.path}: {len(ep.camera_views)} camera views "
                               f"({', '.join(ep.camera_views)}) but {ref}; every episode needs the same number")
        # D, the action dimension: the same for every episode (a mixture of formats must agree).
        if action_spec is None:
            action_spec = (first.action_dim, tuple(first.action_names), tuple(first.action_units)) if first \
                else (ACTION_DIM, DELTA_POSE_NAMES, DELTA_POSE_UNITS)
        self.action_dim, self.action_names, self.action_units = action_spec
        bad = np.flatnonzero(index.column("action_dim")[ids] != self.action_dim)
        if len(bad):
            ep = self.episodes[int(bad[0])]
            ref = f"{first.path} has" if first is not None else "the dataset has"
            raise DatasetError(f"{ep.path}: {ep.action_dim}-dimensional actions ({', '.join(ep.action_names)}), "
                               f"but {ref} {self.action_dim} ({', '.join(self.action_names)}); "
                               "every episode of a run needs the same action dimension")
        channels = index.column("channels")[ids]  # 0: no sensor stream
        with_sensor = np.flatnonzero(channels)
        if sensor_channels is None:
            ref = self.episodes[int(with_sensor[0])].sensor if len(with_sensor) else None
            bad = with_sensor[channels[with_sensor] != channels[with_sensor[0]]] if len(with_sensor) else []
            if len(bad):
                sensor = self.episodes[int(bad[0])].sensor
                raise DatasetError(f"{sensor.path}: {sensor.channels} sensor channels, but "
                                   f"{ref.path} has {ref.channels}; every sensor file needs the same channels")
            sensor_channels = ref.channels if ref is not None else 1
        self.sensor_channels = sensor_channels
        bad = with_sensor[channels[with_sensor] != sensor_channels]
        if len(bad):
            sensor = self.episodes[int(bad[0])].sensor
            raise DatasetError(f"{sensor.path}: {sensor.channels} sensor channels, expected {self.sensor_channels}")

    @property
    def sample_weights(self) -> np.ndarray:
        if self._sample_weights is None:
            self._sample_weights = self._compute_sample_weights()
        return self._sample_weights

    def _compute_sample_weights(self) -> np.ndarray:
        n = len(self)
        if n == 0:
            return np.zeros(0)
        if self.source_weights is None:
            return np.full(n, 1.0 / n)
        # Per-episode weights repeated per sample: no Python object per sample.
        codes = self._index.column("source")[self._ids]  # (E,)
        counts = np.diff(self._cum)  # (E,)
        present = [c for c in np.unique(codes) if counts[codes == c].sum()]
        total = sum(self.source_weights[self._index.sources[c]] for c in present)
        per_episode = np.zeros(len(codes))
        for c in present:
            mask = codes == c
            per_episode[mask] = self.source_weights[self._index.sources[c]] / total / counts[mask].sum()
        return np.repeat(per_episode, counts)

    # ---- samples

    def __len__(self) -> int:
        return int(self._cum[-1])

    def __getitem__(self, i: int) -> dict:
        return self.get_item(i)

    def _locate(self, i: int) -> tuple[int, int]:
        """Sample i (already in range) -> (its episode's index id, its row in the index's sample tables)."""
        k = int(np.searchsorted(self._cum, i, side="right")) - 1
        e = int(self._ids[k])
        return e, int(self._index.sample_off[e]) + i - int(self._cum[k])

    def _check_range(self, i: int) -> int:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sample {i} out of range for {n} samples")
        return int(i) % n

    def get_item(self, i: int, with_images: bool = True) -> dict:
        """Sample i as a dict of numpy values (keys at the top of this module).

        ``with_images=False`` skips decoding and returns ``images`` as an empty list
        (for statistics and feature caches).
        """
        e, row = self._locate(self._check_range(i))
        index = self._index
        ep = index.episode(e)
        t = float(index.sample_table("time")[row])
        cfg = self.config
        images = ep.decode_views(index.sample_table("frames")[row]) if with_images else []
        if ep.sensor is not None:
            end = int(index.sample_table("sensor_end")[row])
            sensor, sensor_pad = ep.sensor.window_before(end, cfg.sensor_window_size, t)  # (W, C), padded rows
        else:
            sensor = np.zeros((cfg.sensor_window_size, self.sensor_channels), dtype=np.float32)  # (W, C)
            sensor_pad = cfg.sensor_window_size
        return {
            IMAGES: images,
            INSTRUCTION: ep.instruction_at(t),
            SENSOR_WINDOW: sensor,
            SENSOR_PAD: sensor_pad,
            HAS_SENSOR: ep.sensor is not None,
            ACTIONS: np.array(index.sample_table("actions")[row]),  # (H, D)
            ACTION_IS_PAD: np.array(index.sample_table("is_pad")[row]),  # (H,)
            CONFIDENCE: ep.confidence,
            EPISODE_INDEX: ep.index,
            FRAME_TIME: t,
        }

    def describe_sample(self, i: int) -> str:
        """Sample i in words, for error messages: episode, time and the files it reads."""
        e, row = self._locate(self._check_range(i))
        ep = self._index.episode(e)
        frames = self._index.sample_table("frames")[row]
        files = list(dict.fromkeys(str(path) for _, path, _ in ep.view_sources(frames)))
        if ep.sensor is not None:
            files.append(str(ep.sensor.path))
        return f"sample {i} ({ep.path} at t={float(self._index.sample_table('time')[row]):.3f}: {', '.join(files)})"

    def view_sources(self, i: int) -> list[tuple[str, Path, str]]:
        """(view name, file, locator in the file: "" for an image file, the time for a video)
        of each view's frame in sample i (no decoding)."""
        e, row = self._locate(self._check_range(i))
        return self._index.episode(e).view_sources(self._index.sample_table("frames")[row])

    def image_paths(self, i: int) -> list[Path]:
        """The file each view of sample i reads (an image, or a video holding the frame)."""
        return [path for _, path, _ in self.view_sources(i)]

    def instruction(self, i: int) -> str:
        e, row = self._locate(self._check_range(i))
        return self._index.episode(e).instruction_at(float(self._index.sample_table("time")[row]))

    def get_actions(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Only the action chunk of sample i: (actions (H, D) float32, action_is_pad (H,) bool).
        Cheap (no image or sensor reads), for statistics."""
        _, row = self._locate(self._check_range(i))
        return np.array(self._index.sample_table("actions")[row]), np.array(self._index.sample_table("is_pad")[row])

    def _runs(self) -> list[tuple[int, int]]:
        """This dataset's samples as contiguous [lo, hi) ranges of the index's sample rows."""
        starts = self._index.sample_off[self._ids]
        ends = starts + np.diff(self._cum)
        runs: list[tuple[int, int]] = []
        for lo, hi in zip(starts.tolist(), ends.tolist()):
            if runs and runs[-1][1] == lo:
                runs[-1] = (runs[-1][0], hi)
            elif hi > lo:
                runs.append((lo, hi))
        return runs

    def _rows(self) -> np.ndarray:
        """(N,) the index's sample row of each sample of this dataset."""
        runs = self._runs()
        return np.concatenate([np.arange(lo, hi) for lo, hi in runs]) if runs else np.zeros(0, np.int64)

    def _table(self, field: str) -> np.ndarray:
        """(N, ...) sample column ``field`` of this dataset (the map itself for a whole dataset)."""
        table = self._index.sample_table(field)
        return table if len(self) == len(table) else table[self._rows()]

    @property
    def _sample_episode(self) -> np.ndarray:  # (N,) index episode id of each sample
        return np.repeat(self._ids, np.diff(self._cum))

    @property
    def _sample_frames(self) -> np.ndarray:
        return self._table("frames")

    @property
    def _actions(self) -> np.ndarray:
        return self._table("actions")

    @property
    def _action_is_pad(self) -> np.ndarray:
        return self._table("is_pad")

    def action_range(self) -> tuple[np.ndarray, np.ndarray]:
        """(min (D,), max (D,)) float64 over every non-padded action step of every sample
        (zeros when there is none)."""
        actions, is_pad = self._index.sample_table("actions"), self._index.sample_table("is_pad")
        low, high = np.full(self.action_dim, np.inf), np.full(self.action_dim, -np.inf)
        block = 1 << 18  # samples per read: bounded memory at any dataset size
        for lo, hi in self._runs():
            for a in range(lo, hi, block):
                steps = actions[a:min(hi, a + block)][~is_pad[a:min(hi, a + block)]]  # (n, D)
                if len(steps):
                    low, high = np.minimum(low, steps.min(axis=0)), np.maximum(high, steps.max(axis=0))
        if not np.isfinite(low).all():
            return np.zeros(self.action_dim), np.zeros(self.action_dim)
        return low.astype(np.float64), high.astype(np.float64)

    # ---- reporting

    def sample_source(self) -> np.ndarray:
        """(N,) source name of each sample."""
        names = np.array(self._index.sources, dtype=object)
        return names[self._index.column("source")[self._sample_episode]]

    def describe(self) -> str:
        """A few lines for the start-up log: episodes, samples, sources and weights, views, sensor."""
        index, ids = self._index, self._ids
        n_sensor = int((index.column("channels")[ids] > 0).sum())
        views = ", ".join(self.episodes[0].camera_views) if len(ids) else "-"
        skipped = int(index.column("invalid")[ids].sum())
        out_of_range = index.column("out_of_range")[ids]
        dropped = ([f"{skipped} invalid skipped"] if skipped else []) + (
            [f"{int(out_of_range.sum())} frames outside their episode's robot_states time range not used "
             f"({int((out_of_range > 0).sum())} episodes)"] if out_of_range.sum() else [])
        lines = [
            f"{len(ids)} episodes, {len(self)} samples"
            + (f" ({'; '.join(dropped)})" if dropped else "")
            + f", {self.num_views} views ({views}), sensor channels {self.sensor_channels} "
            f"({n_sensor}/{len(ids)} episodes with sensor data), "
            f"window {self.config.sensor_window_size}, horizon {self.config.action_horizon}"
        ]
        codes, counts = index.column("source")[ids], np.diff(self._cum)
        weights = self.sample_weights
        for c in np.unique(codes):
            s = index.sources[c]
            mask = codes == c
            rows = np.repeat(mask, counts)
            weight = "uniform" if self.source_weights is None else f"weight {self.source_weights[s]:g}"
            lines.append(f"  source {s}: {int(mask.sum())} episodes, {int(counts[mask].sum())} samples, {weight}, "
                         f"{100 * weights[rows].sum():.1f}% of draws")
        return "\n".join(lines)


# --------------------------------------------------------------------------- split


def _val_counts(sizes: list[int], target: int) -> list[int]:
    """Validation episodes per source: proportional (largest remainder), keeping each
    source's last episode for training while any other source can give one."""
    total = sum(sizes)
    exact = [n * target / total for n in sizes]
    counts = [min(int(q), max(n - 1, 0)) for q, n in zip(exact, sizes)]
    order = sorted(range(len(sizes)), key=lambda s: (-(exact[s] - int(exact[s])), s))
    for keep in (1, 0):  # first keep one training episode per source, then allow taking it
        while sum(counts) < target:
            room = [s for s in order if counts[s] < sizes[s] - keep]
            if not room:
                break
            for s in room[:target - sum(counts)]:
                counts[s] += 1
    return counts


def split_train_val(dataset_or_episodes: VLADataset | Sequence[Episode], val_split: float, seed: int):
    """Split by episode (never by sample: chunks of one episode overlap).

    Deterministic from ``seed``; stratified per source (each source gives about
    ``val_split`` of its episodes, largest-remainder rounding); at least one validation
    episode when ``val_split > 0`` and there are >= 2 episodes, and always at least one
    training episode. ``val_split=0`` gives an empty validation set.

    Returns ``(train, val)``: two VLADataset objects sharing sensor_channels and num_views
    when given a dataset, or two episode lists when given episodes.
    """
    if not 0 <= val_split < 1:
        raise ConfigError(f"val_split must be in [0, 1), got {val_split!r}")
    if isinstance(dataset_or_episodes, VLADataset):  # from the index's columns: no episode is made
        ds = dataset_or_episodes
        index, ids = ds._index, ds._ids
        is_val = _val_mask(index.column("path")[ids], np.asarray(index.sources)[index.column("source")[ids]],
                           val_split, seed)
        common = dict(source_weights=ds.source_weights, sensor_channels=ds.sensor_channels, num_views=ds.num_views,
                      action_spec=(ds.action_dim, ds.action_names, ds.action_units), index=index)
        return (VLADataset(ds.config, allow_empty=False, episode_ids=ids[~is_val], **common),
                VLADataset(ds.config, allow_empty=True, episode_ids=ids[is_val], **common))
    episodes = list(dataset_or_episodes)
    is_val = _val_mask(np.array([os.fsencode(str(ep.path)) for ep in episodes]),
                       np.array([ep.source for ep in episodes]), val_split, seed)
    return ([ep for ep, v in zip(episodes, is_val) if not v], [ep for ep, v in zip(episodes, is_val) if v])


def _val_mask(paths: np.ndarray, sources: np.ndarray, val_split: float, seed: int) -> np.ndarray:
    """(E,) bool: which of the episodes (their paths as bytes, their sources) are held out."""
    n = len(paths)
    target = min(int(n * val_split + 0.5), max(n - 1, 0))  # always keep a training episode
    if val_split > 0 and n >= 2:
        target = max(target, 1)
    order = np.argsort(paths, kind="stable") if n else np.zeros(0, np.int64)  # by path, as str sorts them
    names = sorted(set(sources.tolist()))
    members = {s: order[sources[order] == s] for s in names}  # each source's episodes, in path order
    counts = _val_counts([len(members[s]) for s in names], target) if target else [0] * len(names)
    rng = np.random.default_rng(seed)
    is_val = np.zeros(n, dtype=bool)
    for s, k in zip(names, counts):
        perm = rng.permutation(len(members[s]))
        is_val[members[s][perm[:k]]] = True
    return is_val


# --------------------------------------------------------------------------- batching


def collate_numeric(samples: list[dict]) -> dict:
    """Stack samples into a batch: numeric keys become tensors (shapes at the top of this
    module); ``images`` and ``instruction`` (and any other key) pass through as lists."""
    if not samples:
        raise ValueError("collate_numeric needs at least one sample")
    batch = {
        # Stacked straight into float32: one copy (sensor windows can be MBs per sample).
        SENSOR_WINDOW: torch.from_numpy(np.stack([s[SENSOR_WINDOW] for s in samples], dtype=np.float32)),  # (B, W, C)
        SENSOR_PAD: torch.tensor([int(s[SENSOR_PAD]) for s in samples], dtype=torch.long),  # (B,)
        HAS_SENSOR: torch.tensor([bool(s[HAS_SENSOR]) for s in samples], dtype=torch.bool),  # (B,)
        ACTIONS: torch.from_numpy(np.stack([s[ACTIONS] for s in samples], dtype=np.float32)),  # (B, H, D)
        ACTION_IS_PAD: torch.from_numpy(np.stack([s[ACTION_IS_PAD] for s in samples]).astype(np.bool_)),  # (B, H)
        CONFIDENCE: torch.tensor([float(s[CONFIDENCE]) for s in samples], dtype=torch.float32),  # (B,)
        EPISODE_INDEX: torch.tensor([int(s[EPISODE_INDEX]) for s in samples], dtype=torch.long),  # (B,)
        FRAME_TIME: torch.tensor([float(s[FRAME_TIME]) for s in samples], dtype=torch.float64),  # (B,)
    }
    for key in samples[0]:
        if key not in batch:
            batch[key] = [s[key] for s in samples]
    return batch
