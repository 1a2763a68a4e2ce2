"""Roles, traits, questions and default prompts: the project's own catalogue and readers for others.

Our format (a directory; `persona_axis/data/` is the built-in one):
  roles/*.json      lists of {"name", "group", "description", "prompts": [str, ...]}
  traits/*.json     lists of {"name", "description", "prompts": [str, ...]}       (optional)
  defaults.json     {"prompts": [str, ...]}  neutral Assistant system prompts; "" = no system prompt
  questions.jsonl   {"id", "question", "kind"} per line
Also read: role files holding a dict {"instruction": [{"pos": prompt}, ...], "questions": [...],
"eval_prompt": str} (the role's name is the file's stem), and questions lines {"question", "id"}.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from persona_axis.errors import PersonaAxisError

BUILTIN = Path(__file__).parent / "data"
DEFAULT_ROLE = "default"  # the name under which default-Assistant rollouts are stored


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

    def digest(self) -> str:
        """sha256 over the catalogue's content (roles, defaults, questions, traits)."""
        payload = json.dumps(
            [[r.__dict__ for r in self.roles], self.defaults, [q.__dict__ for q in self.questions],
             [t.__dict__ for t in self.traits]],
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()


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


def _role_from_ours(entry: Any, path: Path, group_default: str) -> Role:
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or "prompts" not in entry:
        raise _fail(path, "each entry needs at least 'name' and 'prompts'")
    prompts = _strings(entry["prompts"], path, f"{entry['name']}.prompts")
    if not prompts:
        raise _fail(path, f"role {entry['name']!r} has no prompts")
    return Role(entry["name"], str(entry.get("group", group_default)), str(entry.get("description", "")), prompts)


def _role_from_instruction_file(data: dict[str, Any], path: Path) -> Role:
    instructions = data.get("instruction")
    if not isinstance(instructions, list) or not all(isinstance(i, dict) and "pos" in i for i in instructions):
        raise _fail(path, "'instruction' must be a list of {\"pos\": prompt} objects")
    prompts = tuple(str(i["pos"]) for i in instructions)
    questions = _strings(data.get("questions", []), path, "questions")
    eval_prompt = str(data.get("eval_prompt", ""))
    description = eval_prompt.strip().splitlines()[0] if eval_prompt.strip() else ""
    return Role(path.stem, str(data.get("group", "unknown")), description, prompts, questions, eval_prompt)


def _read_roles(directory: Path, group_default: str) -> list[Role]:
    roles: list[Role] = []
    for path in sorted(directory.glob("*.json")):
        data = _read_json(path)
        if isinstance(data, dict) and "instruction" in data:
            roles.append(_role_from_instruction_file(data, path))
        elif isinstance(data, list):
            roles.extend(_role_from_ours(entry, path, group_default) for entry in data)
        else:
            raise _fail(path, "expected a list of roles or a role object with 'instruction'")
    return roles


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


def load_catalog(directory: str | Path | None = None) -> Catalog:
    """Read a catalogue directory (default: the built-in one). Malformed files raise PersonaAxisError."""
    root = Path(directory) if directory else BUILTIN
    if not root.is_dir():
        raise PersonaAxisError(f"catalogue directory not found: {root}")
    roles_dir = root / "roles" if (root / "roles").is_dir() else root
    roles = _read_roles(roles_dir, "unknown")
    if not roles:
        raise PersonaAxisError(f"no roles found in {roles_dir}: add roles/*.json files")
    _unique([r.name for r in roles], roles_dir, "role name")
    if DEFAULT_ROLE in {r.name for r in roles}:
        raise _fail(roles_dir, f"'{DEFAULT_ROLE}' is reserved for the default Assistant; rename that role")
    traits = _read_roles(root / "traits", "trait") if (root / "traits").is_dir() else []
    defaults_path = root / "defaults.json"
    defaults = _strings(_read_json(defaults_path).get("prompts"), defaults_path, "prompts") if defaults_path.exists() \
        else _strings(_read_json(BUILTIN / "defaults.json")["prompts"], BUILTIN / "defaults.json", "prompts")
    questions_path = next((p for p in (root / "questions.jsonl", root / "extraction_questions.jsonl") if p.exists()),
                          BUILTIN / "questions.jsonl")
    questions = _read_questions(questions_path)
    _unique([q.id for q in questions], questions_path, "question id")
    return Catalog(tuple(roles), defaults, tuple(questions), tuple(traits), "builtin" if root == BUILTIN else str(root))
