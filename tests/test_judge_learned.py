"""The learned offline role judge: shipped weights, deterministic scores, a reproducible rebuild, judge-eval."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from persona_axis.catalog import load_catalog
from persona_axis.cli import main
from persona_axis.errors import PersonaAxisError
from persona_axis.judges import make_judge
from persona_axis.judges.agreement import read_labels
from persona_axis.judges.base import JudgeItem
from persona_axis.judges.learned import FEATURES, WEIGHTS_FILE, LearnedJudge, decide, load_weights
from persona_axis.judges.offline import OfflineJudge

REPO = Path(__file__).resolve().parents[1]
QWEN_2 = REPO / "docs" / "judge-labels" / "qwen-sample-2.jsonl"
# Fold-A rows of qwen-sample-2 (training rows: this pins behaviour, it measures nothing) and the scores the
# shipped weights give them; each is at least 0.2 in probability away from a different decision.
PINNED_ROWS = {0: 1, 17: 1, 23: 3, 26: 3, 55: 0, 62: 0}


@pytest.fixture(scope="module")
def judge() -> LearnedJudge:
    return LearnedJudge()


def test_shipped_weights_load_and_match_the_features() -> None:
    params = load_weights()
    assert params["features"] == list(FEATURES) and params["train_fold"] == "A"
    assert np.asarray(params["coef"]).shape[0] == 4 and 0.0 < params["p3_threshold"] < 1.0
    assert params["n_train"] == sum(params["train_labels"].values()) > 400


def test_unreadable_or_mismatched_weights_are_one_line_errors(tmp_path: Path) -> None:
    bad = tmp_path / "w.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(PersonaAxisError, match="unreadable"):
        LearnedJudge(bad)
    params = json.loads(WEIGHTS_FILE.read_text(encoding="utf-8"))
    bad.write_text(json.dumps({**params, "features": params["features"][:-1]}), encoding="utf-8")
    with pytest.raises(PersonaAxisError, match="do not match"):
        load_weights(bad)


def test_decision_rule_gates_score3_on_its_threshold() -> None:
    p = np.array([[0.1, 0.2, 0.3, 0.4], [0.5, 0.2, 0.1, 0.2], [0.0, 0.3, 0.2, 0.5]])
    assert decide(p, 0.45).tolist() == [2, 0, 3]
    assert decide(p, 0.35).tolist() == [3, 0, 3]
    assert decide(p, 0.9).tolist() == [2, 0, 1]


def test_labelled_rows_score_deterministically(judge: LearnedJudge) -> None:
    rows = read_labels(QWEN_2, "A")
    items = [rows[k][0] for k in PINNED_ROWS]
    first = judge.score(items)
    again = LearnedJudge().score(items)
    assert [v.score for v in first] == list(PINNED_ROWS.values())
    assert [(v.score, v.rationale) for v in first] == [(v.score, v.rationale) for v in again]
    assert {v.judge for v in first} == {"offline:minilm-logreg-v3"}
    p = judge.role_probabilities(items)
    assert p.shape == (len(items), 4) and np.allclose(p.sum(1), 1.0)


def test_empty_replies_are_unscored_and_traits_use_the_offline_rules(judge: LearnedJudge) -> None:
    trait = load_catalog().traits[0]
    items = [JudgeItem("pirate_captain", "A weathered pirate captain.", "How are you?", "   "),
             JudgeItem(trait.name, trait.description, "How are you?", "I'm sorry, but I can't help with that.",
                       kind="trait")]
    empty, refused = judge.score(items)
    assert empty.score is None and "empty" in empty.rationale
    assert refused.score == 0 and refused.rationale.startswith("trait rules")
    built = make_judge("offline-learned", traits=load_catalog().traits)
    assert isinstance(built, OfflineJudge) and built.id.endswith("-traits")
    assert make_judge("offline-learned").id == "offline:minilm-logreg-v3"


def test_training_script_reproduces_the_shipped_weights() -> None:
    """A full rebuild from fold A (embeddings cached after the first run; about 30 s without the cache)."""
    from persona_axis.judges.train_learned import fit_role_judge

    rebuilt = json.loads(json.dumps(fit_role_judge()))
    shipped = json.loads(WEIGHTS_FILE.read_text(encoding="utf-8"))
    arrays = ("coef", "intercept", "mean", "scale")
    assert {k: v for k, v in rebuilt.items() if k not in arrays} == {k: v for k, v in shipped.items()
                                                                      if k not in arrays}
    for key in arrays:
        assert np.allclose(rebuilt[key], shipped[key], rtol=1e-5, atol=1e-6), key


def test_judge_eval_with_the_learned_judge(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = [line for line in QWEN_2.read_text(encoding="utf-8").splitlines() if line.strip()]
    sample = tmp_path / "labels.jsonl"
    sample.write_text("\n".join(lines[k] for k in range(70)) + "\n", encoding="utf-8")
    assert main(["judge-eval", str(sample), "--fold", "A", "--judge", "offline-learned", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = read_labels(sample, "A")
    assert report["judge"] == "offline:minilm-logreg-v3" and report["n"] == len(rows)
    judged = [v.score for v in LearnedJudge().score([item for item, _ in rows])]
    assert report["exact_agreement"] == pytest.approx(
        round(sum(a == b for (_, a), b in zip(rows, judged)) / len(rows), 3))
    assert sum(row["3"] for row in report["confusion"].values()) == judged.count(3)


DOC_FILES = {"smollm2 sample 1": "labelled.jsonl", "qwen sample 1": "qwen-sample.jsonl",
             "smollm2 sample 2": "smollm2-sample-2.jsonl", "qwen sample 2": "qwen-sample-2.jsonl"}


THIRD_FILES = {"smollm2 sample 3": "smollm2-sample-3.jsonl", "qwen sample 3": "qwen-sample-3.jsonl"}


def _table_rows(heading: str) -> list[dict[str, str]]:
    """The rows of the first table under `heading` in docs/offline-judge.md, as {column (lower case): cell}."""
    text = (REPO / "docs" / "offline-judge.md").read_text(encoding="utf-8")
    section = text[text.index(heading):]
    lines = section[section.index("| sample | judge |"):].splitlines()
    table = []
    for line in lines:
        if not line.startswith("|"):
            break
        table.append([c.strip() for c in line.strip("|").split("|")])
    header = [h.lower() for h in table[0]]
    return [dict(zip(header, row)) for row in table[2:]]


def _learned_rows() -> list[dict[str, str]]:
    """The 'learned' rows of the fold-B table in docs/offline-judge.md's section on the learned judge."""
    return [row for row in _table_rows("## A learned judge") if row["judge"].startswith("learned")]


