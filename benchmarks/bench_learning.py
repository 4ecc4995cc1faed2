"""Does the policy learn what the data says? Held-out open-loop error per head, per task.

    python benchmarks/bench_learning.py [--tasks sensor image instruction position]
        [--heads epsilon sample flow regression] [--conditioning tokens pooled tokens2]
        [--ema off on] [--steps 1000]
        [--batch-size 16] [--lr 1e-3] [--episodes 50] [--sampling-steps 10 100] [--jobs 2]
        [--workdir DIR] [--json out.json]

Each task is a generated dataset whose action chunks are exactly predictable from one kind
of observation (``vla_ds.data.synthetic``: the sensor stream, the image's tint, the
instruction, where a square sits in the image; in all of them three rotation dimensions
are exactly 0 and, in two, the gripper switches once). For every (task, conditioning,
head, EMA, step budget) cell: Stage 1 with the shipped
``ds_configs/stage1.json`` and the tiny preset (one process, feature cache, bf16), exactly
``--steps`` optimizer steps (the warmup + cosine schedule spans them), the checkpoint
exported with ``convert_checkpoint.py --to policy`` and scored with ``vla_ds.policy_tools.evaluate`` on
the held-out episodes (20% of them), as ``scripts/evaluate.py`` would:

- ``ratio``: policy MSE / mean-action-baseline MSE (raw units, valid steps; < 1 = better
  than always predicting the training mean), at each of ``--sampling-steps`` (DDIM steps
  for diffusion, Euler steps for flow; regression has one pass), plus the same at the
  first sampling-step count with a second sampler seed (``seed_noise``: how much the ratio
  moves with the initial noise alone, the yardstick for "more steps is worse");
- ``per_dim``: that ratio per action dimension (the absolute MSE where the baseline is 0:
  dimensions that never move);
- ``smooth``: mean |a[k+1] - a[k]| within predicted chunks, next to the recorded chunks';
- ``vs_regression``: ratio / the regression head's ratio in the same task, conditioning and
  budget. The
  regression head (plain MSE through the same conditioning path) is the ceiling of what
  the conditioning can tell; a generative head far above it cannot reproduce what the
  conditioning sees.

``--conditioning``: what of the backbone the expert reads (``action_expert.vl_conditioning``):
``tokens`` (each view's image tokens on a 4x4 grid, the default), ``tokensN`` (an N x N
grid), ``pooled`` (one mean vector, the guide's).

With ``--stage2-steps N``, each task's first Stage 1 cell then continues in Stage 2
(``stage2.json``: LoRA on the backbone, no cache, heads lr = ``--lr`` / 10, backbone lr
/ 100) for N steps, with and without EMA, and is scored the same way.

Heads: ``epsilon`` (DDPM noise prediction, the guide's), ``epsilon-clip5`` (the same,
sampled as before vla_ds clamped to the data range: +-5 normalised units; not run by
default), ``epsilon-minsnr`` (epsilon with Min-SNR-5 loss weighting), ``sample`` (DDPM clean-chunk prediction), ``flow`` (flow
matching, pi0's), ``regression``. Cells run in ``--jobs``
parallel processes (each with OMP_NUM_THREADS=1); about a minute each on 2 CPU cores at
1000 steps. Run by hand: prints a table and writes JSON. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HEADS = {
    "epsilon": {"action_expert.objective": "diffusion", "action_expert.prediction_type": "epsilon"},
    # The guide's head sampled as vla_ds did before the clamp to the data range: "before" rows.
    "epsilon-clip5": {"action_expert.objective": "diffusion", "action_expert.prediction_type": "epsilon",
                      "action_expert.clip_to_data_range": "false"},
    "epsilon-minsnr": {"action_expert.objective": "diffusion", "action_expert.prediction_type": "epsilon",
                       "action_expert.snr_gamma": 5.0},
    "sample": {"action_expert.objective": "diffusion", "action_expert.prediction_type": "sample"},
    "flow": {"action_expert.objective": "flow_matching"},
    "regression": {"action_expert.objective": "regression"},
}
VAL_SPLIT = 0.2


# Episodes per task as a multiple of --episodes: the position task's signal is one place per
# episode (10-14 frames each), and a map from place to motion is learnt from many places.
EPISODE_FACTOR = {"position": 5}


def conditioning_settings(name: str) -> dict:
    """``--set`` values of a ``--conditioning`` name: pooled, tokens (the default grid), tokensN."""
    if name == "pooled":  # the guide's head
        return {"action_expert.vl_conditioning": "pooled"}
    if name == "tokens":
        return {"action_expert.vl_conditioning": "tokens"}
    if name.startswith("tokens") and name[6:].isdigit() and int(name[6:]) > 0:
        return {"action_expert.vl_conditioning": "tokens", "action_expert.vl_grid": int(name[6:])}
    raise argparse.ArgumentTypeError(f"--conditioning {name!r}: expected pooled, tokens or tokensN (N x N grid)")


def _conditioning_name(name: str) -> str:
    conditioning_settings(name)  # refuse a bad name at parse time
    return name
SEED = 42
WINDOW = 32


def train_argv(data: Path, backbone: Path, cache: Path, out: Path, batch_size: int, lr: float,
               extra: dict, config: str = "stage1.json") -> list[str]:
    """train.py's flags for a cell; its length is ``train.max_steps`` in ``extra`` (which sizes the schedule)."""
    argv = ["--ds_config", str(REPO / "ds_configs" / config), "--dataset_dir", str(data),
            "--vl-model", str(backbone), "--model-preset", "tiny", "--sensor-window-size", str(WINDOW),
            "--num_workers", "0", "--batch_size", str(batch_size), "--grad_accum", "1", "--lr", str(lr),
            "--val_split", str(VAL_SPLIT), "--seed", str(SEED), "--output_dir", str(out),
            "--set", f"cache.dir={cache}", "--set", "train.progress_bar=false",
            "--set", "train.validate_every_epochs=1000"]
    for key, value in extra.items():
        argv += ["--set", f"{key}={value}"]
    return argv


