"""Predict one action chunk with an exported policy and show it next to the recorded one.

    python scripts/predict.py --policy OUT --episode DATA/source/episode_000 [--frame K] [--steps N]

Loads the policy directory (docs/policy_format.md), cuts the episode into samples with the
policy's sensor window and horizon, and prints sample K's predicted chunk (8 x 7: dx dy dz in
mm, da db dr in degrees, gripper) with the recorded chunk under each step. ``main(argv)`` runs
in-process; a user error prints one line and returns 2.
"""

import sys

from vla_ds.policy_tools.predict import main

if __name__ == "__main__":
    sys.exit(main())
