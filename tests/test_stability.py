"""`persona-axis stability` on two tiny runs of one random model that differ only in their seed, and `--split-half`
of one tiny run (its even- and odd-question halves)."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from scipy import stats
from torch import Tensor

from persona_axis.axis import Axis, save_axis
from persona_axis.build.pipeline import preset_settings, run_pipeline
from persona_axis.build.stability import compare, compare_runs, split_half, split_halves
from persona_axis.catalog import DEFAULT_ROLE, load_catalog
from persona_axis.cli import main
from persona_axis.errors import PersonaAxisError
from persona_axis.judges.base import JudgeItem, Verdict
from persona_axis.model.loading import load_model
from persona_axis.store import RunLayout, RunStore, load_tensors

GROUPS = {"helpers": ["archivist", "medic"], "creatures": ["wyvern", "phantom"], "rogues": ["smuggler", "forger"]}
MIDDLE = 1  # the tiny model has 3 layers


class InRoleJudge:
    """Scores every reply 3, so both runs keep every role and differ only in what their seeds sampled."""

    id = "in-role"

    def score(self, items: Sequence[JudgeItem]) -> list[Verdict]:
        return [Verdict(3, "in role", self.id) for _ in items]


def _catalog(root: Path, n_questions: int = 2) -> Path:
    """A catalogue of six roles in three groups, three default prompts and `n_questions` questions."""
    (root / "roles").mkdir(parents=True)
    for group, names in GROUPS.items():
        roles = [{"name": n, "group": group, "description": f"the {n}", "prompts": [f"You are the {n}."]} for n in names]
        (root / "roles" / f"{group}.json").write_text(json.dumps(roles))
    (root / "defaults.json").write_text(json.dumps({"prompts": ["", "You are an AI assistant.", "Be useful."]}))
    questions = [{"id": f"q{i}", "question": f"What would you do on day {i}?"} for i in range(n_questions)]
    (root / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    return root


@pytest.fixture(scope="module")
def runs(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two finished runs (seeds 0 and 1) of the same tiny model, roles and settings."""
    base = tmp_path_factory.mktemp("stability")
    catalog = load_catalog(_catalog(base / "catalog"))
    lm = load_model(tiny_model_dir, dtype="float32")
    out = [run_pipeline(base / f"seed{seed}", lm, catalog,
                        preset_settings("smoke", seed=seed, questions=2, traits=0, max_new_tokens=4, batch_size=9),
                        InRoleJudge(), progress=False)
           for seed in (0, 1)]
    return out[0], out[1]


def _saved(run: Path) -> tuple[Tensor, dict[str, Tensor]]:
    """The run's axis [layers, hidden] and role vectors {name: [layers, hidden]}, float64, read from its files."""
    layout = RunLayout(run)
    vectors = load_file(str(layout.vectors))
    roles = {name: v.double() for name, v in vectors.items() if name != DEFAULT_ROLE}
    return load_file(str(layout.axis))["axis"].double(), roles


def _pc1(roles: dict[str, Tensor], layer: int) -> tuple[Tensor, Tensor]:
    """PC1 [hidden] of the role vectors at `layer` (sign as the SVD gives it) and the centred rows [n, hidden]."""
    rows = torch.stack([roles[name] for name in sorted(roles)])[:, layer]
    centred = rows - rows.mean(0)
    return torch.linalg.svd(centred, full_matrices=False)[2][0], centred


def test_a_run_compared_with_itself_agrees_everywhere(runs: tuple[Path, Path]) -> None:
    result = compare_runs(runs[0], runs[0])
    assert result.layer == MIDDLE and result.layers == 3 and result.hidden == 64
    assert result.roles_a == result.roles_b == result.roles_shared == 6
    assert result.axis_cos == pytest.approx([1.0] * 3, abs=1e-6)
    assert result.pc1_abs_cos == pytest.approx([1.0] * 3, abs=1e-6)
    for ranks in (result.axis_projection, result.pc1_loading):
        assert ranks.spearman == pytest.approx(1.0)
        assert ranks.n == 3 and ranks.top_a == ranks.top_b and ranks.bottom_a == ranks.bottom_b
        assert ranks.top_shared == ranks.bottom_shared == 3 and ranks.top_jaccard == ranks.bottom_jaccard == 1.0
    assert result.summary()["cos_axis_pc1_difference"] == 0.0
    assert not result.split_half
    # 2 questions; 3 default prompts x 2 questions; 6 roles x 1 prompt x 2 questions, all scored 3
    assert (result.questions_a, result.defaults_a, result.answers_a) == (2, 6, 12)
    assert (result.questions_b, result.defaults_b, result.answers_b) == (2, 6, 12)


