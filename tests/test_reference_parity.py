"""Parity with the published method, re-implemented here from its description (in the spirit of steering-vectors'
tests against an original implementation): our pipeline's role vectors, axis and cap against plain code."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from persona_axis.axis import load_axis
from persona_axis.build.pipeline import preset_settings, run_pipeline
from persona_axis.catalog import load_catalog
from persona_axis.decode.interventions import Cap, steer
from persona_axis.judges.base import JudgeItem, Verdict
from persona_axis.model.loading import LoadedModel, load_model
from persona_axis.store import load_tensors, read_jsonl


class ThirdsJudge:
    """Deterministic mixed scores: 3, 1, 2, 3, 1, 2, ... in item order."""

    id = "thirds"

    def score(self, items: Sequence[JudgeItem]) -> list[Verdict]:
        return [Verdict((3, 1, 2)[k % 3], "fixed", self.id) for k in range(len(items))]


def reference_axis(run: Path) -> torch.Tensor:
    """The published recipe, written from its description: a role vector is the mean response activation over the
    role's answers scored 3; the axis is the mean default-Assistant activation minus the mean of the role vectors."""
    role_of = {r["id"]: r["role"] for r in read_jsonl(run / "rollouts.jsonl")}
    kind_of = {r["id"]: r.get("kind", "role") for r in read_jsonl(run / "rollouts.jsonl")}
    score_of = {r["id"]: r["score"] for r in read_jsonl(run / "scores.jsonl")}
    rows: dict[str, list[torch.Tensor]] = {}
    for path in sorted((run / "activations").glob("chunk-*.safetensors")):
        tensors, meta = load_tensors(path)
        for row, record_id in enumerate(json.loads(meta["ids"])):
            if kind_of[record_id] == "default" or (kind_of[record_id] == "role" and score_of[record_id] == 3):
                rows.setdefault(role_of[record_id], []).append(tensors["means"][row].double())
    default = torch.stack(rows.pop("default")).mean(0)
    role_vectors = torch.stack([torch.stack(v).mean(0) for v in rows.values()])
    return (default - role_vectors.mean(0)).float()


def test_axis_equals_the_published_recipe(tmp_path: Path, tiny_model_dir: str) -> None:
    lm = load_model(tiny_model_dir, dtype="float32")
    run = run_pipeline(tmp_path / "run", lm, load_catalog(), preset_settings("smoke", max_new_tokens=6, min_score3=1),
                       ThirdsJudge(), progress=False)
    torch.testing.assert_close(load_axis(run).vectors, reference_axis(run), rtol=1e-5, atol=1e-6)


def _reference_cap_hook(unit: torch.Tensor, tau: float) -> Callable[[torch.nn.Module, object, object], object]:
    """The published cap, as a plain forward hook: where h·v̂ < τ, move h along v̂ up to τ."""
    def hook(_module: torch.nn.Module, _inputs: object, output: object) -> object:
        hidden = output[0] if isinstance(output, tuple) else output
        projection = hidden @ unit
        lifted = hidden + torch.where(projection < tau, tau - projection, torch.zeros_like(projection))[..., None] * unit
        return (lifted, *output[1:]) if isinstance(output, tuple) else lifted
    return hook


def test_cap_equals_a_plain_forward_hook(tiny_llama: LoadedModel) -> None:
    torch.manual_seed(0)
    direction = torch.randn(tiny_llama.hidden_size)
    unit = direction / direction.norm()
    ids = torch.randint(0, 1000, (2, 9))
    with torch.inference_mode():
        plain = tiny_llama.model(input_ids=ids, output_hidden_states=True)
        tau = float((plain.hidden_states[2] @ unit).median())  # binds at about half the positions of layer 1
        with steer(tiny_llama, {1: Cap(direction, floor=tau)}):
            ours = tiny_llama.model(input_ids=ids).logits
        handle = tiny_llama.layers[1].register_forward_hook(_reference_cap_hook(unit, tau))
        try:
            theirs = tiny_llama.model(input_ids=ids).logits
        finally:
            handle.remove()
    assert not torch.allclose(ours, plain.logits)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
