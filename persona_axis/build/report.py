"""Figures and a self-contained HTML (plus Markdown) report of a persona-space analysis.

The input is a run's analysis (persona_axis.build.persona_space.RunAnalysis, as pipeline.analyze_run returns it).
Figures are built as matplotlib Figure objects directly (no pyplot state), so importing this module switches no
backend.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import ConnectionPatch
from matplotlib.ticker import MaxNLocator

from persona_axis.build.persona_space import RunAnalysis, TraitEnds

N_LABELLED = 5  # roles labelled at each end of PC1 on the scatter
LABEL_CHARS = 32  # longer role names are shortened on the scatter
LABEL_GAP = 0.06  # least vertical distance between two scatter labels, as a fraction of the plot height
N_RANKED = 15
FIGURE_NAMES = ("variance_explained.png", "pc1_pc2.png", "cos_axis_pc1.png", "axis_ranking.png")
TRAIT_FIGURE = "traits_axis.png"

CSS = """
body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.2rem; margin-top: 2rem; }
table { border-collapse: collapse; margin: 0.5rem 0; }
th, td { border: 1px solid #ccc; padding: 0.3rem 0.7rem; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5rem 0; }
.ends { display: flex; gap: 2rem; flex-wrap: wrap; }
"""


def _save(fig: Figure, path: Path) -> Path:
    """Save a figure as PNG."""
    fig.savefig(path, dpi=120)
    return path


def _figure(width: float, height: float) -> tuple[Figure, Axes]:
    """A figure of width × height inches with one axes, laid out by constrained layout."""
    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots()


def _variance_figure(analysis: RunAnalysis) -> Figure:
    """Bars of the variance explained per component, the cumulative share, and the 70 % line."""
    shares = analysis.space.variance_explained
    ks = list(range(1, len(shares) + 1))
    cumulative = [sum(shares[:k]) for k in ks]
    fig, ax = _figure(6, 4)
    ax.bar(ks, shares, color="tab:blue", label="per component")
    ax.plot(ks, cumulative, "o-", color="tab:orange", label="cumulative")
    ax.axhline(0.70, color="grey", linestyle="--", linewidth=1, label="70 %")
    ax.set(xlabel="principal component", ylabel="fraction of variance", ylim=(0, 1.05), xticks=ks,
           title=f"Variance explained (layer {analysis.space.layer})")
    ax.legend()
    return fig


def spread_positions(targets: list[float], gap: float, low: float = 0.0, high: float = 1.0) -> list[float]:
    """Positions in [low, high], in the order of `targets`, as near each target as a distance of at least
    `gap` between neighbours allows (the gap shrinks when the range cannot hold them all): labels that
    would collide are pushed apart, deterministically."""
    if not targets:
        return []
    gap = min(gap, (high - low) / max(len(targets) - 1, 1))
    order = sorted(range(len(targets)), key=lambda k: targets[k])
    placed = [min(max(targets[k], low), high) for k in order]
    for k in range(1, len(placed)):  # push up what sits too close above its lower neighbour
        placed[k] = max(placed[k], placed[k - 1] + gap)
    placed[-1] = min(placed[-1], high)
    for k in range(len(placed) - 2, -1, -1):  # pull down what the top limit pushed back
        placed[k] = min(placed[k], placed[k + 1] - gap)
    out = [0.0] * len(targets)
    for k, position in zip(order, placed):
        out[k] = position
    return out


def short_label(name: str) -> str:
    """The name, or for a long one its start and end around an ellipsis (LABEL_CHARS characters in all)."""
    if len(name) <= LABEL_CHARS:
        return name
    head = (LABEL_CHARS - 1) // 2
    return f"{name[:head]}…{name[head + 1 - LABEL_CHARS:]}"


def labelled_ends(pc1: Mapping[str, float]) -> tuple[list[str], list[str]]:
    """The roles labelled on the scatter: up to N_LABELLED at the low end of PC1 and at the high end, disjoint."""
    ordered = sorted(pc1, key=lambda r: pc1[r])
    low = ordered[:min(N_LABELLED, (len(ordered) + 1) // 2)]
    return low, ordered[max(len(low), len(ordered) - N_LABELLED):]


def _label_column(fig: Figure, column: Axes, scatter: Axes, roles: list[str], points: dict[str, tuple[float, float]],
                  side: str) -> None:
    """Role names in a column beside the scatter, spread apart vertically, each joined to its point by a line."""
    column.set_axis_off()
    y0, y1 = scatter.get_ylim()
    targets = [(points[r][1] - y0) / (y1 - y0) for r in roles]
    x, align = (1.0, "right") if side == "left" else (0.0, "left")
    for role, y in zip(roles, spread_positions(targets, LABEL_GAP)):
        column.text(x, y, short_label(role), transform=column.transAxes, ha=align, va="center", fontsize=8)
        line = ConnectionPatch(xyA=(x, y), coordsA=column.transAxes, xyB=points[role], coordsB=scatter.transData,
                               color="grey", linewidth=0.5)
        line.set_in_layout(False)
        fig.add_artist(line)


def _pc_scatter_figure(analysis: RunAnalysis) -> Figure:
    """Roles on PC1/PC2 coloured by their axis projection. The roles at each end of PC1 are named in a
    column on their side of the plot, spread so that no two names collide, with a line to their point."""
    space = analysis.space
    pc1 = space.pc1_loadings
    pc2 = space.pc2_loadings or {}
    points = {r: (pc1[r], pc2.get(r, 0.0)) for r in pc1}
    fig = Figure(figsize=(10, 6), layout="constrained")
    left, scatter, right = fig.subplots(1, 3, width_ratios=[1, 3, 1])
    dots = scatter.scatter([x for x, _ in points.values()], [y for _, y in points.values()],
                           c=[space.axis_projection[r] for r in points], cmap="viridis", s=25)
    ys = [y for _, y in points.values()]
    pad = 0.06 * (max(ys) - min(ys)) or 1.0
    scatter.set_ylim(min(ys) - pad, max(ys) + pad)
    fig.colorbar(dots, ax=[left, scatter, right], location="bottom", shrink=0.4,
                 label="projection on the Assistant Axis")
    low, high = labelled_ends(pc1)
    _label_column(fig, left, scatter, low, points, "left")
    _label_column(fig, right, scatter, high, points, "right")
    scatter.set(xlabel="PC1 (Assistant end →)", ylabel="PC2" if pc2 else "PC2 (not available)",
                title=f"Roles on the first two components (layer {space.layer})")
    return fig


def _cosine_figure(analysis: RunAnalysis) -> Figure:
    """cos(axis, PC1) per layer, with the analysis layer marked."""
    cosines, layer = analysis.space.cos_axis_pc1, analysis.space.layer
    fig, ax = _figure(6, 4)
    ax.plot(range(len(cosines)), cosines, "o-", markersize=3, label="score-3 role vectors (judged)")
    if analysis.unjudged is not None:
        unjudged = analysis.unjudged.cos_axis_pc1
        ax.plot(range(len(unjudged)), unjudged, "s--", markersize=3, color="tab:grey",
                label="every answer (no judge)")
    ax.axvline(layer, color="grey", linestyle="--", linewidth=1, label=f"layer {layer}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="layer", ylabel="cos(axis, PC1)", ylim=(0, 1.02), title="Alignment of the axis with PC1")
    ax.legend()
    return fig


def _ranking_figure(analysis: RunAnalysis) -> Figure:
    """Horizontal bars of the roles highest and lowest along the axis (up to 15 at each end).

    Bars are relative to the mean projection over all roles, so a large common offset does not hide
    the differences between roles.
    """
    projection = analysis.space.axis_projection
    mean = sum(projection.values()) / len(projection)
    ordered = sorted(projection, key=lambda r: projection[r])
    truncated = len(ordered) > 2 * N_RANKED
    shown = ordered[:N_RANKED] + ordered[-N_RANKED:] if truncated else ordered
    values = [projection[r] - mean for r in shown]
    colours = ["tab:green" if v >= 0 else "tab:red" for v in values]
    fig, ax = _figure(7, max(3.0, 0.22 * len(shown) + 1))
    ax.barh(range(len(shown)), values, color=colours)
    if truncated:
        ax.axhline(N_RANKED - 0.5, color="grey", linestyle=":", linewidth=1)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(shown)), shown, fontsize=8)
    ax.set(xlabel=f"projection on the unit axis\n− mean over roles ({mean:+.2f})",
           title=f"Roles along the Assistant Axis (layer {analysis.space.layer})")
    return fig


def _trait_figure(ends: TraitEnds, layer: int) -> Figure:
    """Bars of the traits nearest each end of the axis: cosine of the centred trait vector with the axis."""
    shown = list(dict.fromkeys(ends.axis_top + ends.axis_bottom[::-1]))[::-1]
    fig, ax = _figure(7, max(3.0, 0.22 * len(shown) + 1))
    ax.barh(range(len(shown)), [v for _, v in shown], color=["tab:green" if v >= 0 else "tab:red" for _, v in shown])
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(shown)), [n for n, _ in shown], fontsize=8)
    ax.set(xlabel="cos(trait − mean trait, axis)",
           title=f"Traits at the two ends of the Assistant Axis (layer {layer})")
    return fig


def build_figures(analysis: RunAnalysis) -> dict[str, Figure]:
    """The figures of an analysis by file name: four always; a fifth (traits along the axis) when the
    analysis ranks traits."""
    builders: list[Callable[[RunAnalysis], Figure]] = [_variance_figure, _pc_scatter_figure, _cosine_figure,
                                                       _ranking_figure]
    figures = {name: build(analysis) for build, name in zip(builders, FIGURE_NAMES)}
    ends = analysis.trait_ends()
    if ends is not None:
        figures[TRAIT_FIGURE] = _trait_figure(ends, analysis.space.layer)
    return figures


def write_figures(analysis: RunAnalysis, out_dir: Path) -> list[Path]:
    """Write the PNG figures of an analysis (see `build_figures`) into out_dir (created if needed); return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return [_save(fig, out_dir / name) for name, fig in build_figures(analysis).items()]


def headline(analysis: RunAnalysis) -> list[tuple[str, str]]:
    """The headline figures of an analysis as (label, formatted value) pairs."""
    space = analysis.space
    cosines, layer = space.cos_axis_pc1, space.layer
    best = max(range(len(cosines)), key=lambda k: cosines[k])
    rows = [("layers", str(space.layers)), ("roles used", str(space.n_roles_used)),
            ("roles dropped (too few score-3 answers)", str(len(analysis.roles_dropped))),
            ("traits used / dropped", f"{analysis.traits_used} / {len(analysis.traits_dropped)}"),
            ("analysis layer", str(layer)),
            ("variance explained by PC1", f"{space.variance_explained[0]:.3f}"),
            ("components for 70 % of the variance", str(space.n_components_70)),
            (f"cos(axis, PC1) at layer {layer}", f"{cosines[layer]:.3f}"),
            (f"best cos(axis, PC1): layer {best}", f"{cosines[best]:.3f}")]
    if analysis.unjudged is not None:
        rows.append((f"cos(axis, PC1) at layer {layer}, every answer (no judge)",
                     f"{analysis.unjudged.cos_axis_pc1[layer]:.3f}"))
    return rows


def _html_dropped(analysis: RunAnalysis) -> str:
    """Collapsible lists of the dropped roles and traits, each with its score-3 count."""
    parts = []
    for dropped, what in ((analysis.roles_dropped, "roles"), (analysis.traits_dropped, "traits")):
        if dropped:
            names = ", ".join(f"{html.escape(n)} ({c})" for n, c in sorted(dropped.items()))
            parts.append(f"<details><summary>{len(dropped)} {what} dropped: fewer score-3 answers than the run "
                         f"required (count in brackets)</summary><p>{names}</p></details>")
    return "<h2>Dropped</h2>" + "".join(parts) if parts else ""


def _html_traits(analysis: RunAnalysis) -> str:
    """Tables of the traits nearest each end of the axis and of PC1 (cosines of centred trait vectors)."""
    ends = analysis.trait_ends()
    if ends is None:
        return ""
    columns = [("toward the Assistant (axis)", ends.axis_top), ("away from it (axis)", ends.axis_bottom),
               ("Assistant end of PC1", ends.pc1_top), ("far end of PC1", ends.pc1_bottom)]
    lists = "".join(f"<div><h3>{html.escape(title)}</h3><ol>"
                    + "".join(f"<li>{html.escape(n)} ({v:+.3f})</li>" for n, v in pairs) + "</ol></div>"
                    for title, pairs in columns)
    return (f"<h2>Traits along the axis (layer {analysis.space.layer})</h2><p>Cosine of each trait vector, minus the "
            f"mean over traits, with the axis and with PC1 of the roles; every layer is in persona_space.json.</p>"
            f'<div class="ends">{lists}</div>')


def _html_table(rows: list[tuple[str, str]]) -> str:
    """An HTML table of (key, value) rows, all text escaped."""
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _html_list(title: str, names: list[str], scores: Mapping[str, float]) -> str:
    """A titled ordered list of role names with their scores, escaped."""
    items = "".join(f"<li>{html.escape(n)} ({scores[n]:+.3f})</li>" for n in names)
    return f"<div><h3>{html.escape(title)}</h3><ol>{items}</ol></div>"


def _html_page(analysis: RunAnalysis, title: str, details: Mapping[str, Any] | None, figures: list[Path]) -> str:
    """The full report page; figures are referenced as figures/<name>."""
    space = analysis.space
    pc1, projection = space.pc1_loadings, space.axis_projection
    images = "".join(f'<img src="figures/{html.escape(p.name)}" alt="{html.escape(p.stem)}">' for p in figures)
    ends = (f'<h2>Ends of PC1</h2><div class="ends">{_html_list("Assistant end", space.pc1_top, pc1)}'
            f'{_html_list("far end", space.pc1_bottom, pc1)}</div>'
            f'<h2>Ends of the Assistant Axis</h2><div class="ends">'
            f'{_html_list("most Assistant-like", space.axis_top, projection)}'
            f'{_html_list("least Assistant-like", space.axis_bottom, projection)}</div>')
    groups = space.group_mean_axis_projection
    group_table = ("<h2>Mean axis projection per group</h2>"
                   + _html_table([(g, f"{v:+.3f}") for g, v in groups.items()])) if groups else ""
    detail_rows = [(str(k), str(v)) for k, v in (details or {}).items()]
    detail_table = f"<h2>Details</h2>{_html_table(detail_rows)}" if detail_rows else ""
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"
            f"{_html_table(headline(analysis))}<h2>Figures</h2>{images}{ends}{group_table}"
            f"{_html_traits(analysis)}{_html_dropped(analysis)}{detail_table}</body></html>\n")


