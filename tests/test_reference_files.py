"""Files in the layouts the reference implementation publishes: catalogues, torch capping configs, chat templates."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_model

from persona_axis.catalog import load_catalog, short_model_name
from persona_axis.control.capping import import_torch_config
from persona_axis.errors import PersonaAxisError
from persona_axis.model.loading import wrap_model

EVAL = ("You are evaluating whether the model's response displays the role: **{role}**.\n"
        "Prompt:\n{question}\nModel response:\n{answer}\nScore it 0-3.")


def role_file(*prompts: str, **extra: Any) -> str:
    return json.dumps({"instruction": [{"pos": p} for p in prompts], "questions": ["What now?"], **extra})


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


QUESTIONS = '{"question": "What is home?", "id": 0}\n{"question": "Why?", "id": 1}\n'
DEFAULT = json.dumps({"instruction": [{"pos": p} for p in ("", "You are an AI assistant.", "You are {model_name}.")]})


@pytest.fixture()
def published(tmp_path: Path) -> Path:
    """The reference's data/ tree: roles/instructions/*.json with default.json, roles/role_list.json, questions."""
    return write(tmp_path, {
        "roles/instructions/pirate.json": role_file("You are a pirate.", "Sail as a pirate.",
                                                    eval_prompt=EVAL.replace("{role}", "pirate")),
        "roles/instructions/hermit.json": role_file("You are a hermit.", eval_prompt=EVAL.replace("{role}", "hermit")),
        "roles/instructions/bard.json": role_file("You are a bard, not {model_name}."),
        "roles/instructions/default.json": DEFAULT,
        "roles/role_list.json": json.dumps({"default": "Neutral assistant.", "pirate": "A sea rover.",
                                            "bard": "", "hermit": "Lives alone."}),
        "extraction_questions.jsonl": QUESTIONS,
    })


def test_published_tree_loads_as_published(published: Path) -> None:
    catalog = load_catalog(published)
    assert [r.name for r in catalog.roles] == ["pirate", "bard", "hermit"]  # role_list.json's order, default skipped
    pirate, bard, hermit = catalog.roles
    assert pirate.prompts == ("You are a pirate.", "Sail as a pirate.") and pirate.questions == ("What now?",)
    assert (pirate.description, hermit.description) == ("A sea rover.", "Lives alone.")
    assert bard.description == ""  # an empty list entry keeps the file's (none here)
    assert "{question}" in pirate.eval_prompt and "**pirate**" in pirate.eval_prompt
    assert catalog.defaults == ("", "You are an AI assistant.", "You are {model_name}.")
    assert [(q.id, q.text) for q in catalog.questions] == [("0", "What is home?"), ("1", "Why?")]


def test_role_list_selects_and_orders_roles(published: Path) -> None:
    write(published, {"roles/role_list.json": json.dumps(["hermit", "pirate"])})
    assert [r.name for r in load_catalog(published).roles] == ["hermit", "pirate"]
    (published / "roles/role_list.json").unlink()
    assert [r.name for r in load_catalog(published).roles] == ["bard", "hermit", "pirate"]  # without it: every file


def test_flat_directory_with_published_files(tmp_path: Path) -> None:
    write(tmp_path, {"pirate.json": role_file("You are a pirate.", description="A sea rover."),
                     "default.json": DEFAULT, "role_list.json": json.dumps({"pirate": ""}),
                     "extraction_questions.jsonl": QUESTIONS})
    catalog = load_catalog(tmp_path)
    assert [(r.name, r.description) for r in catalog.roles] == [("pirate", "A sea rover.")]
    assert len(catalog.defaults) == 3 and len(catalog.questions) == 2


def test_for_model_fills_the_model_name_and_changes_the_digest(published: Path) -> None:
    catalog = load_catalog(published)
    filled = catalog.for_model("SmolLM")
    assert filled.defaults[2] == "You are SmolLM." and filled.role("bard").prompts == ("You are a bard, not SmolLM.",)
    assert catalog.defaults[2] == "You are {model_name}."  # the original is unchanged
    assert filled.digest() != catalog.digest() != catalog.for_model("Qwen").digest()
    assert filled.role("pirate") == catalog.role("pirate")
    with pytest.raises(PersonaAxisError, match="model name is needed"):
        catalog.for_model(" ")


