"""Subcommands that use an axis on a model: calibrate, chat, generate, sweep, steer-sweep."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from persona_axis.cli.options import (
    axis_options,
    intervention_options,
    judge_options,
    load_model_from,
    model_options,
    number_list,
    print_json,
)

if TYPE_CHECKING:
    from persona_axis.evals.stats import Estimate

LAYER_HELP = ("layer whose projection is reported (default: the middle layer, or the layer just below the "
              "interventions when they reach it); an intervened layer is refused")


def _layer_ranges(values: list[str]) -> list[range]:
    from persona_axis.control.capping import parse_layer_block

    return [parse_layer_block(value) for value in values]


def cmd_calibrate(args: argparse.Namespace) -> None:
    from persona_axis.axis import load_axis
    from persona_axis.build.pipeline import run_catalog
    from persona_axis.control.calibration import calibrate, engagement_samples, measure_engagement
    from persona_axis.control.capping import (
        DEFAULT_MEAN,
        default_layer_block,
        export_torch_config,
        parse_experiment_id,
        save_config,
    )
    from persona_axis.store import RunLayout

    axis = load_axis(args.run)
    blocks = _layer_ranges(args.layers) if args.layers else [default_layer_block(axis.n_layers)]
    floors = args.floor or ["percentile"]
    percentiles = args.percentile or ([0.25] if "percentile" in floors else [])
    config = calibrate(args.run, blocks, [*percentiles, *([DEFAULT_MEAN] if "default-mean" in floors else [])],
                       population=args.population)
    if not args.no_engagement:
        samples = engagement_samples(run_catalog(args.run), args.samples, 2 * args.samples)
        measure_engagement(load_model_from(args), config, samples, args.max_new_tokens,
                           progress=not args.json)
    out = Path(args.out) if args.out else RunLayout(args.run).capping
    save_config(config, out)
    if args.export_torch:
        export_torch_config(config, args.export_torch)
    if args.json:
        print_json({"config": str(out.with_suffix(".json")), "population": config.population,
                    "experiments": [{"id": e.id, "floor": parse_experiment_id(e.id)[2],
                                     "caps": [{"layer": c.layer, "tau": c.floor, **c.stats} for c in e.caps]}
                                    for e in config.experiments.values()]})
        return
    print(f"population {config.population}; percentile = the default mean's rank in it; "
          "engagement = share of generated tokens a cap raised")
    for experiment in config.experiments.values():
        print(experiment.id)
        for c in experiment.caps:
            engaged = (f"  engaged: default {c.stats['engaged_default']:.1%}, role-play {c.stats['engaged_roles']:.1%}"
                       if "engaged_roles" in c.stats else "")
            print(f"  layer {c.layer}: tau {c.floor:+.2f}  default mean {c.stats['default_mean']:+.2f} "
                  f"(percentile {c.stats['default_percentile']:.1%}){engaged}")
    print(f"capping config: {out.with_suffix('.json')} (+ .safetensors)")


def _session_parts(args: argparse.Namespace) -> tuple[Any, Any, dict[int, list[Any]]]:
    from persona_axis.axis import load_axis
    from persona_axis.control.spec import load_interventions

    axis = load_axis(args.axis)
    lm = load_model_from(args)
    return lm, axis, load_interventions(lm, axis, args.axis, args.config, args.cap, args.steer, args.ablate)


def _describe(reply: Any) -> str:
    engaged = ", ".join(f"L{k} {v:.0%}" for k, v in sorted(reply.engaged.items()))
    return (f"[projection at layer {reply.layer}: {reply.projection:+.2f} | {reply.n_tokens} tokens"
            + (f" | cap raised {engaged} of tokens" if engaged else "") + "]")


def _live_readout(tty: bool) -> Any:
    """A token callback that prints each token as it comes; on a terminal, a readout of the running mean
    projection and whether the cap acted on the token sits just after the cursor (the next token overwrites it)."""
    seen: list[float] = []

    def on_token(event: Any) -> None:
        sys.stdout.write(event.text)
        if tty and event.projection is not None:
            seen.append(event.projection)
            cap = f", cap acting at L{','.join(map(str, event.capped_layers))}" if event.capped_layers else ""
            sys.stdout.write(f"\x1b7\x1b[2m  [running projection {sum(seen) / len(seen):+.2f}{cap}]\x1b[0m\x1b[K\x1b8")
        sys.stdout.flush()

    return on_token


def cmd_chat(args: argparse.Namespace) -> None:
    from persona_axis.apps.chat import ChatSession
    from persona_axis.control.spec import describe_interventions
    from persona_axis.errors import PersonaAxisError

    lm, axis, interventions = _session_parts(args)
    session = ChatSession(lm, axis, interventions, system=args.system or "", max_new_tokens=args.max_new_tokens,
                          layer=args.layer)
    print(f"chatting with {lm.name}, {describe_interventions(interventions)}"
          + (f" by {args.cap}" if args.cap else "") + f"; projections read at layer {session.layer}"
          + ". An empty line or Ctrl-D ends the chat.", file=sys.stderr)
    for line in sys.stdin:
        if not line.strip():
            break
        print("assistant: ", end="", flush=True)
        try:
            reply = session.stream(line.rstrip("\n"), _live_readout(sys.stdout.isatty()))
        except PersonaAxisError as exc:
            print(f"\nerror: {exc}", file=sys.stderr)
            continue
        print(("\x1b[K" if sys.stdout.isatty() else "") + f"\n{_describe(reply)}", flush=True)


def cmd_generate(args: argparse.Namespace) -> None:
    from persona_axis.apps.chat import reply_variants
    from persona_axis.conversations import read_conversations
    from persona_axis.errors import PersonaAxisError

    conversations = read_conversations(args.file, need_assistant=False)
    for conversation in conversations:
        if conversation.messages[-1]["role"] != "user":
            raise PersonaAxisError(f"{conversation.source}: the last message must be the user's, to generate a reply")
    lm, axis, interventions = _session_parts(args)
    layer, variants = reply_variants(lm, axis, [c.messages for c in conversations], interventions, args.layer,
                                     args.compare, max_new_tokens=args.max_new_tokens)
    rows = [{"source": c.source, **c.metadata, **{name: {"reply": r[i].text, "projection": r[i].projection,
                                                         "projections": r[i].projections, "cap_engaged": r[i].engaged}
                                                  for name, r in variants.items()}}
            for i, c in enumerate(conversations)]
    if args.json:
        print_json({"layer": layer, "variants": list(variants), "conversations": rows})
        return
    for row in rows:
        print(f"=== {row['source']}")
        for name in variants:
            print(f"--- {name} (projection at layer {layer}: {row[name]['projection']:+.2f})\n{row[name]['reply'].strip()}")


def cmd_sweep(args: argparse.Namespace) -> None:
    from persona_axis.axis import load_axis
    from persona_axis.catalog import load_catalog, role_play_conversations
    from persona_axis.control.sweeps import candidate_blocks, pareto_front, sweep

    axis = load_axis(args.run)
    blocks = _layer_ranges(args.blocks) if args.blocks else candidate_blocks(axis.n_layers)
    lm = load_model_from(args)
    catalog = load_catalog()
    roles = [c for _, c in role_play_conversations(catalog, args.roles, 1)]
    defaults = [[{"role": "user", "content": q.text}] for q in catalog.questions[: args.roles]]
    rows = sweep(lm, axis, args.run, blocks, args.percentiles, roles, defaults, args.max_new_tokens, progress=True)
    front = pareto_front(rows)
    if args.json:
        print_json({"experiments": [r.to_json() for r in rows], "pareto_front": [r.id for r in front]})
        return
    for row in rows:
        mark = "*" if row in front else " "
        print(f"{mark} {row.id:24s} role_shift {row.role_shift:+8.3f} (at layer {row.measured_layer})"
              f"   default_kl {row.default_kl:.5f}")
    print("* = on the Pareto front (moves role-play toward the Assistant most for the least change to default replies)")


def cmd_steer_sweep(args: argparse.Namespace) -> None:
    from persona_axis.axis import load_axis
    from persona_axis.catalog import load_catalog
    from persona_axis.control.spec import default_norms
    from persona_axis.control.sweeps import steer_sweep
    from persona_axis.errors import PersonaAxisError
    from persona_axis.judges import make_judge

    if args.relative and not Path(args.axis).is_dir():
        raise PersonaAxisError("--relative scales coefs by the run's default activation norms: "
                               "give --axis as a run directory")
    axis = load_axis(args.axis)
    lm = load_model_from(args)
    judge = make_judge(args.judge, url=args.judge_url, model=args.judge_model, key_env=args.judge_key_env)
    layer = axis.layer_or_middle(args.layer)
    report = steer_sweep(lm, axis, load_catalog(), judge, layer, args.coefs, n_roles=args.roles,
                         n_questions=args.questions, max_new_tokens=args.max_new_tokens, progress=True,
                         norms=default_norms(args.axis) if args.relative else None)
    if args.json:
        print_json({"judge": judge.id, "relative": args.relative, **report.to_json()})
        return
    unit = "the default activation norm" if args.relative else "the axis length"
    print(f"steered layer {report.layer}, coef in units of {unit} ({report.unit_length:.3f}; negative = away "
          f"from the Assistant); judge {judge.id}; projections read at layer {report.measured_layer}")
    for row in report.rows:
        s = row.scores
        score = "n/a" if row.mean_score is None else f"{row.mean_score:.2f}"
        change = "" if row.in_role_change is None else f"  vs coef 0 {_share(row.in_role_change, signed=True)}"
        print(f"coef {row.coef:+6.2f}  scores 0:{s['0']:3d} 1:{s['1']:3d} 2:{s['2']:3d} 3:{s['3']:3d}"
              f"  in role {_share(row.in_role)}{change}  mean score {score}  mean projection {row.mean_projection:+.2f}")
    print("in role = share of scored replies scored 3, [95 % interval resampling roles]")


def _share(estimate: Estimate, signed: bool = False) -> str:
    """'0.25 [0.10, 0.40]' (signed: '+0.05 [-0.10, +0.20]'); 'n/a' when undefined."""
    if estimate.value is None or estimate.low is None or estimate.high is None:
        return "n/a"
    form = "+.2f" if signed else ".2f"
    return f"{estimate.value:{form}} [{estimate.low:{form}}, {estimate.high:{form}}]"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    calibrate = sub.add_parser("calibrate", help="capping floors from a run's projection percentiles")
    calibrate.add_argument("run", help="run directory")
    calibrate.add_argument("--layers", action="append", metavar="A:B",
                           help="half-open layer block (repeatable; default: a middle-to-late block)")
    calibrate.add_argument("--percentile", type=float, action="append", metavar="P",
                           help="percentile in (0, 1) (repeatable; default 0.25 unless --floor default-mean alone)")
    calibrate.add_argument("--floor", action="append", choices=["percentile", "default-mean"],
                           help="floor kinds (repeatable; default percentile): default-mean adds an experiment "
                                "layers_A:B-mean with each floor at the mean default-Assistant projection")
    calibrate.add_argument("--population", default="roles+traits",
                           help="roles+traits (default, as published), all, roles, traits, default or roles_score3")
    calibrate.add_argument("--out", help="config path stem (default: <run>/capping)")
    calibrate.add_argument("--export-torch", metavar="PATH", help="also write the torch-file structure")
    model_options(calibrate)
    calibrate.add_argument("--no-engagement", action="store_true",
                           help="skip generating samples with the caps on to measure how often they engage")
    calibrate.add_argument("--samples", type=int, default=8,
                           help="default replies generated per experiment (role-play replies: twice as many)")
    calibrate.add_argument("--max-new-tokens", type=int, default=48)
    calibrate.add_argument("--json", action="store_true")
    calibrate.set_defaults(func=cmd_calibrate)

    chat = sub.add_parser("chat", help="interactive chat showing each reply's projection and cap engagement")
    axis_options(chat)
    intervention_options(chat)
    chat.add_argument("--system", help="system prompt")
    chat.add_argument("--layer", type=int, help=LAYER_HELP)
    chat.add_argument("--max-new-tokens", type=int, default=256)
    chat.set_defaults(func=cmd_chat)

    gen = sub.add_parser("generate", help="replies for conversations in a JSON/JSONL file, with projections")
    gen.add_argument("file", help="conversations ending with a user message")
    axis_options(gen)
    intervention_options(gen)
    gen.add_argument("--compare", action="store_true",
                     help="also generate without interventions ('plain'), side by side")
    gen.add_argument("--layer", type=int, help=LAYER_HELP)
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--json", action="store_true")
    gen.set_defaults(func=cmd_generate)

    sweep = sub.add_parser("sweep", help="score capping experiments (layer blocks x percentiles); Pareto front")
    sweep.add_argument("run", help="run directory (axis and calibration data)")
    model_options(sweep)
    sweep.add_argument("--blocks", action="append", metavar="A:B",
                       help="half-open layer block to cap (repeatable; default: the default block and the blocks "
                            "a quarter of the model earlier and later); its effect is read at layer B, or A-1 "
                            "when B is past the last layer")
    sweep.add_argument("--percentiles", type=number_list, default=[0.1, 0.25, 0.5])
    sweep.add_argument("--roles", type=int, default=8, help="role-play (and default) prompts to test with")
    sweep.add_argument("--max-new-tokens", type=int, default=32)
    sweep.add_argument("--json", action="store_true")
    sweep.set_defaults(func=cmd_sweep)

    steer = sub.add_parser("steer-sweep", help="add the axis with several coefficients; judge role adoption")
    axis_options(steer)
    judge_options(steer)
    steer.add_argument("--layer", type=int, help="layer to steer at (default: the middle layer); projections are "
                                                  "read just below it (or just above when it is layer 0)")
    steer.add_argument("--coefs", type=number_list, default=[-1.0, -0.5, 0.0, 0.5, 1.0],
                       help="comma-separated coefficients, in units of the axis length (default) or of the default "
                            "activation norm with --relative")
    steer.add_argument("--relative", action="store_true",
                       help="coef x (norm of the run's mean default-Assistant activation at the layer) x unit axis; "
                            "needs --axis to be a run directory")
    steer.add_argument("--roles", type=int, default=12)
    steer.add_argument("--questions", type=int, default=2)
    steer.add_argument("--max-new-tokens", type=int, default=48)
    steer.add_argument("--json", action="store_true")
    steer.set_defaults(func=cmd_steer_sweep)
