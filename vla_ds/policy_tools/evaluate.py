"""Open-loop evaluation of an exported policy on recorded episodes (SPEC section 6).

For each evaluated sample the policy predicts an action chunk from the recorded images,
instruction and sensor window; it is compared with the recorded chunk over the valid
(non-padded) steps, in raw units (mm, degrees, gripper value). Two baselines put the
numbers in context: the training-split mean action (the policy's ``action_mean``
normalisation statistic) and the zero action (no motion, gripper 0).

The pieces, from the maths outwards:

- :class:`ErrorAccumulator` / :func:`masked_errors`: masked MSE/MAE per action dimension
  and overall, accumulated over batches (pure numpy, tested on toy arrays).
- :func:`eval_data_config`, :func:`eval_split`, :func:`select_samples`: which samples -- the
  validation episodes are rebuilt with ``split_train_val`` and the run's ``val_split`` and
  seed from the policy's config.json, so they are the episodes training held out.
- :func:`predict_samples`: the policy over those samples (its sampler, fixed generator).
- :func:`build_report`, :func:`plot_episode`, :func:`run_evaluation`: report.json and PNGs.

``scripts/evaluate.py`` is the command line around :func:`run_evaluation`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vla_ds.batch import (
    ACTION_IS_PAD,
    ACTIONS,
    FRAME_TIME,
    HAS_SENSOR,
    IMAGES,
    INSTRUCTION,
    SENSOR_PAD,
    SENSOR_WINDOW,
)
from vla_ds.data import DataConfig, VLADataset, split_train_val
from vla_ds.data.actions import ACTION_DIM, DELTA_POSE_NAMES, DELTA_POSE_UNITS
from vla_ds.dataclass_io import dataclass_from_dict
from vla_ds.errors import ConfigError, DatasetError

logger = logging.getLogger(__name__)

ACTION_NAMES = DELTA_POSE_NAMES  # the defaults: SPEC's delta-pose actions
ACTION_UNITS = DELTA_POSE_UNITS
SPLITS = ("val", "all")
REPORT_FILE = "report.json"
PREDICTIONS_FILE = "predictions.npz"
PLOTS_DIR = "plots"


def action_label(d: int, names=ACTION_NAMES, units=ACTION_UNITS) -> str:
    """``dx [mm]``, ``da [deg]``, ``gripper``: the label of action dimension d (``names`` and
    ``units`` of the dataset's action; a missing name is ``a[d]``)."""
    name = names[d] if d < len(names) else f"a[{d}]"
    unit = units[d] if d < len(units) else ""
    return f"{name} [{unit}]" if unit else name


# --------------------------------------------------------------------------- error maths


class ErrorAccumulator:
    """Masked squared and absolute errors per action dimension, summed over batches.

    ``update(pred, target, is_pad)`` takes (N, H, A) predictions and targets and the (N, H)
    padding mask; padded steps contribute nothing. ``result()`` gives the means over the
    valid steps: ``mse``/``mae`` over every valid (step, dimension) value and
    ``mse_per_dim``/``mae_per_dim`` (A values each). Every dimension of a valid step is
    valid, so the overall value is the mean of the per-dimension values.
    """

    def __init__(self, action_dim: int = ACTION_DIM):
        self.action_dim = action_dim
        self.sq_sum = np.zeros(action_dim, dtype=np.float64)
        self.abs_sum = np.zeros(action_dim, dtype=np.float64)
        self.steps = 0  # valid (sample, step) pairs seen

    def update(self, pred, target, is_pad) -> None:
        pred = np.asarray(pred, dtype=np.float64)  # (N, H, A)
        target = np.asarray(target, dtype=np.float64)  # (N, H, A)
        valid = ~np.asarray(is_pad, dtype=bool)  # (N, H)
        if pred.shape != target.shape or pred.ndim != 3 or pred.shape[-1] != self.action_dim:
            raise ValueError(f"pred {pred.shape} and target {target.shape} must both be (N, H, {self.action_dim})")
        if valid.shape != pred.shape[:2]:
            raise ValueError(f"is_pad has shape {valid.shape}, expected {pred.shape[:2]}")
        err = (pred - target)[valid]  # (n_valid, A)
        self.sq_sum += (err**2).sum(axis=0)
        self.abs_sum += np.abs(err).sum(axis=0)
        self.steps += int(valid.sum())

    def result(self) -> dict[str, Any]:
        if self.steps == 0:
            raise DatasetError("no valid (non-padded) action steps to evaluate")
        mse = self.sq_sum / self.steps  # (A,)
        mae = self.abs_sum / self.steps  # (A,)
        return {"mse": float(mse.mean()), "mae": float(mae.mean()),
                "mse_per_dim": [float(x) for x in mse], "mae_per_dim": [float(x) for x in mae]}


def masked_errors(pred, target, is_pad) -> dict[str, Any]:
    """:class:`ErrorAccumulator` result of one set of (N, H, A) arrays and (N, H) padding mask."""
    acc = ErrorAccumulator(np.shape(pred)[-1])
    acc.update(pred, target, is_pad)
    return acc.result()


# --------------------------------------------------------------------------- which samples


def _data_section(policy_config: dict[str, Any]) -> dict[str, Any]:
    data = policy_config.get("data")
    return dict(data) if isinstance(data, dict) else {}


def _stored_seed(policy_config: dict[str, Any]) -> int | None:
    """The run's seed: config.json's top-level ``seed`` (or ``train.seed``)."""
    seed = policy_config.get("seed")
    if seed is None and isinstance(policy_config.get("train"), dict):
        seed = policy_config["train"].get("seed")
    return seed


def split_settings(policy_config: dict[str, Any], val_split: float | None = None,
                   split_seed: int | None = None, where: str = "config.json") -> tuple[float, int]:
    """``(val_split, seed)`` that rebuild the run's validation split.

    Read from config.json (``data.val_split`` and ``seed``); an argument given here wins
    (logged when it differs from the stored value). A value neither stored nor given is a
    :class:`ConfigError` saying which flag supplies it.
    """
    stored_split = _data_section(policy_config).get("val_split")
    stored_seed = _stored_seed(policy_config)
    resolved = []
    for name, flag, given, stored in (("data.val_split", "--val-split", val_split, stored_split),
                                      ("seed", "--split-seed", split_seed, stored_seed)):
        if given is None and stored is None:
            raise ConfigError(f"{where} has no '{name}', needed to rebuild the training run's validation "
                              f"episodes: pass {flag} with the run's value (or use --split all)")
        if given is not None and stored is not None and given != stored:
            logger.warning("%s overrides the run's %s=%s with %s: the validation episodes may differ from "
                           "the ones training held out", flag, name, stored, given)
        resolved.append(given if given is not None else stored)
    return float(resolved[0]), int(resolved[1])


def eval_data_config(policy_config: dict[str, Any], dataset_dir: str) -> DataConfig:
    """The DataConfig to cut evaluation samples with: the policy's sensor window and horizon,
    the run's frame stride and view tolerance when config.json stores them, and invalid
    samples skipped (counted in the log) rather than fatal."""
    stored = dataclass_from_dict(DataConfig, _data_section(policy_config), "data.", unknown="warn",
                                 source="the policy's config.json")  # parsed as the run parsed it
    return dataclasses.replace(stored, dataset_dir=str(dataset_dir),
                               sensor_window_size=int(policy_config["sensor_encoder"]["window_size"]),
                               action_horizon=int(policy_config["action_expert"]["horizon"]),
                               on_bad_sample="skip", num_workers=0)


def load_eval_dataset(policy_config: dict[str, Any], dataset_dir: str, split: str = "val",
                      val_split: float | None = None, split_seed: int | None = None,
                      where: str = "config.json") -> VLADataset:
    """The samples to evaluate: the run's validation episodes (``split="val"``) or every episode.

    The whole dataset is scanned as training scanned it (mixture.yaml included), then split
    with ``split_train_val(dataset, val_split, seed)``: the same call, so the same episodes.
    """
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    config = eval_data_config(policy_config, dataset_dir)
    channels = int(policy_config["sensor_encoder"]["in_channels"])
    if not Path(dataset_dir).is_dir():
        raise DatasetError(f"{dataset_dir}: dataset directory does not exist")
    # Force the policy's channel count: every sensor file must have it (a DatasetError names
    # the file otherwise), and episodes without sensor data get zero windows of that width.
    dataset = VLADataset(config, sensor_channels=channels)
    logger.info("%s", dataset.describe())
    if split == "all":
        logger.info("evaluating on all %d episodes (training episodes included)", len(dataset.episodes))
        return dataset
    fraction, seed = split_settings(policy_config, val_split, split_seed, where)
    _, val = split_train_val(dataset, fraction, seed)
    if len(val) == 0:
        raise DatasetError(f"{dataset_dir}: the validation split (val_split {fraction:g}, seed {seed}) of "
                           f"{len(dataset.episodes)} episodes has no samples; use --split all")
    logger.info("validation split (val_split %g, seed %d): %d episode(s), %d samples: %s", fraction, seed,
                len(val.episodes), len(val), ", ".join(os.path.relpath(ep.path, dataset_dir) for ep in val.episodes))
    return val


def check_sensor_transform(policy, dataset: VLADataset, where: str) -> None:
    """Refuse data whose raw features make the policy's sensor window differently from how its
    training data did (other features, order, names or angle encoding): its windows would be
    read as the policy's channels. ``where`` names the data in the message."""
    from vla_ds.data.observation import check_same_transform, unwrap_changed

    check_same_transform(policy.sensor_transform, dataset.episodes, where)
    lerobot = ((policy.policy_config or {}).get("data") or {}).get("lerobot") or {}
    if policy.sensor_transform is None and unwrap_changed(lerobot):
        logger.warning("%s: this policy was trained before vla_ds recorded its sensor transform, with angles unwrapped "
                       "over whole episodes; its windows are now unwrapped within each window, so its angle channels "
                       "may be shifted by whole turns from what it learned (retrain, or export again from a newer "
                       "run)", where)


def load_episode_dataset(policy_config: dict[str, Any], episode_dir: str | Path,
                         episode_index: int | None = None) -> VLADataset:
    """The samples of one episode, cut as :func:`eval_data_config` says: an episode directory,
    or episode ``episode_index`` (default: the first) of a LeRobot dataset root."""
    from vla_ds.data.lerobot import is_lerobot_root, load_lerobot_episodes

    episode_dir = Path(episode_dir)
    config = eval_data_config(policy_config, "")
    channels = int(policy_config["sensor_encoder"]["in_channels"])
    if is_lerobot_root(episode_dir):
        episodes = load_lerobot_episodes(episode_dir, config.lerobot, episode_dir.name, on_bad_sample="skip")
        chosen = [ep for ep in episodes if episode_index is None or ep.entry.index == episode_index][:1]
        if not chosen:
            raise DatasetError(f"{episode_dir}: no episode {episode_index} (episodes "
                               f"{episodes[0].entry.index}..{episodes[-1].entry.index})")
        chosen[0].index = 0
        return VLADataset(config, chosen, sensor_channels=channels)
    if episode_index is not None:
        raise ConfigError(f"{episode_dir}: an episode index selects an episode of a LeRobot dataset root; "
                          "this is an episode directory")
    if not (episode_dir / "metadata.json").is_file():
        raise DatasetError(f"{episode_dir}: not an episode directory (no metadata.json) nor a LeRobot dataset "
                           "(no meta/info.json)")
    return VLADataset(config, [episode_dir], sensor_channels=channels)


def select_samples(episode_sizes: list[int], max_samples: int | None = None) -> list[list[int]]:
    """Which samples of each episode to evaluate: all, or at most ``max_samples`` in total.

    The budget is shared evenly between episodes (leftovers to the first ones, none to an
    episode beyond its size), and each episode's samples are spread evenly over it (first
    and last included), so every episode's plot still spans the whole episode.
    Returns per episode the sorted sample indices within that episode.
    """
    if max_samples is None or max_samples >= sum(episode_sizes):
        return [list(range(n)) for n in episode_sizes]
    if max_samples < 1:
        raise ConfigError(f"max_samples must be >= 1, got {max_samples}")
    quota = [0] * len(episode_sizes)
    left = max_samples
    while left > 0:  # round-robin: one more sample for each episode that still has some
        for e, n in enumerate(episode_sizes):
            if left > 0 and quota[e] < n:
                quota[e] += 1
                left -= 1
    return [sorted(set(np.rint(np.linspace(0, n - 1, q)).astype(int).tolist())) if q else []
            for n, q in zip(episode_sizes, quota)]


# --------------------------------------------------------------------------- prediction


@dataclass
class EpisodePredictions:
    """Predicted and recorded chunks of one episode's evaluated samples, in time order.

    Fields:
        path, source, instruction, action_hz: the episode.
        start_time: its first robot-state time (plots count seconds from it).
        frame_time: (S,) sample times in seconds.
        predicted, recorded: (S, H, D) raw actions.
        is_pad: (S, H) bool, True past the episode end.
        action_names, action_units: D names and units of the action dimensions.
    """

    path: Path
    source: str
    instruction: str
    action_hz: float
    start_time: float
    frame_time: np.ndarray
    predicted: np.ndarray
    recorded: np.ndarray
    is_pad: np.ndarray
    action_names: tuple = ACTION_NAMES
    action_units: tuple = ACTION_UNITS


@dataclass
class _Pending:
    samples: list = field(default_factory=list)
    predicted: list = field(default_factory=list)


def predict_samples(policy, dataset: VLADataset, max_samples: int | None = None,
                    num_inference_steps: int | None = None, seed: int = 0, batch_size: int = 8,
                    progress: bool = True) -> list[EpisodePredictions]:
    """Run ``policy.predict_actions`` (the head's sampler) over the selected samples of every episode.

    One ``torch.Generator`` on the policy's device, seeded with ``seed``, draws the initial
    noise of every batch in turn: the same seed, batch size and samples give the same
    predictions. Samples without sensor data use the no-sensor embedding, as in training.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    from tqdm.auto import tqdm

    per_episode = [dataset.with_episodes([ep], allow_empty=True) for ep in dataset.episodes]
    chosen = select_samples([len(ds) for ds in per_episode], max_samples)
    work = [(e, i) for e, idx in enumerate(chosen) for i in idx]
    if not work:
        raise DatasetError("no samples to evaluate")
    device = next(policy.action_expert.parameters()).device
    generator = torch.Generator(device=device).manual_seed(int(seed))
    pending = [_Pending() for _ in per_episode]
    bar = tqdm(total=len(work), unit="sample", desc="evaluate", disable=not progress, dynamic_ncols=True)
    try:
        for start in range(0, len(work), batch_size):
            batch = [(e, per_episode[e][i]) for e, i in work[start:start + batch_size]]
            samples = [s for _, s in batch]
            predicted = policy.predict_actions(
                [s[IMAGES] for s in samples], [s[INSTRUCTION] for s in samples],
                np.stack([s[SENSOR_WINDOW] for s in samples]), num_inference_steps=num_inference_steps,
                generator=generator, has_sensor=[bool(s[HAS_SENSOR]) for s in samples],
                sensor_pad=[int(s[SENSOR_PAD]) for s in samples])  # (B, H, D)
            for (e, sample), chunk in zip(batch, predicted):
                sample.pop(IMAGES)  # keep only what the report and plots need
                sample.pop(SENSOR_WINDOW)
                pending[e].samples.append(sample)
                pending[e].predicted.append(chunk)
            bar.update(len(batch))
    finally:
        bar.close()

    out = []
    for ds, p in zip(per_episode, pending):
        if not p.samples:
            continue
        ep = ds.episodes[0]
        out.append(EpisodePredictions(
            path=ep.path, source=ep.source, instruction=ep.instruction, action_hz=float(ep.action_hz),
            start_time=ep.start_time, action_names=tuple(dataset.action_names), action_units=tuple(dataset.action_units),
            frame_time=np.array([s[FRAME_TIME] for s in p.samples], dtype=np.float64),
            predicted=np.stack(p.predicted).astype(np.float32),
            recorded=np.stack([s[ACTIONS] for s in p.samples]).astype(np.float32),
            is_pad=np.stack([s[ACTION_IS_PAD] for s in p.samples]).astype(bool)))
    return out


# --------------------------------------------------------------------------- report


def chunk_smoothness(chunks, is_pad) -> dict[str, Any]:
    """Mean |a[k+1] - a[k]| between consecutive valid steps of (N, H, A) chunks, overall and
    per dimension: how much a chunk jumps from step to step (compare predicted with recorded)."""
    chunks = np.asarray(chunks, dtype=np.float64)
    both = ~np.asarray(is_pad, dtype=bool)
    both = both[:, 1:] & both[:, :-1]  # (N, H-1): both steps of the pair are valid
    jumps = np.abs(np.diff(chunks, axis=1))[both]  # (n_pairs, A)
    if len(jumps) == 0:
        return {"mean": float("nan"), "per_dim": [float("nan")] * chunks.shape[-1]}
    per_dim = jumps.mean(axis=0)
    return {"mean": float(per_dim.mean()), "per_dim": [float(x) for x in per_dim]}


def build_report(episodes: list[EpisodePredictions], action_mean) -> dict[str, Any]:
    """report.json: masked errors of the policy, the mean-action and the zero-action baselines.

    Shape: ``{"policy": {"mse", "mae", "mse_per_dim", "mae_per_dim"}, "mean_baseline": {...},
    "zero_baseline": {...}, "mse_ratio_to_mean_baseline", "smoothness": {"policy",
    "recorded"}, "episodes": n, "samples": n}``, raw units, valid steps only.
    ``mse_ratio_to_mean_baseline`` is the policy's MSE over the mean-action baseline's (below
    1: the policy knows more than the average action); ``smoothness`` is
    :func:`chunk_smoothness` of the predicted and of the recorded chunks.
    """
    action_mean = np.asarray(action_mean, dtype=np.float64).reshape(1, 1, -1)  # (1, 1, A)
    acc = {name: ErrorAccumulator(action_mean.shape[-1]) for name in ("policy", "mean_baseline", "zero_baseline")}
    for ep in episodes:
        acc["policy"].update(ep.predicted, ep.recorded, ep.is_pad)
        acc["mean_baseline"].update(np.broadcast_to(action_mean, ep.recorded.shape), ep.recorded, ep.is_pad)
        acc["zero_baseline"].update(np.zeros_like(ep.recorded), ep.recorded, ep.is_pad)
    report: dict[str, Any] = {name: a.result() for name, a in acc.items()}
    baseline = report["mean_baseline"]["mse"]
    report["mse_ratio_to_mean_baseline"] = report["policy"]["mse"] / baseline if baseline > 0 else float("nan")
    is_pad = np.concatenate([ep.is_pad for ep in episodes])  # (N, H)
    report["smoothness"] = {"policy": chunk_smoothness(np.concatenate([ep.predicted for ep in episodes]), is_pad),
                            "recorded": chunk_smoothness(np.concatenate([ep.recorded for ep in episodes]), is_pad)}
    report["episodes"] = len(episodes)
    report["samples"] = int(sum(len(ep.frame_time) for ep in episodes))
    report["action_names"] = list(episodes[0].action_names) if episodes else list(ACTION_NAMES)
    report["action_units"] = list(episodes[0].action_units) if episodes else list(ACTION_UNITS)
    return report


def format_report_table(report: dict[str, Any]) -> str:
    """A fixed-width table: one row per action dimension plus ``all``, MSE and MAE of the policy
    and both baselines."""
    columns = [("policy", "policy"), ("mean_baseline", "mean"), ("zero_baseline", "zero")]
    head = f"{'dim':<14}" + "".join(f"{name + ' ' + m:>13}" for _, name in columns for m in ("MSE", "MAE"))
    lines = [head, "-" * len(head)]
    names, units = report.get("action_names", ACTION_NAMES), report.get("action_units", ACTION_UNITS)
    width = max([14] + [len(action_label(d, names, units)) + 2 for d in range(len(report["policy"]["mse_per_dim"]))])
    lines = [f"{'dim':<{width}}" + head[14:], "-" * (width + len(head) - 14)]
    for d in range(len(report["policy"]["mse_per_dim"])):
        cells = "".join(f"{report[k][m + '_per_dim'][d]:>13.4g}" for k, _ in columns for m in ("mse", "mae"))
        lines.append(f"{action_label(d, names, units):<{width}}{cells}")
    cells = "".join(f"{report[k][m]:>13.4g}" for k, _ in columns for m in ("mse", "mae"))
    lines.append(f"{'all':<{width}}{cells}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- plots


def episode_slug(ep: EpisodePredictions) -> str:
    """A file-name-safe name for an episode: ``<parent>_<episode>``."""
    text = f"{ep.path.parent.name}_{ep.path.name}"
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def plot_episode(ep: EpisodePredictions, out_dir: str | Path, steps_label: str = "",
                 action_mean=None) -> list[Path]:
    """Two PNGs of predicted vs recorded actions of one episode, one panel per dimension.

    ``<slug>_first_step.png``: the first step of each predicted chunk (what a receding-horizon
    controller would execute) and the recorded first step, over time.
    ``<slug>_chunks.png``: every predicted chunk drawn over its own H steps, on the recorded
    actions of the same times. Padded steps are not drawn. ``action_mean`` (D,), when given,
    is drawn as the mean-action baseline. Panels are named by the dataset's action names.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = episode_slug(ep)
    t0 = ep.frame_time - ep.start_time  # (S,) seconds since the episode start
    n, horizon, dims = ep.predicted.shape
    step_t = t0[:, None] + np.arange(horizon)[None, :] / ep.action_hz  # (S, H) start time of each step
    recorded = np.where(ep.is_pad[..., None], np.nan, ep.recorded)  # (S, H, A)
    title = f"{ep.path.parent.name}/{ep.path.name}: \"{ep.instruction}\""
    paths = []

    names, units = ep.action_names, ep.action_units
    rows = (dims + 2) // 2  # two columns, one spare panel for the legend

    def figure(subtitle: str):
        fig, axes = plt.subplots(rows, 2, figsize=(12, 2.75 * rows), sharex=True, squeeze=False)
        fig.suptitle(f"{title}\n{subtitle}", fontsize=11)
        for d, ax in enumerate(axes.flat[:dims]):
            name = action_label(d, names, ())
            ax.set_title(name, fontsize=10)
            ax.set_ylabel(f"{name} [{units[d]}/step]" if d < len(units) and units[d] else name)
            ax.grid(True, alpha=0.3)
        for ax in axes.flat[dims + 1:]:
            ax.axis("off")
        # The bottom panel of each column carries the time axis (the panel after the last is the legend).
        for ax in axes.flat[max(0, dims - 2):dims]:
            ax.set_xlabel("time since episode start [s]")
            ax.tick_params(labelbottom=True)
        return fig, axes

    # (a) first step of each chunk over time
    fig, axes = figure(f"first action of each chunk: predicted vs recorded ({n} samples{steps_label})")
    for d, ax in enumerate(axes.flat[:dims]):
        ax.plot(t0, recorded[:, 0, d], color="black", marker=".", lw=1.5, label="recorded")
        ax.plot(t0, ep.predicted[:, 0, d], color="tab:orange", marker=".", lw=1.2, label="predicted")
        if action_mean is not None:
            ax.axhline(float(action_mean[d]), color="tab:gray", ls="--", lw=1.0, label="mean action (baseline)")
    _legend_panel(axes.flat[dims], axes.flat[0], ep, "first step")
    paths.append(_save(fig, out_dir / f"{slug}_first_step.png"))

    # (b) whole chunks overlaid
    fig, axes = figure(f"whole predicted chunks ({horizon} steps at {ep.action_hz:g} Hz) over the recorded actions")
    colors = plt.cm.viridis(np.linspace(0, 0.9, n))
    for d, ax in enumerate(axes.flat[:dims]):
        for s in range(n):
            ax.plot(step_t[s], recorded[s, :, d], color="black", lw=2.0, alpha=0.35,
                    label="recorded" if s == 0 else None)
        for s in range(n):
            valid = ~ep.is_pad[s]
            ax.plot(step_t[s][valid], ep.predicted[s, valid, d], color=colors[s], lw=1.0, alpha=0.85,
                    label="predicted chunk (color = start time)" if s == 0 else None)
            ax.plot(step_t[s][:1], ep.predicted[s, :1, d], color=colors[s], marker="o", ms=3)
    _legend_panel(axes.flat[dims], axes.flat[0], ep, "chunks")
    paths.append(_save(fig, out_dir / f"{slug}_chunks.png"))
    return paths


def _legend_panel(ax, first_ax, ep: EpisodePredictions, kind: str) -> None:
    """The spare eighth panel: the legend and the episode's errors."""
    ax.axis("off")
    handles, labels = first_ax.get_legend_handles_labels()
    ax.legend(handles, labels, loc="upper left", frameon=False, fontsize=10)
    errors = masked_errors(ep.predicted, ep.recorded, ep.is_pad)
    rows = "\n".join(f"{action_label(d, ep.action_names, ep.action_units):<12} {errors['mae_per_dim'][d]:.3g}"
                     for d in range(ep.predicted.shape[-1]))
    ax.text(0.0, 0.45, f"episode MAE (all chunk steps)\n{rows}", transform=ax.transAxes, va="top",
            family="monospace", fontsize=9)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- the whole run


def run_evaluation(policy, dataset_dir: str | Path, output_dir: str | Path, *, split: str = "val",
                   max_samples: int | None = None, num_inference_steps: int | None = None, seed: int = 0,
                   batch_size: int = 8, val_split: float | None = None, split_seed: int | None = None,
                   num_plot_episodes: int = 3, progress: bool = True) -> dict[str, Any]:
    """Evaluate ``policy`` (from :meth:`VLAPolicy.from_pretrained`) and write ``output_dir``::

        report.json       build_report(): policy / mean_baseline / zero_baseline errors
        predictions.npz   per evaluated sample: predicted, recorded (S, H, D), is_pad (S, H),
                          frame_time (S,), episode (S,) index into the ``episodes`` array
        plots/*.png       plot_episode() for the first ``num_plot_episodes`` episodes

    Returns ``{"report", "report_path", "predictions_path", "plots", "episodes"}``.
    """
    config = policy.policy_config
    if config is None:
        raise ConfigError("run_evaluation needs a policy loaded with VLAPolicy.from_pretrained (its config.json)")
    where = str(Path(policy.policy_dir) / "config.json") if policy.policy_dir is not None else "config.json"
    expert = policy.action_expert.config
    steps = expert.check_inference_steps(num_inference_steps)
    dataset = load_eval_dataset(config, str(dataset_dir), split, val_split, split_seed, where)
    check_sensor_transform(policy, dataset, str(dataset_dir))
    episodes = predict_samples(policy, dataset, max_samples, steps, seed, batch_size, progress)
    report_mean = policy.action_norm.mean.detach().cpu().numpy()  # (D,) training-split mean action
    report = build_report(episodes, report_mean)

    out = Path(output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        report_path = out / REPORT_FILE
        report_path.write_text(json.dumps(report, indent=2) + "\n")
        predictions_path = out / PREDICTIONS_FILE
        np.savez(predictions_path,
                 predicted=np.concatenate([ep.predicted for ep in episodes]),
                 recorded=np.concatenate([ep.recorded for ep in episodes]),
                 is_pad=np.concatenate([ep.is_pad for ep in episodes]),
                 frame_time=np.concatenate([ep.frame_time for ep in episodes]),
                 episode=np.concatenate([np.full(len(ep.frame_time), e) for e, ep in enumerate(episodes)]),
                 episodes=np.array([str(ep.path) for ep in episodes]))
        plots = []
        label = f", {expert.sampler_description(steps)}, seed {seed}"
        for ep in episodes[:num_plot_episodes]:
            plots.extend(plot_episode(ep, out / PLOTS_DIR, label, action_mean=report_mean))
    except OSError as exc:
        raise ConfigError(f"{out}: cannot write the evaluation output ({exc.strerror or exc})") from None
    logger.info("evaluated %d samples of %d episode(s): policy MAE %.4g, mean-action MAE %.4g, zero-action MAE %.4g",
                report["samples"], report["episodes"], report["policy"]["mae"], report["mean_baseline"]["mae"],
                report["zero_baseline"]["mae"])
    return {"report": report, "report_path": report_path, "predictions_path": predictions_path, "plots": plots,
            "episodes": episodes}


# ---------------------------------------------------------------------------------------
# Command line (scripts/evaluate.py, vla-evaluate)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evaluate.py",
                                description="Open-loop errors of a policy on recorded episodes, with plots.")
    p.add_argument("--policy", required=True, help="exported policy directory (convert_checkpoint.py --to policy)")
    p.add_argument("--dataset_dir", "--dataset-dir", dest="dataset_dir", default=None,
                   help="dataset root the policy was trained on (default: data.dataset_dir of its config.json)")
    p.add_argument("--output", "--output_dir", "--output-dir", dest="output", required=True,
                   help="directory for report.json, predictions.npz and plots/")
    p.add_argument("--split", choices=SPLITS, default="val",
                   help="val: the episodes training held out (default); all: every episode")
    p.add_argument("--max-samples", "--max_samples", dest="max_samples", type=int, default=None,
                   help="evaluate at most N samples, spread evenly over the episodes")
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps: DDIM steps of a diffusion head, Euler steps of a flow-matching head "
                        "(default: the policy's num_inference_steps)")
    p.add_argument("--seed", type=int, default=0, help="seed of the diffusion noise (default 0)")
    p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=8)
    p.add_argument("--val-split", "--val_split", dest="val_split", type=float, default=None,
                   help="the run's val_split, if config.json does not record it")
    p.add_argument("--split-seed", "--split_seed", dest="split_seed", type=int, default=None,
                   help="the run's training seed, if config.json does not record it")
    p.add_argument("--plots", type=int, default=3, help="episodes to plot (default 3)")
    p.add_argument("--vl-model", "--vl_model", dest="vl_model", default=None,
                   help="base Qwen2.5-VL dir or hub id, when the training path is not available here")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                   help="backbone dtype (default: as trained)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def run_cli(args: argparse.Namespace) -> dict:
    """Evaluate the policy the parsed flags name (:func:`build_parser`)."""
    from vla_ds.models.policy import VLAPolicy, read_policy_config

    # Settings first (cheap), so a missing one is reported before a 3B backbone loads.
    config = read_policy_config(args.policy)
    dataset_dir = args.dataset_dir or (config.get("data") or {}).get("dataset_dir")
    if not dataset_dir:
        raise ConfigError(f"{Path(args.policy) / 'config.json'} records no data.dataset_dir: pass --dataset_dir")
    if args.split == "val":
        split_settings(config, args.val_split, args.split_seed, str(Path(args.policy) / "config.json"))
    policy = VLAPolicy.from_pretrained(args.policy, vl_model=args.vl_model, device=args.device, dtype=args.dtype)
    return run_evaluation(policy, dataset_dir, args.output, split=args.split, max_samples=args.max_samples,
                          num_inference_steps=args.steps, seed=args.seed, batch_size=args.batch_size,
                          val_split=args.val_split, split_seed=args.split_seed, num_plot_episodes=args.plots,
                          progress=args.progress)


def main(argv: list[str] | None = None) -> int:
    """``scripts/evaluate.py`` / ``vla-evaluate``: prints the report table and what it wrote; a
    user error prints one line and returns 2."""
    from vla_ds.errors import run_command
    from vla_ds.log import setup_logging

    args = build_parser().parse_args(argv)
    setup_logging()
    code, result = run_command(run_cli, args)
    if code:
        return code
    report = result["report"]
    episodes = f"{report['episodes']} episode" + ("s" if report["episodes"] != 1 else "")
    print(f"\nopen-loop errors over {report['samples']} samples of {episodes} "
          f"({args.split} split; valid steps only, raw units):")
    print(format_report_table(report))
    smooth = report["smoothness"]
    print(f"\npolicy MSE / mean-action MSE: {report['mse_ratio_to_mean_baseline']:.3f}   "
          f"(below 1: better than always predicting the training mean)")
    print(f"chunk smoothness, mean |a[k+1] - a[k]|: policy {smooth['policy']['mean']:.4g}, "
          f"recorded {smooth['recorded']['mean']:.4g}")
    print(f"\nreport:      {result['report_path']}")
    print(f"predictions: {result['predictions_path']}")
    for path in result["plots"]:
        print(f"plot:        {path}")
    return 0
