"""Assemble a run: everything train.py builds before the DeepSpeed engine starts.

:func:`assemble` turns a resolved :class:`~vla_ds.training.config.RunConfig` into a :class:`Run`:
the dataset and its split by episode, the sampler, the schedule's total steps, what the run
starts from (a checkpoint to resume, the guide's weights-only ``.pt``, Stage 1's heads, or
nothing) with its normalisation statistics, and the policy (backbone loaded, fingerprinted
and frozen, heads built, LoRA or unfrozen layers set up, starting weights loaded). Every
problem with the user's input surfaces here, before the engine starts. The process group is
up (the ranks index the dataset together, :func:`vla_ds.data.dataset.build_index`); a rank's
error during that phase is reported by the others as that rank's failure.

``train.py``, ``build_cache.py`` and the benchmarks (through :func:`build_policy`, on
synthetic batches) use it, so they all build the same model the same way.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vla_ds.training import config as config_lib
from vla_ds.training.config import RunConfig

logger = logging.getLogger("vla_ds.training.train")


@dataclass
class Start:
    """What a run starts from, read before any model is built (at most one of the three)."""

    resume_file: Path | None = None        # --resume of an engine checkpoint: its model-states file
    resume_states: dict | None = None      # ...and its contents
    stage1: Any = None                     # checkpoint.Stage1Weights: Stage 2's heads
    weights: Any = None                    # checkpoint.WeightsFile: the guide's --resume X.pt

    @property
    def fresh(self) -> bool:
        """Nothing to start from: the heads are initialised here."""
        return self.resume_file is None and self.stage1 is None and self.weights is None

    def fp32_weights(self) -> dict[str, torch.Tensor]:
        """The weights loaded into the policy before the engine, by VLAPolicy name (Stage 1's
        heads, or a weights-only file): the optimizer's fp32 masters start from them."""
        out = {f"{part}.{name}": value for part, state in self.stage1.parts.items()
               for name, value in state.items()} if self.stage1 is not None else {}
        return {**out, **(self.weights.state if self.weights is not None else {})}


@dataclass
class Run:
    """One assembled run (:func:`assemble`)."""

    cfg: RunConfig
    world: int
    rank: int
    dataset: Any                  # VLADataset, the whole dataset
    train_ds: Any                 # its training split (by episode)
    val_ds: Any
    sampler: Any                  # DistributedWeightedSampler over train_ds
    steps_per_epoch: int
    total_steps: int              # optimizer steps of the whole schedule
    start: Start
    norm_stats: Any               # NormStats
    fingerprint: str              # of the base backbone
    input_builder: Any            # VLInputBuilder
    policy: Any                   # VLAPolicy
    output_dir: Path


