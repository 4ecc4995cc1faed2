"""What do vla_ds policies make a robot do? Closed-loop success in Meta-World, from scratch.

    python benchmarks/bench_sim.py [--tasks reach-v3,button-press-topdown-v3,...] [--demos 50]
        [--episodes 30] [--steps 3000] [--conditioning tokens pooled] [--image-size 128]
        [--rendering fast] [--window 4] [--execute-steps 8] [--n-envs 2] [--speed-n-envs 1 2 4]
        [--set KEY=VALUE ...] [--workdir DIR] [--json out.json]

Phases, each timed:

1. **record**: ``vla-record-sim`` writes ``--demos`` successful scripted-expert episodes per
   task (seeds from 0) as one LeRobot v3.0 dataset (the corner2 camera at ``--image-size``,
   H.264; ``--cameras`` adds others, each a view of the policies).
2. **train**: Stage 1 with the shipped ``ds_configs/stage1.json`` and the tiny preset on the
   CPU (one process, feature cache), the 4-D state as a ``--window``-frame sensor stream,
   exactly ``--steps`` optimizer steps (warmup + cosine over them), 10% of the episodes held
   out; exported with ``convert_checkpoint.py --to policy``. Once per ``--conditioning``
   (``action_expert.vl_conditioning``: ``tokens``, ``tokensN`` for an N x N grid, ``pooled``),
   with any ``--set`` on top.
3. **open loop**: ``vla_ds.policy_tools.evaluate`` on the held-out episodes: policy MSE / mean-action MSE.
4. **closed loop**: ``vla-eval-sim`` on ``--episodes`` held-out seeds per task (1000, 1001,
   ...) for the scripted expert, zero actions, blind replay of the recorded actions
   (``replay:DATASET``) and each policy, all through the same loop and rendering.
5. **speed**: environment steps per second of the policy's rollouts with ``--speed-n-envs``
   environments at once (``--max-steps 100`` episodes of the first task; the first policy).

Prints one table (success per task with 95% intervals, beside the open-loop ratio) and
writes JSON. ``--workdir`` keeps the recording, the run and every report; a phase whose
output is already there is not redone. Run by hand, not a test: about 15 minutes on 2 CPU
cores with the defaults (README: the table and the phases' seconds).
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
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_learning import _conditioning_name, conditioning_settings  # noqa: E402  (one naming of conditionings)

DEFAULT_TASKS = "reach-v3,button-press-topdown-v3,drawer-close-v3,door-open-v3,plate-slide-v3,peg-insert-side-v3"
VAL_SPLIT = 0.1
SEED = 42


def _run(argv: list[str], log: Path) -> float:
    """Run a command line of this repo in a fresh process (one rank, one thread); its seconds."""
    launcher = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher} | {"OMP_NUM_THREADS": "1"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, *argv], env=env, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:2])} failed (exit {proc.returncode}); see {log}:\n"
                         + log.read_text()[-3000:])
    return time.perf_counter() - start


def record(a, work: Path) -> tuple[Path, float]:
    data = work / "demos"
    if (data / "meta" / "vla_ds_recording.json").is_file():
        return data, json.loads((data / "meta" / "vla_ds_recording.json").read_text())["seconds"]
    shutil.rmtree(data, ignore_errors=True)
    seconds = _run([str(REPO / "scripts" / "record_sim.py"), "--output", str(data), "--tasks", a.tasks,
                    "--episodes", str(a.demos), "--image-size", str(a.image_size), "--rendering", a.rendering,
                    "--n-envs", str(a.n_envs), "--cameras", a.cameras, "--no-progress"], work / "record.log")
    return data, seconds


def conditioning_args(name: str) -> list[str]:
    """train.py ``--set`` arguments of a ``--conditioning`` name (bench_learning's names)."""
    return [arg for key, value in conditioning_settings(name).items() for arg in ("--set", f"{key}={value}")]


def train(a, work: Path, data: Path, backbone: Path, conditioning: str) -> tuple[Path, float]:
    policy = work / f"policy_{conditioning}"
    seconds_file = work / f"train_seconds_{conditioning}.json"
    if (policy / "model.safetensors").is_file():
        return policy, json.loads(seconds_file.read_text())["seconds"]
    run = work / f"run_{conditioning}"
    shutil.rmtree(run, ignore_errors=True)
    argv = [str(REPO / "scripts" / "train.py"), "--ds_config", str(REPO / "ds_configs" / "stage1.json"),
            "--dataset_dir", str(data), "--vl-model", str(backbone), "--model-preset", "tiny",
            "--sensor-window-size", str(a.window), "--num_workers", "0", "--batch_size", str(a.batch_size),
            "--grad_accum", "1", "--lr", str(a.lr), "--max_steps", str(a.steps), "--val_split", str(VAL_SPLIT),
            "--seed", str(SEED), "--output_dir", str(run), "--set", f"cache.dir={work / 'cache'}",
            "--set", "train.progress_bar=false",
            "--set", 'data.lerobot.sensor_features=["observation.state"]', *conditioning_args(conditioning)]
    for item in a.set:
        argv += ["--set", item]
    seconds = _run(argv, work / f"train_{conditioning}.log")
    seconds += _run([str(REPO / "scripts" / "convert_checkpoint.py"), str(run), str(policy), "--to", "policy"],
                    work / f"convert_{conditioning}.log")
    seconds_file.write_text(json.dumps({"seconds": seconds}))
    return policy, seconds


def open_loop(policy: Path, work: Path, conditioning: str) -> dict:
    out = work / f"open_loop_{conditioning}"
    if not (out / "report.json").is_file():
        _run([str(REPO / "scripts" / "evaluate.py"), "--policy", str(policy), "--output", str(out), "--plots", "0",
              "--no-progress"], work / f"open_loop_{conditioning}.log")
    return json.loads((out / "report.json").read_text())


def closed_loop(a, work: Path, name: str, who: list[str], extra: list[str] = (), episodes: int | None = None,
                tasks: str | None = None) -> tuple[dict, float]:
    out = work / "eval" / name
    if (out / "eval_info.json").is_file():
        info = json.loads((out / "eval_info.json").read_text())
        return info, info["overall"]["eval_s"]
    shutil.rmtree(out, ignore_errors=True)
    seconds = _run([str(REPO / "scripts" / "eval_sim.py"), *who, "--tasks", tasks or a.tasks, "--episodes",
                    str(episodes or a.episodes), "--image-size", str(a.image_size), "--rendering", a.rendering,
                    "--n-envs", str(a.n_envs), "--output", str(out), "--baselines", "none", "--no-progress", *extra],
                   work / f"eval_{name}.log")
    return json.loads((out / "eval_info.json").read_text()), seconds


def _cell(task_info: dict | None) -> str:
    if task_info is None:
        return "-"
    lo, hi = task_info["pc_success_ci95"]
    return f"{task_info['pc_success']:.0f}% ({lo:.0f}-{hi:.0f})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default=DEFAULT_TASKS)
    p.add_argument("--demos", type=int, default=50, help="recorded expert episodes per task")
    p.add_argument("--episodes", type=int, default=30, help="evaluation episodes per task (seeds 1000, 1001, ...)")
    p.add_argument("--steps", type=int, default=3000, help="Stage 1 optimizer steps")
    p.add_argument("--conditioning", nargs="+", type=_conditioning_name, default=["tokens", "pooled"],
                   help="a policy per VL conditioning: tokens (4x4 per view), tokensN (N x N), pooled")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a train.py --set for every policy (repeatable)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--window", type=int, default=4, help="sensor window: the last W states")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--cameras", default="corner2",
                   help="cameras recorded and given to the policies (vla-record-sim --cameras; corner2 first)")
    p.add_argument("--rendering", choices=["lerobot", "fast"], default="fast",
                   help="fast (default here: 3-4x cheaper on a CPU; recording and evaluation both use it) or "
                        "lerobot (Meta-World's scene as LeRobot renders it)")
    p.add_argument("--execute-steps", type=int, default=None, help="actions executed per chunk (default: all H)")
    p.add_argument("--n-envs", type=int, default=2, help="environments at once in recording and evaluation")
    p.add_argument("--speed-n-envs", type=int, nargs="*", default=[1, 2, 4])
    p.add_argument("--workdir", type=Path, help="keep everything here; finished phases are reused")
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)

    from vla_ds.models.tiny_backbone import make_tiny_backbone
    from vla_ds.sim.metaworld import resolve_tasks

    tasks = [t for _, t in resolve_tasks(a.tasks)]
    with tempfile.TemporaryDirectory() as tmp:
        work = a.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        backbone = work / "tiny_backbone"
        if not (backbone / "config.json").is_file():
            make_tiny_backbone(backbone)
        phases: dict[str, float] = {}
        data, phases["record"] = record(a, work)
        print(f"record: {phases['record']:.0f} s", flush=True)
        execute = ["--execute-steps", str(a.execute_steps)] if a.execute_steps else []
        infos, reports, policies = {}, {}, {}
        for conditioning in a.conditioning:
            name = f"policy_{conditioning}"
            policies[name], phases[f"train {conditioning}"] = train(a, work, data, backbone, conditioning)
            print(f"train + export ({conditioning}): {phases[f'train {conditioning}']:.0f} s", flush=True)
            reports[name] = open_loop(policies[name], work, conditioning)
        runs = [("expert", ["--policy", "expert"], []), ("zero", ["--policy", "zero"], []),
                ("replay", ["--policy", f"replay:{data}"], [])]
        runs += [(name, ["--policy", str(policy)], execute + ["--videos", "2"]) for name, policy in policies.items()]
        for name, who, extra in runs:
            infos[name], phases[f"eval {name}"] = closed_loop(a, work, name, who, ["--videos", "0", *extra])
            print(f"eval {name}: {infos[name]['overall']['pc_success']:.1f}% in {phases[f'eval {name}']:.0f} s",
                  flush=True)
        speed = {}
        first = next(iter(policies.values()))
        for n in a.speed_n_envs:
            info, _ = closed_loop(argparse.Namespace(**{**vars(a), "n_envs": n}), work, f"speed_{n}",
                                  ["--policy", str(first)], ["--videos", "0", "--max-steps", "100", *execute],
                                  episodes=max(4, n), tasks=tasks[0])
            speed[n] = info["overall"]["env_steps_per_s"]

    by_task = {name: {t["task"]: t for t in info["per_task"]} for name, info in infos.items()}
    columns = ["expert", "zero", "replay", *policies]
    rows = [("task", "expert", "zero", "blind replay", *(f"policy ({n.removeprefix('policy_')})" for n in policies))]
    for task in tasks:
        rows.append((task, *(_cell(by_task[n].get(task)) for n in columns)))
    rows.append(("all", *(_cell(infos[n]["overall"]) for n in columns)))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    print(f"\nMeta-World closed loop: {a.demos} expert demos per task ({a.image_size} px, {a.rendering} rendering, "
          f"cameras {a.cameras}), "
          f"Stage 1 tiny preset, {a.steps} steps, state window {a.window}"
          + (f", {' '.join(a.set)}" if a.set else "") + f"; {a.episodes} held-out seeds per task "
          f"(1000+), success % (95% interval)")
    for k, r in enumerate(rows):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if k == 0:
            print("  ".join("-" * w for w in widths))
    print("\nopen loop on the held-out episodes, policy MSE / mean-action MSE: " + ", ".join(
        f"{n.removeprefix('policy_')} {r['mse_ratio_to_mean_baseline']:.3f}" for n, r in reports.items())
        + f" ({next(iter(reports.values()))['samples']} samples of {next(iter(reports.values()))['episodes']} episodes)")
    print("seconds per phase: " + ", ".join(f"{k} {v:.0f}" for k, v in phases.items()))
    print("policy rollouts, environment steps/s: " + ", ".join(f"--n-envs {n}: {v:.0f}" for n, v in speed.items()))
    if a.json:
        a.json.write_text(json.dumps({
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
            "success": {name: {t: by_task[name][t]["pc_success"] for t in tasks} | {"all": infos[name]["overall"]
                                                                                    ["pc_success"]}
                        for name in infos},
            "success_ci95": {name: {t: by_task[name][t]["pc_success_ci95"] for t in tasks} for name in infos},
            "open_loop_ratio": {n.removeprefix("policy_"): r["mse_ratio_to_mean_baseline"] for n, r in reports.items()},
            "phases_s": phases,
            "env_steps_per_s": {str(n): v for n, v in speed.items()},
        }, indent=2) + "\n")
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
