"""Fault drill: break tiny Stage 1 runs on purpose and check that nothing is lost.

    python scripts/fault_drill.py [--out DIR] [--json PATH] [--only NAME ...]

Makes the tiny offline backbone and a small demo dataset, then runs each scenario end to
end (CPU, one rank unless the scenario needs two) and prints a table: scenario, what
happened, and the data or checkpoints lost (must be "none"). Exit 0 when every scenario
behaved, 1 otherwise. Takes a few minutes on 2 cores; tests/test_faults.py runs the same
scenarios as assertions.

``python scripts/fault_drill.py child [--kill-in-save TAG] [--nan-steps A-B]
[--kill-worker-at I] -- TRAIN_ARGS...`` runs ``scripts/train.py TRAIN_ARGS`` in this process
with one fault injected (the drill and the tests start it as a subprocess):

- ``--kill-in-save TAG``: while saving checkpoint TAG, the first file written is cut in half
  and the process SIGKILLs itself (a kill in the middle of a save);
- ``--nan-steps A-B``: the loss of training forward calls A..B (1-based; optimizer steps with accumulation 1)
  is NaN (a numerical blow-up);
- ``--kill-worker-at I``: the DataLoader worker that loads sample I SIGKILLs itself (the
  out-of-memory killer).
"""

import sys

from vla_ds.fault_drill import main

if __name__ == "__main__":
    sys.exit(main())
