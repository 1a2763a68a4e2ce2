"""Figures and a self-contained HTML (plus Markdown) report of a persona-space analysis.

The input is the dict returned by persona_axis.persona_space.analyze_persona_space.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

N_LABELLED = 5
N_RANKED = 15
FIGURE_NAMES = ("variance_explained.png", "pc1_pc2.png", "cos_axis_pc1.png", "axis_ranking.png")

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
    """Save a figure as PNG and close it."""
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _variance_figure(analysis: Mapping[str, Any]) -> Figure:
    """Bars of the variance explained per component, the cumulative share, and the 70 % line."""
    shares = analysis["variance_explained"]
    ks = list(range(1, len(shares) + 1))
    cumulative = [sum(shares[:k]) for k in ks]
    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    ax.bar(ks, shares, color="tab:blue", label="per component")
    ax.plot(ks, cumulative, "o-", color="tab:orange", label="cumulative")
    ax.axhline(0.70, color="grey", linestyle="--", linewidth=1, label="70 %")
    ax.set(xlabel="principal component", ylabel="fraction of variance", ylim=(0, 1.05), xticks=ks,
           title=f"Variance explained (layer {analysis['layer']})")
    ax.legend()
    return fig


def _pc_scatter_figure(analysis: Mapping[str, Any]) -> Figure:
    """Roles on PC1/PC2 coloured by their axis projection; the roles at each end of PC1 are labelled."""
    pc1 = analysis["pc1_loadings"]
    pc2 = analysis.get("pc2_loadings", {})
    roles = list(pc1)
    xs, ys = [pc1[r] for r in roles], [pc2.get(r, 0.0) for r in roles]
    fig, ax = plt.subplots(figsize=(7, 5.5), layout="constrained")
    points = ax.scatter(xs, ys, c=[analysis["axis_projection"][r] for r in roles], cmap="viridis", s=25)
    fig.colorbar(points, ax=ax, label="projection on the Assistant Axis")
    ordered = sorted(roles, key=lambda r: pc1[r])
    for role in dict.fromkeys(ordered[:N_LABELLED] + ordered[-N_LABELLED:]):
        ax.annotate(role, (pc1[role], pc2.get(role, 0.0)), fontsize=8, xytext=(3, 3), textcoords="offset points")
    ax.set(xlabel="PC1 (Assistant end →)", ylabel="PC2" if pc2 else "PC2 (not available)",
           title=f"Roles on the first two components (layer {analysis['layer']})")
    return fig


def _cosine_figure(analysis: Mapping[str, Any]) -> Figure:
    """cos(axis, PC1) per layer, with the analysis layer marked."""
    cosines = analysis["cos_axis_pc1"]
    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    ax.plot(range(len(cosines)), cosines, "o-", markersize=3)
    ax.axvline(analysis["layer"], color="grey", linestyle="--", linewidth=1, label=f"layer {analysis['layer']}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="layer", ylabel="cos(axis, PC1)", ylim=(0, 1.02), title="Alignment of the axis with PC1")
    ax.legend()
    return fig


def _ranking_figure(analysis: Mapping[str, Any]) -> Figure:
    """Horizontal bars of the roles highest and lowest along the axis (up to 15 at each end).

    Bars are relative to the mean projection over all roles, so a large common offset does not hide
    the differences between roles.
    """
    projection = analysis["axis_projection"]
    mean = sum(projection.values()) / len(projection)
    ordered = sorted(projection, key=lambda r: projection[r])
    truncated = len(ordered) > 2 * N_RANKED
    shown = ordered[:N_RANKED] + ordered[-N_RANKED:] if truncated else ordered
    values = [projection[r] - mean for r in shown]
    colours = ["tab:green" if v >= 0 else "tab:red" for v in values]
    fig, ax = plt.subplots(figsize=(7, max(3.0, 0.22 * len(shown) + 1)), layout="constrained")
    ax.barh(range(len(shown)), values, color=colours)
    if truncated:
        ax.axhline(N_RANKED - 0.5, color="grey", linestyle=":", linewidth=1)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(shown)), shown, fontsize=8)
    ax.set(xlabel=f"projection on the unit axis − mean over roles ({mean:+.2f})",
           title=f"Roles along the Assistant Axis (layer {analysis['layer']})")
    return fig


def write_figures(analysis: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """Write the four PNG figures of an analysis into out_dir (created if needed); return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    builders = (_variance_figure, _pc_scatter_figure, _cosine_figure, _ranking_figure)
    return [_save(build(analysis), out_dir / name) for build, name in zip(builders, FIGURE_NAMES)]


