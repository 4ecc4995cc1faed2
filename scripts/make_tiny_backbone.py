"""Write the offline tiny Qwen2.5-VL (random weights, small tokenizer and image processor).

    python scripts/make_tiny_backbone.py OUT_DIR [--seed S]

The directory loads wherever a real backbone does (``--vl-model OUT_DIR``).
"""

import sys

from vla_ds.models.tiny_backbone import main

if __name__ == "__main__":
    sys.exit(main())
