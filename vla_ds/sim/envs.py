"""Simulated environments in worker processes, one environment per process.

MuJoCo renderers sharing a process have been seen to corrupt each other's images, and a
process that renders must not be the one that runs the policy's threads, so every
environment lives in its own spawned worker. :class:`EnvPool` steps n of them in lockstep:
the commands go out to every worker first, then the answers are collected, so n workers
step (and render) in parallel. Images are rendered only when asked for: a policy that reads
them once per chunk, or one that reads only the state, does not pay a render per step.
"""

from __future__ import annotations

import multiprocessing
import os
import traceback
from dataclasses import dataclass

import numpy as np

from vla_ds.errors import VLAError
from vla_ds.sim.metaworld import CAMERA


class SimError(VLAError):
    """The simulator could not be started or failed; the message says what to fix."""


HEADLESS_HINT = ("headless rendering needs EGL (Debian: apt-get install libegl1 libgl1-mesa-dri libegl-mesa0; "
                 "MUJOCO_GL=egl, the default) or OSMesa (apt-get install libosmesa6; MUJOCO_GL=osmesa)")


@dataclass
class StepResult:
    """One environment step: the raw observation after it, its reward, whether the task
    is solved now, whether the time limit ended the episode, and the render if asked for."""

    obs: np.ndarray          # (39,) float64
    reward: float
    success: bool
    truncated: bool
    images: dict[str, np.ndarray] | None  # each camera's uint8 (S, S, 3), by its dataset key


def _worker(conn, env_name: str, task: str, image_size: int, rendering: str, cameras: tuple[str, ...]) -> None:
    """A worker's loop: ("reset", seed, render) -> (obs, images); ("step", action, render) ->
    StepResult; ("close",) ends it. Any failure is sent back as ("error", text)."""
    env = None
    try:
        from vla_ds.sim.metaworld import MetaWorldEnv

        env = MetaWorldEnv(task, image_size=image_size, cameras=cameras, rendering=rendering)
        conn.send(("ready", env.max_episode_steps))
        while True:
            command = conn.recv()
            if command[0] == "close":
                break
            if command[0] == "reset":
                obs = env.reset(command[1])
                conn.send(("ok", (obs, env.render() if command[2] else None)))
            elif command[0] == "step":
                obs, reward, success, truncated = env.step(command[1])
                conn.send(("ok", StepResult(obs, reward, success, truncated, env.render() if command[2] else None)))
            elif command[0] == "render":
                conn.send(("ok", env.render()))
    except (EOFError, KeyboardInterrupt, BrokenPipeError):
        pass
    except BaseException as e:  # reported to the parent, which raises it with this text
        text = f"{type(e).__name__}: {e}"
        if any(s in text for s in ("EGL", "OSMesa", "GLFW", "OpenGL", "gladLoadGL", "mujoco.FatalError")):
            text += f" ({HEADLESS_HINT})"
        elif isinstance(e, AssertionError) and "rgb_array" in text:  # gymnasium and Meta-World disagree
            text += (" (this gymnasium's MuJoCo environments refuse Meta-World's render modes: install a gymnasium "
                     "your Meta-World supports; vla_ds is tested with metaworld 3.1.1 and gymnasium 1.4.0)")
        try:
            conn.send(("error", text, traceback.format_exc()))
        except (BrokenPipeError, OSError):
            pass
    finally:
        if env is not None:
            try:
                env.close()  # frees the GL context now, not in a destructor at interpreter exit
            except Exception:
                pass
        conn.close()


class EnvPool:
    """``n`` environments of one task, each in its own process (spawned, so none inherits
    the parent's threads or GL state).

    ``reset(seeds)`` resets the first ``len(seeds)`` environments; ``step({i: action})``
    steps the named ones; both render the environments listed in ``render``: each of
    ``cameras`` (default LeRobot's corner2 alone), as {dataset key: image}.
    """

    def __init__(self, task: str, n: int, image_size: int, rendering: str = "lerobot", env_name: str = "metaworld",
                 cameras: tuple[str, ...] = (CAMERA,)):
        if env_name != "metaworld":
            raise SimError(f"unknown environment {env_name!r}; vla_ds simulates 'metaworld'")
        import importlib.util

        if importlib.util.find_spec("metaworld") is None:
            raise SimError("Meta-World is not installed: pip install -e \".[sim]\" (metaworld, gymnasium, mujoco)")
        ctx = multiprocessing.get_context("spawn")
        self.task = task
        self.n = n
        self._conns, self._procs = [], []
        os.environ.setdefault("MUJOCO_GL", "egl")  # inherited by the workers
        try:
            for _ in range(n):
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_worker, args=(child, env_name, task, image_size, rendering, tuple(cameras)),
                                   daemon=True)
                proc.start()
                child.close()
                self._conns.append(parent)
                self._procs.append(proc)
            self.max_episode_steps = [self._receive(i, "starting") for i in range(n)][0]
        except BaseException:
            self.close()
            raise

    def _receive(self, i: int, doing: str):
        try:
            reply = self._conns[i].recv()
        except (EOFError, ConnectionResetError):
            code = self._procs[i].exitcode
            raise SimError(f"the {self.task} environment process {i} died while {doing} "
                           f"(exit code {code}); {HEADLESS_HINT}") from None
        if reply[0] == "error":
            raise SimError(f"the {self.task} environment failed while {doing}: {reply[1]}")
        return reply[1]

    def _send(self, i: int, command: tuple) -> None:
        try:
            self._conns[i].send(command)
        except (BrokenPipeError, ConnectionResetError, EOFError):
            raise SimError(f"the {self.task} environment process {i} is gone (exit code {self._procs[i].exitcode})") \
                from None

    def reset(self, seeds: list[int | None], render: set[int] | frozenset = frozenset()) -> list:
        """Reset environments 0..len(seeds)-1; returns [(obs, {key: image} or None), ...]."""
        for i, seed in enumerate(seeds):
            self._send(i, ("reset", seed, i in render))
        return [self._receive(i, f"resetting with seed {seed}") for i, seed in enumerate(seeds)]

    def step(self, actions: dict[int, np.ndarray], render: set[int] | frozenset = frozenset()) -> dict[int, StepResult]:
        for i, action in actions.items():
            self._send(i, ("step", np.asarray(action, dtype=np.float32), i in render))
        return {i: self._receive(i, "stepping") for i in actions}

    def render(self, ids) -> dict[int, dict[str, np.ndarray]]:
        for i in ids:
            self._send(i, ("render",))
        return {i: self._receive(i, "rendering") for i in ids}

    def close(self) -> None:
        """Stop every worker: asked to, and its pipe closed so that one still sending an
        answer nobody reads (after another worker failed) stops at once too."""
        for conn in self._conns:
            try:
                conn.send(("close",))
            except (BrokenPipeError, ConnectionResetError, OSError):
                pass
        for conn in self._conns:
            conn.close()
        for proc in self._procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()
        self._conns, self._procs = [], []

    def __enter__(self) -> EnvPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