def headline(analysis: Mapping[str, Any], details: Mapping[str, Any] | None = None) -> list[tuple[str, str]]:
    """The headline figures of an analysis as (label, formatted value) pairs."""
    cosines = analysis["cos_axis_pc1"]
    best = max(range(len(cosines)), key=lambda layer: cosines[layer])
    rows = [("layers", str(analysis["layers"])), ("roles used", str(analysis["n_roles_used"]))]
    if details and "roles_dropped" in details:
        dropped = details["roles_dropped"]
        rows.append(("roles dropped", str(len(dropped) if isinstance(dropped, (list, tuple, set)) else dropped)))
    rows += [
        ("analysis layer", str(analysis["layer"])),
        ("variance explained by PC1", f"{analysis['variance_explained'][0]:.3f}"),
        ("components for 70 % of the variance", str(analysis["n_components_70"])),
        (f"cos(axis, PC1) at layer {analysis['layer']}", f"{cosines[analysis['layer']]:.3f}"),
        (f"best cos(axis, PC1): layer {best}", f"{cosines[best]:.3f}"),
    ]
    return rows


def _html_table(rows: list[tuple[str, str]]) -> str:
    """An HTML table of (key, value) rows, all text escaped."""
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _html_list(title: str, names: list[str], scores: Mapping[str, float]) -> str:
    """A titled ordered list of role names with their scores, escaped."""
    items = "".join(f"<li>{html.escape(n)} ({scores[n]:+.3f})</li>" for n in names)
    return f"<div><h3>{html.escape(title)}</h3><ol>{items}</ol></div>"


def _html_page(analysis: Mapping[str, Any], title: str, details: Mapping[str, Any] | None,
               figures: list[Path]) -> str:
    """The full report page; figures are referenced as figures/<name>."""
    pc1, projection = analysis["pc1_loadings"], analysis["axis_projection"]
    images = "".join(f'<img src="figures/{html.escape(p.name)}" alt="{html.escape(p.stem)}">' for p in figures)
    ends = (f'<h2>Ends of PC1</h2><div class="ends">{_html_list("Assistant end", analysis["pc1_top"], pc1)}'
            f'{_html_list("far end", analysis["pc1_bottom"], pc1)}</div>'
            f'<h2>Ends of the Assistant Axis</h2><div class="ends">'
            f'{_html_list("most Assistant-like", analysis["axis_top"], projection)}'
            f'{_html_list("least Assistant-like", analysis["axis_bottom"], projection)}</div>')
    groups = analysis.get("group_mean_axis_projection")
    group_table = ("<h2>Mean axis projection per group</h2>"
                   + _html_table([(g, f"{v:+.3f}") for g, v in groups.items()])) if groups else ""
    detail_rows = [(str(k), str(v)) for k, v in (details or {}).items()]
    detail_table = f"<h2>Details</h2>{_html_table(detail_rows)}" if detail_rows else ""
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"
            f"{_html_table(headline(analysis, details))}<h2>Figures</h2>{images}{ends}{group_table}"
            f"{detail_table}</body></html>\n")


def _markdown(analysis: Mapping[str, Any], title: str, details: Mapping[str, Any] | None) -> str:
    """The headline figures and the ends of PC1 and the axis as Markdown."""
    lines = [f"# {title}", "", "| figure | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in headline(analysis, details)]
    lines += ["", f"- PC1, Assistant end: {', '.join(analysis['pc1_top'])}",
              f"- PC1, far end: {', '.join(analysis['pc1_bottom'])}",
              f"- axis, most Assistant-like: {', '.join(analysis['axis_top'])}",
              f"- axis, least Assistant-like: {', '.join(analysis['axis_bottom'])}", ""]
    return "\n".join(lines)


def write_report(analysis: Mapping[str, Any], out_dir: Path, title: str,
                 details: Mapping[str, Any] | None = None) -> Path:
    """Write out_dir/report.html (figures in out_dir/figures/) and out_dir/report.md; return the HTML path."""
    out_dir = Path(out_dir)
    figures = write_figures(analysis, out_dir / "figures")
    page = out_dir / "report.html"
    page.write_text(_html_page(analysis, title, details, figures), encoding="utf-8")
    (out_dir / "report.md").write_text(_markdown(analysis, title, details), encoding="utf-8")
    return page
