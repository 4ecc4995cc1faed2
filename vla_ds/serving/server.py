"""A websocket policy server that speaks openpi's protocol (docs/serving.md).

On connect the server sends its metadata (one msgpack map); then each binary message from
the client is one observation (:mod:`vla_ds.serving.spec`) and is answered with one
msgpack map ``{"actions": float32 (H, D), "policy_timing": {...}, "server_timing": {...}}``.
A request the server refuses is answered with a text frame holding one line that names the
key and the problem (openpi's clients raise it as an error); the connection stays open
and every other client is unaffected. ``GET /healthz`` answers 200 while the policy is
loaded. Nothing received is ever unpickled (:mod:`vla_ds.serving.wire`).

Batching: a request's images go through the image processor as soon as it arrives (a few
threads, beside the model), then it is queued, and a single worker thread runs the model.
Whatever has queued while the model was busy (up to ``max_batch_size``) goes into the next
forward pass together, so N robots on one GPU cost one pass, not N in a row. ``batch_wait_ms``
additionally holds the first request of a batch up to that long for others to join:
more throughput under load, at most that much extra latency per request. Each request
brings its own starting noise, so a chunk does not depend on what it was batched with.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import hmac
import http
import logging
import os
import secrets
import signal
import threading
import time
from typing import Any

import numpy as np
import torch
import websockets
from websockets.asyncio.server import serve

import vla_ds
from vla_ds.errors import ConfigError
from vla_ds.serving import wire
from vla_ds.serving.spec import IMAGES, BadRequest, ObservationSpec, Request

logger = logging.getLogger(__name__)

HEALTH_PATH = "/healthz"
TRANSPORT_LIMIT_FACTOR = 2  # messages above this x max_message_mb are cut off by the websocket layer
PREP_THREADS = min(4, os.cpu_count() or 1)  # image preprocessing of arriving requests, beside the model


@dataclasses.dataclass
class ServeConfig:
    """How the server listens and batches.

    Fields:
        host: interface to bind; 127.0.0.1 (this machine only) unless told otherwise.
        port: TCP port (0: any free port).
        api_key: when set, a client must send ``Authorization: Api-Key <key>`` (what
            openpi-client's ``api_key`` sends) or is refused with HTTP 401.
        max_batch_size: most requests per forward pass (1: no batching).
        batch_wait_ms: how long the first request of a batch waits for more to join
            (0: batch only what queued while the model was busy; no added latency).
        max_message_mb: a request larger than this is refused with an error (the
            connection stays open); one larger than 2x this is cut off by the websocket
            layer before it is read (close code 1009). A connection buffers at most one
            message beyond the one being answered, so the server holds at most about
            ``max_connections`` x 2 x 2 x this in requests.
        max_connections: more simultaneous clients are refused (HTTP 503).
        ddim_steps: sampling steps (DDIM steps of a diffusion head, Euler steps of a flow
            matching head); default the policy's ``num_inference_steps``.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_batch_size: int = 8
    batch_wait_ms: float = 0.0
    max_message_mb: float = 32.0
    max_connections: int = 32
    ddim_steps: int | None = None

    def __post_init__(self):
        if isinstance(self.max_batch_size, bool) or not isinstance(self.max_batch_size, int) \
                or self.max_batch_size < 1:
            raise ConfigError(f"max_batch_size must be an integer >= 1, got {self.max_batch_size!r}")
        if not self.batch_wait_ms >= 0:
            raise ConfigError(f"batch_wait_ms must be >= 0, got {self.batch_wait_ms!r}")
        if isinstance(self.max_connections, bool) or not isinstance(self.max_connections, int) \
                or self.max_connections < 1:
            raise ConfigError(f"max_connections must be an integer >= 1, got {self.max_connections!r}")
        if not self.max_message_mb > 0:
            raise ConfigError(f"max_message_mb must be > 0, got {self.max_message_mb!r}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in 0..65535, got {self.port!r}")
        if self.api_key is not None and (not self.api_key or not self.api_key.isascii()
                                         or any(c.isspace() for c in self.api_key)):
            raise ConfigError("api_key must be a non-empty ASCII string without spaces")

    @property
    def max_message_bytes(self) -> int:
        return int(self.max_message_mb * 2 ** 20)


def observation_spec(policy, views: list[str] | None = None) -> ObservationSpec:
    """The request layout of a loaded policy: its camera views (``views`` overrides them; a
    policy exported before vla_ds recorded them needs it), training instructions, sensor
    window and action chunk."""
    stats = policy.norm_stats
    recorded = getattr(stats, "camera_views", None)
    if views is None:
        if recorded is None:
            where = getattr(policy, "policy_dir", None) or "the policy"
            raise ConfigError(f"{where}: norm_stats.json does not record the camera views (exported before vla_ds "
                              "recorded them); name them in the order the policy was trained on with "
                              "--views NAME [NAME ...]")
        views = list(recorded)
    elif recorded is not None and len(views) != len(recorded):
        raise ConfigError(f"--views names {len(views)} view(s), but the policy was trained on {len(recorded)} "
                          f"({', '.join(recorded)})")
    if len(set(views)) != len(views) or not all(isinstance(v, str) and v for v in views):
        raise ConfigError(f"camera view names must be distinct non-empty strings, got {views!r}")
    sensor, expert = policy.sensor_encoder.config, policy.action_expert.config
    return ObservationSpec(views=list(views), instructions=list(getattr(stats, "instructions", None) or []),
                           window_size=sensor.window_size, channels=sensor.in_channels, horizon=expert.horizon,
                           action_dim=expert.action_dim, transform=policy.sensor_transform)


def server_metadata(policy, spec: ObservationSpec, config: ServeConfig, steps: int) -> dict[str, Any]:
    """What a client is sent on connect: the request layout, the reply's chunk, the sampler,
    and which policy this is."""
    stored = policy.policy_config or {}
    backbone = stored.get("backbone", {})
    stats = policy.norm_stats
    expert = policy.action_expert.config
    return {
        "server": "vla_ds",
        "vla_ds_version": vla_ds.__version__,
        "camera_views": spec.views,
        "instruction": spec.instruction,
        "instructions": spec.instructions,
        "sensor_window_size": spec.window_size,
        "sensor_channels": spec.channels,
        "state": spec.transform.describe(spec.window_size) if spec.transform is not None else None,
        "action_horizon": spec.horizon,
        "action_dim": spec.action_dim,
        "action_names": list(getattr(stats, "action_names", None) or [f"a{d}" for d in range(spec.action_dim)]),
        "action_units": list(getattr(stats, "action_units", None) or [""] * spec.action_dim),
        "ddim_steps": steps,
        "sampler": expert.sampler_description(steps),
        "observation": spec.describe(),
        "lerobot": lerobot_mapping(stored) if spec.transform is None else None,
        "policy": {
            "stage": stored.get("stage"),
            "step": stored.get("step"),
            "weights": stored.get("weights"),
            "finetune": stored.get("finetune", {}).get("mode"),
            "objective": expert.objective,
            "vl_conditioning": expert.vl_conditioning,
            "vl_grid": expert.vl_grid_size,
            "vl_normalize": expert.vl_normalize,
            "backbone": backbone.get("model_name_or_path"),
            "backbone_fingerprint": backbone.get("fingerprint"),
        },
        "max_batch_size": config.max_batch_size,
        "batch_wait_ms": config.batch_wait_ms,
        "max_message_bytes": config.max_message_bytes,
    }


# The data.lerobot settings that say how a LeRobot frame becomes a request's sensor window.
LEROBOT_MAPPING_KEYS = ("sensor_features", "sensor_angles", "sensor_angle_encoding", "angle_unit")


def lerobot_mapping(policy_config: dict[str, Any]) -> dict[str, Any] | None:
    """How an older policy's training data made its sensor stream from LeRobot features (its
    ``data.lerobot`` settings), so that a client holding LeRobot frames builds the window
    itself; None when config.json has none. Policies that record their
    :class:`~vla_ds.data.observation.SensorTransform` take the raw ``"state"`` instead and
    send ``"state"`` metadata, not this."""
    data = policy_config.get("data")
    section = data.get("lerobot") if isinstance(data, dict) else None
    if not isinstance(section, dict):
        return None
    return {k: section[k] for k in LEROBOT_MAPPING_KEYS if k in section}


@dataclasses.dataclass(eq=False)  # hashed by identity: kept in a set while it waits
class _Pending:
    request: Request
    future: asyncio.Future  # -> ((H, D) chunk, _Forward)
    received: float  # time.monotonic() when the message arrived


@dataclasses.dataclass
class _Forward:
    """The forward pass a request was in."""

    started: float  # time.monotonic()
    infer_ms: float
    batch_size: int


class PolicyServer:
    """Serves one loaded :class:`~vla_ds.models.policy.VLAPolicy`.

    ``serve_forever()`` blocks (the command line); ``running()`` serves from a background
    thread for the ``with`` block and yields the bound port (tests, benchmarks, notebooks).
    ``counters`` tallies requests, refused requests and forward passes.
    """

    def __init__(self, policy, config: ServeConfig | None = None, views: list[str] | None = None):
        self.policy = policy
        self.config = config or ServeConfig()
        self.steps = policy.action_expert.config.check_inference_steps(self.config.ddim_steps)
        self.spec = observation_spec(policy, views)
        self.metadata = server_metadata(policy, self.spec, self.config, self.steps)
        self.counters = {"connections": 0, "requests": 0, "bad_requests": 0, "failed": 0, "batches": 0}
        # Starting noise of requests without a seed: unpredictable across server starts.
        self._generator = torch.Generator().manual_seed(secrets.randbits(63))
        self._open = 0  # connections now
        self._waiting: set[_Pending] = set()  # queued or in the model: failed, not forgotten, at stop
        self._batcher: asyncio.Task | None = None
        self._prep: concurrent.futures.ThreadPoolExecutor | None = None
        self._queue: asyncio.Queue[_Pending] | None = None
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.port: int | None = None

    # -- running ------------------------------------------------------------------------

    def serve_forever(self) -> None:
        """Serve until SIGINT (Ctrl-C) or SIGTERM, then stop cleanly (waiting requests are answered)."""
        asyncio.run(self.serve(handle_signals=True))

    async def serve(self, ready: threading.Event | None = None, handle_signals: bool = False) -> None:
        """Serve until :meth:`stop` (or cancellation, or with ``handle_signals`` SIGINT/SIGTERM);
        sets ``self.port`` and ``ready`` once listening."""
        self._loop = asyncio.get_running_loop()
        self._queue, self._stop = asyncio.Queue(), asyncio.Event()
        if handle_signals:  # also when the process was started with SIGINT ignored (a background job)
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._loop.add_signal_handler(sig, self._stop.set)
        executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="vla-serve-model")
        self._prep = concurrent.futures.ThreadPoolExecutor(PREP_THREADS, thread_name_prefix="vla-serve-prep")
        # max_queue=1: a client has one request in flight; the websocket layer stops reading
        # from a connection that sends more, instead of buffering up to 16 messages.
        async with serve(self._handle, self.config.host, self.config.port, process_request=self._process_request,
                         max_size=TRANSPORT_LIMIT_FACTOR * self.config.max_message_bytes, max_queue=1,
                         compression=None) as server:
            self.port = server.sockets[0].getsockname()[1]
            logger.info("serving %s on ws://%s:%d (%s; batches of up to %d, wait %g ms)%s",
                        getattr(self.policy, "policy_dir", None) or "a policy", self.config.host, self.port,
                        self.metadata["sampler"], self.config.max_batch_size, self.config.batch_wait_ms,
                        ", API key required" if self.config.api_key else "")
            self._batcher = asyncio.create_task(self._batch_loop(executor))
            self._batcher.add_done_callback(self._batcher_ended)
            if ready is not None:
                ready.set()
            try:
                await self._stop.wait()
            finally:
                self._batcher.cancel()
                for pending in list(self._waiting):  # their handlers answer and end
                    if not pending.future.done():
                        pending.future.set_exception(_InferenceFailed("the server is stopping"))
                self._waiting.clear()
                server.close()
        executor.shutdown(wait=False, cancel_futures=True)
        self._prep.shutdown(wait=False, cancel_futures=True)

    def _batcher_ended(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:  # a bug: say so and stop, never hang clients
            logger.error("the batching loop failed; stopping the server", exc_info=task.exception())
            self._stop.set()

    def stop(self) -> None:
        """Stop serving (from any thread)."""
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)

    @contextlib.contextmanager
    def running(self):
        """Serve from a background thread for the ``with`` block; yields the bound port."""
        ready, failure = threading.Event(), []

        def run():
            try:
                asyncio.run(self.serve(ready))
            except BaseException as e:  # e.g. the port is taken: re-raised in the caller
                failure.append(e)
                ready.set()

        thread = threading.Thread(target=run, name="vla-serve", daemon=True)
        thread.start()
        ready.wait()
        if failure:
            raise failure[0]
        try:
            yield self.port
        finally:
            self.stop()
            thread.join(timeout=30)
            if thread.is_alive():
                raise RuntimeError("the policy server did not stop within 30 s")

    # -- HTTP: health check and API key -------------------------------------------------

    def _process_request(self, connection, request):
        if request.path == HEALTH_PATH:
            if self._batcher is None or self._batcher.done():
                return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, "not serving\n")
            return connection.respond(http.HTTPStatus.OK, "OK\n")
        if self._open >= self.config.max_connections:
            logger.warning("refused a connection from %s: %d clients already connected (--max-connections)",
                           connection.remote_address, self._open)
            return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE,
                                      f"this server takes at most {self.config.max_connections} clients at once\n")
        key = self.config.api_key
        if key is not None:
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode("utf-8", "replace"), f"Api-Key {key}".encode()):
                logger.warning("refused a connection from %s: missing or wrong API key", connection.remote_address)
                return connection.respond(http.HTTPStatus.UNAUTHORIZED,
                                          "missing or wrong API key (send the header 'Authorization: Api-Key KEY')\n")
        return None

    # -- one connection -----------------------------------------------------------------

    async def _handle(self, ws) -> None:
        peer = ws.remote_address
        self.counters["connections"] += 1
        self._open += 1
        logger.info("client %s connected", peer)
        prev_total_ms = None
        try:
            await ws.send(wire.packb(self.metadata))
            async for message in ws:
                received = time.monotonic()
                self.counters["requests"] += 1
                try:
                    request = self._parse(message)
                    request.views = await self._process_views(request)
                except Exception as e:  # BadRequest, or a check that missed a case: never drop the client
                    if not isinstance(e, BadRequest):
                        logger.exception("unexpected error reading a request from %s", peer)
                        e = BadRequest(f"could not read the request ({type(e).__name__}: {e})")
                    self.counters["bad_requests"] += 1
                    logger.warning("bad request from %s: %s", peer, e)
                    await ws.send(f"bad request: {e}")
                    continue
                pending = _Pending(request, asyncio.get_running_loop().create_future(), received)
                self._waiting.add(pending)
                await self._queue.put(pending)
                try:
                    actions, forward = await pending.future
                except _InferenceFailed as e:
                    await ws.send(f"inference failed: {e}")
                    continue
                finally:
                    self._waiting.discard(pending)
                server_timing = {"infer_ms": (time.monotonic() - received) * 1000,
                                 "queue_ms": (forward.started - received) * 1000}
                if prev_total_ms is not None:
                    server_timing["prev_total_ms"] = prev_total_ms
                await ws.send(wire.packb({"actions": actions, "server_timing": server_timing, "policy_timing": {
                    "infer_ms": forward.infer_ms, "batch_size": forward.batch_size}}))
                prev_total_ms = (time.monotonic() - received) * 1000
        except websockets.ConnectionClosed as e:
            logger.info("client %s: connection closed (%s)", peer, e)
        else:
            logger.info("client %s disconnected", peer)
        finally:
            self._open -= 1

    def _parse(self, message: bytes | str) -> Request:
        if isinstance(message, str):
            raise BadRequest("a request must be a binary msgpack message, got a text frame")
        if len(message) > self.config.max_message_bytes:
            raise BadRequest(f"the message has {len(message)} bytes, more than this server's limit of "
                             f"{self.config.max_message_bytes} (--max-message-mb {self.config.max_message_mb:g})")
        try:
            obs = wire.unpackb(message)
        except wire.WireError as e:
            raise BadRequest(str(e)) from None
        return self.spec.parse(obs, self._generator)

    async def _process_views(self, request: Request) -> tuple:
        """The image processor's output for the request's images, made in the preprocessing
        threads while the model works on earlier requests."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._prep, self.policy.input_builder.process_views, request.images)
        except Exception as e:
            raise BadRequest(f"'{IMAGES}': the image processor failed on them ({type(e).__name__}: {e})") from None

    # -- batching and the model ---------------------------------------------------------

    async def _batch_loop(self, executor: concurrent.futures.Executor) -> None:
        loop = asyncio.get_running_loop()
        wait_s = self.config.batch_wait_ms / 1000
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + wait_s
            while len(batch) < self.config.max_batch_size:
                if not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                await asyncio.sleep(min(remaining, 0.0005))  # (a timed queue.get could drop an item)
            started = time.monotonic()
            results = await loop.run_in_executor(executor, self._predict, [p.request for p in batch])
            self.counters["batches"] += 1
            forward = _Forward(started, (time.monotonic() - started) * 1000, len(batch))
            for pending, result in zip(batch, results):
                if pending.future.done():  # the client went away
                    continue
                if isinstance(result, Exception):
                    self.counters["failed"] += 1
                    pending.future.set_exception(_InferenceFailed(f"{type(result).__name__}: {result}"))
                else:
                    pending.future.set_result((result, forward))

    def _predict(self, requests: list[Request]) -> list[np.ndarray | Exception]:
        """(H, D) float32 chunks of ``requests`` in one forward pass; if that pass fails, each
        request alone, so one request the model cannot take fails only itself."""
        try:
            chunks = self._predict_batch(requests)
            if len(chunks) != len(requests):
                raise RuntimeError(f"the policy returned {len(chunks)} chunks for {len(requests)} requests")
            return list(chunks)
        except Exception as e:
            if len(requests) > 1:
                return [result for request in requests for result in self._predict([request])]
            logger.exception("inference failed")
            return [e]

    def _predict_batch(self, requests: list[Request]) -> np.ndarray:
        return predict_requests(self.policy, self.spec, requests, self.steps)


def predict_requests(policy, spec: ObservationSpec, requests: list[Request], steps: int) -> np.ndarray:
    """(B, H, D) float32 chunks of validated requests in one forward pass: the server's model
    step, and the in-process simulation evaluator's (the same inputs give the same chunks).
    A request's images go through the image processor here unless ``views`` already holds them."""
    for r in requests:
        if r.views is None:
            r.views = policy.input_builder.process_views(r.images)
    has_sensor = [r.sensor is not None for r in requests]
    sensor = None
    if any(has_sensor):
        sensor = np.stack([r.sensor if r.sensor is not None else np.zeros((spec.window_size, spec.channels),
                                                                          np.float32) for r in requests])
    prompts = [r.prompt for r in requests]
    vl_inputs = policy.input_builder.batch_processed([r.views for r in requests], prompts)
    chunks = policy.predict_actions(
        None, prompts, sensor, vl_inputs=vl_inputs, num_inference_steps=steps, has_sensor=has_sensor,
        sensor_pad=[r.sensor_pad for r in requests], initial_noise=torch.stack([r.noise for r in requests]))
    return chunks.astype(np.float32)  # (B, H, D)


class _InferenceFailed(Exception):
    pass
