"""The process group: launcher variables, its start, the checks every rank runs right after
it, long phases a rank works through alone, and one-line reports of a failed collective.

Below the engine (:mod:`vla_ds.training.engine`, which wraps ``deepspeed.initialize``) and the
Stage 1 feature cache (:mod:`vla_ds.training.cache`), which both wait in a :func:`long_phase`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from vla_ds.errors import ConfigError
from vla_ds.training.environment import backend_name, compare_ranks, package_versions

logger = logging.getLogger(__name__)

# Where launchers that do not set torch's variables announce a rank: (rank, world size,
# local rank, local size). The DeepSpeed launcher and torchrun set RANK etc. themselves;
# `deepspeed --launcher openmpi` (mpirun) and `--launcher slurm` (srun) start the script
# directly, with only their own variables.
LAUNCHER_ENV = {
    "openmpi": ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
                "OMPI_COMM_WORLD_LOCAL_SIZE"),
    "slurm": ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE"),
}


class DistributedError(RuntimeError):
    """The process group failed at run time (a rank died, a node went away, a timeout)."""


def launcher_env(environ=None) -> dict[str, str]:
    """RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_SIZE as torch's launchers set them, or as an MPI or
    SLURM launch announces them (``LAUNCHER_ENV``); empty without a launcher. Reads only."""
    env = os.environ if environ is None else environ
    torch_vars = {k: env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE") if k in env}
    if "RANK" in env:
        return torch_vars
    for rank, world, local_rank, local_size in LAUNCHER_ENV.values():
        if rank in env and world in env:
            # SLURM_NTASKS_PER_NODE may read "4(x2)"; the leading count is the per-node size
            return {"RANK": env[rank], "WORLD_SIZE": env[world], "LOCAL_RANK": env.get(local_rank, "0"),
                    "LOCAL_SIZE": env.get(local_size, "1").split("(")[0]}
    return torch_vars


def adopt_launcher_env(environ=None) -> str | None:
    """Fill torch's RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_SIZE from an MPI or SLURM
    launch that did not set them, so every launcher reaches the same ``env://`` start.
    Called once by the entry point and by :func:`init_distributed`. Returns the launcher's
    name, or None when nothing was needed (or found). MASTER_ADDR and MASTER_PORT must come
    from the job (``.deepspeed_env`` or the batch script); without them the start fails with
    a message saying so."""
    env = os.environ if environ is None else environ
    if "RANK" in env:
        return None
    for name, (rank, world, _, _) in LAUNCHER_ENV.items():
        if rank in env and world in env:
            env.update(launcher_env(env))
            return name
    return None


def env_world_size() -> int:
    """World size the launcher announced (1 when run as a plain ``python scripts/train.py``)."""
    return int(launcher_env().get("WORLD_SIZE", "1"))


def env_rank() -> int:
    return int(launcher_env().get("RANK", "0"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def distributed_started() -> bool:
    """Whether this process joined a process group (for error reporting decisions)."""
    try:
        import deepspeed.comm as dist

        return bool(dist.is_initialized())
    except Exception:  # deepspeed not importable: certainly not started
        return False


# How long_phase waits: set by init_distributed from the run's config.
_PHASES = {"dead_after_s": 300.0, "limit_s": 4 * 3600.0, "count": 0}


def init_distributed(timeout_minutes: float, long_phase_minutes: float = 240.0) -> None:
    """Start the process group (NCCL on GPUs, gloo/ccl on CPU, chosen by DeepSpeed's accelerator).

    Without a launcher this becomes a one-rank group on a free local port, so
    ``python scripts/train.py ...`` and in-process tests take the same path as
    ``deepspeed --num_gpus N``. ``timeout_minutes`` bounds every collective (and how long a
    silent rank is waited for in a :func:`long_phase`); ``long_phase_minutes`` bounds a long
    phase of live ranks. Idempotent.
    """
    import deepspeed
    import torch.distributed as tdist

    _PHASES.update(dead_after_s=60.0 * timeout_minutes, limit_s=60.0 * long_phase_minutes)
    if deepspeed.comm.is_initialized():
        return
    adopt_launcher_env()
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    world = int(os.environ["WORLD_SIZE"])
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ConfigError(f"rank {os.environ['RANK']} of {world}: {' and '.join(missing)} not set; launch with "
                          "the DeepSpeed launcher, or export MASTER_ADDR (the first node) and MASTER_PORT on "
                          "every node (.deepspeed_env or the batch script)")
    try:
        deepspeed.init_distributed(timeout=timedelta(minutes=timeout_minutes), verbose=False)
    except tdist.DistError as e:
        where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        if "EADDRINUSE" in str(e) or "address already in use" in str(e):
            raise DistributedError(f"cannot listen on {where}: the port is in use (another job?); pick a free "
                                   "one with --master_port") from None
        raise DistributedError(
            f"the {world} ranks did not all join at {where} within {timeout_minutes:g} min ({_first_line(e)}); "
            "start every node's launcher with the same hostfile, --master_addr and --master_port, and check "
            "that the port is open between nodes") from None
    _unlink_shm_allreduce_buffer()


def check_ranks(cfg, facts: dict[str, Any] | None = None) -> None:
    """Collective, right after the process group starts: every rank must run the same
    package versions on the same dataset and backbone. Logs the launch report on rank 0;
    raises :class:`ConfigError` on every rank when ranks differ."""
    import deepspeed.comm as dist

    info = {"host": socket.gethostname(), **{f"{k} version": v for k, v in package_versions().items()},
            **(facts or {})}
    infos: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(infos, info)
    hosts = sorted({i["host"] for i in infos})
    backend, device = backend_name()
    if dist.get_rank() == 0:
        logger.info("process group: %d rank(s) on %d node(s) (%s), backend %s on %s, timeout %g min "
                    "(train.dist_timeout_minutes)", len(infos), len(hosts), ", ".join(hosts), backend, device,
                    cfg.train.dist_timeout_minutes)
    problems = compare_ranks(infos)
    if problems:
        raise ConfigError("ranks disagree: " + " | ".join(problems))


def _unlink_shm_allreduce_buffer() -> None:
    """DeepSpeed's CPU shared-memory allreduce gives every rank a ~70 MB /dev/shm segment
    and never removes it, so each CPU run (and every killed one) leaks it until reboot.
    Once every rank has mapped every other rank's segment (done inside the process-group
    start, then this barrier), the names are no longer needed: remove this rank's. The
    mappings stay valid and the memory is freed when the last rank exits, however it exits."""
    import deepspeed.comm as dist

    dist.barrier()
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR')}_"
            f"{os.environ.get('MASTER_PORT')}_{dist.get_rank()}")
    try:
        os.unlink(Path("/dev/shm") / name)
    except OSError:  # not on this machine (GPU runs, other backends) or already gone
        pass


@contextlib.contextmanager
def long_phase(name: str, output_dir: str | None = None):
    """Work each rank does on its own for longer than the process-group timeout may allow
    (its share of the Stage 1 feature cache, rank 0 syncing a checkpoint to disk), followed
    by waiting for every rank. Collective: every rank enters the same phases in the same order.

    The wait is not a collective (which would fail after ``train.dist_timeout_minutes`` although
    nothing died) but a poll of the launcher's TCP store: while inside, a thread of every rank
    bumps its heartbeat counter there every few seconds. A rank whose heartbeat stops for
    ``dist_timeout_minutes`` (it died, or its node went away) is reported within that bound;
    live ranks are waited for up to ``train.long_phase_minutes``.
    """
    import deepspeed.comm as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        yield
        return
    rank, world = dist.get_rank(), dist.get_world_size()
    _PHASES["count"] += 1
    prefix = f"vla_ds/phase{_PHASES['count']}"
    dead_after, limit = _PHASES["dead_after_s"], _PHASES["limit_s"]
    beat_every = max(0.05, min(10.0, dead_after / 6))
    stop = threading.Event()

    def heartbeat():
        beats = _store_client(dead_after)
        while not stop.is_set():
            beats.add(f"{prefix}/beat/{rank}", 1)
            stop.wait(beat_every)

    thread = threading.Thread(target=heartbeat, name=f"vla_ds heartbeat ({name})", daemon=True)
    thread.start()
    store = _store_client(dead_after)
    try:
        yield
        store.set(f"{prefix}/done/{rank}", "1")
    except BaseException as e:  # tell the others at once (they would otherwise wait out the heartbeat bound)
        store.set(f"{prefix}/failed/{rank}", type(e).__name__)
        raise
    finally:
        stop.set()
        thread.join()
    start = time.monotonic()
    seen = {r: (-1, start) for r in range(world)}  # rank -> (its last heartbeat count, when it changed)
    pending, pause = list(range(world)), 0.01  # short phases end in milliseconds; long ones poll every second
    while pending:
        pending = [r for r in pending if not store.check([f"{prefix}/done/{r}"])]
        now = time.monotonic()
        for r in pending:
            if store.check([f"{prefix}/failed/{r}"]):
                raise DistributedError(_with_checkpoint_hint(
                    f"rank {r} failed during the {name} ({store.get(f'{prefix}/failed/{r}').decode()}; its log "
                    "says why)", output_dir))
            count = store.add(f"{prefix}/beat/{r}", 0)
            if count != seen[r][0]:
                seen[r] = (count, now)
            elif now - seen[r][1] > dead_after:
                raise DistributedError(_with_checkpoint_hint(
                    f"rank {r} stopped responding during the {name} (no heartbeat for {dead_after / 60:g} min, "
                    "train.dist_timeout_minutes): it died or its node went away", output_dir))
        if pending and now - start > limit:
            raise DistributedError(_with_checkpoint_hint(
                f"rank(s) {', '.join(map(str, pending))} still busy with the {name} after {limit / 60:g} min "
                "(train.long_phase_minutes), although alive; raise it if the phase is really that long", output_dir))
        if pending:
            time.sleep(pause)
            pause = min(2 * pause, 1.0, beat_every)
    dist.barrier()  # every rank has arrived: returns at once


def _store_client(timeout_s: float):
    """A client of the launcher's TCP store (MASTER_ADDR:MASTER_PORT), our own connection."""
    import torch.distributed as tdist

    return tdist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timedelta(seconds=max(timeout_s, 30.0)))


