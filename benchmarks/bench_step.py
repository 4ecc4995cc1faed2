"""Engine overhead: time per optimizer step of vla_ds's training step against a minimal
hand-written PyTorch loop on the same model and batch.

    python benchmarks/bench_step.py [--sizes tiny mid] [--repeats 7] [--steps 10] [--json out.json]
    deepspeed --num_gpus 2 --master_port 29561 benchmarks/bench_step.py --distributed [--json out.json]

One process (default): for each size, the Stage 1 model on cached VL features (the
heads train; the frozen backbone is not run), one fixed batch, and

- ``vla_ds``: the engine ``vla_ds.training.engine.initialize`` builds from ds_configs/stage1.json
  (ZeRO-1 with DeepSpeed's BF16_Optimizer: bf16 weights, fp32 masters and fp32 gradient
  accumulation, parameter groups, clipping 1.0, one gradient reduction per optimizer step,
  fused AdamW) driven exactly as ``vla_ds.training.trainer.train`` drives it: ``engine.MicroSteps``
  per micro batch plus the per-step metrics row (``--log-every``, default 1 as in the
  shipped configs). ``--set zero_optimization.stage=2`` measures ZeRO-2 (stage2.json's
  optimizer, with vla_ds's one reduction per step) instead;
- ``hand``: the same policy in fp32 under ``torch.autocast(bfloat16)``, ``torch.optim.AdamW``,
  ``clip_grad_norm_(1.0)``, the same accumulation.

After warm-up the two alternate (A/B, B/A, ...) for ``--repeats`` rounds of ``--steps``
optimizer steps; the median per-step time of each gives ``overhead_ratio`` = vla_ds / hand.

``--distributed`` (under the DeepSpeed launcher, 2 ranks): the same comparison between
2-rank ZeRO-2 (vla_ds; stage1.json at ``zero_optimization.stage=2``, unless ``--set``
names another stage) and 2-rank plain DDP (hand loop wrapped in DistributedDataParallel,
``no_sync()`` on all but the last micro batch so it too reduces once per step).

``--conditioning-cost``: what the VL conditioning costs a Stage 1 step at the reference sizes
(the SPEC's sensor encoder and action expert, Qwen2.5-VL-3B's 2048-wide features, 2 views, a
650-row window of 8 channels): trainable parameters of the expert, forward + backward FLOPs
per sample counted by ``torch.utils.flop_counter`` and the cached features per sample, for
pooled, tokens (4x4 and 2x2, joint attention: the default) and tokens read by cross-attention.

Prints a table and writes JSON with ``--json``. Run by hand, never as a timed test.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
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

SIZES = {
    # sensor channels, window, overrides on top of the tiny preset
    "tiny": (16, 32, []),
    "mid": (64, 256, ["sensor_encoder.conv_channels=[128,256]", "sensor_encoder.d_model=256",
                      "sensor_encoder.num_layers=2", "sensor_encoder.num_heads=8",
                      "sensor_encoder.dim_feedforward=1024", "sensor_encoder.out_dim=512",
                      "action_expert.vl_feature_dim=512", "action_expert.d_model=256",
                      "action_expert.num_layers=4", "action_expert.num_heads=8",
                      "action_expert.dim_feedforward=1024"]),
}


def build(size: str, backbone_dir: Path, world: int, micro_batch: int, accum: int, extra: list[str] = ()):
    """(RunConfig, policy, batches): the Stage 1 policy of ``size`` and ``accum`` fixed micro batches."""
    from vla_ds.batch import random_batch
    from vla_ds.data.normalize import NormStats
    from vla_ds.training import config as config_lib
    from vla_ds.training.assembly import build_policy

    channels, window, overrides = SIZES[size]
    sets = [f"vla_ds.{o}" for o in overrides] + ["train.progress_bar=false", *extra]
    cfg = config_lib.run_config_from_flags(
        ["--ds_config", str(REPO / "ds_configs" / "stage1.json"), "--vl-model", str(backbone_dir), "--model-preset",
         "tiny", "--batch_size", str(micro_batch), "--grad_accum", str(accum), "--dataset_dir", "(synthetic)",
         "--sensor-window-size", str(window), *(arg for item in sets for arg in ("--set", item))], world)
    config_lib.resolve_schedule(cfg, steps_per_epoch=1000)
    stats = NormStats(np.zeros(7), np.ones(7), np.zeros(channels), np.ones(channels))
    policy, _, _ = build_policy(cfg, stats, channels)  # as train.py builds it
    backbone = policy.backbone
    g = torch.Generator().manual_seed(1)
    batches = [random_batch(micro_batch, window, channels, cfg.action_expert.horizon, hidden=backbone.hidden_size,
                            generator=g, vl_tokens=policy.action_expert.config.feature_tokens) for _ in range(accum)]
    return cfg, policy, batches


class VlaDsStep:
    """The trainer's hot path on the engine vla_ds builds."""

    def __init__(self, cfg, policy, batches, log_every: int, out_dir: Path):
        from vla_ds.training import engine as engine_lib
        from vla_ds.training.metrics import MetricsLogger

        self.engine, groups = engine_lib.initialize(policy, cfg)
        self.names = [g.name for g in groups]
        self.batches, self.cfg, self.log_every = batches, cfg, log_every
        self.metrics = MetricsLogger(out_dir, None, is_main=torch.distributed.get_rank() == 0)
        self.step_count = 0
        self.micro_step = engine_lib.MicroSteps(self.engine, cfg.train.seed, torch.distributed.get_rank(), len(batches),
                                             cfg.train.coalesce_grad_reduction)

    def __call__(self) -> None:
        from vla_ds.training import trainer

        engine = self.engine
        loss_sum = torch.zeros(())
        for k, batch in enumerate(self.batches):
            out, lrs = self.micro_step(batch, self.step_count, k)
            loss_sum += out["loss"].detach()
        self.step_count += 1
        if self.step_count % self.log_every == 0:
            trainer.log_step(self.metrics, engine, self.step_count, 1, loss_sum / len(self.batches), lrs,
                             self.names, 0, 1.0, 0.0, skipped=0)


