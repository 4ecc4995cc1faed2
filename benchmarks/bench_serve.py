"""The policy server: round-trip latency for one robot, and throughput with several at once.

    python benchmarks/bench_serve.py [--policy DIR] [--clients 1 4 8] [--requests 30]
        [--image-hw 240 320] [--ddim-steps K] [--device cpu|cuda] [--json out.json]

Starts ``scripts/serve.py`` as a user would (its own process), once with batching off
(``--max-batch-size 1``) and once on (``--max-batch-size 8``, ``--batch-wait-ms 0``), and
drives it with vla_ds's ``PolicyClient`` from threads of this process, each robot sending
its next observation as soon as the previous chunk arrived (one (H, W, 3) uint8 image per
view, its prompt and its sensor window, as a robot would):

- latency with 1 client: round trip p50/p99 at the client, ``server_timing.infer_ms``
  (request received -> chunk ready) and ``policy_timing.infer_ms`` (the forward pass);
- throughput with 1/4/8 clients: chunks/s over all clients, round-trip p50/p99 and the
  mean batch size the server formed.

Without ``--policy`` it makes the tiny offline backbone and the demo dataset, trains a
few Stage 1 steps and converts them (latency does not depend on how well a policy is
trained). With ``--policy`` the reference model on a GPU (``--device cuda``). Prints a
table, writes JSON with ``--json``. Run by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def make_tiny_policy(work: Path) -> Path:
    """A tiny policy directory: the offline tiny backbone, the demo dataset, 4 Stage 1 steps, converted."""
    from vla_ds.data.demo import make_demo_dataset
    from vla_ds.models.tiny_backbone import make_tiny_backbone
    from vla_ds.policy_tools.convert import main as convert_main
    from vla_ds.training.train import main as train_main

    backbone = make_tiny_backbone(work / "backbone")
    data = make_demo_dataset(work / "data")
    run = work / "run"
    flags = ["--ds_config", str(REPO / "ds_configs" / "stage1.json"), "--dataset_dir", str(data), "--vl-model",
             str(backbone), "--model-preset", "tiny", "--sensor-window-size", "32", "--num_workers", "0",
             "--batch_size", "8", "--output_dir", str(run), "--set", "train.progress_bar=false",
             "--set", "train.max_steps=4"]
    if train_main(flags) != 0 or convert_main([str(run), str(work / "policy"), "--to", "policy"]) != 0:
        sys.exit("could not make the tiny policy")
    return work / "policy"


class Server:
    """scripts/serve.py in a process of its own, on a free port."""

    def __init__(self, policy: Path, extra: list[str]):
        self.proc = subprocess.Popen([sys.executable, str(REPO / "scripts" / "serve.py"), "--policy", str(policy),
                                      "--port", "0", *extra], stderr=subprocess.PIPE, text=True,
                                     env=dict(os.environ, PYTHONUNBUFFERED="1"))
        lines = []
        for line in self.proc.stderr:
            lines.append(line)
            found = re.search(r"on ws://[\d.]+:(\d+)", line)
            if found:
                self.port = int(found.group(1))
                break
        else:
            sys.exit("the server did not start:\n" + "".join(lines))
        threading.Thread(target=self.proc.stderr.read, daemon=True).start()  # keep its pipe drained

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


def observations(metadata: dict, n: int, hw: tuple[int, int], seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    prompt = metadata["instruction"] or (metadata["instructions"] or ["pick up the cup"])[0]
    return [{"images": {v: rng.integers(0, 256, (*hw, 3), dtype=np.uint8) for v in metadata["camera_views"]},
             "prompt": prompt,
             "sensor": rng.normal(size=(metadata["sensor_window_size"], metadata["sensor_channels"])).astype(np.float32)}
            for _ in range(n)]


def drive(port: int, clients: int, requests: int, hw: tuple[int, int]) -> dict:
    """``clients`` robots, each sending ``requests`` observations back to back (after 2 warm-up ones)."""
    from vla_ds.serving.client import PolicyClient

    connections = [PolicyClient("127.0.0.1", port) for _ in range(clients)]
    inputs = [observations(c.metadata, requests + 2, hw, seed=i) for i, c in enumerate(connections)]
    for c, obs in zip(connections, inputs):
        for o in obs[:2]:
            c.infer(o)
    records: list[list[tuple[float, dict]]] = [[] for _ in range(clients)]
    barrier = threading.Barrier(clients + 1)

    def robot(i):
        barrier.wait()
        for o in inputs[i][2:]:
            t = time.perf_counter()
            reply = connections[i].infer(o)
            records[i].append(((time.perf_counter() - t) * 1000, reply))

    threads = [threading.Thread(target=robot, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    for c in connections:
        c.close()
    rtt = [ms for rs in records for ms, _ in rs]
    replies = [r for rs in records for _, r in rs]

    def pct(values, q):
        return float(np.percentile(values, q))

    return {
        "clients": clients, "requests": len(rtt), "chunks_per_s": len(rtt) / wall,
        "rtt_p50_ms": pct(rtt, 50), "rtt_p99_ms": pct(rtt, 99),
        "server_infer_p50_ms": pct([r["server_timing"]["infer_ms"] for r in replies], 50),
        "server_infer_p99_ms": pct([r["server_timing"]["infer_ms"] for r in replies], 99),
        "forward_p50_ms": pct([r["policy_timing"]["infer_ms"] for r in replies], 50),
        "mean_batch": statistics.fmean(r["policy_timing"]["batch_size"] for r in replies),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--policy", type=Path, default=None, help="exported policy directory (default: a tiny one)")
    p.add_argument("--vl-model", default=None, help="base Qwen2.5-VL, when the policy's path is not available")
    p.add_argument("--device", default="cpu")
    p.add_argument("--ddim-steps", type=int, default=None)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--requests", type=int, default=30, help="requests per client (after 2 warm-up ones)")
    p.add_argument("--image-hw", type=int, nargs=2, default=[240, 320], help="camera image height and width")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))

    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
        policy = a.policy or make_tiny_policy(Path(tmp))
        common = ["--device", a.device] + (["--vl-model", a.vl_model] if a.vl_model else []) + \
            (["--ddim-steps", str(a.ddim_steps)] if a.ddim_steps else [])
        results = []
        for batching, extra in (("off", ["--max-batch-size", "1"]), ("on", ["--max-batch-size", "8"])):
            server = Server(policy, common + extra)
            try:
                for clients in a.clients:
                    row = {"batching": batching, **drive(server.port, clients, a.requests, tuple(a.image_hw))}
                    results.append(row)
                    print(f"batching {batching:>3}, {clients} client(s): {row['chunks_per_s']:.1f} chunks/s, "
                          f"round trip p50 {row['rtt_p50_ms']:.1f} ms", flush=True)
            finally:
                server.stop()

    header = (f"{'batching':>8} {'clients':>7} {'chunks/s':>9} {'rtt p50':>8} {'rtt p99':>8} {'server p50':>10} "
              f"{'server p99':>10} {'forward p50':>11} {'mean batch':>10}")
    print(f"\npolicy {a.policy or 'tiny (CPU)'}, device {a.device}, images {a.image_hw[0]}x{a.image_hw[1]}, "
          f"{a.requests} requests per client; times in ms")
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r['batching']:>8} {r['clients']:>7} {r['chunks_per_s']:>9.1f} {r['rtt_p50_ms']:>8.1f} "
              f"{r['rtt_p99_ms']:>8.1f} {r['server_infer_p50_ms']:>10.1f} {r['server_infer_p99_ms']:>10.1f} "
              f"{r['forward_p50_ms']:>11.1f} {r['mean_batch']:>10.2f}")
    if a.json:
        a.json.write_text(json.dumps({"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
                                      "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
