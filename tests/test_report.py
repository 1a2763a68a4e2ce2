"""The persona-space report: PNG figures, an escaped self-contained HTML page and a Markdown summary."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from itertools import combinations
from pathlib import Path
from typing import Any

import pytest
import torch
from matplotlib.figure import Figure
from matplotlib.text import Text

from persona_axis.build.persona_space import RunAnalysis, TraitAlignment, UnjudgedAlignment, analyze_persona_space
from persona_axis.build.report import (
    FIGURE_NAMES,
    LABEL_CHARS,
    N_LABELLED,
    build_figures,
    spread_positions,
    write_figures,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_analysis(n_roles: int = 40, layers: int = 3, hidden: int = 16) -> RunAnalysis:
    """An analysis of synthetic roles spread along one direction; one role is named '<script>'."""
    g = torch.Generator().manual_seed(0)
    default = torch.randn(layers, hidden, generator=g)
    direction = torch.nn.functional.normalize(torch.randn(layers, hidden, generator=g), dim=1)
    names = ["<script>"] + [f"role{i:02d}" for i in range(1, n_roles)]
    roles = {name: default - (i + 1) / n_roles * direction + 0.05 * torch.randn(layers, hidden, generator=g)
             for i, name in enumerate(names)}
    axis = default - torch.stack(list(roles.values())).mean(dim=0)
    groups = {name: "tagged & grouped" for name in names}
    return RunAnalysis(analyze_persona_space(roles, axis, layer=1, groups=groups))


@pytest.fixture(scope="module")
def analysis() -> RunAnalysis:
    return make_analysis()


def scatter_parts(fig: Figure) -> tuple[Any, list[Text]]:
    """The PC1/PC2 scatter's points and its role labels (texts of the two label columns)."""
    left, scatter, right = fig.axes[:3]
    [points] = scatter.collections
    return points, [*left.texts, *right.texts]


def test_figures_show_what_the_analysis_holds(analysis: RunAnalysis, tmp_path: Path) -> None:
    figures = build_figures(analysis)
    assert list(figures) == list(FIGURE_NAMES)
    [bars] = figures["variance_explained.png"].axes[0].containers
    assert [b.get_height() for b in bars] == pytest.approx(analysis.space.variance_explained)
    [line, *_] = figures["cos_axis_pc1.png"].axes[0].lines
    assert list(line.get_ydata()) == pytest.approx(analysis.space.cos_axis_pc1)
    points, labels = scatter_parts(figures["pc1_pc2.png"])
    assert len(points.get_offsets()) == 40
    pc1 = analysis.space.pc1_loadings
    low = sorted(pc1, key=lambda role: pc1[role])
    assert [t.get_text() for t in labels] == low[:N_LABELLED] + low[-N_LABELLED:]
    ranking = figures["axis_ranking.png"].axes[0]
    assert len(ranking.patches) == 30 and {t.get_text() for t in ranking.get_yticklabels()} >= set(low[:3] + low[-3:])
    paths = write_figures(analysis, tmp_path / "figs")
    assert [p.name for p in paths] == list(FIGURE_NAMES) and all(p.read_bytes()[:8] == PNG_MAGIC for p in paths)


def test_scatter_labels_of_many_long_named_roles_do_not_collide() -> None:
    long_names = {f"role{i:03d}": f"a_very_long_role_name_for_the_scatter_{i:03d}" for i in range(250)}
    analysis = make_analysis(n_roles=250)
    space = analysis.space
    renamed = {key: {long_names.get(r, r): v for r, v in (getattr(space, key) or {}).items()}
               for key in ("pc1_loadings", "pc2_loadings", "axis_projection")}
    fig = build_figures(replace(analysis, space=replace(space, **renamed)))["pc1_pc2.png"]
    points, labels = scatter_parts(fig)
    assert len(points.get_offsets()) == 250 and len(labels) == 2 * N_LABELLED
    assert all(len(t.get_text()) <= LABEL_CHARS for t in labels)
    assert len({t.get_text() for t in labels}) == len(labels)  # shortened names stay distinct
    fig.draw_without_rendering()
    boxes = [t.get_window_extent() for t in labels]
    assert not [(a, b) for a, b in combinations(boxes, 2) if a.overlaps(b)]


def test_labels_of_points_at_the_same_height_are_spread() -> None:
    assert spread_positions([0.5, 0.5, 0.5, 0.51], gap=0.1) == pytest.approx([0.5, 0.6, 0.7, 0.8])  # pushed up
    assert spread_positions([0.95, 0.99], gap=0.1) == pytest.approx([0.9, 1.0])  # and down from the top
    assert spread_positions([0.0, 0.99, 1.0], gap=0.6) == pytest.approx([0.0, 0.5, 1.0])  # gap shrinks to fit
    assert spread_positions([0.9, 0.1], gap=0.05) == [0.9, 0.1]  # far apart: left where they are