class HandStep:
    """A minimal PyTorch loop: autocast bf16, AdamW, clipping, accumulation."""

    def __init__(self, cfg, policy, batches, ddp: bool = False):
        self.model = policy
        params = [p for p in policy.parameters() if p.requires_grad]
        group = cfg.optimizer_groups["other"]
        opt = cfg.deepspeed["optimizer"]["params"]
        self.optimizer = torch.optim.AdamW(params, lr=group.lr, betas=tuple(opt["betas"]), eps=opt["eps"],
                                           weight_decay=group.weight_decay)
        self.params = params
        self.batches = batches
        self.clip = cfg.deepspeed.get("gradient_clipping", 1.0)
        self.forward = policy
        self.ddp = ddp
        if ddp:
            self.forward = torch.nn.parallel.DistributedDataParallel(policy)

    def __call__(self) -> None:
        for k, batch in enumerate(self.batches):
            last = k == len(self.batches) - 1
            with (self.forward.no_sync() if self.ddp and not last else contextlib.nullcontext()):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = self.forward(batch)["loss"] / len(self.batches)
                loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def time_ab(a, b, warmup: int, repeats: int, steps: int, sync=lambda: None) -> tuple[list[float], list[float]]:
    for _ in range(warmup):
        a()
        b()
    times = {id(a): [], id(b): []}
    for r in range(repeats):
        for fn in ((a, b) if r % 2 == 0 else (b, a)):
            sync()
            start = time.perf_counter()
            for _ in range(steps):
                fn()
            sync()
            times[id(fn)].append((time.perf_counter() - start) / steps)
    return times[id(a)], times[id(b)]


CONDITIONINGS = {  # ActionExpertConfig fields of each row of --conditioning-cost
    "pooled": {"vl_conditioning": "pooled"},
    "tokens 4x4 (joint)": {"vl_conditioning": "tokens", "vl_grid": 4},
    "tokens 2x2 (joint)": {"vl_conditioning": "tokens", "vl_grid": 2},
    "tokens 4x4 (cross)": {"vl_conditioning": "tokens", "vl_grid": 4, "vl_attention": "cross"},
}


