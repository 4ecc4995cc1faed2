"""distributed.long_phase: a rank working alone for longer than the process-group timeout (its
share of the feature cache, rank 0 syncing a checkpoint) is waited for, while a dead,
failed or stuck rank is still reported. Two real ranks (gloo), a 3-second collective
timeout, one rank deliberately slow."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

RANK_SCRIPT = textwrap.dedent("""
    import os, sys, time
    import deepspeed.comm as dist
    from vla_ds.training import distributed

    case, rank = sys.argv[1], int(os.environ["RANK"])
    distributed.init_distributed(0.05, long_phase_minutes=0.05 if case == "stuck" else 10)  # 3 s, 3 s
    slow = {"slow": 5, "collective": 5, "stuck": 60}.get(case, 0)  # the stuck rank is stopped once rank 0 gave up
    try:
        if case == "collective":  # the control: the same slow rank before a plain barrier
            if rank == 1:
                time.sleep(slow)
            dist.barrier()
        else:
            with distributed.long_phase("test phase"):
                if rank == 1:
                    if case == "dead":
                        time.sleep(1)
                        os._exit(3)  # no clean-up at all, as when the node goes away
                    if case == "failed":
                        raise ValueError("bad sample")
                    time.sleep(slow)
            dist.barrier()  # and the collectives after it still work
    except distributed.DistributedError as e:
        print(f"DistributedError: {e}", flush=True)
        sys.exit(1)
    except Exception as e:
        print(f"{type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
        sys.exit(2)
    print("done", flush=True)
""")


# Starts every case's two ranks as forks of one process that has already imported what a
# rank imports (deepspeed, vla_ds.training.engine: ~3 s of CPU that ten fresh processes would each
# pay, on a 2-core machine), then waits for them as the fixture below describes and writes
# each rank's exit code; each rank's stdout and stderr go to files next to it.
FORK_SCRIPT = textwrap.dedent("""
    import json, os, signal, socket, sys, traceback
    import deepspeed.comm  # noqa: F401
    from vla_ds.training import engine  # noqa: F401

    script, out_dir, cases = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
    with open(script) as f:
        code = compile(f.read(), script, "exec")


    def free_port():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]


    def run_rank(case, rank, port):  # in the forked child; never returns
        status = 1
        try:
            os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_SIZE="2",
                              MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
            for fd, name in ((1, "stdout"), (2, "stderr")):
                target = os.open(os.path.join(out_dir, f"{case}.{rank}.{name}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                os.dup2(target, fd)
                os.close(target)
            sys.argv = [script, case]
            try:
                exec(code, {"__name__": "__main__", "__file__": script})
                status = 0
            except SystemExit as e:
                status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:
                traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)


    started = {}
    for case in cases:
        port = free_port()
        started[case] = []
        for rank in range(2):
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                run_rank(case, rank, port)
            started[case].append(pid)
    codes = {}
    for case, pids in started.items():
        codes[case] = []
        for rank, pid in enumerate(pids):
            if case == "stuck" and rank == 1:
                os.kill(pid, signal.SIGKILL)  # still "working": rank 0 has reported it
            codes[case].append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
    with open(os.path.join(out_dir, "codes.json"), "w") as f:
        json.dump(codes, f)
""")
CASES = ("collective", "slow", "dead", "failed", "stuck")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> dict[str, list[subprocess.CompletedProcess]]:
    """Every case's two ranks, all started at once (they mostly sleep): forks of one process
    (FORK_SCRIPT), each with its own RANK, WORLD_SIZE=2 and its case's MASTER_PORT."""
    root = tmp_path_factory.mktemp("long_phase")
    script, forker = root / "rank.py", root / "fork_ranks.py"
    script.write_text(RANK_SCRIPT)
    forker.write_text(FORK_SCRIPT)
    args = [sys.executable, str(forker), str(script), str(root), ",".join(CASES)]
    proc = subprocess.run(args, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    codes = json.loads((root / "codes.json").read_text())
    return {case: [subprocess.CompletedProcess([*args[:2], str(script), case], codes[case][rank],
                                               (root / f"{case}.{rank}.stdout").read_text(),
                                               (root / f"{case}.{rank}.stderr").read_text())
                   for rank in range(2)]
            for case in CASES}


def last_line(proc) -> str:  # DeepSpeed prints to stdout too
    return proc.stdout.strip().splitlines()[-1]


def test_a_rank_slower_than_the_collective_timeout_is_waited_for(ranks):
    control = ranks["collective"][0]
    assert control.returncode != 0, control.stdout  # a plain barrier gives up on the slow rank
    for r in ranks["slow"]:
        assert r.returncode == 0 and last_line(r) == "done", r.stdout + r.stderr[-2000:]


@pytest.mark.parametrize("case, expect", [
    ("dead", "rank 1 stopped responding during the test phase (no heartbeat for 0.05 min"),
    ("failed", "rank 1 failed during the test phase (ValueError"),
    ("stuck", "rank(s) 1 still busy with the test phase after 0.05 min (train.long_phase_minutes)"),
])
def test_a_dead_failed_or_stuck_rank_is_reported(ranks, case, expect):
    rank0 = ranks[case][0]
    assert rank0.returncode == 1, rank0.stdout + rank0.stderr[-2000:]
    assert last_line(rank0).startswith("DistributedError: ") and expect in last_line(rank0), rank0.stdout
