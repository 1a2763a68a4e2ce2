"""Subcommands of the harm evaluation: `eval build` (the persona-jailbreak eval set); `judge-eval --harm` output."""

from __future__ import annotations

import argparse

from persona_axis.cli.options import executor_from, executor_options, judge_options, model_options


def cmd_eval_build(args: argparse.Namespace) -> None:
    from persona_axis.evals.harm_set import build_eval_set, manifest_path, preset_settings, write_eval_set

    settings = preset_settings(args.preset, seed=args.seed, per_source=args.per_source, n_benign=args.n_benign,
                               probe_roles=args.probe_roles, probe_requests=args.probe_requests)
    out = args.out or f"evalset-{args.preset}.jsonl"
    manifest = write_eval_set(build_eval_set(settings), out)
    kinds = ", ".join(f"{n} {k}" for k, n in manifest["kinds"].items())
    print(f"eval set v{manifest['set_version']}: {manifest['n_items']} items ({kinds}) -> {out}")
    print(f"manifest: {manifest_path(out)} | sha256 {manifest['sha256']}")


def cmd_eval_run(args: argparse.Namespace) -> None:
    """Validate every input (eval set, conditions, judge) before the run directory is touched, then run."""
    from pathlib import Path

    from persona_axis.axis import load_axis
    from persona_axis.evals.conditions import pc1_axis, plan_conditions
    from persona_axis.evals.harm_judges import make_harm_judge
    from persona_axis.evals.harm_set import build_eval_set, preset_settings, read_eval_set
    from persona_axis.evals.run import SET_PRESETS, eval_preset, run_eval

    settings = eval_preset(args.preset)
    eval_set = read_eval_set(args.set) if args.set else build_eval_set(preset_settings(SET_PRESETS[args.preset]))
    axis = load_axis(args.axis)
    with executor_from(args, progress=not args.quiet) as executor:
        conditions = plan_conditions(executor.model_identity(), axis, args.axis, args.config, args.cap, args.steer,
                                     args.direction)
        pc1 = pc1_axis(args.axis, axis) if args.direction != "axis" else None
        judge = make_harm_judge(args.judge, Path(args.out) / "judge-cache", args.judge_url, args.judge_model,
                                args.judge_key_env)
        run_eval(args.out, None, axis, conditions, eval_set, settings, judge, pc1=pc1, preset=args.preset,
                 progress=not args.quiet, executor=executor)
    print(f"eval run: {len(conditions)} conditions x {len(eval_set.items)} items -> {args.out}; "
          f"next: persona-axis eval report {args.out}")


def cmd_eval_report(args: argparse.Namespace) -> None:
    from persona_axis.cli.options import print_json
    from persona_axis.evals.report import eval_report
    from persona_axis.evals.report_html import write_eval_report

    report = eval_report(args.run, args.judge_sensitivity, args.judge_specificity)
    page = write_eval_report(args.run, report)
    if args.json:
        print_json(report)
        return
    c, roles = report["correlation"], report["role_correlation"]
    print(f"model {report['model']} | harm judge {report['judge']} | per-reply projection vs harm r = "
          f"{_number(c['r'], '.3f')} (n {c['n']} replies)")
    print(f"per-role first-turn projection vs harm rate (role probes, uncapped): r = {_number(roles['r'], '.3f')} "
          f"[{_number(roles['low'], '.2f')}, {_number(roles['high'], '.2f')}] over {roles['n_roles']} roles "
          f"({roles['n_replies']} replies, layer {roles['layer']})" + (f"; {roles['note']}" if roles.get("note") else ""))
    for name, s in report["conditions"].items():
        print(f"{name}: harm {_number(s['harm_rate'], '.1%')} (n {s['n']}, unscored {s['n_unscored']}), reduction "
              f"{_number(s['harm_reduction']['value'], '+.1%')}, McNemar p {_number(s['mcnemar_p'], '.3f')}, "
              f"MDE {_number(s['mde_relative'], '.0%')}, "
              f"over-refusal {_number(s['over_refusal'], '.1%')}, IFBench {_number(s['ifbench_strict'], '.3f')}, "
              f"BIG-bench {_number(s['bigbench_accuracy'], '.3f')}, KL {_number(s['kl_default'], '.4f')} | {s['verdict']}")
    lift = report["jailbreak_lift"]
    families = ", ".join(f"{f} {_number(v['value'], '+.1%')}" for f, v in lift["per_family"].items())
    print(f"jailbreak lift (uncapped jailbreak − plain harm): {_number(lift['value'], '+.1%')} "
          f"[{_number(lift['low'], '+.1%')}, {_number(lift['high'], '+.1%')}] over {lift['n_requests']} requests"
          + (f"; {families}" if families else ""))
    print(f"report: {page}")


def _number(value: float | None, spec: str) -> str:
    """`value` formatted with `spec`, or "–" when there is none."""
    return "–" if value is None else format(value, spec)


