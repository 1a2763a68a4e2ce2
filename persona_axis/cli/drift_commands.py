"""Subcommands for drift in simulated conversations: simulate, drift-report."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from persona_axis.cli.options import axis_options, executor_from, executor_options, intervention_options, print_json


def _user_spec(args: argparse.Namespace) -> Any:
    """The simulated user the options describe: an OpenAI-compatible endpoint, or a local model (default: the target)."""
    from persona_axis.apps.user_simulators import UserSpec

    target_plays_user = args.user_model == args.model and not args.user_url
    return UserSpec(url=args.user_url, url_model=args.user_model_name, key_env=args.user_key_env,
                    model=None if target_plays_user else args.user_model, dtype=args.dtype, device=args.device,
                    fast_path=args.fast_path, temperature=args.user_temperature,
                    max_new_tokens=args.user_max_new_tokens, seed=args.seed)


def _stats_json(stats: dict[str, dict[bool, list[dict[str, Any]]]]) -> dict[str, dict[str, Any]]:
    return {d: {("capped" if c else "uncapped"): rows for c, rows in by_cap.items()} for d, by_cap in stats.items()}


def _print_stats(stats: dict[str, dict[bool, list[dict[str, Any]]]]) -> None:
    for domain, by_cap in stats.items():
        for capped, rows in sorted(by_cap.items()):
            print(f"=== {domain} ({'capped' if capped else 'uncapped'}): mean projection per turn, 95% t-interval")
            for row in rows:
                ci = (f"[{row['ci_low']:+.3f}, {row['ci_high']:+.3f}]" if row["ci_low"] is not None
                      else "(no CI with n=1)")
                print(f"turn {row['turn']:3d}  {row['mean']:+9.3f}  {ci}  n={row['n']}")


def cmd_simulate(args: argparse.Namespace) -> None:
    from persona_axis.apps.drift_stats import plot_domains, turn_statistics
    from persona_axis.apps.simulate import simulate
    from persona_axis.axis import load_axis
    from persona_axis.control.spec import load_interventions

    axis = load_axis(args.axis)
    user = _user_spec(args)
    with executor_from(args, pass_env=[args.user_key_env] if args.user_url else []) as executor:
        model = executor.model_identity()
        interventions = load_interventions(model, axis, args.axis, args.config, args.cap, args.steer, args.ablate)
        records = simulate(None, axis, user, args.domain, args.turns, args.n, layer=args.layer,
                           interventions=interventions, max_new_tokens=args.max_new_tokens, seed=args.seed,
                           out=args.out, progress=not args.json, temperature=args.temperature,
                           batch_size=args.batch_size, executor=executor)
    stats = turn_statistics(records)
    if args.plot:
        plot_domains(stats, args.plot)
    if args.json:
        print_json({"out": args.out, "statistics": _stats_json(stats), "conversations": records})
        return
    print(f"{len(records)} conversations x {args.turns} turns with {model.name}, projection at layer "
          f"{records[0]['layer']} (higher = more Assistant-like)"
          + (f", capped by {args.cap}" if args.cap else "")
          + (f", steered {' '.join(args.steer)}" if args.steer else ""))
    _print_stats(stats)
    if args.out:
        print(f"conversations: {Path(args.out) / 'conversations.jsonl'}")
    if args.plot:
        print(f"plot: {args.plot}")


def _one_line(text: str) -> str:
    return " ".join(text.split())


def cmd_drift_report(args: argparse.Namespace) -> None:
    from persona_axis.apps.drift_predictor import fit_drift_predictor
    from persona_axis.apps.drift_stats import lowest_turns, plot_domains, turn_statistics
    from persona_axis.apps.simulate import load_simulations, unfinished_conversations

    records = load_simulations(args.dirs, unfinished=args.include_unfinished)
    left_out = 0 if args.include_unfinished else sum(unfinished_conversations(d) for d in args.dirs)
    predictor = fit_drift_predictor(records, folds=args.folds, alpha=args.alpha)
    stats = turn_statistics(records)
    lowest = lowest_turns(records, args.lowest)
    if args.plot:
        plot_domains(stats, args.plot)
    if args.json:
        print_json({"predictor": predictor, "statistics": _stats_json(stats), "lowest": lowest,
                    "unfinished_left_out": left_out})
        return
    if left_out:
        print(f"{left_out} unfinished conversations left out (run the same simulate again to finish them, or pass "
              "--include-unfinished to use their finished turns)")
    delta = "n/a (no turn with a previous reply)" if predictor["r2_delta"] is None else f"{predictor['r2_delta']:.3f}"
    print(f"drift predictor: {predictor['method']}")
    print(f"  R² of the next reply's projection: {predictor['r2_absolute']:.3f};  R² of its change: {delta}  "
          f"(n = {predictor['n_turns']} turns in {predictor['n_conversations']} conversations, "
          f"{predictor['folds']} folds)")
    _print_stats(stats)
    print(f"=== the {len(lowest)} least Assistant-like turns")
    for turn in lowest:
        print(f"{turn['projection']:+9.3f}  {turn['conversation']} turn {turn['turn']}"
              + (" (capped)" if turn["capped"] else ""))
        print(f"    user:  {_one_line(turn['user'])}")
        print(f"    reply: {_one_line(turn['reply'])}")
    if args.plot:
        print(f"plot: {args.plot}")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sim = sub.add_parser("simulate", help="simulated multi-turn conversations by domain, projected on the axis")
    axis_options(sim)
    sim.add_argument("--domain", default="all", help="coding, writing, therapy, philosophy or all (default)")
    sim.add_argument("--turns", type=int, default=6, help="user/assistant exchanges per conversation")
    sim.add_argument("--n", type=int, default=10, help="conversations per domain")
    sim.add_argument("--layer", type=int, help="layer to project at (default: the middle layer, or the layer just "
                                                "below the interventions when they reach it); an intervened layer "
                                                "is refused")
    sim.add_argument("--max-new-tokens", type=int, default=96, help="longest target reply in tokens")
    sim.add_argument("--temperature", type=float, default=0.0, help="target sampling temperature (0: greedy)")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--batch-size", type=int, default=32,
                     help="conversations simulated together (each finished turn is saved at once)")
    sim.add_argument("--user-model", metavar="SPEC", help="local model playing the user (default: the --model)")
    sim.add_argument("--user-url", metavar="URL", help="OpenAI-compatible API playing the user instead")
    sim.add_argument("--user-model-name", metavar="NAME", help="model name at --user-url")
    sim.add_argument("--user-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    sim.add_argument("--user-temperature", type=float, default=0.8)
    sim.add_argument("--user-max-new-tokens", type=int, default=80, help="longest user message (local simulator)")
    intervention_options(sim)
    executor_options(sim)
    sim.add_argument("--out", metavar="DIR", help="save conversations here, turn by turn; a re-run resumes "
                                                  "mid-conversation")
    sim.add_argument("--plot", metavar="PNG", help="write the per-domain drift plot here")
    sim.add_argument("--json", action="store_true")
    sim.set_defaults(func=cmd_simulate)

    report = sub.add_parser("drift-report", help="drift predictor R², per-turn statistics and lowest turns")
    report.add_argument("dirs", nargs="+", metavar="DIR", help="simulation directories (e.g. capped and uncapped)")
    report.add_argument("--folds", type=int, default=5, help="cross-validation folds (whole conversations held out)")
    report.add_argument("--alpha", type=float, default=1.0, help="ridge regularisation strength")
    report.add_argument("--lowest", type=int, default=5, metavar="K", help="show the K least Assistant-like turns")
    report.add_argument("--plot", metavar="PNG", help="write the per-domain drift plot here")
    report.add_argument("--include-unfinished", action="store_true",
                        help="also use the finished turns of conversations a stopped simulate left half-way")
    report.add_argument("--json", action="store_true")
    report.set_defaults(func=cmd_drift_report)
