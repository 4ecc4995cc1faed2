"""Closed-loop evaluation: rollouts in simulation, success rates, videos (``vla-eval-sim``).

``evaluate_policy`` runs ``episodes`` rollouts per task from seeds ``seed, seed+1, ...`` (the
same seeds for every task and every policy, as lerobot-eval), ``n_envs`` environments at a
time in worker processes, and writes under ``output``::

    eval_info.json      lerobot-eval's layout: per_task, per_group, overall (pc_success,
                        avg_sum_reward, avg_max_reward, n_episodes, eval_s, eval_ep_s,
                        video_paths), plus 95% intervals, seeds, steps and the settings
    success.png         success per task with its 95% interval
    videos/<task>/eval_episode_<k>.mp4   the first --videos episodes of each task: the camera
                        view beside the chunk being executed

An episode ends at its first success (``info["success"]``) or after ``max_steps`` steps
(Meta-World's limit is 500); its reward sum and maximum run over the steps it took.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from vla_ds.errors import ConfigError

logger = logging.getLogger(__name__)

EVAL_INFO_FILE = "eval_info.json"
PLOT_FILE = "success.png"
VIDEOS_DIR = "videos"


@dataclasses.dataclass
class EpisodeResult:
    group: str
    task: str
    seed: int
    success: bool
    steps: int
    sum_reward: float
    max_reward: float
    video: str | None = None


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a success rate, in percent (well-behaved at 0 and n)."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (100 * max(0.0, center - half), 100 * min(1.0, center + half))


def check_settings(**values: int) -> None:
    """Refuse a rollout setting that is not an integer in range, naming its flag."""
    from vla_ds.sim.metaworld import MAX_EPISODE_STEPS

    lowest = {"videos": 0, "seed": 0, "image_size": 16}
    for name, value in values.items():
        low = lowest.get(name, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"--{name.replace('_', '-')} must be an integer >= {low}, got {value!r}")
    if values.get("max_steps", 0) > MAX_EPISODE_STEPS:
        raise ConfigError(f"--max-steps must be at most {MAX_EPISODE_STEPS}, Meta-World's episode length, got "
                          f"{values['max_steps']}")
    if values.get("image_size", 0) % 2:
        raise ConfigError(f"--image-size must be even (videos are yuv420p), got {values['image_size']}")


# --------------------------------------------------------------------------- videos


class _EpisodeVideo:
    """An MP4 of one rollout: the camera view and, beside it, the chunk being executed."""

    def __init__(self, path: Path, fps: int, task: str, seed: int, limit: int):
        import av

        self.path, self.task, self.seed, self.limit = path, task, seed, limit
        path.parent.mkdir(parents=True, exist_ok=True)
        self.container = av.open(str(path), "w")
        self.stream = self.container.add_stream("libx264", fps, options={"crf": "23", "preset": "fast"})
        self.stream.pix_fmt = "yuv420p"
        self.size: tuple[int, int] | None = None

    def add(self, image: np.ndarray, chunk: tuple[np.ndarray, int] | None, step: int, reward: float,
            success: bool) -> None:
        import av

        frame = compose_frame(image, chunk, [self.task, f"seed {self.seed}   step {step}/{self.limit}",
                                             f"reward {reward:.2f}" + ("   SUCCESS" if success else "")])
        if self.size is None:
            self.size = frame.shape[:2]
            self.stream.height, self.stream.width = self.size
        for packet in self.stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
            self.container.mux(packet)

    def close(self) -> None:
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()


def compose_frame(image: np.ndarray, chunk: tuple[np.ndarray, int] | None, lines: list[str]) -> np.ndarray:
    """(h, w, 3) uint8: the camera view (scaled up to at least 256 px) beside a panel with
    ``lines`` of text and the chunk's D action curves over its H steps, the executed one
    marked; even sides, as H.264 wants."""
    from PIL import Image, ImageDraw

    scale = max(1, math.ceil(256 / image.shape[0]))
    view = Image.fromarray(image).resize((image.shape[1] * scale, image.shape[0] * scale), Image.NEAREST)
    h = view.height + view.height % 2
    w_panel = h + h % 2
    canvas = Image.new("RGB", (view.width + view.width % 2 + w_panel, h), (255, 255, 255))
    canvas.paste(view, (0, 0))
    draw = ImageDraw.Draw(canvas)
    x0 = view.width + view.width % 2 + 8
    for k, line in enumerate(lines):
        draw.text((x0, 6 + 14 * k), line, fill=(0, 0, 0))
    top, bottom, left, right = 14 * len(lines) + 16, h - 10, x0, canvas.width - 10
    draw.rectangle([left, top, right, bottom], outline=(160, 160, 160))
    if chunk is not None:
        actions, index = chunk
        actions = np.asarray(actions, dtype=np.float64)  # (H, D)
        lo, hi = min(-1.0, float(actions.min())), max(1.0, float(actions.max()))
        horizon = len(actions)

        def xy(k, v):
            x = left + (right - left) * (k + 0.5) / horizon
            return x, bottom - (bottom - top) * (v - lo) / (hi - lo)

        zero = xy(0, 0.0)[1]
        draw.line([(left, zero), (right, zero)], fill=(210, 210, 210))
        mark = xy(index, 0)[0]
        draw.line([(mark, top), (mark, bottom)], fill=(255, 150, 0), width=2)
        colors = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (140, 86, 75), (227, 119, 194)]
        for d in range(actions.shape[1]):
            points = [xy(k, actions[k, d]) for k in range(horizon)]
            color = colors[d % len(colors)]
            if horizon > 1:
                draw.line(points, fill=color, width=2)
            x, y = points[index]
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
        draw.text((left + 4, top + 2), f"chunk: {horizon} actions, executing #{index}", fill=(90, 90, 90))
    return np.asarray(canvas)


# --------------------------------------------------------------------------- rollouts


class RolloutObserver:
    """Watches rollouts (videos, the recorder): told when an episode begins, after every
    step, and when it ends; it may ask for every step's camera image."""

    def begin(self, env: int, task: str, seed: int, episode: int) -> None:
        pass

    def wants_images(self, env: int) -> bool:
        return False

    def step(self, env: int, frame: dict, action: np.ndarray, result, chunk, step: int, totals: list) -> None:
        """``frame`` is what ``action`` was chosen from; ``result`` the step's StepResult."""

    def end(self, env: int, episode: EpisodeResult, last_images: dict | None, chunk) -> None:
        pass


