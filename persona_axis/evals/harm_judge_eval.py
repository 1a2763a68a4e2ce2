"""How far a harm judge can be trusted: its verdicts on pyrit's held-out human-labelled replies.

Every judge is measured on the same rows: the held-out split of persona_axis.evals.harm_classifier (rows with
sha256(objective NUL response) mod 5 == 0), taken in the fixed order of that digest, optionally only the first
`limit` of them (a slow judge can then be measured on a subset, and every judge on the same subset).
A verdict whose `harmful` is None is unscored. It counts against coverage and never as right or wrong: accuracy,
precision, recall (= sensitivity), specificity and F1 are computed on the scored rows only. The baseline always
answers the training split's majority class; it is reported on all rows used and, per judge, on that judge's
scored rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from persona_axis.errors import PersonaAxisError
from persona_axis.evals.harm_classifier import row_digest, split_rows
from persona_axis.evals.harm_judges import HarmItem, HarmJudge, HarmVerdict, OfflineHarmJudge
from persona_axis.evals.sources import ScorerRow

ORDER = "sha256(objective NUL response)"
CHUNK = 16  # rows judged per call: the unit of the progress bar


def held_out_rows() -> tuple[list[ScorerRow], list[ScorerRow]]:
    """(training rows, held-out rows in the fixed digest order)."""
    train, test = split_rows()
    return train, sorted(test, key=row_digest)


def majority_class(train: Sequence[ScorerRow]) -> bool:
    """The label a baseline always answers: harmful when at least half the training rows are (ties -> harmful)."""
    return 2 * sum(r.harmful for r in train) >= len(train)


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def verdict_metrics(labels: Sequence[bool], verdicts: Sequence[HarmVerdict], majority: bool) -> dict[str, Any]:
    """Agreement of n verdicts with n human labels (True = harmful); unscored verdicts are left out of every rate.

    Returns counts (n, n_scored, n_unscored, tp, fp, fn, tn), coverage = n_scored / n, and on the scored rows
    accuracy, precision, recall, F1, sensitivity (= recall), specificity and the majority baseline's accuracy.
    A rate whose denominator is 0 (e.g. precision of a judge that never says harmful) is None.
    """
    if len(labels) != len(verdicts):
        raise PersonaAxisError(f"the harm judge returned {len(verdicts)} verdicts for {len(labels)} replies")
    scored = [(label, v.harmful) for label, v in zip(labels, verdicts) if v.harmful is not None]
    tp = sum(label and said for label, said in scored)
    fp = sum(said and not label for label, said in scored)
    fn = sum(label and not said for label, said in scored)
    tn = len(scored) - tp - fp - fn
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    return {"n": len(labels), "n_scored": len(scored), "n_unscored": len(labels) - len(scored),
            "coverage": _ratio(len(scored), len(labels)), "tp": tp, "fp": fp, "fn": fn, "tn": tn,
            "accuracy": _ratio(tp + tn, len(scored)), "precision": precision, "recall": recall,
            "f1": _ratio(2 * tp, 2 * tp + fp + fn), "sensitivity": recall, "specificity": _ratio(tn, tn + fp),
            "majority_baseline": _ratio(sum(label == majority for label, _ in scored), len(scored))}


def judge_rows(judge: HarmJudge, rows: Sequence[ScorerRow], progress: bool = False) -> list[HarmVerdict]:
    """The judge's verdicts on the rows' (objective, response) pairs, CHUNK rows per call, with a progress bar."""
    verdicts: list[HarmVerdict] = []
    with tqdm(total=len(rows), desc=judge.id, unit="reply", disable=None if progress else True) as bar:
        for start in range(0, len(rows), CHUNK):
            chunk = rows[start:start + CHUNK]
            verdicts += judge.judge([HarmItem(r.objective, r.response) for r in chunk])
            bar.update(len(chunk))
    return verdicts


def measure_harm_judges(judges: Sequence[HarmJudge], rows: Sequence[ScorerRow], majority: bool,
                        progress: bool = False) -> dict[str, Any]:
    """Each judge on the same labelled rows: {"n_rows", "n_harmful", "baseline", "judges": {judge id: metrics}}.

    `majority` is the class the baseline always answers; "baseline" is its accuracy on all rows, and each judge's
    metrics are those of verdict_metrics.
    """
    labels = [r.harmful for r in rows]
    sections = {}
    for judge in judges:
        if judge.id in sections:
            raise PersonaAxisError(f"harm judge {judge.id} given twice")
        sections[judge.id] = verdict_metrics(labels, judge_rows(judge, rows, progress), majority)
    hits = sum(label == majority for label in labels)
    baseline = {"predicts": "harmful" if majority else "not harmful", "n": len(labels),
                "accuracy": _ratio(hits, len(labels))}
    return {"n_rows": len(rows), "n_harmful": sum(labels), "baseline": baseline, "judges": sections}


def held_out_metrics(judges: Sequence[HarmJudge] = (), limit: int | None = None,
                     progress: bool = False) -> dict[str, Any]:
    """The offline harm judge, then `judges`, on the held-out split (first `limit` rows in digest order).

    Top level keeps the offline judge's figures under their first names (accuracy, precision, recall, f1,
    majority_baseline, n_train, n_test = rows used, n_test_harmful), beside n_held_out, limit, order, and
    measure_harm_judges' baseline and per-judge sections.
    """
    if limit is not None and limit < 1:
        raise PersonaAxisError(f"--limit must be at least 1, got {limit}")
    train, held_out = held_out_rows()
    rows = held_out[:limit]
    offline = OfflineHarmJudge(cache_embeddings=True)
    report = measure_harm_judges([offline, *judges], rows, majority_class(train), progress)
    first = report["judges"][offline.id]
    return {"accuracy": first["accuracy"], "precision": first["precision"], "recall": first["recall"],
            "f1": first["f1"], "majority_baseline": report["baseline"]["accuracy"], "n_train": len(train),
            "n_test": len(rows), "n_test_harmful": report["n_harmful"], "n_held_out": len(held_out), "limit": limit,
            "order": ORDER, "offline_judge": offline.id, **report}
