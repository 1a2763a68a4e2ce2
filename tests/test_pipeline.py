"""The pipeline end to end on a tiny model, with a real chat-completions judge server on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from chat_server import FakeServer, Reply

from persona_axis.axis import load_axis
from persona_axis.build.executors import LocalExecutor
from persona_axis.build.persona_space import RunAnalysis
from persona_axis.build.pipeline import (
    ROLLOUT_ENGINE,
    _engine_identity,
    analyze_run,
    plan_rollouts,
    preset_settings,
    run_pipeline,
    select_roles,
    step_rollouts,
)
from persona_axis.catalog import load_catalog
from persona_axis.decode.generate import generate
from persona_axis.errors import PersonaAxisError
from persona_axis.judges.http import OpenAIJudge
from persona_axis.model.loading import load_model
from persona_axis.store import RunStore, load_tensors, read_jsonl

ROLES = {
    "professional": ["librarian_a", "nurse_b"],
    "fantastical": ["dragon_a", "ghost_b"],
    "adversarial": ["villain_a", "villain_b"],
}


@pytest.fixture()
def catalog_dir(tmp_path: Path) -> Path:
    root = tmp_path / "catalog"
    (root / "roles").mkdir(parents=True)
    for group, names in ROLES.items():
        entries = [{"name": n, "group": group, "description": f"a {n}", "prompts": [f"You are {n}.", f"Be {n}."]}
                   for n in names]
        (root / "roles" / f"{group}.json").write_text(json.dumps(entries))
    (root / "defaults.json").write_text(json.dumps({"prompts": ["", "You are an AI assistant.", "Be helpful."]}))
    questions = [{"id": f"q{i}", "question": f"Question number {i}, what do you think?"} for i in range(6)]
    (root / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    (root / "traits").mkdir()
    traits = [{"name": n, "description": f"very {n}", "prompts": [f"Be {n}.", f"Act {n}."]}
              for n in ("calm", "grumpy", "curious", "silent", "proud")]
    (root / "traits" / "traits.json").write_text(json.dumps(traits))
    return root


def _score(body: dict) -> Reply:
    """villain_b's replies and every answer to question 1 score 1; the trait "proud" scores 2; the rest 3."""
    content = body["messages"][1]["content"]
    low = "Role: villain_b" in content or "Question number 1," in content or "Trait: proud" in content
    return Reply(f"ok\nSCORE: {2 if 'Trait: proud' in content else 1}" if low else "in role\nSCORE: 3")


@pytest.fixture()
def judge_server(server: FakeServer) -> FakeServer:
    """Mixed scores (see `_score`): villain_b and the trait proud are dropped; question 1 never counts."""
    server.respond = _score
    return server


def _cli(out: Path, model_dir: str, catalog_dir: Path, server: FakeServer, *extra: str) -> list[str]:
    return [sys.executable, "-m", "persona_axis.cli", "run", "--model", model_dir, "--dtype", "float32",
            "--out", str(out), "--preset", "smoke", "--catalog", str(catalog_dir), "--judge", "openai",
            "--judge-url", server.base_url, "--judge-model", "m", "--batch-size", "2", "--max-new-tokens", "32",
            "--no-progress", *extra]


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def _kill_when(proc: subprocess.Popen[bytes], path: Path, min_lines: int) -> None:
    deadline = time.monotonic() + 120
    while _lines(path) < min_lines:
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def test_killed_twice_then_resumed_equals_uninterrupted(
        tmp_path: Path, tiny_model_dir: str, catalog_dir: Path, judge_server: FakeServer) -> None:
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run(_cli(whole, tiny_model_dir, catalog_dir, judge_server), check=True, capture_output=True, timeout=300)

    scoring = judge_server.respond
    judge_server.respond = lambda body: (time.sleep(0.05), scoring(body))[1]  # slow enough to kill mid-judging
    proc = subprocess.Popen(_cli(killed, tiny_model_dir, catalog_dir, judge_server), stderr=subprocess.DEVNULL)
    _kill_when(proc, killed / "rollouts.jsonl", 1)  # during rollouts
    assert not (killed / "axis.safetensors").exists()
    n_rollouts = _lines(whole / "rollouts.jsonl")
    assert _lines(killed / "rollouts.jsonl") < n_rollouts

    proc = subprocess.Popen(_cli(killed, tiny_model_dir, catalog_dir, judge_server), stderr=subprocess.DEVNULL)
    _kill_when(proc, killed / "scores.jsonl", 1)  # during judging (slowed down by the server)
    assert not (killed / "axis.safetensors").exists()

    judge_server.respond = scoring
    subprocess.run(_cli(killed, tiny_model_dir, catalog_dir, judge_server), check=True, capture_output=True, timeout=300)
    assert torch.equal(load_axis(whole).vectors, load_axis(killed).vectors)
    ids = [r["id"] for r in read_jsonl(killed / "rollouts.jsonl")]
    assert len(ids) == len(set(ids)) == n_rollouts  # nothing lost, nothing doubled
    assert _responses(whole) == _responses(killed)


