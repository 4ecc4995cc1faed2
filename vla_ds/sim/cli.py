"""Command lines: ``vla-eval-sim`` (scripts/eval_sim.py) and ``vla-record-sim`` (scripts/record_sim.py)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from vla_ds.errors import ConfigError

logger = logging.getLogger(__name__)


def build_eval_parser() -> argparse.ArgumentParser:
    from vla_ds.sim import metaworld

    p = argparse.ArgumentParser(
        prog="eval_sim.py",
        description="Closed-loop success of a policy in simulation (Meta-World, LeRobot's observation protocol): "
                    "eval_info.json in lerobot-eval's layout, videos and a plot.")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--policy", help="exported policy directory (run in this process); or a baseline: 'expert' "
                                      "(Meta-World's scripted expert), 'zero' (zero actions) or 'replay:DATASET' "
                                      "(blind replay of the dataset's recorded actions of the task)")
    who.add_argument("--server", help="HOST:PORT of a running policy server (scripts/serve.py): the robot's path, "
                                      "through PolicyClient and ActionChunker")
    p.add_argument("--api-key", default=None, help="the server's API key, if it needs one")
    p.add_argument("--connect-timeout", dest="connect_timeout", type=float, default=30.0,
                   help="seconds to keep trying while the server starts (default 30)")
    p.add_argument("--env", choices=["metaworld"], default="metaworld")
    p.add_argument("--tasks", default="reach-v3",
                   help="comma-separated tasks and groups: reach-v3,button-press-v3 | easy | medium | hard | "
                        "very_hard | mt10 | mt50 (default reach-v3)")
    p.add_argument("--episodes", type=int, default=10, help="episodes per task (default 10, as LeRobot's docs)")
    p.add_argument("--seed", type=int, default=metaworld.EVAL_START_SEED,
                   help=f"seed of each task's first episode, then +1 per episode (default "
                        f"{metaworld.EVAL_START_SEED}, lerobot-eval's; recordings use seeds below it)")
    p.add_argument("--n-envs", "--n_envs", dest="n_envs", type=int, default=1,
                   help="environments at once, each in a worker process; their observations share one forward "
                        "pass (default 1)")
    p.add_argument("--execute-steps", "--execute_steps", dest="execute_steps", type=int, default=None,
                   help="actions of each chunk executed before asking for the next (default: the whole chunk)")
    p.add_argument("--prefetch", type=int, default=0,
                   help="ask for the next chunk this many steps before the current one runs out (ActionChunker; "
                        "default 0)")
    p.add_argument("--max-steps", "--max_steps", dest="max_steps", type=int, default=metaworld.MAX_EPISODE_STEPS,
                   help=f"steps per episode at most (default {metaworld.MAX_EPISODE_STEPS}, Meta-World's limit)")
    p.add_argument("--image-size", "--image_size", dest="image_size", type=int, default=metaworld.DEFAULT_IMAGE_SIZE,
                   help=f"camera resolution, square (default {metaworld.DEFAULT_IMAGE_SIZE}, LeRobot's); use the size "
                        "the policy's training data was recorded at")
    p.add_argument("--rendering", choices=list(metaworld.RENDERINGS), default="lerobot",
                   help="lerobot: Meta-World's scene as LeRobot renders it (default); fast: no shadows or "
                        "reflections, 3-4x faster on a CPU (use what the training data was recorded with)")
    p.add_argument("--videos", type=int, default=2, help="episodes filmed per task (default 2)")
    p.add_argument("--baselines", default="expert,zero",
                   help="baselines run on the same tasks and seeds beside a policy and shown in its table: "
                        "comma-separated of expert, zero, replay (the policy's training data) or replay:DATASET; "
                        "'none' for none (default expert,zero)")
    p.add_argument("--output", "--output_dir", "--output-dir", dest="output", required=True,
                   help="directory for eval_info.json, success.png, videos/ and baselines/")
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps of the policy (default: its num_inference_steps)")
    p.add_argument("--vl-model", "--vl_model", dest="vl_model", default=None,
                   help="base Qwen2.5-VL dir or hub id, when the training path is not available here")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None, help="backbone dtype (default: as trained)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def check_recording(config: dict, image_size: int, rendering: str) -> None:
    """Warn when the policy's training data (when it is on this machine) was recorded at
    another image size or with another rendering than this evaluation uses."""
    from vla_ds.data.lerobot import INFO_FILE, is_lerobot_root
    from vla_ds.sim.metaworld import IMAGE_KEY
    from vla_ds.sim.record import RECORDING_FILE

    dataset = (config.get("data") or {}).get("dataset_dir")
    if not dataset or not is_lerobot_root(dataset):
        return
    recorded: dict = {"rendering": "lerobot"}  # LeRobot's own recordings render Meta-World's scene as it is
    try:
        recorded.update(json.loads((Path(dataset) / RECORDING_FILE).read_text()))
    except (OSError, ValueError):
        try:
            shape = json.loads((Path(dataset) / INFO_FILE).read_text())["features"][IMAGE_KEY]["shape"]
            recorded["image_size"] = max(shape) if shape[0] == 3 else shape[0]  # [3, H, W] (the hub's) or [H, W, 3]
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            return
    for name, flag, used in (("image_size", "--image-size", image_size), ("rendering", "--rendering", rendering)):
        if name in recorded and recorded[name] != used:
            logger.warning("the policy's training data %s was recorded with %s %s; this evaluation uses %s: the "
                           "policy sees images unlike its training data", dataset, flag, recorded[name], used)


def make_rollout_policy(args: argparse.Namespace):
    """The :class:`~vla_ds.sim.policies.RolloutPolicy` the flags name."""
    from vla_ds.sim.policies import ChunkingPolicy, LocalModel, is_baseline

    if args.server:
        import websockets

        from vla_ds.serving.client import PolicyClient, PolicyServerError

        host, sep, port = args.server.rpartition(":")
        if not sep or not port.isdigit():
            raise ConfigError(f"--server must be HOST:PORT, got {args.server!r}")

        def connect():
            try:
                return PolicyClient(host, int(port), api_key=args.api_key, connect_timeout_s=args.connect_timeout)
            except (OSError, websockets.exceptions.InvalidHandshake, PolicyServerError) as e:
                raise ConfigError(f"--server {args.server}: cannot connect ({e})") from None

        return ChunkingPolicy(f"server {args.server}", connect=connect, execute=args.execute_steps,
                              prefetch=args.prefetch)
    if is_baseline(args.policy):
        return baseline_policy(args.policy, flag="--policy")

    from vla_ds.models.policy import VLAPolicy, read_policy_config

    config = read_policy_config(args.policy)
    check_recording(config, args.image_size, args.rendering)
    policy = VLAPolicy.from_pretrained(args.policy, vl_model=args.vl_model, device=args.device, dtype=args.dtype)
    return ChunkingPolicy(str(args.policy), model=LocalModel(policy, args.steps), execute=args.execute_steps,
                          prefetch=args.prefetch)


def baseline_policy(name: str, training_data: str | None = None, flag: str = "--baselines"):
    """The baseline ``name`` names (expert, zero, replay:DATASET; ``replay`` alone replays
    ``training_data``)."""
    from vla_ds.sim.policies import (
        EXPERT,
        REPLAY,
        ZERO,
        ExpertPolicy,
        ReplayPolicy,
        ZeroPolicy,
    )

    if name == EXPERT:
        return ExpertPolicy()
    if name == ZERO:
        return ZeroPolicy()
    if name.startswith(REPLAY + ":"):
        return ReplayPolicy(name[len(REPLAY) + 1:])
    if not training_data:
        raise ConfigError(f"{flag} replay replays the policy's training data, which is not known here: give "
                          "replay:DATASET")
    return ReplayPolicy(training_data)


def run_eval(args: argparse.Namespace) -> dict:
    from vla_ds.sim.evaluate import EVAL_INFO_FILE, evaluate_policy
    from vla_ds.sim.metaworld import resolve_tasks
    from vla_ds.sim.policies import ChunkingPolicy, is_baseline

    tasks = resolve_tasks(args.tasks)  # bad names are reported before a policy loads
    names = [] if args.baselines.strip() in ("", "none") else [b.strip() for b in args.baselines.split(",")]
    unknown = [n for n in names if not is_baseline(n)]
    if unknown:
        raise ConfigError(f"--baselines: unknown {', '.join(unknown)} (expert, zero, replay, replay:DATASET, none)")
    rollout_policy = make_rollout_policy(args)
    baselines = []
    if isinstance(rollout_policy, ChunkingPolicy):  # a baseline evaluated on its own gets none beside it
        local = rollout_policy.model
        training_data = (local.policy.policy_config.get("data") or {}).get("dataset_dir") if local else None
        baselines = [(n, baseline_policy(n, training_data)) for n in names]
    steps = args.steps
    if args.server:
        ignored = [flag for flag, value in (("--steps", args.steps), ("--device", args.device),
                                            ("--dtype", args.dtype), ("--vl-model", args.vl_model)) if value]
        if ignored:
            logger.warning("%s: set on the server (scripts/serve.py), not here; ignored", ", ".join(ignored))
        steps = rollout_policy.metadata.get("ddim_steps")
    settings = {"env": args.env, "tasks": args.tasks, "execute_steps": args.execute_steps, "prefetch": args.prefetch,
                "sampling_steps": steps}
    common = {"episodes": args.episodes, "seed": args.seed, "n_envs": args.n_envs, "image_size": args.image_size,
              "rendering": args.rendering, "max_steps": args.max_steps, "progress": args.progress}
    info = evaluate_policy(rollout_policy, tasks, args.output, videos=args.videos, settings=settings, **common)
    if baselines:
        info["baselines"] = {}
        for name, policy in baselines:
            other = evaluate_policy(policy, tasks, Path(args.output) / "baselines" / name.split(":")[0], videos=0,
                                    settings=settings, **common)
            info["baselines"][name] = {"per_task": {t["task"]: {k: t[k] for k in ("pc_success", "pc_success_ci95",
                                                                                  "n_episodes")}
                                                    for t in other["per_task"]},
                                       "overall": {k: other["overall"][k] for k in ("pc_success", "pc_success_ci95",
                                                                                     "n_episodes")}}
        (Path(args.output) / EVAL_INFO_FILE).write_text(json.dumps(info, indent=2))
    return info


def eval_main(argv: list[str] | None = None) -> int:
    """``scripts/eval_sim.py`` / ``vla-eval-sim``: prints the success table and what it wrote."""
    from vla_ds.errors import run_command
    from vla_ds.log import setup_logging
    from vla_ds.sim.evaluate import EVAL_INFO_FILE, PLOT_FILE, format_table

    args = build_eval_parser().parse_args(argv)
    setup_logging()
    code, info = run_command(run_eval, args)
    if code:
        return code
    overall = info["overall"]
    print(f"\nclosed-loop success of {info['settings']['policy']} ({args.env}, seeds {args.seed}.."
          f"{args.seed + args.episodes - 1}, at most {args.max_steps} steps):")
    print(format_table(info))
    print(f"\n{overall['n_episodes']} episodes in {overall['eval_s']:.0f} s ({overall['env_steps_per_s']:.0f} "
          f"environment steps/s)")
    out = Path(args.output)
    print(f"report: {out / EVAL_INFO_FILE}\nplot:   {out / PLOT_FILE}")
    for path in overall["video_paths"]:
        print(f"video:  {path}")
    return 0


def build_record_parser() -> argparse.ArgumentParser:
    from vla_ds.data.lerobot_writer import VIDEO_CODECS
    from vla_ds.sim import metaworld

    p = argparse.ArgumentParser(
        prog="record_sim.py",
        description="Record Meta-World's scripted experts as a LeRobot v3.0 dataset (lerobot/metaworld_mt50's "
                    "features; successful episodes only).")
    p.add_argument("--output", "--output_dir", "--output-dir", dest="output", required=True,
                   help="the new dataset's directory (must not exist, or be empty)")
    p.add_argument("--env", choices=["metaworld"], default="metaworld")
    p.add_argument("--tasks", default="reach-v3", help="comma-separated tasks and groups (as vla-eval-sim)")
    p.add_argument("--episodes", type=int, default=50, help="successful episodes per task (default 50)")
    p.add_argument("--seed", type=int, default=0,
                   help=f"seed of each task's first try, then +1 (default 0; must stay below the evaluation seeds, "
                        f"{metaworld.EVAL_START_SEED}+)")
    p.add_argument("--max-attempts", "--max_attempts", dest="max_attempts", type=int, default=3,
                   help="give up on a task after this many tries per episode asked for (default 3)")
    p.add_argument("--n-envs", "--n_envs", dest="n_envs", type=int, default=1,
                   help="environments at once, each in a worker process (default 1)")
    p.add_argument("--image-size", "--image_size", dest="image_size", type=int, default=metaworld.DEFAULT_IMAGE_SIZE,
                   help=f"camera resolution, square (default {metaworld.DEFAULT_IMAGE_SIZE}, LeRobot's)")
    p.add_argument("--rendering", choices=list(metaworld.RENDERINGS), default="lerobot",
                   help="lerobot: Meta-World's scene as LeRobot renders it (default); fast: no shadows or "
                        "reflections, 3-4x faster on a CPU (evaluate with the same)")
    p.add_argument("--cameras", default=metaworld.CAMERA,
                   help=f"comma-separated cameras, {metaworld.CAMERA} (LeRobot's, observation.image) first; each other "
                        f"is observation.images.<camera>: {', '.join(metaworld.CAMERA_NAMES[1:])} (default "
                        f"{metaworld.CAMERA}). The evaluator renders the views a policy was trained on")
    p.add_argument("--codec", choices=list(VIDEO_CODECS), default="h264",
                   help="video codec: h264 (libx264, default) or av1 (libsvtav1, LeRobot's default)")
    p.add_argument("--max-steps", "--max_steps", dest="max_steps", type=int, default=metaworld.MAX_EPISODE_STEPS)
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def run_record(args: argparse.Namespace) -> dict:
    from vla_ds.sim.metaworld import resolve_tasks
    from vla_ds.sim.record import record_demos

    tasks = list(dict.fromkeys(t for _, t in resolve_tasks(args.tasks)))
    return record_demos(tasks, args.output, episodes=args.episodes, seed=args.seed, n_envs=args.n_envs,
                        image_size=args.image_size, rendering=args.rendering, codec=args.codec,
                        max_steps=args.max_steps, max_attempts=args.max_attempts,
                        cameras=args.cameras, progress=args.progress)


def record_main(argv: list[str] | None = None) -> int:
    """``scripts/record_sim.py`` / ``vla-record-sim``: prints what it recorded."""
    from vla_ds.errors import run_command
    from vla_ds.log import setup_logging

    args = build_record_parser().parse_args(argv)
    setup_logging()
    code, summary = run_command(run_record, args)
    if code:
        return code
    print(f"\nrecorded {summary['episodes']} episodes ({summary['frames']} frames) of {len(summary['tasks'])} "
          f"task(s) in {summary['seconds']:.0f} s -> {args.output}")
    for task, t in summary["tasks"].items():
        print(f"  {task}: {len(t['saved_seeds'])} saved, {len(t['failed_seeds'])} expert failures dropped")
    print(f"train on it: scripts/train.py --training-stage stage1 --dataset_dir {args.output} ...")
    return 0