def _check_row(row: dict[str, str], report: dict) -> None:
    """One documented row (n, exact, majority baseline, score-3 precision and recall) against judge-eval's report."""
    confusion = report["confusion"]
    true3 = confusion["3"]["3"]
    said3, are3 = sum(confusion[k]["3"] for k in confusion), sum(confusion["3"].values())
    assert int(row["n"]) == report["n"]
    assert float(row["exact"]) == pytest.approx(report["exact_agreement"], abs=5e-4)
    assert float(row["majority baseline (always 1)"]) == pytest.approx(report["majority_agreement"], abs=5e-4)
    assert row["score-3 precision"] == f"{true3 / said3:.3f} ({true3}/{said3})"
    assert row["score-3 recall"] == f"{true3 / are3:.3f} ({true3}/{are3})"


def test_documented_fold_b_figures_are_what_the_judge_gives(judge: LearnedJudge) -> None:
    """The published held-out figures of the learned judge, recomputed (fold B of the four labelled files)."""
    from persona_axis.judges.agreement import evaluate_judge

    rows = _learned_rows()
    assert sorted(r["sample"].lower() for r in rows) == sorted(DOC_FILES)
    for row in rows:
        _check_row(row, evaluate_judge(judge, read_labels(REPO / "docs" / "judge-labels" /
                                                          DOC_FILES[row["sample"].lower()], "B")))


def test_documented_third_sample_figures_are_what_both_judges_give(judge: LearnedJudge) -> None:
    """The third samples (never used to fit or tune either judge), every row, rules and learned, recomputed."""
    from persona_axis.judges.agreement import evaluate_judge

    rows = _table_rows("## Third labelled samples")
    assert sorted((r["sample"].lower(), r["judge"].split()[0]) for r in rows) == sorted(
        (sample, kind) for sample in THIRD_FILES for kind in ("rules", "learned"))
    rules = make_judge("offline")
    for row in rows:
        labels = read_labels(REPO / "docs" / "judge-labels" / THIRD_FILES[row["sample"].lower()])
        _check_row(row, evaluate_judge(judge if row["judge"].startswith("learned") else rules, labels))
