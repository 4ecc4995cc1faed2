"""Open-loop evaluation of an exported policy on the validation episodes (SPEC section 6).

    python scripts/evaluate.py --policy OUT --dataset_dir DATA --output eval/ [--split val|all]
        [--max-samples N] [--steps N] [--seed S] [--batch-size B]

The validation episodes are the ones training held out: ``split_train_val`` with the run's
``data.val_split`` and ``seed`` from the policy's config.json (``--val-split`` /
``--split-seed`` supply them for a config.json without them). Writes OUT/report.json
(MSE/MAE per dimension and overall, policy vs mean-action and zero-action baselines),
OUT/predictions.npz and OUT/plots/*.png. ``main(argv)`` runs in-process; a user error prints
one line and returns 2.
"""

import sys

from vla_ds.policy_tools.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
