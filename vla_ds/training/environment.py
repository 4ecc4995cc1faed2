"""What every rank of a run must agree on, and what it runs on: package versions, the
communication backend DeepSpeed picks, and the comparison of the facts ranks gather.

Below both the launch checks (:mod:`vla_ds.training.preflight`, before any process starts)
and the process group (:mod:`vla_ds.training.distributed`, once it has started).
"""

from __future__ import annotations

from typing import Any

PACKAGES = ("vla_ds", "deepspeed", "torch", "transformers", "peft")


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def backend_name() -> tuple[str, str]:
    """(communication backend, accelerator) as DeepSpeed will choose them on this machine."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    return acc.communication_backend_name(), acc.device_name()


def compare_ranks(infos: list[dict[str, Any]]) -> list[str]:
    """Problems among the per-rank facts gathered by :func:`vla_ds.training.distributed.check_ranks` (one line each)."""
    problems = []
    keys = sorted({k for info in infos for k in info if k != "host"})
    for key in keys:
        groups: dict[str, list[int]] = {}
        for rank, info in enumerate(infos):
            groups.setdefault(str(info.get(key)), []).append(rank)
        if len(groups) > 1:
            parts = "; ".join(f"{value} on {_ranks_and_hosts(ranks, infos)}" for value, ranks in groups.items())
            problems.append(f"{key} differs between ranks: {parts}")
    return problems


def _ranks_and_hosts(ranks: list[int], infos: list[dict[str, Any]]) -> str:
    hosts = sorted({infos[r]["host"] for r in ranks})
    label = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {','.join(map(str, ranks))}"
    return f"{label} ({', '.join(hosts)})"