def test_two_seeds_differ_by_what_their_saved_tensors_say(runs: tuple[Path, Path]) -> None:
    result = compare_runs(*runs)
    (axis_a, roles_a), (axis_b, roles_b) = _saved(runs[0]), _saved(runs[1])
    expected_axis = [float(torch.nn.functional.cosine_similarity(axis_a[i], axis_b[i], dim=0)) for i in range(3)]
    assert result.axis_cos == pytest.approx(expected_axis, abs=1e-5)
    assert max(result.axis_cos) < 0.9999  # the seeds sampled different replies

    pc1_a, centred_a = _pc1(roles_a, MIDDLE)
    pc1_b, centred_b = _pc1(roles_b, MIDDLE)
    assert result.pc1_abs_cos[MIDDLE] == pytest.approx(abs(float(pc1_a @ pc1_b)), abs=1e-5)
    assert result.pc1_abs_cos[MIDDLE] < 0.9999

    names = sorted(roles_a)
    assert names == sorted(roles_b)
    loadings, projections = [], []
    for pc1, centred, axis, roles in ((pc1_a, centred_a, axis_a, roles_a), (pc1_b, centred_b, axis_b, roles_b)):
        toward_assistant = 1.0 if float(pc1 @ axis[MIDDLE]) >= 0 else -1.0
        loadings.append((centred @ pc1 * toward_assistant).tolist())
        projections.append([float(roles[n][MIDDLE] @ axis[MIDDLE] / axis[MIDDLE].norm()) for n in names])
    assert result.pc1_loading.spearman == pytest.approx(float(stats.spearmanr(*loadings).statistic))
    assert result.axis_projection.spearman == pytest.approx(float(stats.spearmanr(*projections).statistic))
    ranked = [[names[i] for i in sorted(range(6), key=lambda i: -p[i])] for p in projections]
    top, bottom = [set(r[:3]) for r in ranked], [set(r[3:]) for r in ranked]
    ends = result.axis_projection
    assert (set(ends.top_a), set(ends.top_b), set(ends.bottom_a), set(ends.bottom_b)) == (*top, *bottom)
    assert ends.top_shared == len(top[0] & top[1]) and ends.bottom_shared == len(bottom[0] & bottom[1])
    assert ends.top_jaccard == pytest.approx(ends.top_shared / len(top[0] | top[1]))

    summary = result.summary()
    assert summary["axis_cos_min"] == min(result.axis_cos) and summary["axis_cos_median"] == sorted(result.axis_cos)[1]
    for pc1, axis, side in ((pc1_a, axis_a, "a"), (pc1_b, axis_b, "b")):
        expected = abs(float(torch.nn.functional.cosine_similarity(pc1, axis[MIDDLE], dim=0)))
        assert summary[f"cos_axis_pc1_{side}"] == pytest.approx(expected)
    assert summary["cos_axis_pc1_difference"] == pytest.approx(summary["cos_axis_pc1_b"] - summary["cos_axis_pc1_a"])
    assert summary["cos_axis_pc1_difference"] != 0.0


def _drop_axis(run: Path) -> None:
    RunLayout(run).axis.unlink()


def _wider_axis(run: Path) -> None:
    save_axis(Axis(torch.ones(3, 32)), RunLayout(run).axis)


def _other_weights(run: Path) -> None:
    store = RunStore(run)
    manifest = store.read_manifest()
    manifest["identity"]["model_hash"] = "0" * 64
    store.write_manifest(manifest)


def _renamed_roles(run: Path) -> None:
    tensors, meta = load_tensors(RunLayout(run).vectors)
    summary = json.loads(meta["summary"])
    summary["roles_used"] = [f"other_{name}" for name in summary["roles_used"]]
    renamed = {name if name == DEFAULT_ROLE else f"other_{name}": v for name, v in tensors.items()}
    RunStore(run).save_tensors(RunLayout.VECTORS, renamed, {"summary": json.dumps(summary)})


@pytest.mark.parametrize(("spoil", "message"), [
    (_drop_axis, "axis.safetensors, which is not there"),
    (_wider_axis, r"shape \[3, 64\] and .* one of \[3, 32\]"),
    (_other_weights, "different weights"),
    (_renamed_roles, "kept 0 roles in common"),
])
def test_runs_that_cannot_be_compared_are_a_one_line_error(
        runs: tuple[Path, Path], tmp_path: Path, spoil: Callable[[Path], None], message: str) -> None:
    other = Path(shutil.copytree(runs[1], tmp_path / "other"))
    spoil(other)
    with pytest.raises(PersonaAxisError, match=message) as error:
        compare_runs(runs[0], other)
    assert "\n" not in str(error.value)