def assemble(cfg: RunConfig, world: int, rank: int, source: str = "config") -> Run:
    """Build the run ``cfg`` describes for ``rank`` of ``world`` (``source`` names the JSON in
    messages). May change ``cfg``: the schedule's "auto" values, a continued head, a weights-only
    resume's output dir. Writes ``config.json`` on rank 0."""
    from vla_ds.data import DistributedWeightedSampler, VLADataset, split_train_val

    log_run_header(cfg, world)
    # --- data (indexing only; images are decoded by the DataLoader workers). The index is built
    # once per dataset, split across the ranks, and memory-mapped by every rank and worker.
    from vla_ds.data.dataset import build_index
    from vla_ds.training.distributed import long_phase

    index = build_index(cfg.data, rank, world, long_phase, job=os.environ.get("MASTER_PORT", ""))
    dataset = VLADataset.from_config(cfg.data, index)
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
    config_lib.validate_deepspeed(cfg, source=source)
    logger.info("%d optimizer steps per epoch, %d in this run (%s); %s", steps_per_epoch, total_steps,
                f"--max_steps, {total_steps / steps_per_epoch:.2f} epochs" if cfg.train.max_steps
                else f"{cfg.train.epochs} epochs", config_lib.describe_schedule(cfg))

    start, norm_stats = read_start(cfg, train_ds)
    # Stage 2 and --resume carry the statistics, and the sensor transform, of the run they start
    # from: this data must make its windows the same way (a served policy applies that one).
    from vla_ds.data.observation import SensorTransform, check_same_transform

    check_same_transform(SensorTransform.stored(getattr(norm_stats, "sensor_transform", None)), dataset.episodes,
                         cfg.data.dataset_dir, who="the checkpoint the run starts from")
    if norm_stats.action_dim != dataset.action_dim:
        raise config_lib.ConfigError(
            f"{cfg.data.dataset_dir}: {dataset.action_dim}-dimensional actions ({', '.join(dataset.action_names)}), but "
            f"the checkpoint the run starts from predicts {norm_stats.action_dim}; train on data with its action "
            "dimension (data.lerobot.actions) or start a new Stage 1")
    # D and the camera views follow the data (a LeRobot action's own dimension); config.json records them.
    cfg.action_expert = dataclasses.replace(cfg.action_expert, action_dim=norm_stats.action_dim,
                                            num_views=dataset.num_views)
    policy, input_builder, fingerprint = build_policy(cfg, norm_stats, dataset.sensor_channels, start)
    if start.resume_states is not None:
        from vla_ds.training import checkpoint

        checkpoint.check_resume_compatible(start.resume_states, start.resume_file, fingerprint,
                                           checkpoint.run_layout(cfg, world, len(train_ds)))
    log_tokens_per_sample(train_ds, input_builder, cfg.backbone.max_pixels)
    output_dir = prepare_output_dir(cfg, rank)
    return Run(cfg, world, rank, dataset, train_ds, val_ds, sampler, steps_per_epoch, total_steps, start, norm_stats,
               fingerprint, input_builder, policy, output_dir)


def log_run_header(cfg: RunConfig, world: int) -> None:
    import vla_ds

    logger.info("vla_ds %s | %s | %d rank(s) | micro batch %d x accumulation %d x %d = global batch %d",
                vla_ds.__version__, cfg.stage, world, cfg.micro_batch_size, cfg.grad_accum, world,
                cfg.deepspeed["train_batch_size"])
    if cfg.stage == "stage1":
        logger.info("Stage 1: training sensor encoder + action expert (VL model frozen)")
    else:
        logger.info("Stage 2: Training Full Model %s", "with LoRA" if cfg.finetune.mode == "lora"
                    else f"(VL fine-tuning: {cfg.finetune.mode})")


def read_start(cfg: RunConfig, train_ds) -> tuple[Start, Any]:
    """What the run starts from and its normalisation statistics (the checkpoint's, or computed
    from ``train_ds``). The head of a checkpoint is continued (:func:`continue_head`)."""
    from vla_ds.data import NormStats, compute_norm_stats
    from vla_ds.training import checkpoint

    start, stats = Start(), None
    if cfg.train.resume and Path(cfg.train.resume).is_file():  # the guide's --resume diffusion_epochN.pt
        start.weights = checkpoint.read_weights_file(cfg.train.resume)
        output = fresh_output_dir(Path(cfg.train.output_dir))
        logger.info("--resume %s: a weights-only checkpoint (no optimizer, schedule or data position): training "
                    "starts from its weights with a fresh optimizer and learning-rate schedule at step 0, into %s%s",
                    start.weights.source, output,
                    f" ({cfg.train.output_dir} holds an earlier run)" if str(output) != cfg.train.output_dir else "")
        cfg.train = dataclasses.replace(cfg.train, resume="", output_dir=str(output))
        continue_head(start.weights.head, cfg, str(start.weights.source))
        stats, stats_source = start.weights.norm_stats, start.weights.source
    elif cfg.train.resume:
        start.resume_file, start.resume_states = checkpoint.read_model_states(cfg.train.resume)
        continue_head(checkpoint.head_settings(start.resume_states["config"].get(config_lib.PROJECT_KEY, {})
                                               .get("action_expert")), cfg, str(start.resume_file))
        warn_schedule_change(start.resume_states["config"], cfg, start.resume_file)
        if checkpoint.is_universal(start.resume_file.parent):  # from convert_checkpoint.py --to universal
            cfg.deepspeed.setdefault("checkpoint", {})["load_universal"] = True
        stats, stats_source = start.resume_states["norm_stats"], start.resume_file
    elif cfg.stage == "stage2":
        start.stage1 = checkpoint.read_stage1(cfg.train.stage1_checkpoint)
        continue_head(start.stage1.head, cfg, f"{start.stage1.source} (the Stage 1 checkpoint)")
        stats, stats_source = start.stage1.norm_stats, start.stage1.source
    else:
        return start, compute_norm_stats(train_ds, seed=cfg.train.seed)
    if stats is None:
        logger.warning("%s has no normalisation statistics; computing them from the training split", stats_source)
        return start, compute_norm_stats(train_ds, seed=cfg.train.seed)
    return start, NormStats.from_dict(stats)


