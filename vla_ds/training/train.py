"""``scripts/train.py``: parse -> build -> train.

    deepspeed --num_gpus 4 scripts/train.py --ds_config ds_configs/stage1.json --dataset_dir DATA
    python scripts/train.py --ds_config ds_configs/stage1.json --dataset_dir DATA   # one process

``main(argv)`` runs in-process (tests call it). Everything that can be wrong with the
user's input (the config) is checked before the process group starts, the rest (dataset,
backbone) right after it, before the engine; a :class:`~vla_ds.errors.VLAError` ends the run
with one message and exit code 2. SIGTERM /
SIGINT stop training at an optimizer step every rank agrees on, save a checkpoint there
(``train.save_on_signal``), end the DataLoader workers and exit with 143 / 130 and one line
naming the checkpoint to ``--resume`` from (:class:`~vla_ds.training.trainer.StopSignals`).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys

import numpy as np
import torch
from torch.utils.data import DataLoader

import vla_ds
from vla_ds.errors import DatasetError, VLAError, user_message
from vla_ds.log import setup_logging
from vla_ds.training import config as config_lib
from vla_ds.training import distributed as dist_lib
from vla_ds.training.assembly import Run, assemble
from vla_ds.training.distributed import DistributedError
from vla_ds.training.trainer import Stopped

logger = logging.getLogger("vla_ds.training.train")

def run(args: argparse.Namespace) -> dict:
    """Assemble the run, start the process group and the engine, train."""
    world, rank = dist_lib.env_world_size(), dist_lib.env_rank()
    cfg = config_lib.load_run_config(args, world)
    with distributed(cfg, world):  # first: the ranks build the dataset index together
        run_ = assemble(cfg, world, rank, source=str(args.ds_config))
        engine, groups = start_engine(run_)
        return train_run(run_, engine, groups)


def build_cache(args: argparse.Namespace) -> dict:
    """``scripts/build_cache.py``: the run's Stage 1 VL feature cache, built by every rank."""
    from vla_ds.data.loading import PolicyCollator

    world, rank = dist_lib.env_world_size(), dist_lib.env_rank()
    cfg = config_lib.load_run_config(args, world)
    if not config_lib.cache_enabled(cfg):
        raise config_lib.ConfigError(f"{args.ds_config}: the VL feature cache is off for this run "
                                     f"(stage {cfg.stage}, cache.mode {cfg.cache.mode}); nothing to build")
    with distributed(cfg, world):
        run_ = assemble(cfg, world, rank, source=str(args.ds_config))
        engine, _ = start_engine(run_)
        build_feature_cache(cfg, engine, run_.fingerprint, [run_.train_ds, run_.val_ds],
                            PolicyCollator(run_.input_builder), rank, world)
    return {"output_dir": run_.output_dir, "engine": engine}


@contextlib.contextmanager
def distributed(cfg, world: int):
    """The process group of the run ``cfg`` describes, started before the run is assembled (its
    ranks index the dataset together); a collective that fails inside (a dead peer, a timeout)
    becomes one line."""
    from vla_ds.training import engine as engine_lib

    dist_lib.init_distributed(cfg.train.dist_timeout_minutes, cfg.train.long_phase_minutes)
    try:
        with engine_lib.process_patches_undone():
            yield
    except RuntimeError as e:
        line = dist_lib.describe_distributed_failure(e, str(cfg.train.output_dir)) if world > 1 else None
        if line is None:
            raise
        raise dist_lib.DistributedError(line) from None


def start_engine(run_: Run):
    """Check the ranks agree, wrap the policy in the DeepSpeed engine, and start its fp32
    masters from the fp32 weights the run starts from (not their bf16 rounding). Collective."""
    from vla_ds.training import engine as engine_lib

    dist_lib.check_ranks(run_.cfg, {"dataset": f"{len(run_.train_ds)} train + {len(run_.val_ds)} val samples",
                                      "backbone fingerprint": run_.fingerprint})
    engine, groups = engine_lib.initialize(run_.policy, run_.cfg)
    fp32 = run_.start.fp32_weights()
    if fp32:
        engine_lib.set_master_weights(engine, fp32)
    return engine, groups


