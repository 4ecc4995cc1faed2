"""SIGTERM / SIGINT (scancel, docker stop, a preemption, Ctrl-C): every rank finishes its
optimizer step, the ranks agree on where to stop, save a normal checkpoint there, end their
DataLoader workers and exit with 143 / 130 and one line naming the checkpoint; ``--resume``
from it trains on as if nothing had happened."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch
from checkpoint_helpers import fp32_masters_from_shards, model_states

from vla_ds.training import fault_drill as drill
from vla_ds.training.metrics import read_metrics

REPO = Path(__file__).resolve().parent.parent
TRAIN = str(REPO / "scripts" / "train.py")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_rows(out: Path) -> list[dict]:
    return [r for r in read_metrics(out) if "train/loss" in r] if (out / "metrics.jsonl").is_file() else []


def wait_for_steps(out: Path, steps: int, proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while len(train_rows(out)) < steps:
        assert proc.poll() is None, f"the run ended early (exit {proc.returncode}): {log.read_text()[-3000:]}"
        assert time.time() < deadline, f"no step {steps} within {timeout} s: {log.read_text()[-3000:]}"
        time.sleep(0.1)


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def running(procs: list[psutil.Process]) -> list[psutil.Process]:
    """Those of ``procs`` still running (a zombie waiting for its parent to reap it is not)."""
    alive = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


def wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    deadline = time.time() + timeout
    while running(procs) and time.time() < deadline:
        time.sleep(0.2)
    return running(procs)


def mentioning(text: str) -> list[psutil.Process]:
    """Every process whose command line mentions ``text`` (the run's output dir)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        if any(text in arg for arg in (p.info["cmdline"] or [])):
            found.append(p)
    return running(found)


def kill_all(procs: list[psutil.Process]) -> None:
    for p in running(procs):
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def stop_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if line.startswith("stopped by ")]