def conditioning_cost(batch: int = 2, views: int = 2, channels: int = 8, window: int = 650,
                      hidden: int = 2048) -> dict:
    """Per conditioning: expert parameters, Stage 1 forward+backward FLOPs and cache bytes per sample."""
    from torch.utils.flop_counter import FlopCounterMode

    from vla_ds.models.action_expert import ActionExpert, ActionExpertConfig
    from vla_ds.models.policy import derived_head_configs
    from vla_ds.models.sensor_encoder import SensorEncoder, SensorEncoderConfig
    from vla_ds.planning.memory import cache_bytes_per_sample

    rows = {}
    for name, fields in CONDITIONINGS.items():
        sensor_cfg, expert_cfg = derived_head_configs(SensorEncoderConfig(), ActionExpertConfig(**fields, num_views=views),
                                                      channels, window, hidden)
        torch.manual_seed(0)
        encoder, expert = SensorEncoder(sensor_cfg), ActionExpert(expert_cfg)
        shape = (batch, hidden) if expert_cfg.vl_conditioning == "pooled" else (batch, expert_cfg.num_vl_tokens, hidden)
        with FlopCounterMode(display=False) as counter:
            features = encoder(torch.randn(batch, window, channels), torch.ones(batch, dtype=torch.bool))
            loss, _ = expert.compute_loss(torch.randn(batch, expert_cfg.horizon, expert_cfg.action_dim),
                                          torch.zeros(batch, expert_cfg.horizon, dtype=torch.bool), torch.ones(batch),
                                          torch.randn(*shape), features)
            loss.backward()
        rows[name] = {"vl_tokens": expert_cfg.num_vl_tokens,
                      "expert_params": sum(p.numel() for p in expert.parameters()),
                      "step_gflop_per_sample": counter.get_total_flops() / batch / 1e9,
                      "cache_bytes_per_sample": cache_bytes_per_sample(expert_cfg, hidden)}
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--accum", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--log-every", type=int, default=1, help="metrics row every N steps, as train.log_every")
    p.add_argument("--distributed", action="store_true", help="2-rank ZeRO-2 vs 2-rank DDP (under the launcher)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for the vla_ds side, as train.py --set (to try variants)")
    p.add_argument("--conditioning-cost", action="store_true",
                   help="the VL conditioning's cost at the reference sizes instead (FLOPs, parameters, cache)")
    p.add_argument("--json", type=Path)
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.conditioning_cost:
        rows = conditioning_cost()
        print("Stage 1 step at the reference sizes (3B features, 2 views, 650 x 8 sensor window), per sample:")
        print(f"{'conditioning':<22}{'VL tokens':>10}{'expert params':>15}{'fwd+bwd GFLOP':>15}{'cache kB':>10}")
        for name, r in rows.items():
            print(f"{name:<22}{r['vl_tokens']:>10}{r['expert_params']:>15,}{r['step_gflop_per_sample']:>15.1f}"
                  f"{r['cache_bytes_per_sample'] / 1e3:>10.1f}")
        if a.json:
            a.json.write_text(json.dumps({"mode": "conditioning_cost", "rows": rows}, indent=2) + "\n")
        return 0
    os.environ.setdefault("OMP_NUM_THREADS", "1" if a.distributed else str(os.cpu_count()))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

    if a.distributed and not any(o.startswith("zero_optimization.stage=") for o in a.overrides):
        a.overrides.insert(0, "zero_optimization.stage=2")
    from vla_ds.log import setup_logging
    from vla_ds.models.tiny_backbone import make_tiny_backbone
    from vla_ds.training import distributed

    setup_logging(level=30)
    distributed.init_distributed(5)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    results = {}
    shared = [tempfile.mkdtemp(prefix="vla_ds_bench_step_") if rank == 0 else None]
    torch.distributed.broadcast_object_list(shared, src=0)  # one directory for every rank (one machine)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        backbone = Path(shared[0]) / "tiny"
        if rank == 0:
            make_tiny_backbone(backbone)
        torch.distributed.barrier()
        for size in a.sizes:
            cfg, policy, batches = build(size, backbone, world, a.micro_batch, a.accum, a.overrides)
            hand_policy = copy.deepcopy(policy)
            (tmp / f"metrics_{size}_{rank}").mkdir()
            vla = VlaDsStep(cfg, policy, batches, a.log_every, tmp / f"metrics_{size}_{rank}")
            hand = HandStep(cfg, hand_policy, batches, ddp=a.distributed)
            t_vla, t_hand = time_ab(vla, hand, a.warmup, a.repeats, a.steps, sync=torch.distributed.barrier)
            n_params = sum(p.numel() for p in hand_policy.parameters() if p.requires_grad)
            results[size] = {"trainable_params": n_params, "micro_batch": a.micro_batch, "accum": a.accum,
                             "ranks": world, "zero_stage": int(vla.engine.zero_optimization_stage()),
                             "optimizer": type(vla.engine.optimizer).__name__, "vla_ds_ms": statistics.median(t_vla) * 1e3,
                             "hand_ms": statistics.median(t_hand) * 1e3,
                             "vla_ds_all_ms": [t * 1e3 for t in t_vla], "hand_all_ms": [t * 1e3 for t in t_hand]}
            results[size]["overhead_ratio"] = results[size]["vla_ds_ms"] / results[size]["hand_ms"]
    torch.distributed.barrier()
    if rank != 0:
        return 0
    import shutil

    shutil.rmtree(shared[0], ignore_errors=True)
    first = next(iter(results.values()))
    engine_label = f"ZeRO-{first['zero_stage']} ({first['optimizer']})"
    label = f"{engine_label} vs DDP, 2 ranks" if a.distributed else f"vla_ds {engine_label} vs hand loop, 1 process"
    print(f"{label}: median ms per optimizer step (micro batch {a.micro_batch} x accumulation {a.accum}, "
          f"log every {a.log_every})")
    print(f"{'size':<6}{'params':>12}{'vla_ds ms':>12}{'hand ms':>12}{'overhead_ratio':>16}")
    for size, r in results.items():
        print(f"{size:<6}{r['trainable_params']:>12,}{r['vla_ds_ms']:>12.2f}{r['hand_ms']:>12.2f}"
              f"{r['overhead_ratio']:>16.3f}")
    out = {"mode": "distributed" if a.distributed else "single", "log_every": a.log_every, "sizes": results,
           "overhead_ratio": max(r["overhead_ratio"] for r in results.values())}
    if a.json:
        a.json.write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
