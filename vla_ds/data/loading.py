"""What the DataLoader sees: bad samples skipped on request, the sample each worker is
loading, so a worker that dies (out-of-memory kill, a crashing decoder) is reported with
the sample that killed it instead of a bare "worker exited unexpectedly", and batches that
travel from a worker to the main process in one piece (:class:`WorkerBatch`).

:class:`LoaderDataset` wraps the training / validation dataset (a ``VLADataset`` or the
cache's ``CachedFeatures``). With ``on_bad_sample="skip"`` a sample whose loading raises
:class:`~vla_ds.errors.DatasetError` comes back as ``{BAD_SAMPLE: message}``; the collator
drops it and the trainer counts it per file. Each item also carries its ``SAMPLE_INDEX``.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vla_ds.batch import BAD_SAMPLE, IMAGES, INSTRUCTION, SAMPLE_INDEX, VL_HIDDEN
from vla_ds.data.dataset import collate_numeric
from vla_ds.errors import DatasetError


def _remove_if_owner(path: str, owner_pid: int) -> None:
    if os.getpid() == owner_pid:  # never from a forked worker's copy
        shutil.rmtree(path, ignore_errors=True)


class WorkerTracker:
    """One small file per worker process, named by its pid, holding the index of the sample
    it is loading: written before each load (a page-cache write, no fsync), read by the main
    process only after the worker died. Removed when the tracker is garbage collected."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="vla_ds_workers_")
        weakref.finalize(self, _remove_if_owner, self.dir, os.getpid())

    def mark(self, index: int) -> None:
        if torch.utils.data.get_worker_info() is None:
            return  # the main process: its own traceback would say it
        with open(os.path.join(self.dir, str(os.getpid())), "w") as f:
            f.write(str(index))

    def loading(self, pid: int) -> int | None:
        try:
            return int(Path(self.dir, str(pid)).read_text())
        except (OSError, ValueError):
            return None


class LoaderDataset(torch.utils.data.Dataset):
    """``dataset`` as the DataLoader should see it (see the module docstring)."""

    def __init__(self, dataset, on_bad_sample: str = "error", track_workers: bool = True):
        self.dataset = dataset
        self.on_bad_sample = on_bad_sample
        self.tracker = WorkerTracker() if track_workers else None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if self.tracker is not None:
            self.tracker.mark(i)
        try:
            sample = self.dataset[i]
        except DatasetError as e:
            if self.on_bad_sample != "skip":
                raise
            return {BAD_SAMPLE: str(e), SAMPLE_INDEX: int(i)}
        sample[SAMPLE_INDEX] = int(i)
        return sample

    def describe_worker(self, pid: int) -> str | None:
        """What the worker ``pid`` was loading, if it got that far."""
        index = self.tracker.loading(pid) if self.tracker is not None else None
        if index is None:
            return None
        describe = getattr(self.dataset, "describe_sample", None)
        return describe(index) if describe is not None else f"sample {index}"


