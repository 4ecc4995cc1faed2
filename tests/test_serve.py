"""The websocket policy server (docs/serving.md) on the tiny backbone, with a policy converted
from conftest's Stage 1 run: the real openpi-client (in a venv of its own: it pins numpy<2),
vla_ds's client and action chunker, every kind of bad request, concurrent clients, the
health check, the API key and the command line."""

import json
import os
import pickle
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import venv
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch
import websockets
from websockets.sync.client import connect

from vla_ds.models.policy import VLAPolicy
from vla_ds.policy_tools.convert import main as convert_main
from vla_ds.serving import wire
from vla_ds.serving.cli import main as serve_main
from vla_ds.serving.client import (
    ActionChunker,
    ConnectionRefusedByServer,
    PolicyClient,
    PolicyServerError,
)
from vla_ds.serving.server import TRANSPORT_LIMIT_FACTOR, PolicyServer, ServeConfig

REPO = Path(__file__).resolve().parent.parent
STEPS = 3  # DDIM steps: cheap on CPU, enough to exercise the sampler
LIMIT_MB = 0.25  # the test servers' request limit (images here are ~10 KB)
OPENPI_CLIENT = "openpi-client==0.1.2"


@pytest.fixture(scope="module")
def policy_dir(stage1_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("serve") / "policy"
    assert convert_main([str(stage1_run), str(out), "--to", "policy"]) == 0
    return out


@pytest.fixture(scope="module")
def policy(policy_dir):
    return VLAPolicy.from_pretrained(policy_dir)


@pytest.fixture(scope="module")
def server(policy):
    srv = PolicyServer(policy, ServeConfig(port=0, ddim_steps=STEPS, max_message_mb=LIMIT_MB))
    with srv.running():
        yield srv


def observation(spec, seed: int, prompt: str = "pick up the cup", with_sensor: bool = True, size=(40, 56)):
    rng = np.random.default_rng(seed)
    obs = {"images": {v: rng.integers(0, 256, (*size, 3), dtype=np.uint8) for v in spec.views},
           "prompt": prompt, "seed": seed}
    if with_sensor:
        obs["sensor"] = rng.normal(size=(spec.window_size, spec.channels)).astype(np.float32)
    return obs


def expected_chunk(policy, spec, obs) -> np.ndarray:
    """What predict_actions gives for ``obs`` with the same seed (the server's contract)."""
    return policy.predict_actions([obs["images"][v] for v in spec.views], obs["prompt"], obs.get("sensor"),
                                  num_inference_steps=STEPS, sensor_pad=obs.get("sensor_pad"),
                                  generator=torch.Generator().manual_seed(obs["seed"]))


# ------------------------------------------------------------------ the real openpi client


@pytest.fixture(scope="session")
def openpi_python():
    """A venv with openpi-client (numpy<2 cannot sit beside this project's numpy), made
    once per machine under .cache/ and reused."""
    env_dir = REPO / ".cache" / "openpi-client-venv"
    python = env_dir / "bin" / "python"
    probe = [str(python), "-c", "import openpi_client.websocket_client_policy, openpi_client.action_chunk_broker"]
    if not python.exists() or subprocess.run(probe, capture_output=True).returncode != 0:
        venv.create(env_dir, with_pip=True, clear=True)
        # openpi-client imports typing_extensions without declaring it.
        pip = subprocess.run([str(python), "-m", "pip", "install", "-q", OPENPI_CLIENT, "typing_extensions"],
                             capture_output=True, text=True, timeout=600)
        assert pip.returncode == 0, f"installing {OPENPI_CLIENT} into {env_dir} failed:\n{pip.stderr[-3000:]}"
        assert subprocess.run(probe, capture_output=True).returncode == 0
    return python


def test_openpi_client_reads_metadata_gets_predict_actions_and_steps_a_chunk(openpi_python, server, policy,
                                                                              tmp_path):
    spec = server.spec
    obs = observation(spec, seed=11)
    np.savez(tmp_path / "inputs.npz", prompt=np.array(obs["prompt"]), seed=np.array(obs["seed"]),
             sensor=obs["sensor"], **{f"view_{v}": img for v, img in obs["images"].items()})
    requests_before = server.counters["requests"]
    proc = subprocess.run([str(openpi_python), str(REPO / "tests" / "openpi_client_run.py"), str(server.port),
                           str(tmp_path / "inputs.npz"), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    got = np.load(tmp_path / "out" / "actions.npz")
    assert result["numpy"].startswith("1.")  # the client really ran beside numpy<2

    meta = result["metadata"]
    stats = json.loads((server.policy.policy_dir / "norm_stats.json").read_text())
    config = json.loads((server.policy.policy_dir / "config.json").read_text())
    assert meta["camera_views"] == stats["camera_views"] == spec.views and len(spec.views) == 2
    assert meta["instructions"] == stats["instructions"] and len(meta["instructions"]) == 2
    assert meta["instruction"] is None  # two training instructions: a request must say which
    assert (meta["action_horizon"], meta["action_dim"]) == (8, 7)
    assert meta["action_names"] == stats["action_names"]
    assert (meta["sensor_window_size"], meta["sensor_channels"]) == (32, len(stats["sensor_mean"]))
    assert meta["ddim_steps"] == STEPS
    assert meta["policy"]["backbone_fingerprint"] == config["backbone"]["fingerprint"]
    assert (meta["policy"]["vl_conditioning"], meta["policy"]["vl_grid"], meta["policy"]["vl_normalize"]) == \
        (config["action_expert"]["vl_conditioning"], config["action_expert"]["vl_grid"],
         config["action_expert"]["vl_normalize"])
    assert meta["vla_ds_version"] == config["vla_ds_version"]

    expected = expected_chunk(policy, spec, obs)  # (H, D)
    assert result["actions_dtype"] == "float32" and got["infer"].shape == (8, 7)
    np.testing.assert_allclose(got["infer"], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["again"], expected, rtol=1e-5, atol=1e-5)  # after the bad requests
    assert result["policy_timing"]["infer_ms"] > 0 and result["server_timing"]["infer_ms"] > 0

    assert "'images/" in result["errors"][0] and "uint8" in result["errors"][0]
    assert "'sensor'" in result["errors"][1] and "NaN" in result["errors"][1]
    # ActionChunkBroker: H ticks from one chunk, then a new request (same seed: the same chunk).
    np.testing.assert_allclose(got["broker"][:8], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["broker"][8], expected[0], rtol=1e-5, atol=1e-5)
    assert server.counters["requests"] - requests_before == 1 + 2 + 1 + 2


# ------------------------------------------------------------------ vla_ds's client and the wire


def test_vla_ds_client_matches_predict_actions_with_and_without_sensor(server, policy):
    spec = server.spec
    with PolicyClient("127.0.0.1", server.port) as client:
        assert client.metadata == server.metadata
        for obs in (observation(spec, 1), observation(spec, 2, with_sensor=False),
                    {**observation(spec, 3), "sensor_pad": 5}):
            reply = client.infer(obs)
            assert reply["actions"].dtype == np.float32 and reply["actions"].shape == (8, 7)
            np.testing.assert_allclose(reply["actions"], expected_chunk(policy, spec, obs), rtol=1e-5, atol=1e-5)
        # A sensor window changes the chunk (the encoder is not bypassed); no seed: fresh noise.
        a, b = observation(spec, 4), observation(spec, 4, with_sensor=False)
        assert not np.allclose(client.infer(a)["actions"], client.infer(b)["actions"])
        unseeded = {k: v for k, v in a.items() if k != "seed"}
        assert not np.allclose(client.infer(unseeded)["actions"], client.infer(unseeded)["actions"])
        with pytest.raises(PolicyServerError, match="bad request: missing 'images'"):
            client.infer({"prompt": "pick up the cup"})
        assert client.infer(a)["actions"].shape == (8, 7)


def test_wire_round_trip_and_openpi_layout():
    arrays = {"f": np.arange(6, dtype=np.float32).reshape(2, 3), "u": np.zeros((2, 2, 3), np.uint8),
              "b": np.array([True, False]), "i": np.int64(7), "s": "text", "n": None}
    back = wire.unpackb(wire.packb(arrays))
    for k in ("f", "u", "b"):
        assert back[k].dtype == arrays[k].dtype and np.array_equal(back[k], arrays[k])
    assert back["i"] == 7 and back["i"].dtype == np.int64 and back["s"] == "text" and back["n"] is None
    # openpi-client's msgpack_numpy writes the map keys as bytes; str keys are read too.
    for key in (b"__ndarray__", "__ndarray__"):
        raw = msgpack.packb({"a": {key: True, b"data": np.ones(4, "<f8").tobytes(), b"dtype": "<f8", b"shape": [2, 2]}})
        assert np.array_equal(wire.unpackb(raw)["a"], np.ones((2, 2)))
    with pytest.raises(wire.WireError, match="cannot send"):
        wire.packb({"x": np.array([object()])})


@pytest.mark.parametrize("payload, match", [
    (msgpack.packb({"x": {b"__ndarray__": True, b"data": b"\0" * 8, b"dtype": "|O", b"shape": [1]}}), "not allowed"),
    (msgpack.packb({"x": {b"__ndarray__": True, b"data": b"\0" * 7, b"dtype": "<f4", b"shape": [2]}}), "holds 7 bytes"),
    (msgpack.packb({"x": {b"__ndarray__": True, b"data": b"", b"dtype": "<f4", b"shape": [-1]}}), "shape"),
    (msgpack.packb({"x": msgpack.ExtType(1, b"\x00")}), "extension type 1"),
    (msgpack.packb({"x": {b"__npgeneric__": True, b"data": 300, b"dtype": "|u1"}}), "does not fit"),
    (msgpack.packb({"x": {b"__ndarray__": True, b"data": b"", b"dtype": "(,)f4", b"shape": [0]}}), "unknown array dtype"),
    (pickle.dumps({"images": np.zeros(3)}), "msgpack"),
    (b"\xc1\xff garbage", "msgpack"),
])
def test_wire_refuses_what_is_not_numbers(payload, match):
    with pytest.raises(wire.WireError, match=match):
        wire.unpackb(payload)


# ------------------------------------------------------------------ bad requests


def _bad_requests(spec):
    good = observation(spec, 5)
    view = spec.views[0]
    images = good["images"]
    nan_sensor = good["sensor"].copy()
    nan_sensor[3, 1] = np.nan
    packed = [
        ({k: v for k, v in good.items() if k != "images"}, "missing 'images'"),
        ({**good, "images": {v: i for v, i in images.items() if v != view}}, f"missing view(s) '{view}'"),
        ({**good, "images": {**images, "side": images[view]}}, "unknown view(s) 'side'"),
        ({**good, "images": {**images, view: images[view].astype(np.float32)}}, f"'images/{view}': must be uint8"),
        ({**good, "images": {**images, view: images[view][..., :2]}}, f"'images/{view}': must have shape"),
        ({**good, "images": {**images, view: images[view][0]}}, f"'images/{view}': must have shape"),
        ({**good, "images": {**images, view: "a jpeg"}}, f"'images/{view}': must be a uint8"),
        ({**good, "images": {**images, view: np.zeros((2, 500, 3), np.uint8)}},  # Qwen's resize: aspect <= 200
         "'images': the image processor failed on them (ValueError: absolute aspect ratio"),
        ({**good, "sensor": good["sensor"][:-1]}, "'sensor': must have shape"),
        ({**good, "sensor": good["sensor"].astype(np.int32)}, "'sensor': must be float32"),
        ({**good, "sensor": nan_sensor}, "'sensor': 1 NaN or inf value(s), the first at row 3, channel 1"),
        ({**good, "sensor_pad": spec.window_size + 1}, "'sensor_pad'"),
        ({**good, "prompt": 3}, "'prompt': must be a non-empty string"),
        ({k: v for k, v in good.items() if k != "prompt"}, "missing 'prompt'"),
        ({**good, "seed": -1}, "'seed'"),
        ({**good, "sensor_window": good["sensor"]}, "unknown key(s) 'sensor_window'"),
        ([1, 2, 3], "a request must be a map"),
    ]
    raw = [
        (b"\x93\x01\x02\x03", "a request must be a map"),
        (b"\xde\xad\xbe\xef garbage", "msgpack"),
        (pickle.dumps(good), "msgpack"),  # a pickled request is never unpickled
        (msgpack.packb({"extra": {b"__npgeneric__": True, b"data": 2 ** 64 - 1, b"dtype": "<i8"}}), "does not fit"),
        (msgpack.packb({"x": {b"__ndarray__": True, b"data": b"", b"dtype": "(,)f4", b"shape": [0]}}), "dtype"),
        (wire.packb({**{k: v for k, v in good.items() if k != "images"}, "images": {
            view: {b"__ndarray__": True, b"data": b"\0" * 8, b"dtype": "|O", b"shape": [1]}}}), "not allowed"),
        (b"\x00" * int(LIMIT_MB * 2 ** 20 + 10), "more than this server's limit"),
        ("a text frame", "binary msgpack"),
    ]
    return [(wire.packb(obj), match) for obj, match in packed] + raw


def test_every_bad_request_is_answered_and_the_connection_keeps_serving(server, policy):
    spec = server.spec
    good = observation(spec, 6)
    expected = expected_chunk(policy, spec, good)
    other = PolicyClient("127.0.0.1", server.port)  # another robot, connected throughout
    with connect(f"ws://127.0.0.1:{server.port}", max_size=None) as ws:
        wire.unpackb(ws.recv())  # metadata
        for payload, match in _bad_requests(spec):
            ws.send(payload)
            reply = ws.recv()
            assert isinstance(reply, str) and reply.startswith("bad request: ") and "\n" not in reply, reply
            assert match in reply, (match, reply)
            ws.send(wire.packb(good))  # the same connection still answers a good request
            np.testing.assert_allclose(wire.unpackb(ws.recv())["actions"], expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(other.infer(good)["actions"], expected, rtol=1e-5, atol=1e-5)
    other.close()


def test_a_message_past_the_transport_limit_closes_only_that_connection(server, policy):
    spec = server.spec
    good = observation(spec, 7)
    other = PolicyClient("127.0.0.1", server.port)
    with connect(f"ws://127.0.0.1:{server.port}", max_size=None) as ws:
        wire.unpackb(ws.recv())
        ws.send(b"\x00" * int(TRANSPORT_LIMIT_FACTOR * LIMIT_MB * 2 ** 20 + 1))  # never read whole
        with pytest.raises(websockets.ConnectionClosedError) as closed:
            ws.recv()
        assert closed.value.rcvd.code == 1009  # "message too big"
    with PolicyClient("127.0.0.1", server.port) as again:  # the same robot reconnects
        np.testing.assert_allclose(again.infer(good)["actions"], expected_chunk(policy, spec, good), atol=1e-5)
        # vla_ds's client: the cut-off request raises, the next one connects again by itself.
        huge = {**good, "prompt": "x" * int(TRANSPORT_LIMIT_FACTOR * LIMIT_MB * 2 ** 20 + 1)}
        with pytest.raises(websockets.ConnectionClosedError) as closed:
            again.infer(huge)
        assert closed.value.rcvd.code == 1009
        np.testing.assert_allclose(again.infer(good)["actions"], expected_chunk(policy, spec, good), atol=1e-5)
        assert again.metadata["action_horizon"] == 8
    assert other.infer(good)["actions"].shape == (8, 7)
    other.close()


# ------------------------------------------------------------------ batching


@pytest.mark.parametrize("wait_ms", [0, 100])
def test_concurrent_clients_are_batched_and_each_gets_its_own_chunk(policy, wait_ms):
    """Six robots at once: requests that wait for the model share forward passes (also with
    no batch wait: what queued while the model was busy), and every chunk equals
    predict_actions on that robot's own observation (prompts, image sizes and sensor
    presence differ within a batch)."""
    srv = PolicyServer(policy, ServeConfig(port=0, ddim_steps=STEPS, max_batch_size=4, batch_wait_ms=wait_ms))
    spec = srv.spec
    observations = [observation(spec, 20 + i, prompt=f"task number {i}" + " please" * i, with_sensor=i % 2 == 0,
                                size=(32 + 8 * i, 48)) for i in range(6)]
    replies, failures = [None] * 6, []
    with srv.running() as port:
        clients = [PolicyClient("127.0.0.1", port) for _ in observations]
        barrier = threading.Barrier(len(clients))

        def robot(i):
            try:
                barrier.wait()
                replies[i] = [clients[i].infer(observations[i]) for _ in range(2)]
            except Exception as e:  # reported below, with the robot's number
                failures.append((i, e))

        threads = [threading.Thread(target=robot, args=(i,)) for i in range(len(clients))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        for c in clients:
            c.close()
    assert not failures, failures
    sizes = [r["policy_timing"]["batch_size"] for rs in replies for r in rs]
    assert max(sizes) > 1 and max(sizes) <= 4
    assert srv.counters["batches"] < srv.counters["requests"] == 12
    for obs, rs in zip(observations, replies):
        expected = expected_chunk(policy, spec, obs)
        for r in rs:
            np.testing.assert_allclose(r["actions"], expected, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ robot side: one action per tick


class _TickPolicy:
    """A fake policy whose chunk for the observation of tick t holds actions t, t+1, ...: the
    chunker is right when the action it hands out at tick t is t."""

    metadata = {"action_horizon": 8}

    def __init__(self):
        self.asked = []

    def infer(self, obs):
        self.asked.append(obs["tick"])
        return {"actions": (obs["tick"] + np.arange(8, dtype=np.float32))[:, None].repeat(2, axis=1)}


@pytest.mark.parametrize("execute, prefetch, asked", [
    (None, 0, [0, 8, 16]),
    (5, 0, [0, 5, 10, 15]),
    (None, 3, [0, 5, 10, 15]),   # chunk k+1 asked 3 ticks before chunk k runs out, entered at index 3
    (6, 2, [0, 4, 8, 12, 16]),
    (5, 3, [0, 2, 5, 7, 10, 12, 15, 17]),  # a prefetched chunk starts past the prefetch point: ask at once
])
def test_action_chunker_hands_out_the_action_of_each_tick(execute, prefetch, asked):
    policy = _TickPolicy()
    chunker = ActionChunker(policy, execute=execute, prefetch=prefetch)
    actions, needs = [], []
    for t in range(20):
        if chunker.needs_observation():  # says ahead which ticks send their observation
            needs.append(t)
        actions.append(chunker.act({"tick": t}))
    assert [a.tolist() for a in actions] == [[t, t] for t in range(20)]
    sent = chunker.requests
    chunker.reset()  # waits for a prefetch in flight
    assert policy.asked == asked == needs and sent == len(asked)
    assert chunker.act({"tick": 100}).tolist() == [100, 100] and policy.asked[-1] == 100


def test_action_chunker_reset_waits_for_the_request_in_flight():
    """The connection takes one request at a time: a reset while a prefetch is out must not
    send the next request beside it."""
    busy = threading.Lock()

    class Slow(_TickPolicy):
        def infer(self, obs):
            assert busy.acquire(blocking=False), "two requests at once on one connection"
            try:
                time.sleep(0.2)
                return super().infer(obs)
            finally:
                busy.release()

    policy = Slow()
    with ActionChunker(policy, prefetch=3) as chunker:
        for t in range(6):  # tick 5 sends the prefetch
            chunker.act({"tick": t})
        chunker.reset()
        assert chunker.act({"tick": 50}).tolist() == [50, 50]
    assert policy.asked == [0, 5, 50]


def test_action_chunker_refuses_a_prefetch_it_cannot_keep():
    with pytest.raises(ValueError, match="prefetch"):
        ActionChunker(_TickPolicy(), execute=4, prefetch=4)
    with pytest.raises(ValueError, match="execute"):
        ActionChunker(_TickPolicy(), execute=9)


def test_action_chunker_on_the_server_follows_predict_actions(server, policy):
    spec = server.spec
    obs = observation(spec, 9)
    expected = expected_chunk(policy, spec, obs)
    with PolicyClient("127.0.0.1", server.port) as client:
        chunker = ActionChunker(client, prefetch=2)
        actions = np.stack([chunker.act(obs) for _ in range(8 + 4)])
    np.testing.assert_allclose(actions[:8], expected, atol=1e-5)
    np.testing.assert_allclose(actions[8:], expected[2:6], atol=1e-5)  # the prefetched chunk, entered at index 2
    assert chunker.requests == 2


# ------------------------------------------------------------------ health, API key, binding


def test_healthz_api_key_and_default_binding(policy):
    assert ServeConfig().host == "127.0.0.1"
    srv = PolicyServer(policy, ServeConfig(port=0, ddim_steps=STEPS, api_key="s3cret"))
    obs = observation(srv.spec, 12)
    with srv.running() as port:
        assert srv.config.host == "127.0.0.1"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as r:
            assert r.status == 200 and r.read() == b"OK\n"  # no key needed to ask whether it is up
        for key in (None, "wrong"):
            with pytest.raises(ConnectionRefusedByServer) as refused:
                PolicyClient("127.0.0.1", port, api_key=key, connect_timeout_s=0)
            assert refused.value.status_code == 401  # one line: the status and the server's reason
            assert str(refused.value) == (f"ws://127.0.0.1:{port} refused the connection: HTTP 401: missing or wrong "
                                          "API key (send the header 'Authorization: Api-Key KEY')")
        with PolicyClient("127.0.0.1", port, api_key="s3cret") as client:
            assert client.infer(obs)["actions"].shape == (8, 7)
    with pytest.raises(urllib.error.URLError):  # stopped: nothing listens any more
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5)


def test_stopping_answers_the_request_in_the_model_and_ends_promptly(policy):
    srv = PolicyServer(policy, ServeConfig(port=0, ddim_steps=STEPS))
    real = srv._predict_batch

    def slow(requests):
        time.sleep(1.5)
        return real(requests)

    srv._predict_batch = slow
    outcome = []
    with srv.running() as port:
        client = PolicyClient("127.0.0.1", port)

        def robot():
            try:
                outcome.append(client.infer(observation(srv.spec, 14)))
            except (PolicyServerError, websockets.ConnectionClosed) as e:
                outcome.append(e)

        thread = threading.Thread(target=robot)
        thread.start()
        time.sleep(0.3)  # the request is in the model now
        stopping = time.monotonic()
    assert time.monotonic() - stopping < 10  # running() raises if the server thread did not end
    thread.join(timeout=10)
    assert not thread.is_alive() and len(outcome) == 1
    reply = outcome[0]
    assert isinstance(reply, websockets.ConnectionClosed) or "the server is stopping" in str(reply), reply


def test_more_clients_than_max_connections_are_refused(policy):
    srv = PolicyServer(policy, ServeConfig(port=0, ddim_steps=STEPS, max_connections=1))
    with srv.running() as port:
        with PolicyClient("127.0.0.1", port) as first:
            with pytest.raises(ConnectionRefusedByServer) as refused:
                PolicyClient("127.0.0.1", port, connect_timeout_s=0)
            assert refused.value.status_code == 503 and "HTTP 503: this server takes at most 1 clients" in str(refused.value)
            assert first.infer(observation(srv.spec, 15))["actions"].shape == (8, 7)
        deadline = time.monotonic() + 10
        while True:  # the first one's slot frees once the server has seen it close
            try:
                with PolicyClient("127.0.0.1", port, connect_timeout_s=0) as second:
                    assert second.metadata["action_dim"] == 7
                break
            except ConnectionRefusedByServer:
                assert time.monotonic() < deadline
                time.sleep(0.05)


def test_serve_command_line(policy_dir, tmp_path):
    """scripts/serve.py as a user starts it: /healthz, a request, Ctrl-C."""
    proc = subprocess.Popen([sys.executable, str(REPO / "scripts" / "serve.py"), "--policy", str(policy_dir),
                             "--port", "0", "--device", "cpu", "--ddim-steps", str(STEPS)],
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        port, lines = None, []
        for line in proc.stderr:
            lines.append(line)
            found = re.search(r"on ws://127\.0\.0\.1:(\d+)", line)
            if found:
                port = int(found.group(1))
                break
        assert port, "".join(lines)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as r:
            assert r.status == 200
        with PolicyClient("127.0.0.1", port) as client:
            assert client.metadata["ddim_steps"] == STEPS
            assert client.infer(observation(_spec_of(client.metadata), 13))["actions"].shape == (8, 7)
        proc.send_signal(signal.SIGINT)  # Ctrl-C (handled even when started as a background job, SIGINT ignored)
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        proc.stderr.close()


def _spec_of(metadata):
    from types import SimpleNamespace

    return SimpleNamespace(views=metadata["camera_views"], window_size=metadata["sensor_window_size"],
                           channels=metadata["sensor_channels"])


@pytest.mark.parametrize("extra, match", [
    (["--views", "only_one"], "--views names 1 view(s), but the policy was trained on 2"),
    (["--ddim-steps", "0"], "sampling steps must be"),
    (["--max-batch-size", "0"], "max_batch_size must be"),
    (["--device", "gpu"], "device 'gpu': not a torch device (cpu, cuda, cuda:1, ...)"),
    pytest.param(["--device", "cuda"], "device 'cuda': torch sees no CUDA GPU on this machine",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is there")),
])
def test_serve_refuses_bad_flags_in_one_line(policy_dir, extra, match, capsys):
    assert serve_main(["--policy", str(policy_dir), "--port", "0", "--device", "cpu", *extra]) == 2
    assert match in _error_line(capsys)


def _error_line(capsys) -> str:
    """The one ``error:`` line a refused command printed (after its log lines), and no traceback."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def test_serve_refuses_a_missing_policy_and_a_taken_port(policy_dir, tmp_path, capsys):
    assert serve_main(["--policy", str(tmp_path / "nowhere")]) == 2
    assert str(tmp_path / "nowhere") in _error_line(capsys)
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert serve_main(["--policy", str(policy_dir), "--port", str(port), "--device", "cpu"]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in _error_line(capsys)
