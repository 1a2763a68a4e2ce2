"""`persona-axis` command line: a thin layer over the Python API.

Errors a user can cause print as one line on stderr and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from persona_axis.errors import PersonaAxisError

DEMO_CHARACTERS = {
    "default Assistant": "",
    "pirate captain": "You are Captain Marrow, a weathered pirate who has sailed the southern seas for forty years. "
    "Speak as yourself, in first person, always.",
    "ancient dragon": "You are an ancient dragon who has slept beneath the mountain for a thousand years and "
    "guards a hoard of gold. Speak as yourself, in first person, always.",
}
DEMO_QUESTION = "Who are you, and what matters most to you?"


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as hf_logging

    hub_logging.set_verbosity_error()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def cmd_demo(args: argparse.Namespace) -> None:
    from persona_axis.generation import generate
    from persona_axis.models import load_model

    lm = load_model(args.model, dtype=args.dtype)
    print(f"model: {lm.name} | {lm.n_layers} layers | hidden {lm.hidden_size} | {lm.dtype}")
    conversations = [
        [{"role": "system", "content": system}, {"role": "user", "content": DEMO_QUESTION}]
        for system in DEMO_CHARACTERS.values()
    ]
    result = generate(lm, conversations, max_new_tokens=args.max_new_tokens, seed=args.seed)
    assert result.means is not None
    for name, text, means in zip(DEMO_CHARACTERS, result.texts, result.means):
        norms = " ".join(f"{v:.0f}" for v in means.norm(dim=-1).tolist())
        print(f"\n=== {name} ===\n{text.strip()}\nper-layer activation norm (layers 0..{lm.n_layers - 1}): {norms}")


def cmd_bench_generate(args: argparse.Namespace) -> None:
    from persona_axis.benchmarks import bench_generate
    from persona_axis.models import load_model

    lm = load_model(args.model, dtype=args.dtype)
    report = bench_generate(lm, batch=args.batch, new_tokens=args.new_tokens, rounds=args.rounds)
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key:32s} {value}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="persona-axis", description="Find, monitor and cap the Assistant Axis.")
    sub = parser.add_subparsers(dest="command", required=True)

    def model_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", default="default", help="'default', a .gguf file, a model directory or a hub id")
        p.add_argument("--dtype", default="auto", help="auto (bf16 where fast), float32, bfloat16 or float16")

    demo = sub.add_parser("demo", help="generate as the default Assistant and two characters; print activation norms")
    model_options(demo)
    demo.add_argument("--max-new-tokens", type=int, default=64)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo)

    bench = sub.add_parser("bench", help="throughput benchmarks (ratios measured in one run)")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    gen = bench_sub.add_parser("generate", help="plain vs one-pass capture vs two-pass extraction")
    model_options(gen)
    gen.add_argument("--batch", type=int, default=16)
    gen.add_argument("--new-tokens", type=int, default=128)
    gen.add_argument("--rounds", type=int, default=3)
    gen.add_argument("--json", action="store_true", help="print one JSON object")
    gen.set_defaults(func=cmd_bench_generate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        args.func(args)
    except PersonaAxisError as exc:
        print(f"persona-axis: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("persona-axis: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
