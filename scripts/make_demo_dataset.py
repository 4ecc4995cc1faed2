"""Write the synthetic demo dataset (SPEC section 3 format) for CPU runs and tests.

    python scripts/make_demo_dataset.py OUT_DIR [--episodes N] [--seed S] [--overwrite]

Prints the directory it wrote and the dataset summary. The library function is
``vla_ds.data.demo.make_demo_dataset``.
"""

import sys

from vla_ds.data.demo import main

if __name__ == "__main__":
    sys.exit(main())