def _checkpoint_hint(output_dir: str | None) -> str | None:
    """Where to continue from: ``output_dir``'s last complete checkpoint, or None."""
    latest = Path(output_dir) / "latest" if output_dir else None
    if latest is not None and latest.is_file():
        return (f"the last complete checkpoint is {latest.parent / latest.read_text().strip()} "
                f"(continue with --resume {output_dir})")
    return None


def _with_checkpoint_hint(line: str, output_dir: str | None) -> str:
    hint = _checkpoint_hint(output_dir)
    return f"{line}; {hint}" if hint else line


def _first_line(exc: BaseException) -> str:
    """The gist of a backend error: first line, without gloo's source-location prefix and
    its generic advice."""
    lines = str(exc).strip().splitlines()
    if not lines:
        return type(exc).__name__
    line = re.sub(r"^\[[^\]]*\]\s*", "", lines[0])
    return line.split(". This is typically")[0]


def describe_distributed_failure(exc: BaseException, output_dir: str | None) -> str | None:
    """One line for a collective that failed mid-run (a peer died, a timeout), or None
    when ``exc`` is not such a failure. Names the last complete checkpoint to resume."""
    import torch.distributed as tdist

    text = str(exc)
    signs = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "timed out", "Timed out",
             "NCCL", "ProcessGroup", "gloo")
    if not isinstance(exc, (tdist.DistError, DistributedError)) and not any(s in text for s in signs):
        return None
    if isinstance(exc, DistributedError):
        return str(exc)
    line = f"lost contact with another rank ({_first_line(exc)[:160]}): a rank died or its node went away"
    hint = _checkpoint_hint(output_dir) or "no checkpoint was completed yet"
    return f"{line}; {hint}; the other ranks' logs say why they stopped"
