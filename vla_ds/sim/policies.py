"""What acts in a rollout: a vla_ds policy (in this process, or behind a policy server), the
scripted expert, zero actions or blind replay of recorded actions, behind one small interface.

A rollout ticks every active environment at once. At each tick a policy says which
environments it needs a camera image for (:meth:`RolloutPolicy.needs_image`), is handed
their frames (:func:`vla_ds.sim.metaworld.lerobot_frame`) and returns one action each.

vla_ds policies act through :class:`vla_ds.serving.client.ActionChunker`, the robot side's
own chunk logic, one per environment: a chunk of H actions per request, the first
``execute`` of them used, optionally the next one asked for ``prefetch`` ticks early. A request
is exactly what a robot sends the server (:mod:`vla_ds.serving.spec`): the views, the task's
instruction, the raw sensor features of the last W frames (``"state"``; the policy makes
its window of them, :class:`vla_ds.data.observation.SensorTransform`) and a seed for the
sampler's noise, drawn from
the episode's seed and the request's number. In this process the requests of one tick go
through one forward pass (:func:`vla_ds.serving.server.predict_requests`, the server's own
model step); through a server, each environment has its own connection and the server
batches what arrives together. A chunk depends only on its request (the seed fixes the
noise), up to the float rounding of the batch it was computed in.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
from typing import Any

import numpy as np
import websockets

from vla_ds.errors import ConfigError
from vla_ds.sim.envs import SimError
from vla_ds.sim.metaworld import CAMERA

logger = logging.getLogger(__name__)

EXPERT, ZERO, REPLAY = "expert", "zero", "replay"


def is_baseline(name: str) -> bool:
    """Whether ``name`` (a --policy or --baselines value) names a baseline rather than a policy."""
    return name in (EXPERT, ZERO, REPLAY) or name.startswith(REPLAY + ":")


def request_seed(episode_seed: int, request: int) -> int:
    """The sampler seed of an episode's ``request``-th chunk (0 <= seed < 2**63)."""
    state = np.random.SeedSequence([int(episode_seed) & 0xFFFFFFFF, int(request)]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


class RolloutPolicy:
    """The interface a rollout drives (see the module docstring)."""

    name = "policy"
    cameras: tuple[str, ...] = (CAMERA,)  # the Meta-World cameras it reads (LeRobot's corner2 is rendered always)

    def begin_task(self, task: str, description: str, n_envs: int) -> None:
        """A new task, evaluated in ``n_envs`` environments at once."""

    def begin_episode(self, env: int, seed: int) -> None:
        """Environment ``env`` starts an episode from ``seed``."""

    def needs_image(self, env: int) -> bool:
        """Whether this tick's action of ``env`` reads the camera image."""
        return False

    def act(self, frames: dict[int, dict], raw_obs: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
        """One (D,) action per environment of ``frames`` (each env's frame of this tick)."""
        raise NotImplementedError

    def chunk(self, env: int) -> tuple[np.ndarray, int] | None:
        """The chunk ``env`` is executing and the index of this tick's action in it (videos);
        a policy without chunks executes its last action."""
        last = getattr(self, "_last", {}).get(env)
        return None if last is None else (last[None], 0)

    def close(self) -> None:
        pass


class ZeroPolicy(RolloutPolicy):
    """Zero actions: the arm stays where it is (a baseline every report shows)."""

    name = ZERO

    def act(self, frames, raw_obs):
        self._last = {i: np.zeros(4, dtype=np.float32) for i in frames}
        return self._last


class ExpertPolicy(RolloutPolicy):
    """Meta-World's scripted expert of the task, on the full 39-D observation: the
    evaluator's own check (it should succeed nearly always) and the recorder's demonstrator."""

    name = EXPERT

    def begin_task(self, task, description, n_envs):
        from vla_ds.sim.metaworld import expert_policy

        self.experts = [expert_policy(task) for _ in range(n_envs)]

    def act(self, frames, raw_obs):
        self._last = {i: np.asarray(self.experts[i].get_action(raw_obs[i]), dtype=np.float32) for i in frames}
        return self._last


class ReplayPolicy(RolloutPolicy):
    """Blind replay: the k-th episode of a task executes the actions of the task's k-th
    recorded episode (cycling through them) in order, whatever it observes, then zeros. What a
    policy that memorised the demonstrations' motions without looking would score: the blind
    baseline beside zero actions."""

    def __init__(self, dataset_dir: str):
        from vla_ds.data.lerobot import LeRobotConfig, load_lerobot_episodes

        self.name = f"{REPLAY}:{dataset_dir}"
        self.sequences: dict[str, list[np.ndarray]] = {}
        for episode in load_lerobot_episodes(dataset_dir, LeRobotConfig()):
            self.sequences.setdefault(episode.instruction, []).append(np.asarray(episode.actions, dtype=np.float32))
        self.dataset_dir = dataset_dir

    def begin_task(self, task, description, n_envs):
        if description not in self.sequences:
            raise ConfigError(f"{self.dataset_dir}: no recorded episode of {task} (task {description!r}) to replay")
        self.task_sequences = self.sequences[description]
        self.begun = 0
        self.playing: list[np.ndarray | None] = [None] * n_envs
        self.t = [0] * n_envs

    def begin_episode(self, env, seed):
        self.playing[env] = self.task_sequences[self.begun % len(self.task_sequences)]
        self.begun += 1
        self.t[env] = 0

    def act(self, frames, raw_obs):
        self._last = {}
        for i in frames:
            sequence, t = self.playing[i], self.t[i]
            self._last[i] = sequence[t] if t < len(sequence) else np.zeros(sequence.shape[1], dtype=np.float32)
            self.t[i] += 1
        return self._last


class _Handoff:
    """An openpi-style policy whose ``infer`` hands back chunks computed ahead of time in one
    batched forward pass (one queue per environment: at most one request is outstanding)."""

    def __init__(self, metadata: dict):
        self.metadata = metadata
        self.replies: queue.SimpleQueue = queue.SimpleQueue()

    def infer(self, obs: dict) -> dict:
        return self.replies.get_nowait()


class LocalModel:
    """A loaded :class:`~vla_ds.models.policy.VLAPolicy` answering requests in this process
    through the server's own request checks and model step."""

    def __init__(self, policy, steps: int | None = None):
        import torch

        from vla_ds.serving.server import ServeConfig, observation_spec, server_metadata

        self.policy = policy
        self.steps = policy.action_expert.config.check_inference_steps(steps)
        self.spec = observation_spec(policy)
        self.metadata = server_metadata(policy, self.spec, ServeConfig(max_batch_size=1), self.steps)
        self._generator = torch.Generator().manual_seed(0)  # unused: every request has a seed

    def infer_batch(self, observations: list[dict]) -> list[dict]:
        from vla_ds.serving.server import predict_requests

        requests = [self.spec.parse(obs, self._generator) for obs in observations]
        chunks = predict_requests(self.policy, self.spec, requests, self.steps)
        return [{"actions": chunk} for chunk in chunks]


class ChunkingPolicy(RolloutPolicy):
    """A vla_ds policy, in this process (``model``: :class:`LocalModel`) or behind a policy
    server (``connect``: returns a new :class:`~vla_ds.serving.client.PolicyClient`)."""

    def __init__(self, name: str, model: LocalModel | None = None, connect=None, execute: int | None = None,
                 prefetch: int = 0):
        if (model is None) == (connect is None):
            raise ValueError("ChunkingPolicy needs a local model or a server connection")
        self.name = name
        self.model, self.connect = model, connect
        self.execute, self.prefetch = execute, prefetch
        self.clients: list = []
        self.chunkers: list = []
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.metadata = model.metadata if model is not None else self._client(0).metadata
        self.views = list(self.metadata["camera_views"])
        self.horizon = int(self.metadata["action_horizon"])
        self.cameras = self._cameras()
        if execute is not None and not 1 <= execute <= self.horizon:
            self.close()
            raise ConfigError(f"--execute-steps must be in 1..{self.horizon} (the policy's chunk length), got {execute}")
        if not 0 <= prefetch < (execute or self.horizon):
            self.close()
            raise ConfigError(f"--prefetch must be in 0..{(execute or self.horizon) - 1} (less than the actions "
                              f"executed per chunk), got {prefetch}")

    def _cameras(self) -> tuple[str, ...]:
        """The Meta-World cameras that render the policy's views (corner2 first: videos film it)."""
        from vla_ds.sim import metaworld

        cameras = {v: metaworld.key_camera(v) for v in self.views}
        missing = [v for v, c in cameras.items() if c is None]
        if missing:
            self.close()
            raise ConfigError(f"the policy reads camera view(s) {', '.join(missing)}; Meta-World renders "
                              f"'{metaworld.IMAGE_KEY}' (LeRobot's {metaworld.CAMERA}) and "
                              f"'observation.images.<camera>' for its other cameras "
                              f"({', '.join(metaworld.CAMERA_NAMES[1:])})")
        return tuple(dict.fromkeys([metaworld.CAMERA, *cameras.values()]))

    def _client(self, i: int):
        while len(self.clients) <= i:
            self.clients.append(self.connect())
        return self.clients[i]

    def begin_task(self, task, description, n_envs):
        from vla_ds.data.lerobot import (
            FrameHistory,
            LeRobotConfig,
            component_names,
            sensor_transform,
        )
        from vla_ds.data.observation import unwrap_changed
        from vla_ds.serving.client import ActionChunker
        from vla_ds.sim import metaworld

        known = self.metadata.get("instructions") or []
        if known and description not in known:
            logger.warning("%s: the policy was not trained with the instruction %r (it knows %d, e.g. %r)", task,
                           description, len(known), known[0])
        window = int(self.metadata["sensor_window_size"])
        features = metaworld.dataset_features(metaworld.DEFAULT_IMAGE_SIZE)
        state, mapping = self.metadata.get("state"), self.metadata.get("lerobot")
        self.transform = None  # an older policy's: this client makes the window
        if state:  # the policy makes its window from the raw features: send them
            wanted = state["features"]
            for name, spec in wanted.items():
                have = features.get(name, {}).get("shape")
                if have != [spec["size"]]:
                    raise ConfigError(f"the policy reads the raw feature '{name}' ({spec['size']} values), but "
                                      f"Meta-World's frames have {'no such feature' if have is None else have}")
            keep = list(wanted)
        elif mapping and mapping.get("sensor_features"):  # exported before policies recorded the transform
            config = LeRobotConfig(**mapping)
            if unwrap_changed(mapping):
                logger.warning("the policy was trained before vla_ds recorded its sensor transform, with angles "
                               "unwrapped over whole episodes; its windows are now unwrapped within each window")
            names = {f: component_names(f, features[f]) for f in config.sensor_features}
            self.transform = sensor_transform(config, names, "Meta-World's frames")
            if self.transform.channels != int(self.metadata["sensor_channels"]):
                raise ConfigError(f"the policy's sensor features {config.sensor_features} make "
                                  f"{self.transform.channels} channels from Meta-World's frames, but it takes "
                                  f"{self.metadata['sensor_channels']}")
            keep = list(config.sensor_features)
        else:
            keep = []
            if mapping is None:
                logger.warning("the policy (or its server) does not say how its sensor stream was made from LeRobot "
                               "features: requests carry no sensor data and it uses its no-sensor embedding")
        self.description = description
        self.histories = [FrameHistory(keep, window) for _ in range(n_envs)]
        for chunker in self.chunkers:  # the previous task's
            chunker.close()
        if self.model is not None:
            self.handoffs = [_Handoff(self.metadata) for _ in range(n_envs)]
            targets = self.handoffs
        else:
            targets = [self._client(i) for i in range(n_envs)]
        self.chunkers = [ActionChunker(t, execute=self.execute, prefetch=self.prefetch) for t in targets]
        self.seeds = [0] * n_envs
        if self._pool is None and self.model is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(max(1, n_envs), thread_name_prefix="vla-eval-sim")

    def begin_episode(self, env, seed):
        self.chunkers[env].reset()
        self.histories[env].reset()
        self.seeds[env] = seed

    def needs_image(self, env):
        return self.chunkers[env].needs_observation()

    def _request(self, env: int, frame: dict) -> dict:
        chunker = self.chunkers[env]
        obs: dict[str, Any] = {"images": {v: frame[v] for v in self.views}, "prompt": self.description,
                               "seed": request_seed(self.seeds[env], chunker.requests)}
        state = self.histories[env].state()
        if state is not None and self.transform is None:
            obs["state"] = state
        elif state is not None:
            obs["sensor"], obs["sensor_pad"] = self.transform.window(state, self.histories[env].window_size)
        return obs

    def act(self, frames, raw_obs):
        from vla_ds.serving.spec import BadRequest

        for i, frame in frames.items():
            self.histories[i].append(frame)
        asking = [i for i in frames if self.chunkers[i].needs_observation()]
        requests = {i: self._request(i, frames[i]) for i in asking}
        if self.model is not None:
            if asking:
                try:
                    replies = self.model.infer_batch([requests[i] for i in asking])
                except BadRequest as e:
                    raise SimError(f"the policy refused the evaluator's request: {e}") from None
                for i, reply in zip(asking, replies):
                    self.handoffs[i].replies.put(reply)
            return {i: np.asarray(self.chunkers[i].act(requests.get(i)), dtype=np.float32) for i in frames}
        futures = {i: self._pool.submit(self.chunkers[i].act, requests[i]) for i in asking}  # the server batches
        actions = {i: np.asarray(self.chunkers[i].act(None), dtype=np.float32) for i in frames if i not in futures}
        for i, future in futures.items():
            try:
                actions[i] = np.asarray(future.result(), dtype=np.float32)
            except (RuntimeError, OSError, websockets.exceptions.WebSocketException) as e:  # PolicyServerError too
                raise SimError(f"{self.name}: {type(e).__name__}: {e}") from None
        return actions

    def chunk(self, env):
        return self.chunkers[env].current_chunk

    def close(self):
        for chunker in self.chunkers:
            chunker.close()
        self.chunkers = []
        for client in self.clients:
            client.close()
        self.clients = []
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
