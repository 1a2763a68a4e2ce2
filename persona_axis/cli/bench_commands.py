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
        from persona_axis import benchmarks

        lm = load_model_from(args)
        measure = getattr(benchmarks, f"bench_{name}")
        _report(measure(lm, batch=args.batch, new_tokens=args.new_tokens, rounds=args.rounds), args.json)

    return run


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bench = sub.add_parser("bench", help="throughput benchmarks (ratios measured in one run)")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    for name, text in [("generate", "plain vs one-pass capture vs two-pass extraction"),
                       ("steer", "capping and steering overhead vs plain generation, and vs peer libraries"),
                       ("monitor", "live-monitor overhead; one-pass vs per-prefix conversation projection")]:
        p = bench_sub.add_parser(name, help=text)
        model_options(p)
        p.add_argument("--batch", type=int, default=16)
        p.add_argument("--new-tokens", type=int, default=128)
        p.add_argument("--rounds", type=int, default=3)
        p.add_argument("--json", action="store_true", help="print one JSON object")
        p.set_defaults(func=_bench(name))
    register_executor(bench_sub)


def cmd_bench_executor(args: argparse.Namespace) -> None:
    from persona_axis.executor_bench import bench_executor
    from persona_axis.ray_executor import ModelSpec

    model = ModelSpec(args.model, args.dtype, args.device, args.device_map)
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
