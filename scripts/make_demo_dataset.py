"""Write the synthetic demo dataset (SPEC section 3 format) for CPU runs and tests.

    python scripts/make_demo_dataset.py OUT_DIR [--episodes N] [--seed S] [--overwrite]
"""

import argparse
import sys
from pathlib import Path

from vla_ds.data.dataset import DataConfig, VLADataset
from vla_ds.data.demo import SENSOR_WINDOW, SOURCES, make_demo_dataset
from vla_ds.errors import VLAError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--episodes", type=int, default=None,
                        help="episodes per source (default: 4 with sensor data, 3 without)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace a previous demo dataset in OUT_DIR")
    args = parser.parse_args(argv)
    per_source = (4, 3) if args.episodes is None else (args.episodes,) * len(SOURCES)
    try:
        out = make_demo_dataset(args.out_dir, per_source, seed=args.seed, overwrite=args.overwrite)
        ds = VLADataset.from_config(DataConfig(dataset_dir=str(out), sensor_window_size=SENSOR_WINDOW))
    except VLAError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote demo dataset to {out}")
    print(ds.describe())
    print(f"train with: --dataset_dir {out} --sensor-window-size {SENSOR_WINDOW}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