def _markdown(analysis: RunAnalysis, title: str) -> str:
    """The headline figures and the ends of PC1 and the axis as Markdown."""
    space = analysis.space
    lines = [f"# {title}", "", "| figure | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in headline(analysis)]
    lines += ["", f"- PC1, Assistant end: {', '.join(space.pc1_top)}",
              f"- PC1, far end: {', '.join(space.pc1_bottom)}",
              f"- axis, most Assistant-like: {', '.join(space.axis_top)}",
              f"- axis, least Assistant-like: {', '.join(space.axis_bottom)}"]
    ends = analysis.trait_ends()
    if ends is not None:
        lines += [f"- traits toward the Assistant: {', '.join(n for n, _ in ends.axis_top)}",
                  f"- traits away from it: {', '.join(n for n, _ in ends.axis_bottom)}"]
    lines.append("")
    return "\n".join(lines)


def write_report(analysis: RunAnalysis, out_dir: Path, title: str,
                 details: Mapping[str, Any] | None = None) -> Path:
    """Write out_dir/report.html (figures in out_dir/figures/) and out_dir/report.md; return the HTML path."""
    out_dir = Path(out_dir)
    figures = write_figures(analysis, out_dir / "figures")
    page = out_dir / "report.html"
    page.write_text(_html_page(analysis, title, details, figures), encoding="utf-8")
    (out_dir / "report.md").write_text(_markdown(analysis, title), encoding="utf-8")
    return page
