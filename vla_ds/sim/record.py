"""Demonstrations from Meta-World's scripted experts, written as a LeRobot v3.0 dataset
(``vla-record-sim``).

For each task the expert runs from seeds ``seed, seed+1, ...`` until ``episodes`` of its
episodes succeeded (at most ``max_attempts`` x that many tries); each successful episode is
saved, a failed one dropped and counted. Frames are :func:`vla_ds.sim.metaworld.lerobot_frame`
of the observation the action was chosen from, with that action, the step's reward and
success (``next.reward``, ``next.success``), the MT50 ``task_id`` and the task's
description as its task: ``lerobot/metaworld_mt50``'s features, the camera as a video (and
any further camera, ``--cameras``, as ``observation.images.<camera>``). The
recording stops at the first success, as LeRobot's environment does. Evaluation seeds start
at 1000; recordings must stay below them (held-out seeds).

``meta/vla_ds_recording.json`` says how the data was made (tasks, seeds of the saved and
dropped episodes, image size, codec, versions) next to LeRobot's own metadata.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

import vla_ds
from vla_ds.errors import ConfigError
from vla_ds.sim.evaluate import RolloutObserver, check_settings, run_episodes

logger = logging.getLogger(__name__)

RECORDING_FILE = "meta/vla_ds_recording.json"


class _Recorder(RolloutObserver):
    """Buffers every environment's episode; after each batch of environments, the successful
    ones go to the writer in seed order (so what is saved does not depend on --n-envs)."""

    def __init__(self, writer, task: str, wanted: int):
        from vla_ds.sim.metaworld import TASK_DESCRIPTIONS, TASK_NAME_TO_ID

        self.writer, self.wanted = writer, wanted
        self.description, self.task_id = TASK_DESCRIPTIONS[task], TASK_NAME_TO_ID[task]
        self.buffers: dict[int, list[dict]] = {}
        self.finished: list[tuple[int, bool, list[dict]]] = []  # (seed, success, frames) of this batch
        self.saved: list[int] = []
        self.dropped: list[int] = []

    def begin(self, env, task, seed, episode):
        self.buffers[env] = []

    def wants_images(self, env):
        return True

    def step(self, env, frame, action, result, chunk, step, totals):
        self.buffers[env].append({**frame, "action": np.asarray(action, dtype=np.float32),
                                  "next.reward": np.float32(result.reward), "next.success": bool(result.success),
                                  "task_id": np.int16(self.task_id), "task": self.description})

    def end(self, env, episode, last_images, chunk):
        self.finished.append((episode.seed, episode.success, self.buffers.pop(env)))

    def flush(self) -> None:
        """Save the batch's successful episodes, lowest seed first, up to the number wanted."""
        for seed, success, frames in sorted(self.finished, key=lambda f: f[0]):
            if not success:
                self.dropped.append(seed)
            elif len(self.saved) < self.wanted:
                for frame in frames:
                    self.writer.add_frame(frame)
                self.writer.save_episode()
                self.saved.append(seed)
        self.finished = []


def record_demos(tasks: list[str], output: str | Path, *, episodes: int, seed: int = 0, n_envs: int = 1,
                 image_size: int = 480, rendering: str = "lerobot", codec: str = "h264", max_steps: int = 500, max_attempts: int = 3,
                 cameras: str | tuple[str, ...] = "corner2", progress: bool = True) -> dict[str, Any]:
    """Record ``episodes`` successful expert episodes per task into a new dataset at ``output``
    (module docstring), filmed by ``cameras`` (corner2 first); returns the summary also written
    to meta/vla_ds_recording.json."""
    from tqdm import tqdm

    from vla_ds.data.lerobot_writer import LeRobotDatasetWriter
    from vla_ds.sim import metaworld
    from vla_ds.sim.envs import EnvPool
    from vla_ds.sim.policies import ExpertPolicy

    check_settings(episodes=episodes, n_envs=n_envs, image_size=image_size, max_steps=max_steps, seed=seed,
                   max_attempts=max_attempts)
    cameras = metaworld.parse_cameras(cameras)
    last_seed = seed + max_attempts * episodes - 1
    if last_seed >= metaworld.EVAL_START_SEED:
        raise ConfigError(f"recording seeds {seed}..{last_seed} (--seed, --episodes x --max-attempts) reach the "
                          f"evaluation seeds, which start at {metaworld.EVAL_START_SEED}: keep them below so that "
                          "evaluation episodes are never training episodes")
    writer = LeRobotDatasetWriter.create(output, fps=metaworld.FPS, features=metaworld.dataset_features(image_size, cameras=cameras),
                                         robot_type=metaworld.ROBOT_TYPE, video_codec=codec)
    expert = ExpertPolicy()
    summary: dict[str, Any] = {"format": "vla_ds-recording", "vla_ds_version": vla_ds.__version__, "env": "metaworld",
                               "policy": "scripted expert (metaworld.policies)", "image_size": image_size,
                               "rendering": rendering, "camera": metaworld.CAMERA, "cameras": list(cameras), "codec": codec, "max_steps": max_steps,
                               "reset_frame": metaworld.RESET_FRAME, "tasks": {}}
    started = time.monotonic()
    bar = tqdm(total=len(tasks) * episodes, desc="record", unit="episode", disable=not progress, dynamic_ncols=True)
    try:
        for task in tasks:
            recorder = _Recorder(writer, task, episodes)
            next_seed, steps = seed, 0
            task_started = time.monotonic()
            with EnvPool(task, min(n_envs, episodes), image_size, rendering, cameras=cameras) as pool:
                expert.begin_task(task, metaworld.TASK_DESCRIPTIONS[task], pool.n)
                while len(recorder.saved) < episodes and next_seed < seed + max_attempts * episodes:
                    batch = list(range(next_seed, min(next_seed + pool.n, seed + max_attempts * episodes)))
                    next_seed += len(batch)
                    before = len(recorder.saved)
                    _, n = run_episodes(pool, expert, task, task, batch, max_steps, [recorder])
                    recorder.flush()
                    steps += n
                    bar.update(len(recorder.saved) - before)
            if len(recorder.saved) < episodes:
                raise ConfigError(f"{task}: the scripted expert succeeded in {len(recorder.saved)} of "
                                  f"{next_seed - seed} tries, fewer than the {episodes} episodes asked for "
                                  f"(--max-attempts {max_attempts})")
            seconds = time.monotonic() - task_started
            summary["tasks"][task] = {"description": metaworld.TASK_DESCRIPTIONS[task], "saved_seeds": recorder.saved,
                                      "failed_seeds": recorder.dropped, "env_steps": steps,
                                      "seconds": round(seconds, 2)}
            logger.info("%s: %d episodes saved, %d expert failures dropped, %.0f steps/s", task,
                        len(recorder.saved), len(recorder.dropped), steps / max(seconds, 1e-9))
    finally:
        bar.close()
        writer.finalize()
    summary.update({"episodes": writer.num_episodes, "frames": writer.num_frames,
                    "seconds": round(time.monotonic() - started, 2), "versions": _versions()})
    (Path(output) / RECORDING_FILE).write_text(json.dumps(summary, indent=2))
    return summary


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for package in ("metaworld", "mujoco", "gymnasium", "av"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return out
