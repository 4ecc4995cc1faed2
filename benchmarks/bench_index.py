"""Datasets at scale: building, opening and reading the dataset index (issue 29).

    python benchmarks/bench_index.py [--episodes 1000 10000 100000] [--window 650] [--ranks 2]
        [--epoch-samples 100000] [--workdir DIR] [--json out.json]

Generates SPEC-format datasets (docs/dataset_format.md) of N episodes, each 100 frames at
10 Hz in two views (front, wrist), robot states at 50 Hz and a 1 kHz x 8-channel sensor
stream, cheaply: one template episode is written and every other episode hardlinks its
files (its own folder, so the reader sees N distinct episodes). Then, each in fresh
processes (nothing cached in Python; the page cache is warm), with the index in
``--workdir``/cache:

- ``build s``, ``eps/s``: a cold build of the index by ``--ranks`` processes at once (each
  indexes its share of the episodes, as the ranks of a run do), then one merging them: the
  slowest share's time plus the merge's (the JSON also has the wall time with start-ups);
  ``index MB``: its size on disk;
- ``open s``: ``VLADataset.from_config`` with the index built (finding the episodes,
  checking their files' sizes and times, mapping the index): what every rank pays per run;
- ``private MB``, ``B/sample``: the anonymous memory that opening (and the sampler's
  weights) adds to the process: what a rank holds on its own; the mapped index is page
  cache, shared by every rank and worker;
- ``worker +MB``: the most any of 2 DataLoader workers grows while reading
  ``--epoch-samples`` random samples with their images.

Targets (at 100,000 episodes / 10M samples): open < 10 s per rank, < 100 bytes of private
memory per sample, workers grow < 50 MB, build >= 2000 episodes/s on 2 ranks. Generated
datasets are kept in ``--workdir`` and reused. The figures before the index are in
docs/dataset_format.md.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FRAMES, FPS, STATE_HZ, SENSOR_HZ, SENSOR_CHANNELS = 100, 10.0, 50.0, 1000.0, 8
TARGET_OPEN_S, TARGET_BYTES_PER_SAMPLE, TARGET_EPISODES = 10.0, 100.0, 100_000
TARGET_WORKER_MB, TARGET_BUILD_RATE = 50.0, 2000.0


def write_template(ep_dir: Path) -> None:
    """One episode: metadata, 50 Hz robot states, two 10 Hz views of 16x12 JPEGs, a 1 kHz sensor stream."""
    import numpy as np
    from PIL import Image

    ep_dir.mkdir(parents=True)
    duration = FRAMES / FPS
    t = np.arange(int(duration * STATE_HZ) + 1) / STATE_HZ
    pose = np.stack([t, 2 * t, 3 * t, 0 * t, 0 * t, np.sin(t)], axis=1)
    rows = ["timestamp,pose_x,pose_y,pose_z,pose_a,pose_b,pose_r,gripper"]
    rows += [",".join(f"{v:.6f}" for v in (ti, *p, ti % 1.0)) for ti, p in zip(t, pose)]
    (ep_dir / "robot_states.csv").write_text("\n".join(rows) + "\n")
    (ep_dir / "metadata.json").write_text(json.dumps({"instruction": "insert the needle",
                                                      "camera_views": ["front", "wrist"]}))
    rng = np.random.default_rng(0)
    for v, view in enumerate(("front", "wrist")):
        (ep_dir / "images" / view).mkdir(parents=True)
        for k in range(FRAMES):
            image = rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)
            Image.fromarray(image).save(ep_dir / "images" / view / f"{k / FPS + 0.01 * v:.6f}.jpg")
    st = np.arange(int(duration * SENSOR_HZ)) / SENSOR_HZ
    np.savez(ep_dir / "sensor_data.npz", timestamps=st,
             data=rng.standard_normal((len(st), SENSOR_CHANNELS)).astype(np.float32))


def make_dataset(root: Path, episodes: int) -> Path:
    """``root`` with ``episodes`` episodes (hardlinks of one template); reused when complete."""
    done = root / ".complete"
    if done.is_file():
        return root
    k = 0  # the template linked to: ext4 allows 65,000 links to a file, so a new copy when one is full
    template = root.parent / "template_episode"
    if not template.is_dir():
        write_template(template)
    files = [p.relative_to(template) for p in template.rglob("*") if p.is_file()]
    dirs = sorted({f.parent for f in files})
    for e in range(episodes):
        ep = root / "source_a" / f"episode_{e:06d}"
        for d in dirs:
            (ep / d).mkdir(parents=True, exist_ok=True)
        for f in files:
            while not (ep / f).exists():
                try:
                    os.link(template / f, ep / f)
                except OSError as err:
                    if err.errno != errno.EMLINK:
                        raise
                    k += 1
                    template = root.parent / f"template_episode_{k}"
                    if not template.is_dir():
                        write_template(template)
    done.write_text(str(episodes))
    return root


# Each phase runs in a fresh process (nothing cached in Python), with the cache under --workdir.
PRELUDE = r"""
import json, os, sys, time
import numpy as np
from vla_ds.data import DataConfig, VLADataset
import vla_ds.data.dataset, vla_ds.data.episodes, vla_ds.data.index as index_lib, torch

def anon_mb(pid="self"):  # private (anonymous) memory: what a process holds on its own; mapped files are shared
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024

