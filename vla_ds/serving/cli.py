"""``vla-serve`` / ``scripts/serve.py``: serve an exported policy over websockets (docs/serving.md)."""

from __future__ import annotations

import argparse
import logging

from vla_ds.errors import ConfigError, run_command
from vla_ds.log import setup_logging

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="serve.py", description="Serve an exported policy to robots over websockets "
                                "(openpi's protocol: openpi-client's WebsocketClientPolicy works unchanged).")
    p.add_argument("--policy", required=True, help="exported policy directory (convert_checkpoint.py --to policy)")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to bind (default 127.0.0.1: this machine only; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--vl-model", "--vl_model", dest="vl_model", default=None,
                   help="base Qwen2.5-VL dir or hub id, when the training path is not available here")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None, help="backbone dtype (default: as trained)")
    p.add_argument("--ddim-steps", "--ddim_steps", dest="ddim_steps", type=int, default=None,
                   help="sampling steps: DDIM steps of a diffusion head, Euler steps of a flow-matching head "
                        "(default: the policy's num_inference_steps)")
    p.add_argument("--api-key", "--api_key", dest="api_key", default=None,
                   help="refuse clients that do not send 'Authorization: Api-Key KEY' (openpi-client's api_key)")
    p.add_argument("--max-batch-size", "--max_batch_size", dest="max_batch_size", type=int, default=8,
                   help="most requests per forward pass; requests that queue while the model is busy are "
                        "batched (default 8; 1 turns batching off)")
    p.add_argument("--batch-wait-ms", "--batch_wait_ms", dest="batch_wait_ms", type=float, default=0.0,
                   help="hold a batch's first request up to this long for others to join: more throughput with "
                        "many clients, up to this much added latency (default 0)")
    p.add_argument("--max-message-mb", "--max_message_mb", dest="max_message_mb", type=float, default=32.0,
                   help="refuse requests larger than this (default 32 MiB)")
    p.add_argument("--max-connections", "--max_connections", dest="max_connections", type=int, default=32,
                   help="refuse more simultaneous clients than this (HTTP 503; default 32)")
    p.add_argument("--views", nargs="+", default=None,
                   help="camera view names in training order, for a policy exported before vla_ds recorded them")
    return p


def make_server(args: argparse.Namespace):
    """The :class:`~vla_ds.serving.server.PolicyServer` the flags describe, with its policy loaded."""
    from vla_ds.models.policy import VLAPolicy
    from vla_ds.serving.server import PolicyServer, ServeConfig

    config = ServeConfig(host=args.host, port=args.port, api_key=args.api_key, max_batch_size=args.max_batch_size,
                         batch_wait_ms=args.batch_wait_ms, max_message_mb=args.max_message_mb,
                         max_connections=args.max_connections, ddim_steps=args.ddim_steps)
    policy = VLAPolicy.from_pretrained(args.policy, vl_model=args.vl_model, device=args.device, dtype=args.dtype)
    return PolicyServer(policy, config, views=args.views)


def run(args: argparse.Namespace) -> None:
    server = make_server(args)
    try:
        server.serve_forever()
    except OSError as e:  # the port is taken, the address is not ours, ...
        raise ConfigError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    logger.info("stopped")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    code, _ = run_command(run, args)
    return code
