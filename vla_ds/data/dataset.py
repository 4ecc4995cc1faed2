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
from vla_ds.data.lerobot import LeRobotConfig, is_lerobot_root, load_lerobot_episodes
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


def scan_dataset(root: str | os.PathLike) -> tuple[list[tuple[Path, str]], dict[str, float] | None]:
    """Find the episodes a dataset directory uses, without loading them.

    Returns ``([(episode_dir, source), ...] sorted by path, source_weights)``; a LeRobot
    dataset root (``meta/info.json``) stands for all of its episodes.
    ``source_weights`` is None without mixture.yaml (every episode used, uniform sampling);
    with it only the listed sources are used.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset directory not found")
    mixture = read_mixture(root)
    if mixture is None:
        return [(d, _default_source(d, root)) for d in find_episode_dirs(root)], None
    owner: dict[str, str] = {}
    pairs = []
    for name, _ in mixture:
        dirs = find_episode_dirs(root / name)
        if not dirs:
            raise DatasetError(f"{root / MIXTURE_FILE}: source '{name}' has no episodes "
                               f"(no folder under {root / name} holds metadata.json or meta/info.json)")
        for d in dirs:
            key = os.path.realpath(d)
            if key in owner:
                raise DatasetError(f"{root / MIXTURE_FILE}: sources '{owner[key]}' and '{name}' overlap "
                                   f"(both contain {d})")
            owner[key] = name
            pairs.append((d, name))
    return sorted(pairs), dict(mixture)


def load_episodes(pairs: Sequence[tuple[Path, str]], max_threads: int = 16,
                  lerobot: LeRobotConfig | None = None, on_bad_sample: str = "error") -> list:
    """Load [(episode_dir or LeRobot root, source), ...] in order, ``index`` = position in the
    result (a LeRobot root gives all its episodes). Threads overlap the file-system latency
    (network storage); the first failing episode's error is raised."""
    def load(item):
        episode_dir, source = item
        if is_lerobot_root(episode_dir):
            return load_lerobot_episodes(episode_dir, lerobot or LeRobotConfig(), source, on_bad_sample)
        return [load_episode(episode_dir, source=source)]

    with ThreadPoolExecutor(max_workers=max(1, min(max_threads, len(pairs)))) as pool:
        episodes = [ep for group in pool.map(load, pairs) for ep in group]
    for index, ep in enumerate(episodes):
        ep.index = index
    return episodes


# --------------------------------------------------------------------------- dataset


