"""The persona-space report: PNG figures, an escaped self-contained HTML page and a Markdown summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from persona_axis.persona_space import analyze_persona_space
from persona_axis.report import FIGURE_NAMES, write_figures, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_analysis(n_roles: int = 40, layers: int = 3, hidden: int = 16) -> dict[str, Any]:
    """An analysis of synthetic roles spread along one direction; one role is named '<script>'."""
    g = torch.Generator().manual_seed(0)
    default = torch.randn(layers, hidden, generator=g)
    direction = torch.nn.functional.normalize(torch.randn(layers, hidden, generator=g), dim=1)
    names = ["<script>"] + [f"role{i:02d}" for i in range(1, n_roles)]
    roles = {name: default - (i + 1) / n_roles * direction + 0.05 * torch.randn(layers, hidden, generator=g)
             for i, name in enumerate(names)}
    axis = default - torch.stack(list(roles.values())).mean(dim=0)
    groups = {name: "tagged & grouped" for name in names}
    return analyze_persona_space(roles, axis, layer=1, groups=groups)


@pytest.fixture(scope="module")
def analysis() -> dict[str, Any]:
    return make_analysis()


def test_write_figures_writes_valid_pngs(analysis: dict[str, Any], tmp_path: Path) -> None:
    paths = write_figures(analysis, tmp_path / "figs")
    assert [p.name for p in paths] == list(FIGURE_NAMES)
    for path in paths:
        assert path.read_bytes()[:8] == PNG_MAGIC
        assert path.stat().st_size > 5000


def test_figures_for_two_roles(tmp_path: Path) -> None:
    paths = write_figures(make_analysis(n_roles=2), tmp_path)
    assert all(p.read_bytes()[:8] == PNG_MAGIC for p in paths)


def test_report_html_has_headline_figures_and_escapes(analysis: dict[str, Any], tmp_path: Path) -> None:
    details = {"model": "tiny <b>model</b>", "roles_dropped": ["a", "b", "c", "d"], "min_score3_count": 10}
    page = write_report(analysis, tmp_path, title="Persona space & <axis>", details=details)
    assert page == tmp_path / "report.html"
    text = page.read_text(encoding="utf-8")
    cosines = analysis["cos_axis_pc1"]
    best = max(range(len(cosines)), key=cosines.__getitem__)
    for fragment in (f"{analysis['variance_explained'][0]:.3f}", f"{cosines[1]:.3f}", f"{cosines[best]:.3f}",
                     f"best cos(axis, PC1): layer {best}", "<td>40</td>", "<td>4</td>", "roles dropped",
                     "Persona space &amp; &lt;axis&gt;", "tiny &lt;b&gt;model&lt;/b&gt;", "tagged &amp; grouped"):
        assert fragment in text, fragment
    assert "<script>" not in text and "&lt;script&gt;" in text
    assert "<b>" not in text
    for name in FIGURE_NAMES:
        assert f'src="figures/{name}"' in text
        assert (tmp_path / "figures" / name).read_bytes()[:8] == PNG_MAGIC
    assert "<style>" in text and "http" not in text  # self-contained: no external resources


def test_report_markdown_has_headline_figures(analysis: dict[str, Any], tmp_path: Path) -> None:
    write_report(analysis, tmp_path, title="Persona space")
    markdown = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert markdown.startswith("# Persona space")
    assert f"| variance explained by PC1 | {analysis['variance_explained'][0]:.3f} |" in markdown
    assert f"| components for 70 % of the variance | {analysis['n_components_70']} |" in markdown
    assert "roles dropped" not in markdown
    assert ", ".join(analysis["axis_top"]) in markdown
