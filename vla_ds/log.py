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
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:  # transformers' per-load "Loading weights" bars, once per rank, say nothing useful here
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    # torch.utils.checkpoint and friends warn once per process about defaults we set on purpose.
    warnings.filterwarnings("ignore", message=".*torch.utils._pytree.*")
