"""Predict one action chunk with an exported policy and show it next to the recorded one.

    python scripts/predict.py --policy OUT --episode DATA/source/episode_000 [--frame K] [--steps N]
    python scripts/predict.py --policy OUT --episode LEROBOT_ROOT --episode-index E [--frame K]

Loads the policy directory (docs/policy_format.md), cuts the episode into samples with the
policy's sensor window and horizon, and prints sample K's predicted chunk (H x D, e.g. 8 x 7:
dx dy dz in mm, da db dr in degrees, gripper; a LeRobot action's own names) with the recorded
chunk under each step. ``main(argv)`` runs
in-process; a user error prints one line and returns 2.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from vla_ds.errors import ConfigError, run_command
from vla_ds.log import setup_logging
from vla_ds.models.policy import VLAPolicy
from vla_ds.policy_tools.evaluate import (
    ACTION_NAMES,
    ACTION_UNITS,
    action_label,
    check_sensor_transform,
    load_episode_dataset,
    masked_errors,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="predict.py", description="Predict one action chunk from a recorded episode.")
    p.add_argument("--policy", required=True, help="exported policy directory (convert_checkpoint.py --to policy)")
    p.add_argument("--episode", required=True,
                   help="episode directory (holds metadata.json), or a LeRobot dataset root (with --episode-index)")
    p.add_argument("--episode-index", "--episode_index", dest="episode_index", type=int, default=None,
                   help="the episode_index of a LeRobot dataset's episode (default: its first)")
    p.add_argument("--frame", type=int, default=0, help="sample index within the episode (default 0)")
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps: DDIM steps of a diffusion head, Euler steps of a flow-matching head "
                        "(default: the policy's num_inference_steps)")
    p.add_argument("--vl-model", "--vl_model", dest="vl_model", default=None,
                   help="base Qwen2.5-VL dir or hub id, when the training path is not available here")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial diffusion noise (default 0)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                   help="backbone dtype (default: as trained)")
    return p


def format_chunk(predicted: np.ndarray, recorded: np.ndarray | None = None, is_pad: np.ndarray | None = None,
                 names=ACTION_NAMES, units=ACTION_UNITS) -> str:
    """The (H, D) chunk as a table, the recorded step under each predicted one."""
    names = [action_label(d, names, ()) for d in range(predicted.shape[-1])]
    width = max([10] + [len(n) + 1 for n in names])
    header = f"{'step':>4}  {'':<9}" + "".join(f"{n:>{width}}" for n in names)
    units = f"{'':>4}  {'':<9}" + "".join(
        f"{'[' + units[d] + ']' if d < len(units) and units[d] else '':>{width}}" for d in range(len(names)))
    lines = [header, units, "-" * len(header)]
    for k, row in enumerate(predicted):
        lines.append(f"{k:>4}  {'predicted':<9}" + "".join(f"{v:>{width}.4f}" for v in row))
        if recorded is not None:
            if is_pad is not None and is_pad[k]:
                cells = "".join(f"{'(pad)':>{width}}" for _ in row)
            else:
                cells = "".join(f"{v:>{width}.4f}" for v in recorded[k])
            lines.append(f"{'':>4}  {'recorded':<9}" + cells)
    return "\n".join(lines)


def run(args: argparse.Namespace) -> str:
    """The predicted chunk next to the recorded one, as text."""
    lines: list[str] = []
    policy = VLAPolicy.from_pretrained(args.policy, vl_model=args.vl_model, device=args.device, dtype=args.dtype)
    expert = policy.action_expert.config
    device = next(policy.action_expert.parameters()).device
    steps = expert.check_inference_steps(args.steps)
    dataset = load_episode_dataset(policy.policy_config, args.episode, args.episode_index)
    check_sensor_transform(policy, dataset, args.episode)
    if not 0 <= args.frame < len(dataset):
        raise ConfigError(f"--frame {args.frame}: {args.episode} has {len(dataset)} samples (0..{len(dataset) - 1})")
    sample = dataset[args.frame]
    generator = torch.Generator(device=device).manual_seed(args.seed)
    predicted = policy.predict_actions(sample["images"], sample["instruction"], sample["sensor_window"],
                                       num_inference_steps=steps, generator=generator,
                                       has_sensor=bool(sample["has_sensor"]), sensor_pad=sample["sensor_pad"])  # (H, D)
    episode = dataset.episodes[0]
    recorded, is_pad = sample["actions"], sample["action_is_pad"]
    lines.append(f"policy   {args.policy} ({policy.policy_config.get('stage', '?')}), {expert.sampler_description(steps)}, "
                 f"seed {args.seed}, {device}")
    lines.append(f"episode  {episode.path}: \"{sample['instruction']}\"")
    lines.append(f"sample   {args.frame} of {len(dataset)}, t = {sample['frame_time'] - episode.start_time:.3f} s "
                 f"after the episode start, sensor data: {'yes' if sample['has_sensor'] else 'no'}")
    lines.append("")
    lines.append(format_chunk(predicted, recorded, is_pad, dataset.action_names, dataset.action_units))
    if (~is_pad).any():
        errors = masked_errors(predicted[None], recorded[None], is_pad[None])
        lines.append(f"\nMAE over the {int((~is_pad).sum())} recorded steps: "
                     + ", ".join(f"{action_label(d, dataset.action_names, ())} {e:.4g}"
                                 for d, e in enumerate(errors["mae_per_dim"])))
    else:
        lines.append("\nno recorded steps to compare with (the whole chunk lies past the episode end)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    code, text = run_command(run, args)
    if text is not None:
        print(text)
    return code
