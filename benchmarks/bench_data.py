"""Input pipeline: samples/s of the dataset + DataLoader, and its share of training step time.

    python benchmarks/bench_data.py [--workers 0 2 4] [--train-workers 0 1 2 4] [--batches 40] [--json out.json]

On the demo dataset (10 episodes per source) and on a larger generated one (50 per
source, 100 episodes), for each worker count: samples/s of a DataLoader over the training
split with the training collator, in the two shapes training uses:

- ``images``: Stage 2 / no cache: decode every view, build the prompt and the image patches;
- ``cached``: Stage 1 with the VL feature cache: sensor window + action chunk only.

Then ``data_share`` (time the training loop waited for the next batch / step time, the
median over steps after the first epoch, as logged in metrics.jsonl) of short real Stage 1
runs, with and without the cache.

Then the reference sensor shape: the demo's sensor streams rewritten as 1026 channels at
1 kHz (stored, memory-mapped) and read as 650-sample windows, 2.7 MB per sample, through the
cached (Stage 1) path at the reference micro batch of 4: how many samples/s the input
pipeline itself can move on this machine.

Last, host memory with the same streams written compressed (``np.savez_compressed``): how
much each DataLoader worker's private (anonymous) memory and peak resident memory grow
while it reads 650 x 1026 windows, with the
compressed members unpacked once to memory-mapped .npy files in the user cache (the
default) and decompressed in memory per worker (``UNPACK_COMPRESSED_SENSOR = False``, the
behaviour before). Prints tables, writes JSON with ``--json``. Run by hand.

``--scale N [N ...]``: only how long opening a SPEC dataset of N generated episodes takes
and the host memory its index holds (benchmarks/bench_index.py).

``--lerobot``: LeRobot v3.0 datasets instead (written by tests/lerobot_writer.py from
LeRobot's layout: 2 cameras at 480x640, 10 episodes of 60 frames, AV1 and H.264, several
episodes per mp4): samples/s decoding them at each worker count, and ``data_share`` of
short Stage 1 runs that decode every step (``--no-cache``, the Stage 2 input path).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def loader_rate(dataset, collate, workers: int, batch_size: int, batches: int) -> float:
    """Samples/s over ``batches`` batches after 3 warm-up batches (workers started)."""
    from torch.utils.data import DataLoader, RandomSampler

    from vla_ds.batch import ACTIONS

    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate, num_workers=workers,
                        sampler=RandomSampler(dataset, replacement=True, num_samples=batch_size * (batches + 3)),
                        persistent_workers=False, drop_last=True)
    it = iter(loader)
    for _ in range(3):
        next(it)
    start = time.perf_counter()
    n = 0
    for batch in it:
        n += len(batch[ACTIONS])
    return n / (time.perf_counter() - start)


def training_share(data: Path, backbone: Path, out: Path, workers: int, extra: list[str]) -> dict:
    from vla_ds.training.metrics import read_metrics
    from vla_ds.training.train import main

    argv = ["--ds_config", str(REPO / "ds_configs" / "stage1.json"), "--dataset_dir", str(data),
            "--vl-model", str(backbone), "--model-preset", "tiny", "--sensor-window-size", "32",
            "--num_workers", str(workers), "--batch_size", "8", "--epochs", "3", "--lr", "1e-3",
            "--output_dir", str(out), "--set", "train.progress_bar=false", *extra]
    assert main(argv) == 0
    rows = [r for r in read_metrics(out) if "train/loss" in r and r["epoch"] >= 2]
    return {"data_share": statistics.median(r["data_share"] for r in rows),
            "samples_per_s": statistics.median(r["samples_per_s"] for r in rows)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4], help="DataLoader workers of the loader rates")
    p.add_argument("--train-workers", type=int, nargs="+", default=[0, 1, 2, 4],
                   help="--num_workers of the training runs that measure data_share")
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", type=Path)
    p.add_argument("--memory-only", action="store_true",
                   help="only the compressed-sensor memory table (about a minute)")
    p.add_argument("--lerobot", action="store_true", help="LeRobot datasets (AV1, H.264) instead of vla_ds episodes")
    p.add_argument("--scale", type=int, nargs="+", metavar="N",
                   help="only the dataset-opening table at N episodes each (benchmarks/bench_index.py)")
    p.add_argument("--workdir", type=Path, help="with --scale: keep the generated datasets here and reuse them")
    a = p.parse_args(argv)
    if a.scale:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import bench_index

        return bench_index.main(["--episodes", *map(str, a.scale), *(["--workdir", str(a.workdir)] if a.workdir else []),
                                 *(["--json", str(a.json)] if a.json else [])])
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))

    from vla_ds.data import DataConfig, VLADataset, split_train_val
    from vla_ds.data.demo import make_demo_dataset
    from vla_ds.data.loading import PolicyCollator
    from vla_ds.log import setup_logging
    from vla_ds.models.backbone import BackboneConfig, VLInputBuilder
    from vla_ds.models.tiny_backbone import make_tiny_backbone

    setup_logging(level=30)
    results = {"loader": [], "training": [], "reference_sensor": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if a.memory_only:
            wide = make_wide(make_demo_dataset(tmp / "demo", (10, 10)), tmp / "wide")
            results["compressed_sensor_memory"] = compressed_sensor_memory(wide, tmp / "packed", a.batches)
            return _report(results, a.json)
        backbone = make_tiny_backbone(tmp / "tiny")
        builder = VLInputBuilder.from_pretrained(BackboneConfig(model_name_or_path=str(backbone)))
        collate = PolicyCollator(builder)
        if a.lerobot:
            results["lerobot"] = lerobot_rates(tmp, backbone, collate, a)
            return _report(results, a.json)
        datasets = {"demo (20 episodes)": make_demo_dataset(tmp / "demo", (10, 10)),
                    "large (100 episodes)": make_demo_dataset(tmp / "large", (50, 50), seed=1)}
        for name, path in datasets.items():
            ds = VLADataset.from_config(DataConfig(dataset_dir=str(path), sensor_window_size=32))
            train, _ = split_train_val(ds, 0.1, 42)
            cached = _NoImages(train)
            for workers in a.workers:
                row = {"dataset": name, "samples": len(train), "workers": workers,
                       "images_samples_per_s": loader_rate(train, collate, workers, a.batch_size, a.batches),
                       "cached_samples_per_s": loader_rate(cached, collate, workers, a.batch_size, a.batches)}
                results["loader"].append(row)
                print(f"{name:<22} workers {workers}: {row['images_samples_per_s']:8.1f} samples/s with images, "
                      f"{row['cached_samples_per_s']:8.1f} cached", flush=True)
        results["reference_sensor"] = reference_sensor_rates(datasets["demo (20 episodes)"], tmp / "wide", collate,
                                                             a.workers, a.batches)
        results["compressed_sensor_memory"] = compressed_sensor_memory(tmp / "wide", tmp / "packed", a.batches)
        for workers in a.train_workers:
            for label, extra in (("no cache", ["--no-cache"]), ("cache", ["--set", f"cache.dir={tmp / 'cache'}"])):
                share = training_share(datasets["demo (20 episodes)"], backbone, tmp / f"run_{workers}_{label}",
                                       workers, extra)
                results["training"].append({"path": label, "workers": workers, **share})
    return _report(results, a.json)


def lerobot_rates(tmp: Path, backbone: Path, collate, a) -> list[dict]:
    """Decode rates and data_share on LeRobot v3.0 datasets, per codec."""
    sys.path.insert(0, str(REPO / "tests"))  # the test suite's LeRobot writer (LeRobot's own layout)
    from lerobot_writer import write_lerobot_dataset

    from vla_ds.data import DataConfig, VLADataset, split_train_val

    rows = []
    for codec in ("av1", "h264"):
        start = time.perf_counter()
        root = write_lerobot_dataset(tmp / f"lerobot_{codec}", version="v3.0", codec=codec, num_episodes=10,
                                     lengths=[60] * 10, image_hw=(480, 640), episodes_per_file=5).root
        print(f"wrote the {codec} dataset in {time.perf_counter() - start:.0f} s", flush=True)
        ds = VLADataset.from_config(DataConfig(dataset_dir=str(root), sensor_window_size=32))
        train, _ = split_train_val(ds, 0.1, 42)
        for workers in a.workers:
            rate = loader_rate(train, collate, workers, a.batch_size, a.batches)
            rows.append({"codec": codec, "kind": "loader", "workers": workers, "samples_per_s": rate})
            print(f"{codec:<6} workers {workers}: {rate:8.1f} samples/s (2 views 480x640 decoded + prompt)", flush=True)
        for workers in a.train_workers:
            share = training_share(root, backbone, tmp / f"run_{codec}_{workers}", workers, ["--no-cache"])
            rows.append({"codec": codec, "kind": "training", "workers": workers, **share})
            print(f"{codec:<6} training, workers {workers}: data_share {share['data_share']:.3f}", flush=True)
    return rows


def _report(results: dict, json_path: Path | None) -> int:
    if results.get("lerobot"):
        print()
        print(f"{'LeRobot v3.0, 2 x 480x640':<28}{'workers':>8}{'loader samples/s':>18}{'train data_share':>18}"
              f"{'train samples/s':>17}")
        for r in results["lerobot"]:
            if r["kind"] == "loader":
                print(f"{r['codec']:<28}{r['workers']:>8}{r['samples_per_s']:>18.1f}{'':>18}{'':>17}")
            else:
                print(f"{r['codec'] + ' (Stage 1, --no-cache)':<28}{r['workers']:>8}{'':>18}{r['data_share']:>18.3f}"
                      f"{r['samples_per_s']:>17.1f}")
        return write_json(results, json_path)
    if results["loader"]:
        print()
        print(f"{'dataset':<22}{'workers':>8}{'images samples/s':>18}{'cached samples/s':>18}")
        for r in results["loader"]:
            print(f"{r['dataset']:<22}{r['workers']:>8}{r['images_samples_per_s']:>18.1f}"
                  f"{r['cached_samples_per_s']:>18.1f}")
    if results["training"]:
        print()
        print(f"{'training (Stage 1, 1 process)':<32}{'workers':>8}{'data_share':>12}{'samples/s':>12}")
        for r in results["training"]:
            print(f"{r['path']:<32}{r['workers']:>8}{r['data_share']:>12.3f}{r['samples_per_s']:>12.1f}")
    if results["reference_sensor"]:
        print()
        print(f"{'reference sensor (650 x 1026 float32), cached path':<52}{'workers':>8}{'samples/s':>12}{'MB/s':>10}")
        for r in results["reference_sensor"]:
            print(f"{'batch ' + str(r['batch_size']):<52}{r['workers']:>8}{r['samples_per_s']:>12.1f}"
                  f"{r['mb_per_s']:>10.0f}")
    print()
    print(f"{'compressed reference sensor, per worker':<44}{'workers':>8}{'streams MB':>12}{'+private MB':>13}"
          f"{'+peak RSS MB':>14}")
    for r in results["compressed_sensor_memory"]:
        print(f"{r['mode']:<44}{r['workers']:>8}{r['stream_mb']:>12.0f}{r['private_growth_mb']:>13.0f}"
              f"{r['peak_rss_growth_mb']:>14.0f}")
    return write_json(results, json_path)


def write_json(results: dict, json_path: Path | None) -> int:
    if json_path:
        json_path.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {json_path}")
    return 0


def make_wide(demo: Path, out: Path, channels: int = 1026, hz: float = 1000.0) -> Path:
    """``demo`` copied to ``out`` with every sensor stream replaced by ``channels`` channels at
    ``hz`` (stored uncompressed)."""
    import shutil

    import numpy as np

    shutil.copytree(demo, out)
    rng = np.random.default_rng(0)
    for npz in sorted(out.rglob("sensor_data.npz")):
        with np.load(npz) as old:
            start, end = float(old["timestamps"][0]), float(old["timestamps"][-1])
        times = start + np.arange(int((end - start) * hz) + 1) / hz
        np.savez(npz, timestamps=times, data=rng.standard_normal((len(times), channels), dtype=np.float32))
    return out


def reference_sensor_rates(demo: Path, out: Path, collate, workers: list[int], batches: int,
                           channels: int = 1026, window: int = 650, hz: float = 1000.0, batch_size: int = 4) -> list:
    """Cached-path loader rate with the reference sensor shape: ``demo`` copied to ``out`` with
    every sensor stream replaced by ``channels`` channels at ``hz`` (stored, so memory-mapped)."""


    from vla_ds.data import DataConfig, VLADataset, split_train_val

    make_wide(demo, out, channels, hz)
    ds = VLADataset.from_config(DataConfig(dataset_dir=str(out), sensor_window_size=window))
    train, _ = split_train_val(ds, 0.1, 42)
    cached = _NoImages(train, hidden=2048)
    rows = []
    for w in workers:
        rate = loader_rate(cached, collate, w, batch_size, batches)
        rows.append({"batch_size": batch_size, "workers": w, "window": window, "channels": channels,
                     "samples_per_s": rate, "mb_per_s": rate * window * channels * 4 / 1e6})
        print(f"reference sensor {window}x{channels}, batch {batch_size}, workers {w}: {rate:8.1f} samples/s", flush=True)
    return rows


def compressed_sensor_memory(wide: Path, out: Path, batches: int, workers: int = 2, batch_size: int = 4,
                             window: int = 650) -> list:
    """Peak memory per DataLoader worker reading 650 x 1026 windows from compressed streams
    (``wide``'s streams rewritten with ``np.savez_compressed``), unpacked vs decompressed."""
    import shutil

    import numpy as np
    from torch.utils.data import DataLoader, RandomSampler

    from vla_ds.data import DataConfig, VLADataset, episodes, split_train_val
    from vla_ds.user_cache import unpacked_sensor_dir

    os.environ["VLA_DS_CACHE"] = str(out.parent / "user_cache")  # the unpacked copies: this run's, cold
    shutil.copytree(wide, out)
    for npz in sorted(out.rglob("sensor_data.npz")):
        with np.load(npz) as old:
            stamps, data = old["timestamps"], old["data"]
        np.savez_compressed(npz, timestamps=stamps, data=data)
    rows = []
    for mode, unpack in (("decompressed in memory per worker (before)", False), ("unpacked once, mapped", True)):
        for copy in unpacked_sensor_dir().glob("*.npy"):
            copy.unlink()
        episodes.UNPACK_COMPRESSED_SENSOR = unpack  # the forked workers inherit it
        ds = VLADataset.from_config(DataConfig(dataset_dir=str(out), sensor_window_size=window))
        train, _ = split_train_val(ds, 0.1, 42)
        loader = DataLoader(_MemoryProbe(train), batch_size=batch_size, num_workers=workers, collate_fn=list,
                            sampler=RandomSampler(train, replacement=True, num_samples=batch_size * batches))
        peak: dict[int, tuple[float, float]] = {}
        for batch in loader:
            for worker, private, rss in batch:
                old = peak.get(worker, (0.0, 0.0))
                peak[worker] = (max(old[0], private), max(old[1], rss))
        episodes.UNPACK_COMPRESSED_SENSOR = True
        rows.append({"mode": mode, "workers": workers, "stream_mb": _stream_mb(out),
                     "private_growth_mb": max(p for p, _ in peak.values()), "peak_rss_growth_mb": max(r for _, r in peak.values())})
        print(f"compressed reference sensor, {mode}: private memory +{rows[-1]['private_growth_mb']:.0f} MB, "
              f"peak RSS +{rows[-1]['peak_rss_growth_mb']:.0f} MB per worker", flush=True)
    return rows


def _stream_mb(root: Path) -> float:
    """Size of every sensor stream under ``root``, uncompressed."""
    from vla_ds.data.episodes import SensorData

    return sum(SensorData(npz)._dtype.itemsize * math.prod(SensorData(npz).shape)
               for npz in root.rglob("sensor_data.npz")) / 1e6


class _MemoryProbe:
    """A sample's sensor window read by a worker, answered with (worker id, growth of its private
    memory, growth of its peak resident memory) since the worker started reading, in MB."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.start = None

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        from torch.utils.data import get_worker_info

        if self.start is None:  # this worker's own memory before it read anything
            self.start = _memory_mb()
        self.dataset.get_item(i, with_images=False)
        info = get_worker_info()
        private, rss = _memory_mb()
        return (info.id if info else 0, private - self.start[0], rss - self.start[1])


def _memory_mb() -> tuple[float, float]:
    """This process's resident anonymous (private) memory and peak resident memory, MB."""
    with open("/proc/self/status") as f:
        status = dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)
    return float(status["RssAnon"].split()[0]) / 1024, float(status["VmHWM"].split()[0]) / 1024


class _NoImages:
    """The training split as the cache serves it: no image decoding, a stand-in feature."""

    def __init__(self, dataset, hidden: int = 64):
        import numpy as np

        self.dataset = dataset
        self.feature = np.zeros(hidden, dtype=np.float32)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        from vla_ds.batch import VL_HIDDEN

        sample = self.dataset.get_item(i, with_images=False)
        sample[VL_HIDDEN] = self.feature
        return sample


if __name__ == "__main__":
    sys.exit(main())
