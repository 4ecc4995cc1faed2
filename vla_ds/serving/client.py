"""The robot side: a client for the policy server, and one action per control tick.

:class:`PolicyClient` speaks the same wire format as ``openpi_client.WebsocketClientPolicy``
(either can drive a vla_ds server), without its ``numpy<2`` pin. :class:`ActionChunker`
turns chunks into one action per tick and asks for the next chunk early enough that the
robot does not stop for the round trip::

    from vla_ds.serving.client import ActionChunker, PolicyClient

    with PolicyClient("127.0.0.1", 8000) as client:
        chunker = ActionChunker(client, prefetch=3)
        while robot.running():
            robot.apply(chunker.act({"images": {"front": robot.camera()}, "prompt": "pick up the cup"}))
            robot.wait_for_next_tick()
"""

from __future__ import annotations

import concurrent.futures
import time
from typing import Any

import numpy as np
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from vla_ds.serving import wire


class PolicyServerError(RuntimeError):
    """The server refused a request or failed on it; the message is the server's."""


class ConnectionRefusedByServer(PolicyServerError):
    """The server answered the connection with an HTTP error instead of a websocket: 401 for
    a missing or wrong API key, 503 when it has ``--max-connections`` clients already.
    ``status_code`` is the HTTP status; the message ends with the server's reason."""

    def __init__(self, uri: str, status_code: int, reason: str):
        super().__init__(f"{uri} refused the connection: HTTP {status_code}" + (f": {reason}" if reason else ""))
        self.status_code = status_code


