"""Estimate per-GPU memory of a training config and say which shipped config fits.

    python scripts/estimate_memory.py --ds_config ds_configs/stage2.json --num_gpus 4 --gpu-memory 24GB

Builds the policy on the meta device (exact parameter counts, nothing allocated), applies
the config's finetune mode, and prints weights / gradients / optimizer states / activations /
overhead per GPU, then the same estimate for every shipped ``ds_configs/*.json`` with the
same flags and the fastest stage-2 config that fits. The arithmetic is in ``vla_ds.planning.memory``.
"""

import sys

from vla_ds.planning.estimate_memory import main

if __name__ == "__main__":
    sys.exit(main())
