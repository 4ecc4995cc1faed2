"""Datasets whose action chunks are exactly predictable from one kind of observation.

They are the ground truth of ``benchmarks/bench_learning.py``: a policy that learns what
the data says reaches a small fraction of the mean-action baseline on held-out episodes,
and the modality that carries the signal tells which part of the conditioning path is
being tested. Every dataset is in the SPEC section 3 format (written with the same files a
user records), so training reads it through the normal dataset code.

Tasks (``TASKS``); in all of them each episode moves with one constant translation
velocity, the rotation deltas ``da, db, dr`` are exactly 0 in every sample (the poses hold
constant, non-zero angles, ``pose_r`` next to the +-180 wrap), and the images are noise
unless the task says otherwise:

``sensor``       velocity (dx, dy, dz) uniform in [-1, 1] mm per 0.1 s step, carried by
                 sensor channels 0-2 (plus noise); the gripper switches from 1 to 0 once,
                 announced by channel 3 (its current value) and channel 4 (seconds to the
                 switch, clipped to [0, 1]); channels 5-7 are noise. 100 Hz stream.
``image``        velocity as above, carried by the front view's tint (RGB = 128 + 100 v);
                 the gripper switch announced by the wrist view's brightness; no sensor file.
``instruction``  two instructions, two behaviours: "push the block forward" moves +x with
                 the gripper open (1), "pull the block back" moves -x and -z with it
                 closed (0); no sensor file, images are noise.
``position``     velocity (dx, dy) in [-1, 1] mm per step given by *where* a red square
                 sits in the front view (112x112: its centre's x and y, scaled), dz = 0,
                 the gripper open throughout; the grey texture around it is new noise in
                 every frame, so the image's mean colour says almost nothing. What a mean over the
                 image tokens loses (issue 26); no sensor file.

Layout of one dataset::

    OUT_DIR/
      .vla_ds_synthetic                   marker (what wrote the directory)
      <task>/episode_NNN/
        metadata.json                     instruction, camera_views, action {delta_pose, 10 Hz}
        robot_states.csv                  50 Hz: timestamp, pose_x..pose_r, gripper
        images/front/<t>.png, images/wrist/<t>.png   10 Hz, 32x24 (position: front 112x112)
        sensor_data.npz                   "sensor" task only: timestamps (N,), data (N, 8)

Deterministic from ``seed``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from vla_ds.errors import DatasetError

TASKS = ("sensor", "image", "instruction", "position")
MARKER = ".vla_ds_synthetic"
FRAME_HZ = 10.0
STATE_HZ = 50.0
SENSOR_HZ = 100.0
SENSOR_CHANNELS = 8
SENSOR_NOISE = 0.05
IMAGE_W, IMAGE_H = 32, 24
POSITION_IMAGE = 112  # the position task's front view: 4x4 merged tokens of the tiny backbone
SQUARE = 16           # ...and its red square's side, in pixels
SQUARE_RGB = (230, 30, 30)
# ...on grey texture, 128 +- this, new in every frame. Low contrast because the tiny backbone's
# random vision tower is no trained detector: a linear probe of its 4x4 token cells finds the
# square's place at R^2 0.91 on +-8 texture, 0.79 on +-16, 0.35 on +-30 (a trained ViT sees a
# red square in any texture); the mean over tokens stays at 0.0-0.3 on all of them.
POSITION_TEXTURE = 10
T0 = 1_760_000_000.0
ANGLES = (10.0, -5.0, 179.5)  # constant pose_a, pose_b, pose_r: the rotation deltas are exactly 0
BEHAVIOURS = (
    # (instruction, velocity in mm per 0.1 s step, gripper)
    ("push the block forward", (1.0, 0.0, 0.0), 1.0),
    ("pull the block back", (-1.0, 0.0, -0.5), 0.0),
)


def _noise_image(rng: np.random.Generator, h: int = IMAGE_H, w: int = IMAGE_W) -> np.ndarray:
    return rng.integers(60, 196, size=(h, w, 3), dtype=np.uint8)


def _countdown(t: np.ndarray, t_switch: float) -> np.ndarray:
    """Seconds to the gripper switch, clipped to [0, 1]."""
    return np.clip(t_switch - t, 0.0, 1.0)


def _write_episode(ep_dir: Path, task: str, rng: np.random.Generator, t0: float, behaviour: int) -> None:
    # The position task's signal is a place, one per episode: it needs many short episodes.
    n_frames = int(rng.integers(10, 15)) if task == "position" else int(rng.integers(40, 61))
    duration = (n_frames - 1) / FRAME_HZ
    square = None
    if task == "instruction":
        instruction, velocity, grip = BEHAVIOURS[behaviour]
        v = np.asarray(velocity, dtype=np.float64)  # (3,) mm per step
        t_switch = None
    elif task == "position":
        instruction, grip, t_switch = "move the tool", 1.0, None
        square = rng.integers(0, POSITION_IMAGE - SQUARE + 1, size=2)  # top-left (x, y)
        v = np.array([*(2.0 * square / (POSITION_IMAGE - SQUARE) - 1.0), 0.0])  # centre -> [-1, 1]
    else:
        instruction = "move the tool"
        v = rng.uniform(-1.0, 1.0, size=3)
        t_switch = float(rng.uniform(0.3, 0.7) * duration)
    speed = v * FRAME_HZ  # mm/s

    # Robot states at 50 Hz from 0.2 s before the first frame to 0.2 s after the last one
    # (so the last samples' chunks are padded, as in a recording).
    tau = np.arange(-0.2, duration + 0.2 + 1e-9, 1 / STATE_HZ)  # (T,)
    xyz = rng.uniform(-50, 50, size=3) + np.outer(tau, speed)  # (T, 3)
    angles = np.broadcast_to(np.asarray(ANGLES), (len(tau), 3))
    gripper = np.full(len(tau), grip) if t_switch is None else (tau < t_switch).astype(np.float64)
    ep_dir.mkdir(parents=True)
    table = np.column_stack([t0 + tau, xyz, angles, gripper])
    np.savetxt(ep_dir / "robot_states.csv", table, delimiter=",", comments="", fmt=["%.6f"] + ["%.6f"] * 6 + ["%.1f"],
               header="timestamp,pose_x,pose_y,pose_z,pose_a,pose_b,pose_r,gripper")
    meta = {"instruction": instruction, "camera_views": ["front", "wrist"],
            "action": {"type": "delta_pose", "hz": FRAME_HZ}}
    (ep_dir / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")

    frame_tau = np.arange(n_frames) / FRAME_HZ  # (F,)
    for view in ("front", "wrist"):
        (ep_dir / "images" / view).mkdir(parents=True)
    for k, t in enumerate(frame_tau):
        front, wrist = _noise_image(rng), _noise_image(rng)
        if square is not None:
            front = rng.integers(128 - POSITION_TEXTURE, 129 + POSITION_TEXTURE, size=(POSITION_IMAGE, POSITION_IMAGE, 3),
                                 dtype=np.uint8)
            x, y = square
            front[y:y + SQUARE, x:x + SQUARE] = SQUARE_RGB
        if task == "image":
            front = np.clip(front.astype(np.int16) // 4 + 96 + np.round(100 * v).astype(np.int16), 0, 255)
            level = 40 + 180 * _countdown(np.array([t]), t_switch)[0]
            wrist = np.clip(wrist.astype(np.int16) // 8 - 16 + round(level), 0, 255)
        for view, img in (("front", front), ("wrist", wrist)):
            Image.fromarray(np.asarray(img, dtype=np.uint8)).save(ep_dir / "images" / view / f"{t0 + t:.6f}.png")

    if task == "sensor":
        tau_x = np.arange(-1.0, duration + 0.2 + 1e-9, 1 / SENSOR_HZ)  # (N,)
        data = rng.normal(0.0, SENSOR_NOISE, size=(len(tau_x), SENSOR_CHANNELS))
        data[:, :3] += v
        data[:, 3] += (tau_x < t_switch)
        data[:, 4] += _countdown(tau_x, t_switch)
        np.savez(ep_dir / "sensor_data.npz", timestamps=t0 + tau_x, data=data.astype(np.float32))


def make_learning_dataset(out_dir, task: str, episodes: int = 50, seed: int = 0, overwrite: bool = False) -> Path:
    """Write ``episodes`` episodes of ``task`` (one of ``TASKS``) into ``out_dir``; returns it.

    An existing non-empty ``out_dir`` is an error unless ``overwrite`` is set and it was
    written by this function (holds the marker); nothing else is ever deleted.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if episodes < 2:
        raise ValueError(f"episodes must be >= 2 (one to train on, one to hold out), got {episodes}")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise DatasetError(f"{out}: directory exists and is not empty (use a new directory or overwrite=True)")
        if not (out / MARKER).exists():
            raise DatasetError(f"{out}: not a synthetic dataset (no {MARKER}); refusing to delete it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text(f"generated by vla_ds.data.synthetic.make_learning_dataset (task {task})\n")
    for e in range(episodes):
        rng = np.random.default_rng([seed, TASKS.index(task), e])
        _write_episode(out / task / f"episode_{e:03d}", task, rng, T0 + 100.0 * e, behaviour=e % len(BEHAVIOURS))
    return out
