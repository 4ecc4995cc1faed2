"""Multi-node launches, for real on one machine: two `deepspeed --no_ssh --node_rank i`
launchers share a two-host hostfile (one rank each), exactly as two nodes would; a killed
rank ends the whole job within the process-group timeout; checkpoints of a two-node run
resume on one node through the universal format. Plus the preflight checks."""

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from checkpoint_helpers import fp32_masters_from_shards, model_states
from safetensors.torch import load_file

from vla_ds.policy_tools.convert import main as convert_main
from vla_ds.training import environment, preflight
from vla_ds.training.distributed import (
    DistributedError,
    adopt_launcher_env,
    describe_distributed_failure,
)
from vla_ds.training.metrics import read_metrics

REPO = Path(__file__).resolve().parent.parent
STAGE1 = str(REPO / "ds_configs" / "stage1.json")
LAUNCHER = shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_args(dataset, backbone, out, *extra):
    return [str(REPO / "scripts" / "train.py"), "--ds_config", STAGE1, "--dataset_dir", str(dataset),
            "--vl-model", str(backbone), "--model-preset", "tiny", "--sensor-window-size", "32",
            "--num_workers", "0", "--batch_size", "8", "--lr", "1e-3", "--output_dir", str(out),
            "--set", "train.progress_bar=false", *extra]


def launch_two_nodes(hostfile: Path, port: int, args: list[str], logs: Path) -> list[subprocess.Popen]:
    """Node 0 and node 1 of the hostfile, each its own launcher, as on two machines."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    procs = []
    for node in (0, 1):
        log = open(logs / f"node{node}.log", "w")
        procs.append(subprocess.Popen(
            [LAUNCHER, "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node), "--master_addr",
             "127.0.0.1", "--master_port", str(port), *args], env=env, cwd=REPO, stdout=log,
            stderr=subprocess.STDOUT, text=True))
    return procs


@pytest.fixture
def hostfile(tmp_path) -> Path:
    path = tmp_path / "hostfile"
    path.write_text("# two 'nodes' on this machine, one rank each\nnode-a slots=1\nnode-b slots=1\n")
    return path


def losses(out: Path) -> list[float]:
    return [r["train/loss"] for r in read_metrics(out) if "train/loss" in r]


def convert_to_universal(src: Path, dst: Path) -> None:
    assert convert_main([str(src), str(dst), "--to", "universal"]) == 0


def resume_on_one_rank(universal: Path, dataset, backbone, out: Path, steps: int, epochs: int,
                       *extra: str) -> list[dict]:
    """In-process, one rank, the two-rank run's global batch (8 x 2 x 1 = 8 x 1 x 2)."""
    from vla_ds.training.train import main

    argv = train_args(dataset, backbone, out, "--grad_accum", "2", "--epochs", str(epochs), "--max_steps", str(steps),
                      "--resume", str(universal), *extra)[1:]
    assert main(argv) == 0
    return [r for r in read_metrics(out) if "train/loss" in r]