def run_cell(cell: dict) -> dict:
    """One (task, head, EMA, steps) cell in this process: train, export, evaluate."""
    import numpy as np

    from vla_ds.log import setup_logging
    from vla_ds.models.policy import VLAPolicy
    from vla_ds.policy_tools.convert import convert
    from vla_ds.policy_tools.evaluate import run_evaluation
    from vla_ds.training.train import main as train_main

    setup_logging(level=30)
    out = Path(cell["out"])
    shutil.rmtree(out, ignore_errors=True)  # a cell of an earlier run in the same --workdir
    steps = cell["steps"]
    extra = {**HEADS[cell["head"]], **conditioning_settings(cell["conditioning"]), **cell.get("set", {}),
             "ema.enabled": str(cell["ema"]).lower(), "train.max_steps": steps}  # sizes the schedule
    config, lr = "stage1.json", cell["lr"]
    if cell["stage"] == 2:  # LoRA on the backbone from the Stage 1 cell, the stage2.json recipe's 10x lower lr
        config, lr = "stage2.json", cell["lr"] / 10
        extra.update({"train.stage1_checkpoint": cell["stage1_run"], "optimizer_groups.vl.lr": lr / 10})
    start = time.perf_counter()
    code = train_main(train_argv(Path(cell["data"]), Path(cell["backbone"]), Path(cell["cache"]), out / "run",
                                 cell["batch_size"], lr, extra, config))
    if code != 0:
        raise SystemExit(f"training failed for {cell['name']} (exit {code})")
    train_s = time.perf_counter() - start
    convert(out / "run", out / "policy", "policy")
    policy = VLAPolicy.from_pretrained(out / "policy")
    sampling = [1] if cell["head"] == "regression" else cell["sampling_steps"]
    evals = {}
    for k in sampling:
        for seed in ((0, 1) if k == sampling[0] else (0,)):
            result = run_evaluation(policy, cell["data"], out / f"eval_{k}_{seed}", num_inference_steps=None
                                    if cell["head"] == "regression" else k, seed=seed, batch_size=64,
                                    num_plot_episodes=0, progress=False)
            evals[(k, seed)] = result["report"]
    first = evals[(sampling[0], 0)]
    base = np.asarray(first["mean_baseline"]["mse_per_dim"])
    pol = np.asarray(first["policy"]["mse_per_dim"])
    per_dim = np.where(base > 0, pol / np.where(base > 0, base, 1.0), pol)
    return {
        "task": cell["task"], "stage": cell["stage"], "conditioning": cell["conditioning"], "head": cell["head"],
        "ema": cell["ema"], "steps": steps,
        "ratio": {str(k): evals[(k, 0)]["mse_ratio_to_mean_baseline"] for k in sampling},
        "seed_noise": abs(evals[(sampling[0], 1)]["mse_ratio_to_mean_baseline"]
                          - evals[(sampling[0], 0)]["mse_ratio_to_mean_baseline"]),
        "per_dim": [float(x) for x in per_dim],
        "baseline_is_zero": [bool(b == 0) for b in base],
        "smooth": first["smoothness"]["policy"]["mean"], "smooth_recorded": first["smoothness"]["recorded"]["mean"],
        "mse": first["policy"]["mse"], "mean_baseline_mse": first["mean_baseline"]["mse"],
        "samples": first["samples"], "episodes": first["episodes"], "train_s": train_s,
    }


