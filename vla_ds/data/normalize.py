"""Normalisation statistics for actions and sensor windows, and (de)normalisation.

Stats are computed on the training split only and travel with every checkpoint
(``NormStats.to_dict`` is JSON-able). Models see ``(x - mean) / std``; predictions
are mapped back with :meth:`NormStats.denormalize_actions`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from vla_ds.data.dataset import VLADataset
from vla_ds.errors import CheckpointError, DatasetError

logger = logging.getLogger(__name__)

RANGE_KEYS = ("action_min", "action_max")
NAME_KEYS = ("action_names", "action_units")
OBSERVATION_KEYS = ("camera_views", "instructions")
MAX_INSTRUCTIONS = 32  # distinct training instructions recorded (a served policy's metadata lists them)
MIN_STD = 1e-6  # dims with a smaller std are constant: their std is stored as 1.0
MAX_SENSOR_ROWS = 50_000  # sensor rows sampled for stats, over all episodes


@dataclass
class NormStats:
    """Per-dimension mean and std of actions and sensor channels.

    Fields:
        action_mean: (D,) mean of non-padded action steps (D = 7 for delta-pose actions,
            the dataset's own dimension for a LeRobot ``action`` feature).
        action_std: (D,) their std; a constant dim gets 1.0 so it never divides by ~0.
        sensor_mean: (C,) mean of the sensor rows (0 when no episode has sensor data).
        sensor_std: (C,) their std; constant channels get 1.0.
        action_min, action_max: (D,) range of the non-padded action steps: sampled chunks
            are clamped to it (``ActionExpertConfig.clip_to_data_range``). None in stats
            written before vla_ds recorded it.
        action_names, action_units: D names and units of the action dimensions (for
            reports and plots); None in stats written before vla_ds recorded them.
        camera_views: the V camera view names of the training data, in the order the model
            sees them; instructions: its distinct instructions, sorted (at most
            ``MAX_INSTRUCTIONS``). What a served policy tells its clients to send; None in
            stats written before vla_ds recorded them.
        sensor_transform: how raw per-frame features became the sensor stream
            (:meth:`vla_ds.data.observation.SensorTransform.to_dict`) for a policy trained on
            LeRobot sensor features: the policy applies it to a robot's raw state. None
            when the stream is a sensor file (no transform) or in older stats.
    """

    action_mean: np.ndarray
    action_std: np.ndarray
    sensor_mean: np.ndarray
    sensor_std: np.ndarray
    action_min: np.ndarray | None = field(default=None)
    action_max: np.ndarray | None = field(default=None)
    action_names: list[str] | None = field(default=None)
    action_units: list[str] | None = field(default=None)
    camera_views: list[str] | None = field(default=None)
    instructions: list[str] | None = field(default=None)
    sensor_transform: dict | None = field(default=None)

    def to_dict(self) -> dict:
        """JSON-able dict of float lists (the range and names only when known)."""
        keys = self._keys() + (RANGE_KEYS if self.action_min is not None else ())
        d = {k: [float(x) for x in getattr(self, k)] for k in keys}
        for k in NAME_KEYS + OBSERVATION_KEYS:
            if getattr(self, k) is not None:
                d[k] = [str(x) for x in getattr(self, k)]
        if self.sensor_transform is not None:
            d["sensor_transform"] = self.sensor_transform
        return d

    @property
    def action_dim(self) -> int:
        return len(self.action_mean)

    @classmethod
    def from_dict(cls, d: dict) -> NormStats:
        """Inverse of :meth:`to_dict`; checks keys and shapes (the range is optional)."""
        if not isinstance(d, dict):
            raise CheckpointError(f"norm stats: expected a dict, got {type(d).__name__}")
        for k in cls._keys():
            if k not in d:
                raise CheckpointError(f"norm stats: missing key '{k}'")
        keys = cls._keys() + tuple(k for k in RANGE_KEYS if k in d)
        arrays = {k: np.asarray(d[k], dtype=np.float64) for k in keys}
        if len(keys) == len(cls._keys()) + 1:
            raise CheckpointError(f"norm stats: '{keys[-1]}' without its pair ({' and '.join(RANGE_KEYS)})")
        dim = arrays["action_mean"].shape
        if len(dim) != 1 or not dim[0]:
            raise CheckpointError(f"norm stats: 'action_mean' must be a non-empty list, got shape {dim}")
        for k in ("action_std",) + keys[len(cls._keys()):]:
            if arrays[k].shape != dim:
                raise CheckpointError(f"norm stats: '{k}' has shape {arrays[k].shape}, expected {dim}")
        for k in NAME_KEYS:
            if d.get(k) is not None:
                if not isinstance(d[k], list) or len(d[k]) != dim[0]:
                    raise CheckpointError(f"norm stats: '{k}' must list {dim[0]} strings, got {d[k]!r}")
                arrays[k] = [str(x) for x in d[k]]
        for k in OBSERVATION_KEYS:
            if d.get(k) is not None:
                if not isinstance(d[k], list) or not all(isinstance(x, str) for x in d[k]):
                    raise CheckpointError(f"norm stats: '{k}' must be a list of strings, got {d[k]!r}")
                arrays[k] = list(d[k])
        if arrays["sensor_mean"].ndim != 1 or arrays["sensor_mean"].shape != arrays["sensor_std"].shape:
            raise CheckpointError(f"norm stats: 'sensor_mean' {arrays['sensor_mean'].shape} and 'sensor_std' "
                                  f"{arrays['sensor_std'].shape} must be equal 1-D shapes")
        if d.get("sensor_transform") is not None:
            from vla_ds.data.observation import SensorTransform

            try:
                transform = SensorTransform.from_dict(d["sensor_transform"])
            except ValueError as e:
                raise CheckpointError(f"norm stats: {e}") from None
            if transform.channels != len(arrays["sensor_mean"]):
                raise CheckpointError(f"norm stats: 'sensor_transform' makes {transform.channels} channels, "
                                      f"'sensor_mean' has {len(arrays['sensor_mean'])}")
            arrays["sensor_transform"] = transform.to_dict()
        return cls(**arrays)

    @staticmethod
    def _keys() -> tuple[str, ...]:
        return ("action_mean", "action_std", "sensor_mean", "sensor_std")

    def normalize_actions(self, actions):
        """(..., D) raw actions -> normalised; numpy array or torch tensor."""
        return _affine(actions, self.action_mean, self.action_std, inverse=False)

    def denormalize_actions(self, actions):
        """(..., D) normalised actions -> raw; numpy array or torch tensor."""
        return _affine(actions, self.action_mean, self.action_std, inverse=True)

    def normalize_sensor(self, sensor):
        """(..., C) raw sensor values -> normalised; numpy array or torch tensor."""
        return _affine(sensor, self.sensor_mean, self.sensor_std, inverse=False)


def _affine(x, mean: np.ndarray, std: np.ndarray, inverse: bool):
    if isinstance(x, torch.Tensor):
        mean = torch.as_tensor(mean, dtype=x.dtype, device=x.device)
        std = torch.as_tensor(std, dtype=x.dtype, device=x.device)
    else:
        x = np.asarray(x)
        dtype = x.dtype if x.dtype.kind == "f" else np.float64
        mean, std = mean.astype(dtype), std.astype(dtype)
    return x * std + mean if inverse else (x - mean) / std


def _mean_std(rows: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Float64 mean/std over rows (n, dim); no rows -> (0, 1); constant dims -> std 1."""
    if len(rows) == 0:
        return np.zeros(dim), np.ones(dim)
    rows = rows.astype(np.float64)
    mean = rows.mean(axis=0)
    std = rows.std(axis=0)
    std[std < MIN_STD] = 1.0
    return mean, std


def compute_norm_stats(dataset: VLADataset, max_samples: int = 2000, seed: int = 0) -> NormStats:
    """Stats over (a random subsample of) ``dataset``, which should be the training split.

    Actions: the non-padded steps of up to ``max_samples`` samples (action chunks only:
    no image decoding or sensor reads); their range over every sample.
    Sensor: up to ``MAX_SENSOR_ROWS`` rows drawn evenly from the episodes that have a
    sensor file (pre-cut windows count each row; zero padding is never included), merged
    episode by episode: memory holds one episode's rows, and compressed files are read
    block by block and not kept (see ``SensorData.sample_rows``).
    """
    rng = np.random.default_rng(seed)
    n = len(dataset)
    if n > max_samples:
        indices = np.sort(rng.choice(n, size=max_samples, replace=False))
    else:
        indices = np.arange(n)
    steps = []
    for i in indices:
        actions, is_pad = dataset.get_actions(int(i))  # (H, D), (H,)
        steps.append(actions[~is_pad])  # (h, D)
    dim = dataset.action_dim
    action_rows = np.concatenate(steps) if steps else np.zeros((0, dim))
    action_mean, action_std = _mean_std(action_rows, dim)
    action_min, action_max = dataset.action_range()  # every sample: a clamp must not cut real extremes

    # Sensor rows are merged one episode at a time (never all rows at once: 50k rows of
    # 1026 channels are 410 MB in float64), and each file's rows are read without keeping
    # its data open (SensorData.sample_rows).
    sensors = [ep.sensor for ep in dataset.episodes if ep.sensor is not None]
    moments = _RunningMoments(dataset.sensor_channels)
    for s in sensors:
        moments.add(s.sample_rows(rng, max(1, MAX_SENSOR_ROWS // len(sensors))))  # (n, C)
    sensor_mean, sensor_std = moments.mean_std()
    logger.info("norm stats from %d action steps (%d samples) and %d sensor rows (%d episodes)",
                len(action_rows), len(indices), moments.count, len(sensors))
    return NormStats(action_mean, action_std, sensor_mean, sensor_std, action_min, action_max,
                     list(dataset.action_names), list(dataset.action_units), *_views_and_instructions(dataset),
                     sensor_transform=_sensor_transform(sensors))


def _sensor_transform(sensors: list) -> dict | None:
    """The raw-feature transform of the episodes' sensor streams (LeRobot features): the first
    one, when every stream is made the same way (names aside: :meth:`SensorTransform.layout`),
    else a DatasetError naming two that differ. None for sensor files, and when sensor files
    and LeRobot features are mixed (the policy then takes the window itself, as before)."""
    transforms = [(getattr(s, "transform", None), s.path) for s in sensors]
    made = [(t, path) for t, path in transforms if t is not None]
    if not made:
        return None
    if len(made) < len(transforms):
        logger.warning("the sensor streams mix sensor files and LeRobot features: the policy takes the sensor window "
                       "itself (no raw-state contract is recorded)")
        return None
    first, first_path = made[0]
    for t, path in made[1:]:
        if t.layout() != first.layout():
            raise DatasetError(f"{first_path} and {path}: their sensor streams are made differently from their raw "
                               f"features ({', '.join(first.channel_names)} vs {', '.join(t.channel_names)}); train on "
                               "sources with one sensor layout")
    return first.to_dict()


def _views_and_instructions(dataset: VLADataset) -> tuple[list[str] | None, list[str] | None]:
    """The camera view names (of the first episode: every episode has as many) and up to
    ``MAX_INSTRUCTIONS`` distinct instructions, sorted, of ``dataset``'s episodes."""
    if not dataset.episodes:
        return None, None
    instructions = sorted({text for ep in dataset.episodes for text in ep.instructions})
    return list(dataset.episodes[0].camera_views), instructions[:MAX_INSTRUCTIONS]


class _RunningMoments:
    """Float64 mean/std over row blocks added one at a time (Chan et al.'s pairwise merge);
    the same result as ``_mean_std`` over all rows, holding one block at a time."""

    def __init__(self, dim: int):
        self.dim = dim
        self.count = 0
        self.mean = np.zeros(dim)
        self.m2 = np.zeros(dim)  # sum of squared deviations from the mean

    def add(self, rows: np.ndarray) -> None:
        if len(rows) == 0:
            return
        rows = np.asarray(rows, dtype=np.float64)  # (n, dim)
        n = len(rows)
        mean = rows.mean(axis=0)
        m2 = ((rows - mean) ** 2).sum(axis=0)
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta ** 2 * (self.count * n / total)
        self.count = total

    def mean_std(self) -> tuple[np.ndarray, np.ndarray]:
        if self.count == 0:
            return np.zeros(self.dim), np.ones(self.dim)
        std = np.sqrt(self.m2 / self.count)
        std[std < MIN_STD] = 1.0
        return self.mean.copy(), std