def test_two_node_launch_equals_one_node_and_resumes_on_one_rank(hostfile, launched_stage1_run, tiny_backbone_dir,
                                                                 demo_dataset_dir, tmp_path, capsys):
    """The one-node run (`deepspeed --num_gpus 2`, two ranks) is conftest's launched_stage1_run,
    shared with tests/test_train.py; the two-node launch here has its flags."""
    run = launched_stage1_run
    two_nodes = tmp_path / "two_nodes"
    procs = launch_two_nodes(hostfile, free_port(), [str(REPO / "scripts" / "train.py"), *run.flags(two_nodes)],
                             tmp_path)
    codes = [p.wait(timeout=600) for p in procs]
    logs = [(tmp_path / f"node{i}.log").read_text() for i in (0, 1)]
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "2 rank(s) on 1 node(s)" in logs[0]  # the process-group report (both 'nodes' are this host)

    one_node = tmp_path / "one_node"
    shutil.copytree(run.out, one_node)  # a shard of it is removed below
    a, b = losses(two_nodes), losses(one_node)
    assert len(a) == len(b) > 5
    assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    assert a[0] != a[-1]

    # stage1.json is ZeRO-1 with bf16 (DeepSpeed's BF16_Optimizer): its 2-rank checkpoint
    # consolidates to the fp32 master weights, which DeepSpeed's zero_to_fp32 refuses to read.
    assert convert_main([str(one_node), str(tmp_path / "fp32"), "--to", "fp32"]) == 0
    fp32 = load_file(str(tmp_path / "fp32" / "model.safetensors"))
    masters = fp32_masters_from_shards(one_node)["fp32"]
    module = model_states(one_node)["module"]
    assert masters.keys() == {k for k in module if not k.endswith(("_norm.mean", "_norm.std"))}
    assert fp32.keys() == module.keys()
    for name, value in fp32.items():
        expected = masters[name] if name in masters else module[name]  # trained weights, buffers
        assert value.dtype == torch.float32 and torch.equal(value, expected), name
    # Without rank 1's shard: one line naming the checkpoint, not a half-filled file.
    tag_dir = one_node / (one_node / "latest").read_text().strip()
    next(tag_dir.glob("bf16_zero_pp_rank_1_*_optim_states.pt")).unlink()
    capsys.readouterr()
    assert convert_main([str(one_node), str(tmp_path / "half"), "--to", "fp32"]) == 2
    err = capsys.readouterr().err
    assert str(tag_dir) in err and "missing" in err and "Traceback" not in err, err
    assert not (tmp_path / "half" / "model.safetensors").exists()

    # Resume the two-node run on one node (1 rank) through the universal checkpoint.
    saved_step = int((two_nodes / "latest").read_text().strip().removeprefix("global_step"))
    universal = tmp_path / "universal"
    convert_to_universal(two_nodes, universal)
    rows = resume_on_one_rank(universal, demo_dataset_dir, tiny_backbone_dir, tmp_path / "resumed", saved_step + 3,
                              run.epochs + 2)
    assert [r["step"] for r in rows] == [saved_step + 1, saved_step + 2, saved_step + 3]
    assert all(math.isfinite(r["train/loss"]) for r in rows) and rows[0]["epoch"] == run.epochs + 1


