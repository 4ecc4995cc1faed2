"""Serve an exported policy to robots over websockets, in openpi's protocol.

    python scripts/serve.py --policy POLICY_DIR [--host 127.0.0.1] [--port 8000] [--vl-model M]
        [--device cuda|cpu] [--ddim-steps K] [--api-key KEY] [--max-batch-size 8] [--batch-wait-ms 0]

On connect a client gets the policy's metadata (camera views, instruction, sensor window,
action horizon and dimension, names, sampler); each request is one observation and is
answered with the de-normalised (H, D) action chunk. ``GET /healthz`` answers 200 while the
policy is loaded. openpi-client's ``WebsocketClientPolicy`` and vla_ds's
``vla_ds.serving.client.PolicyClient`` both speak it (docs/serving.md).
"""

import sys

from vla_ds.serving.cli import main

if __name__ == "__main__":
    sys.exit(main())