def train_run(run_: Run, engine, groups) -> dict:
    """Data loaders, resume state, EMA, then the training loop. Collective."""
    from vla_ds.data.loading import (
        LoaderDataset,
        PolicyCollator,
        describe_worker_death,
        shutdown_workers,
        workers_outlast_stop_signals,
    )
    from vla_ds.training import checkpoint, trainer

    cfg, rank, world = run_.cfg, run_.rank, run_.world
    collate = PolicyCollator(run_.input_builder)
    train_ds, val_ds = run_.train_ds, run_.val_ds
    if config_lib.cache_enabled(cfg):
        train_ds, val_ds = build_feature_cache(cfg, engine, run_.fingerprint, [train_ds, val_ds], collate, rank, world)
    if cfg.action_expert.vl_normalize and run_.start.fresh:  # else they come with the weights it starts from
        set_vl_feature_stats(run_, engine, train_ds, collate)
    # Bad samples skipped on request; each worker's current sample known if the worker dies.
    train_ds, val_ds = (LoaderDataset(ds, cfg.data.on_bad_sample, track_workers=cfg.data.num_workers > 0)
                        for ds in (train_ds, val_ds))
    # Workers outlast a job-wide SIGTERM / SIGINT: the rank finishes its step on their batches,
    # then ends them (below, however training ends).
    loader_kwargs = dict(collate_fn=collate, num_workers=cfg.data.num_workers,
                         persistent_workers=cfg.data.num_workers > 0, pin_memory=torch.cuda.is_available(),
                         worker_init_fn=workers_outlast_stop_signals if cfg.data.num_workers > 0 else None)
    train_loader = DataLoader(train_ds, batch_size=cfg.micro_batch_size, sampler=run_.sampler, drop_last=True,
                              **loader_kwargs)
    val_loader = None
    if len(val_ds):
        val_indices, num_real = trainer.validation_indices(len(val_ds), rank, world)
        val_bs = cfg.train.val_batch_size or cfg.micro_batch_size
        val_loader = (DataLoader(val_ds, batch_size=val_bs, sampler=val_indices, **loader_kwargs), num_real)

    state, client = trainer.TrainState(), None
    if cfg.train.resume:
        client = checkpoint.load_checkpoint(engine, cfg.train.resume)
        state = trainer.TrainState.from_client(client)
    ema = build_ema(cfg, engine, client)

    client_extra = {"norm_stats": run_.norm_stats.to_dict(), "config": cfg.to_dict(),
                    "backbone_fingerprint": run_.fingerprint, "vla_ds_version": vla_ds.__version__}
    try:
        state = trainer.train(cfg, engine, train_loader, val_loader, run_.sampler, [g.name for g in groups], state,
                              client_extra, run_.total_steps, ema)
    except RuntimeError as e:  # torch's SIGCHLD handler raises a dead worker wherever the main process is
        if "DataLoader worker" not in str(e):
            raise
        raise DatasetError(describe_worker_death(str(e), [train_ds, val_ds])) from None
    finally:  # persistent workers would live as long as the loaders (to interpreter exit after an exception)
        shutdown_workers(train_loader, val_loader[0] if val_loader is not None else None)
    if state.history:
        logger.info("done: %d steps, train/loss %.4f -> %.4f; checkpoints and metrics.jsonl in %s",
                    state.step, state.history[0], state.history[-1], run_.output_dir)
    return {"state": state, "output_dir": run_.output_dir, "engine": engine}


def build_ema(cfg, engine, client: dict | None):
    """The moving average of the trainable weights (``cfg.ema``), restored from a resumed
    checkpoint's client state when it has one. Collective under ZeRO-3."""
    from vla_ds.training import engine as engine_lib
    from vla_ds.training.ema import CLIENT_KEY, ParameterEMA

    saved = client.get(CLIENT_KEY) if client else None
    if not cfg.ema.enabled:
        if saved is not None:
            logger.info("ema.enabled is false: the checkpoint's EMA of the weights is not continued")
        return None
    with engine_lib.full_trainable_parameters(engine) as named:
        ema = ParameterEMA(cfg.ema, named)
    if saved is not None:
        ema.load_state_dict(saved, source=str(cfg.train.resume))
    elif client is not None:
        logger.warning("%s has no EMA of the weights: the average starts from its weights (step %d)",
                       cfg.train.resume, client["step"])
    logger.info("EMA of the trainable weights: decay %g, warm-up power %g (exported policies use it)",
                cfg.ema.decay, cfg.ema.warmup_power)
    return ema


