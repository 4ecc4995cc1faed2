"""Train a VLA policy with DeepSpeed. See ``python scripts/train.py --help``."""

import sys

from vla_ds.training.train import main

if __name__ == "__main__":
    sys.exit(main())