def _cell_in_subprocess(cell: dict) -> dict:
    # A fresh one-rank process group per cell: not the one this process started for the caches.
    launcher = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher} | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, __file__, "--cell", json.dumps(cell)], env=env, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"cell {cell['name']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def prepare_task(task: str, work: Path, backbone: Path, episodes: int, conditionings: list[str]) -> tuple[Path, Path]:
    """The task's dataset and its feature caches (one per conditioning), built once (cells then
    only read them)."""
    from vla_ds.data.synthetic import make_learning_dataset
    from vla_ds.training.train import build_cache
    from vla_ds.training.train import main as train_main

    data = work / f"data_{task}"
    cache = work / f"cache_{task}"
    if not (data / ".vla_ds_synthetic").is_file():
        make_learning_dataset(data, task, episodes=episodes * EPISODE_FACTOR.get(task, 1), overwrite=True)
    for name in conditionings:
        code = train_main(train_argv(data, backbone, cache, work / f"cache_run_{task}", 16, 1e-3,
                                     conditioning_settings(name)), action=build_cache)
        if code != 0:
            raise SystemExit(f"building the {name} feature cache of {task} failed (exit {code})")
    return data, cache


def print_table(results: list[dict], sampling_steps: list[int]) -> None:
    dims = ("dx", "dy", "dz", "da", "db", "dr", "grip")
    head = (f"{'task':<12}{'stage':<6}{'vl':<9}{'head':<15}{'ema':<5}{'steps':>6}"
            + "".join(f"{'ratio@' + str(k):>11}" for k in sampling_steps)
            + f"{'seed±':>8}{'vs reg':>8}{'smooth':>8}{'rec.':>7}  per-dim ratio ({' '.join(dims)}; abs MSE if never moving)")
    print(head)
    print("-" * len(head))
    for r in results:
        ratios = "".join(f"{r['ratio'].get(str(k), r['ratio'].get('1', float('nan'))):>11.3f}" for k in sampling_steps)
        per_dim = " ".join(f"{v:.2g}" + ("*" if z else "") for v, z in zip(r["per_dim"], r["baseline_is_zero"]))
        vs = f"{r['vs_regression']:.2f}x" if r.get("vs_regression") is not None else "-"  # no ceiling to compare
        print(f"{r['task']:<12}{r['stage']:<6}{r['conditioning']:<9}{r['head']:<15}{'on' if r['ema'] else 'off':<5}{r['steps']:>6}{ratios}"
              f"{r['seed_noise']:>8.3f}{vs:>8}{r['smooth']:>8.3f}{r['smooth_recorded']:>7.3f}  {per_dim}")
    print("vl: what of the backbone the expert reads (tokens: each view on a 4x4 grid, tokensN: N x N, pooled: one "
          "mean vector); ratio: policy MSE / mean-action MSE on held-out episodes (lower is better); seed±: |change| of "
          "the first ratio with another sampler seed; vs reg: ratio / the regression head's (same task, vl, EMA and "
          "steps; - where that "
          "is ~0); smooth: "
          "mean |a[k+1]-a[k]| of predicted chunks (rec.: recorded); * = absolute MSE of a dimension that never moves")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=["sensor", "image", "instruction", "position"])
    p.add_argument("--conditioning", nargs="+", default=["tokens"], type=_conditioning_name,
                   help="VL conditionings: pooled, tokens (4x4 per view), tokensN (N x N)")
    p.add_argument("--heads", nargs="+", default=[h for h in HEADS if h != "epsilon-clip5"], choices=list(HEADS))
    p.add_argument("--ema", nargs="+", default=["off", "on"], choices=["off", "on"])
    p.add_argument("--steps", nargs="+", type=int, default=[1000], help="optimizer-step budgets")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--episodes", type=int, default=50,
                   help="episodes per task (20%% held out; the position task: 5x as many, shorter)")
    p.add_argument("--sampling-steps", nargs="+", type=int, default=[10, 100])
    p.add_argument("--stage2-steps", type=int, default=0,
                   help="also run Stage 2 (LoRA, stage2.json) for this many steps from each task's first Stage 1 "
                        "cell, once per --ema setting (0: Stage 1 only)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a train.py --set for every cell (repeatable)")
    p.add_argument("--jobs", type=int, default=2, help="cells run in parallel (one process each)")
    p.add_argument("--workdir", type=Path, help="keep datasets, caches and runs here (default: a temp dir)")
    p.add_argument("--json", type=Path)
    p.add_argument("--cell", help=argparse.SUPPRESS)  # internal: run one cell, print its JSON
    a = p.parse_args(argv)
    if a.cell:
        print(json.dumps(run_cell(json.loads(a.cell))))
        return 0

    from vla_ds.log import setup_logging
    from vla_ds.models.tiny_backbone import make_tiny_backbone

    setup_logging(level=30)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    with tempfile.TemporaryDirectory() as tmp:
        work = a.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        backbone = work / "tiny_backbone"
        if not (backbone / "config.json").is_file():
            make_tiny_backbone(backbone)
        cells = []
        for task in a.tasks:
            data, cache = prepare_task(task, work, backbone, a.episodes, a.conditioning)
            for steps in a.steps:
                for ema in a.ema:
                    for conditioning in a.conditioning:
                        for head in a.heads:
                            name = f"{task}_{conditioning}_{head}_ema{ema}_{steps}"
                            cells.append({"name": name, "task": task, "stage": 1, "conditioning": conditioning,
                                          "head": head, "ema": ema == "on",
                                          "steps": steps, "data": str(data),
                                          "cache": str(cache), "backbone": str(backbone),
                                          "out": str(work / "cells" / name), "batch_size": a.batch_size, "lr": a.lr,
                                          "sampling_steps": a.sampling_steps,
                                          "set": dict(item.split("=", 1) for item in a.set)})
        # Stage 2 (LoRA) from each task's first Stage 1 cell of the first head, EMA on and off.
        stage2 = []
        for task in a.tasks if a.stage2_steps else []:
            source = next(c for c in cells if c["task"] == task)
            for ema in a.ema:
                name = f"{task}_stage2_{source['conditioning']}_{source['head']}_ema{ema}_{a.stage2_steps}"
                stage2.append({**source, "name": name, "stage": 2, "ema": ema == "on", "steps": a.stage2_steps,
                               "stage1_run": str(Path(source["out"]) / "run"), "out": str(work / "cells" / name)})
        start = time.perf_counter()
        print(f"{len(cells)} Stage 1 cells, then {len(stage2)} Stage 2 cells, {a.jobs} at a time", flush=True)
        with ThreadPoolExecutor(max_workers=a.jobs) as pool:
            results = list(pool.map(_cell_in_subprocess, cells))
            results += list(pool.map(_cell_in_subprocess, stage2))
        wall = time.perf_counter() - start
    for r in results:
        ref = next((x for x in results if x["head"] == "regression" and x["task"] == r["task"]
                    and x["conditioning"] == r["conditioning"] and x["ema"] == r["ema"] and x["steps"] == r["steps"]
                    and x["stage"] == 1), None)
        first = r["ratio"].get(str(a.sampling_steps[0]), r["ratio"].get("1"))
        # Against a ceiling of ~0 (the regression head nailed it) a ratio says nothing.
        r["vs_regression"] = first / ref["ratio"]["1"] if ref and ref["ratio"]["1"] > 0.002 else None
    print(f"\nStage 1: tiny preset, ds_configs/stage1.json, micro batch {a.batch_size}, lr {a.lr}, feature cache, "
          f"1 process (Stage 2: stage2.json, LoRA, lr {a.lr / 10:g} / {a.lr / 100:g}); held-out episodes "
          f"({VAL_SPLIT:.0%}); {wall / 60:.1f} min for {len(results)} cells")
    print_table(results, a.sampling_steps)
    if a.json:
        a.json.write_text(json.dumps({"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
                                      "results": results, "wall_s": wall}, indent=2) + "\n")
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
