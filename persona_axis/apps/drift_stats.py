"""Drift statistics of simulated conversations: per-turn means with t-intervals by domain, their plot,
and the least Assistant-like turns."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from persona_axis.apps.simulate import Record
from persona_axis.errors import PersonaAxisError

Stats = dict[str, dict[bool, list[dict[str, Any]]]]  # domain -> capped -> per-turn rows (see `turn_statistics`)


def _mean_interval(values: list[float], confidence: float) -> dict[str, Any]:
    """Mean of values, its t-based confidence interval (None for a single value), and n."""
    from scipy.stats import t

    mean, n = float(np.mean(values)), len(values)
    if n < 2:
        return {"mean": mean, "ci_low": None, "ci_high": None, "n": n}
    half = float(t.ppf((1 + confidence) / 2, n - 1) * np.std(values, ddof=1) / np.sqrt(n))
    return {"mean": mean, "ci_low": mean - half, "ci_high": mean + half, "n": n}


def turn_statistics(records: Sequence[Record], confidence: float = 0.95) -> Stats:
    """Per domain, per capped flag, per turn: {"turn" (1-based), "mean", "ci_low", "ci_high", "n"}.

    The interval is the t-based confidence interval of the mean projection (None when n = 1);
    empty replies (projection None) are left out.
    """
    values: dict[tuple[str, bool, int], list[float]] = {}
    for record in records:
        for turn, value in enumerate(record["projections"], 1):
            if value is not None:
                values.setdefault((record["domain"], record["capped"], turn), []).append(value)
    stats: Stats = {}
    for (domain, capped, turn), found in sorted(values.items(), key=lambda item: item[0][2]):  # by turn, stable
        stats.setdefault(domain, {}).setdefault(capped, []).append({"turn": turn, **_mean_interval(found, confidence)})
    return stats


def plot_domains(stats: Stats, path: str | Path) -> Path:
    """PNG of the mean projection per turn, one colour per domain (dashed: capped), with CI bands."""
    from matplotlib.figure import Figure  # Agg canvas, no pyplot state
    from matplotlib.ticker import MaxNLocator

    if not stats:
        raise PersonaAxisError("no conversations to plot")
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    for n, (domain, by_cap) in enumerate(sorted(stats.items())):
        for capped, rows in sorted(by_cap.items()):
            turns = [r["turn"] for r in rows]
            ax.plot(turns, [r["mean"] for r in rows], marker="o", color=f"C{n % 10}", linestyle="--" if capped else "-",
                    label=domain + (" (capped)" if capped else ""))
            banded = [r for r in rows if r["ci_low"] is not None]
            ax.fill_between([r["turn"] for r in banded], [r["ci_low"] for r in banded], [r["ci_high"] for r in banded],
                            color=f"C{n % 10}", alpha=0.15, linewidth=0)
    ax.set(xlabel="turn", ylabel="mean projection (95 % CI)", title="Position on the Assistant Axis per turn")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    return Path(path)


def conversation_key(record: Record) -> str:
    """The conversation's id, prefixed by its run directory when it has one (ids repeat across runs)."""
    return f"{record['run']}/{record['id']}" if "run" in record else record["id"]


def assistant_turns(record: Record) -> list[tuple[str, str, float | None]]:
    """(user message before it, reply, projection) for each assistant turn, in order."""
    turns: list[tuple[str, str, float | None]] = []
    user = ""
    for message in record["messages"]:
        if message["role"] == "user":
            user = message["content"]
        elif message["role"] == "assistant":
            turns.append((user, message["content"], record["projections"][len(turns)]))
    return turns


def lowest_turns(records: Sequence[Record], k: int = 5) -> list[dict[str, Any]]:
    """The k assistant turns with the lowest projections (least Assistant-like), lowest first."""
    turns = [{"domain": r["domain"], "conversation": conversation_key(r), "capped": r["capped"], "turn": index,
              "projection": value, "user": user, "reply": reply}
             for r in records for index, (user, reply, value) in enumerate(assistant_turns(r), 1) if value is not None]
    return sorted(turns, key=lambda turn: turn["projection"])[:k]
