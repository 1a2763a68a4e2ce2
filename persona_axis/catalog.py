"""Roles, traits, questions and default prompts: the project's own catalogue and the reference's published one.

`load_catalog(dir)` reads three layouts (`persona_axis/data/` is the built-in catalogue, in ours):
  ours:      roles/*.json, traits/*.json (optional), defaults.json, questions.jsonl
  published: roles/instructions/<role>.json (with default.json among them), roles/role_list.json (optional),
             traits/instructions/<trait>.json (optional), extraction_questions.jsonl
  flat:      every file in the directory itself: <role>.json ..., default.json or defaults.json,
             role_list.json (optional), questions.jsonl or extraction_questions.jsonl
Role files hold a list of {"name", "group", "description", "prompts": [str, ...]} (ours) or one role as
{"instruction": [{"pos": prompt}, ...], "questions": [str, ...], "eval_prompt": str} (published; the name is
the file's stem, the description its "description" key, else the first line of eval_prompt).
The default file is {"prompts": [...]} or {"instruction": [{"pos": prompt}, ...]}; "" means no system
prompt; a catalogue without one uses the built-in defaults. Questions: one {"question", "id", "kind"?} per
line (questions.jsonl first, then extraction_questions.jsonl); a catalogue without either is an error.
role_list.json ({name: description} or [name, ...]), when present, selects and orders the roles: exactly the
roles it names load, in its order, its non-empty descriptions replace the files' ones, an entry "default" is
skipped, and a name without a role file is an error.
"{model_name}" in a role, trait or default prompt stands for the model's own name (`Catalog.for_model`
fills it); any other "{word}" in those prompts is an error at load time.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from persona_axis.errors import PersonaAxisError

BUILTIN = Path(__file__).parent / "data"
DEFAULT_ROLE = "default"  # the name under which default-Assistant rollouts are stored
MODEL_NAME = "{model_name}"  # the one placeholder a prompt may hold
QUESTION_FILES = ("questions.jsonl", "extraction_questions.jsonl")
_NOT_ROLES = {"default.json", "defaults.json", "role_list.json", "trait_list.json"}  # index files beside roles
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True)
class Question:
    id: str
    text: str
    kind: str = "unknown"


@dataclass(frozen=True)
class Role:
    """A character (or trait) with the system prompts that ask the model to be it."""

    name: str
    group: str
    description: str
    prompts: tuple[str, ...]
    questions: tuple[str, ...] = ()  # role-specific questions some catalogues carry (kept, not used by runs)
    eval_prompt: str = ""


@dataclass(frozen=True)
class Catalog:
    roles: tuple[Role, ...]
    defaults: tuple[str, ...]
    questions: tuple[Question, ...]
    traits: tuple[Role, ...] = ()
    source: str = "builtin"

    def role(self, name: str) -> Role:
        for role in self.roles:
            if role.name == name:
                return role
        raise PersonaAxisError(f"unknown role {name!r}: see `persona-axis roles` for the catalogue's names")

    def select_roles(self, names: list[str] | None) -> tuple[Role, ...]:
        return self.roles if not names else tuple(self.role(n) for n in names)

    def for_model(self, model_name: str) -> Catalog:
        """A copy with "{model_name}" in every role, trait and default prompt replaced by `model_name`.

        Pass the name the model calls itself, e.g. `short_model_name(lm.name)`.
        """
        if not model_name.strip():
            raise PersonaAxisError("a model name is needed to fill {model_name} in the catalogue's prompts")

        def fill(prompts: tuple[str, ...]) -> tuple[str, ...]:
            return tuple(p.replace(MODEL_NAME, model_name) for p in prompts)

        return replace(self, roles=tuple(replace(r, prompts=fill(r.prompts)) for r in self.roles),
                       traits=tuple(replace(t, prompts=fill(t.prompts)) for t in self.traits),
                       defaults=fill(self.defaults))

    def digest(self) -> str:
        """sha256 over the catalogue's content (roles, defaults, questions, traits)."""
        payload = json.dumps(
            [[r.__dict__ for r in self.roles], self.defaults, [q.__dict__ for q in self.questions],
             [t.__dict__ for t in self.traits]],
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()


def short_model_name(name: str) -> str:
    """The name a prompt uses for a model (what fills "{model_name}"), from its display name or id.

    Rule: drop a trailing "(...)" note, keep what follows the last "/", drop a ".gguf" or ".safetensors"
    suffix, take the first word (words split at "-", "_" and spaces), strip its trailing version digits and
    dots, and capitalise it when it is all lower case. "SmolLM2-135M-Instruct (embedded, Q4_1 GGUF)" ->
    "SmolLM"; "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf" -> "Qwen"; "Qwen/Qwen3-8B" -> "Qwen";
    "gemma-2-27b-it" -> "Gemma". A name whose first word is all digits is returned as given, stripped.
    """
    base = re.sub(r"\s*\([^()]*\)\s*$", "", name).strip().rsplit("/", 1)[-1]
    base = re.sub(r"\.(gguf|safetensors)$", "", base, flags=re.IGNORECASE)
    first = re.split(r"[-_\s]+", base)[0]
    family = re.sub(r"[0-9.]+$", "", first)
    if not family:
        return name.strip()
    return family.capitalize() if family.islower() else family


def _fail(path: Path, problem: str) -> PersonaAxisError:
    return PersonaAxisError(f"malformed catalogue file {path}: {problem}")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise _fail(path, str(exc)) from None


def _strings(value: Any, path: Path, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail(path, f"{what} must be a list of strings")
    return tuple(value)


def _checked_prompts(prompts: tuple[str, ...], path: Path) -> tuple[str, ...]:
    """The prompts, after checking they hold no placeholder other than {model_name}."""
    for prompt in prompts:
        for word in _PLACEHOLDER.findall(prompt):
            if f"{{{word}}}" != MODEL_NAME:
                raise _fail(path, f"unknown placeholder {{{word}}} in a prompt (only {MODEL_NAME} is filled)")
    return prompts


def _instruction_prompts(data: dict[str, Any], path: Path) -> tuple[str, ...]:
    """The "pos" prompts of a published file's "instruction" list."""
    instructions = data.get("instruction")
    if not isinstance(instructions, list) or not all(
            isinstance(i, dict) and isinstance(i.get("pos"), str) for i in instructions):
        raise _fail(path, "'instruction' must be a list of {\"pos\": prompt} objects with string prompts")
    return _checked_prompts(tuple(i["pos"] for i in instructions), path)


def _role_from_ours(entry: Any, path: Path, group_default: str) -> Role:
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or "prompts" not in entry:
        raise _fail(path, "each entry needs at least 'name' and 'prompts'")
    prompts = _checked_prompts(_strings(entry["prompts"], path, f"{entry['name']}.prompts"), path)
    if not prompts:
        raise _fail(path, f"role {entry['name']!r} has no prompts")
    return Role(entry["name"], str(entry.get("group", group_default)), str(entry.get("description", "")), prompts)


def _role_from_instruction_file(data: dict[str, Any], path: Path, group_default: str) -> Role:
    prompts = _instruction_prompts(data, path)
    if not prompts:
        raise _fail(path, f"role {path.stem!r} has no prompts")
    questions = _strings(data.get("questions", []), path, "questions")
    eval_prompt, description = data.get("eval_prompt", ""), data.get("description", "")
    if not isinstance(eval_prompt, str) or not isinstance(description, str):
        raise _fail(path, "'eval_prompt' and 'description' must be strings")
    if not description.strip() and eval_prompt.strip():
        description = eval_prompt.strip().splitlines()[0]
    return Role(path.stem, str(data.get("group", group_default)), description.strip(), prompts, questions, eval_prompt)


def _read_roles(directory: Path, group_default: str) -> list[Role]:
    """Every role in the directory's *.json files (index and default files excluded), in file-name order."""
    roles: list[Role] = []
    for path in sorted(p for p in directory.glob("*.json") if p.name not in _NOT_ROLES):
        data = _read_json(path)
        if isinstance(data, dict) and "instruction" in data:
            roles.append(_role_from_instruction_file(data, path, group_default))
        elif isinstance(data, list):
            roles.extend(_role_from_ours(entry, path, group_default) for entry in data)
        else:
            raise _fail(path, "expected a list of roles or a role object with 'instruction'")
    return roles


def _apply_role_list(roles: list[Role], path: Path) -> list[Role]:
    """The roles role_list.json names, in its order, with its non-empty descriptions (see the module doc)."""
    data = _read_json(path)
    if isinstance(data, dict) and all(isinstance(v, str) for v in data.values()):
        listed = dict(data)
    elif isinstance(data, list) and all(isinstance(v, str) for v in data):
        _unique(data, path, "role name")
        listed = dict.fromkeys(data, "")
    else:
        raise _fail(path, "expected {role name: description} or a list of role names")
    by_name = {r.name: r for r in roles}
    missing = [n for n in listed if n != DEFAULT_ROLE and n not in by_name]
    if missing:
        raise _fail(path, f"it names {len(missing)} role(s) without a role file, first {missing[0]!r}: "
                          "add their files or remove them from the list")
    return [replace(by_name[n], description=d.strip() or by_name[n].description)
            for n, d in listed.items() if n != DEFAULT_ROLE]


def _read_defaults(path: Path) -> tuple[str, ...]:
    """Default-Assistant prompts from {"prompts": [...]} or the published {"instruction": [{"pos": ...}]}."""
    data = _read_json(path)
    if isinstance(data, dict) and "prompts" in data:
        prompts = _checked_prompts(_strings(data["prompts"], path, "prompts"), path)
    elif isinstance(data, dict) and "instruction" in data:
        prompts = _instruction_prompts(data, path)
    else:
        raise _fail(path, "expected {\"prompts\": [...]} or {\"instruction\": [{\"pos\": prompt}, ...]}")
    if not prompts:
        raise _fail(path, "it holds no default prompts (use \"\" for no system prompt)")
    return prompts


def _read_questions(path: Path) -> list[Question]:
    questions: list[Question] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise _fail(path, f"line {number}: {exc}") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("question"), str):
            raise _fail(path, f"line {number}: expected an object with a 'question' string")
        questions.append(Question(str(entry.get("id", f"q{number:03d}")), entry["question"], str(entry.get("kind", "unknown"))))
    return questions


def _unique(names: list[str], path: Path, what: str) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise _fail(path, f"duplicate {what} {name!r}")
        seen.add(name)


def _entries_dir(root: Path, kind: str) -> Path | None:
    """Where role or trait files lie: <kind>/instructions (published), <kind> (ours), or None."""
    return next((d for d in (root / kind / "instructions", root / kind) if d.is_dir()), None)


def _first_existing(paths: list[Path]) -> Path | None:
    return next((p for p in paths if p.is_file()), None)


def _load_defaults(root: Path, roles_dir: Path) -> tuple[str, ...]:
    """The catalogue's default prompts, or the built-in ones when it has no default file."""
    candidates = (root / "defaults.json", roles_dir / "default.json", root / "default.json")
    found = sorted({p for p in candidates if p.is_file()})
    if len(found) > 1:
        raise PersonaAxisError(f"catalogue {root} has {len(found)} default files "
                               f"({', '.join(map(str, found))}): keep one")
    return _read_defaults(found[0] if found else BUILTIN / "defaults.json")


def load_catalog(directory: str | Path | None = None) -> Catalog:
    """Read a catalogue directory in any layout of the module doc (default: the built-in one).

    Malformed or missing files raise a one-line PersonaAxisError naming the file.
    """
    root = Path(directory) if directory else BUILTIN
    if not root.is_dir():
        raise PersonaAxisError(f"catalogue directory not found: {root}")
    roles_dir = _entries_dir(root, "roles") or root
    roles = _read_roles(roles_dir, "unknown")
    _unique([r.name for r in roles], roles_dir, "role name")
    if DEFAULT_ROLE in {r.name for r in roles}:
        raise _fail(roles_dir, f"'{DEFAULT_ROLE}' is reserved for the default Assistant; rename that role")
    role_list = _first_existing([root / "roles" / "role_list.json", root / "role_list.json"])
    if role_list is not None:
        roles = _apply_role_list(roles, role_list)
    if not roles:
        raise PersonaAxisError(f"no roles found in {roles_dir}: add role files (*.json)")
    traits_dir = _entries_dir(root, "traits")
    traits = _read_roles(traits_dir, "trait") if traits_dir is not None else []
    questions_path = _first_existing([root / name for name in QUESTION_FILES])
    if questions_path is None:
        raise PersonaAxisError(f"catalogue {root} has no questions file: add {' or '.join(QUESTION_FILES)} "
                               "with one {\"question\": ...} object per line")
    questions = _read_questions(questions_path)
    _unique([q.id for q in questions], questions_path, "question id")
    return Catalog(tuple(roles), _load_defaults(root, roles_dir), tuple(questions), tuple(traits),
                   "builtin" if root == BUILTIN else str(root))


def role_play_conversations(catalog: Catalog, n_roles: int, n_questions: int) -> list[tuple[str, list[dict[str, str]]]]:
    """(role name, conversation) pairs: an even spread of `n_roles` roles over the catalogue, first prompt each."""
    step = max(1, len(catalog.roles) // max(1, n_roles))
    roles = catalog.roles[::step][:n_roles]
    return [(role.name, [{"role": "system", "content": role.prompts[0]}, {"role": "user", "content": q.text}])
            for role in roles for q in catalog.questions[:n_questions]]


def default_conversations(catalog: Catalog, n: int) -> list[list[dict[str, str]]]:
    """`n` default-Assistant conversations: the catalogue's default prompts paired with its questions in turn."""
    return [[{"role": "system", "content": catalog.defaults[k % len(catalog.defaults)]},
             {"role": "user", "content": catalog.questions[k % len(catalog.questions)].text}] for k in range(n)]