@pytest.mark.parametrize("name, short", [
    ("SmolLM2-135M-Instruct (embedded, Q4_1 GGUF)", "SmolLM"),
    ("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", "Qwen"),
    ("Qwen/Qwen3-8B", "Qwen"),
    ("google/gemma-2-27b-it", "Gemma"),
    ("meta-llama/Llama-3.3-70B-Instruct", "Llama"),
    ("7b", "7b"),
])
def test_short_model_name(name: str, short: str) -> None:
    assert short_model_name(name) == short


@pytest.mark.parametrize("files, message", [
    ({"roles/instructions/pirate.json": role_file("You are {character}.")},
     r"pirate.json: unknown placeholder \{character\}"),
    ({"roles/instructions/default.json": json.dumps({"instruction": [{"pos": "You are {name}."}]})},
     r"default.json: unknown placeholder \{name\}"),
    ({"roles/instructions/pirate.json": json.dumps({"instruction": [{"pos": 3}]})}, "string prompts"),
    ({"roles/instructions/pirate.json": json.dumps({"instruction": []})}, "role 'pirate' has no prompts"),
    ({"roles/instructions/pirate.json": role_file("p", eval_prompt=["not", "text"])}, "must be strings"),
    ({"roles/instructions/default.json": json.dumps({"pos": "x"})}, r"default.json: expected \{\"prompts\""),
    ({"roles/role_list.json": json.dumps({"pirate": 1})}, r"role_list.json: expected \{role name"),
    ({"roles/role_list.json": json.dumps(["pirate", "pirate"])}, "duplicate role name 'pirate'"),
    ({"roles/role_list.json": json.dumps(["pirate", "kraken"])}, "1 role.s. without a role file, first 'kraken'"),
    ({"defaults.json": json.dumps({"prompts": ["x"]})}, "2 default files"),
    ({"extraction_questions.jsonl": '{"question": "a", "id": 0}\n{"question": "b", "id": 0}\n'},
     "duplicate question id '0'"),
])
def test_malformed_published_files_give_one_line_errors(published: Path, files: dict[str, str], message: str) -> None:
    write(published, files)
    with pytest.raises(PersonaAxisError, match=message) as caught:
        load_catalog(published)
    assert "\n" not in str(caught.value)


def test_missing_questions_file_is_an_error(published: Path) -> None:
    (published / "extraction_questions.jsonl").unlink()
    with pytest.raises(PersonaAxisError, match="add questions.jsonl or extraction_questions.jsonl"):
        load_catalog(published)


def test_torch_config_skips_interventions_without_a_cap(tmp_path: Path) -> None:
    torch.manual_seed(0)
    v1, v2 = torch.randn(8), torch.randn(8)
    torch.save({"vectors": {"a": {"layer": 1, "vector": v1}, "b": {"layer": 2, "vector": v2}},
                "experiments": [
                    {"id": "mixed", "interventions": [{"vector": "a", "cap": 0.5}, {"vector": "b", "coeff": 2.0}]},
                    {"id": "steer_only", "interventions": [{"vector": "b", "coeff": -1.0}]},
                    {"id": "both", "interventions": [{"vector": "a", "cap": 0.5}, {"vector": "b", "cap": 1.0}]},
                ]}, tmp_path / "published.pt")
    config, skips = import_torch_config(tmp_path / "published.pt")
    assert list(config.experiments) == ["mixed", "both"]
    assert [c.layer for c in config.experiment("mixed").caps] == [1]
    assert config.experiment("mixed").caps[0].floor == -0.5
    assert skips.interventions == ("mixed/b", "steer_only/b")
    assert skips.experiments == ("steer_only",)


THINKING_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n"
    "{% else %}<think>\n{% endif %}"
    "{% endif %}"
)


def test_chat_prompt_turns_thinking_off(tokenizer: Any) -> None:
    tokenizer.chat_template = THINKING_TEMPLATE
    lm = wrap_model(tiny_model("llama"), tokenizer)
    prompt = lm.chat_prompt([{"role": "user", "content": "Hi"}])
    assert prompt.endswith("<|assistant|><think>\n\n</think>\n")
    assert tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                         add_generation_prompt=True).endswith("<|assistant|><think>\n")


def test_chat_prompt_still_renders_an_ordinary_template(tiny_llama: Any) -> None:
    prompt = tiny_llama.chat_prompt([{"role": "system", "content": "You are a hermit."},
                                     {"role": "user", "content": "Hello?"}])
    assert "You are a hermit." in prompt and "Hello?" in prompt and "think" not in prompt
