"""Open-loop evaluation of an exported policy on the validation episodes (SPEC section 6).

    python scripts/evaluate.py --policy OUT --dataset_dir DATA --output eval/ [--split val|all]
        [--max-samples N] [--steps N] [--seed S] [--batch-size B]

The validation episodes are the ones training held out: ``split_train_val`` with the run's
``data.val_split`` and ``seed`` from the policy's config.json (``--val-split`` /
``--split-seed`` supply them for a config.json without them). Writes OUT/report.json
(MSE/MAE per dimension and overall, policy vs mean-action and zero-action baselines),
OUT/predictions.npz and OUT/plots/*.png. ``main(argv)`` runs in-process; a user error prints
one line and returns 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from vla_ds.errors import ConfigError, VLAError, user_message
from vla_ds.evaluate import SPLITS, format_report_table, run_evaluation, split_settings
from vla_ds.log import setup_logging
from vla_ds.models.policy import VLAPolicy, read_policy_config


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


def run(args: argparse.Namespace) -> dict:
    # Settings first (cheap), so a missing one is reported before a 3B backbone loads.
    config = read_policy_config(args.policy)
    dataset_dir = args.dataset_dir or (config.get("data") or {}).get("dataset_dir")
    if not dataset_dir:
        raise ConfigError(f"{Path(args.policy) / 'config.json'} records no data.dataset_dir: pass --dataset_dir")
    if args.split == "val":
        split_settings(config, args.val_split, args.split_seed, str(Path(args.policy) / "config.json"))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    policy = VLAPolicy.from_pretrained(args.policy, vl_model=args.vl_model, device=device, dtype=args.dtype)
    return run_evaluation(policy, dataset_dir, args.output, split=args.split, max_samples=args.max_samples,
                          num_inference_steps=args.steps, seed=args.seed, batch_size=args.batch_size,
                          val_split=args.val_split, split_seed=args.split_seed, num_plot_episodes=args.plots,
                          progress=args.progress)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        result = run(args)
    except VLAError as e:
        print(f"error: {user_message(e)}", file=sys.stderr)
        return 2
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


if __name__ == "__main__":
    sys.exit(main())
