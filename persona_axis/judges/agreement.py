"""How well a judge agrees with careful labels: confusion matrix, exact agreement, score-3 precision/recall.

Score 3 is what matters most downstream (role vectors average only score-3 answers), so its
precision and recall are reported beside the full 0-3 agreement.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from persona_axis.errors import PersonaAxisError
from persona_axis.judges.base import SCORES, Judge, JudgeItem


def read_labels(path: str | Path, fold: str | None = None) -> list[tuple[JudgeItem, int]]:
    """Labelled replies from JSONL lines {"role", "description", "question", "response", "label" (0-3)}.

    fold: keep only lines whose "fold" field equals it (e.g. tune on fold A, report on fold B).
    """
    pairs = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if fold is not None and row.get("fold") != fold:
                continue
            item = JudgeItem(row["role"], row.get("description", ""), row["question"], row["response"])
            label = int(row["label"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise PersonaAxisError(f"{path} line {number}: not a labelled reply ({exc})") from None
        if label not in SCORES:
            raise PersonaAxisError(f"{path} line {number}: label must be 0-3, not {label}")
        pairs.append((item, label))
    return pairs


def agreement(labels: Sequence[int], predicted: Sequence[int | None]) -> dict[str, Any]:
    """confusion[label][predicted] over 0-3 plus "unscored"; exact agreement; score-3 precision and recall.

    Beside them, the baselines a judge must beat: score3_base_rate (the share labelled 3, which
    is the precision of calling everything 3) and majority_agreement (the exact agreement of
    always answering majority_label, the most common label; ties go to the lower score).
    """
    confusion = {str(a): {**{str(b): 0 for b in SCORES}, "unscored": 0} for a in SCORES}
    for label, guess in zip(labels, predicted):
        confusion[str(label)]["unscored" if guess is None else str(guess)] += 1
    n = len(labels)
    exact = sum(1 for a, b in zip(labels, predicted) if a == b)
    true3 = sum(1 for a, b in zip(labels, predicted) if a == 3 and b == 3)
    said3 = sum(1 for b in predicted if b == 3)
    are3 = sum(1 for a in labels if a == 3)
    counts = {score: sum(1 for a in labels if a == score) for score in SCORES}
    majority = max(SCORES, key=lambda score: (counts[score], -score))
    return {
        "n": n,
        "exact_agreement": round(exact / n, 3) if n else None,
        "score3_precision": round(true3 / said3, 3) if said3 else None,
        "score3_recall": round(true3 / are3, 3) if are3 else None,
        "score3_base_rate": round(are3 / n, 3) if n else None,
        "majority_label": majority if n else None,
        "majority_agreement": round(counts[majority] / n, 3) if n else None,
        "confusion": confusion,
    }


def evaluate_judge(judge: Judge, labelled: Sequence[tuple[JudgeItem, int]]) -> dict[str, Any]:
    """Score the labelled replies with `judge` and compare with the labels."""
    verdicts = judge.score([item for item, _ in labelled])
    return {"judge": judge.id, **agreement([label for _, label in labelled], [v.score for v in verdicts])}
