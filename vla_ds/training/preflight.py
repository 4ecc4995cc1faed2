"""Pre-flight checks: what most often breaks a multi-node launch, found in seconds.

    python -m vla_ds.training.preflight --hostfile hostfile --ds_config ds_configs/stage2.json \\
        --dataset_dir /shared/data [--output_dir /shared/ckpt] [--num_nodes N] [--num_gpus G] \\
        [--master_addr A] [--master_port P] [--batch_size B] [--grad_accum K] [--set KEY=VALUE ...]

Run it on the first node before ``deepspeed --hostfile ...``. It prints one line per
check and exits 0 when nothing failed, 2 otherwise:

- hostfile: parsed by DeepSpeed's own parser; hosts and slots after --num_nodes/--num_gpus;
- batch: train_batch_size = micro batch x accumulation x world size for that world size;
- master: the address resolves and the port is free (when the address is this machine);
- dataset / output / cache: readable / writable;
- packages: this node's vla_ds, deepspeed, torch, transformers, peft versions;
- backend and timeout: the process-group backend DeepSpeed picks here, and the timeout
  after which a dead rank ends the job (``train.dist_timeout_minutes``).

``train.py`` runs :func:`vla_ds.training.distributed.check_ranks` on every rank right after the process group starts:
the same package versions, dataset and backbone on every rank, or one message naming the
ranks and hosts that differ.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import socket
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vla_ds.errors import ConfigError, VLAError, user_message
from vla_ds.training.environment import backend_name, package_versions

logger = logging.getLogger(__name__)

OK, WARN, FAIL = "ok", "warn", "FAIL"


@dataclass
class Check:
    name: str
    status: str  # OK, WARN or FAIL
    detail: str


# --------------------------------------------------------------------------- single checks


def read_hostfile(path: str | os.PathLike) -> dict[str, int]:
    """``{host: slots}`` in file order, parsed by DeepSpeed's launcher; errors name the file."""
    from deepspeed.launcher import runner

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: hostfile not found")
    ds_logger = logging.getLogger("DeepSpeed")
    level = ds_logger.level
    ds_logger.setLevel(logging.CRITICAL)  # its parser logs the whole file before raising
    try:
        return dict(runner.fetch_hostfile(str(p)))
    except ValueError as e:
        raise ConfigError(f"{p}: {e} (expected lines like 'node-01 slots=4'; '#' starts a comment)") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read the hostfile ({e.strerror})") from None
    finally:
        ds_logger.setLevel(level)


def active_hosts(pool: dict[str, int], num_nodes: int = -1, num_gpus: int = -1) -> dict[str, int]:
    """The hosts and slots the launcher will use, by DeepSpeed's own --num_nodes/--num_gpus rules."""
    from deepspeed.launcher import runner

    active = runner.parse_inclusion_exclusion(pool, "", "")
    active = runner.apply_num_nodes_and_gpus(active, num_nodes, num_gpus)
    return {host: len(slots) for host, slots in active.items()}


def check_hostfile(path, num_nodes: int, num_gpus: int) -> tuple[Check, dict[str, int]]:
    """The check and the hosts in use (``{host: ranks}``, empty when the hostfile is bad)."""
    try:
        hosts = active_hosts(read_hostfile(path), num_nodes, num_gpus)
    except ConfigError as e:
        return Check("hostfile", FAIL, str(e)), {}
    listing = ", ".join(f"{h} ({n})" for h, n in hosts.items())
    return Check("hostfile", OK, f"{path}: {len(hosts)} node(s), {sum(hosts.values())} rank(s): {listing}"), hosts


def check_batch(raw_args: argparse.Namespace, world: int) -> tuple[Check, Any]:
    from vla_ds.training.config import load_run_config

    try:
        cfg = load_run_config(raw_args, world)
    except VLAError as e:
        return Check("batch", FAIL, user_message(e)), None
    global_batch = cfg.deepspeed["train_batch_size"]
    return Check("batch", OK, f"global batch {global_batch} = micro batch {cfg.micro_batch_size} x accumulation "
                              f"{cfg.grad_accum} x {world} rank(s)"), cfg


def check_master(addr: str, port: int) -> Check:
    """The address resolves; when it is this machine, the port is free to listen on."""
    try:
        infos = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        return Check("master", FAIL, f"{addr}: the master address does not resolve ({e.strerror}); "
                                     "pass --master_addr with the first node's reachable address")
    family, _, _, _, sockaddr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind(sockaddr)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return Check("master", FAIL, f"{addr}:{port}: the port is in use (another job?); "
                                             "pick a free one with --master_port")
            if e.errno == errno.EADDRNOTAVAIL:
                return Check("master", WARN, f"{addr} resolves to {sockaddr[0]}, another machine: the port is "
                                             "checked only when preflight runs on the master node")
            return Check("master", FAIL, f"{addr}:{port}: cannot listen ({e.strerror})")
    return Check("master", OK, f"{addr}:{port} resolves to {sockaddr[0]} and the port is free")


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(name: str, path: str | os.PathLike) -> Check:
    """``path`` (or, if it does not exist yet, its nearest existing parent) takes a new file.
    Nothing is created or left behind."""
    target = Path(path)
    base = _nearest_existing(target)
    if not base.is_dir():
        return Check(name, FAIL, f"{base}: not a directory")
    try:
        with tempfile.NamedTemporaryFile(dir=base, prefix=".vla_ds_preflight_"):
            pass
    except OSError as e:
        return Check(name, FAIL, f"{base}: not writable ({e.strerror})")
    where = "" if base == target.absolute() else f" (will be created under {base})"
    return Check(name, OK, f"{target}: writable{where}")


