"""engine.long_phase: a rank working alone for longer than the process-group timeout (its
share of the feature cache, rank 0 syncing a checkpoint) is waited for, while a dead,
failed or stuck rank is still reported. Two real ranks (gloo), a 3-second collective
timeout, one rank deliberately slow."""

import os
import socket
import subprocess
import sys
import textwrap

import pytest

RANK_SCRIPT = textwrap.dedent("""
    import os, sys, time
    import deepspeed.comm as dist
    from vla_ds import engine

    case, rank = sys.argv[1], int(os.environ["RANK"])
    engine.init_distributed(0.05, long_phase_minutes=0.05 if case == "stuck" else 10)  # 3 s, 3 s
    slow = {"slow": 5, "collective": 5, "stuck": 60}.get(case, 0)  # the stuck rank is stopped once rank 0 gave up
    try:
        if case == "collective":  # the control: the same slow rank before a plain barrier
            if rank == 1:
                time.sleep(slow)
            dist.barrier()
        else:
            with engine.long_phase("test phase"):
                if rank == 1:
                    if case == "dead":
                        time.sleep(1)
                        os._exit(3)  # no clean-up at all, as when the node goes away
                    if case == "failed":
                        raise ValueError("bad sample")
                    time.sleep(slow)
            dist.barrier()  # and the collectives after it still work
    except engine.DistributedError as e:
        print(f"DistributedError: {e}", flush=True)
        sys.exit(1)
    except Exception as e:
        print(f"{type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
        sys.exit(2)
    print("done", flush=True)
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(case: str, script) -> list[subprocess.Popen]:
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(script), case], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return procs


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> dict[str, list[subprocess.CompletedProcess]]:
    """Every case's two ranks, all started at once (they mostly sleep)."""
    script = tmp_path_factory.mktemp("long_phase") / "rank.py"
    script.write_text(RANK_SCRIPT)
    started = {case: start_ranks(case, script) for case in ("collective", "slow", "dead", "failed", "stuck")}
    results = {}
    for case, procs in started.items():
        results[case] = []
        for rank, proc in enumerate(procs):
            if case == "stuck" and rank == 1:
                proc.kill()  # still "working": rank 0 has reported it
            out, err = proc.communicate(timeout=180)
            results[case].append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


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
