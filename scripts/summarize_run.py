"""Print a run's summary from its metrics.jsonl: loss at start and end, validation, samples/s.

    python scripts/summarize_run.py OUTPUT_DIR_OR_METRICS_JSONL
"""

import sys
from pathlib import Path

from vla_ds.training.metrics import METRICS_FILE, read_metrics, summarize


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    path = Path(args[0])
    target = path / METRICS_FILE if path.is_dir() else path
    if not target.is_file():
        print(f"error: {target}: no metrics file", file=sys.stderr)
        return 2
    print(summarize(read_metrics(target)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
