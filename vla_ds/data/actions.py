"""Action chunks: the sample maths shared by every dataset format.

Two conventions, both giving ``(actions (S, H, D) float32, is_pad (S, H) bool)`` for S
sample times of one episode:

* :func:`compute_action_chunks`: SPEC section 3's delta-pose actions, interpolated from
  robot poses at the action rate (D = 7: ``[dx, dy, dz, da, db, dr, gripper]``, mm,
  degrees, gripper value at step end); padded steps are zeros.
* :func:`index_action_chunks`: the recorded per-frame action of a LeRobot dataset,
  ``action[t], action[t+1], ..., action[t+H-1]`` (its ``delta_timestamps`` convention):
  steps past the episode end repeat the last frame and are flagged as padding.
"""

from __future__ import annotations

import numpy as np

ACTION_DIM = 7  # delta-pose actions: [dx, dy, dz, da, db, dr, gripper]
DELTA_POSE_NAMES = ("dx", "dy", "dz", "da", "db", "dr", "gripper")
DELTA_POSE_UNITS = ("mm", "mm", "mm", "deg", "deg", "deg", "")
ANGLE_DIMS = slice(3, 6)


def wrap_degrees(x: np.ndarray) -> np.ndarray:
    """Wrap angles in degrees into (-180, 180]."""
    return -((-np.asarray(x) + 180.0) % 360.0 - 180.0)


def unwrap_degrees(x: np.ndarray) -> np.ndarray:
    """Remove ±360° jumps along axis 0 (a recorded angle that wraps at ±180° becomes continuous)."""
    return np.unwrap(np.asarray(x, dtype=np.float64), period=360.0, axis=0)


def compute_action_chunk(times: np.ndarray, poses: np.ndarray, gripper: np.ndarray | None,
                         t: float, horizon: int, hz: float) -> tuple[np.ndarray, np.ndarray]:
    """The delta-pose action chunk at time t.

    times (T,) increasing, poses (T, 6) with unwrapped angles, gripper (T,) or None.
    With D = 1/hz, for k = 0..H-1: ``action[k, :6] = pose(t+(k+1)D) - pose(t+kD)`` (pose
    linearly interpolated, angle deltas wrapped into (-180, 180]) and ``action[k, 6] =
    gripper(t+(k+1)D)`` (1.0 without a gripper column). Step k is padded when t+(k+1)D
    lies past the last state time; padded steps are zeros.
    Returns (actions (H, 7) float32, is_pad (H,) bool).
    """
    actions, is_pad = compute_action_chunks(times, poses, gripper, np.array([t], dtype=np.float64), horizon, hz)
    return actions[0], is_pad[0]


def compute_action_chunks(times: np.ndarray, poses: np.ndarray, gripper: np.ndarray | None,
                          ts: np.ndarray, horizon: int, hz: float) -> tuple[np.ndarray, np.ndarray]:
    """:func:`compute_action_chunk` at each of the times ``ts`` (S,) of one episode, in one
    interpolation per column (the same values, element for element, as S separate calls).
    Returns (actions (S, H, 7) float32, is_pad (S, H) bool)."""
    dt = 1.0 / hz
    query = ts[:, None] + dt * np.arange(horizon + 1)  # (S, H+1)
    flat = query.ravel()
    pose = np.stack([np.interp(flat, times, poses[:, c]) for c in range(6)], axis=1)  # (S*(H+1), 6)
    pose = pose.reshape(len(ts), horizon + 1, 6)
    actions = np.empty((len(ts), horizon, ACTION_DIM), dtype=np.float64)
    actions[..., :6] = pose[:, 1:] - pose[:, :-1]
    actions[..., ANGLE_DIMS] = wrap_degrees(actions[..., ANGLE_DIMS])
    actions[..., 6] = 1.0 if gripper is None else np.interp(query[:, 1:], times, gripper)
    is_pad = query[:, 1:] > times[-1] + 1e-9  # (S, H)
    actions[is_pad] = 0.0
    return actions.astype(np.float32), is_pad


def index_action_chunks(values: np.ndarray, rows: np.ndarray, horizon: int) -> tuple[np.ndarray, np.ndarray]:
    """Chunks of a per-frame action: for sample row r, ``values[r + k]`` for k = 0..H-1.

    values (T, D) of one episode, rows (S,) frame positions. Steps past the last frame
    repeat it (LeRobot clamps its query indices to the episode) and are padding.
    Returns (actions (S, H, D) float32, is_pad (S, H) bool).
    """
    query = rows[:, None] + np.arange(horizon)  # (S, H)
    is_pad = query >= len(values)
    return values[np.minimum(query, len(values) - 1)].astype(np.float32), is_pad


class EpisodeSamples:
    """The samples of one episode, as an episode reader builds them for ``VLADataset``.

    Fields: ``times`` (S,) float64 sample times (seconds, the episode's own clock);
    ``frames`` (S, V) int64, each view's frame for the sample (meaning is up to the
    episode type: it hands them back to its ``decode_views``); ``actions`` (S, H, D)
    float32 and ``is_pad`` (S, H) bool; ``invalid``: samples dropped as bad
    (on_bad_sample="skip"); ``out_of_range``: frames that are not samples by design.
    """

    __slots__ = ("times", "frames", "actions", "is_pad", "invalid", "out_of_range")

    def __init__(self, times, frames, actions, is_pad, invalid: int = 0, out_of_range: int = 0):
        self.times, self.frames, self.actions, self.is_pad = times, frames, actions, is_pad
        self.invalid, self.out_of_range = invalid, out_of_range
