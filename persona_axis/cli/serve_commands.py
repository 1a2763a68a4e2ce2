"""`persona-axis serve`: the OpenAI-compatible server with per-request capping and the live dashboard."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from persona_axis.cli.options import axis_options, load_model_from


def cmd_serve(args: argparse.Namespace) -> None:
    from persona_axis.apps.server import PersonaServer, ServerLimits, parse_guard
    from persona_axis.apps.server_access import API_KEY_ENV, ApiKeys, check_exposure
    from persona_axis.apps.server_http import HttpOptions
    from persona_axis.apps.server_run import serve_forever
    from persona_axis.axis import load_axis
    from persona_axis.control.capping import load_config
    from persona_axis.control.spec import run_defaults
    from persona_axis.errors import PersonaAxisError
    from persona_axis.store import RunLayout

    keys = ApiKeys.gather(args.api_key or (), os.environ.get(API_KEY_ENV), args.api_key_file)
    check_exposure(args.host, keys, args.allow_unauthenticated)  # before the model loads or anything is bound
    if args.axis is None:
        given = [flag for flag, value in (("--config", args.config), ("--guard", args.guard),
                                          ("--alert-below", args.alert_below)) if value is not None]
        if given:
            raise PersonaAxisError(f"{' and '.join(given)} need(s) --axis (a run or axis file of the served model)")
        axis, config, defaults = None, None, None
    else:
        axis = load_axis(args.axis)
        layout = RunLayout(args.axis)
        config_path = args.config or (layout.capping_json if layout.capping_json.exists() else None)
        config = load_config(config_path) if config_path is not None else None
        defaults = run_defaults(layout.root) if layout.vectors.is_file() else None
    lm = load_model_from(args)
    limits = ServerLimits(max_rows=args.max_batch, max_waiting=args.max_queue, timeout_s=args.timeout,
                          prefill_chunk=args.prefill_chunk, max_body=args.max_body, max_tokens=args.max_tokens_limit,
                          per_key=args.max_concurrent_per_key, read_timeout_s=args.read_timeout,
                          write_timeout_s=args.write_timeout)
    options = HttpOptions(keys, args.log_file or sys.stderr, args.alert_below, args.allow_unauthenticated)
    server = PersonaServer(lm, axis, config, limits, model_id=args.served_model_name, defaults=defaults,
                           guard=parse_guard(args.guard) if args.guard is not None else None)
    experiments = (", ".join(config.experiments) if config is not None else "none (no capping config)") \
        if axis is not None else "none (no --axis: plain chat completions)"
    access = f"{len(keys.digests)} API key(s)" if keys else "no API key"

    def announce(url: str) -> None:
        print(f"serving {lm.name} at {url}/v1 (dashboard: {url}/); capping experiments: {experiments}; {access}",
              file=sys.stderr, flush=True)

    serve_forever(server, args.host, args.port, announce, options, args.drain)


def _positive(kind: type[int] | type[float], zero: bool = False) -> Callable[[str], int | float]:
    """An argparse type: a number of `kind` above zero (or zero too)."""

    def parse(text: str) -> int | float:
        value = kind(text)
        if value < 0 or (value == 0 and not zero):
            raise argparse.ArgumentTypeError(f"must be {'>=' if zero else '>'} 0, not {text}")
        return value
    return parse


class _KnownDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Help that names each option's default, except where there is none to name (the help says what happens)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = sub.add_parser("serve", help="OpenAI-compatible chat server with per-request caps and a live dashboard",
                           formatter_class=_KnownDefaults)
    axis_options(serve, required=False, without="; without it the server answers plain chat completions (no caps, "
                 "steering or projections), e.g. as a --judge openai endpoint")
    serve.add_argument("--config", help="capping config whose experiments requests may name (default: "
                                        "<run>/capping.json when --axis is a run directory that has one)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on; one beyond loopback needs an API key "
                                                            "or --allow-unauthenticated")
    serve.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed at start)")
    serve.add_argument("--max-batch", type=int, default=16, help="requests decoded together")
    serve.add_argument("--max-queue", type=int, default=64, help="requests waiting for a row before HTTP 429")
    serve.add_argument("--timeout", type=float, default=300.0, help="seconds a request may take before HTTP 504")
    serve.add_argument("--prefill-chunk", type=int, default=256, metavar="TOKENS",
                       help="a longer prompt is prefilled this many tokens per step, so streaming replies keep going")
    serve.add_argument("--served-model-name", default="persona-axis", help="the model id /v1/models lists")
    access = serve.add_argument_group("access")
    access.add_argument("--api-key", action="append", metavar="KEY",
                        help="a key clients send as 'Authorization: Bearer KEY' on /v1/* and /metrics; repeatable, and "
                             "also read from $PERSONA_AXIS_API_KEY and --api-key-file")
    access.add_argument("--api-key-file", type=Path, metavar="PATH", help="a file of keys, one a line (# comments)")
    access.add_argument("--allow-unauthenticated", action="store_true",
                        help="serve an address beyond loopback without any key")
    limits = serve.add_argument_group("limits")
    limits.add_argument("--max-body", type=_positive(int), default=4 << 20, metavar="BYTES",
                        help="larger request bodies get HTTP 413, unread")
    limits.add_argument("--max-tokens-limit", type=_positive(int), metavar="N",
                        help="a request's max_tokens is cut to this; None: only the context limits it")
    limits.add_argument("--max-concurrent-per-key", type=_positive(int), metavar="N",
                        help="requests one key may have in flight before HTTP 429; None: no limit (without keys, all "
                             "clients count as one key)")
    limits.add_argument("--read-timeout", type=_positive(float), default=30.0, metavar="SECONDS",
                        help="a request body not received within this gets HTTP 408")
    limits.add_argument("--write-timeout", type=_positive(float), default=30.0, metavar="SECONDS",
                        help="a streamed reply whose client takes nothing for this long is cancelled")
    limits.add_argument("--drain", type=_positive(float, zero=True), default=30.0, metavar="SECONDS",
                        help="on SIGTERM, requests in flight get this long to finish before they are cancelled")
    ops = serve.add_argument_group("logs and alerts")
    ops.add_argument("--log-file", type=Path, metavar="PATH", help="append one JSON line per request here; None: stderr")
    ops.add_argument("--guard", metavar="BELOW[@LAYER]",
                     help="drift guard for requests that name a cap: the cap waits until the reply's running mean "
                          "projection (at LAYER, default the request's projection layer) falls below BELOW, then acts "
                          "for the rest of the reply and the conversation's later turns (default: caps act at once)")
    ops.add_argument("--alert-below", type=float, metavar="PROJECTION",
                     help="count a reply as a drift alert (metrics, log) when its running mean projection falls "
                          "below this (from its 4th token on)")
    serve.set_defaults(func=cmd_serve)
