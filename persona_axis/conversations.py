"""Reading and validating conversation files: the input of monitor, generate and the evals.

A file holds one conversation or several: .json (a message list, an object with "conversation" or
"messages" plus metadata, or a list of either) or .jsonl (one of either per line). Messages are
{"role": system|user|assistant, "content": non-empty text}; a system message may only come first.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from persona_axis.errors import PersonaAxisError
from persona_axis.model.loading import Message

ROLES = ("system", "user", "assistant")


@dataclass
class Conversation:
    """A given conversation: messages [{"role", "content"}], the file's other keys, and where it was read."""

    messages: list[Message]
    metadata: dict[str, Any] = field(default_factory=dict)
    source: str = ""


def _check_message(message: Any, where: str) -> Message:
    if not isinstance(message, dict):
        raise PersonaAxisError(f"{where}: expected an object with role and content")
    role, content = message.get("role"), message.get("content")
    if role not in ROLES:
        raise PersonaAxisError(f"{where}: role must be system, user or assistant, not {role!r}")
    if not isinstance(content, str):
        raise PersonaAxisError(f"{where}: content must be a string")
    if not content.strip():
        raise PersonaAxisError(f"{where}: empty content")
    return {"role": role, "content": content}


def check_messages(messages: Any, where: str, need_assistant: bool = True) -> list[Message]:
    """Validate a message list; return copies holding only role and content. Errors name `where`."""
    if not isinstance(messages, list) or not messages:
        raise PersonaAxisError(f"{where}: expected a non-empty list of messages")
    checked = [_check_message(m, f"{where}: message {n}") for n, m in enumerate(messages, 1)]
    if any(m["role"] == "system" for m in checked[1:]):
        raise PersonaAxisError(f"{where}: a system message may only come first")
    if need_assistant and not any(m["role"] == "assistant" for m in checked):
        raise PersonaAxisError(f"{where}: no assistant turn to project")
    return checked


def _conversation(data: Any, where: str, need_assistant: bool) -> Conversation:
    if isinstance(data, list):
        return Conversation(check_messages(data, where, need_assistant), {}, where)
    if not isinstance(data, dict):
        raise PersonaAxisError(f"{where}: expected a list of messages or an object holding one")
    keys = [key for key in ("conversation", "messages") if key in data]
    if len(keys) != 1:
        raise PersonaAxisError(f'{where}: expected the messages under exactly one of "conversation" or "messages"')
    metadata = {k: v for k, v in data.items() if k != keys[0]}
    return Conversation(check_messages(data[keys[0]], where, need_assistant), metadata, where)


def _parse(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise PersonaAxisError(f"{where}: not JSON ({exc})") from None


def read_conversations(path: str | Path, need_assistant: bool = True) -> list[Conversation]:
    """Read conversations from a .json file (a message list, an object with "conversation" or
    "messages" plus metadata, or a list of either) or a .jsonl file (one of either per line).

    need_assistant=False accepts conversations without an assistant turn (prompts to generate from)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PersonaAxisError(f"{path}: cannot read ({exc})") from None
    if path.suffix in (".jsonl", ".ndjson"):
        lines = [(f"{path} line {n}", line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
        conversations = [_conversation(_parse(line, where), where, need_assistant) for where, line in lines]
    else:
        data = _parse(text, str(path))
        if isinstance(data, list) and data and not (isinstance(data[0], dict) and "role" in data[0]):
            conversations = [_conversation(item, f"{path}: conversation {n}", need_assistant)
                             for n, item in enumerate(data, 1)]
        else:
            conversations = [_conversation(data, str(path), need_assistant)]
    if not conversations:
        raise PersonaAxisError(f"{path}: no conversations")
    return conversations
