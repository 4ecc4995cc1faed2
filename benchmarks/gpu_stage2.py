"""Stage 2 of the reference 3B model on one NVIDIA GPU, and Stage 1 on cached features.

    python benchmarks/gpu_stage2.py [--micro-batches 1 2 4 8] [--steps 10] [--json out.json]
    python benchmarks/gpu_stage2.py --tiny          # CPU smoke run of the same code path

Writes the Qwen2.5-VL-3B architecture with random bf16 weights (no download; about 7.5 GB
in ``--workdir``), builds the reference sensor encoder (1026 channels, window 650) and
action expert, and trains with ``ds_configs/stage2.json`` (LoRA r=16 on q/k/v/o, gradient
checkpointing, ZeRO-2, bf16) on two 640x360 views per sample through the engine
``vla_ds.training.engine.initialize`` builds and ``vla_ds.training.engine.MicroSteps`` drives, at each micro
batch: samples/s, LM tokens/s, peak CUDA memory, and FLOP utilisation against the GPU's
dense bf16 peak (``--peak-tflops``, default from the device name):

- model FLOPs per sample: vision tower forward (frozen: no backward), language model
  forward + input-gradient backward (its weights are frozen, LoRA's are tiny), the heads'
  forward + backward; the unused LM head is not counted;
- hardware FLOPs add the language model's recomputed forward (gradient checkpointing).

Then Stage 1 (``ds_configs/stage1.json``) on cached VL features: the batch (pooled
feature, 650x1026 sensor window, actions) is copied from pinned host memory every step,
as the DataLoader would hand it over. The synthetic batches leave data loading out: see
benchmarks/bench_data.py for that. Prints a table, writes JSON. Run by hand on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0}


def peak_tflops(name: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


def build(ds_config: str, backbone_dir: Path, micro: int, preset: str, window: int, extra: list[str]):
    """(cfg, engine, input builder) for one micro batch size, as train.py would build them."""
    from vla_ds.data.normalize import NormStats
    from vla_ds.training import config as config_lib
    from vla_ds.training import engine as engine_lib
    from vla_ds.training.assembly import build_policy

    sets = ["train.progress_bar=false", *extra]
    stage2 = ["--lora-r", "16", "--stage1-checkpoint", "none-random-heads-for-throughput"] if "stage2" in ds_config else []
    cfg = config_lib.run_config_from_flags(
        ["--ds_config", str(REPO / "ds_configs" / ds_config), "--vl-model", str(backbone_dir), "--model-preset", preset,
         "--batch_size", str(micro), "--grad_accum", "1", "--dataset_dir", "(synthetic)", "--sensor-window-size",
         str(window), *stage2, *(arg for item in sets for arg in ("--set", item))], 1)
    config_lib.resolve_schedule(cfg, steps_per_epoch=1000)
    channels = cfg.sensor_encoder.in_channels
    stats = NormStats(np.zeros(7), np.ones(7), np.zeros(channels), np.ones(channels))
    policy, builder, _ = build_policy(cfg, stats, channels)  # as train.py builds it (random heads)
    engine, _ = engine_lib.initialize(policy, cfg)
    return cfg, engine, builder


def numeric_batch(micro: int, window: int, channels: int, horizon: int, pin: bool) -> dict[str, torch.Tensor]:
    from vla_ds.batch import random_batch

    batch = random_batch(micro, window, channels, horizon, generator=torch.Generator().manual_seed(micro))
    return {k: v.pin_memory() for k, v in batch.items()} if pin else batch


def timed_steps(engine, batch_fn, warmup: int, steps: int, device) -> list[float]:
    from vla_ds.training import engine as engine_lib

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    micro_step = engine_lib.MicroSteps(engine, seed=0, rank=0, accum=1, coalesce=False)
    times = []
    for i in range(warmup + steps):
        sync()
        start = time.perf_counter()
        micro_step(batch_fn(), i, 0)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def stage2_flops(engine, cfg, lm_tokens: int, patches_per_view: int, views: int) -> tuple[float, float]:
    """(model FLOPs, hardware FLOPs) per sample of one Stage 2 training step."""
    from vla_ds.planning.flops import backbone_forward_flops, heads_forward_flops

    policy = engine.module
    hf_config = policy.backbone.vl_model.config
    parts = backbone_forward_flops(hf_config, lm_tokens, patches_per_view, views)
    heads = heads_forward_flops(policy.sensor_encoder, policy.action_expert, cfg.action_expert.horizon)
    vision = parts["vision"] + parts["vision_attention"] + parts["merger"]
    lm = parts["lm"] + parts["lm_attention"]
    model = vision + 2 * lm + 3 * heads
    recompute = lm if cfg.finetune.gradient_checkpointing else 0
    return float(model), float(model + recompute)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--micro-batches", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--stage1-micro-batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of this GPU")
    p.add_argument("--workdir", type=Path, default=None, help="where the random 3B backbone is written (7.5 GB)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny backbone and heads, 64x48 views")
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))

    from vla_ds.batch import VL_HIDDEN
    from vla_ds.log import setup_logging
    from vla_ds.models.tiny_backbone import make_reference_backbone, make_tiny_backbone
    from vla_ds.training import distributed

    setup_logging(level=30)
    distributed.init_distributed(30)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    peak = a.peak_tflops or peak_tflops(name)
    if a.tiny:
        preset, window, (width, height) = "tiny", 32, (64, 48)
        extra = ["vla_ds.sensor_encoder.in_channels=16"]
    else:  # the reference sensor encoder: 1026 channels (SensorEncoderConfig's default), window 650
        preset, window, (width, height) = "reference", 650, (640, 360)
        extra = []
    workdir = a.workdir or Path(tempfile.mkdtemp(prefix="vla_ds_gpu_"))
    backbone_dir = workdir / ("tiny" if a.tiny else "qwen25vl_3b_random")
    if not (backbone_dir / "config.json").exists():
        (make_tiny_backbone if a.tiny else make_reference_backbone)(backbone_dir)
    rng = np.random.default_rng(0)
    images = [[rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(2)] for _ in range(64)]

    rows = []
    for micro in a.micro_batches:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        cfg, engine, builder = build("stage2.json", backbone_dir, micro, preset, window, extra)
        vl = builder([images[i % len(images)] for i in range(micro)], ["Insert the needle into the eye trocar"] * micro)
        numeric = numeric_batch(micro, window, cfg.sensor_encoder.in_channels, cfg.action_expert.horizon,
                                pin=device.type == "cuda")
        batch = {**vl, **numeric}
        times = timed_steps(engine, lambda: batch, a.warmup, a.steps, device)
        step = statistics.median(times)
        lm_tokens = int(vl["attention_mask"].sum()) // micro
        patches = int(vl["image_grid_thw"].prod(dim=1).sum()) // (2 * micro)
        model_flops, hw_flops = stage2_flops(engine, cfg, lm_tokens, patches, 2)
        row = {"stage": "stage2", "micro_batch": micro, "step_s": step, "samples_per_s": micro / step,
               "lm_tokens_per_sample": lm_tokens, "tokens_per_s": lm_tokens * micro / step,
               "model_tflops_per_sample": model_flops / 1e12, "hardware_tflops_per_sample": hw_flops / 1e12,
               "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}
        if peak:
            row["mfu"] = model_flops * micro / step / (peak * 1e12)
            row["hfu"] = hw_flops * micro / step / (peak * 1e12)
        rows.append(row)
        print(f"stage2 micro batch {micro}: {row['samples_per_s']:.2f} samples/s", flush=True)
        del engine

    micro = a.stage1_micro_batch if not a.tiny else 16
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    cfg, engine, _ = build("stage1.json", backbone_dir, micro, preset, window, extra)
    hidden = engine.module.backbone.hidden_size
    tokens = engine.module.action_expert.config.feature_tokens
    features = torch.randn(micro, hidden) if tokens is None else torch.randn(micro, tokens, hidden)
    host = {**numeric_batch(micro, window, cfg.sensor_encoder.in_channels, cfg.action_expert.horizon,
                            pin=device.type == "cuda"),
            VL_HIDDEN: features.pin_memory() if device.type == "cuda" else features}
    times = timed_steps(engine, lambda: host, a.warmup, a.steps, device)  # micro_step copies it to the GPU
    step = statistics.median(times)
    rows.append({"stage": "stage1_cached", "micro_batch": micro, "step_s": step, "samples_per_s": micro / step,
                 "sensor_bytes_per_s": micro * window * cfg.sensor_encoder.in_channels * 4 / step,
                 "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None})

    print()
    print(f"device: {name}, dense bf16 peak {peak or '?'} TFLOPS")
    print(f"{'stage':<15}{'micro':>6}{'samples/s':>11}{'tokens/s':>11}{'MFU':>7}{'HFU':>7}{'peak GiB':>10}")
    for r in rows:
        mfu = f"{r['mfu']:.0%}" if "mfu" in r else "-"
        hfu = f"{r['hfu']:.0%}" if "hfu" in r else "-"
        mem = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "-"
        tokens = f"{r['tokens_per_s']:.0f}" if "tokens_per_s" in r else "-"
        print(f"{r['stage']:<15}{r['micro_batch']:>6}{r['samples_per_s']:>11.2f}{tokens:>11}{mfu:>7}{hfu:>7}{mem:>10}")
    if a.json:
        a.json.write_text(json.dumps({"device": name, "peak_bf16_tflops": peak, "rows": rows}, indent=2) + "\n")
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
