"""Fault drill: break tiny Stage 1 runs on purpose and check that nothing is lost.

    python scripts/fault_drill.py [--out DIR] [--json PATH] [--only NAME ...]

The scenarios and the fault injection are described in vla_ds/training/fault_drill.py.
"""

import sys

from vla_ds.training.fault_drill import main

if __name__ == "__main__":
    sys.exit(main())