def check_dataset(path: str | os.PathLike) -> Check:
    p = Path(path)
    if not p.is_dir():
        return Check("dataset", FAIL, f"{p}: dataset directory not found")
    if not os.access(p, os.R_OK | os.X_OK):
        return Check("dataset", FAIL, f"{p}: not readable")
    entries = [e for e in p.iterdir() if not e.name.startswith(".")]
    if not entries:
        return Check("dataset", FAIL, f"{p}: empty dataset directory")
    mixture = " with mixture.yaml" if (p / "mixture.yaml").is_file() else ""
    return Check("dataset", OK, f"{p}: readable, {len(entries)} entries{mixture}")


# --------------------------------------------------------------------------- across ranks


# --------------------------------------------------------------------------- CLI


def run_checks(args: argparse.Namespace) -> list[Check]:
    checks = []
    hostfile_check, hosts = check_hostfile(args.hostfile, args.num_nodes, args.num_gpus)
    checks.append(hostfile_check)
    cfg = None
    if hosts:
        batch_check, cfg = check_batch(args, sum(hosts.values()))
        checks.append(batch_check)
        checks.append(check_master(args.master_addr or next(iter(hosts)), args.master_port))
    dataset_dir = args.dataset_dir or (cfg.data.dataset_dir if cfg is not None else None)
    if dataset_dir:
        checks.append(check_dataset(dataset_dir))
    else:
        checks.append(Check("dataset", FAIL, "no dataset: pass --dataset_dir"))
    if args.output_dir or cfg is not None:
        checks.append(check_writable("output", args.output_dir or cfg.train.output_dir))
    if cfg is not None:
        for name, path in (("stage1", cfg.train.stage1_checkpoint), ("resume", cfg.train.resume)):
            if path:
                found = Path(path).exists()
                checks.append(Check(name, OK if found else FAIL, f"{path}: {'found' if found else 'not found'} "
                                                                 "(train.py reads it at start-up)"))
        from vla_ds.training.config import cache_enabled

        if cache_enabled(cfg) and dataset_dir:
            from vla_ds.user_cache import feature_cache_dir

            checks.append(check_writable("cache", cfg.cache.dir or feature_cache_dir(dataset_dir)))
    versions = package_versions()
    checks.append(Check("packages", OK, ", ".join(f"{k} {v}" for k, v in versions.items())
                        + " (this node; train.py compares every rank's at start-up)"))
    backend, device = backend_name()
    checks.append(Check("backend", OK if backend in ("nccl", "gloo", "ccl", "hccl") else WARN,
                        f"{backend} on {device} (chosen by DeepSpeed's accelerator on this node)"))
    if cfg is not None:
        checks.append(Check("timeout", OK, f"{cfg.train.dist_timeout_minutes:g} min (train.dist_timeout_minutes): "
                                           "a dead or stuck rank ends the job after at most this"))
    return checks


def format_checks(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    return "\n".join(f"[{c.status:>4}] {c.name:<{width}}  {c.detail}" for c in checks)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vla_ds.training.preflight",
                                description="Check a (multi-node) launch before starting it.")
    p.add_argument("--hostfile", required=True, help="DeepSpeed hostfile ('host slots=N' per line)")
    p.add_argument("--ds_config", "--ds-config", required=True)
    p.add_argument("--dataset_dir", "--dataset-dir")
    p.add_argument("--output_dir", "--output-dir")
    p.add_argument("--num_nodes", "--num-nodes", type=int, default=-1, help="as given to the deepspeed launcher")
    p.add_argument("--num_gpus", "--num-gpus", type=int, default=-1, help="as given to the deepspeed launcher")
    p.add_argument("--master_addr", "--master-addr", default=None, help="default: the hostfile's first host")
    p.add_argument("--master_port", "--master-port", type=int, default=29500)
    p.add_argument("--batch_size", "--batch-size", type=int)
    p.add_argument("--grad_accum", "--grad-accum", type=int)
    p.add_argument("--stage1-checkpoint", "--stage1_checkpoint", dest="stage1_checkpoint",
                   help="Stage 2: the Stage 1 output dir or its .pt, as given to train.py")
    p.add_argument("--resume", help="the run to continue, as given to train.py")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    checks = run_checks(args)
    print(format_checks(checks))
    failed = [c for c in checks if c.status == FAIL]
    print(f"preflight: {len(failed)} problem(s)" if failed else "preflight: ready to launch")
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
