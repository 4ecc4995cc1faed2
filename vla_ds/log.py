"""One logging setup for every entry point: rank 0 talks, other ranks only warn."""

from __future__ import annotations

import logging
import os
import sys
import warnings


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted, not when the handler
    was made: in-process callers (tests, notebooks) may swap stderr between runs."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


class _DropDesignedWarnings(logging.Filter):
    """DeepSpeed warnings about what it does by design. ``WarmupCosineLR``'s constructor
    asks itself for the rate at iteration -1 and warns about it on every run start
    (``engine.initialize`` then starts the schedule at 0)."""

    MESSAGES = ("Attempting to get learning rate from scheduler before it has started",)

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(m in record.getMessage() for m in self.MESSAGES)


def setup_logging(rank: int | None = None, level: int = logging.INFO) -> None:
    """Configure the ``vla_ds`` logger (idempotent).

    Rank 0 logs at ``level``; other ranks log warnings and errors only, prefixed with
    their rank, so a multi-rank run prints each message once. Chatty third-party loggers
    (DeepSpeed's per-step lines, transformers' load reports) are turned down.
    """
    if rank is None:
        rank = int(os.environ.get("RANK", "0"))
    prefix = "" if rank == 0 else f"[rank {rank}] "
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(message)s", datefmt="%H:%M:%S"))
    root = logging.getLogger("vla_ds")
    root.handlers[:] = [handler]
    root.setLevel(level if rank == 0 else logging.WARNING)
    root.propagate = False
    ds_logger = logging.getLogger("DeepSpeed")
    ds_logger.setLevel(logging.WARNING)
    if not any(isinstance(f, _DropDesignedWarnings) for f in ds_logger.filters):
        ds_logger.addFilter(_DropDesignedWarnings())
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:  # transformers' per-load "Loading weights" bars, once per rank, say nothing useful here
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    # torch.utils.checkpoint and friends warn once per process about defaults we set on purpose.
    warnings.filterwarnings("ignore", message=".*torch.utils._pytree.*")
    # torch deprecates the collective DeepSpeed's optimizers gather parameters with; not ours to change.
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
