"""The eval report rendered: the Pareto figure and the HTML page of the dict persona_axis.evals.report.eval_report returns.

Reads only that dict (no run directory), so a report kept as JSON renders the same page.
"""

from __future__ import annotations

import html
import json
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from persona_axis.evals.conditions import UNCAPPED

FIGURE = "figures/eval_pareto.png"
CSS = ("body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:80rem;padding:0 1rem}"
       "table{border-collapse:collapse;margin:.5rem 0}th,td{border:1px solid #ccc;padding:.25rem .5rem}"
       "th{background:#f3f3f3}img{max-width:100%}")
OUTCOMES = ("harmful", "not_harmful", "refused", "not_refused")  # the diagnosis's by_outcome groups


def _capability_change(stats: Mapping[str, Any]) -> float | None:
    """Mean of the IFBench strict and BIG-bench accuracy changes (percentage points / 100) that exist."""
    values = [stats[f"{c}_change"]["value"] for c in ("ifbench_strict", "bigbench_accuracy")
              if stats[f"{c}_change"]["value"] is not None]
    return statistics.fmean(values) if values else None


def pareto_figure(report: Mapping[str, Any], path: Path) -> Path:
    """Harm reduction (y) vs mean capability change (x) per condition, one labelled point each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5), layout="constrained")
    for name, stats in report["conditions"].items():
        x = _capability_change(stats) if name != UNCAPPED else 0.0
        y = stats["harm_reduction"]["value"] if name != UNCAPPED else 0.0
        if x is None or y is None:
            continue
        ax.scatter([x], [y], color="tab:red" if name == UNCAPPED else "tab:blue")
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.axvline(0, color="grey", linewidth=0.8)
    ax.set(xlabel="capability change vs uncapped (mean of IFBench strict and BIG-bench)",
           ylabel="relative harm reduction vs uncapped", title="Harm reduction vs capability cost")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _fmt(value: Any, ci: Sequence[float] | None = None) -> str:
    if value is None:
        return "–"
    text = f"{value:.3f}" if isinstance(value, float) else str(value)
    return text + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def _estimate(e: Mapping[str, Any]) -> str:
    return _fmt(e["value"], [e["low"], e["high"]] if e["low"] is not None else None)


def html_section(report: Mapping[str, Any]) -> str:
    """The eval report as an HTML fragment: the condition table, both correlations, the lift, the diagnosis."""
    heads = ["condition", "harm rate", "reduction", "McNemar p", "MDE", "plain harm", "refusal (cue)", "over-refusal",
             "IFBench strict",
             "Δ IFBench", "BIG-bench", "Δ BIG-bench", "KL", "top-1", "n", "unscored", "verdict"]
    rows = []
    for name, s in report["conditions"].items():
        cells = [name, _fmt(s["harm_rate"], s["harm_rate_ci"]), _estimate(s["harm_reduction"]), _fmt(s["mcnemar_p"]),
                 _fmt(s["mde_relative"]),
                 _fmt(s["plain_harm_rate"], s["plain_harm_rate_ci"]), _fmt(s["refusal_rate"], s["refusal_rate_ci"]),
                 _fmt(s["over_refusal"], s["over_refusal_ci"]),
                 _fmt(s["ifbench_strict"], s["ifbench_strict_ci"]), _estimate(s["ifbench_strict_change"]),
                 _fmt(s["bigbench_accuracy"], s["bigbench_accuracy_ci"]), _estimate(s["bigbench_accuracy_change"]),
                 _fmt(s["kl_default"]), _fmt(s["top1_agreement"]), _fmt(s["n"]), _fmt(s["n_unscored"]), s["verdict"]]
        rows.append(_row(cells))
    diag, by_outcome = [], []
    for name, s in report["conditions"].items():
        for layer, d in s["diagnosis"]["layers"].items():
            diag.append(_row([name, layer, _fmt(d["floor"]), _fmt(d["persona"]["median"]), _iqr(d["persona"]),
                              _fmt(d["plain"]["median"]), _iqr(d["plain"]), _fmt(d["engaged"])]))
            groups = [d["by_outcome"][label] for label in OUTCOMES]
            by_outcome.append(_row([name, layer, _fmt(d["floor"]),
                                    *(cell for q in groups for cell in (_fmt(q["median"]), _iqr(q), q["n"]))]))
    c = report["correlation"]
    correlation = (f"r = {_fmt(c['r'])} [{_fmt(c['low'])}, {_fmt(c['high'])}], p = {_fmt(c['p_value'])}, "
                   f"n = {c['n']} replies, layer {c['layer']}")
    lift = report["jailbreak_lift"]
    lifts = "; ".join(f"{name} {_estimate(v)} (n {v['n_requests']} requests)"
                      for name, v in [("all", lift), *lift["per_family"].items()])
    return (f"<h2>Harm and capability evaluation</h2><p>model {html.escape(report['model'])}; harm judge "
            f"{html.escape(report['judge'])}; over-refusal rule {html.escape(report['refusal_rule'])}. "
            "Intervals are 95 %, bootstrapped over requests for harm and refusal; MDE: the smallest relative "
            "reduction detectable at 80 % power (exact McNemar, α 0.05).</p><table><tr>"
            + "".join(f"<th>{h}</th>" for h in heads) + "</tr>"
            + "".join(rows) + "</table>"
            f"<p>Per reply: a reply's projection (uncapped, measured layer) vs its harmful compliance: "
            f"{html.escape(correlation)}</p>" + _role_section(report["role_correlation"]) +
            f"<p>Jailbreak lift (uncapped jailbreak harm − plain harm, same requests): {html.escape(lifts)}</p>"
            "<h3>Diagnosis at the capped layers (uncapped replies)</h3><table><tr><th>condition</th><th>layer</th>"
            "<th>floor</th><th>persona median</th><th>persona IQR</th><th>plain median</th><th>plain IQR</th>"
            "<th>engaged</th></tr>" + "".join(diag) + "</table>"
            "<p>The same uncapped harm replies (persona jailbreak and plain) split by outcome: judged harmful or not "
            "(harm judge), refused or not (refusal cue).</p><table><tr><th>condition</th><th>layer</th><th>floor</th>"
            + "".join(f"<th>{o.replace('_', ' ')} median</th><th>IQR</th><th>n</th>" for o in OUTCOMES) + "</tr>"
            + "".join(by_outcome) + "</table>"
            f'<img src="{FIGURE}" alt="harm reduction vs capability change">')


def _row(cells: Sequence[Any]) -> str:
    return "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>"


def _iqr(q: Mapping[str, Any]) -> str:
    return f"{_fmt(q['q1'])} – {_fmt(q['q3'])}"


def _role_section(c: Mapping[str, Any]) -> str:
    """The role correlation: r with its interval, or the note; the roles' table folded away."""
    head = (f"r = {_fmt(c['r'])} [{_fmt(c['low'])}, {_fmt(c['high'])}] ({c['interval']}), p = {_fmt(c['p_value'])}, "
            f"{c['n_roles']} roles, {c['n_replies']} replies, layer {c['layer']}")
    if c.get("note"):
        head += f"; {c['note']}"
    rows = "".join(_row([name, _fmt(r["projection"]), _fmt(r["harm_rate"]), r["n_replies"]])
                   for name, r in c["roles"].items())
    return (f"<p>Per role (the paper's correlation): a role's mean first-turn projection vs its harmful-compliance "
            f"rate on the role probes ({html.escape(str(c['condition']))}, judge {html.escape(str(c['judge']))}): "
            f"{html.escape(head)}</p><details><summary>roles</summary><table><tr><th>role</th>"
            "<th>first-turn projection</th><th>harm rate</th><th>replies</th></tr>" + rows + "</table></details>")


def write_eval_report(run_dir: str | Path, report: Mapping[str, Any]) -> Path:
    """Write figures/eval_pareto.png and report.html into the run directory; returns the HTML path."""
    root = Path(run_dir)
    pareto_figure(report, root / FIGURE)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>Eval of {html.escape(report['model'])}</title>"
            f"<style>{CSS}</style></head><body><h1>Does capping work? {html.escape(report['model'])}</h1>"
            f"{html_section(report)}<details><summary>JSON</summary><pre>{html.escape(json.dumps(report, indent=1))}"
            "</pre></details></body></html>")
    path = root / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
