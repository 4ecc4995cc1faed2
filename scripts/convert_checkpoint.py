"""Convert a training checkpoint (DeepSpeed ZeRO) into weights other tools load.

    python scripts/convert_checkpoint.py CKPT_DIR OUT --to policy [--merge-lora] [--vl-model M]
    python scripts/convert_checkpoint.py CKPT_DIR OUT --to fp32|bf16 [--include-base]
    python scripts/convert_checkpoint.py CKPT_DIR OUT.pt --to stage1|stage2
    python scripts/convert_checkpoint.py CKPT_DIR OUT --to universal   # then train.py --resume OUT, any GPU count

CKPT_DIR is a training output dir (its 'latest', or --tag global_stepN) or one global_stepN
dir. The formats and their layouts are described in vla_ds/convert.py and docs/policy_format.md.
Prints what it wrote; a bad argument is one 'error:' line and exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from vla_ds.convert import FORMATS, convert
from vla_ds.errors import VLAError, user_message
from vla_ds.log import setup_logging


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="convert_checkpoint.py", description=__doc__.strip().splitlines()[0])
    p.add_argument("checkpoint", help="training output dir (its 'latest') or a global_stepN dir")
    p.add_argument("out", help="output dir (or .pt file for --to stage1/stage2)")
    p.add_argument("--to", required=True, metavar="FORMAT", help=f"one of: {', '.join(FORMATS)}")
    p.add_argument("--tag", help="checkpoint tag in CKPT_DIR (default: its 'latest')")
    p.add_argument("--merge-lora", "--merge_lora", dest="merge_lora", action="store_true",
                   help="--to policy: also write the LoRA merged into the backbone (merged_backbone/)")
    p.add_argument("--include-base", "--include_base", dest="include_base", action="store_true",
                   help="--to fp32/bf16/stage2: add the frozen base backbone's weights")
    p.add_argument("--no-ema", "--no_ema", dest="use_ema", action="store_false",
                   help="write the trained weights, not the run's moving average of them (the default when "
                        "the run kept one, ema.enabled)")
    p.add_argument("--vl-model", "--vl_model", dest="vl_model",
                   help="base Qwen2.5-VL dir or hub id (default: the one in the run config)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        result = convert(args.checkpoint, args.out, args.to, tag=args.tag, merge_lora=args.merge_lora,
                         include_base=args.include_base, vl_model=args.vl_model, use_ema=args.use_ema)
    except VLAError as e:
        print(f"error: {user_message(e)}", file=sys.stderr)
        return 2
    print(f"converted {result.source} ({result.stage}, step {result.step}) to {result.to}:")
    for path in result.written:
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
