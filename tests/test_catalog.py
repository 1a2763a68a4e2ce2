from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from persona_axis.catalog import DEFAULT_ROLE, load_catalog
from persona_axis.errors import PersonaAxisError


def test_builtin_catalogue_shape() -> None:
    catalog = load_catalog()
    assert len(catalog.roles) == 275
    assert len({r.name for r in catalog.roles}) == 275
    assert all(len(r.prompts) == 5 and len(set(r.prompts)) == 5 and r.description for r in catalog.roles)
    groups = Counter(r.group for r in catalog.roles)
    assert set(groups) == {"professional", "human", "creative", "adversarial", "fantastical", "nonhuman"}
    assert len(catalog.questions) == 240 and len({q.id for q in catalog.questions}) == 240
    assert set(Counter(q.kind for q in catalog.questions).values()) == {48}
    assert len(catalog.traits) == 240 and all(len(t.prompts) == 5 for t in catalog.traits)
    assert catalog.defaults[0] == "" and len(catalog.defaults) >= 4
    assert DEFAULT_ROLE not in {r.name for r in catalog.roles}


def test_digest_changes_with_content(tmp_path: Path) -> None:
    (tmp_path / "roles").mkdir()
    role = {"name": "hermit", "group": "human", "description": "d", "prompts": ["You are a hermit."]}
    (tmp_path / "roles" / "a.json").write_text(json.dumps([role]))
    (tmp_path / "questions.jsonl").write_text('{"question": "Why?", "id": "q1"}\n')
    first = load_catalog(tmp_path).digest()
    role["prompts"] = ["You are a very old hermit."]
    (tmp_path / "roles" / "a.json").write_text(json.dumps([role]))
    assert load_catalog(tmp_path).digest() != first


def test_reads_instruction_style_catalogue(tmp_path: Path) -> None:
    (tmp_path / "roles").mkdir()
    (tmp_path / "roles" / "lighthouse_keeper.json").write_text(json.dumps({
        "instruction": [{"pos": "You keep the light on a lonely rock."}, {"pos": "You are a lighthouse keeper."}],
        "questions": ["What do you hear at night?"],
        "eval_prompt": "Does the reply sound like a lighthouse keeper?\nScore it.",
    }))
    (tmp_path / "questions.jsonl").write_text('{"question": "What is home?", "id": 0}\n{"question": "Why?", "id": 1}\n')
    catalog = load_catalog(tmp_path)
    role = catalog.role("lighthouse_keeper")
    assert role.prompts == ("You keep the light on a lonely rock.", "You are a lighthouse keeper.")
    assert role.questions == ("What do you hear at night?",)
    assert role.description == "Does the reply sound like a lighthouse keeper?"
    assert [(q.id, q.text) for q in catalog.questions] == [("0", "What is home?"), ("1", "Why?")]
    assert catalog.defaults == load_catalog().defaults  # falls back to the built-in default prompts


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"roles/a.json": "{not json"}, r"roles/a.json: Expecting"),
        ({"roles/a.json": '[{"name": "x"}]'}, "needs at least 'name' and 'prompts'"),
        ({"roles/a.json": '[{"name": "x", "prompts": []}]'}, "has no prompts"),
        ({"roles/a.json": '[{"name": "x", "prompts": ["p"]}, {"name": "x", "prompts": ["q"]}]'}, "duplicate role name 'x'"),
        ({"roles/a.json": '{"instruction": ["p"]}'}, "must be a list of"),
        ({"roles/a.json": '[{"name": "default", "prompts": ["p"]}]'}, "reserved"),
        ({"roles/a.json": '[{"name": "x", "prompts": ["p"]}]', "questions.jsonl": '{"q": 1}\n'}, "line 1"),
    ],
)
def test_malformed_catalogues_name_the_file(tmp_path: Path, files: dict[str, str], message: str) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    with pytest.raises(PersonaAxisError, match=message):
        load_catalog(tmp_path)


def test_user_catalogue_without_questions_names_the_expected_files(tmp_path: Path) -> None:
    (tmp_path / "roles").mkdir()
    (tmp_path / "roles" / "a.json").write_text(json.dumps([{"name": "hermit", "prompts": ["You are a hermit."]}]))
    with pytest.raises(PersonaAxisError, match="no questions file: add questions.jsonl or extraction_questions.jsonl"):
        load_catalog(tmp_path)


def test_our_flat_layout_reads_defaults_beside_the_roles(tmp_path: Path) -> None:
    (tmp_path / "people.json").write_text(json.dumps([{"name": "hermit", "prompts": ["You are a hermit."]}]))
    (tmp_path / "defaults.json").write_text(json.dumps({"prompts": ["", "You are {model_name}."]}))
    (tmp_path / "questions.jsonl").write_text('{"question": "Why?", "id": "q1"}\n')
    catalog = load_catalog(tmp_path)
    assert [r.name for r in catalog.roles] == ["hermit"]
    assert catalog.defaults == ("", "You are {model_name}.")


def test_unknown_role() -> None:
    with pytest.raises(PersonaAxisError, match="unknown role 'nobody'"):
        load_catalog().select_roles(["nobody"])
