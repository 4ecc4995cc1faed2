"""A small synthetic dataset in exactly the SPEC section 3 format, for CPU runs and tests.

Layout written by :func:`make_demo_dataset`::

    OUT_DIR/
      mixture.yaml                          Needle_insertion_eye_trocar 3.0, White_silicone_white_circle 2.0
      .vla_ds_demo                          marker: lets overwrite=True delete only a demo
      Needle_insertion_eye_trocar/episode_000/
        metadata.json                       instruction, camera_views, action, confidence
        robot_states.csv                    50 Hz: timestamp, pose_x..pose_r, gripper, force_z (ignored)
        images/front/<t>.jpg                10 Hz, 64x48
        images/wrist/<t>.png|jpg            10 Hz, ~20 ms after front
        sensor_data.npz                     16 channels at 100 Hz: raw (N, 16) stored or compressed,
                                            or pre-cut (N, 32, 16) windows at 20 Hz
      White_silicone_white_circle/episode_000/   no sensor file; some metadata.json are {} (defaults)

The actions are learnable: each episode moves along one of its source's
``MOTIONS_PER_SOURCE`` 6-D directions (episode j takes motion j mod 3) with a smoothly
varying speed and its own start pose. Sensor channels 0-5 carry the current velocity (plus noise),
channel 6 the gripper, 7-15 distractor tones. The front image draws a blob at
(pose_x, pose_y) coloured by the translation direction on a background tinted by it, the
wrist image one at (pose_z, pose_r) coloured and tinted by the rotation direction; blob
size follows the gripper.
Every episode's pose_r crosses +-180 degrees. Deterministic from ``seed``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from vla_ds.data.dataset import DataConfig, VLADataset
from vla_ds.errors import DatasetError, VLAError

logger = logging.getLogger(__name__)

SOURCES = (
    # (folder, instruction or None for the default, mixture weight, has sensor data)
    ("Needle_insertion_eye_trocar", "Insert the needle into the eye trocar", 3.0, True),
    ("White_silicone_white_circle", None, 2.0, False),
)
FRAME_HZ = 10.0
STATE_HZ = 50.0
SENSOR_HZ = 100.0
SENSOR_CHANNELS = 16
SENSOR_WINDOW = 32  # the window the demo trains with (--sensor-window-size 32) and the pre-cut length
WINDOW_HZ = 20.0
IMAGE_W, IMAGE_H = 64, 48
LINEAR_SPEED = 10.0  # mm/s
ANGULAR_SPEED = 20.0  # deg/s
# Each source repeats a few motions (task variants), as a recorded dataset repeats demonstrations:
# with one random direction per episode, 18 training episodes do not pin down a 6-D mapping
# through the tiny random backbone (benchmarks/bench_learning.py's regression ceiling measured
# 0.43-0.86 of the mean-action error that way, whatever the head).
MOTIONS_PER_SOURCE = 3
T0 = 1_730_000_000.0
MARKER = ".vla_ds_demo"


def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-9)


def motion_directions(seed: int, source: int) -> np.ndarray:
    """(MOTIONS_PER_SOURCE, 6) unit translation and rotation directions of one source's motions."""
    rng = np.random.default_rng([seed, 1000 + source])
    return np.stack([np.concatenate([_unit(rng.normal(size=3)), _unit(rng.normal(size=3))])
                     for _ in range(MOTIONS_PER_SOURCE)])


class _Motion:
    """Pose(tau) = p0 + v * M(tau) with speed modulation m(tau) = 1 + 0.3 sin(w tau + phi).

    ``direction`` (6,): unit translation and rotation directions; ``v`` scales them to
    LINEAR_SPEED and ANGULAR_SPEED. Start pose, speed modulation and gripper timing are
    drawn per episode."""

    def __init__(self, rng: np.random.Generator, duration: float, direction: np.ndarray):
        self.v = np.concatenate([LINEAR_SPEED * direction[:3], ANGULAR_SPEED * direction[3:]])  # (6,) mm/s, deg/s
        self.w = 2 * np.pi / rng.uniform(2.5, 4.0)
        self.phi = rng.uniform(0, 2 * np.pi)
        self.p0 = np.array([400, 0, 200, 0, 0, 0], dtype=np.float64) + rng.uniform(-20, 20, size=6)
        # pose_r reaches 180 at mid-episode, so it crosses the +-180 wrap
        self.p0[5] = 180.0 - self.v[5] * self.integral(duration / 2)
        self.grip_off = rng.uniform(0.5, 0.8) * duration  # gripper opens from here over 0.5 s

    def integral(self, tau):
        return tau - 0.3 / self.w * (np.cos(self.w * tau + self.phi) - np.cos(self.phi))

    def pose(self, tau: np.ndarray) -> np.ndarray:
        """(T,) -> (T, 6) continuous (unwrapped) pose."""
        return self.p0 + np.outer(self.integral(tau), self.v)

    def velocity(self, tau: np.ndarray) -> np.ndarray:
        """(T,) -> (T, 6)."""
        return np.outer(1 + 0.3 * np.sin(self.w * tau + self.phi), self.v)

    def gripper(self, tau: np.ndarray) -> np.ndarray:
        return np.clip(1.0 - (tau - self.grip_off) / 0.5, 0.0, 1.0)


