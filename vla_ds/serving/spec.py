"""What a served policy expects in a request, and what it tells a client on connect.

A request is one observation, a msgpack map (docs/serving.md)::

    {"images": {"<view>": uint8 (H, W, 3), ...},   # one per camera view, named as in the metadata
     "prompt": "pick up the cup",                  # optional when the policy has one instruction
     "state": {"observation.state": float32 (T, D)},  # a policy trained on LeRobot features: the raw
                                                   #   features of the last T frames (it makes its window)
     "sensor": float32 (W, C),                     # other policies: the sensor window itself; optional:
                                                   #   without it the no-sensor embedding is used
     "sensor_pad": int,                            # optional: rows at the window's front that are padding
     "seed": int}                                  # optional: fixes the sampler's starting noise

:meth:`ObservationSpec.parse` turns it into a :class:`Request` or raises :class:`BadRequest`
naming the key and the problem. Unknown keys are refused rather than ignored: a misspelt
``"sensor"`` must not silently become "no sensor".
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from vla_ds.data.observation import SensorTransform

IMAGES, PROMPT, STATE, SENSOR, SENSOR_PAD, SEED = "images", "prompt", "state", "sensor", "sensor_pad", "seed"
REQUEST_KEYS = (IMAGES, PROMPT, STATE, SENSOR, SENSOR_PAD, SEED)
MAX_PROMPT_CHARS = 4096
MAX_IMAGE_SIDE = 8192


class BadRequest(ValueError):
    """A request the server refuses; the message names the key and the problem."""


@dataclasses.dataclass
class Request:
    """One validated observation, ready for ``VLAPolicy.predict_actions``."""

    images: list[np.ndarray]     # V x (h, w, 3) uint8, in the policy's view order
    prompt: str
    sensor: np.ndarray | None    # (W, C) float32, or None: no sensor data
    sensor_pad: int
    noise: torch.Tensor          # (H, D) float32: the sampler's starting noise
    views: tuple | None = None   # the image processor's output for the images (server: made on arrival)


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"a {value.dtype} array of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}" if not isinstance(value, (str, int, float)) else repr(value)[:60]


def _int_in(value: Any, key: str, high: int) -> int:
    """``value`` (a Python or numpy integer) as an int in 0..high, else :class:`BadRequest`."""
    if isinstance(value, np.generic) and value.dtype.kind in "iu":
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
        raise BadRequest(f"'{key}': must be an int in 0..{high}, got {_describe(value)}")
    return value


@dataclasses.dataclass
class ObservationSpec:
    """The request layout of one policy.

    Fields:
        views: camera view names, in the order the model sees them.
        instructions: the distinct training instructions (may be empty when unknown).
        window_size, channels: the sensor window (W, C).
        horizon, action_dim: the reply's action chunk (H, D).
        transform: how the policy makes its window from a robot's raw features (``"state"``
            requests), or None: requests then carry the window (``"sensor"``).
    """

    views: list[str]
    instructions: list[str]
    window_size: int
    channels: int
    horizon: int
    action_dim: int
    transform: SensorTransform | None = None

    @property
    def instruction(self) -> str | None:
        """The instruction a request without ``"prompt"`` gets: the only one it was trained with."""
        return self.instructions[0] if len(self.instructions) == 1 else None

    def describe(self) -> dict[str, Any]:
        """The request keys, as the metadata tells clients."""
        keys = {
            IMAGES: {view: "uint8 (H, W, 3)" for view in self.views},
            PROMPT: "str" + (" (optional: default the policy's instruction)" if self.instruction else ""),
        }
        if self.transform is not None:
            sizes = ", ".join(f"'{f}': float32 (T, {n})" for f, n in self.transform.raw_sizes.items())
            keys[STATE] = (f"{{{sizes}}}: the raw features of the last T <= {self.window_size} frames, oldest "
                           "first; optional: without it the policy uses its learned no-sensor embedding")
        else:
            keys[SENSOR] = (f"float32 ({self.window_size}, {self.channels}), optional: without it the policy uses "
                            "its learned no-sensor embedding")
            keys[SENSOR_PAD] = f"int 0..{self.window_size}, optional: rows at the front of the window that are padding"
        keys[SEED] = "int >= 0, optional: fixes the sampler's starting noise (the same seed, the same chunk)"
        return keys

    def parse(self, obs: Any, generator: torch.Generator) -> Request:
        """The :class:`Request` in ``obs`` (a decoded message); ``generator`` draws the starting
        noise of a request without ``"seed"``."""
        if not isinstance(obs, dict):
            raise BadRequest(f"a request must be a map of {', '.join(REQUEST_KEYS)}; got {_describe(obs)}")
        unknown = sorted(str(k) for k in obs if k not in REQUEST_KEYS)
        if unknown:
            raise BadRequest(f"unknown key(s) {', '.join(repr(k) for k in unknown)}; a request has "
                             f"{', '.join(repr(k) for k in REQUEST_KEYS)}")
        images = self._images(obs.get(IMAGES))
        prompt = self._prompt(obs.get(PROMPT))
        if obs.get(STATE) is not None:
            sensor, pad = self._state(obs)
        else:
            if self.transform is not None and (obs.get(SENSOR) is not None or obs.get(SENSOR_PAD) is not None):
                key = SENSOR if obs.get(SENSOR) is not None else SENSOR_PAD
                raise BadRequest(f"'{key}': this policy makes its sensor window from raw features itself; send "
                                 f"'{STATE}': {{{', '.join(repr(f) for f in self.transform.raw_sizes)}}} (the raw "
                                 "rows of the last frames) instead")
            sensor = self._sensor(obs.get(SENSOR))
            pad = obs.get(SENSOR_PAD)
            pad = 0 if pad is None else _int_in(pad, SENSOR_PAD, self.window_size)
        seed = obs.get(SEED)
        if seed is not None:
            generator = torch.Generator().manual_seed(_int_in(seed, SEED, 2 ** 63 - 1))
        noise = torch.randn((self.horizon, self.action_dim), generator=generator)  # (H, D)
        return Request(images, prompt, sensor, pad, noise)

    def _images(self, images: Any) -> list[np.ndarray]:
        if images is None:
            raise BadRequest(f"missing '{IMAGES}': a map of {len(self.views)} view(s) "
                             f"{', '.join(repr(v) for v in self.views)} to uint8 (H, W, 3) arrays")
        if not isinstance(images, dict):
            raise BadRequest(f"'{IMAGES}': must be a map of view name to uint8 (H, W, 3) array, got {_describe(images)}")
        missing = [v for v in self.views if v not in images]
        extra = sorted(str(v) for v in images if v not in self.views)
        if missing or extra:
            what = (f"missing view(s) {', '.join(repr(v) for v in missing)}" if missing else "") + \
                   ("; " if missing and extra else "") + \
                   (f"unknown view(s) {', '.join(repr(v) for v in extra)}" if extra else "")
            raise BadRequest(f"'{IMAGES}': {what}; this policy's views are {', '.join(repr(v) for v in self.views)}")
        out = []
        for view in self.views:
            image = images[view]
            key = f"'{IMAGES}/{view}'"
            if not isinstance(image, np.ndarray):
                raise BadRequest(f"{key}: must be a uint8 (H, W, 3) array, got {_describe(image)}")
            if image.dtype != np.uint8:
                raise BadRequest(f"{key}: must be uint8 (0..255 RGB), got dtype {image.dtype}")
            if image.ndim != 3 or image.shape[2] != 3:
                raise BadRequest(f"{key}: must have shape (H, W, 3), got {tuple(image.shape)}")
            if not (2 <= image.shape[0] <= MAX_IMAGE_SIDE and 2 <= image.shape[1] <= MAX_IMAGE_SIDE):
                raise BadRequest(f"{key}: height and width must be 2..{MAX_IMAGE_SIDE}, got {tuple(image.shape)}")
            out.append(image)
        return out

    def _prompt(self, prompt: Any) -> str:
        if prompt is None:
            if self.instruction is None:
                raise BadRequest(f"missing '{PROMPT}': this policy was trained with "
                                 f"{len(self.instructions) or 'unrecorded'} instructions, so a request must say one")
            return self.instruction
        if not isinstance(prompt, str) or not prompt.strip():
            raise BadRequest(f"'{PROMPT}': must be a non-empty string, got {_describe(prompt)}")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise BadRequest(f"'{PROMPT}': {len(prompt)} characters, more than the {MAX_PROMPT_CHARS} allowed")
        return prompt

    def _state(self, obs: dict) -> tuple[np.ndarray, int]:
        """A ``"state"`` request's window and padding, made by the policy's transform."""
        if self.transform is None:
            raise BadRequest(f"'{STATE}': this policy's sensor stream is not made from named raw features; send "
                             f"'{SENSOR}': float32 ({self.window_size}, {self.channels}), the window itself")
        for key in (SENSOR, SENSOR_PAD):
            if obs.get(key) is not None:
                raise BadRequest(f"'{key}': give '{STATE}' (raw features) or '{key}', not both")
        state = obs[STATE]
        if isinstance(state, dict):  # reject dtypes the transform would silently convert
            for feature, value in state.items():
                if isinstance(value, np.ndarray) and value.dtype.kind not in "fiu":
                    raise BadRequest(f"'{STATE}.{feature}': must be float32, got dtype {value.dtype}")
        try:
            return self.transform.window(self.transform.check(state, self.window_size, STATE), self.window_size)
        except ValueError as e:
            raise BadRequest(str(e)) from None

    def _sensor(self, sensor: Any) -> np.ndarray | None:
        if sensor is None:
            return None
        expected = (self.window_size, self.channels)
        if not isinstance(sensor, np.ndarray):
            raise BadRequest(f"'{SENSOR}': must be a float32 {expected} array, got {_describe(sensor)}")
        if sensor.dtype.kind != "f":
            raise BadRequest(f"'{SENSOR}': must be float32 (or another float dtype), got dtype {sensor.dtype}")
        if tuple(sensor.shape) != expected:
            raise BadRequest(f"'{SENSOR}': must have shape {expected} (sensor window size, channels), "
                             f"got {tuple(sensor.shape)}")
        sensor = sensor.astype(np.float32, copy=False)
        if not np.isfinite(sensor).all():
            bad = np.argwhere(~np.isfinite(sensor))[0]
            raise BadRequest(f"'{SENSOR}': {int((~np.isfinite(sensor)).sum())} NaN or inf value(s), the first at "
                             f"row {int(bad[0])}, channel {int(bad[1])}")
        return sensor