def rank_pids(out: Path) -> dict[int, int]:
    """{RANK: pid} of the training processes writing to ``out`` (Linux /proc)."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--local_rank=0" in cmdline and str(out).encode() in cmdline:
            rank = next((e.split(b"=", 1)[1] for e in environ if e.startswith(b"RANK=")), None)
            if rank is not None:
                found[int(rank)] = int(proc.name)
    return found


def test_killed_rank_ends_the_job_within_the_timeout_and_the_checkpoint_resumes(
        hostfile, tiny_backbone_dir, demo_dataset_dir, tmp_path):
    timeout_min = 0.5
    out, cache = tmp_path / "run", tmp_path / "cache"
    args = train_args(demo_dataset_dir, tiny_backbone_dir, out, "--epochs", "200", "--set", f"cache.dir={cache}",
                      "--set", f"train.dist_timeout_minutes={timeout_min}")
    procs = launch_two_nodes(hostfile, free_port(), args, tmp_path)
    try:
        deadline = time.time() + 300
        while not (out / "latest").exists():
            assert time.time() < deadline and all(p.poll() is None for p in procs), \
                (tmp_path / "node0.log").read_text()[-3000:]
            time.sleep(0.2)
        pids = rank_pids(out)
        assert set(pids) == {0, 1}
        os.kill(pids[1], signal.SIGKILL)
        killed_at = time.time()
        codes = [p.wait(timeout=timeout_min * 60 + 60) for p in procs]
        elapsed = time.time() - killed_at
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(code != 0 for code in codes), codes
    assert elapsed < timeout_min * 60 + 30, elapsed
    assert not rank_pids(out)  # no rank left behind
    log0 = (tmp_path / "node0.log").read_text()
    error = [line for line in log0.splitlines() if "error:" in line]
    assert len(error) == 1 and "lost contact with another rank" in error[0], log0[-3000:]
    assert "Traceback" not in log0
    latest = (out / "latest").read_text().strip()
    assert f"{out / latest}" in error[0] and f"--resume {out}" in error[0]

    # The last complete checkpoint is intact: it resumes (here on one rank, via universal).
    saved_step = int(latest.removeprefix("global_step"))
    universal = tmp_path / "universal"
    convert_to_universal(out, universal)
    rows = resume_on_one_rank(universal, demo_dataset_dir, tiny_backbone_dir, tmp_path / "resumed", saved_step + 2,
                              3, "--set", f"cache.dir={cache}")
    assert [r["step"] for r in rows] == [saved_step + 1, saved_step + 2]


# --------------------------------------------------------------------------- launcher env


def test_mpi_and_slurm_launches_get_torch_rank_variables():
    env = {"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}
    assert adopt_launcher_env(env) == "openmpi"
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["LOCAL_SIZE"]) == ("5", "8", "1", "4")
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "3", "SLURM_NTASKS_PER_NODE": "4(x2)"}
    assert adopt_launcher_env(env) == "slurm"
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["LOCAL_SIZE"]) == ("3", "8", "3", "4")
    env = {"RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}  # the launcher's own win
    assert adopt_launcher_env(env) is None and env["RANK"] == "1"


def test_distributed_failure_message_names_the_last_checkpoint(tmp_path):
    (tmp_path / "global_step40").mkdir()
    (tmp_path / "latest").write_text("global_step40\n")
    exc = RuntimeError("[/x/gloo/transport/tcp/pair.cc:553] Connection closed by peer [10.0.0.2]:1234. "
                       "This is typically caused by a remote worker crashing.")
    line = describe_distributed_failure(exc, str(tmp_path))
    assert line.startswith("lost contact with another rank (Connection closed by peer [10.0.0.2]:1234)")
    assert str(tmp_path / "global_step40") in line and f"--resume {tmp_path}" in line
    assert "no checkpoint" in describe_distributed_failure(exc, str(tmp_path / "elsewhere"))
    assert describe_distributed_failure(RuntimeError("shape mismatch"), str(tmp_path)) is None
    assert describe_distributed_failure(DistributedError("ranks did not join"), None) == "ranks did not join"


# --------------------------------------------------------------------------- preflight


def preflight_args(hostfile, dataset, out, *extra):
    return ["--hostfile", str(hostfile), "--ds_config", STAGE1, "--dataset_dir", str(dataset), "--output_dir",
            str(out), "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *extra]


def test_preflight_passes_a_good_launch(hostfile, demo_dataset_dir, tmp_path, capsys):
    assert preflight.main(preflight_args(hostfile, demo_dataset_dir, tmp_path / "new" / "out")) == 0
    out = capsys.readouterr().out
    assert "2 node(s), 2 rank(s): node-a (1), node-b (1)" in out
    assert "global batch 8 = micro batch 4 x accumulation 1 x 2 rank(s)" in out
    assert "ready to launch" in out and "FAIL" not in out
    assert not (tmp_path / "new").exists()  # checked, not created


def test_preflight_checks_a_stage2_launch_with_its_stage1_checkpoint(hostfile, demo_dataset_dir, tmp_path, capsys):
    stage2 = str(REPO / "ds_configs" / "stage2.json")
    argv = preflight_args(hostfile, demo_dataset_dir, tmp_path / "out")
    argv[argv.index("--ds_config") + 1] = stage2
    assert preflight.main(argv) == 2  # as train.py: Stage 2 needs the Stage 1 weights
    failed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[FAIL]")]
    assert len(failed) == 1 and "stage2 needs the Stage 1 weights: pass --stage1-checkpoint" in failed[0]
    stage1 = tmp_path / "s1"
    assert preflight.main([*argv, "--stage1-checkpoint", str(stage1)]) == 2
    failed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[FAIL]")]
    assert failed == [f"[FAIL] stage1    {stage1}: not found (train.py reads it at start-up)"]
    stage1.mkdir()
    assert preflight.main([*argv, "--stage1-checkpoint", str(stage1)]) == 0
    out = capsys.readouterr().out
    assert "ready to launch" in out and f"{stage1}: found" in out


def test_preflight_counts_slots_like_the_launcher(tmp_path):
    path = tmp_path / "hostfile"
    path.write_text("node-01 slots=4\nnode-02 slots=4\nnode-03 slots=4\n")
    assert preflight.active_hosts(preflight.read_hostfile(path)) == {"node-01": 4, "node-02": 4, "node-03": 4}
    assert preflight.active_hosts(preflight.read_hostfile(path), num_nodes=2, num_gpus=2) == {"node-01": 2,
                                                                                              "node-02": 2}


@pytest.mark.parametrize("case", ["bad_hostfile", "batch", "port_in_use", "unresolvable", "output", "dataset"])
def test_preflight_reports_each_problem(case, hostfile, demo_dataset_dir, tmp_path, capsys):
    dataset, out, extra = demo_dataset_dir, tmp_path / "out", []
    holder = None
    if case == "bad_hostfile":
        hostfile.write_text("node-a slots=1\nnode-b slots=two\n")
        expect = f"{hostfile}: Hostfile contains a bad entry: node-b slots=two"
    elif case == "batch":
        extra = ["--set", "train_batch_size=12"]
        expect = "inconsistent batch settings: train_batch_size=12"
    elif case == "port_in_use":
        holder = socket.socket()
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        expect = "the port is in use"
    elif case == "unresolvable":
        expect = "nosuchhost.invalid: the master address does not resolve"
    elif case == "output":
        blocker = tmp_path / "file"
        blocker.write_text("")
        out = blocker / "out"
        expect = f"{blocker}: not a directory"
    else:
        dataset = tmp_path / "missing"
        expect = f"{dataset}: dataset directory not found"
    argv = preflight_args(hostfile, dataset, out, *extra)
    if holder is not None:
        argv[argv.index("--master_port") + 1] = str(holder.getsockname()[1])
    if case == "unresolvable":
        argv[argv.index("--master_addr") + 1] = "nosuchhost.invalid"
    try:
        assert preflight.main(argv) == 2
    finally:
        if holder is not None:
            holder.close()
    lines = capsys.readouterr().out.splitlines()
    failed = [line for line in lines if line.startswith("[FAIL]")]
    assert len(failed) == 1 and expect in failed[0], lines


def test_ranks_that_differ_are_named_with_their_hosts():
    infos = [{"host": "node-01", "torch version": "2.13.0", "dataset": "900 train"},
             {"host": "node-01", "torch version": "2.13.0", "dataset": "900 train"},
             {"host": "node-02", "torch version": "2.12.1", "dataset": "900 train"}]
    problems = environment.compare_ranks(infos)
    assert problems == ["torch version differs between ranks: 2.13.0 on ranks 0,1 (node-01); "
                        "2.12.1 on rank 2 (node-02)"]
    assert environment.compare_ranks(infos[:2]) == []


def test_check_ranks_raises_on_every_rank(monkeypatch):
    import deepspeed.comm as dist

    from vla_ds.errors import ConfigError
    from vla_ds.training import distributed
    from vla_ds.training.config import resolve_config

    def gather(out, obj):  # another rank runs another transformers
        out[0], out[1] = obj, {**obj, "transformers version": "4.0.0"}

    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "all_gather_object", gather)
    raw = json.loads(Path(STAGE1).read_text())
    raw["vla_ds"]["data"]["dataset_dir"] = "data"
    cfg = resolve_config(raw, 2, source=STAGE1)
    with pytest.raises(ConfigError, match=r"transformers version differs between ranks: .* on rank 0 .*; 4.0.0 on rank 1"):
        distributed.check_ranks(cfg, {"dataset": "x"})


def test_preflight_cli_runs_as_a_module(hostfile, demo_dataset_dir, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "vla_ds.training.preflight",
                           *preflight_args(hostfile, demo_dataset_dir, tmp_path / "out", "--set", "train_batch_size=7")],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2
    assert "inconsistent batch settings" in proc.stdout and "Traceback" not in proc.stdout + proc.stderr