def test_figures_for_two_roles(tmp_path: Path) -> None:
    fig = build_figures(make_analysis(n_roles=2))["pc1_pc2.png"]
    points, labels = scatter_parts(fig)
    assert len(points.get_offsets()) == 2 and len(labels) == 2
    assert all(p.read_bytes()[:8] == PNG_MAGIC for p in write_figures(make_analysis(n_roles=2), tmp_path))


def test_importing_the_report_switches_no_backend() -> None:
    code = ("import matplotlib; matplotlib.use('svg'); import persona_axis.build.report; "
            "print(matplotlib.get_backend())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "svg"


def test_report_html_has_headline_figures_and_escapes(analysis: RunAnalysis, tmp_path: Path) -> None:
    details = {"model": "tiny <b>model</b>", "min_score3_count": 10}
    analysis = replace(analysis, roles_dropped={"a": 0, "b": 1, "c": 2, "<i>d": 0})
    page = write_report(analysis, tmp_path, title="Persona space & <axis>", details=details)
    assert page == tmp_path / "report.html"
    text = page.read_text(encoding="utf-8")
    cosines = analysis.space.cos_axis_pc1
    best = max(range(len(cosines)), key=cosines.__getitem__)
    for fragment in (f"{analysis.space.variance_explained[0]:.3f}", f"{cosines[1]:.3f}", f"{cosines[best]:.3f}",
                     f"best cos(axis, PC1): layer {best}", "<td>40</td>", "<td>4</td>", "roles dropped",
                     "Persona space &amp; &lt;axis&gt;", "tiny &lt;b&gt;model&lt;/b&gt;", "tagged &amp; grouped",
                     "<summary>4 roles dropped", "&lt;i&gt;d (0), a (0), b (1), c (2)"):
        assert fragment in text, fragment
    assert "<script>" not in text and "&lt;script&gt;" in text
    assert "<b>" not in text and "{'a'" not in text  # no raw Python dict on the page
    for name in FIGURE_NAMES:
        assert f'src="figures/{name}"' in text
        assert (tmp_path / "figures" / name).read_bytes()[:8] == PNG_MAGIC
    assert "<style>" in text and "http" not in text  # self-contained: no external resources


def test_report_markdown_has_headline_figures(analysis: RunAnalysis, tmp_path: Path) -> None:
    write_report(replace(analysis, roles_dropped={"a": 0, "b": 1}), tmp_path, title="Persona space")
    markdown = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert markdown.startswith("# Persona space")
    assert f"| variance explained by PC1 | {analysis.space.variance_explained[0]:.3f} |" in markdown
    assert f"| components for 70 % of the variance | {analysis.space.n_components_70} |" in markdown
    assert "| roles dropped (too few score-3 answers) | 2 |" in markdown
    assert "<details>" not in markdown  # the lists of dropped names are on the HTML page only
    assert ", ".join(analysis.space.axis_top) in markdown


def test_traits_get_a_figure_and_a_section(analysis: RunAnalysis, tmp_path: Path) -> None:
    # cosines per layer; the analysis reads them at its layer, 1
    traits = TraitAlignment(cos_axis={"calm": [0.0, 0.61, 0.0], "exact": [0.0, 0.4, 0.0], "wild": [0.0, -0.7, 0.0]},
                            cos_pc1={"calm": [0.0, 0.5, 0.0], "exact": [0.0, 0.1, 0.0], "wild": [0.0, -0.6, 0.0]})
    ranked = replace(analysis, traits_used=3, traits=traits, unjudged=UnjudgedAlignment(5, [0.1, 0.25, 0.3]))
    page = write_report(ranked, tmp_path, title="t")
    text = page.read_text(encoding="utf-8")
    assert "Traits along the axis (layer 1)" in text and "calm (+0.610)" in text and "wild (-0.700)" in text
    assert "every answer (no judge)</th><td>0.250</td>" in text and "traits used / dropped</th><td>3 / 0" in text
    assert (tmp_path / "figures" / "traits_axis.png").read_bytes()[:8] == PNG_MAGIC
    assert "- traits toward the Assistant: calm, exact" in (tmp_path / "report.md").read_text(encoding="utf-8")
    assert not (tmp_path / "plain" / "figures" / "traits_axis.png").exists()
    write_report(analysis, tmp_path / "plain", title="t")
    assert not (tmp_path / "plain" / "figures" / "traits_axis.png").exists()