# --------------------------------------------------------------------------- worker lifetime

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def workers_outlast_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn`` of the training and validation loaders: a worker ends
    when its rank ends it, not on a job-wide SIGTERM / SIGINT.

    scancel, a terminal's Ctrl-C and the deepspeed launcher's kill of each rank's process
    tree signal the workers along with the rank. The rank finishes its optimizer step on
    their batches (torch raises "DataLoader worker ... killed by signal" in it otherwise) and
    then shuts them down (:func:`shutdown_workers`); so here both signals are taken by a
    thread that waits for them and ignores all but those from the parent: torch terminating a
    stuck worker, multiprocessing ending daemon processes at exit, which then end the worker
    as the signal's default action would. A worker whose rank died (SIGKILL) leaves by
    torch's watchdog within seconds. Without ``sigwaitinfo`` (macOS) workers keep the
    default behaviour."""
    if not hasattr(signal, "sigwaitinfo"):
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # first: none is lost while the rest is set up
    for signum in STOP_SIGNALS:  # a forked worker inherits the rank's handler; the default is what the parent asks for
        signal.signal(signum, signal.SIG_DFL)
    threading.Thread(target=_obey_only_parent, args=(os.getppid(),), name="vla_ds stop signals", daemon=True).start()


def _obey_only_parent(parent: int) -> None:
    while True:
        info = signal.sigwaitinfo(STOP_SIGNALS)
        if info.si_pid == parent:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, [info.si_signo])  # this thread only: the signal lands here,
            os.kill(os.getpid(), info.si_signo)                          # and its default action ends the worker
            os._exit(128 + info.si_signo)  # not reached


def shutdown_workers(*loaders) -> None:
    """End the worker processes of ``loaders`` (``None`` entries skipped) now: a
    ``persistent_workers`` loader keeps its iterator, and with it its workers, until the
    loader is garbage collected, which an exception's traceback can postpone to interpreter
    exit. Safe to call more than once and on loaders without workers."""
    for loader in loaders:
        it = getattr(loader, "_iterator", None)
        if it is None:
            continue
        loader._iterator = None
        shutdown = getattr(it, "_shutdown_workers", None)  # torch's own shutdown (join, then terminate)
        if shutdown is not None:
            shutdown()


# Below this many bytes a packed batch crosses the worker's pipe as bytes; above, it goes
# through one shared-memory segment (the pipe copy grows with the size, the segment's
# set-up cost does not).
PIPE_BYTES = 1 << 20
_ALIGN = 64


class WorkerBatch(dict):
    """A collated batch that is packed when it leaves a DataLoader worker.

    torch hands every tensor of a batch to the main process through its own shared-memory
    segment: a file descriptor passed over a fresh socket connection per tensor, about
    0.3 ms of the *main* process's time each, so ~3 ms per batch of 10 tensors, paid on
    the training loop's critical path. Pickled, this dict puts all its tensors into one
    buffer: bytes through the pipe when small, one shared-memory segment when large. The
    main process unpickles a plain ``dict`` whose tensors are views of that buffer; other
    values pass as they are. Use :func:`for_transfer` (only a worker's batch needs it);
    copies (``copy.copy``, which pin-memory uses) stay plain copies and never pack.
    """

    def __copy__(self) -> "WorkerBatch":
        return WorkerBatch(self)

    def __deepcopy__(self, memo) -> "WorkerBatch":
        import copy

        return WorkerBatch(copy.deepcopy(dict(self), memo))

    def __reduce__(self):
        tensors = [(k, v) for k, v in self.items() if isinstance(v, torch.Tensor)]
        layout, total = [], 0
        for key, t in tensors:
            nbytes = t.numel() * t.element_size()
            layout.append((key, t.dtype, tuple(t.shape), total, nbytes))
            total += -(-nbytes // _ALIGN) * _ALIGN  # every view aligned for its dtype
        if total <= PIPE_BYTES:
            buffer = bytearray(total)
            flat = _as_bytes_tensor(buffer)
        else:
            buffer = flat = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(total))
        for (key, t), (_, dtype, shape, offset, nbytes) in zip(tensors, layout):
            flat[offset:offset + nbytes].view(dtype).view(shape).copy_(t)
        rest = {k: v for k, v in self.items() if not isinstance(v, torch.Tensor)}
        return _unpack_batch, (buffer, layout, rest)


def for_transfer(batch: dict) -> dict:
    """``batch`` as a :class:`WorkerBatch` when this is a DataLoader worker (its batch is
    pickled to the main process), else unchanged."""
    return WorkerBatch(batch) if torch.utils.data.get_worker_info() is not None else batch


def _as_bytes_tensor(buffer: bytearray) -> torch.Tensor:
    """A uint8 tensor over ``buffer``, no copy (torch.frombuffer refuses an empty buffer)."""
    return torch.frombuffer(buffer, dtype=torch.uint8) if len(buffer) else torch.empty(0, dtype=torch.uint8)


def _unpack_batch(buffer, layout, rest: dict) -> dict:
    flat = buffer if isinstance(buffer, torch.Tensor) else _as_bytes_tensor(buffer)
    batch = {key: flat[offset:offset + nbytes].view(dtype).view(shape)
             for key, dtype, shape, offset, nbytes in layout}
    batch.update(rest)
    return batch


class PolicyCollator:
    """DataLoader collate: numeric fields stacked, images + instruction turned into
    backbone inputs (tokenised prompt, processed patches), or, for samples from the VL
    feature cache, the cached features stacked (``vl_hidden`` (B, hidden) or (B, T, hidden)) and no prompt
    built at all. Runs in the workers; picklable."""

    def __init__(self, input_builder):
        self.input_builder = input_builder

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        # With on_bad_sample="skip" the dataset hands back {BAD_SAMPLE: message} for a sample
        # it could not load: drop it, and carry the message to the trainer's per-file count.
        bad = [s[BAD_SAMPLE] for s in samples if BAD_SAMPLE in s]
        samples = [s for s in samples if BAD_SAMPLE not in s]
        if not samples:  # nothing to stack; the caller decides (the cache build skips it)
            return for_transfer({BAD_SAMPLE: bad})
        batch = collate_numeric(samples)
        images, instructions = batch.pop(IMAGES), batch.pop(INSTRUCTION)
        if VL_HIDDEN in batch:
            batch[VL_HIDDEN] = torch.from_numpy(np.stack(batch[VL_HIDDEN]))  # (B, hidden) or (B, T, hidden)
        else:
            batch.update(self.input_builder(images, instructions))
        batch[BAD_SAMPLE] = bad
        return for_transfer(batch)  # leaves a worker in one piece


def pop_bad_samples(batch: dict[str, Any]) -> list[str]:
    """Remove and return the messages of the samples the collator dropped
    (on_bad_sample="skip"). A micro batch of only bad samples is an error: every rank must
    take the same steps, so it cannot simply be left out (with a micro batch of several
    samples this is very unlikely)."""
    bad = batch.pop(BAD_SAMPLE, [])
    if not batch:
        raise DatasetError(f"every sample of a micro batch was bad (lower the share of bad files or raise the "
                           f"batch size); the first: {bad[0]}")
    return bad


def describe_worker_death(message: str, datasets: list) -> str:
    """One line for torch's "DataLoader worker (pid(s) N) exited unexpectedly" / "is killed
    by signal" (raised at ``next()`` or, from torch's SIGCHLD handler, anywhere in the main
    process: ``train.py`` catches it around the whole loop), naming the sample that worker
    was loading when one of ``datasets`` tracks it."""
    import re

    line = message.strip().splitlines()[0]
    # "(pid 1234) is killed by signal: ..." or "(pid(s) 1234, 1235) exited unexpectedly"
    found = re.search(r"pid(?:\(s\))?\s+([\d,\s]+)", line)
    pids = [int(p) for p in re.findall(r"\d+", found.group(1))] if found else []
    loading = []
    for pid in pids:
        described = [d.describe_worker(pid) for d in datasets if hasattr(d, "describe_worker")]
        loading += [what for what in described if what][:1]
    what = f" while loading {'; '.join(loading)}" if loading else ""
    return (f"a DataLoader worker died{what} ({line.rstrip('. ')}); out of memory is the usual cause: lower "
            "--num_workers or the batch size, or find what that sample makes the worker do")