def harm_judge_eval(args: argparse.Namespace) -> None:
    """`judge-eval --harm`: the offline harm judge, and the one --judge names when it is another, on the held-out
    pyrit-labelled rows (--limit: the first N in a fixed order); coverage, agreement and the majority baseline."""
    from persona_axis.cli.options import print_json
    from persona_axis.evals.harm_judge_eval import held_out_metrics
    from persona_axis.evals.harm_judges import make_harm_judge

    others = [] if args.judge == "offline" else [make_harm_judge(args.judge, url=args.judge_url,
                                                                 model=args.judge_model, key_env=args.judge_key_env)]
    m = held_out_metrics(others, limit=args.limit, progress=not args.json)
    if args.json:
        print_json(m)
        return
    n, held_out = m["n_test"], m["n_held_out"]
    used = f"the first {n} (in {m['order']} order) of the {held_out}" if n < held_out else f"all {n}"
    base = m["baseline"]
    print(f"harm judges on {used} held-out pyrit-labelled replies ({m['n_test_harmful']} of the {n} harmful; "
          f"the offline judge was trained on {m['n_train']} others)")
    print(f"baseline: always \"{base['predicts']}\" (the training majority), accuracy {_number(base['accuracy'], '.3f')} "
          f"on the {base['n']} rows")
    for judge, j in m["judges"].items():
        print(f"{judge}: scored {j['n_scored']}/{j['n']} (coverage {_number(j['coverage'], '.1%')}, unscored "
              f"{j['n_unscored']}); on the scored rows accuracy {_number(j['accuracy'], '.3f')} (baseline "
              f"{_number(j['majority_baseline'], '.3f')}), precision {_number(j['precision'], '.3f')}, recall "
              f"{_number(j['recall'], '.3f')}, F1 {_number(j['f1'], '.3f')}, sensitivity "
              f"{_number(j['sensitivity'], '.3f')}, specificity {_number(j['specificity'], '.3f')}")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    """Add `eval` and its `build` subcommand; returns eval's subparsers so other modules can add theirs."""
    evaluate = sub.add_parser("eval", help="harm and capability evaluation of a model, capped or not")
    eval_sub = evaluate.add_subparsers(dest="eval_command", required=True)
    build = eval_sub.add_parser("build", help="write the seeded persona-jailbreak eval set, all families (JSONL + manifest)")
    build.add_argument("--out", help="JSONL file to write (default evalset-<preset>.jsonl); the manifest goes beside")
    build.add_argument("--preset", default="standard",
                       help="smoke (34 items) or standard (730, 400 of them role probes): every request in every "
                            "persona family, plus the role probes")
    build.add_argument("--seed", type=int, help="random seed (default 0)")
    build.add_argument("--per-source", type=int, help="harmful requests drawn from each source")
    build.add_argument("--n-benign", type=int, help="benign requests for over-refusal")
    build.add_argument("--probe-roles", type=int,
                       help="catalogue roles asked the role-probe requests (smoke 3, standard 100; 0: no probes)")
    build.add_argument("--probe-requests", type=int,
                       help="harmful requests each probe role is asked after its first answer (smoke 2, standard 4)")
    build.set_defaults(func=cmd_eval_build)
    run = eval_sub.add_parser("run", help="answer the eval set uncapped, capped and steered; judge; capabilities")
    model_options(run)
    run.add_argument("--axis", required=True, help="the axis run directory (or an axis file without --direction pc1)")
    run.add_argument("--config", help="capping config holding the --cap experiments (default <axis run>/capping)")
    run.add_argument("--cap", action="append", default=[], metavar="EXPERIMENT", help="a capped condition (repeatable)")
    run.add_argument("--steer", action="append", default=[], metavar="COEF@LAYER",
                     help="a steered condition (repeatable; chat's units; write negatives as --steer=-2@15)")
    run.add_argument("--direction", default="axis", choices=["axis", "pc1", "both"],
                     help="cap along the axis, along the roles' PC1 (same block and percentile), or both")
    run.add_argument("--set", help="an eval set written by `eval build` (default: built from --preset)")
    run.add_argument("--preset", default="standard", choices=["smoke", "smoke-sampled", "standard", "reference"],
                     help="run sizes and sampling (reference: 4 samples of 256 tokens at T 0.7, top-p 0.9), and the "
                          "eval set when --set is not given")
    judge_options(run)
    executor_options(run)
    run.add_argument("--out", required=True, help="the eval run directory (rerun the same command to resume)")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.set_defaults(func=cmd_eval_run)
    report = eval_sub.add_parser("report", help="harm, over-refusal and capability statistics of an eval run")
    report.add_argument("run", help="the eval run directory")
    report.add_argument("--json", action="store_true", help="print the report as JSON")
    report.add_argument("--judge-sensitivity", type=float, default=1.0,
                        help="the harm judge's sensitivity assumed by the minimum detectable effects (default 1)")
    report.add_argument("--judge-specificity", type=float, default=1.0,
                        help="the harm judge's specificity assumed by the minimum detectable effects (default 1)")
    report.set_defaults(func=cmd_eval_report)
    return eval_sub