def build_policy(cfg: RunConfig, norm_stats, sensor_channels: int, start: Start | None = None):
    """``(policy, input_builder, fingerprint)``: the backbone loaded (onto this rank's GPU when
    there is one), fingerprinted and frozen, the heads built, VL fine-tuning set up for Stage 2,
    and ``start``'s weights loaded. The backbone loads before any process group, so a bad path
    fails fast."""
    from vla_ds.models import count_parameters
    from vla_ds.models.backbone import VLBackbone, VLInputBuilder
    from vla_ds.models.policy import VLAPolicy
    from vla_ds.training import checkpoint, trainer
    from vla_ds.training import engine as engine_lib

    start = start or Start()
    logger.info("Loading VL backbone from %s", cfg.backbone.model_name_or_path)
    backbone = VLBackbone(cfg.backbone, device=engine_lib.backbone_device(cfg))
    fingerprint = backbone.fingerprint()  # of the base weights, before adapters or ZeRO-3 partitioning
    backbone.freeze()
    input_builder = VLInputBuilder.from_pretrained(cfg.backbone)
    trainer.seed_everything(cfg.train.seed)
    policy = VLAPolicy(backbone, cfg.sensor_encoder, cfg.action_expert, norm_stats,
                       sensor_channels=sensor_channels, sensor_window_size=cfg.data.sensor_window_size,
                       sensor_loss_weight=cfg.train.sensor_loss_weight)
    if start.stage1 is not None:
        checkpoint.load_stage1_weights(policy, start.stage1.source, start.stage1.parts)
    if cfg.stage == "stage2":
        if cfg.finetune.mode == "lora":
            logger.info("Applying LoRA fine-tuning to VL model (r=%d, alpha=%g, dropout=%g, targets %s%s)",
                        cfg.finetune.lora_r, cfg.finetune.lora_alpha, cfg.finetune.lora_dropout,
                        ",".join(cfg.finetune.lora_target_modules), " + vision attention" if cfg.finetune.lora_vision else "")
        policy.backbone.setup_finetune(cfg.finetune)
        n_vl = count_parameters(policy.backbone)
        logger.info("   %s trainable parameters: %s", "LoRA" if cfg.finetune.mode == "lora" else "VL", f"{n_vl:,}")
    if start.weights is not None:
        checkpoint.load_weights_file(policy, start.weights)
    n_backbone = count_parameters(policy.backbone, trainable_only=False) - count_parameters(policy.backbone)
    logger.info("   Backbone: %s frozen parameters", f"{n_backbone:,}")
    logger.info("   Sensor encoder: %s parameters", f"{count_parameters(policy.sensor_encoder, trainable_only=False):,}")
    logger.info("   Action expert: %s parameters", f"{count_parameters(policy.action_expert, trainable_only=False):,}")
    return policy, input_builder, fingerprint


