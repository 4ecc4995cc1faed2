"""The raw-observation contract: how a robot's raw per-frame features become the policy's
sensor window, the one function the dataset, the policy and the server all call.

A policy trained on LeRobot features (``data.lerobot.sensor_features``) reads a window of
the last W frames of those features, concatenated in a fixed order, with some components
(angles) re-encoded. A robot has the raw features. :class:`SensorTransform` records every
step between the two, is saved with the policy (``norm_stats.json``: ``sensor_transform``),
and is applied by :meth:`SensorTransform.window` to the raw rows of the last W frames (W is
the policy's ``sensor_encoder.window_size``):

    {"observation.state": (T, 7) raw rows, ...}          T <= W frames, oldest first
      -> each feature's components, in the recorded order
      -> angles: "sincos" (sin, cos of the angle in radians: two channels),
                 "unwrap" (continuous within the window, starting at the first row's value)
                 or "raw"
      -> (W, C) float32 rows, front zero-padded when T < W, and the padded-row count

The training samples (:class:`vla_ds.data.lerobot.FrameSensor`), ``predict_actions(state=...)``,
the server's ``"state"`` requests and the simulation evaluator all go through that method,
so what a robot sends is what the policy was trained on. Normalisation (the training mean
and std) comes after it, inside the policy.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

ANGLE_ENCODINGS = ("sincos", "unwrap", "raw")
ANGLE_UNITS = ("rad", "deg")


@dataclasses.dataclass(frozen=True)
class SensorTransform:
    """Raw per-frame features -> the model's sensor window (see the module doc).

    Fields:
        features: ``(feature name, its component names)`` in concatenation order.
        angles: ``(feature name, component index)`` of the components that are angles.
        angle_encoding: ``sincos``, ``unwrap`` or ``raw``.
        angle_unit: ``rad`` or ``deg``, the unit of the raw angles.
    """

    features: tuple[tuple[str, tuple[str, ...]], ...]
    angles: tuple[tuple[str, int], ...]
    angle_encoding: str
    angle_unit: str

    def __post_init__(self):
        if self.angle_encoding not in ANGLE_ENCODINGS:
            raise ValueError(f"angle_encoding must be one of {ANGLE_ENCODINGS}, got {self.angle_encoding!r}")
        if self.angle_unit not in ANGLE_UNITS:
            raise ValueError(f"angle_unit must be one of {ANGLE_UNITS}, got {self.angle_unit!r}")
        if not self.features:
            raise ValueError("a sensor transform needs at least one feature")
        sizes = dict(self.features)
        for feature, index in self.angles:
            if feature not in sizes or not 0 <= index < len(sizes[feature]):
                raise ValueError(f"angle component {feature}[{index}] is not a component of the features")
        # (feature, component index, kind, channel name) per model channel, made once: windows
        # are cut per training sample and per served request.
        plan, angles = [], set(self.angles)
        for feature, names in self.features:
            for c, name in enumerate(names):
                if (feature, c) in angles and self.angle_encoding == "sincos":
                    plan += [(feature, c, "sin", f"sin({name})"), (feature, c, "cos", f"cos({name})")]
                elif (feature, c) in angles and self.angle_encoding == "unwrap":
                    plan.append((feature, c, "unwrap", f"unwrapped({name})"))
                else:
                    plan.append((feature, c, "raw", name))
        object.__setattr__(self, "_plan", tuple(plan))  # frozen; not a field, so not compared

    # ------------------------------------------------------------------ what it makes

    @property
    def raw_sizes(self) -> dict[str, int]:
        """Components per raw feature, in concatenation order."""
        return {feature: len(names) for feature, names in self.features}

    @property
    def channel_names(self) -> list[str]:
        return [name for *_, name in self._plan]

    @property
    def channels(self) -> int:
        return len(self._plan)

    # ------------------------------------------------------------------ the one function

    def check(self, values: dict[str, Any], window_size: int, where: str = "state") -> dict[str, np.ndarray]:
        """``values`` as {feature: (T, D) float64} with one T for all, else ValueError naming
        the feature and the shape expected. A (D,) array is one frame."""
        if not isinstance(values, dict):
            raise ValueError(f"'{where}': must be a map from feature name to its rows, got {type(values).__name__}")
        unknown = sorted(set(values) - set(self.raw_sizes))
        if unknown:
            raise ValueError(f"'{where}': unknown feature '{unknown[0]}'; this policy reads "
                             f"{', '.join(self.raw_sizes)}")
        out, frames = {}, None
        for feature, size in self.raw_sizes.items():
            if feature not in values:
                raise ValueError(f"'{where}': missing feature '{feature}' ({size} values per frame: "
                                 f"{', '.join(dict(self.features)[feature])})")
            try:
                x = np.asarray(values[feature], dtype=np.float64)
            except (TypeError, ValueError):
                raise ValueError(f"'{where}.{feature}': must be numbers, (T, {size}) or ({size},)") from None
            if x.ndim == 1:
                x = x[None]
            if x.ndim != 2 or x.shape[1] != size or not len(x):
                raise ValueError(f"'{where}.{feature}': expected (T, {size}) rows (T >= 1 frames, the last "
                                 f"{window_size} are used) or ({size},), got shape {tuple(np.shape(values[feature]))}")
            if not np.isfinite(x).all():
                raise ValueError(f"'{where}.{feature}': has NaN or inf")
            if frames is not None and len(x) != frames:
                raise ValueError(f"'{where}': every feature needs the same number of frames "
                                 f"({frames} and {len(x)} given)")
            frames = len(x)
            out[feature] = x
        return out

    def rows(self, values: dict[str, np.ndarray], unwrap: bool = False) -> np.ndarray:
        """(T, C) float32 model rows of T raw frames. "unwrap" channels are continuous over
        the T rows with ``unwrap`` (a window), else each frame's raw angle (statistics)."""
        to_rad = 1.0 if self.angle_unit == "rad" else math.pi / 180.0
        period = 2 * math.pi if self.angle_unit == "rad" else 360.0
        columns = []
        for feature, c, kind, _ in self._plan:
            x = np.asarray(values[feature], dtype=np.float64)[:, c]
            if kind == "sin":
                x = np.sin(x * to_rad)
            elif kind == "cos":
                x = np.cos(x * to_rad)
            elif kind == "unwrap" and unwrap:
                x = np.unwrap(x, period=period)
            columns.append(x)
        return np.stack(columns, axis=1).astype(np.float32)

    def window(self, values: dict[str, np.ndarray], window_size: int) -> tuple[np.ndarray, int]:
        """The model's ((W, C) float32 window, padded rows) from the raw rows of the last
        T frames (T >= 1; only the last W = ``window_size`` are used; T < W front-pads with
        zeros)."""
        rows = self.rows({f: np.asarray(v)[-window_size:] for f, v in values.items()}, unwrap=True)
        out = np.zeros((window_size, rows.shape[1]), dtype=np.float32)
        out[window_size - len(rows):] = rows
        return out, window_size - len(rows)

    def layout(self) -> tuple:
        """What makes the window, without the components' names: (feature, size) pairs in
        order, angle indices, encoding, unit. Two sources whose info.json name the same
        components differently (or not at all) make the same windows."""
        return (tuple((f, len(names)) for f, names in self.features), self.angles, self.angle_encoding,
                self.angle_unit)

    # ------------------------------------------------------------------ stored form

    def to_dict(self) -> dict[str, Any]:
        return {"features": [{"name": f, "components": list(names)} for f, names in self.features],
                "angles": [{"feature": f, "component": dict(self.features)[f][c]} for f, c in self.angles],
                "angle_encoding": self.angle_encoding, "angle_unit": self.angle_unit,
                "channel_names": self.channel_names}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SensorTransform:
        try:
            features = tuple((str(f["name"]), tuple(str(n) for n in f["components"])) for f in d["features"])
            names = dict(features)
            angles = tuple((str(a["feature"]), names[a["feature"]].index(a["component"])) for a in d["angles"])
            return cls(features, angles, str(d["angle_encoding"]), str(d["angle_unit"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"sensor_transform: malformed ({type(e).__name__}: {e})") from None

    @classmethod
    def stored(cls, d: dict[str, Any] | None) -> SensorTransform | None:
        return None if d is None else cls.from_dict(d)

    def describe(self, window_size: int) -> dict[str, Any]:
        """What a client is told: the raw features to send, their components and units, and
        what the policy makes of them."""
        angles = {(f, c) for f, c in self.angles}
        return {
            "features": {f: {"size": len(names), "components": list(names),
                             "angles": [names[c] for c in range(len(names)) if (f, c) in angles]}
                         for f, names in self.features},
            "angle_unit": self.angle_unit,
            "angle_encoding": self.angle_encoding,
            "window_frames": window_size,
            "model_channels": self.channel_names,
            "send": "'state': {feature: float32 (T, size)}, the last T frames, oldest first (a (size,) "
                    "array is one frame); of more than window_frames, the last window_frames are used; "
                    "fewer are padded",
        }


def check_same_transform(recorded: SensorTransform | None, episodes, where: str, who: str = "the policy") -> None:
    """Refuse ``episodes`` whose raw features make the sensor window differently from
    ``recorded`` (other features, order, sizes or angle encoding): their windows would be
    read as the recorded channels. ``where`` names the data, ``who`` what recorded it.
    Episodes with a sensor file (no transform) are not compared."""
    if recorded is None:
        return
    for ep in episodes:
        made = getattr(ep.sensor, "transform", None)
        if made is not None and made.layout() != recorded.layout():
            from vla_ds.errors import ConfigError

            raise ConfigError(f"{where}: its sensor features make the channels {', '.join(made.channel_names)} (from "
                              f"{', '.join(f for f, _ in made.features)}), but {who} was trained on "
                              f"{', '.join(recorded.channel_names)} (from {', '.join(f for f, _ in recorded.features)}); "
                              "set data.lerobot.sensor_features / sensor_angles / sensor_angle_encoding / angle_unit "
                              "as they were")


def unwrap_changed(lerobot: dict[str, Any]) -> bool:
    """Whether a policy exported before vla_ds recorded its sensor transform, trained with
    these ``data.lerobot`` settings, saw angles unwrapped over whole episodes: its windows are
    now unwrapped within each window (what a robot can send), shifted by whole turns at worst."""
    return bool(lerobot.get("sensor_angles")) and lerobot.get("sensor_angle_encoding") == "unwrap"