class VideoObserver(RolloutObserver):
    """MP4s of the first ``count`` episodes of a task in ``directory`` (eval_episode_<k>.mp4)."""

    def __init__(self, directory: Path, count: int, limit: int):
        self.directory, self.count, self.limit = directory, count, limit
        self.writers: dict[int, _EpisodeVideo] = {}

    def begin(self, env, task, seed, episode):
        from vla_ds.sim.metaworld import FPS

        if episode < self.count:
            self.writers[env] = _EpisodeVideo(self.directory / f"eval_episode_{episode}.mp4", FPS, task, seed,
                                              self.limit)

    def wants_images(self, env):
        return env in self.writers

    def step(self, env, frame, action, result, chunk, step, totals):
        from vla_ds.sim.metaworld import IMAGE_KEY

        if env in self.writers:
            # The frame before the step: its reward and success are not in yet (success ends an episode).
            self.writers[env].add(frame[IMAGE_KEY], chunk, step, totals[0] - result.reward, False)

    def end(self, env, episode, last_images, chunk):
        from vla_ds.sim.metaworld import IMAGE_KEY

        writer = self.writers.pop(env, None)
        if writer is not None:
            writer.add(last_images[IMAGE_KEY], chunk, episode.steps, episode.sum_reward, episode.success)
            writer.close()
            episode.video = str(writer.path)


