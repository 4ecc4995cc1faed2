"""Training metrics: ``metrics.jsonl`` rows plus the same figures to DeepSpeed's monitors.

``metrics.jsonl`` (in the output dir, appended, one JSON object per line) has two kinds
of rows:

* a training row per logged optimizer step: ``step``, ``epoch``, ``train/loss``,
  ``train/lr/<group>`` for every parameter group, ``train/grad_norm``, ``samples_per_s``
  (global samples per second of the step) and ``data_share`` (fraction of the step's wall
  time spent waiting for the DataLoader);
* a validation row: ``step``, ``epoch``, ``val/loss``.

DeepSpeed's monitor sections of the JSON (``tensorboard``, ``csv_monitor``, ``wandb``)
receive every numeric value under the same names, at x = samples seen (step x global batch,
the axis of DeepSpeed's own ``Train/Samples/*`` events there); they are off by default. A
wandb run is finished when training ends.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"


class MetricsLogger:
    """Writes rows on rank 0 only (callers need no rank branches).

    A fresh run starts a new file. A resumed run (``resume_step``) keeps the rows up to its
    checkpoint's step and drops later ones, which the resumed run is about to redo.
    """

    def __init__(self, output_dir: str | Path, monitor: Any = None, is_main: bool = True,
                 resume_step: int | None = None, samples_per_step: int = 1):
        self.path = Path(output_dir) / METRICS_FILE
        # The monitors' x axis is samples seen, as for DeepSpeed's own events in them (wandb
        # drops a row whose step is below one already logged).
        self.samples_per_step = samples_per_step
        self.monitor = monitor if monitor is not None and getattr(monitor, "enabled", False) else None
        self.is_main = is_main
        self._file = None
        if is_main:
            kept = []
            if resume_step is not None and self.path.is_file():
                kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            self._file = open(self.path, "w")
            for row in kept:
                self._file.write(json.dumps(row) + "\n")
            self._file.flush()

    def log(self, row: dict[str, Any]) -> None:
        if not self.is_main:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()
        if self.monitor is not None:
            step = row["step"] * self.samples_per_step
            events = [(k, float(v), step) for k, v in row.items()
                      if k not in ("step", "epoch") and isinstance(v, (int, float)) and not isinstance(v, bool)]
            self.monitor.write_events(events)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        wandb_monitor = getattr(self.monitor, "wandb_monitor", None)
        if self.is_main and wandb_monitor is not None and wandb_monitor.enabled:
            import wandb

            if wandb.run is not None:  # DeepSpeed's monitor never ends its run: the next run in this
                wandb.finish()         # process (a notebook, the tests) would log into it


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All rows of a metrics.jsonl (for tests, plots and the demo summary)."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarize(rows: list[dict[str, Any]]) -> str:
    """A few lines about a run: loss at start and end, validation losses, throughput."""
    train = [r for r in rows if "train/loss" in r]
    val = [r for r in rows if "val/loss" in r]
    if not train:
        return "no training rows yet"
    k = max(1, len(train) // 10)
    first = sum(r["train/loss"] for r in train[:k]) / k
    last = sum(r["train/loss"] for r in train[-k:]) / k
    lines = [f"steps: {train[-1]['step']}, epochs: {train[-1]['epoch']}",
             f"train/loss: {first:.4f} (mean of first {k} steps) -> {last:.4f} (mean of last {k} steps)"]
    if val:
        lines.append(f"val/loss: {val[0]['val/loss']:.4f} (epoch {val[0]['epoch']}) -> "
                     f"{val[-1]['val/loss']:.4f} (epoch {val[-1]['epoch']})")
    sps = sorted(r["samples_per_s"] for r in train if "samples_per_s" in r)
    if sps:
        lines.append(f"samples/s (median): {sps[len(sps) // 2]:.1f}")
    return "\n".join(lines)