def build_feature_cache(cfg, engine, fingerprint: str, datasets: list, collate, rank: int, world: int) -> list:
    """Stage 1: compute missing VL features (all ranks, disjoint shares) and return the
    datasets wrapped to serve them instead of images. Collective."""
    from vla_ds.training import cache

    backbone = engine.module.backbone
    grid = engine.module.action_expert.config.vl_grid_size  # what the built policy reads
    key, parts = cache.model_key(fingerprint, cfg.backbone, next(backbone.parameters()).dtype, grid)
    root = cache.cache_root(cfg.cache, cfg.data.dataset_dir, key, parts)
    store = cache.FeatureStore(root)
    keys = [cache.sample_keys(ds, cfg.data.dataset_dir) for ds in datasets]
    computed = cache.build(store, datasets, keys, backbone, collate, cfg.cache, cfg.data.num_workers,
                           rank, world, engine.device, on_bad_sample=cfg.data.on_bad_sample, grid=grid)
    logger.info("VL feature cache %s: %d features (%d computed now by this rank); images are not decoded in training",
                root, len(store.index), computed)
    return [cache.CachedFeatures(ds, k, store) for ds, k in zip(datasets, keys)]


def set_vl_feature_stats(run_: Run, engine, train_ds, collate) -> None:
    """A fresh run's VL feature statistics (``action_expert.vl_normalize``): estimated by rank 0
    from the training split (its cached features, or the backbone's), the same on every rank.
    Collective."""
    import deepspeed.comm as dist

    from vla_ds.training import cache
    from vla_ds.training.distributed import long_phase

    cfg, expert = run_.cfg, engine.module.action_expert
    mean, std = torch.zeros_like(expert.vl_norm.mean), torch.ones_like(expert.vl_norm.std)
    with long_phase("VL feature statistics"):
        if run_.rank == 0:
            m, s, n = cache.vl_feature_stats(train_ds, engine.module.backbone, collate, engine.device,
                                             expert.config.vl_grid_size, cfg.train.seed, cfg.data.num_workers)
            mean.copy_(torch.from_numpy(m))
            std.copy_(torch.from_numpy(s))
            logger.info("VL features standardised with the statistics of %d training samples (%s; std %.3g to %.3g, "
                        "median %.3g)", n, "cached" if isinstance(train_ds, cache.CachedFeatures) else "backbone",
                        float(s.min()), float(s.max()), float(np.median(s)))
    if run_.world > 1:
        dist.broadcast(mean, 0)
        dist.broadcast(std, 0)
    expert.vl_norm.set_stats(mean, std)


def main(argv: list[str] | None = None, action=None) -> int:
    """Entry point; returns the exit code (0, or 2 for a user error with its message printed;
    143 / 130 when SIGTERM / SIGINT stopped training, with the line naming the checkpoint).
    ``action`` is what to do with the parsed flags: :func:`run` (train), or :func:`build_cache`."""
    from vla_ds.training.distributed import adopt_launcher_env

    args = config_lib.build_parser("build_cache.py" if action is build_cache else "train.py").parse_args(argv)
    adopt_launcher_env()  # mpirun / srun: RANK etc. from their variables, so errors print once
    setup_logging()
    try:
        (action or run)(args)
    except Stopped as e:  # every rank stopped at the same step: rank 0 says where to resume
        if os.environ.get("RANK", "0") == "0":
            print(e, file=sys.stderr)
        return e.exit_code
    except DistributedError as e:  # a dead peer or a timeout: every surviving rank says so, once
        print(f"[rank {os.environ.get('RANK', '0')}] error: {e}", file=sys.stderr)
        return 1
    except VLAError as e:
        from vla_ds.training.distributed import distributed_started

        rank = os.environ.get("RANK", "0")
        # Before the process group starts every rank reads the same input and fails the same
        # way: rank 0 speaks for all. After, an error may be one rank's own (its data shard).
        if rank == "0" or distributed_started():
            prefix = "" if rank == "0" else f"[rank {rank}] "
            print(f"{prefix}error: {user_message(e)}", file=sys.stderr)
        return 2
    return 0


def build_cache_main(argv: list[str] | None = None) -> int:
    """``scripts/build_cache.py`` / ``vla-build-cache``: :func:`main` with :func:`build_cache`."""
    return main(argv, action=build_cache)


if __name__ == "__main__":
    sys.exit(main())
