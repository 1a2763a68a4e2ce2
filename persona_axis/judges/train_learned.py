"""Rebuild the learned role judge's weights (persona_axis/data/role_judge_logreg.json) from fold A of the labels.

Run from the repository root: `python -m persona_axis.judges.train_learned` (add `--check` to compare with the
shipped file instead of writing it). Only lines with "fold": "A" of the four labelled files are read; fold B is
never touched here. Every choice is made by 5-fold cross-validation within fold A, grouped by role (a role's
replies are all in one CV fold, so the model cannot score well by remembering roles), stratified by label, and
repeated CV_REPEATS times with different seeds (out-of-fold figures pooled over the repeats):
  1. the model: embedding_block in {False, True} x C in C_GRID, by mean out-of-fold log loss;
  2. the score-3 rule: P(3) >= p3_threshold, the lowest threshold in P3_GRID whose out-of-fold score-3
     precision is at least P3_TARGET (the lowest keeps the most recall; if none reaches it, the most precise one).
Embeddings of the labelled texts are cached (persona_axis.evals.harm_classifier.cached_embed), so a rebuild
after the first one takes seconds; the fit itself is deterministic (lbfgs, fixed fold seed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from persona_axis.judges.agreement import read_labels
from persona_axis.judges.base import SCORES, JudgeItem
from persona_axis.judges.learned import FEATURES, JUDGE_VERSION, WEIGHTS_FILE, Embed, decide, role_features

REPO = Path(__file__).resolve().parents[2]
LABEL_FILES = ("docs/judge-labels/labelled.jsonl", "docs/judge-labels/qwen-sample.jsonl",
               "docs/judge-labels/smollm2-sample-2.jsonl", "docs/judge-labels/qwen-sample-2.jsonl")
TRAIN_FOLD = "A"
C_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
P3_GRID = tuple(round(0.3 + 0.05 * k, 2) for k in range(14))  # 0.30 ... 0.95
P3_TARGET = 0.75  # the goal (score-3 precision 0.7 on fold B) plus a margin for optimism and noise
CV_FOLDS = 5
CV_REPEATS = 5
SEED = 0


def training_rows(root: Path = REPO, files: Sequence[str] = LABEL_FILES) -> list[tuple[JudgeItem, int]]:
    """Fold-A (item, label) pairs of the labelled files, in file then line order."""
    return [pair for name in files for pair in read_labels(root / name, TRAIN_FOLD)]


def _fit(x: np.ndarray, y: np.ndarray, c: float) -> dict[str, Any]:
    """Standardise, fit multinomial logistic regression; parameters in the shipped JSON's layout."""
    from sklearn.linear_model import LogisticRegression

    mean = x.mean(0)
    scale = x.std(0)
    scale[scale < 1e-9] = 1.0
    model = LogisticRegression(C=c, max_iter=10000).fit((x - mean) / scale, y)
    coef = np.zeros((len(SCORES), x.shape[1]))
    intercept = np.full(len(SCORES), -30.0)  # a score absent from the training labels is never predicted
    for row, label in enumerate(model.classes_):
        coef[int(label)], intercept[int(label)] = model.coef_[row], model.intercept_[row]
    return {"mean": mean.tolist(), "scale": scale.tolist(), "coef": coef.tolist(), "intercept": intercept.tolist()}


def _out_of_fold(x: np.ndarray, y: np.ndarray, groups: Sequence[str], c: float) -> np.ndarray:
    """Out-of-fold P(0..3) [CV_REPEATS, n, 4]: CV_FOLDS-fold CV grouped by role, repeated with seeds SEED, SEED+1..."""
    from sklearn.model_selection import StratifiedGroupKFold

    from persona_axis.judges.learned import probabilities

    p = np.zeros((CV_REPEATS, len(y), len(SCORES)))
    for repeat in range(CV_REPEATS):
        folds = StratifiedGroupKFold(CV_FOLDS, shuffle=True, random_state=SEED + repeat)
        for train, test in folds.split(x, y, groups):
            p[repeat, test] = probabilities(x[test], _fit(x[train], y[train], c))
    return p


def _log_loss(p: np.ndarray, y: np.ndarray) -> float:
    """Mean log loss over repeats and rows of out-of-fold P [repeats, n, 4]."""
    return float(-np.log(np.clip(p[:, np.arange(len(y)), y], 1e-12, 1.0)).mean())