def _responses(run: Path) -> list[tuple[str, str]]:
    return sorted((r["id"], r["response"]) for r in read_jsonl(run / "rollouts.jsonl"))


def test_second_writer_and_changed_settings_are_refused(
        tmp_path: Path, tiny_model_dir: str, catalog_dir: Path, judge_server: FakeServer) -> None:
    out = tmp_path / "run"
    subprocess.run(_cli(out, tiny_model_dir, catalog_dir, judge_server), check=True, capture_output=True, timeout=300)
    changed = subprocess.run(_cli(out, tiny_model_dir, catalog_dir, judge_server, "--seed", "9"),
                             capture_output=True, text=True, timeout=300)
    assert changed.returncode == 2
    assert "holds a run with different settings" in changed.stderr and "Traceback" not in changed.stderr

    with RunStore.open(out):
        second = subprocess.run(_cli(out, tiny_model_dir, catalog_dir, judge_server),
                                capture_output=True, text=True, timeout=300)
    assert second.returncode == 2
    assert second.stderr.strip().startswith("persona-axis: error: run directory")
    assert "in use by another persona-axis process" in second.stderr


def test_pipeline_in_process_drops_roles_and_analyzes(
        tmp_path: Path, tiny_model_dir: str, catalog_dir: Path, judge_server: FakeServer) -> None:
    lm = load_model(tiny_model_dir, dtype="float32")
    catalog = load_catalog(catalog_dir)
    settings = preset_settings("smoke", batch_size=8, max_new_tokens=8)
    judge = OpenAIJudge(judge_server.base_url, "m")
    out = run_pipeline(tmp_path / "run", lm, catalog, settings, judge, progress=False)
    plan = plan_rollouts(catalog, settings, select_roles(catalog, settings, None), catalog.traits[:4])
    assert len(plan) == (3 + 6 + 4) * 3  # (default prompts + roles + traits) x the same 3 questions
    manifest = json.loads((out / "manifest.json").read_text())
    questions = manifest["questions"]
    assert questions["default"] == questions["role"] == questions["trait"] == ["q0", "q1", "q2"]
    assert manifest["traits"] == ["calm", "grumpy", "curious", "silent"]
    assert manifest["identity"]["settings"]["temperature"] == 0.7 and manifest["identity"]["settings"]["top_p"] == 0.9
    vectors, meta = load_tensors(out / "vectors.safetensors")
    summary = json.loads(meta["summary"])
    assert summary["roles_dropped"] == {"villain_b": 0}
    assert set(vectors) == {"default", *[n for names in ROLES.values() for n in names if n != "villain_b"]}
    traits, _ = load_tensors(out / "trait_vectors.safetensors")
    assert set(traits) == {"calm", "grumpy", "curious", "silent"}
    everything, _ = load_tensors(out / "role_vectors_all_answers.safetensors")
    assert set(everything) == {n for names in ROLES.values() for n in names}
    axis = load_axis(out).vectors
    expected = vectors["default"] - torch.stack([vectors[n] for n in summary["roles_used"]]).mean(0)
    torch.testing.assert_close(axis, expected)
    analysis = analyze_run(out)
    assert analysis.space.n_roles_used == 5 and analysis.roles_dropped == {"villain_b": 0}
    assert len(analysis.space.cos_axis_pc1) == 3 and analysis.unjudged and len(analysis.unjudged.cos_axis_pc1) == 3
    assert analysis.traits_used == 4 and analysis.traits and set(analysis.traits.cos_axis) == set(traits)
    assert RunAnalysis.from_json(json.loads((out / "persona_space.json").read_text())) == analysis
    assert (out / "report.html").exists() and (out / "figures" / "pc1_pc2.png").exists()
    assert manifest["identity"]["settings"]["batch_size"] == 8 and "torch" in manifest["versions"]


