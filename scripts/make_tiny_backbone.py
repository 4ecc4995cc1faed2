"""Write the offline tiny Qwen2.5-VL (random weights, small tokenizer and image processor).

    python scripts/make_tiny_backbone.py OUT_DIR [--seed S]

The directory loads wherever a real backbone does (``--vl-model OUT_DIR``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vla_ds.tiny_backbone import make_tiny_backbone


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="directory to write (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    args = parser.parse_args(argv)

    out = make_tiny_backbone(args.out_dir, seed=args.seed)
    files = sorted(p for p in out.iterdir() if p.is_file())
    total = sum(p.stat().st_size for p in files)
    print(f"tiny Qwen2.5-VL backbone (seed {args.seed}) written to {out}:")
    for p in files:
        print(f"  {p.name:28s} {p.stat().st_size:>10,d} bytes")
    print(f"  {'total':28s} {total:>10,d} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
