"""Subcommand that measures a run's persona space against real conversations: real-chat."""

from __future__ import annotations

import argparse

from persona_axis.cli.options import load_model_from, model_options, print_json


def cmd_real_chat(args: argparse.Namespace) -> None:
    from persona_axis.build.real_chat import measure_real_chat

    lm = load_model_from(args, progress=not args.no_progress)
    result = measure_real_chat(args.run, lm, n=args.n, seed=args.seed, max_reply_tokens=args.max_reply_tokens,
                               batch_size=args.batch_size, progress=not args.no_progress)
    if args.json:
        print_json(result.to_json())
        return
    print(result.table())
    print(f"wrote {args.run}/real_chat.json (steer in its units with --steer COEFr@LAYER)")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    real_chat = sub.add_parser("real-chat", help="how much of real conversations' activation variance (ShareGPT, "
                                                 "teacher-forced) the run's persona PCs and axis explain, and their "
                                                 "activation norms (the unit of --steer COEFr@LAYER)")
    real_chat.add_argument("run", metavar="RUN", help="a finished run directory (role vectors and axis)")
    model_options(real_chat)
    real_chat.add_argument("--n", type=int, default=200, help="ShareGPT pairs to draw (default 200)")
    real_chat.add_argument("--seed", type=int, default=0, help="seed of the draw (default 0)")
    real_chat.add_argument("--max-reply-tokens", type=int, default=128,
                           help="teacher-force each reply's first N tokens (default 128)")
    real_chat.add_argument("--batch-size", type=int, default=4, help="pairs per forward pass (default 4)")
    real_chat.add_argument("--no-progress", action="store_true")
    real_chat.add_argument("--json", action="store_true", help="print real_chat.json's content as one JSON object")
    real_chat.set_defaults(func=cmd_real_chat)
