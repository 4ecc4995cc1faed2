"""Drives a policy server with the real openpi-client (run by tests/test_serve.py in a venv of
its own: openpi-client needs numpy<2). Imports nothing from vla_ds.

    python openpi_client_run.py PORT INPUTS.npz OUT_DIR

INPUTS.npz: ``view_<name>`` images, ``sensor``, ``prompt`` and ``seed`` (0-d arrays).
Writes OUT_DIR/result.json (metadata, error messages, numpy version) and OUT_DIR/actions.npz
(``infer``: the chunk for the seeded request, ``again``: the same request after a bad one,
``broker``: the actions ActionChunkBroker handed out over H + 1 ticks).
"""

import json
import sys
from pathlib import Path

import numpy as np
from openpi_client import action_chunk_broker, websocket_client_policy


def main(port: int, inputs: Path, out: Path) -> None:
    data = np.load(inputs)
    views = [k[len("view_"):] for k in data.files if k.startswith("view_")]
    obs = {"images": {v: data[f"view_{v}"] for v in views}, "prompt": str(data["prompt"]),
           "sensor": data["sensor"], "seed": int(data["seed"])}

    policy = websocket_client_policy.WebsocketClientPolicy(host="127.0.0.1", port=port)
    metadata = policy.get_server_metadata()
    first = policy.infer(obs)

    errors = []
    for bad in ({**obs, "images": {v: data[f"view_{v}"].astype(np.float32) for v in views}},
                {**obs, "sensor": np.full_like(data["sensor"], np.nan)}):
        try:
            policy.infer(bad)
            errors.append(None)
        except RuntimeError as e:  # openpi-client raises a text reply as RuntimeError
            errors.append(str(e))
    again = policy.infer(obs)

    horizon = metadata["action_horizon"]
    broker = action_chunk_broker.ActionChunkBroker(policy, action_horizon=horizon)
    stepped = [broker.infer(obs)["actions"] for _ in range(horizon + 1)]

    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "actions.npz", infer=first["actions"], again=again["actions"], broker=np.stack(stepped))
    (out / "result.json").write_text(json.dumps({
        "metadata": metadata, "errors": errors, "numpy": np.__version__,
        "policy_timing": first["policy_timing"], "server_timing": first["server_timing"],
        "actions_dtype": str(first["actions"].dtype)}, default=str))


if __name__ == "__main__":
    main(int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
