"""Subcommands that compute and analyse the axis: demo, run, analyze, stability, judge-eval."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from persona_axis.cli.options import (
    executor_from,
    executor_options,
    judge_options,
    load_model_from,
    model_options,
    portable_model_spec,
    print_json,
)

if TYPE_CHECKING:
    from persona_axis.build.persona_space import RunAnalysis

DEMO_CHARACTERS = {
    "default Assistant": "",
    "pirate captain": "You are Captain Marrow, a weathered pirate who has sailed the southern seas for forty years. "
    "Speak as yourself, in first person, always.",
    "ancient dragon": "You are an ancient dragon who has slept beneath the mountain for a thousand years and "
    "guards a hoard of gold. Speak as yourself, in first person, always.",
}
DEMO_QUESTION = "Who are you, and what matters most to you?"


def cmd_demo(args: argparse.Namespace) -> None:
    from persona_axis.decode.generate import generate

    lm = load_model_from(args)
    print(f"model: {lm.name} | {lm.n_layers} layers | hidden {lm.hidden_size} | {lm.dtype}")
    conversations = [[{"role": "system", "content": system}, {"role": "user", "content": DEMO_QUESTION}]
                     for system in DEMO_CHARACTERS.values()]
    result = generate(lm, conversations, max_new_tokens=args.max_new_tokens, seed=args.seed)
    for name, text, means in zip(DEMO_CHARACTERS, result.texts, result.captured_means()):
        norms = " ".join(f"{v:.0f}" for v in means.norm(dim=-1).tolist())
        print(f"\n=== {name} ===\n{text.strip()}\nper-layer activation norm (layers 0..{lm.n_layers - 1}): {norms}")


def _role_list(value: str | None) -> list[str] | None:
    return [name for name in (value or "").replace(",", " ").split() if name] or None


def headline(analysis: RunAnalysis) -> str:
    """The analysis in a few lines: roles, PC1, cos(axis, PC1), the ends of the axis, the unjudged check, traits."""
    space = analysis.space
    cos, layer = space.cos_axis_pc1, space.layer
    best = max(range(len(cos)), key=lambda i: cos[i])
    return (
        f"roles used {space.n_roles_used} (dropped {len(analysis.roles_dropped)}) | "
        f"PC1 explains {space.variance_explained[0]:.1%} at layer {layer} | "
        f"{space.n_components_70} components reach 70% | cos(axis, PC1) {cos[layer]:.2f} "
        f"(best {cos[best]:.2f} at layer {best})\n"
        f"Assistant end of the axis: {', '.join(space.axis_top)}\n"
        f"far end of the axis:       {', '.join(space.axis_bottom)}"
        + _all_answers_line(analysis) + _traits_line(analysis)
    )


def _all_answers_line(analysis: RunAnalysis) -> str:
    if analysis.unjudged is None:
        return ""
    layer = analysis.space.layer
    return (f"\nwithout the judge (all {analysis.unjudged.n_roles} roles, every answer): cos(axis, PC1) "
            f"{analysis.unjudged.cos_axis_pc1[layer]:.2f} at layer {layer}")


def _traits_line(analysis: RunAnalysis) -> str:
    ends = analysis.trait_ends()
    if ends is None:
        return f"\ntraits used {analysis.traits_used}"
    top = ", ".join(name for name, _ in ends.axis_top[:5])
    bottom = ", ".join(name for name, _ in ends.axis_bottom[:5])
    return (f"\ntraits used {analysis.traits_used} (dropped {len(analysis.traits_dropped)}) | "
            f"Assistant end: {top}\n"
            f"traits at the far end: {bottom}")


def cmd_run(args: argparse.Namespace) -> None:
    from persona_axis.build.pipeline import analyze_run, preset_settings, run_pipeline
    from persona_axis.catalog import load_catalog
    from persona_axis.judges import make_judge

    settings = preset_settings(args.preset, seed=args.seed, batch_size=args.batch_size,
                               max_new_tokens=args.max_new_tokens, min_score3=args.min_score3,
                               temperature=args.temperature, top_p=args.top_p)
    catalog = load_catalog(args.catalog)
    options = {"cache_dir": Path(args.out) / "judge_cache", "url": args.judge_url, "model": args.judge_model,
               "key_env": args.judge_key_env}
    judge = make_judge(args.judge, **options)
    trait_judge = make_judge(args.judge, traits=catalog.traits, **options)
    with executor_from(args, progress=not args.no_progress) as executor:
        run_pipeline(args.out, None, catalog, settings, judge, role_names=_role_list(args.roles), preset=args.preset,
                     progress=not args.no_progress, trait_judge=trait_judge, executor=executor,
                     model_spec=portable_model_spec(args.model))
    print(headline(analyze_run(args.out)))
    print(f"report: {Path(args.out) / 'report.html'}")


def cmd_analyze(args: argparse.Namespace) -> None:
    from persona_axis.build.pipeline import analyze_run

    analysis = analyze_run(args.run, layer=args.layer, standardise=args.standardise)
    comparison: dict[str, Any] = {}
    if args.compare:
        from persona_axis.build.persona_space import pc1_loading_correlation

        other = analyze_run(args.compare, layer=args.layer, standardise=args.standardise, write=False)
        r, shared = pc1_loading_correlation(analysis.space.pc1_loadings, other.space.pc1_loadings)
        comparison = {"pc1_correlation": {"run": args.compare, "pearson_r": r, "shared_roles": shared}}
    if args.json:
        print_json({**analysis.to_json(), **comparison})
        return
    print(headline(analysis))
    if comparison:
        c = comparison["pc1_correlation"]
        print(f"PC1 loadings vs {c['run']}: Pearson r {c['pearson_r']:.3f} over {c['shared_roles']} shared roles")
    print(f"report: {Path(args.run) / 'report.html'}")


def cmd_stability(args: argparse.Namespace) -> None:
    from persona_axis.build.stability import compare_runs, split_half
    from persona_axis.errors import PersonaAxisError

    if args.split_half and args.run_b is not None:
        raise PersonaAxisError("stability --split-half takes one run directory (RUN); got two")
    if not args.split_half and args.run_b is None:
        raise PersonaAxisError("stability needs two run directories (RUN_A RUN_B), or one with --split-half")
    result = (split_half(args.run_a, layer=args.layer, ends=args.ends) if args.split_half
              else compare_runs(args.run_a, args.run_b, layer=args.layer, ends=args.ends))
    if args.json:
        print_json(result.to_json())
        return
    print(result.table())


def cmd_judge_eval(args: argparse.Namespace) -> None:
    from persona_axis.errors import PersonaAxisError
    from persona_axis.judges import make_judge
    from persona_axis.judges.agreement import evaluate_judge, read_labels

    if args.harm:
        from persona_axis.cli.eval_commands import harm_judge_eval

        if args.labels is not None or args.fold is not None or args.threshold is not None:
            raise PersonaAxisError("judge-eval --harm measures on the held-out pyrit rows: it takes no LABELS, "
                                   "--fold or --threshold")
        return harm_judge_eval(args)
    if args.labels is None:
        raise PersonaAxisError("judge-eval needs a LABELS file (or --harm for the harm judges)")
    if args.limit is not None:
        raise PersonaAxisError("--limit applies to judge-eval --harm only")
    judge = make_judge(args.judge, url=args.judge_url, model=args.judge_model, key_env=args.judge_key_env,
                       threshold=args.threshold)
    report = {"labels": args.labels, "fold": args.fold, **evaluate_judge(judge, read_labels(args.labels, args.fold))}
    if args.json:
        print_json(report)
        return
    print(f"{report['judge']} on {report['n']} labelled replies (fold {args.fold or 'all'}): "
          f"exact agreement {report['exact_agreement']}, score-3 precision {report['score3_precision']}, "
          f"recall {report['score3_recall']}")
    print(f"baselines: share labelled 3 {report['score3_base_rate']}, always answering {report['majority_label']} "
          f"agrees on {report['majority_agreement']}")
    print("label \\ judged   0    1    2    3  unscored")
    for label, row in report["confusion"].items():
        print(f"{label:>13} " + " ".join(f"{row[k]:>4}" for k in ("0", "1", "2", "3", "unscored")))


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
    run.add_argument("--catalog", help="a catalogue directory: our layout, the reference implementation's published "
                                       "layout, or both in one flat directory (persona_axis/catalog.py lists them; "
                                       "default: the built-in catalogue)")
    judge_options(run)
    run.add_argument("--seed", type=int, help="sampling seed (chunk k uses seed + k)")
    run.add_argument("--temperature", type=float, help="sampling temperature (default 0.7; 0 = greedy)")
    run.add_argument("--top-p", type=float, help="nucleus sampling mass (default 0.9)")
    run.add_argument("--batch-size", type=int)
    run.add_argument("--max-new-tokens", type=int)
    run.add_argument("--min-score3", type=int, help="score-3 answers a role needs to keep its vector")
    run.add_argument("--no-progress", action="store_true")
    executor_options(run)
    run.set_defaults(func=cmd_run)

    analyze = sub.add_parser("analyze", help="persona-space analysis of a run: PCA, cosines, figures, report")
    analyze.add_argument("run", help="run directory")
    analyze.add_argument("--layer", type=int, help="layer for PCA and rankings (default: the middle layer)")
    analyze.add_argument("--standardise", action="store_true", help="scale each dimension to unit variance first")
    analyze.add_argument("--compare", metavar="RUN", help="correlate PC1 role loadings with another run (e.g. model)")
    analyze.add_argument("--json", action="store_true", help="print one JSON object")
    analyze.set_defaults(func=cmd_analyze)

    stability = sub.add_parser("stability", help="how far two runs of one model (or the two halves of one run by "
                                                 "question) agree: axis and PC1 cosines per layer, rank correlation "
                                                 "and shared ends of their roles")
    stability.add_argument("run_a", metavar="RUN_A", help="run directory")
    stability.add_argument("run_b", metavar="RUN_B", nargs="?",
                           help="run directory of the same model (another seed, judge, ...); omitted with --split-half")
    stability.add_argument("--split-half", action="store_true",
                           help="compare the halves of RUN_A by question (even and odd plan index), each rebuilt from "
                                "its own answers; each has half the answers, so this understates the full run's agreement")
    stability.add_argument("--layer", type=int, help="layer for role rankings and cos(axis, PC1) (default: the middle layer)")
    stability.add_argument("--ends", type=int, default=10,
                           help="roles compared at each end of a ranking (default 10, at most half the shared roles)")
    stability.add_argument("--json", action="store_true", help="print one JSON object")
    stability.set_defaults(func=cmd_stability)

    evaluate = sub.add_parser("judge-eval", help="agreement of a judge with labelled replies (confusion matrix)")
    evaluate.add_argument("labels", nargs="?", help="JSONL of labelled replies (role, description, question, "
                          "response, label)")
    evaluate.add_argument("--harm", action="store_true", help="the harm judges on the held-out pyrit split: the "
                          "offline one, and the one --judge names when it is openai (coverage, accuracy, precision, "
                          "recall, F1, sensitivity, specificity, majority baseline)")
    evaluate.add_argument("--limit", type=int, metavar="N", help="--harm: only the first N held-out rows, in a fixed "
                          "order (sha256 of request and reply), e.g. for a slow local judge")
    evaluate.add_argument("--fold", help="only lines whose 'fold' field equals this")
    evaluate.add_argument("--threshold", type=float, help="offline judge: role-specificity threshold")
    judge_options(evaluate)
    evaluate.add_argument("--json", action="store_true")
    evaluate.set_defaults(func=cmd_judge_eval)

