"""Fault drill: break tiny Stage 1 runs on purpose and check that nothing is lost.

    python scripts/fault_drill.py [--out DIR] [--json PATH] [--only NAME ...]

Makes the tiny offline backbone and a small demo dataset, then runs each scenario end to
end (CPU, one rank unless the scenario needs two) and prints a table: scenario, what
happened, and the data or checkpoints lost (must be "none"). Exit 0 when every scenario
behaved, 1 otherwise. Takes a few minutes on 2 cores; tests/test_faults.py runs the same
scenarios as assertions.

``python -m vla_ds.training.fault_drill child [--kill-in-save TAG] [--nan-steps A-B]
[--kill-worker-at I] -- TRAIN_ARGS...`` runs ``scripts/train.py TRAIN_ARGS`` in this process
with one fault injected (the drill and the tests start it as a subprocess):

- ``--kill-in-save TAG``: while saving checkpoint TAG, the first file written is cut in half
  and the process SIGKILLs itself (a kill in the middle of a save);
- ``--nan-steps A-B``: the loss of training forward calls A..B (1-based; optimizer steps with accumulation 1)
  is NaN (a numerical blow-up);
- ``--kill-worker-at I``: the DataLoader worker that loads sample I SIGKILLs itself (the
  out-of-memory killer).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the source checkout: scripts/, ds_configs/
TRAIN = REPO / "scripts" / "train.py"


# --------------------------------------------------------------------------- injected faults


def inject_kill_in_save(tag: str) -> None:
    import torch

    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        path = Path(os.fspath(f)) if isinstance(f, (str, os.PathLike)) else None
        if path is not None and path.parent.name == tag:
            with open(path, "r+b") as fh:
                fh.truncate(path.stat().st_size // 2)
            os.kill(os.getpid(), signal.SIGKILL)

    torch.save = save


def inject_nan_steps(first: int, last: int) -> None:
    from vla_ds.models.policy import VLAPolicy

    real_forward = VLAPolicy.forward
    calls = {"train": 0}

    def forward(self, batch):
        out = real_forward(self, batch)
        if self.training:
            calls["train"] += 1
            if first <= calls["train"] <= last:
                out["loss"] = out["loss"] * float("nan")
        return out

    VLAPolicy.forward = forward


def inject_worker_kill(index: int) -> None:
    import torch

    from vla_ds.data.dataset import VLADataset

    real_get_item = VLADataset.get_item

    def get_item(self, i, with_images=True):
        if i == index and torch.utils.data.get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_get_item(self, i, with_images)

    VLADataset.get_item = get_item


def child(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="fault_drill.py child")
    p.add_argument("--kill-in-save")
    p.add_argument("--nan-steps")
    p.add_argument("--kill-worker-at", type=int)
    p.add_argument("train_args", nargs=argparse.REMAINDER)
    a = p.parse_args(argv)
    if a.kill_in_save:
        inject_kill_in_save(a.kill_in_save)
    if a.nan_steps:
        first, last = (int(x) for x in a.nan_steps.split("-"))
        inject_nan_steps(first, last)
    if a.kill_worker_at is not None:
        inject_worker_kill(a.kill_worker_at)
    from vla_ds.training.train import main

    args = a.train_args[1:] if a.train_args[:1] == ["--"] else a.train_args
    return main(args)


# --------------------------------------------------------------------------- helpers


def train_args(data: Path, backbone: Path, out: Path, *extra: str) -> list[str]:
    return ["--ds_config", str(REPO / "ds_configs" / "stage1.json"), "--dataset_dir", str(data),
            "--vl-model", str(backbone), "--model-preset", "tiny", "--sensor-window-size", "32",
            "--num_workers", "0", "--batch_size", "8", "--lr", "1e-3", "--output_dir", str(out),
            "--set", "train.progress_bar=false", *extra]


# Set in this process by an in-process run; a child must start its own process group.
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    return dict(env, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONUNBUFFERED="1")


def child_cmd(faults: list[str], args: list[str]) -> list[str]:
    return [sys.executable, "-m", "vla_ds.training.fault_drill", "child", *faults, "--", *args]


def run_child(faults: list[str], args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(child_cmd(faults, args), env=child_env(), cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def start_child(faults: list[str], args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(child_cmd(faults, args), env=child_env(), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def wait_for_latest(out: Path, tag: str | None, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Until ``out/latest`` names ``tag`` (any tag when None)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        latest = out / "latest"
        if latest.is_file() and (tag is None or latest.read_text().strip() == tag):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"the run ended before writing {tag}: {proc.stdout.read()[-2000:]}")
        time.sleep(0.05)
    raise TimeoutError(f"{out}: no {tag} within {timeout} s")


def final_state(out: Path, tag: str | None = None) -> dict:
    """Module weights and fp32 optimizer partitions of checkpoint ``tag`` (default: the
    newest) of ``out``."""
    import torch

    tag_dir = out / (tag or (out / "latest").read_text().strip())
    module = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]
    optim = torch.load(next(tag_dir.glob("*optim_states.pt")), map_location="cpu", weights_only=False)
    fp32 = optim["optimizer_state_dict"]["single_partition_of_fp32_groups"]
    return {"module": module, "fp32": fp32}


def states_equal(a: dict, b: dict) -> bool:
    import torch

    return (a["module"].keys() == b["module"].keys()
            and all(torch.equal(a["module"][k], b["module"][k]) for k in a["module"])
            and all(torch.equal(x, y) for x, y in zip(a["fp32"], b["fp32"])))


def losses(out: Path) -> list[tuple[int, float | None]]:
    from vla_ds.training.metrics import read_metrics

    return [(r["step"], r["train/loss"]) for r in read_metrics(out) if "train/loss" in r]


def last_error_line(text: str) -> str:
    lines = [line for line in text.splitlines() if "error:" in line]
    return lines[-1] if lines else "(no error line)"


# --------------------------------------------------------------------------- scenarios


def scenario_kill_in_save(ctx) -> tuple[bool, str, str]:
    out = ctx.root / "kill_in_save"
    args = train_args(ctx.data, ctx.backbone, out, "--epochs", "2", "--save_steps", "10", *ctx.common)
    proc = run_child(["--kill-in-save", "global_step20"], args)
    latest = (out / "latest").read_text().strip() if (out / "latest").is_file() else None
    import contextlib
    import io

    from vla_ds.training.train import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        refused = main(train_args(ctx.data, ctx.backbone, ctx.root / "kill_in_save_bad", "--epochs", "2",
                                  "--resume", str(out / "global_step20"), *ctx.common))
    resumed = main(train_args(ctx.data, ctx.backbone, out, "--epochs", "2", "--save_steps", "10",
                              "--resume", str(out), *ctx.common))
    steps = [s for s, _ in losses(out)]
    ok = (proc.returncode == -signal.SIGKILL and latest == "global_step10" and refused == 2
          and "half-written checkpoint" in err.getvalue() and resumed == 0 and steps == list(range(1, len(steps) + 1)))
    what = (f"killed while writing global_step20 (exit {proc.returncode}); latest stayed {latest}; "
            f"--resume of the half-written dir refused (exit {refused}); --resume {out.name} continued from step 10 "
            f"to {steps[-1] if steps else '?'} (exit {resumed})")
    return ok, what, "none" if ok else "see above"


def scenario_kill_and_resume(ctx) -> tuple[bool, str, str]:
    from vla_ds.training.train import main

    # The shipped optimizer (DeepSpeed's fused Adam): a resume replays its C++ beta^t product
    # (engine.replay_adam_step_counter), so the killed and resumed run is bit for bit the same.
    extra = ["--epochs", "3", "--save_steps", "10", "--save_total_limit", "2", *ctx.common]
    straight = ctx.root / "uninterrupted"
    assert main(train_args(ctx.data, ctx.backbone, straight, *extra)) == 0
    out = ctx.root / "killed"
    proc = start_child([], train_args(ctx.data, ctx.backbone, out, *extra))
    wait_for_latest(out, "global_step30", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = main(train_args(ctx.data, ctx.backbone, out, *extra, "--resume", str(out)))
    same_losses = losses(out) == losses(straight)
    same_weights = states_equal(final_state(out), final_state(straight))
    kept = sorted(p.name for p in out.glob("global_step*"))
    ok = resumed == 0 and same_losses and same_weights and len(kept) == 2
    what = (f"SIGKILL after global_step30, --resume: losses {'equal' if same_losses else 'DIFFER'}, final weights and "
            f"optimizer state {'equal' if same_weights else 'DIFFER'} to an uninterrupted run; kept {', '.join(kept)} "
            f"(--save_total_limit 2)")
    return ok, what, "none" if ok else "see above"


def scenario_nan_steps(ctx) -> tuple[bool, str, str]:
    from vla_ds.training.metrics import read_metrics

    out = ctx.root / "nan_steps"
    proc = run_child(["--nan-steps", "5-6"], train_args(ctx.data, ctx.backbone, out, "--epochs", "1", *ctx.common))
    rows = [r for r in read_metrics(out) if "train/loss" in r]
    skipped = rows[-1].get("train/skipped_steps") if rows else None
    ok = proc.returncode == 0 and skipped == 2 and rows[-1]["train/loss"] is not None
    what = f"NaN loss at steps 5-6: both updates skipped (train/skipped_steps {skipped}), run finished (exit {proc.returncode})"
    return ok, what, "none" if ok else "see above"


def scenario_nan_forever(ctx) -> tuple[bool, str, str]:
    out = ctx.root / "nan_forever"
    proc = run_child(["--nan-steps", "4-100000"],
                     train_args(ctx.data, ctx.backbone, out, "--epochs", "2", "--save_steps", "3",
                                "--set", "train.max_consecutive_skips=3", *ctx.common))
    good, last = final_state(out, "global_step3"), final_state(out)
    ok = proc.returncode == 2 and states_equal(good, last) and "consecutive optimizer steps" in proc.stderr
    latest = (out / "latest").read_text().strip() if (out / "latest").is_file() else None
    what = (f"NaN from step 4 on: stopped after 3 skipped steps (exit {proc.returncode}), {latest} saved with the "
            f"weights of step 3: {last_error_line(proc.stderr)[:90]}...")
    return ok, what, "none" if ok else "see above"


def scenario_bad_inputs(ctx) -> tuple[bool, str, str]:
    import contextlib
    import io

    from vla_ds.training.train import main

    results = []
    for name, (mutate, expect) in bad_input_cases().items():
        data = ctx.root / f"bad_{name}"
        shutil.copytree(ctx.data, data)
        target = mutate(data)
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = main(train_args(data, ctx.backbone, ctx.root / f"bad_{name}_out", "--max_steps", "1", *ctx.common))
        text = err.getvalue()
        results.append(code == 2 and str(target) in text and expect in text and "Traceback" not in text)
    ok = all(results)
    what = f"{sum(results)}/{len(results)} bad inputs ended with exit 2 and one message naming the file"
    return ok, what, "none (nothing written)" if ok else "see above"


def bad_input_cases() -> dict:
    """name -> (mutate(dataset copy) -> the path the message must name, text it must contain)."""
    import numpy as np

    def episode(data: Path, with_sensor: bool = True) -> Path:
        eps = sorted(p.parent for p in data.rglob("metadata.json"))
        return next(ep for ep in eps if (ep / "sensor_data.npz").exists() == with_sensor)

    def corrupt_image(data):
        img = sorted((episode(data) / "images" / "front").iterdir())[3]
        img.write_bytes(img.read_bytes()[:60])
        return img

    def truncated_npz(data):
        f = episode(data) / "sensor_data.npz"
        f.write_bytes(f.read_bytes()[:200])
        return f

    def npz_without(key):
        def mutate(data):
            f = episode(data) / "sensor_data.npz"
            with np.load(f) as z:
                kept = {k: z[k] for k in z.files if k != key}
            np.savez(f, **kept)
            return f
        return mutate

    def csv_edit(edit):
        def mutate(data):
            f = episode(data) / "robot_states.csv"
            lines = f.read_text().splitlines()
            f.write_text("\n".join(edit(lines)) + "\n")
            return f
        return mutate

    def drop_column(lines):
        header = lines[0].split(",")
        k = header.index("pose_z")
        return [",".join(v for j, v in enumerate(line.split(",")) if j != k) for line in lines]

    def nan_pose(lines):
        row = lines[5].split(",")
        row[2] = "nan"
        return [*lines[:5], ",".join(row), *lines[6:]]

    def backwards(lines):
        return [lines[0], *lines[1:5], lines[6], lines[5], *lines[7:]]

    def short_episode(lines):
        return lines[:6]  # 5 states at 50 Hz: 0.08 s

    def empty(data):
        for p in data.iterdir():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        return data

    def view_gap(data):
        ep = episode(data)
        for img in sorted((ep / "images" / "wrist").iterdir())[10:20]:
            img.unlink()
        return ep

    def missing_source(data):
        f = data / "mixture.yaml"
        f.write_text(f.read_text() + "  - {path: Not_recorded_yet, weight: 1.0}\n")
        return f

    return {
        "corrupt_image": (corrupt_image, "cannot decode image"),
        "truncated_npz": (truncated_npz, ""),
        "npz_without_timestamps": (npz_without("timestamps"), "timestamps"),
        "npz_without_data": (npz_without("data"), "data"),
        "csv_missing_column": (csv_edit(drop_column), "pose_z"),
        "nan_pose": (csv_edit(nan_pose), "NaN"),
        "timestamps_backwards": (csv_edit(backwards), "does not increase"),
        "episode_shorter_than_chunk": (lambda data: csv_edit(short_episode)(data).parent,
                                       "shorter than one action chunk"),
        "empty_dataset": (empty, "no episodes found"),
        "view_without_frame": (view_gap, "has no frame within"),
        "mixture_missing_source": (missing_source, "Not_recorded_yet"),
    }


def scenario_skip_bad_samples(ctx) -> tuple[bool, str, str]:
    from vla_ds.training.metrics import read_metrics
    from vla_ds.training.train import main

    data = ctx.root / "skip_data"
    shutil.copytree(ctx.data, data)
    ep = sorted(p.parent for p in data.rglob("metadata.json"))[0]
    broken = sorted((ep / "images" / "front").iterdir())[2:5]
    for img in broken:
        img.write_bytes(b"not an image")
    out = ctx.root / "skip_out"
    code = main(train_args(data, ctx.backbone, out, "--epochs", "1", "--on-bad-sample", "skip", *ctx.common))
    rows = [r for r in read_metrics(out) if "data/bad_samples" in r]
    files = rows[0]["data/bad_sample_files"] if rows else {}
    named = bool(files) and set(files) <= {str(p) for p in broken}  # a weighted draw may miss one of them
    ok = code == 0 and named
    what = (f"3 corrupt images with --on-bad-sample skip: run finished (exit {code}), "
            f"{sum(files.values())} sample(s) from {len(files)} file(s) listed in the log and metrics.jsonl")
    return ok, what, "the 3 bad samples (reported)" if ok else "see above"


def scenario_worker_killed(ctx) -> tuple[bool, str, str]:
    out = ctx.root / "worker"
    proc = run_child(["--kill-worker-at", "7"], train_args(ctx.data, ctx.backbone, out, "--epochs", "1",
                                                          "--num_workers", "2", "--no-cache", *ctx.common), timeout=300)
    line = last_error_line(proc.stderr)
    ok = proc.returncode == 2 and "sample 7 (" in line and "DataLoader worker died" in line
    what = f"worker SIGKILLed while loading sample 7: exit {proc.returncode}, '{line[:110]}...'"
    return ok, what, "none (no checkpoint was due)" if ok else "see above"


def scenario_dead_rank(ctx) -> tuple[bool, str, str]:
    hostfile = ctx.root / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    out = ctx.root / "dead_rank"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")
    env = dict(child_env(), OMP_NUM_THREADS="1")
    args = [str(TRAIN), *train_args(ctx.data, ctx.backbone, out, "--epochs", "100", *ctx.common,
                                    "--set", "train.dist_timeout_minutes=0.5")]
    procs = [subprocess.Popen([launcher, "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(n),
                               "--master_addr", "127.0.0.1", "--master_port", str(port), *args], env=env, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for n in (0, 1)]
    try:
        wait_for_latest(out, None, procs[0])
        rank1 = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _is_rank(p, out, 1)]
        os.kill(rank1[0], signal.SIGKILL)
        start = time.time()
        codes = [p.wait(timeout=120) for p in procs]
        elapsed = time.time() - start
        text = procs[0].stdout.read()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    line = last_error_line(text)
    ok = all(c != 0 for c in codes) and elapsed < 60 and "lost contact with another rank" in line
    what = (f"rank 1 of a two-node job SIGKILLed: both launchers exited ({codes}) {elapsed:.0f} s later; "
            f"rank 0: '{line[:80]}...'")
    return ok, what, "none (last checkpoint intact)" if ok else "see above"


def _is_rank(proc: Path, out: Path, rank: int) -> bool:
    try:
        cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        environ = (proc / "environ").read_bytes().split(b"\0")
    except OSError:
        return False
    return str(out).encode() in cmdline and f"RANK={rank}".encode() in environ and b"--local_rank=0" in cmdline


SCENARIOS = {
    "kill_in_save": scenario_kill_in_save,
    "kill_and_resume": scenario_kill_and_resume,
    "nan_steps": scenario_nan_steps,
    "nan_forever": scenario_nan_forever,
    "bad_inputs": scenario_bad_inputs,
    "skip_bad_samples": scenario_skip_bad_samples,
    "worker_killed": scenario_worker_killed,
    "dead_rank": scenario_dead_rank,
}


class Context:
    """Where a drill works: ``root`` for its runs, a tiny backbone and a demo dataset (made
    under ``root`` unless given)."""

    def __init__(self, root: Path, backbone: Path | None = None, data: Path | None = None):
        from vla_ds.data.demo import make_demo_dataset
        from vla_ds.models.tiny_backbone import make_tiny_backbone

        self.root = root
        self.backbone = backbone or make_tiny_backbone(root / "tiny_backbone")
        self.data = data or make_demo_dataset(root / "dataset", episodes_per_source=(4, 3))
        self.common = ["--set", f"cache.dir={root / 'cache'}"]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["child"]:
        return child(argv[1:])
    p = argparse.ArgumentParser(description="Break tiny runs on purpose; print what happened and what was lost.")
    p.add_argument("--out", type=Path, default=None, help="work directory (default: a temporary one, removed)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--only", nargs="+", choices=list(SCENARIOS), default=list(SCENARIOS))
    a = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    from vla_ds.log import setup_logging

    setup_logging(level=40)
    import tempfile

    root = a.out or Path(tempfile.mkdtemp(prefix="vla_ds_drill_"))
    root.mkdir(parents=True, exist_ok=True)
    ctx = Context(root)
    rows = []
    for name in a.only:
        start = time.time()
        try:
            ok, what, lost = SCENARIOS[name](ctx)
        except Exception as e:  # a drill that cannot even run is a failed scenario, reported as such
            ok, what, lost = False, f"drill error: {type(e).__name__}: {e}", "unknown"
        rows.append({"scenario": name, "ok": ok, "what_happened": what, "lost": lost,
                     "seconds": round(time.time() - start, 1)})
        print(f"[{'ok' if ok else 'FAIL'}] {name} ({rows[-1]['seconds']} s)", flush=True)
    print()
    print("| scenario | result | what happened | data or checkpoints lost |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['scenario']} | {'ok' if r['ok'] else 'FAIL'} | {r['what_happened']} | {r['lost']} |")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2) + "\n")
    if a.out is None:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