class VLADataset(torch.utils.data.Dataset):
    """Samples of a set of episodes (a map-style dataset; items are dicts of numpy values).

    Build the full dataset with :meth:`from_config`, then split it by episode with
    :func:`split_train_val`. The constructor checks everything that can be checked
    without decoding images: each episode's robot states span at least one action
    chunk, every episode has the same number of camera views, sensor channel counts
    agree, and each sample's views have a frame within ``view_tolerance_s``.

    Frame times of the first view outside the episode's robot_states time range
    ``[first timestamp, last timestamp]`` (1e-6 s slack; a frame exactly at either end
    stays) are not samples: their actions cannot be interpolated. They are dropped at
    indexing, counted per episode in ``out_of_range_frames``, reported by
    :meth:`describe` and logged once by :meth:`from_config`; this is not an error.

    Args:
        config: the data config.
        episodes: loaded :class:`Episode` objects or episode directories (loaded here,
            with the top-level folder under ``config.dataset_dir`` as source). None scans
            ``config.dataset_dir`` like :meth:`from_config`.
        source_weights: mixture weight per source name; None means uniform over samples.
        sensor_channels: force C (a split's halves share their parent's); by default
            read from the episodes' sensor files, 1 when none has one.
        num_views: force the number of camera views (for an empty split half).
        allow_empty: allow zero samples (a validation split); otherwise a DatasetError.

    Attributes:
        episodes: the episodes, in path order.
        sensor_channels: C.
        num_views: V, camera views per sample.
        source_weights: {source: weight} from mixture.yaml (or as given), or **None
            without mixture.yaml**: then every sample is equally likely and the sampler
            should get ``weights=None`` (a permutation per epoch, each sample once),
            not ``sample_weights`` (which would draw with replacement).
        sample_weights: (N,) float64 sampling probability per sample (sums to 1): each
            source's total is proportional to its weight; uniform (1/N) when
            ``source_weights`` is None. Always an array.
        invalid_samples: {episode dir: samples dropped} with on_bad_sample="skip".
        out_of_range_frames: {episode dir: sample frame times dropped} for frames outside
            that episode's robot_states time range (episodes with none are absent).
    """

    def __init__(self, config: DataConfig, episodes: Sequence[Episode | str | os.PathLike] | None = None,
                 source_weights: Mapping[str, float] | None = None, *, sensor_channels: int | None = None,
                 num_views: int | None = None, allow_empty: bool = False, action_spec: tuple | None = None):
        self.config = config
        root = Path(config.dataset_dir) if config.dataset_dir else None
        if episodes is None:
            if root is None:
                raise ConfigError("DataConfig.dataset_dir is empty: set it with --dataset_dir")
            pairs, scanned_weights = scan_dataset(root)
            if not pairs:
                raise DatasetError(f"{root}: no episodes found (no folder holds metadata.json)")
            episodes = load_episodes(pairs, lerobot=config.lerobot, on_bad_sample=config.on_bad_sample)
            if source_weights is None:
                source_weights = scanned_weights
        self.episodes: list[Episode] = [
            load_episode(ep, source=_default_source(Path(ep), root), index=i) if isinstance(ep, (str, os.PathLike))
            else ep
            for i, ep in enumerate(episodes)
        ]
        self.source_weights = dict(source_weights) if source_weights is not None else None
        where = str(root) if root is not None else "dataset"
        if not self.episodes and not allow_empty:
            raise DatasetError(f"{where}: no episodes given")

        self._check_episodes(num_views, action_spec)
        self.sensor_channels = sensor_channels if sensor_channels is not None else self._read_sensor_channels()
        for ep in self.episodes:
            if ep.sensor is not None and ep.sensor.channels != self.sensor_channels:
                raise DatasetError(f"{ep.sensor.path}: {ep.sensor.channels} sensor channels, "
                                   f"expected {self.sensor_channels}")
        self._build_index()
        if len(self) == 0 and not allow_empty:
            dropped = []
            if self.invalid_samples:
                dropped.append(f"{sum(self.invalid_samples.values())} skipped as invalid")
            if self.out_of_range_frames:
                dropped.append(f"{sum(self.out_of_range_frames.values())} frames outside their episode's "
                               f"robot_states time range")
            raise DatasetError(f"{where}: no valid samples in {len(self.episodes)} episodes"
                               + (f" ({'; '.join(dropped)})" if dropped else ""))
        self.sample_weights = self._compute_sample_weights()

    @classmethod
    def from_config(cls, config: DataConfig) -> VLADataset:
        """Every episode under ``config.dataset_dir`` (only mixture.yaml's sources if it exists)."""
        start = time.perf_counter()
        ds = cls(config)
        logger.info("loaded %d episodes (%d samples) from %s in %.1f s",
                    len(ds.episodes), len(ds), config.dataset_dir, time.perf_counter() - start)
        for path, n in ds.invalid_samples.items():
            logger.warning("%s: skipped %d samples with a camera view missing a frame within %.3g s",
                           path, n, config.view_tolerance_s)
        n_out = sum(ds.out_of_range_frames.values())
        if n_out:
            logger.info("%d frames outside their episode's robot_states time range were not used "
                        "(%d of %d episodes)", n_out, len(ds.out_of_range_frames), len(ds.episodes))
        return ds

    def with_episodes(self, episodes: Sequence[Episode], allow_empty: bool = True) -> VLADataset:
        """A dataset over some of this dataset's episodes, with the same config, weights, C and V."""
        return VLADataset(self.config, list(episodes), self.source_weights, sensor_channels=self.sensor_channels,
                          num_views=self.num_views, allow_empty=allow_empty,
                          action_spec=(self.action_dim, self.action_names, self.action_units))

    # ---- construction helpers

    def _check_episodes(self, num_views: int | None, action_spec: tuple | None):
        for ep in self.episodes:
            if self.source_weights is not None and ep.source not in self.source_weights:
                raise DatasetError(f"{ep.path}: source '{ep.source}' has no mixture weight")
        first = self.episodes[0] if self.episodes else None
        self.num_views = num_views if num_views is not None else len(first.camera_views) if first else 0
        for ep in self.episodes:
            if len(ep.camera_views) != self.num_views:
                ref = f"{first.path} has {len(first.camera_views)} ({', '.join(first.camera_views)})" \
                    if first is not None and num_views is None else f"expected {self.num_views}"
                raise DatasetError(f"{ep.path}: {len(ep.camera_views)} camera views "
                                   f"({', '.join(ep.camera_views)}) but {ref}; every episode needs the same number")
        # D, the action dimension: the same for every episode (a mixture of formats must agree).
        if action_spec is None:
            action_spec = (first.action_dim, tuple(first.action_names), tuple(first.action_units)) if first \
                else (ACTION_DIM, DELTA_POSE_NAMES, DELTA_POSE_UNITS)
        self.action_dim, self.action_names, self.action_units = action_spec
        for ep in self.episodes:
            if ep.action_dim != self.action_dim:
                ref = f"{first.path} has" if first is not None else "the dataset has"
                raise DatasetError(f"{ep.path}: {ep.action_dim}-dimensional actions ({', '.join(ep.action_names)}), "
                                   f"but {ref} {self.action_dim} ({', '.join(self.action_names)}); "
                                   "every episode of a run needs the same action dimension")

    def _read_sensor_channels(self) -> int:
        ref = None
        for ep in self.episodes:
            if ep.sensor is None:
                continue
            if ref is None:
                ref = ep.sensor
            elif ep.sensor.channels != ref.channels:
                raise DatasetError(f"{ep.sensor.path}: {ep.sensor.channels} sensor channels, but "
                                   f"{ref.path} has {ref.channels}; every sensor file needs the same channels")
        return ref.channels if ref is not None else 1

    def _build_index(self):
        cfg = self.config
        ep_ids, times, frames, actions, is_pad = [], [], [], [], []
        self.invalid_samples: dict[str, int] = {}
        self.out_of_range_frames: dict[str, int] = {}
        for e, ep in enumerate(self.episodes):
            samples = ep.build_samples(cfg)
            if samples.out_of_range:
                self.out_of_range_frames[str(ep.path)] = samples.out_of_range
            if samples.invalid:
                self.invalid_samples[str(ep.path)] = samples.invalid
            ep_ids.append(np.full(len(samples.times), e, dtype=np.int64))
            times.append(samples.times)
            frames.append(samples.frames)
            actions.append(samples.actions)
            is_pad.append(samples.is_pad)
        v, h = self.num_views, cfg.action_horizon
        self._sample_episode = np.concatenate(ep_ids) if ep_ids else np.zeros(0, np.int64)  # (N,)
        self._sample_time = np.concatenate(times) if times else np.zeros(0)  # (N,)
        self._sample_frames = np.concatenate(frames) if frames else np.zeros((0, v), np.int64)  # (N, V)
        # 4 * D * H + H bytes a sample (232 at D = 7, H = 8), shared by forked DataLoader workers.
        self._actions = (np.concatenate(actions) if actions
                         else np.zeros((0, h, self.action_dim), np.float32))  # (N, H, D)
        self._action_is_pad = np.concatenate(is_pad) if is_pad else np.zeros((0, h), np.bool_)  # (N, H)

    def _compute_sample_weights(self) -> np.ndarray:
        n = len(self)
        if n == 0:
            return np.zeros(0)
        if self.source_weights is None:
            return np.full(n, 1.0 / n)
        # Per-episode source codes, indexed per sample: no Python object per sample (10M samples
        # would be 10M lookups and a string array of 10M names).
        names, codes = np.unique(np.array([ep.source for ep in self.episodes]), return_inverse=True)
        sources = codes[self._sample_episode]  # (N,) code of each sample's source
        w = np.zeros(n)
        present = {str(names[c]): c for c in np.unique(sources)}
        total = sum(self.source_weights[s] for s in present)
        for s, c in present.items():
            mask = sources == c
            w[mask] = self.source_weights[s] / total / mask.sum()
        return w

    # ---- samples

    def __len__(self) -> int:
        return len(self._sample_time)

    def __getitem__(self, i: int) -> dict:
        return self.get_item(i)

    def get_item(self, i: int, with_images: bool = True) -> dict:
        """Sample i as a dict of numpy values (keys at the top of this module).

        ``with_images=False`` skips decoding and returns ``images`` as an empty list
        (for statistics and feature caches).
        """
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sample {i} out of range for {n} samples")
        i = int(i) % n
        ep = self.episodes[self._sample_episode[i]]
        t = float(self._sample_time[i])
        cfg = self.config
        images = ep.decode_views(self._sample_frames[i]) if with_images else []
        if ep.sensor is not None:
            sensor, sensor_pad = ep.sensor.padded_window(t, cfg.sensor_window_size)  # (W, C), rows of padding
        else:
            sensor = np.zeros((cfg.sensor_window_size, self.sensor_channels), dtype=np.float32)  # (W, C)
            sensor_pad = cfg.sensor_window_size
        actions, is_pad = self.get_actions(i)  # (H, D), (H,)
        return {
            IMAGES: images,
            INSTRUCTION: ep.instruction_at(t),
            SENSOR_WINDOW: sensor,
            SENSOR_PAD: sensor_pad,
            HAS_SENSOR: ep.sensor is not None,
            ACTIONS: actions,
            ACTION_IS_PAD: is_pad,
            CONFIDENCE: ep.confidence,
            EPISODE_INDEX: ep.index,
            FRAME_TIME: t,
        }

    def describe_sample(self, i: int) -> str:
        """Sample i in words, for error messages: episode, time and the files it reads."""
        ep = self.episodes[self._sample_episode[i]]
        files = list(dict.fromkeys(str(path) for _, path, _ in self.view_sources(i)))
        if ep.sensor is not None:
            files.append(str(ep.sensor.path))
        return f"sample {i} ({ep.path} at t={float(self._sample_time[i]):.3f}: {', '.join(files)})"

    def view_sources(self, i: int) -> list[tuple[str, Path, str]]:
        """(view name, file, locator in the file: "" for an image file, the time for a video)
        of each view's frame in sample i (no decoding)."""
        return self.episodes[self._sample_episode[i]].view_sources(self._sample_frames[i])

    def image_paths(self, i: int) -> list[Path]:
        """The file each view of sample i reads (an image, or a video holding the frame)."""
        return [path for _, path, _ in self.view_sources(i)]

    def instruction(self, i: int) -> str:
        return self.episodes[self._sample_episode[i]].instruction_at(float(self._sample_time[i]))

    def get_actions(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Only the action chunk of sample i: (actions (H, D) float32, action_is_pad (H,) bool).
        Cheap (no image or sensor reads), for statistics."""
        return self._actions[i].copy(), self._action_is_pad[i].copy()

    def action_range(self) -> tuple[np.ndarray, np.ndarray]:
        """(min (D,), max (D,)) float64 over every non-padded action step of every sample
        (zeros when there is none)."""
        steps = self._actions[~self._action_is_pad]  # (n, D)
        if len(steps) == 0:
            return np.zeros(self.action_dim), np.zeros(self.action_dim)
        return steps.min(axis=0).astype(np.float64), steps.max(axis=0).astype(np.float64)

    # ---- reporting

    def sample_source(self) -> np.ndarray:
        """(N,) source name of each sample."""
        return np.array([ep.source for ep in self.episodes], dtype=object)[self._sample_episode]

    def describe(self) -> str:
        """A few lines for the start-up log: episodes, samples, sources and weights, views, sensor."""
        n_sensor = sum(ep.has_sensor for ep in self.episodes)
        views = ", ".join(self.episodes[0].camera_views) if self.episodes else "-"
        skipped = sum(self.invalid_samples.values())
        out_of_range = sum(self.out_of_range_frames.values())
        dropped = ([f"{skipped} invalid skipped"] if skipped else []) + (
            [f"{out_of_range} frames outside their episode's robot_states time range not used "
             f"({len(self.out_of_range_frames)} episodes)"] if out_of_range else [])
        lines = [
            f"{len(self.episodes)} episodes, {len(self)} samples"
            + (f" ({'; '.join(dropped)})" if dropped else "")
            + f", {self.num_views} views ({views}), sensor channels {self.sensor_channels} "
            f"({n_sensor}/{len(self.episodes)} episodes with sensor data), "
            f"window {self.config.sensor_window_size}, horizon {self.config.action_horizon}"
        ]
        sources = self.sample_source()
        for s in sorted({ep.source for ep in self.episodes}):
            mask = sources == s
            n_ep = sum(ep.source == s for ep in self.episodes)
            weight = "uniform" if self.source_weights is None else f"weight {self.source_weights[s]:g}"
            lines.append(f"  source {s}: {n_ep} episodes, {int(mask.sum())} samples, {weight}, "
                         f"{100 * self.sample_weights[mask].sum():.1f}% of draws")
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
    is_dataset = isinstance(dataset_or_episodes, VLADataset)
    episodes = list(dataset_or_episodes.episodes if is_dataset else dataset_or_episodes)
    n = len(episodes)
    target = min(int(n * val_split + 0.5), max(n - 1, 0))  # always keep a training episode
    if val_split > 0 and n >= 2:
        target = max(target, 1)
    by_source: dict[str, list[Episode]] = {}
    for ep in sorted(episodes, key=lambda e: str(e.path)):
        by_source.setdefault(ep.source, []).append(ep)
    names = sorted(by_source)
    counts = _val_counts([len(by_source[s]) for s in names], target) if target else [0] * len(names)
    rng = np.random.default_rng(seed)
    val_ids = set()
    for s, k in zip(names, counts):
        perm = rng.permutation(len(by_source[s]))
        val_ids.update(id(by_source[s][j]) for j in perm[:k])
    train = [ep for ep in episodes if id(ep) not in val_ids]
    val = [ep for ep in episodes if id(ep) in val_ids]
    if not is_dataset:
        return train, val
    return (dataset_or_episodes.with_episodes(train, allow_empty=False),
            dataset_or_episodes.with_episodes(val, allow_empty=True))


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