def _draw(pos_xy: np.ndarray, colour_dir: np.ndarray, gripper: float, grid) -> np.ndarray:
    """One (H, W, 3) uint8 frame: a gradient tinted by ``colour_dir`` and a blob.

    The tint carries the episode's direction across the whole frame, so it survives the
    backbone's pooling even for a random-weight tiny backbone; the blob carries the pose.
    """
    yy, xx = grid
    tint = 40 * colour_dir  # (3,)
    img = np.clip((60 + 40 * yy / IMAGE_H)[..., None] + tint, 0, 255).astype(np.uint8)
    cx = np.clip(IMAGE_W / 2 + pos_xy[0], 4, IMAGE_W - 5)
    cy = np.clip(IMAGE_H / 2 + pos_xy[1], 4, IMAGE_H - 5)
    r = 3 + 3 * gripper
    colour = np.clip(128 + 127 * colour_dir, 0, 255).astype(np.uint8)
    img[(xx - cx) ** 2 + (yy - cy) ** 2 <= r * r] = colour
    return img


def _write_episode(ep_dir: Path, rng: np.random.Generator, t0: float, with_sensor: bool, sensor_layout: str,
                   metadata: dict, wrist_suffix: str, direction: np.ndarray) -> int:
    n_frames = int(rng.integers(40, 61))
    duration = (n_frames - 1) / FRAME_HZ
    motion = _Motion(rng, duration, direction)
    grid = np.mgrid[0:IMAGE_H, 0:IMAGE_W]

    # robot states: 50 Hz from 0.2 s before the first frame to 0.2 s after the last
    tau_s = np.arange(-0.2, duration + 0.2 + 1e-9, 1 / STATE_HZ)
    pose = motion.pose(tau_s)  # (T, 6)
    wrapped = pose.copy()
    wrapped[:, 3:] = (wrapped[:, 3:] + 180.0) % 360.0 - 180.0
    table = np.column_stack([t0 + tau_s, wrapped, motion.gripper(tau_s),
                             rng.normal(0, 0.5, size=len(tau_s))])  # force_z is ignored by the loader
    ep_dir.mkdir(parents=True)
    np.savetxt(ep_dir / "robot_states.csv", table, delimiter=",", comments="",
               fmt=["%.6f"] + ["%.5f"] * 7 + ["%.4f"],
               header="timestamp,pose_x,pose_y,pose_z,pose_a,pose_b,pose_r,gripper,force_z")
    (ep_dir / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")

    # images: front at ~10 Hz, wrist ~20 ms later
    views = {"front": (0.0, ".jpg"), "wrist": (0.02, wrist_suffix)}
    start = motion.pose(np.zeros(1))[0]
    for view, (offset, suffix) in views.items():
        (ep_dir / "images" / view).mkdir(parents=True)
        tau_f = np.arange(n_frames) / FRAME_HZ + offset + rng.uniform(-0.003, 0.003, size=n_frames)
        poses = motion.pose(tau_f) - start  # (F, 6)
        grips = motion.gripper(tau_f)
        for k in range(n_frames):
            if view == "front":
                img = _draw(0.4 * poses[k, [0, 1]], _unit(motion.v[:3]), grips[k], grid)
            else:
                img = _draw(np.array([0.4 * poses[k, 2], 0.2 * poses[k, 5]]), _unit(motion.v[3:]), grips[k], grid)
            path = ep_dir / "images" / view / f"{t0 + tau_f[k]:.6f}{suffix}"
            Image.fromarray(img).save(path, **({"quality": 90} if suffix == ".jpg" else {}))

    if with_sensor:
        tau_x = np.arange(-0.5, duration + 0.2 + 1e-9, 1 / SENSOR_HZ)
        data = np.empty((len(tau_x), SENSOR_CHANNELS), dtype=np.float32)
        scale = np.array([LINEAR_SPEED] * 3 + [ANGULAR_SPEED] * 3)
        data[:, :6] = motion.velocity(tau_x) / scale + rng.normal(0, 0.02, size=(len(tau_x), 6))
        data[:, 6] = motion.gripper(tau_x)
        tones = rng.uniform(0.5, 5.0, size=SENSOR_CHANNELS - 7)
        data[:, 7:] = 0.5 * np.sin(2 * np.pi * np.outer(tau_x, tones)) + rng.normal(0, 0.05, (len(tau_x), 9))
        stamps = t0 + tau_x
        if sensor_layout == "windows":
            ends = np.arange(SENSOR_WINDOW - 1, len(tau_x), int(SENSOR_HZ / WINDOW_HZ))  # last row of each window
            windows = np.stack([data[e - SENSOR_WINDOW + 1:e + 1] for e in ends])  # (N, 32, 16)
            np.savez(ep_dir / "sensor_data.npz", timestamps=stamps[ends], data=windows)
        elif sensor_layout == "compressed":
            np.savez_compressed(ep_dir / "sensor_data.npz", timestamps=stamps, data=data)
        else:
            np.savez(ep_dir / "sensor_data.npz", timestamps=stamps, data=data)
    return n_frames


def make_demo_dataset(out_dir, episodes_per_source: tuple[int, int] = (4, 3), seed: int = 0,
                      overwrite: bool = False) -> Path:
    """Write the demo dataset (layout in the module docstring) and return its path.

    ``episodes_per_source`` gives the episode count of each source in ``SOURCES`` order.
    An existing non-empty ``out_dir`` is an error, unless ``overwrite`` is set and it is a
    previous demo (holds the marker file); anything else is never deleted.
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise DatasetError(f"{out}: directory exists and is not empty "
                               f"(use a new directory, or --overwrite to replace a previous demo)")
        if not (out / MARKER).exists():
            raise DatasetError(f"{out}: not a demo dataset (no {MARKER}); refusing to delete it")
        shutil.rmtree(out)
    if len(episodes_per_source) != len(SOURCES) or min(episodes_per_source) < 1:
        raise ValueError(f"episodes_per_source needs {len(SOURCES)} counts >= 1, got {episodes_per_source}")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("generated by vla_ds.data.demo.make_demo_dataset\n")

    layouts = ("raw", "compressed", "windows")
    counter = 0
    for source, ((folder, instruction, _, with_sensor), n_eps) in enumerate(zip(SOURCES, episodes_per_source)):
        directions = motion_directions(seed, source)
        for j in range(n_eps):
            rng = np.random.default_rng([seed, counter])
            meta = {}
            if instruction is not None:
                meta = {"instruction": instruction, "camera_views": ["front", "wrist"],
                        "action": {"type": "delta_pose", "hz": FRAME_HZ}}
            if j % 3 == 1:
                meta["confidence"] = 0.8
            n = _write_episode(out / folder / f"episode_{j:03d}", rng, T0 + 100.0 * counter, with_sensor,
                               layouts[j % len(layouts)], meta, ".png" if j % 2 else ".jpg",
                               directions[j % MOTIONS_PER_SOURCE])
            logger.debug("wrote %s/episode_%03d: %d frames", folder, j, n)
            counter += 1

    lines = ["sources:"] + [f"  - {{path: {folder}, weight: {weight}}}" for folder, _, weight, _ in SOURCES]
    (out / "mixture.yaml").write_text("\n".join(lines) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python scripts/make_demo_dataset.py OUT_DIR [--episodes N] [--seed S] [--overwrite]``."""
    parser = argparse.ArgumentParser(description="Write the synthetic demo dataset (SPEC section 3 format).")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--episodes", type=int, default=None,
                        help="episodes per source (default: 4 with sensor data, 3 without)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace a previous demo dataset in OUT_DIR")
    args = parser.parse_args(argv)
    per_source = (4, 3) if args.episodes is None else (args.episodes,) * len(SOURCES)
    try:
        out = make_demo_dataset(args.out_dir, per_source, seed=args.seed, overwrite=args.overwrite)
        ds = VLADataset.from_config(DataConfig(dataset_dir=str(out), sensor_window_size=SENSOR_WINDOW))
    except (VLAError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {args.out_dir}: cannot write the demo dataset ({e.strerror or e})", file=sys.stderr)
        return 2
    print(f"wrote demo dataset to {out}")
    print(ds.describe())
    print(f"train with: --dataset_dir {out} --sensor-window-size {SENSOR_WINDOW}")
    return 0
