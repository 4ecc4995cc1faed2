"""Opening a dataset at scale: the index time and host memory of ``VLADataset.from_config``.

    python benchmarks/bench_index.py [--episodes 1000 10000] [--window 650] [--workdir DIR] [--json out.json]

Generates SPEC-format datasets (docs/dataset_format.md) of N episodes, each 100 frames at
10 Hz in two views (front, wrist), robot states at 50 Hz and a 1 kHz x 8-channel sensor
stream, cheaply: one template episode is written and every other episode hardlinks its
files (its own folder, so the reader sees N distinct episodes). Then, in a fresh process
per size (so nothing is cached in Python), ``VLADataset.from_config`` with the given
window and measures:

- ``index s``: wall time of ``from_config`` (scanning folders, reading CSVs and metadata,
  listing images, cutting samples);
- ``private MB``: the process's private memory (USS) after it, over the imports'
  baseline: what every rank holds on its own, and what forked DataLoader workers copy as
  they touch pages;
- per episode and per sample.

This is issue 29's "before" figure; its targets (at 100,000 episodes / 10M samples:
< 10 s to open per rank, < 100 bytes of private memory per sample) are printed beside
the extrapolation. Generated datasets are kept in ``--workdir`` and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FRAMES, FPS, STATE_HZ, SENSOR_HZ, SENSOR_CHANNELS = 100, 10.0, 50.0, 1000.0, 8
TARGET_OPEN_S, TARGET_BYTES_PER_SAMPLE, TARGET_EPISODES = 10.0, 100.0, 100_000


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
    template = root.parent / "template_episode"
    if not template.is_dir():
        write_template(template)
    files = [p.relative_to(template) for p in template.rglob("*") if p.is_file()]
    dirs = sorted({p.parent for p in files})
    for e in range(episodes):
        ep = root / "source_a" / f"episode_{e:06d}"
        for d in dirs:
            (ep / d).mkdir(parents=True, exist_ok=True)
        for f in files:
            if not (ep / f).exists():
                os.link(template / f, ep / f)
    done.write_text(str(episodes))
    return root


MEASURE = r"""
import json, os, sys, time
import psutil
from vla_ds.data import DataConfig, VLADataset
import vla_ds.data.dataset, vla_ds.data.episodes, numpy, torch  # the baseline includes the imports
proc = psutil.Process()
base = proc.memory_full_info().uss
start = time.perf_counter()
ds = VLADataset.from_config(DataConfig(dataset_dir=sys.argv[1], sensor_window_size=int(sys.argv[2])))
seconds = time.perf_counter() - start
print(json.dumps({"episodes": len(ds.episodes), "samples": len(ds), "index_s": seconds,
                  "private_mb": (proc.memory_full_info().uss - base) / 2**20}))
"""


def measure(root: Path, window: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(root), str(window)], env=env, capture_output=True,
                          text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"measuring {root} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--episodes", type=int, nargs="+", default=[1000, 10000])
    p.add_argument("--window", type=int, default=650, help="sensor window (samples)")
    p.add_argument("--workdir", type=Path, help="keep the generated datasets here and reuse them")
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = a.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows = []
        for n in a.episodes:
            root = make_dataset(work / f"scale_{n}", n)
            row = measure(root, a.window)
            row["bytes_per_sample"] = row["private_mb"] * 2**20 / max(1, row["samples"])
            row["kb_per_episode"] = row["private_mb"] * 1024 / max(1, row["episodes"])
            row["ms_per_episode"] = 1000 * row["index_s"] / max(1, row["episodes"])
            rows.append(row)
            print(f"{n} episodes: {row['index_s']:.1f} s, {row['private_mb']:.0f} MB", flush=True)
    print(f"\nVLADataset.from_config, one process, window {a.window} (SPEC episodes: {FRAMES} frames x 2 views, "
          f"{STATE_HZ:g} Hz states, {SENSOR_HZ:g} Hz x {SENSOR_CHANNELS} sensor)")
    print(f"{'episodes':>9} {'samples':>10} {'index s':>8} {'private MB':>11} {'ms/episode':>11} {'KB/episode':>11} "
          f"{'B/sample':>9}")
    for r in rows:
        print(f"{r['episodes']:>9} {r['samples']:>10} {r['index_s']:>8.1f} {r['private_mb']:>11.0f} "
              f"{r['ms_per_episode']:>11.2f} {r['kb_per_episode']:>11.1f} {r['bytes_per_sample']:>9.0f}")
    last = rows[-1]
    print(f"\nat {TARGET_EPISODES:,} episodes, linearly: {last['ms_per_episode'] * TARGET_EPISODES / 1000:.0f} s to open "
          f"(target < {TARGET_OPEN_S:g} s) and {last['bytes_per_sample']:.0f} B/sample private "
          f"(target < {TARGET_BYTES_PER_SAMPLE:g})")
    if a.json:
        a.json.write_text(json.dumps({"window": a.window, "rows": rows}, indent=2) + "\n")
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
