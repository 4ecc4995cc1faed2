"""Build the Stage 1 VL feature cache ahead of training, with the same flags as train.py.

    deepspeed --num_gpus 4 scripts/build_cache.py --ds_config ds_configs/stage1.json --dataset_dir DATA
    python scripts/build_cache.py --ds_config ds_configs/stage1.json --dataset_dir DATA --vl-model M

Every rank computes a disjoint share of the missing features; a later train.py with the
same backbone and data finds them and starts training at once.
"""

import sys

from vla_ds.training.train import build_cache_main

if __name__ == "__main__":
    sys.exit(build_cache_main())
