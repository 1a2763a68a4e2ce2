"""How far the int8 fast path moves a finished run's axis, with sampling taken out of the comparison.

Re-running a preset on the fast path samples different tokens as soon as one logit moves across a
tie, and a different sample moves the axis by itself (two float32 runs of the quick preset with
different random streams agree only to cosine 0.60-0.93 per layer). So this check keeps the run's
replies fixed: it feeds every reply the axis is built from (default answers and score-3 role
answers, as the run's judge kept them) through the exact model and through its int8 copy, and
compares the two axes built from those teacher-forced means, layer by layer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from persona_axis.axis import compute_axis, cosine_per_layer
from persona_axis.catalog import DEFAULT_ROLE
from persona_axis.decode.capture import response_means_by_forward
from persona_axis.errors import PersonaAxisError
from persona_axis.model.loading import LoadedModel, int8_copy
from persona_axis.store import RunLayout, RunStore, load_tensors, rollout_kind


def axis_replies(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rollout records the run's axis is built from: every default answer, and the score-3 answers of kept roles."""
    root = Path(run_dir)
    _, meta = load_tensors(RunLayout(root).require_vectors("the fast-path fidelity check"))
    summary = json.loads(meta["summary"])
    store = RunStore(root)
    scores = store.scores_by(summary["judge"])
    used = set(summary["roles_used"])
    return [r for r in store.records("rollouts")
            if rollout_kind(r) == "default" or (rollout_kind(r) == "role" and r["role"] in used and scores.get(r["id"]) == 3)]


def _axis_from(lm: LoadedModel, records: list[dict[str, Any]], batch_size: int) -> torch.Tensor:
    """Teacher-forced axis [layers, hidden]: default mean minus the mean of per-role means."""
    prompts = [lm.prompt_ids([{"role": "system", "content": r["system"]}, {"role": "user", "content": r["question"]}])
               for r in records]
    replies = [lm.tokenizer(r["response"], add_special_tokens=False).input_ids or [lm.tokenizer.eos_token_id]
               for r in records]
    means = response_means_by_forward(lm, prompts, replies, list(range(lm.n_layers)), batch_size=batch_size)
    by_role: dict[str, list[int]] = {}
    for i, record in enumerate(records):
        by_role.setdefault(DEFAULT_ROLE if rollout_kind(record) == "default" else record["role"], []).append(i)
    role_means = {name: means[rows].double().mean(0) for name, rows in by_role.items()}
    default = role_means.pop(DEFAULT_ROLE)
    return compute_axis(default.float(), torch.stack([m.float() for m in role_means.values()]))


def fast_path_fidelity(lm: LoadedModel, run_dir: str | Path, batch_size: int = 16) -> dict[str, Any]:
    """Per-layer cosine between the run's axis rebuilt teacher-forced by `lm` (exact) and by its int8 copy."""
    if lm.fast_path != "exact":
        raise PersonaAxisError("load the model on the exact path: the check builds its own int8 copy")
    records = axis_replies(run_dir)
    fast = int8_copy(lm)
    exact_axis, fast_axis = _axis_from(lm, records, batch_size), _axis_from(fast, records, batch_size)
    cosines = cosine_per_layer(exact_axis, fast_axis)
    norms = (fast_axis.norm(dim=-1) / exact_axis.norm(dim=-1))
    return {"run": str(run_dir), "replies": len(records), "dtype": str(lm.dtype).removeprefix("torch."),
            "cos_per_layer": [round(c, 5) for c in cosines.tolist()], "cos_min": round(cosines.min().item(), 5),
            "norm_ratio_min": round(norms.min().item(), 4), "norm_ratio_max": round(norms.max().item(), 4)}