config = DataConfig(dataset_dir=sys.argv[1], sensor_window_size=int(sys.argv[2]))
"""

BUILD = PRELUDE + r"""
from vla_ds.data.dataset import scan_dataset
rank, world = int(sys.argv[3]), int(sys.argv[4])
plan = index_lib.Plan(config, scan_dataset(config.dataset_dir)[0])
start = time.perf_counter()
index_lib.build_part(plan, rank, world)
print(json.dumps({"build_s": time.perf_counter() - start}))
"""

MERGE = PRELUDE + r"""
from vla_ds.data.dataset import scan_dataset
plan = index_lib.Plan(config, scan_dataset(config.dataset_dir)[0])
start = time.perf_counter()
index = index_lib.merge_parts(plan, int(sys.argv[3]))
print(json.dumps({"merge_s": time.perf_counter() - start, "index_mb": sum(
    f.stat().st_size for f in plan.folder.iterdir()) / 2**20}))
"""

OPEN = PRELUDE + r"""
import psutil
proc = psutil.Process()
base, base_uss = anon_mb(), proc.memory_full_info().uss
start = time.perf_counter()
ds = VLADataset.from_config(config)
seconds = time.perf_counter() - start
weights = ds.sample_weights  # what a run computes next (the sampler's)
print(json.dumps({"episodes": len(ds.episodes), "samples": len(ds), "open_s": seconds,
                  "private_mb": anon_mb() - base, "uss_mb": (proc.memory_full_info().uss - base_uss) / 2**20}))
"""

WORKERS = PRELUDE + r"""
from multiprocessing import Manager
from vla_ds.data.dataset import collate_numeric
ds = VLADataset.from_config(config)
n = min(len(ds), int(sys.argv[3]))
order = np.random.default_rng(0).permutation(len(ds))[:n]
manager = Manager()
start_mb = manager.dict()

def init(worker):
    start_mb[os.getpid()] = anon_mb()

loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, order.tolist()), batch_size=64, num_workers=2,
                                     collate_fn=collate_numeric, worker_init_fn=init, persistent_workers=True)
start = time.perf_counter()
for batch in loader:
    pass
seconds = time.perf_counter() - start
growth = [anon_mb(pid) - mb for pid, mb in start_mb.items()]
print(json.dumps({"epoch_samples": n, "epoch_s": seconds, "worker_growth_mb": max(growth)}))
"""


def run(script: str, *args) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script, *map(str, args)], env=env, capture_output=True,
                          text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"bench_index: {args[0]} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def build_on_ranks(root: Path, window: int, world: int) -> dict:
    """The index built by ``world`` processes at once (each its share), then merged by one."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    wall = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", BUILD, str(root), str(window), str(r), str(world)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
             for r in range(world)]
    seconds = []
    for proc in procs:
        out, err = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"bench_index: building {root} failed:\n{err[-3000:]}")
        seconds.append(json.loads(out.strip().splitlines()[-1])["build_s"])
    merged = run(MERGE, root, window, world)
    # The index's own time: the slowest share, then the merge (not the processes' start-up).
    return {"build_s": max(seconds) + merged["merge_s"], "build_wall_s": time.perf_counter() - wall, **merged}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--episodes", type=int, nargs="+", default=[1000, 10000])
    p.add_argument("--window", type=int, default=650, help="sensor window (samples)")
    p.add_argument("--ranks", type=int, default=2, help="processes building the index at once")
    p.add_argument("--epoch-samples", type=int, default=100_000,
                   help="samples (random, with images) the DataLoader workers read for their memory growth")
    p.add_argument("--workdir", type=Path, help="keep the generated datasets here and reuse them")
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = a.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows = []
        for n in a.episodes:
            root = make_dataset(work / f"scale_{n}", n)
            cache = work / "cache"
            os.environ["VLA_DS_CACHE"] = str(cache)
            shutil.rmtree(cache / "index", ignore_errors=True)  # a cold build
            row = {"episodes": n, **build_on_ranks(root, a.window, a.ranks)}
            row.update(run(OPEN, root, a.window))
            if a.epoch_samples:
                row.update(run(WORKERS, root, a.window, a.epoch_samples))
            row["build_episodes_per_s"] = n / row["build_s"]
            row["bytes_per_sample"] = row["private_mb"] * 2**20 / max(1, row["samples"])
            row["index_bytes_per_sample"] = row["index_mb"] * 2**20 / max(1, row["samples"])
            rows.append(row)
            print(f"{n} episodes: built in {row['build_s']:.1f} s, opened in {row['open_s']:.2f} s, "
                  f"{row['private_mb']:.0f} MB private", flush=True)
    print(f"\nThe dataset index, window {a.window} (SPEC episodes: {FRAMES} frames x 2 views, {STATE_HZ:g} Hz "
          f"states, {SENSOR_HZ:g} Hz x {SENSOR_CHANNELS} sensor); build on {a.ranks} processes at once")
    print(f"{'episodes':>9} {'samples':>10} {'build s':>8} {'eps/s':>7} {'index MB':>9} {'open s':>7} "
          f"{'private MB':>11} {'B/sample':>9} {'worker +MB':>11}")
    for r in rows:
        print(f"{r['episodes']:>9} {r['samples']:>10} {r['build_s']:>8.1f} {r['build_episodes_per_s']:>7.0f} "
              f"{r['index_mb']:>9.0f} {r['open_s']:>7.2f} {r['private_mb']:>11.1f} {r['bytes_per_sample']:>9.1f} "
              f"{r.get('worker_growth_mb', float('nan')):>11.1f}")
    print(f"targets at {TARGET_EPISODES:,} episodes: open < {TARGET_OPEN_S:g} s, < {TARGET_BYTES_PER_SAMPLE:g} "
          f"B/sample private, workers grow < {TARGET_WORKER_MB:g} MB, build >= {TARGET_BUILD_RATE:g} episodes/s "
          "on 2 ranks")
    if a.json:
        a.json.write_text(json.dumps({"window": a.window, "ranks": a.ranks, "rows": rows}, indent=2) + "\n")
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
