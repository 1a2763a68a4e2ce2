"""`persona-axis serve`: the OpenAI-compatible server with per-request capping and the live dashboard."""

from __future__ import annotations

import argparse
import sys

from persona_axis.cli.options import axis_options, load_model_from


def cmd_serve(args: argparse.Namespace) -> None:
    from persona_axis.axis import load_axis
    from persona_axis.capping import load_config
    from persona_axis.intervention_spec import run_defaults
    from persona_axis.server import PersonaServer, ServerLimits, serve_forever
    from persona_axis.store import RunLayout

    axis = load_axis(args.axis)
    default_config = RunLayout(args.axis).capping_json
    config_path = args.config or (default_config if default_config.exists() else None)
    config = load_config(config_path) if config_path is not None else None
    lm = load_model_from(args)
    limits = ServerLimits(max_rows=args.max_batch, max_waiting=args.max_queue, timeout_s=args.timeout,
                          prefill_chunk=args.prefill_chunk)
    layout = RunLayout(args.axis)
    defaults = run_defaults(layout.root) if layout.vectors.is_file() else None
    server = PersonaServer(lm, axis, config, limits, model_id=args.served_model_name, defaults=defaults)
    experiments = ", ".join(config.experiments) if config is not None else "none (no capping config)"

    def announce(url: str) -> None:
        print(f"serving {lm.name} at {url}/v1 (dashboard: {url}/); capping experiments: {experiments}",
              file=sys.stderr, flush=True)

    serve_forever(server, args.host, args.port, announce)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = sub.add_parser("serve", help="OpenAI-compatible chat server with per-request caps and a live dashboard",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    axis_options(serve)
    serve.add_argument("--config", help="capping config whose experiments requests may name (default: "
                                        "<run>/capping.json when --axis is a run directory that has one)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (the server has no authentication yet)")
    serve.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed at start)")
    serve.add_argument("--max-batch", type=int, default=16, help="requests decoded together")
    serve.add_argument("--max-queue", type=int, default=64, help="requests waiting for a row before HTTP 429")
    serve.add_argument("--timeout", type=float, default=300.0, help="seconds a request may take before HTTP 504")
    serve.add_argument("--prefill-chunk", type=int, default=256, metavar="TOKENS",
                       help="a longer prompt is prefilled this many tokens per step, so streaming replies keep going")
    serve.add_argument("--served-model-name", default="persona-axis", help="the model id /v1/models lists")
    serve.set_defaults(func=cmd_serve)
