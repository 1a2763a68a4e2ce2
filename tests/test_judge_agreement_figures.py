"""The published offline-judge agreement figures are what `judge-eval --fold B --json` prints today.

The table is parsed out of the documentation (README.md or docs/results.md, wherever the section
"Offline judge agreement" with its table is), so an edit of the published figures that no longer
matches the judge, or a judge change that no longer matches them, turns this red.
docs/offline-judge.md's "after" rows describe the same judge and are held to the same output.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import pytest

from persona_axis.cli import main

ROOT = Path(__file__).resolve().parent.parent
LABELS = {"smollm2": ROOT / "docs/judge-labels/labelled.jsonl", "qwen": ROOT / "docs/judge-labels/qwen-sample.jsonl"}
HEADING = "offline judge agreement"
NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")
COUNT = re.compile(r"\((\d+)\s*(?:of|/)\s*(\d+)\)")


def _sample(cell: str) -> str:
    name = cell.lower()
    hits = [key for key in LABELS if key in name]
    assert len(hits) == 1, f"cannot tell which labelled sample the row {cell!r} is"
    return hits[0]


def _cell(cell: str) -> dict[str, float | tuple[int, int] | None]:
    """'0.300 (3 of 10)' -> {'value': 0.3, 'count': (3, 10)}."""
    number = NUMBER.search(cell)
    count = COUNT.search(cell)
    return {"value": float(number.group()) if number else None,
            "count": (int(count.group(1)), int(count.group(2))) if count else None}


def _table_after(text: str, start: int) -> list[dict[str, str]]:
    """The first Markdown table after offset `start`, as rows keyed by lower-cased header."""
    lines = text[start:].splitlines()
    first = next(k for k, line in enumerate(lines) if line.lstrip().startswith("|"))
    block = []
    for line in lines[first:]:
        if not line.lstrip().startswith("|"):
            break
        block.append([c.strip() for c in line.strip().strip("|").split("|")])
    header, rows = [h.lower() for h in block[0]], block[2:]
    return [dict(zip(header, row)) for row in rows]


def _readme_table() -> tuple[Path, str, list[dict[str, str]]]:
    """(file, its text from the section's start, the table's rows): the first mention of the section
    followed by a table with the agreement columns."""
    for path in (ROOT / "README.md", ROOT / "docs" / "results.md"):
        if not path.exists():
            continue
        text = path.read_text(encoding="utf-8")
        for found in re.finditer(re.escape(HEADING), text, flags=re.IGNORECASE):
            rows = _table_after(text, found.start())
            if rows and {"sample", "n"} <= set(rows[0]) and any("exact" in k for k in rows[0]):
                return path, text[found.start():], rows
    raise AssertionError(f"no '{HEADING}' table in README.md or docs/results.md")


def _column(row: dict[str, str], *words: str) -> str:
    keys = [k for k in row if all(w in k for w in words)]
    assert len(keys) == 1, f"expected one column naming {words}, found {keys} in {list(row)}"
    return row[keys[0]]


@pytest.fixture(scope="module")
def outputs() -> dict[str, dict]:
    """`persona-axis judge-eval LABELS --fold B --json` for each labelled sample."""
    out = {}
    for sample, path in LABELS.items():
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            assert main(["judge-eval", str(path), "--fold", "B", "--json"]) == 0
        out[sample] = json.loads(buffer.getvalue())
    return out


def _check_row(row: dict[str, str], report: dict, *, exact: str, majority: str, precision: str, base: str,
               recall: str) -> None:
    confusion = report["confusion"]
    said3 = sum(confusion[label]["3"] for label in confusion)
    true3, are3 = confusion["3"]["3"], sum(confusion["3"].values())
    assert int(_cell(row["n"])["value"]) == report["n"]
    assert _cell(_column(row, *exact.split()))["value"] == pytest.approx(report["exact_agreement"], abs=5e-4)
    assert _cell(_column(row, *majority.split()))["value"] == pytest.approx(report["majority_agreement"], abs=5e-4)
    assert _cell(_column(row, *base.split()))["value"] == pytest.approx(report["score3_base_rate"], abs=5e-4)
    for words, figure, counts in ((precision, "score3_precision", (true3, said3)), (recall, "score3_recall",
                                                                                     (true3, are3))):
        cell = _cell(_column(row, *words.split()))
        assert cell["value"] == pytest.approx(report[figure], abs=5e-4), words
        if cell["count"] is not None:
            assert cell["count"] == counts, words


def test_readme_agreement_table_equals_judge_eval_output(outputs: dict[str, dict]) -> None:
    path, _, rows = _readme_table()
    assert sorted(_sample(r["sample"]) for r in rows) == sorted(LABELS), path
    for row in rows:
        report = outputs[_sample(row["sample"])]
        # The README's baseline column is "always answering 1": the majority label must be 1 for that to hold.
        assert "always answering 1" in " ".join(row) and report["majority_label"] == 1
        _check_row(row, report, exact="exact", majority="always", precision="precision", base="share",
                   recall="recall")


def test_readme_enrichment_figures_follow_from_the_table(outputs: dict[str, dict]) -> None:
    """The prose after the table: score-3 precision as a multiple of the base rate, and the Qwen fold's count."""
    _, section, _ = _readme_table()
    ratios = re.search(r"\((\d+(?:\.\d+)?)× and (\d+(?:\.\d+)?)× the base", section)
    assert ratios is not None, "the enrichment sentence is gone: update this test with the README"
    for sample, stated in zip(("smollm2", "qwen"), ratios.groups()):
        report = outputs[sample]
        assert float(stated) == pytest.approx(report["score3_precision"] / report["score3_base_rate"], abs=0.05)
    holds = re.search(r"Qwen fold holds only (\d+)", section)
    assert holds is not None and int(holds.group(1)) == sum(outputs["qwen"]["confusion"]["3"].values())


def test_offline_judge_doc_after_rows_equal_judge_eval_output(outputs: dict[str, dict]) -> None:
    text = (ROOT / "docs" / "offline-judge.md").read_text(encoding="utf-8")
    rows = [r for r in _table_after(text, text.find("Held-out fold B")) if r["judge"].startswith("after")]
    assert sorted(_sample(r["sample"]) for r in rows) == sorted(LABELS)
    for row in rows:
        _check_row(row, outputs[_sample(row["sample"])], exact="exact", majority="majority", precision="precision",
                   base="base rate", recall="recall")