def test_sigterm_to_the_launcher_stops_both_ranks_at_one_step_and_the_resume_equals_a_straight_run(
        launched_stage1_run, tmp_path):
    """conftest's launched_stage1_run (2 ranks, 4 epochs) is the straight run; this one has
    DataLoader workers (``--num_workers 2``, which leaves the numbers as they are) and gets
    SIGTERM after a few steps at the deepspeed launcher (``deepspeed.launcher.launch``: it
    SIGTERMs rank 0 and rank 0's workers, waits for them, then rank 1's; rank 1 hears of the
    stop only from rank 0, through the per-step agreement)."""
    run = launched_stage1_run
    out, log = tmp_path / "run", tmp_path / "launch.log"
    cmd = [run.launcher, "--num_gpus", "2", "--master_port", str(free_port()), TRAIN, *run.flags(out),
           "--num_workers", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    tree: list[psutil.Process] = []
    try:
        wait_for_steps(out, 3, proc, log)
        tree = descendants(proc.pid)
        launch = [p for p in tree if "deepspeed.launcher.launch" in p.cmdline()]
        assert len(launch) == 1, [p.cmdline() for p in tree]
        ranks = launch[0].children()
        workers = {r.pid: r.children() for r in ranks}  # forks of their rank: the same command line
        assert len(ranks) == 2 and all(TRAIN in r.cmdline() for r in ranks), [p.cmdline() for p in tree]
        assert all(len(w) == 2 for w in workers.values()), workers  # --num_workers 2 per rank
        launch[0].send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
        left = wait_gone([*tree, *mentioning(str(out))], timeout=20)
    finally:
        kill_all([*tree, *mentioning(str(out))])
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log.read_text()
    assert not left, [(p.pid, p.cmdline()) for p in left]  # no rank, no DataLoader worker outlived the run
    assert code != 0, text[-3000:]  # the launcher's own exit code when signalled: 1
    assert "Traceback" not in text, text[-3000:]
    lines = stop_lines(text)
    assert len(lines) == 1, text[-3000:]  # rank 0 speaks for both
    step = int(re.fullmatch(rf"stopped by SIGTERM at step (\d+): resume with --resume {re.escape(str(out))} "
                            r"\(global_step(\d+)\)", lines[0])[1])
    assert lines[0].endswith(f"(global_step{step})") and step >= 3
    assert (out / "latest").read_text().strip() == f"global_step{step}"
    assert [r["step"] for r in train_rows(out)] == list(range(1, step + 1))

    resumed = subprocess.run([run.launcher, "--num_gpus", "2", "--master_port", str(free_port()), TRAIN,
                              *run.flags(out), "--num_workers", "2", "--resume", str(out)],
                             env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    got, want = train_rows(out), train_rows(run.out)
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(got, want):
        assert (a["train/loss"], a["train/lr/other"]) == (b["train/loss"], b["train/lr/other"]), a["step"]
    assert (out / "latest").read_text() == (run.out / "latest").read_text()
    got_module, want_module = model_states(out)["module"], model_states(run.out)["module"]
    assert got_module.keys() == want_module.keys()
    for name in want_module:
        assert torch.equal(got_module[name], want_module[name]), name
    got_opt, want_opt = fp32_masters_from_shards(out), fp32_masters_from_shards(run.out)
    for kind in ("fp32", "exp_avg", "exp_avg_sq"):
        for name in want_opt[kind]:
            assert torch.equal(got_opt[kind][name], want_opt[kind][name]), (kind, name)


def test_ctrl_c_with_save_on_signal_false_stops_without_a_checkpoint(tiny_backbone_dir, demo_dataset_dir, tmp_path):
    """One rank without a launcher, SIGINT to its whole process group (a terminal's Ctrl-C:
    the DataLoader workers get it too and must keep serving the step until the rank ends
    them); checkpoints only from ``--save_steps 2``."""
    out, log = tmp_path / "run", tmp_path / "train.log"
    args = drill.train_args(demo_dataset_dir, tiny_backbone_dir, out, "--epochs", "4", "--num_workers", "2",
                            "--save_steps", "2", "--set", "train.save_on_signal=false")
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, TRAIN, *args], env=drill.child_env(), cwd=REPO, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)
    tree: list[psutil.Process] = []
    try:
        wait_for_steps(out, 3, proc, log)
        tree = [psutil.Process(proc.pid), *descendants(proc.pid)]
        assert len(tree) >= 3, [p.cmdline() for p in tree]  # the rank and its 2 workers
        os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(timeout=120)
        left = wait_gone(tree, timeout=20)
    finally:
        kill_all(tree)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log.read_text()
    assert not left, [(p.pid, p.cmdline()) for p in left]
    assert code == 130, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    lines = stop_lines(text)
    assert len(lines) == 1, text[-3000:]
    step = int(re.match(r"stopped by SIGINT at step (\d+)", lines[0])[1])
    tags = sorted(int(p.name.removeprefix("global_step")) for p in out.glob("global_step*"))
    assert tags == list(range(2, step + 1, 2))  # --save_steps' checkpoints, none for the signal
    latest = (out / "latest").read_text().strip()
    if step % 2:
        assert lines[0] == (f"stopped by SIGINT at step {step} without a checkpoint (train.save_on_signal is "
                            f"false): resume with --resume {out} ({latest}; the steps after it are trained again)")
    else:  # the stop fell on a --save_steps checkpoint
        assert lines[0] == f"stopped by SIGINT at step {step}: resume with --resume {out} (global_step{step})"


