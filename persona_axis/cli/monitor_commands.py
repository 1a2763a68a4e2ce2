"""Subcommands that watch conversations drift along the axis: monitor."""

from __future__ import annotations

import argparse
from dataclasses import asdict

from persona_axis.cli.options import axis_options, load_model_from, print_json


def cmd_monitor(args: argparse.Namespace) -> None:
    from persona_axis.axis import load_axis
    from persona_axis.control.monitor import plot_trajectory, project_conversation, project_windowed
    from persona_axis.conversations import read_conversations

    conversations = read_conversations(args.file)
    axis = load_axis(args.axis)
    lm = load_model_from(args)
    layers = list(range(axis.n_layers)) if args.all_layers else None
    results = [project_windowed(lm, axis, c, args.window, layers=layers, layer=args.layer) if args.window
               else project_conversation(lm, axis, c, layers=layers, layer=args.layer) for c in conversations]
    if args.plot:
        plot_trajectory(results, args.plot, threshold=args.threshold)
    if args.json:
        print_json({"conversations": [{**asdict(r), "metadata": c.metadata} for r, c in zip(results, conversations)]})
        return
    for result in results:
        print(f"=== {result.source} (projection on the axis at layer {result.layer}; higher = more Assistant-like)")
        for turn in result.turns:
            flag = "  <- below threshold" if args.threshold is not None and turn.projection < args.threshold else ""
            flag += f"  (window: {turn.dropped} earlier messages left out)" if turn.dropped else ""
            print(f"turn {turn.index:3d} {turn.role:9s} {turn.projection:+9.3f}  ({turn.n_tokens} tokens){flag}")
    if args.plot:
        print(f"trajectory plot: {args.plot}")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    monitor = sub.add_parser("monitor", help="per-turn projections of a conversation file (teacher-forced)")
    monitor.add_argument("file", help="a conversation: JSON list of messages, an object holding one, or JSONL")
    axis_options(monitor)
    monitor.add_argument("--layer", type=int, help="layer to report (default: the middle layer)")
    monitor.add_argument("--all-layers", action="store_true", help="also report every layer's projection")
    monitor.add_argument("--threshold", type=float, help="draw and flag this projection (e.g. a capping floor)")
    monitor.add_argument("--plot", help="write the trajectory plot (PNG) here")
    monitor.add_argument("--window", type=int, metavar="N",
                         help="for transcripts longer than the context: each turn sees the latest whole messages "
                              "that fit in N tokens (the system message kept), as `serve` does; without it a "
                              "transcript longer than the context is refused")
    monitor.add_argument("--json", action="store_true")
    monitor.set_defaults(func=cmd_monitor)
