"""`persona-axis bench ...`: throughput measured in one run, printed as ratios."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from persona_axis.cli.options import load_model_from, model_options, print_json


def _report(report: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(report)
        return
    for key, value in report.items():
        print(f"{key:36s} {value}")


def _bench(name: str) -> Callable[[argparse.Namespace], None]:
    def run(args: argparse.Namespace) -> None:
        from persona_axis.bench import throughput as benchmarks
        from persona_axis.model.loading import gguf_file

        lm = load_model_from(args)
        measure = getattr(benchmarks, f"bench_{name}")
        peer = {"peer_gguf": gguf_file(args.model)} if name == "generate" else {}
        _report(measure(lm, batch=args.batch, new_tokens=args.new_tokens, rounds=args.rounds, **peer), args.json)

    return run


def _bench_serve(args: argparse.Namespace) -> None:
    from persona_axis.apps.server import parse_guard
    from persona_axis.axis import load_axis
    from persona_axis.bench.serve import bench_serve
    from persona_axis.control.capping import load_config
    from persona_axis.errors import PersonaAxisError
    from persona_axis.evals.guard import PRESETS, guard_vs_always

    guard = parse_guard(args.guard) if args.guard is not None else None
    if args.guard_eval is not None and (args.axis is None or args.config is None):
        raise PersonaAxisError("--guard-eval compares a real cap with its guard: give --axis RUN and --config")
    if args.no_load and args.guard_eval is None:
        raise PersonaAxisError("--no-load leaves nothing to measure without --guard-eval")
    lm = load_model_from(args)
    axis = load_axis(args.axis) if args.axis else None
    config = load_config(args.config) if args.config else None
    report = {} if args.no_load else bench_serve(lm, axis, config, clients=args.clients,
                                                 requests_per_client=args.requests, new_tokens=args.new_tokens)
    if args.guard_eval is not None:
        assert axis is not None and config is not None
        found = guard_vs_always(lm, axis, next(iter(config.experiments.values())), PRESETS[args.guard_eval],
                                threshold=None if guard is None else guard.below, run_dir=args.axis,
                                layer=None if guard is None else guard.layer, out=args.guard_out,
                                progress=not args.json)
        report.update({key: value for key, value in found.items() if key.startswith("guard_vs_always")})
        report["guard_eval"] = found
    _report(report, args.json)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bench = sub.add_parser("bench", help="throughput benchmarks (ratios measured in one run)")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    for name, text in [("generate", "plain vs one-pass capture vs two-pass extraction; batch 1, int8 path, llama.cpp peer"),
                       ("steer", "capping and steering overhead vs plain generation, and vs peer libraries"),
                       ("monitor", "live-monitor overhead; one-pass vs per-prefix conversation projection")]:
        p = bench_sub.add_parser(name, help=text)
        model_options(p)
        p.add_argument("--batch", type=int, default=16)
        p.add_argument("--new-tokens", type=int, default=128)
        p.add_argument("--rounds", type=int, default=3)
        p.add_argument("--json", action="store_true", help="print one JSON object")
        p.set_defaults(func=_bench(name))
    serve = bench_sub.add_parser("serve", help="load test of `serve` on 127.0.0.1 (1, 4, 16 clients) vs offline generate")
    model_options(serve)
    serve.add_argument("--axis", help="axis file or run (default: a random axis; speed does not depend on it)")
    serve.add_argument("--config", help="capping config for the capped requests (with --axis; default: synthetic caps)")
    serve.add_argument("--clients", type=lambda v: [int(x) for x in v.split(",")], default=[1, 4, 16],
                       help="comma-separated concurrent client counts")
    serve.add_argument("--requests", type=int, default=2, help="streamed requests each client sends in turn")
    serve.add_argument("--new-tokens", type=int, default=64, help="tokens per reply (end-of-turn ignored)")
    serve.add_argument("--guard-eval", choices=["smoke", "standard"],
                       help="also compare the config's first cap always on with its drift guard: benign cost (KL, "
                            "over-refusal, IFBench) and lift of the lowest-decile turns of simulated conversations "
                            "(evals/guard.py; needs --axis RUN and --config)")
    serve.add_argument("--guard", metavar="BELOW[@LAYER]",
                       help="the guard's threshold (default: halfway down the axis at the layer the simulations read)")
    serve.add_argument("--guard-out", metavar="DIR", help="save the guard comparison's simulations here (resumable)")
    serve.add_argument("--no-load", action="store_true", help="skip the load test (with --guard-eval)")
    serve.add_argument("--json", action="store_true", help="print one JSON object")
    serve.set_defaults(func=_bench_serve)

    fidelity = bench_sub.add_parser("fast-path", help="how far the int8 fast path moves a finished run's axis "
                                                      "(its replies fed through exact and int8 models)")
    fidelity.add_argument("run", help="a finished run directory (its role vectors, rollouts and scores)")
    model_options(fidelity)
    fidelity.add_argument("--json", action="store_true", help="print one JSON object")
    fidelity.set_defaults(func=_fidelity)

    register_executor(bench_sub)


def _fidelity(args: argparse.Namespace) -> None:
    from persona_axis.bench.int8_fidelity import fast_path_fidelity

    lm = load_model_from(args)
    _report(fast_path_fidelity(lm, args.run), args.json)


def cmd_bench_executor(args: argparse.Namespace) -> None:
    from persona_axis.bench.executor import bench_executor
    from persona_axis.build.ray_executor import ModelSpec

    model = ModelSpec(args.model, args.dtype, args.device, args.device_map, args.fast_path)
    _report(bench_executor(model, threads=args.threads, replies=args.replies, address=args.ray_address), args.json)


def register_executor(bench_sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = bench_sub.add_parser("executor", help="the quick plan's rollouts: local vs Ray (one actor; N one-thread actors)")
    model_options(p)
    p.add_argument("--threads", type=int, default=2, help="threads of the local run and of the one Ray actor; also the "
                                                          "number of one-thread actors (default 2)")
    p.add_argument("--replies", type=int, help="only the quick plan's first N rollouts (a short check; default all)")
    p.add_argument("--ray-address", help="auto or HOST:PORT (default: a local Ray with --threads CPUs)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_bench_executor)