def test_cli_prints_the_comparison_as_json_and_as_a_table(
        runs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["stability", str(runs[0]), str(runs[1]), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"axis_cos", "pc1_abs_cos", "cos_axis_pc1_a", "cos_axis_pc1_b", "axis_projection", "pc1_loading",
            "roles_shared", "layer", "summary"} <= set(report)
    assert set(report["summary"]) == {"axis_cos_min", "axis_cos_min_layer", "axis_cos_median", "pc1_abs_cos_median",
                                      "cos_axis_pc1_a", "cos_axis_pc1_b", "cos_axis_pc1_difference"}
    assert {"spearman", "top_shared", "bottom_shared", "top_jaccard", "bottom_jaccard"} <= set(report["pc1_loading"])
    assert report == json.loads(json.dumps(compare_runs(*runs).to_json()))

    assert main(["stability", str(runs[0]), str(runs[1]), "--layer", "2", "--ends", "2"]) == 0
    table = capsys.readouterr().out
    assert f"median {report['summary']['axis_cos_median']:.3f}" in table
    assert "at layer 2 (<)" in table and "top 2 shared" in table

    assert main(["stability", str(runs[0]), str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("persona-axis: error: stability needs")


# --- split half --------------------------------------------------------------------------------------------------

DAY_1 = "day 1?"


class MedicMissesDay1:
    """Scores every reply 3 but the medic's answers to the day-1 question (scored 1)."""

    id = "medic-misses-day-1"

    def score(self, items: Sequence[JudgeItem]) -> list[Verdict]:
        return [Verdict(1 if item.role == "medic" and item.question.endswith(DAY_1) else 3, "", self.id) for item in items]


def _run(root: Path, model_dir: str, questions: int, min_score3: int) -> Path:
    catalog = load_catalog(_catalog(root / "catalog", n_questions=4))
    settings = preset_settings("smoke", seed=0, questions=questions, traits=0, max_new_tokens=4, batch_size=9,
                               min_score3=min_score3)
    return run_pipeline(root / "run", load_model(model_dir, dtype="float32"), catalog, settings, MedicMissesDay1(),
                        progress=False)


@pytest.fixture(scope="module")
def split_run(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run with 4 questions and min_score3 3: the medic has 3 score-3 answers (q0, q2, q3), so the
    whole run keeps it, the even half (q0, q2: 2 answers) too, the odd half (q1, q3: 1 answer < ceil(3 / 2)) not."""
    return _run(tmp_path_factory.mktemp("split"), tiny_model_dir, questions=4, min_score3=3)


def _expected_half(run: Path, ids: frozenset[str], need: int) -> tuple[Tensor, dict[str, Tensor], int]:
    """The half's axis, kept role vectors and default-reply count recomputed here from the chunks, records and scores."""
    store = RunStore(run)
    kinds = {r["id"]: (r["kind"], r["role"]) for r in store.records("rollouts")}
    scores = {r["id"]: r["score"] for r in store.records("scores")}
    rows: dict[str, list[Tensor]] = {}
    for chunk_ids, means in store.activation_chunks():
        for record_id, row in zip(chunk_ids, means.double()):
            kind, role = kinds[record_id]
            if record_id in ids and (kind == "default" or scores[record_id] == 3):
                rows.setdefault(role, []).append(row)
    defaults = rows.pop(DEFAULT_ROLE)
    roles = {name: torch.stack(r).mean(0) for name, r in rows.items() if len(r) >= need}
    return torch.stack(defaults).mean(0) - torch.stack(list(roles.values())).mean(0), roles, len(defaults)


def test_split_half_rebuilds_each_half_from_its_own_questions(split_run: Path) -> None:
    a, b = split_halves(split_run)
    records = RunStore(split_run).records("rollouts")
    assert not a.record_ids & b.record_ids
    assert a.record_ids | b.record_ids == {r["id"] for r in records if r["kind"] in ("default", "role")}
    question = {r["id"]: r["question_id"] for r in records}
    assert {question[i] for i in a.record_ids} == {"q0", "q2"} and {question[i] for i in b.record_ids} == {"q1", "q3"}

    need = math.ceil(3 / 2)
    for half, medic in ((a, True), (b, False)):
        axis, roles, n_default = _expected_half(split_run, half.record_ids, need)
        assert ("medic" in half.roles) is medic and len(half.roles) == (6 if medic else 5)
        assert sorted(half.roles) == sorted(roles)
        for name, vector in roles.items():
            assert torch.allclose(half.roles[name].double(), vector, atol=1e-5)
        assert torch.allclose(half.axis.vectors.double(), axis, atol=1e-5)
        assert (half.questions, half.n_default, n_default) == (2, 6, 6)  # 3 default prompts x 2 questions
        assert half.n_answers == 2 * len(roles)  # 1 prompt x 2 questions per kept role, all scored 3
    whole = load_file(str(RunLayout(split_run).axis))["axis"].double()
    assert not torch.allclose(a.axis.vectors.double(), whole, atol=1e-4)  # a half is not the whole run


def test_split_half_reports_the_two_halves_figures(split_run: Path) -> None:
    result = split_half(split_run)
    a, b = split_halves(split_run)
    expected = [float(torch.nn.functional.cosine_similarity(a.axis.vectors[i], b.axis.vectors[i], dim=0)) for i in range(3)]
    assert result.axis_cos == pytest.approx(expected, abs=1e-5)
    assert max(result.axis_cos) < 0.9999 and min(result.axis_cos) > -1.0
    assert all(0.0 <= c <= 1.0 for c in result.pc1_abs_cos + result.cos_axis_pc1_a + result.cos_axis_pc1_b)
    assert all(-1.0 <= r.spearman <= 1.0 for r in (result.axis_projection, result.pc1_loading))
    assert result.split_half and result.layer == MIDDLE
    assert (result.roles_a, result.roles_b, result.roles_shared) == (6, 5, 5)
    assert (result.questions_a, result.defaults_a, result.answers_a) == (2, 6, 12)
    assert (result.questions_b, result.defaults_b, result.answers_b) == (2, 6, 10)
    assert result.run_a.endswith("even questions") and result.run_b.endswith("odd questions")
    assert result.to_json() == compare(a, b, split_half=True).to_json()


def test_cli_split_half_says_what_it_compared(split_run: Path, runs: tuple[Path, Path],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["stability", str(split_run), "--split-half", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == json.loads(json.dumps(split_half(split_run).to_json()))
    assert report["split_half"] is True and (report["defaults_a"], report["answers_b"]) == (6, 10)

    assert main(["stability", str(split_run), "--split-half"]) == 0
    table = capsys.readouterr().out
    assert "A 2 questions, 6 default replies, 12 score-3 role answers; B 2 questions, 6 default replies, 10" in table
    assert "split half: A and B are the halves of one run by question" in table and "understates" in table
    assert main(["stability", str(runs[0]), str(runs[1])]) == 0
    assert "split half" not in capsys.readouterr().out

    for argv, message in ((["stability", str(split_run)], "needs two run directories"),
                          (["stability", str(runs[0]), str(runs[1]), "--split-half"], "takes one run directory")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err


def _one_question(root: Path, model_dir: str) -> Path:
    return _run(root, model_dir, questions=1, min_score3=1)


def _unfinished(root: Path, split_run: Path) -> Path:
    run = Path(shutil.copytree(split_run, root / "unfinished"))
    RunLayout(run).axis.unlink()
    return run


def _stricter(root: Path, split_run: Path) -> Path:
    """min_score3 5 in the run's summary: a half needs 3 score-3 answers per role, and has 2."""
    run = Path(shutil.copytree(split_run, root / "stricter"))
    tensors, meta = load_tensors(RunLayout(run).vectors)
    RunStore(run).save_tensors(RunLayout.VECTORS, tensors, {"summary": json.dumps({**json.loads(meta["summary"]),
                                                                                    "min_score3": 5})})
    return run


@pytest.mark.parametrize(("spoil", "message"), [
    ("one question", r"answer 1 question: a split half needs at least 2"),
    ("unfinished", "axis.safetensors, which is not there"),
    ("stricter", r"even questions half of .* keeps 0 roles with at least 3 score-3 answers from medic-misses-day-1"),
])
def test_a_run_that_cannot_be_split_is_a_one_line_error(
        split_run: Path, tiny_model_dir: str, tmp_path: Path, spoil: str, message: str) -> None:
    run = {"one question": lambda: _one_question(tmp_path, tiny_model_dir),
           "unfinished": lambda: _unfinished(tmp_path, split_run),
           "stricter": lambda: _stricter(tmp_path, split_run)}[spoil]()
    with pytest.raises(PersonaAxisError, match=message) as error:
        split_half(run)
    assert "\n" not in str(error.value)
