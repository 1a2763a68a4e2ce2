"""Subcommands that use an axis on a model: calibrate, chat, generate, sweep, steer-sweep."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from persona_axis.cli.options import (
    axis_options,
    intervention_options,
    judge_options,
    model_options,
    number_list,
    print_json,
)


def _layer_ranges(values: list[str]) -> list[range]:
    from persona_axis.capping import parse_experiment_id

    ranges = []
    for value in values:
        start, stop, _ = parse_experiment_id(f"layers_{value}-p0.5")
        ranges.append(range(start, stop))
    return ranges


def cmd_calibrate(args: argparse.Namespace) -> None:
    from persona_axis.axis import load_axis
    from persona_axis.capping import calibrate, default_layer_block, export_torch_config, save_config

    axis = load_axis(args.run)
    blocks = _layer_ranges(args.layers) if args.layers else [default_layer_block(axis.n_layers)]
    config = calibrate(args.run, blocks, args.percentile or [0.25], population=args.population)
    out = Path(args.out) if args.out else Path(args.run) / "capping"
    save_config(config, out)
    if args.export_torch:
        export_torch_config(config, args.export_torch)
    for experiment in config.experiments.values():
        floors = ", ".join(f"{c.layer}: {c.floor:.2f}" for c in experiment.caps)
        print(f"{experiment.id}  floors {{{floors}}}")
    print(f"capping config: {out.with_suffix('.json')} (+ .safetensors)")


def _session_parts(args: argparse.Namespace) -> tuple[Any, Any, dict[int, list[Any]]]:
    from persona_axis.axis import load_axis
    from persona_axis.capping import load_config
    from persona_axis.chat import build_interventions
    from persona_axis.models import load_model

    axis = load_axis(args.axis)
    config = None
    if args.cap:
        path = args.config or (Path(args.axis) / "capping" if Path(args.axis).is_dir() else None)
        config = load_config(path) if path else None
    lm = load_model(args.model, dtype=args.dtype)
    return lm, axis, build_interventions(lm, axis, config, args.cap, args.steer)


def _describe(reply: Any, layer: int) -> str:
    engaged = ", ".join(f"L{k} {v:.0%}" for k, v in sorted(reply.engaged.items()))
    return (f"[projection at layer {layer}: {reply.projections[layer]:+.2f} | {reply.n_tokens} tokens"
            + (f" | cap raised {engaged} of tokens" if engaged else "") + "]")


def cmd_chat(args: argparse.Namespace) -> None:
    from persona_axis.chat import ChatSession
    from persona_axis.errors import PersonaAxisError

    lm, axis, interventions = _session_parts(args)
    layer = axis.layer_or_middle(args.layer)
    session = ChatSession(lm, axis, interventions, system=args.system or "", max_new_tokens=args.max_new_tokens)
    print(f"chatting with {lm.name}" + (f", capped by {args.cap}" if args.cap else "")
          + ". An empty line or Ctrl-D ends the chat.", file=sys.stderr)
    for line in sys.stdin:
        if not line.strip():
            break
        try:
            reply = session.say(line.rstrip("\n"))
        except PersonaAxisError as exc:
            print(f"error: {exc}", file=sys.stderr)
            continue
        print(f"assistant: {reply.text.strip()}\n{_describe(reply, layer)}", flush=True)


def cmd_generate(args: argparse.Namespace) -> None:
    from persona_axis.chat import reply_batch
    from persona_axis.errors import PersonaAxisError
    from persona_axis.monitor import read_conversations

    conversations = read_conversations(args.file, need_assistant=False)
    for conversation in conversations:
        if conversation.messages[-1]["role"] != "user":
            raise PersonaAxisError(f"{conversation.source}: the last message must be the user's, to generate a reply")
    lm, axis, interventions = _session_parts(args)
    layer = axis.layer_or_middle(args.layer)
    messages = [c.messages for c in conversations]
    options = {"max_new_tokens": args.max_new_tokens}
    variants = {"capped": reply_batch(lm, axis, messages, interventions, **options)}
    if args.compare or not interventions:
        variants = {"uncapped": reply_batch(lm, axis, messages, {}, **options), **(variants if interventions else {})}
    rows = [{"source": c.source, **c.metadata, **{name: {"reply": r[i].text, "projection": r[i].projections[layer],
                                                         "projections": r[i].projections, "cap_engaged": r[i].engaged}
                                                  for name, r in variants.items()}}
            for i, c in enumerate(conversations)]
    if args.json:
        print_json({"layer": layer, "conversations": rows})
        return
    for row in rows:
        print(f"=== {row['source']}")
        for name in variants:
            print(f"--- {name} (projection at layer {layer}: {row[name]['projection']:+.2f})\n{row[name]['reply'].strip()}")


def cmd_sweep(args: argparse.Namespace) -> None:
    from persona_axis.axis import load_axis
    from persona_axis.capping import default_layer_block
    from persona_axis.catalog import load_catalog
    from persona_axis.models import load_model
    from persona_axis.sweeps import pareto_front, role_play_conversations, sweep

    axis = load_axis(args.run)
    lm = load_model(args.model, dtype=args.dtype)
    blocks = _layer_ranges(args.blocks) if args.blocks else _candidate_blocks(axis.n_layers, default_layer_block)
    catalog = load_catalog()
    roles = [c for _, c in role_play_conversations(catalog, args.roles, 1)]
    defaults = [[{"role": "user", "content": q.text}] for q in catalog.questions[: args.roles]]
    rows = sweep(lm, axis, args.run, blocks, args.percentiles, roles, defaults, args.max_new_tokens, progress=True)
    front = pareto_front(rows)
    if args.json:
        print_json({"experiments": rows, "pareto_front": [r["id"] for r in front]})
        return
    for row in rows:
        mark = "*" if row in front else " "
        print(f"{mark} {row['id']:24s} role_shift {row['role_shift']:+8.3f}   default_kl {row['default_kl']:.5f}")
    print("* = on the Pareto front (moves role-play toward the Assistant most for the least change to default replies)")


def _candidate_blocks(n_layers: int, default_block: Any) -> list[range]:
    """The default block and the same-size blocks a quarter of the model earlier and later."""
    block = default_block(n_layers)
    shift = max(1, n_layers // 4)
    starts = sorted({max(0, block.start - shift), block.start, min(n_layers - len(block), block.start + shift)})
    return [range(s, s + len(block)) for s in starts]


def cmd_steer_sweep(args: argparse.Namespace) -> None:
    from persona_axis.axis import load_axis
    from persona_axis.catalog import load_catalog
    from persona_axis.judges import make_judge
    from persona_axis.models import load_model
    from persona_axis.sweeps import steer_sweep

    axis = load_axis(args.axis)
    lm = load_model(args.model, dtype=args.dtype)
    judge = make_judge(args.judge, url=args.judge_url, model=args.judge_model, key_env=args.judge_key_env)
    layer = axis.layer_or_middle(args.layer)
    rows = steer_sweep(lm, axis, load_catalog(), judge, layer, args.coefs, n_roles=args.roles,
                       n_questions=args.questions, max_new_tokens=args.max_new_tokens, progress=True)
    if args.json:
        print_json({"layer": layer, "judge": judge.id, "rows": rows})
        return
    print(f"layer {layer}, judge {judge.id}; coef in units of the axis length (negative = away from the Assistant)")
    for row in rows:
        s = row["scores"]
        print(f"coef {row['coef']:+6.2f}  scores 0:{s['0']:3d} 1:{s['1']:3d} 2:{s['2']:3d} 3:{s['3']:3d}"
              f"  mean score {row['mean_score']}  mean projection {row['mean_projection']:+.2f}")


def register(sub: argparse._SubParsersAction) -> None:
    calibrate = sub.add_parser("calibrate", help="capping floors from a run's projection percentiles")
    calibrate.add_argument("run", help="run directory")
    calibrate.add_argument("--layers", action="append", metavar="A:B",
                           help="half-open layer block (repeatable; default: a middle-to-late block)")
    calibrate.add_argument("--percentile", type=float, action="append", metavar="P",
                           help="percentile in (0, 1) (repeatable; default 0.25)")
    calibrate.add_argument("--population", default="all", help="all, roles, default or roles_score3")
    calibrate.add_argument("--out", help="config path stem (default: <run>/capping)")
    calibrate.add_argument("--export-torch", metavar="PATH", help="also write the torch-file structure")
    calibrate.set_defaults(func=cmd_calibrate)

    chat = sub.add_parser("chat", help="interactive chat showing each reply's projection and cap engagement")
    axis_options(chat)
    intervention_options(chat)
    chat.add_argument("--system", help="system prompt")
    chat.add_argument("--layer", type=int, help="layer whose projection is shown (default: the middle layer)")
    chat.add_argument("--max-new-tokens", type=int, default=256)
    chat.set_defaults(func=cmd_chat)

    gen = sub.add_parser("generate", help="replies for conversations in a JSON/JSONL file, with projections")
    gen.add_argument("file", help="conversations ending with a user message")
    axis_options(gen)
    intervention_options(gen)
    gen.add_argument("--compare", action="store_true", help="also generate without interventions, side by side")
    gen.add_argument("--layer", type=int)
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--json", action="store_true")
    gen.set_defaults(func=cmd_generate)

    sweep = sub.add_parser("sweep", help="score capping experiments (layer blocks x percentiles); Pareto front")
    sweep.add_argument("run", help="run directory (axis and calibration data)")
    model_options(sweep)
    sweep.add_argument("--blocks", action="append", metavar="A:B")
    sweep.add_argument("--percentiles", type=number_list, default=[0.1, 0.25, 0.5])
    sweep.add_argument("--roles", type=int, default=8, help="role-play (and default) prompts to test with")
    sweep.add_argument("--max-new-tokens", type=int, default=32)
    sweep.add_argument("--json", action="store_true")
    sweep.set_defaults(func=cmd_sweep)

    steer = sub.add_parser("steer-sweep", help="add the axis with several coefficients; judge role adoption")
    axis_options(steer)
    judge_options(steer)
    steer.add_argument("--layer", type=int)
    steer.add_argument("--coefs", type=number_list, default=[-1.0, -0.5, 0.0, 0.5, 1.0])
    steer.add_argument("--roles", type=int, default=12)
    steer.add_argument("--questions", type=int, default=2)
    steer.add_argument("--max-new-tokens", type=int, default=48)
    steer.add_argument("--json", action="store_true")
    steer.set_defaults(func=cmd_steer_sweep)