def _rule_metrics(p: np.ndarray, y: np.ndarray, threshold: float) -> dict[str, float]:
    """Exact agreement and score-3 precision/recall of `decide` at threshold, pooled over the CV repeats."""
    pred = np.stack([decide(r, threshold) for r in p])  # [repeats, n]
    said = int((pred == 3).sum())
    hit = int(((pred == 3) & (y == 3)).sum())
    return {"exact": round(float((pred == y).mean()), 4), "precision3": round(hit / said if said else 0.0, 4),
            "recall3": round(hit / (int((y == 3).sum()) * len(p)), 4), "judged3": round(said / len(p), 1)}


def _data_sha(rows: Sequence[tuple[JudgeItem, int]]) -> str:
    blob = [[i.role, i.description, i.question, i.response, label] for i, label in rows]
    return hashlib.sha256(json.dumps(blob).encode()).hexdigest()


def fit_role_judge(embed: Embed | None = None, root: Path = REPO,
                   files: Sequence[str] = LABEL_FILES) -> dict[str, Any]:
    """Fit on fold A with every choice cross-validated in fold A; the JSON-ready parameters and their provenance."""
    from persona_axis.catalog import load_catalog

    if embed is None:
        from persona_axis.evals.harm_classifier import cached_embed

        embed = cached_embed
    rows = training_rows(root, files)
    reference = [(r.name, r.description) for r in load_catalog().roles]
    items = [item for item, _ in rows]
    y = np.array([label for _, label in rows])
    groups = [item.role for item in items]
    full = role_features(items, embed, reference, embedding_block=True)
    cv: dict[str, dict[str, float]] = {}
    oof: dict[tuple[bool, float], np.ndarray] = {}
    for block in (False, True):
        x = full if block else full[:, :len(FEATURES)]
        for c in C_GRID:
            p = _out_of_fold(x, y, groups, c)
            oof[block, c] = p
            cv[f"block={int(block)} C={c:g}"] = {"log_loss": round(_log_loss(p, y), 5),
                                                 "exact": round(float((p.argmax(2) == y).mean()), 4)}
    block, c = min(oof, key=lambda k: (_log_loss(oof[k], y), k[0], k[1]))
    p = oof[block, c]
    thresholds = {f"{t:.2f}": _rule_metrics(p, y, t) for t in P3_GRID}
    passing = [t for t in P3_GRID if thresholds[f"{t:.2f}"]["precision3"] >= P3_TARGET]
    p3_threshold = passing[0] if passing else max(P3_GRID, key=lambda t: thresholds[f"{t:.2f}"]["precision3"])
    x = full if block else full[:, :len(FEATURES)]
    counts = {str(s): int((y == s).sum()) for s in SCORES}
    return {"version": JUDGE_VERSION, "features": list(FEATURES), "embedding_block": block, "C": c,
            "p3_threshold": p3_threshold, "p3_target": P3_TARGET, "train_fold": TRAIN_FOLD,
            "label_files": list(files), "n_train": len(rows), "train_labels": counts,
            "train_sha256": _data_sha(rows), "cv": {"folds": CV_FOLDS, "repeats": CV_REPEATS, "grouped_by": "role", "seed": SEED,
                                                    "models": cv, "p3_thresholds": thresholds},
            **_fit(x, y, c)}


def save_weights(params: dict[str, Any], path: Path = WEIGHTS_FILE) -> None:
    path.write_text(json.dumps(params, indent=None) + "\n", encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    """Rebuild the shipped weights (or, with --check, compare a rebuild with them); prints the CV summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="compare with the shipped file; write nothing")
    parser.add_argument("--out", type=Path, default=WEIGHTS_FILE)
    args = parser.parse_args(argv)
    params = fit_role_judge()
    summary = {k: params[k] for k in ("embedding_block", "C", "p3_threshold", "n_train", "train_labels")}
    print(json.dumps(summary))
    print(json.dumps(params["cv"]["p3_thresholds"][f"{params['p3_threshold']:.2f}"]))
    if args.check:
        shipped = json.loads(args.out.read_text(encoding="utf-8"))
        same = shipped == json.loads(json.dumps(params))
        print("matches the shipped weights" if same else "differs from the shipped weights")
        return 0 if same else 1
    save_weights(params, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
