"""A drift predictor: ridge regression from the embedding of each user message to the projection of the
reply that follows it, cross-validated with whole conversations held out."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from persona_axis.apps.drift_stats import assistant_turns, conversation_key
from persona_axis.apps.simulate import Record
from persona_axis.errors import PersonaAxisError
from persona_axis.judges.offline import load_embedder


def drift_dataset(records: Sequence[Record],
                  embedder: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One row per assistant turn with a projection: X [m, dim] embeddings of the user message before
    it (dim 384 for the default all-MiniLM-L6-v2; `embedder` is any object with `encode(texts)`),
    y_abs [m] the reply's projection, y_delta [m] its change from the previous reply (NaN when there
    is none), groups [m] conversation keys ("run/id" for records read from run directories, else "id").
    """
    texts, y_abs, y_delta, groups = [], [], [], []
    for record in records:
        previous = None
        for user, _, value in assistant_turns(record):
            if value is not None:
                texts.append(user)
                y_abs.append(value)
                y_delta.append(np.nan if previous is None else value - previous)
                groups.append(conversation_key(record))
            previous = value
    if not texts:
        raise PersonaAxisError("no assistant turns with a projection: simulate some conversations first")
    embedder = embedder if embedder is not None else load_embedder()
    X = np.asarray(embedder.encode(texts, show_progress_bar=False), dtype=np.float64)
    return X, np.asarray(y_abs), np.asarray(y_delta), np.asarray(groups, dtype=object)


def group_folds(groups: np.ndarray, folds: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train indices, test indices) per fold with GroupKFold: a group is never on both sides.

    With fewer groups than folds, one fold per group; fewer than 2 groups is an error.
    """
    from sklearn.model_selection import GroupKFold

    n_groups = len(set(groups.tolist()))
    if folds < 2 or n_groups < 2:
        raise PersonaAxisError(f"cross-validation needs at least 2 folds and 2 conversations, got {folds} folds "
                               f"and {n_groups} conversation(s): simulate more conversations")
    return list(GroupKFold(n_splits=min(folds, n_groups)).split(np.zeros(len(groups)), groups=groups))


def _cross_validated_r2(X: np.ndarray, y: np.ndarray, groups: np.ndarray, folds: int, alpha: float) -> float:
    """R² of ridge predictions pooled over the out-of-fold predictions of every fold."""
    from sklearn.linear_model import Ridge
    from sklearn.metrics import r2_score

    predicted = np.empty_like(y)
    for train, test in group_folds(groups, folds):
        predicted[test] = Ridge(alpha=alpha).fit(X[train], y[train]).predict(X[test])
    return float(r2_score(y, predicted))


def fit_drift_predictor(records: Sequence[Record], folds: int = 5, alpha: float = 1.0,
                        embedder: Any = None) -> dict[str, Any]:
    """Cross-validated R² of ridge regressions from user-message embeddings to the next reply's
    projection ("r2_absolute") and to its change from the previous reply ("r2_delta"; turns with a
    previous reply only; None when fewer than 2 conversations have one)."""
    X, y_abs, y_delta, groups = drift_dataset(records, embedder)
    r2_absolute = _cross_validated_r2(X, y_abs, groups, folds, alpha)  # raises with fewer than 2 conversations
    n_conversations, previous = len(set(groups.tolist())), ~np.isnan(y_delta)
    r2_delta = (_cross_validated_r2(X[previous], y_delta[previous], groups[previous], folds, alpha)
                if len(set(groups[previous].tolist())) >= 2 else None)
    return {"method": f"ridge regression (alpha={alpha:g}) on {X.shape[1]}-d user-message embeddings; GroupKFold "
                      f"by conversation; R² pooled over out-of-fold predictions",
            "n_turns": len(y_abs), "n_conversations": n_conversations, "folds": min(folds, n_conversations),
            "r2_absolute": r2_absolute, "r2_delta": r2_delta}