class PolicyClient:
    """A connection to a policy server.

    Args:
        host: host name or address, or a full ``ws://host:port`` URI.
        port: the server's port (omit when ``host`` is a URI that has it).
        api_key: sent as ``Authorization: Api-Key <key>`` when the server needs one.
        connect_timeout_s: how long to retry while the server is still starting.

    Raises :class:`ConnectionRefusedByServer` when the server turns the connection away
    (a missing or wrong API key, too many clients), with the server's reason.
    """

    def __init__(self, host: str = "127.0.0.1", port: int | None = 8000, api_key: str | None = None,
                 connect_timeout_s: float = 30.0):
        self.uri = host if host.startswith(("ws://", "wss://")) else f"ws://{host}"
        if port is not None:
            self.uri += f":{port}"
        self._headers = {"Authorization": f"Api-Key {api_key}"} if api_key else None
        self._connect_timeout_s = connect_timeout_s
        self._ws = None
        self._connect()

    def _connect(self) -> None:
        deadline = time.monotonic() + self._connect_timeout_s
        while True:
            try:
                self._ws = connect(self.uri, compression=None, max_size=None, additional_headers=self._headers)
                break
            except (ConnectionRefusedError, TimeoutError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
            except InvalidStatus as e:  # websockets says only "server rejected WebSocket connection: HTTP 401"
                body = (e.response.body or b"").decode("utf-8", "replace").strip()
                reason = body.splitlines()[0][:200] if body else ""  # another server may send a page
                raise ConnectionRefusedByServer(self.uri, e.response.status_code, reason) from None
        self.metadata: dict[str, Any] = wire.unpackb(self._ws.recv())

    def infer(self, obs: dict[str, Any]) -> dict[str, Any]:
        """Send one observation; returns ``{"actions": (H, D) float32, "policy_timing",
        "server_timing"}`` or raises :class:`PolicyServerError` with the server's message.
        A connection the server closed (a message over its transport limit, a restart)
        raises websockets' ``ConnectionClosed`` here; the next call connects again."""
        if self._ws is None:
            self._connect()
        try:
            self._ws.send(wire.packb(obs))
            reply = self._ws.recv()
        except ConnectionClosed:
            self._ws = None
            raise
        if isinstance(reply, str):
            raise PolicyServerError(reply)
        return wire.unpackb(reply)

    def reset(self) -> None:
        """Nothing to reset: the server keeps no per-client state (openpi's policy interface)."""

    def close(self) -> None:
        if self._ws is not None:
            self._ws.close()

    def __enter__(self) -> PolicyClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ActionChunker:
    """One action per control tick from the chunks a policy predicts.

    A chunk predicted from the observation of tick ``t0`` holds the actions for ticks
    ``t0 .. t0+H-1``; the first ``execute`` of them are used (default all H). With
    ``prefetch`` = k > 0 the observation of the tick k ticks before the chunk runs out is
    sent in the background, and the new chunk is entered at the action for the tick it is
    needed at (index k), so the robot keeps moving during the round trip as long as that
    takes less than k ticks (otherwise :meth:`act` waits for it). ``prefetch=0`` asks
    for the next chunk only when the current one is used up, and waits for it.

    ``policy`` is anything with ``infer(obs) -> {"actions": (H, D), ...}``: a
    :class:`PolicyClient` or an ``openpi_client`` policy.
    """

    def __init__(self, policy, execute: int | None = None, prefetch: int = 0):
        horizon = getattr(policy, "metadata", {}).get("action_horizon")
        if execute is not None and (execute < 1 or (horizon and execute > horizon)):
            raise ValueError(f"execute must be in 1..{horizon or 'H'} (the chunk length), got {execute}")
        if prefetch < 0 or (execute is not None and prefetch >= execute):
            raise ValueError(f"prefetch must be in 0..execute-1, got {prefetch} (execute {execute})")
        self.policy = policy
        self.execute = execute
        self.prefetch = prefetch
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="vla-chunker")
        self._next: tuple[concurrent.futures.Future, int] | None = None  # prefetch in flight, its tick
        self.reset()

    def reset(self) -> None:
        """Forget the current chunk (a new episode): the next :meth:`act` asks for a new one."""
        if self._next is not None:  # let a request in flight finish: the connection takes one at a time
            concurrent.futures.wait([self._next[0]])
        self._tick = 0
        self._chunk: np.ndarray | None = None
        self._chunk_tick = 0
        self._next = None
        self._last: tuple[np.ndarray, int] | None = None
        self.requests = 0  # sent since the last reset, a prefetch in flight included

    def _request(self, obs: dict[str, Any]) -> np.ndarray:
        return np.asarray(self.policy.infer(obs)["actions"])

    def needs_observation(self) -> bool:
        """Whether the next :meth:`act` sends its observation to the policy (a new chunk now,
        or a prefetch); on the other ticks ``act`` does not read it, so a robot (or a
        simulator) may skip capturing and encoding its cameras there."""
        if self._chunk is None:
            return True
        execute = self.execute or len(self._chunk)
        index = self._tick - self._chunk_tick
        if index >= execute:
            if self._next is None:
                return True
            index = self._tick - self._next[1]  # the prefetched chunk takes over
            prefetching = False
        else:
            prefetching = self._next is not None
        return bool(self.prefetch) and not prefetching and index >= execute - self.prefetch

    def act(self, obs: dict[str, Any]) -> np.ndarray:
        """The (D,) action for this tick, given this tick's observation."""
        if self._chunk is None:
            self.requests += 1
            self._chunk, self._chunk_tick = self._request(obs), self._tick
        execute = self.execute or len(self._chunk)
        if self.prefetch >= execute:
            raise ValueError(f"prefetch {self.prefetch} must be less than the {execute} actions used per chunk")
        index = self._tick - self._chunk_tick
        if index >= execute:  # used up: the prefetched chunk, or a new one now
            if self._next is not None:
                future, tick = self._next
                self._next = None
                self._chunk, self._chunk_tick = future.result(), tick
            else:
                self.requests += 1
                self._chunk, self._chunk_tick = self._request(obs), self._tick
            index = self._tick - self._chunk_tick
        if self.prefetch and self._next is None and index >= execute - self.prefetch:
            self.requests += 1
            self._next = (self._pool.submit(self._request, obs), self._tick)
        self._tick += 1
        self._last = (self._chunk, index)
        return self._chunk[index]

    @property
    def current_chunk(self) -> tuple[np.ndarray, int] | None:
        """The chunk the last :meth:`act` took its action from and that action's index in it
        (None before the first act of an episode)."""
        return self._last

    def close(self) -> None:
        """Wait for a request in flight and stop the background thread (not the policy's connection)."""
        self.reset()
        self._pool.shutdown()

    def __enter__(self) -> ActionChunker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