def _rows_by_role(out: Path, keep: set[str] | None = None) -> dict[str, list[torch.Tensor]]:
    """Stored response means grouped by role name (only records whose id is in `keep`, when given)."""
    role_of = {r["id"]: r["role"] for r in read_jsonl(out / "rollouts.jsonl")}
    rows: dict[str, list[torch.Tensor]] = {}
    for path in sorted((out / "activations").glob("*.safetensors")):
        tensors, meta = load_tensors(path)
        for row, record_id in enumerate(json.loads(meta["ids"])):
            if keep is None or record_id in keep:
                rows.setdefault(role_of[record_id], []).append(tensors["means"][row])
    return rows


def test_role_vector_means_only_score3_answers(tmp_path: Path, tiny_model_dir: str, catalog_dir: Path,
                                               judge_server: FakeServer) -> None:
    lm = load_model(tiny_model_dir, dtype="float32")
    out = run_pipeline(tmp_path / "run", lm, load_catalog(catalog_dir), preset_settings("smoke", max_new_tokens=6),
                       OpenAIJudge(judge_server.base_url, "m"), role_names=["dragon_a", "ghost_b"], progress=False)
    score3 = {r["id"] for r in read_jsonl(out / "scores.jsonl") if r["score"] == 3}
    assert 0 < len({i for i in score3 if i.startswith("dragon_a")}) < 3  # mixed scores: the filter matters
    judged, every = _rows_by_role(out, score3 | {i for i in _ids(out) if i.startswith("default")}), _rows_by_role(out)
    vectors, _ = load_tensors(out / "vectors.safetensors")
    torch.testing.assert_close(vectors["dragon_a"], torch.stack(judged["dragon_a"]).mean(0))
    torch.testing.assert_close(vectors["default"], torch.stack(every["default"]).mean(0))
    assert not torch.allclose(vectors["dragon_a"], torch.stack(every["dragon_a"]).mean(0))
    everything, _ = load_tensors(out / "role_vectors_all_answers.safetensors")
    torch.testing.assert_close(everything["dragon_a"], torch.stack(every["dragon_a"]).mean(0))
    traits, _ = load_tensors(out / "trait_vectors.safetensors")
    torch.testing.assert_close(traits["calm"], torch.stack(judged["trait:calm"]).mean(0))


def _ids(out: Path) -> list[str]:
    return [r["id"] for r in read_jsonl(out / "rollouts.jsonl")]


def test_analyze_without_run_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(PersonaAxisError, match="no finished run"):
        analyze_run(tmp_path)


def test_each_rollout_chunk_holds_what_generating_that_chunk_alone_gives(
        tmp_path: Path, tiny_model_dir: str, catalog_dir: Path) -> None:
    """Chunks share one continuous batch, yet reply j of chunk k is the one seeded (seed + k, j)."""
    lm = load_model(tiny_model_dir, dtype="float32")
    catalog = load_catalog(catalog_dir)
    settings = preset_settings("smoke", batch_size=3, max_new_tokens=6)
    plan = plan_rollouts(catalog, settings, select_roles(catalog, settings, None))[:10]
    with RunStore.open(tmp_path / "run") as store:
        step_rollouts(store, LocalExecutor(lm), plan, settings, progress=False)
        responses = {r["id"]: r["response"] for r in store.records("rollouts")}
        chunks = list(store.activation_chunks())
    assert len(chunks) == 4 and len(responses) == 10
    for k, (ids, means) in enumerate(chunks):
        items = plan[3 * k : 3 * k + 3]
        alone = generate(lm, [item.messages() for item in items], max_new_tokens=6, temperature=settings.temperature,
                         top_p=settings.top_p, seed=settings.seed + k, batch_size=1, continuous=False)
        assert ids == [item.id for item in items]
        assert [responses[item.id] for item in items] == alone.texts
        torch.testing.assert_close(means, alone.captured_means(), atol=1e-5, rtol=1e-5)


def test_a_run_begun_by_an_earlier_rollout_engine_resumes_only_once_its_rollouts_are_done(tmp_path: Path) -> None:
    identity = {"model": "m", "settings": {"seed": 0}}
    with RunStore.open(tmp_path / "fresh") as store:
        assert _engine_identity(store, identity) == {**identity, "rollout_engine": ROLLOUT_ENGINE}
    with RunStore.open(tmp_path / "earlier") as store:
        store.claim(identity, {})  # what a version without the engine key wrote
        with pytest.raises(PersonaAxisError, match="rollout_engine"):
            store.claim(_engine_identity(store, identity), {})
        store.mark_step("rollouts", {"done": True})
        assert store.claim(_engine_identity(store, identity), {})["identity"] == identity
