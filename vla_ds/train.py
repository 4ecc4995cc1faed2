"""``scripts/train.py``: parse -> build -> train.

    deepspeed --num_gpus 4 scripts/train.py --ds_config ds_configs/stage1.json --dataset_dir DATA
    python scripts/train.py --ds_config ds_configs/stage1.json --dataset_dir DATA   # one process

``main(argv)`` runs in-process (tests call it). Everything that can be wrong with the
user's input (config, dataset, backbone) is checked before the process group starts; a
:class:`~vla_ds.errors.VLAError` ends the run with one message and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

import vla_ds
from vla_ds import config as config_lib
from vla_ds.engine import DistributedError
from vla_ds.errors import DatasetError, VLAError, user_message
from vla_ds.log import setup_logging

logger = logging.getLogger("vla_ds.train")

def run(args: argparse.Namespace, cache_only: bool = False) -> dict:
    """Build everything and train; with ``cache_only``, stop once the Stage 1 VL feature
    cache is complete (``scripts/build_cache.py``)."""
    from vla_ds import checkpoint, engine as engine_lib, trainer
    from vla_ds.data import DistributedWeightedSampler, NormStats, VLADataset, compute_norm_stats, split_train_val
    from vla_ds.models import count_parameters
    from vla_ds.models.backbone import VLBackbone, VLInputBuilder
    from vla_ds.models.policy import VLAPolicy

    world, rank = engine_lib.env_world_size(), engine_lib.env_rank()
    cfg = config_lib.load_run_config(args, world)
    logger.info("vla_ds %s | %s | %d rank(s) | micro batch %d x accumulation %d x %d = global batch %d",
                vla_ds.__version__, cfg.stage, world, cfg.micro_batch_size, cfg.grad_accum, world,
                cfg.deepspeed["train_batch_size"])
    if cfg.stage == "stage1":
        logger.info("Stage 1: training sensor encoder + action expert (VL model frozen)")
    else:
        logger.info("Stage 2: Training Full Model %s", "with LoRA" if cfg.finetune.mode == "lora"
                    else f"(VL fine-tuning: {cfg.finetune.mode})")

    # --- data (indexing only; images are decoded by the DataLoader workers)
    dataset = VLADataset.from_config(cfg.data)
    train_ds, val_ds = split_train_val(dataset, cfg.data.val_split, cfg.train.seed)
    logger.info("%s", dataset.describe())
    logger.info("split by episode: %d train samples, %d val samples", len(train_ds), len(val_ds))
    # Without mixture.yaml an epoch is a permutation; with it, a weighted draw.
    weights = train_ds.sample_weights if train_ds.source_weights is not None else None
    sampler = DistributedWeightedSampler(len(train_ds), num_replicas=world, rank=rank, seed=cfg.train.seed,
                                         weights=weights)
    steps_per_epoch = len(sampler) // cfg.micro_batch_size // cfg.grad_accum
    if steps_per_epoch == 0:
        raise config_lib.ConfigError(
            f"{cfg.data.dataset_dir}: {len(sampler)} training samples per rank are fewer than one optimizer "
            f"step needs (micro batch {cfg.micro_batch_size} x accumulation {cfg.grad_accum}); "
            "lower --batch_size / --grad_accum or use fewer ranks")
    total_steps = config_lib.resolve_schedule(cfg, steps_per_epoch)
    config_lib.validate_deepspeed(cfg, source=str(args.ds_config))
    logger.info("%d optimizer steps per epoch, %d in this run", steps_per_epoch, total_steps)

    # --- what the run starts from: a checkpoint to resume, a weights-only .pt, Stage 1 heads, or nothing
    resume_states = stage1 = weights = None
    if cfg.train.resume and Path(cfg.train.resume).is_file():  # the guide's --resume diffusion_epochN.pt
        weights = checkpoint.read_weights_file(cfg.train.resume)
        output = fresh_output_dir(Path(cfg.train.output_dir))
        logger.info("--resume %s: a weights-only checkpoint (no optimizer, schedule or data position): training "
                    "starts from its weights with a fresh optimizer and learning-rate schedule at step 0, into %s%s",
                    weights.source, output,
                    f" ({cfg.train.output_dir} holds an earlier run)" if str(output) != cfg.train.output_dir else "")
        cfg.train = dataclasses.replace(cfg.train, resume="", output_dir=str(output))
        continue_head(weights.head, cfg, str(weights.source))
        if weights.norm_stats is not None:
            norm_stats = NormStats.from_dict(weights.norm_stats)
        else:
            logger.warning("%s has no normalisation statistics; computing them from the training split",
                           weights.source)
            norm_stats = compute_norm_stats(train_ds, seed=cfg.train.seed)
    elif cfg.train.resume:
        resume_file, resume_states = checkpoint.read_model_states(cfg.train.resume)
        continue_head(checkpoint.head_settings(resume_states["config"].get(config_lib.PROJECT_KEY, {})
                                               .get("action_expert")), cfg, str(resume_file))
        if checkpoint.is_universal(resume_file.parent):  # from convert_checkpoint.py --to universal
            cfg.deepspeed.setdefault("checkpoint", {})["load_universal"] = True
        norm_stats = NormStats.from_dict(resume_states["norm_stats"])
    elif cfg.stage == "stage2":
        stage1 = checkpoint.read_stage1(cfg.train.stage1_checkpoint)
        continue_head(stage1.head, cfg, f"{stage1.source} (the Stage 1 checkpoint)")
        if stage1.norm_stats is not None:
            norm_stats = NormStats.from_dict(stage1.norm_stats)
        else:
            logger.warning("%s has no normalisation statistics; computing them from the training split", stage1.source)
            norm_stats = compute_norm_stats(train_ds, seed=cfg.train.seed)
    else:
        norm_stats = compute_norm_stats(train_ds, seed=cfg.train.seed)

    # --- model (the backbone loads before the process group, so a bad path fails fast)
    logger.info("Loading VL backbone from %s", cfg.backbone.model_name_or_path)
    backbone = VLBackbone(cfg.backbone, device=engine_lib.backbone_device(cfg))
    fingerprint = backbone.fingerprint()  # of the base weights, before adapters or ZeRO-3 partitioning
    backbone.freeze()
    if resume_states is not None:
        checkpoint.check_resume_compatible(resume_states, resume_file, fingerprint, {
            "world_size": world, "micro_batch_size": cfg.micro_batch_size, "grad_accum": cfg.grad_accum,
            "train_samples": len(train_ds), "seed": cfg.train.seed})
    input_builder = VLInputBuilder.from_pretrained(cfg.backbone)
    log_tokens_per_sample(train_ds, input_builder, cfg.backbone.max_pixels)
    trainer.seed_everything(cfg.train.seed)
    policy = VLAPolicy(backbone, cfg.sensor_encoder, cfg.action_expert, norm_stats,
                       sensor_channels=dataset.sensor_channels, sensor_window_size=cfg.data.sensor_window_size,
                       sensor_loss_weight=cfg.train.sensor_loss_weight)
    if stage1 is not None:
        checkpoint.load_stage1_weights(policy, stage1.source, stage1.parts)
    if cfg.stage == "stage2":
        if cfg.finetune.mode == "lora":
            logger.info("Applying LoRA fine-tuning to VL model (r=%d, alpha=%g, dropout=%g, targets %s%s)",
                        cfg.finetune.lora_r, cfg.finetune.lora_alpha, cfg.finetune.lora_dropout,
                        ",".join(cfg.finetune.lora_target_modules), " + vision attention" if cfg.finetune.lora_vision else "")
        policy.backbone.setup_finetune(cfg.finetune)
        n_vl = count_parameters(policy.backbone)
        logger.info("   %s trainable parameters: %s", "LoRA" if cfg.finetune.mode == "lora" else "VL", f"{n_vl:,}")
    if weights is not None:
        checkpoint.load_weights_file(policy, weights)
    n_backbone = count_parameters(policy.backbone, trainable_only=False) - count_parameters(policy.backbone)
    logger.info("   Backbone: %s frozen parameters", f"{n_backbone:,}")
    logger.info("   Sensor encoder: %s parameters", f"{count_parameters(policy.sensor_encoder, trainable_only=False):,}")
    logger.info("   Action expert: %s parameters", f"{count_parameters(policy.action_expert, trainable_only=False):,}")

    output_dir = Path(cfg.train.output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        if rank == 0:
            cfg.save(output_dir / "config.json")
    except OSError as e:
        raise config_lib.ConfigError(f"{output_dir}: cannot write the output directory ({e.strerror})") from None

    # --- DeepSpeed
    engine_lib.init_distributed(cfg.train.dist_timeout_minutes, cfg.train.long_phase_minutes)
    try:
        with engine_lib.process_patches_undone():
            return _run_distributed(args, cfg, policy, input_builder, fingerprint, train_ds, val_ds, sampler, norm_stats,
                                    total_steps, output_dir, rank, world, cache_only, start_weights(stage1, weights))
    except RuntimeError as e:  # a collective failed: translate a dead peer or a timeout into one line
        line = engine_lib.describe_distributed_failure(e, str(output_dir)) if world > 1 else None
        if line is None:
            raise
        raise engine_lib.DistributedError(line) from None


def _run_distributed(args, cfg, policy, input_builder, fingerprint, train_ds, val_ds, sampler, norm_stats,
                     total_steps, output_dir, rank, world, cache_only, fp32_start=None) -> dict:
    """Everything after the process group starts: checks across ranks, engine, cache, training."""
    from vla_ds import checkpoint, engine as engine_lib, trainer
    from vla_ds.data.loading import LoaderDataset

    engine_lib.check_ranks(cfg, {"dataset": f"{len(train_ds)} train + {len(val_ds)} val samples",
                                "backbone fingerprint": fingerprint})
    engine, groups = engine_lib.initialize(policy, cfg)
    if fp32_start:  # the fp32 weights the run starts from, not their bf16 rounding, start the masters
        engine_lib.set_master_weights(engine, fp32_start)

    collate = trainer.PolicyCollator(input_builder)
    if config_lib.cache_enabled(cfg):
        train_ds, val_ds = build_feature_cache(cfg, engine, fingerprint, [train_ds, val_ds], collate, rank, world)
    elif cache_only:
        raise config_lib.ConfigError(f"{args.ds_config}: the VL feature cache is off for this run "
                                     f"(stage {cfg.stage}, cache.mode {cfg.cache.mode}); nothing to build")
    # Bad samples skipped on request; each worker's current sample known if the worker dies.
    train_ds, val_ds = (LoaderDataset(ds, cfg.data.on_bad_sample, track_workers=cfg.data.num_workers > 0)
                        for ds in (train_ds, val_ds))
    if cache_only:
        return {"output_dir": output_dir, "engine": engine}
    loader_kwargs = dict(collate_fn=collate, num_workers=cfg.data.num_workers,
                         persistent_workers=cfg.data.num_workers > 0, pin_memory=torch.cuda.is_available())
    train_loader = DataLoader(train_ds, batch_size=cfg.micro_batch_size, sampler=sampler, drop_last=True,
                              **loader_kwargs)
    val_loader = None
    if len(val_ds):
        val_indices, num_real = trainer.validation_indices(len(val_ds), rank, world)
        val_bs = cfg.train.val_batch_size or cfg.micro_batch_size
        val_loader = (DataLoader(val_ds, batch_size=val_bs, sampler=val_indices, **loader_kwargs), num_real)

    state, client = trainer.TrainState(), None
    if cfg.train.resume:
        client = checkpoint.load_checkpoint(engine, cfg.train.resume)
        state = trainer.TrainState(step=client["step"], epoch=client["epoch"],
                                   micro_step_in_epoch=client["micro_step_in_epoch"])
    ema = build_ema(cfg, engine, client)

    client_extra = {"norm_stats": norm_stats.to_dict(), "config": cfg.to_dict(),
                    "backbone_fingerprint": fingerprint, "vla_ds_version": vla_ds.__version__}
    try:
        state = trainer.train(cfg, engine, train_loader, val_loader, sampler, [g.name for g in groups], state,
                              client_extra, total_steps, ema)
    except RuntimeError as e:  # torch's SIGCHLD handler raises a dead worker wherever the main process is
        if "DataLoader worker" not in str(e):
            raise
        raise DatasetError(trainer.describe_worker_death(str(e), [train_ds, val_ds])) from None
    if state.history:
        logger.info("done: %d steps, train/loss %.4f -> %.4f; checkpoints and metrics.jsonl in %s",
                    state.step, state.history[0], state.history[-1], output_dir)
    return {"state": state, "output_dir": output_dir, "engine": engine}


def fresh_output_dir(output_dir: Path) -> Path:
    """``output_dir``, or when it holds another run's checkpoints the first free
    ``<output_dir>_resumed``, ``_resumed2``, ...: a run that starts at step 0 must not mix its
    checkpoints and metrics with (or overwrite) an earlier run's."""
    from vla_ds.checkpoint import LATEST_FILE

    candidate, n = output_dir, 1
    while (candidate / LATEST_FILE).exists():
        candidate = output_dir.with_name(f"{output_dir.name}_resumed{n if n > 1 else ''}")
        n += 1
    return candidate


