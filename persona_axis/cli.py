"""`persona-axis` command line: a thin layer over the Python API.

Errors a user can cause print as one line on stderr and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

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


def _role_list(value: str | None) -> list[str] | None:
    return [name for name in (value or "").replace(",", " ").split() if name] or None


def cmd_run(args: argparse.Namespace) -> None:
    from persona_axis.catalog import load_catalog
    from persona_axis.judges import make_judge
    from persona_axis.models import load_model
    from persona_axis.pipeline import analyze_run, preset_settings, run_pipeline

    settings = preset_settings(args.preset, seed=args.seed, batch_size=args.batch_size,
                               max_new_tokens=args.max_new_tokens, min_score3=args.min_score3)
    catalog = load_catalog(args.catalog)
    judge = make_judge(args.judge, cache_dir=Path(args.out) / "judge_cache", url=args.judge_url,
                       model=args.judge_model, key_env=args.judge_key_env)
    lm = load_model(args.model, dtype=args.dtype)
    run_pipeline(args.out, lm, catalog, settings, judge, role_names=_role_list(args.roles), preset=args.preset,
                 progress=not args.no_progress)
    analysis = analyze_run(args.out)
    print(_headline(analysis))
    print(f"report: {Path(args.out) / 'report.html'}")


def _headline(analysis: dict) -> str:
    cos = analysis["cos_axis_pc1"]
    best = max(range(len(cos)), key=lambda i: cos[i])
    return (
        f"roles used {analysis['n_roles_used']} (dropped {len(analysis['roles_dropped'])}) | "
        f"PC1 explains {analysis['variance_explained'][0]:.1%} at layer {analysis['layer']} | "
        f"{analysis['n_components_70']} components reach 70% | cos(axis, PC1) {cos[analysis['layer']]:.2f} "
        f"(best {cos[best]:.2f} at layer {best})\n"
        f"Assistant end of the axis: {', '.join(analysis['axis_top'])}\n"
        f"far end of the axis:       {', '.join(analysis['axis_bottom'])}"
    )


def cmd_analyze(args: argparse.Namespace) -> None:
    from persona_axis.pipeline import analyze_run

    analysis = analyze_run(args.run, layer=args.layer, standardise=args.standardise)
    if args.json:
        print(json.dumps(analysis))
    else:
        print(_headline(analysis))
        print(f"report: {Path(args.run) / 'report.html'}")


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

    run = sub.add_parser("run", help="compute the Assistant Axis: rollouts, judge, role vectors, axis, report")
    model_options(run)
    run.add_argument("--out", required=True, help="run directory (created; an interrupted run resumes)")
    run.add_argument("--preset", default="quick", help="smoke, quick, standard or paper (default quick)")
    run.add_argument("--roles", help="only these roles (comma- or space-separated names)")
    run.add_argument("--catalog", help="a catalogue directory in our format (default: the built-in one)")
    run.add_argument("--judge", default="offline", help="offline (default) or openai")
    run.add_argument("--judge-url", help="base URL of an OpenAI-compatible API (openai judge)")
    run.add_argument("--judge-model", help="model name for the openai judge")
    run.add_argument("--judge-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    run.add_argument("--seed", type=int)
    run.add_argument("--batch-size", type=int)
    run.add_argument("--max-new-tokens", type=int)
    run.add_argument("--min-score3", type=int, help="score-3 answers a role needs to keep its vector")
    run.add_argument("--no-progress", action="store_true")
    run.set_defaults(func=cmd_run)

    analyze = sub.add_parser("analyze", help="persona-space analysis of a run: PCA, cosines, figures, report")
    analyze.add_argument("run", help="run directory")
    analyze.add_argument("--layer", type=int, help="layer for PCA and rankings (default: the middle layer)")
    analyze.add_argument("--standardise", action="store_true", help="scale each dimension to unit variance first")
    analyze.add_argument("--json", action="store_true", help="print one JSON object")
    analyze.set_defaults(func=cmd_analyze)

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
