"""Stage 1 with and without the VL feature cache: samples/s after the first epoch, the
share of step time spent decoding images and running the backbone, and the FLOP
estimate of both paths for the reference 3B backbone.

    python benchmarks/bench_cache.py [--batch-sizes 8 64] [--repeats 3] [--epochs 3] [--episodes 10] [--fp32] [--json out.json]

One process, tiny backbone, demo dataset (made in a temp dir), ds_configs/stage1.json, 0
DataLoader workers, both paths at each micro batch. The two paths alternate (A/B, B/A, ...)
for ``--repeats`` pairs of runs; each pair gives a speedup, and the table shows the median
pair with the lowest and highest speedup, so a slow spell of a shared machine shows as a
wide range instead of a wrong ratio. Run by hand; prints a table and writes JSON. Not a
test: timings on shared machines are noisy.

With the cache a step is the heads' forward, backward and update alone. To show how much
of that is the heads' own work, right after each pair the heads' bare forward + backward
is timed on one fixed batch (bf16 weights as in training; no optimizer, no engine, no data
loading): ``ceiling`` = uncached step time / that time bounds the speedup any cache could
give, since every cached step still runs the heads' forward and backward. At small
batches the tiny heads' per-operation costs keep the ceiling low.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PRECISION: list[str] = []  # --fp32 adds the overrides for an fp32 run (CPUs without fast bf16)


def run(label: str, data: Path, backbone: Path, out: Path, epochs: int, batch_size: int, extra: list[str]) -> dict:
    extra = [*extra, *PRECISION]
    from vla_ds.training.metrics import read_metrics
    from vla_ds.training.train import main

    argv = ["--ds_config", str(REPO / "ds_configs" / "stage1.json"), "--dataset_dir", str(data),
            "--vl-model", str(backbone), "--model-preset", "tiny", "--sensor-window-size", "32",
            "--num_workers", "0", "--batch_size", str(batch_size), "--epochs", str(epochs), "--lr", "1e-3",
            "--output_dir", str(out), "--set", "train.progress_bar=false", *extra]
    start = time.perf_counter()
    assert main(argv) == 0, label
    wall = time.perf_counter() - start
    rows = [r for r in read_metrics(out) if "train/loss" in r and r["epoch"] >= 2]  # after the first epoch
    return {"samples_per_s": statistics.median(r["samples_per_s"] for r in rows),
            "data_share": statistics.median(r["data_share"] for r in rows), "wall_s": wall}


def vl_share(data: Path, backbone_dir: Path, batch_size: int, batches: int = 20) -> dict:
    """Seconds per batch spent decoding images + building prompts, and in the backbone."""
    from vla_ds.data import DataConfig, VLADataset
    from vla_ds.models.backbone import BackboneConfig, VLBackbone, VLInputBuilder

    ds = VLADataset.from_config(DataConfig(dataset_dir=str(data), sensor_window_size=32))
    bcfg = BackboneConfig(model_name_or_path=str(backbone_dir))
    builder, backbone = VLInputBuilder.from_pretrained(bcfg), VLBackbone(bcfg).eval()
    decode = build = forward = 0.0
    for b in range(batches):
        idx = [(b * batch_size + j) % len(ds) for j in range(batch_size)]
        t0 = time.perf_counter()
        with_images = [ds.get_item(i) for i in idx]
        t1 = time.perf_counter()
        [ds.get_item(i, with_images=False) for i in idx]
        t2 = time.perf_counter()
        inputs = builder([s["images"] for s in with_images], [s["instruction"] for s in with_images])
        t3 = time.perf_counter()
        with torch.no_grad():
            backbone(*(inputs[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")))
        t4 = time.perf_counter()
        decode += (t1 - t0) - (t2 - t1)
        build += t3 - t2
        forward += t4 - t3
    return {"decode_s_per_batch": decode / batches, "prompt_s_per_batch": build / batches,
            "backbone_s_per_batch": forward / batches}


def heads_fwd_bwd_s(backbone_dir: Path, batch_size: int, steps: int = 30) -> float:
    """Median seconds of the tiny heads' bare forward + backward on one fixed batch of cached
    features (the demo's 16 sensor channels, window 32), in the run's precision (bf16
    weights, as the engine holds them): no optimizer, no engine, no data loading. A lower
    bound on any cached training step of these heads."""
    from bench_step import (
        build,  # a sibling script: benchmarks/ is on sys.path when this one runs
    )

    _, policy, batches = build("tiny", backbone_dir, 1, batch_size, 1, PRECISION[1::2])
    if not PRECISION:
        policy.bfloat16()
    params = [p for p in policy.parameters() if p.requires_grad]
    times = []
    for i in range(steps + 5):
        start = time.perf_counter()
        policy(batches[0])["loss"].backward()
        for p in params:
            p.grad = None
        if i >= 5:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def reference_flops() -> dict:
    """Training FLOPs per sample of the reference 3B setup (640x360, two views) with and
    without the cache, from the architecture (``vla_ds.planning.flops.backbone_forward_flops``):
    the frozen backbone's forward, plus forward + backward (= 3 x forward) of the heads."""
    from vla_ds.models.action_expert import ActionExpert, ActionExpertConfig
    from vla_ds.models.backbone import reference_backbone_config
    from vla_ds.models.sensor_encoder import SensorEncoder, SensorEncoderConfig
    from vla_ds.planning.flops import backbone_forward_flops, heads_forward_flops
    from vla_ds.planning.memory import image_tokens

    cfg = reference_backbone_config()
    view = image_tokens(360, 640)
    views, prompt = 2, 40
    lm_tokens = views * (view.tokens + 2) + prompt
    parts = backbone_forward_flops(cfg, lm_tokens, view.patches, views)
    backbone_fwd = sum(parts.values())
    with torch.device("meta"):
        se, ae = SensorEncoder(SensorEncoderConfig(in_channels=1026)), ActionExpert(ActionExpertConfig())
    heads_fwd = heads_forward_flops(se, ae, ActionExpertConfig().horizon)
    return {"lm_tokens": lm_tokens, "vision_patches": views * view.patches, "backbone_forward_gflop": backbone_fwd / 1e9,
            "heads_train_gflop": 3 * heads_fwd / 1e9,
            "flop_ratio_without_vs_with_cache": (backbone_fwd + 3 * heads_fwd) / (3 * heads_fwd)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--episodes", type=int, default=10, help="demo episodes per source")
    p.add_argument("--batch-sizes", "--batch-size", "--batch_size", dest="batch_sizes", type=int, nargs="+",
                   default=[8, 64], help="micro batches to measure, each with and without the cache "
                                         "(default 8, the demo's, and 64)")
    p.add_argument("--repeats", type=int, default=3, help="pairs of runs (no cache, cache) per micro batch")
    p.add_argument("--json", type=Path)
    p.add_argument("--fp32", action="store_true", help="run both paths in fp32 (bf16 is emulated on many CPUs)")
    a = p.parse_args(argv)
    if a.fp32:
        PRECISION[:] = ["--set", "bf16.enabled=false", "--set", "backbone.dtype=float32"]
    from vla_ds.data.demo import make_demo_dataset
    from vla_ds.log import setup_logging
    from vla_ds.models.tiny_backbone import make_tiny_backbone

    setup_logging(level=30)
    tiny = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        backbone = make_tiny_backbone(tmp / "tiny")
        data = make_demo_dataset(tmp / "data", episodes_per_source=(a.episodes, a.episodes))
        order = [("no_cache", ["--no-cache"]), ("cache", ["--set", f"cache.dir={tmp / 'cache'}"])]
        for b in a.batch_sizes:
            pairs = []
            for r in range(a.repeats):
                pair = {}
                for name, extra in (order if r % 2 == 0 else order[::-1]):
                    pair[name] = run(name, data, backbone, tmp / f"{name}{b}_{r}", a.epochs, b, extra)
                pair["heads_fwd_bwd_s"] = heads_fwd_bwd_s(backbone, b)  # right after the pair: the same machine state
                pair["speedup"] = pair["cache"]["samples_per_s"] / pair["no_cache"]["samples_per_s"]
                pair["speedup_ceiling"] = b / pair["no_cache"]["samples_per_s"] / pair["heads_fwd_bwd_s"]
                pairs.append(pair)
            median = sorted(pairs, key=lambda p: p["speedup"])[len(pairs) // 2]
            share = vl_share(data, backbone, b)
            step_s = b / median["no_cache"]["samples_per_s"]
            vl_s = share["decode_s_per_batch"] + share["prompt_s_per_batch"] + share["backbone_s_per_batch"]
            speedups = [p["speedup"] for p in pairs]
            tiny[str(b)] = {"batch_size": b, **median, "speedup_min": min(speedups), "speedup_max": max(speedups),
                            "pairs": pairs, **share, "vl_share_of_step_without_cache": min(1.0, vl_s / step_s),
                            "cached_step_s": b / median["cache"]["samples_per_s"]}
    flops = reference_flops()
    result = {"precision": "fp32" if a.fp32 else "bf16", "tiny_cpu": tiny, "reference_3b_640x360_2views": flops}
    print(f"Stage 1, tiny backbone, 1 process, {result['precision']}, samples/s in epochs >= 2, "
          f"median of {a.repeats} pairs of runs")
    print(f"{'batch':>6}{'no cache':>11}{'cache':>10}{'speedup':>9}{'range':>12}{'ceiling':>9}{'cached ms':>11}"
          f"{'heads ms':>10}{'decode ms':>11}{'prompt ms':>11}{'backbone ms':>13}{'VL share':>10}")
    for r in tiny.values():
        span = f"{r['speedup_min']:.1f}-{r['speedup_max']:.1f}x"
        print(f"{r['batch_size']:>6}{r['no_cache']['samples_per_s']:>11.1f}{r['cache']['samples_per_s']:>10.1f}"
              f"{r['speedup']:>8.1f}x{span:>12}{r['speedup_ceiling']:>8.1f}x{r['cached_step_s'] * 1e3:>11.1f}"
              f"{r['heads_fwd_bwd_s'] * 1e3:>10.1f}{r['decode_s_per_batch'] * 1e3:>11.1f}"
              f"{r['prompt_s_per_batch'] * 1e3:>11.1f}{r['backbone_s_per_batch'] * 1e3:>13.1f}"
              f"{r['vl_share_of_step_without_cache']:>10.0%}")
    print("(samples/s and speedup: the median pair; range: over all pairs; ceiling: uncached step / the heads' bare "
          "forward + backward (heads ms); decode + prompt + backbone: per batch without the cache; VL share: of "
          "the step without the cache)")
    print(f"reference 3B, 640x360 x 2 views ({flops['lm_tokens']} LM tokens, {flops['vision_patches']} patches): "
          f"backbone forward {flops['backbone_forward_gflop']:.0f} GFLOP/sample, heads training "
          f"{flops['heads_train_gflop']:.0f} GFLOP/sample -> {flops['flop_ratio_without_vs_with_cache']:.0f}x "
          f"fewer FLOPs per sample with the cache")
    if a.json:
        a.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
