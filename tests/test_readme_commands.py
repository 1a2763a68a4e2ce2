"""Every `persona-axis ...` command the documentation shows parses with the real command-line parser.

Commands are taken from the ```bash blocks of README.md, docs/results.md and docs/real-chat.md (continuation lines
joined, comments dropped, `a && b` split) and from inline code spans that start with `persona-axis `
or `.venv/bin/persona-axis `. Each is parsed by `persona_axis.cli.build_parser()` without running
anything, and every `--option` it names must be an option of that subcommand spelled in full
(argparse would accept a prefix, but a reader copying the command should not rely on it). The
values of --cap, --steer and --ablate must parse as intervention specs, and the --cap examples for
the embedded model must name the layer block `calibrate` makes for it by default.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from persona_axis.cli import build_parser
from persona_axis.control.capping import default_layer_block, parse_experiment_id
from persona_axis.control.spec import ablate_item, cap_item, steer_item
from persona_axis.errors import PersonaAxisError

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "docs" / "results.md", ROOT / "docs" / "real-chat.md"]
EMBEDDED_LAYERS = 30  # SmolLM2-135M-Instruct, the embedded model ("default")
FENCE = re.compile(r"^```(\w*)\s*$")
INLINE = re.compile(r"`((?:\.venv/bin/)?persona-axis [^`]+)`")
SEPARATORS = {"&&", "||", ";", "|"}


def _bash_lines(text: str) -> list[str]:
    """The logical lines of every ```bash block (backslash continuations joined)."""
    lines, block, joined = [], None, ""
    for line in text.splitlines():
        fence = FENCE.match(line.strip())
        if fence:
            block = fence.group(1) if block is None else None
            continue
        if block != "bash":
            continue
        joined += line.rstrip()
        if joined.endswith("\\"):
            joined = joined[:-1] + " "
            continue
        lines.append(joined)
        joined = ""
    return lines


def _commands(text: str) -> list[list[str]]:
    """persona-axis commands as argv lists (program first): bash blocks, then inline code spans."""
    out = []
    for line in _bash_lines(text):
        tokens: list[str] = []
        for token in [*shlex.split(line, comments=True), "&&"]:
            if token in SEPARATORS:
                if tokens and Path(tokens[0]).name == "persona-axis":
                    out.append(tokens)
                tokens = []
            else:
                tokens.append(token)
    for span in INLINE.findall(" ".join(text.split())):
        out.append(shlex.split(span))
    return out


def _documented() -> list[tuple[str, list[str]]]:
    return [(path.relative_to(ROOT).as_posix(), argv) for path in DOCS if path.exists()
            for argv in _commands(path.read_text(encoding="utf-8"))]


def _subparser(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.ArgumentParser:
    """The (sub)parser the positional command words of argv select: 'eval run' -> eval's run parser."""
    words = iter(argv)
    while True:
        actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not actions:
            return parser
        word = next((w for w in words if not w.startswith("-")), None)
        if word is None or word not in actions[0].choices:
            return parser
        parser = actions[0].choices[word]


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings}


COMMANDS = _documented()


def test_the_documentation_shows_commands() -> None:
    readme = [argv for where, argv in COMMANDS if where == "README.md"]
    assert len(readme) >= 20, f"only {len(readme)} persona-axis commands found in README.md: is the extraction broken?"
    assert ["bash", "scripts/setup.sh"] not in readme  # the && split keeps only persona-axis commands
    assert any(argv[:2] == [".venv/bin/persona-axis", "run"] for argv in readme)


@pytest.mark.parametrize(("where", "argv"), COMMANDS, ids=[f"{w}: {' '.join(a[1:4])}" for w, a in COMMANDS])
def test_documented_command_parses(where: str, argv: list[str]) -> None:
    command = shlex.join(argv)
    parser = build_parser()
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            args = parser.parse_args(argv[1:])
        except SystemExit as exc:
            raise AssertionError(f"{where}: `{command}` does not parse: {stderr.getvalue().strip()}") from exc
    known = _options(_subparser(parser, argv[1:]))
    for token in argv[1:]:
        if token.startswith("--"):
            option = token.split("=", 1)[0]
            assert option in known, f"{where}: `{command}` uses {option}, which is not an option spelled in full"
    try:
        for steer in getattr(args, "steer", None) or []:
            steer_item(steer)
        for ablate in getattr(args, "ablate", None) or []:
            ablate_item(ablate)
        caps = getattr(args, "cap", None) or []
        for cap in [caps] if isinstance(caps, str) else caps:
            _check_cap(cap, getattr(args, "model", "default"), f"{where}: `{command}`")
    except PersonaAxisError as exc:
        raise AssertionError(f"{where}: `{command}`: {exc}") from exc


def _check_cap(cap: str, model: str, what: str) -> None:
    """The experiment id parses; for the embedded model it names calibrate's default block."""
    experiment = cap_item(cap)["experiment"]
    start, stop, _ = parse_experiment_id(experiment)
    if model == "default":
        block = default_layer_block(EMBEDDED_LAYERS)
        assert range(start, stop) == block, (f"{what} caps {experiment}, but calibrate's default block for the "
                                             f"embedded model is layers_{block.start}:{block.stop}")


def test_readme_request_caps_name_the_default_block() -> None:
    """The server examples' "cap" fields, like the --cap options, name the default block."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    caps = re.findall(r'"cap":\s*"([^"]+)"', text)
    assert caps, "the README shows no request with a cap"
    for cap in caps:
        _check_cap(cap, "default", f'README.md: "cap": "{cap}"')


def test_readme_links_to_files_that_exist() -> None:
    """Relative links in the documents of DOCS name files of the repository (anchors not checked)."""
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" in target:
                continue
            assert (path.parent / target).exists(), f"{path.relative_to(ROOT)} links to {target}, which does not exist"