def start_weights(stage1, weights) -> dict:
    """The weights loaded into the policy before the engine, by VLAPolicy name: Stage 1's
    heads, then a weights-only ``--resume`` file over them."""
    out = {f"{part}.{name}": value for part, state in stage1.parts.items()
           for name, value in state.items()} if stage1 is not None else {}
    return {**out, **(weights.state if weights is not None else {})}


def log_tokens_per_sample(dataset, input_builder, max_pixels) -> None:
    """One line with the first training sample's image size, LM tokens per view and prompt
    length: what backbone.max_pixels makes of the cameras (the backbone's memory scales with it)."""
    sample = dataset[0]
    per_view, total = input_builder.token_counts(sample["images"], sample["instruction"])
    views = ", ".join(f"{img.shape[1]}x{img.shape[0]} -> {w}x{h}: {n} tokens"
                      for img, (h, w, n) in zip(sample["images"], per_view))
    logger.info("LM tokens per sample: %d (%s; backbone.max_pixels %s)", total, views, max_pixels)


def continue_head(stored: dict[str, str], cfg, source: str) -> None:
    """Stage 2 and ``--resume`` continue heads trained for one objective: train them towards
    another and they start from scratch. ``cfg.action_expert`` takes the checkpoint's
    objective and prediction_type; a config that asked for another head is told so."""
    keys = ["objective"] + (["prediction_type"] if stored["objective"] == "diffusion" else [])
    config_head = {k: getattr(cfg.action_expert, k) for k in ("objective", "prediction_type")}
    if all(stored[k] == config_head[k] for k in keys):
        return
    logger.warning("%s trained an action expert with %s; continuing with it, not with the config's %s",
                   source, _describe_head(stored), _describe_head(config_head))
    cfg.action_expert = dataclasses.replace(cfg.action_expert, **{k: stored[k] for k in keys})