def prepare_output_dir(cfg: RunConfig, rank: int) -> Path:
    """Create the output dir and save the resolved config there (rank 0)."""
    output_dir = Path(cfg.train.output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        if rank == 0:
            cfg.save(output_dir / "config.json")
    except OSError as e:
        raise config_lib.ConfigError(f"{output_dir}: cannot write the output directory ({e.strerror})") from None
    return output_dir


def fresh_output_dir(output_dir: Path) -> Path:
    """``output_dir``, or when it holds another run's checkpoints the first free
    ``<output_dir>_resumed``, ``_resumed2``, ...: a run that starts at step 0 must not mix its
    checkpoints and metrics with (or overwrite) an earlier run's."""
    from vla_ds.training.checkpoint import LATEST_FILE

    candidate, n = output_dir, 1
    while (candidate / LATEST_FILE).exists():
        candidate = output_dir.with_name(f"{output_dir.name}_resumed{n if n > 1 else ''}")
        n += 1
    return candidate


def log_tokens_per_sample(dataset, input_builder, max_pixels) -> None:
    """One line with the first training sample's image size, LM tokens per view and prompt
    length: what backbone.max_pixels makes of the cameras (the backbone's memory scales with it)."""
    sample = dataset[0]
    per_view, total = input_builder.token_counts(sample["images"], sample["instruction"])
    views = ", ".join(f"{img.shape[1]}x{img.shape[0]} -> {w}x{h}: {n} tokens"
                      for img, (h, w, n) in zip(sample["images"], per_view))
    logger.info("LM tokens per sample: %d (%s; backbone.max_pixels %s)", total, views, max_pixels)


def warn_schedule_change(saved: dict[str, Any], cfg: RunConfig, source: Path) -> None:
    """Say so when a resumed run's learning-rate schedule is not the one its checkpoint ran
    (another --max_steps or --epochs): the rate then changes from the resumed step on."""
    def params(config: dict[str, Any]) -> dict[str, Any]:
        sched = config.get("scheduler")
        return sched.get("params", {}) if isinstance(sched, dict) else {}

    was, now = params(saved), params(cfg.deepspeed)
    keys = ("total_num_steps", "warmup_num_steps")
    if all(k in was for k in keys) and any(was.get(k) != now.get(k) for k in keys):
        logger.warning("%s ran a learning-rate schedule of %s total / %s warmup steps; this run's is %s / %s, so the "
                       "rate follows the new schedule from the resumed step on (same --max_steps or --epochs to "
                       "continue the old one)", source, was["total_num_steps"], was["warmup_num_steps"],
                       now.get("total_num_steps"), now.get("warmup_num_steps"))


def continue_head(stored: dict[str, Any], cfg: RunConfig, source: str) -> None:
    """Stage 2 and ``--resume`` continue heads trained for one objective and one VL
    conditioning: train them towards another and they start from scratch (and the weights of
    another conditioning do not fit). ``cfg.action_expert`` takes the checkpoint's objective,
    prediction_type, vl_conditioning (with its grid) and vl_normalize; a config that asked for
    another head is told so."""
    keys = (["objective"] + (["prediction_type"] if stored["objective"] == "diffusion" else [])
            + ["vl_conditioning", "vl_attention", "vl_normalize"]
            + (["vl_grid"] if stored["vl_conditioning"] == "tokens" else []))
    config_head = {k: getattr(cfg.action_expert, k)
                   for k in ("objective", "prediction_type", "vl_conditioning", "vl_attention", "vl_normalize", "vl_grid")}
    if all(stored[k] == config_head[k] for k in keys):
        return
    logger.warning("%s trained an action expert with %s; continuing with it, not with the config's %s",
                   source, _describe_head(stored), _describe_head(config_head))
    cfg.action_expert = dataclasses.replace(cfg.action_expert, **{k: stored[k] for k in keys})


def _describe_head(head: dict[str, Any]) -> str:
    out = f"objective {head['objective']}"
    if head["objective"] == "diffusion":
        out = f"objective diffusion (prediction_type {head['prediction_type']})"
    standardised = " (standardised)" if head["vl_normalize"] else ""
    if head["vl_conditioning"] == "tokens":
        return (f"{out} on VL tokens{standardised} ({head['vl_grid']}x{head['vl_grid']} per view, "
                f"{head['vl_attention']} attention)")
    return f"{out} on the pooled VL vector{standardised}" + ("" if head["vl_attention"] == "joint"
                                                             else f" ({head['vl_attention']} attention)")
