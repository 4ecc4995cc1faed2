"""Convert a training checkpoint (DeepSpeed ZeRO) into weights other tools load.

    python scripts/convert_checkpoint.py CKPT_DIR OUT --to policy [--merge-lora] [--vl-model M]
    python scripts/convert_checkpoint.py CKPT_DIR OUT --to fp32|bf16 [--include-base]
    python scripts/convert_checkpoint.py CKPT_DIR OUT.pt --to stage1|stage2
    python scripts/convert_checkpoint.py CKPT_DIR OUT --to universal   # then train.py --resume OUT, any GPU count

CKPT_DIR is a training output dir (its 'latest', or --tag global_stepN) or one global_stepN
dir. The formats and their layouts are described in vla_ds/policy_tools/convert.py and docs/policy_format.md.
Prints what it wrote; a bad argument is one 'error:' line and exit code 2.
"""

import sys

from vla_ds.policy_tools.convert import main

if __name__ == "__main__":
    sys.exit(main())