def _describe_head(head: dict[str, str]) -> str:
    if head["objective"] == "diffusion":
        return f"objective diffusion (prediction_type {head['prediction_type']})"
    return f"objective {head['objective']}"


def build_ema(cfg, engine, client: dict | None):
    """The moving average of the trainable weights (``cfg.ema``), restored from a resumed
    checkpoint's client state when it has one. Collective under ZeRO-3."""
    from vla_ds import engine as engine_lib
    from vla_ds.ema import CLIENT_KEY, ParameterEMA

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
    from vla_ds import cache

    backbone = engine.module.backbone
    key, parts = cache.model_key(fingerprint, cfg.backbone, next(backbone.parameters()).dtype)
    root = cache.cache_root(cfg.cache, cfg.data.dataset_dir, key, parts)
    store = cache.FeatureStore(root)
    keys = [cache.sample_keys(ds, cfg.data.dataset_dir) for ds in datasets]
    computed = cache.build(store, datasets, keys, backbone, collate, cfg.cache, cfg.data.num_workers,
                           rank, world, engine.device, on_bad_sample=cfg.data.on_bad_sample)
    logger.info("VL feature cache %s: %d features (%d computed now by this rank); images are not decoded in training",
                root, len(store.index), computed)
    return [cache.CachedFeatures(ds, k, store) for ds, k in zip(datasets, keys)]


def main(argv: list[str] | None = None, cache_only: bool = False) -> int:
    """Entry point; returns the exit code (0, or 2 for a user error with its message printed)."""
    args = config_lib.build_parser().parse_args(argv)
    setup_logging()
    try:
        run(args, cache_only=cache_only)
    except DistributedError as e:  # a dead peer or a timeout: every surviving rank says so, once
        print(f"[rank {os.environ.get('RANK', '0')}] error: {e}", file=sys.stderr)
        return 1
    except VLAError as e:
        from vla_ds.engine import distributed_started

        rank = os.environ.get("RANK", "0")
        # Before the process group starts every rank reads the same input and fails the same
        # way: rank 0 speaks for all. After, an error may be one rank's own (its data shard).
        if rank == "0" or distributed_started():
            prefix = "" if rank == "0" else f"[rank {rank}] "
            print(f"{prefix}error: {user_message(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