def test_in_process_stop_restores_handlers_and_ignores_a_second_signal(tiny_backbone_dir, demo_dataset_dir, tmp_path,
                                                                       monkeypatch, capsys):
    """In-process (tests, notebooks): SIGTERM at step 2 stops there with a complete
    checkpoint although a SIGINT arrives in the middle of its save; ``main`` returns 143, the
    process's own handlers are back and its DataLoader workers are gone. Then ``--resume``
    from it finishes the run, and ends its workers too."""
    from vla_ds.training import checkpoint, trainer
    from vla_ds.training.train import main

    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    real_log, real_save = trainer.Loop.log, checkpoint.save_checkpoint

    def log(self, *a, **k):
        real_log(self, *a, **k)
        if self.state.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    def save(engine, output_dir, step, *a, **k):
        os.kill(os.getpid(), signal.SIGINT)  # a second signal while saving: ignored
        return real_save(engine, output_dir, step, *a, **k)

    monkeypatch.setattr(trainer.Loop, "log", log)
    monkeypatch.setattr(trainer, "save_checkpoint", save)
    out = tmp_path / "run"
    args = drill.train_args(demo_dataset_dir, tiny_backbone_dir, out, "--epochs", "1", "--num_workers", "2")
    children = set(psutil.Process().children(recursive=True))
    assert main(args) == 143
    assert not running(list(set(psutil.Process().children(recursive=True)) - children))
    err = capsys.readouterr().err
    assert stop_lines(err) == [f"stopped by SIGTERM at step 2: resume with --resume {out} (global_step2)"], err
    assert "Traceback" not in err
    assert {s: signal.getsignal(s) for s in previous} == previous
    assert (out / "latest").read_text().strip() == "global_step2"
    assert checkpoint.checkpoint_tags(out) == [(2, out / "global_step2", True)]

    monkeypatch.setattr(trainer.Loop, "log", real_log)
    monkeypatch.setattr(trainer, "save_checkpoint", real_save)
    # Preempted again before the resumed run's first step: the checkpoint it resumed from is
    # the one to name, and it is not written again (a SIGKILL mid-write would spoil it).
    written = {f: f.stat().st_mtime_ns for f in (out / "global_step2").iterdir()}
    real_enter = trainer.StopSignals.__enter__

    def signalled_at_once(self):
        entered = real_enter(self)
        self.received = signal.SIGTERM
        return entered

    monkeypatch.setattr(trainer.StopSignals, "__enter__", signalled_at_once)
    assert main([*args, "--resume", str(out)]) == 143
    err = capsys.readouterr().err
    assert stop_lines(err) == [f"stopped by SIGTERM at step 2: resume with --resume {out} (global_step2)"], err
    assert {f: f.stat().st_mtime_ns for f in (out / "global_step2").iterdir()} == written
    monkeypatch.setattr(trainer.StopSignals, "__enter__", real_enter)
    assert main([*args, "--resume", str(out)]) == 0
    assert not running(list(set(psutil.Process().children(recursive=True)) - children))
    steps = [r["step"] for r in train_rows(out)]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) > 2


def _worker(ready) -> None:
    from vla_ds.data.loading import workers_outlast_stop_signals

    workers_outlast_stop_signals(0)
    ready.set()
    time.sleep(60)  # ends earlier only by a signal from its parent (this test)


def test_a_worker_ends_on_its_parents_signal_only():
    """A DataLoader worker (its ``worker_init_fn``, in a process forked while the rank's stop
    handlers are installed, as torch forks workers) outlasts SIGTERM / SIGINT from anyone
    else (the launcher, scancel, a terminal) and ends on its parent's (torch's terminate,
    multiprocessing at exit) as it would without the init function."""
    import multiprocessing

    from vla_ds.training.trainer import StopSignals

    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    with StopSignals():
        worker = ctx.Process(target=_worker, args=(ready,), daemon=True)
        worker.start()
    try:
        assert ready.wait(30)
        for sig in ("TERM", "INT"):
            subprocess.run(["kill", f"-{sig}", str(worker.pid)], check=True)  # sent by another process
        time.sleep(0.5)
        assert worker.is_alive()
        os.kill(worker.pid, signal.SIGTERM)  # sent by its parent
        worker.join(10)
        assert worker.exitcode == -signal.SIGTERM
    finally:
        if worker.is_alive():
            worker.kill()


def test_stop_signals_record_the_first_and_restore(monkeypatch):
    from vla_ds.training.trainer import StopSignals

    monkeypatch.setattr("deepspeed.comm.is_initialized", lambda: False)
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with StopSignals() as stop:
        assert stop.agreed("cpu") == 0
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.agreed("cpu") == signal.SIGINT  # the first one; later ones are ignored
    assert {s: signal.getsignal(s) for s in before} == before