def run_episodes(pool, policy, group: str, task: str, seeds: list[int], limit: int,
                 observers: list[RolloutObserver] = (), progress=None) -> tuple[list[EpisodeResult], int]:
    """Episodes of ``task`` from ``seeds`` in ``pool``'s environments (``pool.n`` at a time,
    in lockstep), driven by ``policy``; returns their results and the environment steps taken."""
    from vla_ds.sim import metaworld

    def wanted(envs):  # the environments whose next observation needs its camera image
        return {i for i in envs if policy.needs_image(i) or any(o.wants_images(i) for o in observers)}

    results: list[EpisodeResult] = []
    env_steps = 0
    for start in range(0, len(seeds), pool.n):
        batch = seeds[start:start + pool.n]
        for i, seed in enumerate(batch):
            policy.begin_episode(i, seed)
            for o in observers:
                o.begin(i, task, seed, start + i)
        obs, images = {}, {}
        for i, (o, rendered) in enumerate(pool.reset(batch, render=wanted(range(len(batch))))):
            obs[i], images[i] = o, rendered
        totals = {i: [0.0, -math.inf, False] for i in range(len(batch))}  # reward sum, max, success
        active = set(range(len(batch)))
        step = 0
        while active:
            frames = {i: metaworld.lerobot_frame(obs[i], images[i]) for i in sorted(active)}
            actions = policy.act(frames, {i: obs[i] for i in frames})
            chunks = {i: policy.chunk(i) for i in frames}
            stepped = pool.step({i: actions[i] for i in frames}, render=wanted(active))
            step += 1
            env_steps += len(stepped)
            for i, r in stepped.items():
                totals[i][0] += r.reward
                totals[i][1] = max(totals[i][1], r.reward)
                totals[i][2] = totals[i][2] or r.success
                for o in observers:
                    o.step(i, frames[i], actions[i], r, chunks[i], step - 1, totals[i])
                obs[i], images[i] = r.obs, r.images
                if not (r.success or r.truncated or step >= limit):
                    continue
                active.discard(i)
                episode = EpisodeResult(group, task, batch[i], bool(totals[i][2]), step, totals[i][0], totals[i][1])
                for o in observers:
                    o.end(i, episode, r.images, chunks[i])
                results.append(episode)
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix_str(f"{task} {sum(e.success for e in results)}/{len(results)}")
    results.sort(key=lambda e: e.seed)
    return results, env_steps


def task_id(tasks: list[tuple[str, str]], k: int) -> int:
    """lerobot-eval's task_id of the k-th (group, task): its index within its group."""
    return sum(1 for g, _ in tasks[:k] if g == tasks[k][0])


def _aggregate(episodes: list[EpisodeResult]) -> dict[str, Any]:
    n = len(episodes)
    k = sum(e.success for e in episodes)
    return {
        "avg_sum_reward": float(np.mean([e.sum_reward for e in episodes])) if n else float("nan"),
        "avg_max_reward": float(np.mean([e.max_reward for e in episodes])) if n else float("nan"),
        "pc_success": 100.0 * k / n if n else float("nan"),
        "pc_success_ci95": list(wilson_interval(k, n)),
        "n_episodes": n,
        "video_paths": [e.video for e in episodes if e.video],
        "predicted_video_paths": [],  # lerobot-eval's key for world-model policies; none here
    }


def eval_info(episodes: list[EpisodeResult], eval_s: float, env_steps: int, settings: dict) -> dict[str, Any]:
    """The report in lerobot-eval's layout (``per_task`` entries, ``per_group`` and ``overall``
    aggregates), with intervals, seeds and steps added."""
    per_task, groups = [], {}
    order = list(dict.fromkeys((e.group, e.task) for e in episodes))
    for group, task in order:
        mine = [e for e in episodes if (e.group, e.task) == (group, task)]
        per_task.append({
            "task_group": group, "task_id": task_id(order, order.index((group, task))), "task": task,
            "metrics": {"sum_rewards": [e.sum_reward for e in mine], "max_rewards": [e.max_reward for e in mine],
                        "successes": [e.success for e in mine], "video_paths": [e.video for e in mine if e.video],
                        "predicted_video_paths": [], "seeds": [e.seed for e in mine],
                        "steps": [e.steps for e in mine]},
            **{k: v for k, v in _aggregate(mine).items() if not k.endswith("video_paths")},
        })
        groups.setdefault(group, []).extend(mine)
    overall = _aggregate(episodes)
    overall.update({"eval_s": eval_s, "eval_ep_s": eval_s / max(1, len(episodes)), "env_steps": env_steps,
                    "env_steps_per_s": env_steps / eval_s if eval_s > 0 else float("nan")})
    return {"per_task": per_task, "per_group": {g: _aggregate(e) for g, e in groups.items()}, "overall": overall,
            "settings": settings}


def plot_success(info: dict, path: Path, title: str) -> Path:
    """A bar per task: success rate with its 95% interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = info["per_task"]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * len(tasks) + 2), 3.6))
    x = np.arange(len(tasks))
    rates = [t["pc_success"] for t in tasks]
    lo = [r - t["pc_success_ci95"][0] for r, t in zip(rates, tasks)]
    hi = [t["pc_success_ci95"][1] - r for r, t in zip(rates, tasks)]
    ax.bar(x, rates, color="tab:blue", yerr=[lo, hi], capsize=3, ecolor="gray")
    ax.set_xticks(x, [t["task"].removesuffix("-v3") for t in tasks], rotation=45, ha="right")
    ax.set_ylim(0, 100)
    ax.set_ylabel("success (%)")
    n = info["overall"]["n_episodes"] // max(1, len(tasks))
    ax.set_title(f"{title}: {info['overall']['pc_success']:.0f}% over {len(tasks)} task(s), {n} episodes each",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def evaluate_policy(policy, tasks: list[tuple[str, str]], output: str | Path, *, episodes: int = 10,
                    seed: int = 1000, n_envs: int = 1, image_size: int = 480, rendering: str = "lerobot",
                    max_steps: int = 500,
                    videos: int = 0, settings: dict | None = None, progress: bool = True) -> dict[str, Any]:
    """Roll ``policy`` (a :class:`~vla_ds.sim.policies.RolloutPolicy`) out on ``tasks``
    ([(group, task), ...]) and write the report (module docstring); returns eval_info."""
    from tqdm import tqdm

    from vla_ds.sim.envs import EnvPool
    from vla_ds.sim.metaworld import TASK_DESCRIPTIONS

    check_settings(episodes=episodes, n_envs=n_envs, image_size=image_size, max_steps=max_steps, videos=videos,
                   seed=seed)
    output = Path(output)
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{output}: cannot create the output directory ({e.strerror or e})") from None
    seeds = list(range(seed, seed + episodes))
    started = time.monotonic()
    results, env_steps = [], 0
    bar = tqdm(total=len(tasks) * episodes, desc=f"eval {policy.name}", unit="episode", disable=not progress,
               dynamic_ncols=True)
    try:
        for k, (group, task) in enumerate(tasks):
            with EnvPool(task, min(n_envs, episodes), image_size, rendering, cameras=policy.cameras) as pool:
                policy.begin_task(task, TASK_DESCRIPTIONS[task], pool.n)
                films = VideoObserver(output / VIDEOS_DIR / f"{group}_{task_id(tasks, k)}", videos, max_steps)
                done, steps = run_episodes(pool, policy, group, task, seeds, max_steps, [films], progress=bar)
            results += done
            env_steps += steps
            logger.info("%s: %d/%d successes, %.1f steps per episode", task, sum(e.success for e in done),
                        len(done), np.mean([e.steps for e in done]))
    finally:
        bar.close()
        policy.close()
    info = eval_info(results, time.monotonic() - started, env_steps,
                     {"policy": policy.name, "episodes": episodes, "seed": seed, "n_envs": n_envs,
                      "image_size": image_size, "rendering": rendering, "max_steps": max_steps, **(settings or {})})
    (output / EVAL_INFO_FILE).write_text(json.dumps(info, indent=2))
    plot_success(info, output / PLOT_FILE, policy.name)
    return info


def format_table(info: dict) -> str:
    """The per-task table printed at the end: success with its 95% interval and episode
    count, reward and steps, and the baselines' success when they ran beside the policy."""
    baselines = info.get("baselines", {})
    rows = [("task", "success", "95% interval", "episodes", "avg sum reward", "avg max reward", "mean steps",
             *baselines)]

    def row(name, agg, steps):
        lo, hi = agg["pc_success_ci95"]
        return (name, f"{agg['pc_success']:.1f}%", f"{lo:.0f}-{hi:.0f}%", str(agg["n_episodes"]),
                f"{agg['avg_sum_reward']:.1f}", f"{agg['avg_max_reward']:.2f}", steps)

    for t in info["per_task"]:
        rows.append(row(t["task"], t, f"{np.mean(t['metrics']['steps']):.0f}")
                    + tuple(f"{b['per_task'][t['task']]['pc_success']:.1f}%" for b in baselines.values()))
    if len(info["per_task"]) > 1:
        tasks = {t["task"] for t in info["per_task"]}
        for group, agg in info["per_group"].items():
            if group not in tasks:  # a group named on the command line (easy, mt10, ...)
                rows.append(row("group " + group, agg, "") + ("",) * len(baselines))
        rows.append(row("overall", info["overall"], "")
                    + tuple(f"{b['overall']['pc_success']:.1f}%" for b in baselines.values()))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
