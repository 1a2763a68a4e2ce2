"""kill -9 at seeded points of `run`, `eval run` and `simulate`, resumed by the same command: the result equals
an uninterrupted run's, record for record.

The kill point is deterministic, not a race against a timer: store.py's fault-injection hook makes the CLI
process SIGKILL itself right after, or in the middle of, its Nth durable write to the files a pattern names
(PERSONA_AXIS_KILL_AFTER_WRITES / PERSONA_AXIS_KILL_IN_WRITE / PERSONA_AXIS_KILL_WRITES_TO), with N drawn
from a seeded random stream among the writes the uninterrupted run made (PERSONA_AXIS_WRITE_LOG). Every
process runs on one thread, so the runs compared are computed alike.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from collections.abc import Sequence
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import pytest
import torch
from chat_server import FakeServer, Reply

from persona_axis.axis import Axis, load_axis, save_axis
from persona_axis.build.pipeline import preset_settings, run_pipeline
from persona_axis.catalog import load_catalog
from persona_axis.control.calibration import calibrate
from persona_axis.control.capping import save_config
from persona_axis.judges.base import JudgeItem, Verdict
from persona_axis.model.loading import load_model
from persona_axis.store import (
    KILL_AFTER_WRITES,
    KILL_IN_WRITE,
    KILL_WRITES_TO,
    WRITE_LOG,
    load_tensors,
    read_jsonl,
)

SEED = 20261201  # of the kill points; change it to try other moments
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
CAP = "layers_1:3-p0.5"


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "persona_axis.cli", *args]


def _env(**hook: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_AXIS_KILL")}
    return {**clean, **ONE_THREAD, **hook}


def _finish(command: list[str]) -> subprocess.CompletedProcess[str]:
    """Run `command` to its end (no fault injected); fail with its stderr if it fails."""
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _write_log(command: list[str], log: Path) -> list[str]:
    """Run `command` to its end, returning the file name of each of its durable writes, in order."""
    done = subprocess.run(command, env=_env(**{WRITE_LOG: str(log)}), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return log.read_text().splitlines()


def _kill(command: list[str], pattern: str, n: int, torn: bool) -> None:
    """Run `command` until the Nth durable write to a file matching `pattern` (torn: in the middle of that write,
    else right after it), where the process SIGKILLs itself."""
    hook = {KILL_WRITES_TO: pattern, (KILL_IN_WRITE if torn else KILL_AFTER_WRITES): str(n)}
    done = subprocess.run(command, env=_env(**hook), capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, (f"not killed at write {n} to {pattern} (torn={torn}): "
                                                f"rc {done.returncode}\n{done.stderr[-3000:]}")


def _point(rng: random.Random, log: Sequence[str], pattern: str) -> int:
    """A seeded draw among the writes to `pattern` that the uninterrupted run made."""
    count = sum(fnmatch(name, pattern) for name in log)
    assert count >= 1, f"the uninterrupted run wrote nothing to {pattern}: {log}"
    return rng.randint(1, count)


def _same_records(whole: Path, resumed: Path, names: Sequence[str]) -> None:
    """The records of each name are exactly those of the uninterrupted run, each once."""
    def key(record: dict[str, Any]) -> str:
        return json.dumps(record, sort_keys=True)

    for name in names:
        theirs, mine = (sorted(read_jsonl(run / f"{name}.jsonl"), key=key) for run in (whole, resumed))
        assert theirs and [key(r) for r in mine] == [key(r) for r in theirs], f"{name}.jsonl differs"
        assert (resumed / f"{name}.jsonl").read_bytes().endswith(b"\n")


def _torn_tail(path: Path) -> bool:
    data = path.read_bytes() if path.exists() else b""
    return bool(data) and not data.endswith(b"\n")


# -- run --------------------------------------------------------------------------------------------------------
def _score(body: dict[str, Any]) -> Reply:
    """Mixed role scores, deterministic in the judged text: villain_b and answers to q1 score 1, the rest 3."""
    content = body["messages"][1]["content"]
    low = "Role: villain_b" in content or "Question number 1," in content
    return Reply("in role\nSCORE: 1" if low else "in role\nSCORE: 3")


@pytest.fixture()
def catalog_dir(tmp_path: Path) -> Path:
    root = tmp_path / "catalog"
    (root / "roles").mkdir(parents=True)
    for group, names in {"professional": ["nurse_a"], "fantastical": ["dragon_a"],
                         "adversarial": ["villain_a", "villain_b"]}.items():
        entries = [{"name": n, "group": group, "description": f"a {n}", "prompts": [f"You are {n}.", f"Be {n}."]}
                   for n in names]
        (root / "roles" / f"{group}.json").write_text(json.dumps(entries))
    (root / "defaults.json").write_text(json.dumps({"prompts": ["", "You are an AI assistant."]}))
    questions = [{"id": f"q{i}", "question": f"Question number {i}, what do you think?"} for i in range(4)]
    (root / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    (root / "traits").mkdir()
    traits = [{"name": n, "description": f"very {n}", "prompts": [f"Be {n}.", f"Act {n}."]} for n in ("calm", "proud")]
    (root / "traits" / "traits.json").write_text(json.dumps(traits))
    return root


def test_run_killed_in_rollouts_judging_and_vectors_then_resumed(tmp_path: Path, tiny_model_dir: str,
                                                                 catalog_dir: Path, server: FakeServer) -> None:
    server.respond = _score

    def command(out: Path) -> list[str]:
        return _cli("run", "--model", tiny_model_dir, "--dtype", "float32", "--out", str(out), "--preset", "smoke",
                    "--catalog", str(catalog_dir), "--judge", "openai", "--judge-url", server.base_url,
                    "--judge-model", "m", "--batch-size", "2", "--max-new-tokens", "8", "--no-progress")

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    log = _write_log(command(whole), tmp_path / "writes.log")
    rng = random.Random(SEED)
    # During rollouts: torn inside an append of rollout records (its chunk's tensors are already saved).
    _kill(command(killed), "rollouts.jsonl", _point(rng, log, "rollouts.jsonl"), torn=True)
    assert _torn_tail(killed / "rollouts.jsonl") and not (killed / "scores.jsonl").exists()
    # During judging: right after an append of scores.
    _kill(command(killed), "scores.jsonl", _point(rng, log, "scores.jsonl"), torn=False)
    assert not (killed / "vectors.safetensors").exists()
    # During vectors: in the middle of writing a vector file (its temporary file is left, never renamed).
    n = _point(rng, log, "*vectors*.safetensors")
    _kill(command(killed), "*vectors*.safetensors", n, torn=True)
    assert list(killed.glob(".*vectors*.safetensors.*")) and not (killed / "axis.safetensors").exists()
    _finish(command(killed))

    _same_records(whole, killed, ["rollouts", "scores"])
    assert _means_by_id(killed) == _means_by_id(whole)
    for name in ("vectors", "trait_vectors", "role_vectors_all_answers"):
        theirs, _ = load_tensors(whole / f"{name}.safetensors")
        mine, _ = load_tensors(killed / f"{name}.safetensors")
        assert theirs.keys() == mine.keys() and all(torch.equal(theirs[k], mine[k]) for k in theirs), name
    assert torch.equal(load_axis(whole).vectors, load_axis(killed).vectors)


def _means_by_id(run: Path) -> dict[str, list[float]]:
    """Every stored response mean, by rollout id (each id exactly once)."""
    found: dict[str, list[float]] = {}
    for path in sorted((run / "activations").glob("chunk-*.safetensors")):
        tensors, meta = load_tensors(path)
        for row, record_id in enumerate(json.loads(meta["ids"])):
            assert record_id not in found
            found[record_id] = tensors["means"][row].flatten().tolist()
    return found


# -- eval run ---------------------------------------------------------------------------------------------------
class EveryOtherJudge:
    id = "every-other"

    def score(self, items: Sequence[JudgeItem]) -> list[Verdict]:
        return [Verdict(3 if k % 2 == 0 else 1, "alternating", self.id) for k in range(len(items))]


def test_eval_run_killed_in_replies_capabilities_and_verdicts_then_resumed(tmp_path: Path,
                                                                           tiny_model_dir: str) -> None:
    axis_run = tmp_path / "axis"
    run_pipeline(axis_run, load_model(tiny_model_dir, dtype="float32"), load_catalog(),
                 preset_settings("smoke", max_new_tokens=6), EveryOtherJudge(), progress=False)
    save_config(calibrate(axis_run, range(1, 3), [0.5]), axis_run / "capping")

    def command(out: Path) -> list[str]:
        return _cli("eval", "run", "--model", tiny_model_dir, "--dtype", "float32", "--axis", str(axis_run),
                    "--preset", "smoke", "--cap", CAP, "--quiet", "--out", str(out))

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    log = _write_log(command(whole), tmp_path / "writes.log")
    rng = random.Random(SEED + 1)
    # The capped condition's chunk of first turns (the last write there) torn: its stored lines are kept and the
    # chunk is generated again whole (generating only its missing turns would batch them apart: other cap counts).
    _kill(command(killed), "first_turns.jsonl", sum(fnmatch(name, "first_turns.jsonl") for name in log), torn=True)
    assert _torn_tail(killed / "first_turns.jsonl")
    _kill(command(killed), "replies.jsonl", _point(rng, log, "replies.jsonl"), torn=True)
    assert _torn_tail(killed / "replies.jsonl")
    _kill(command(killed), "capabilities.jsonl", _point(rng, log, "capabilities.jsonl"), torn=False)
    _kill(command(killed), "verdicts.jsonl", _point(rng, log, "verdicts.jsonl"), torn=True)
    assert _torn_tail(killed / "verdicts.jsonl")
    _finish(command(killed))
    # Verdicts too, scores exactly: the offline harm judge pads each batch (a batch of other replies moves a score
    # by up to ~1e-7), so a batch torn by the kill is judged again whole, never as a batch of its remainder.
    _same_records(whole, killed, ["first_turns", "replies", "capabilities", "verdicts"])


# -- simulate ---------------------------------------------------------------------------------------------------
def test_simulate_killed_again_and_again_mid_conversation_then_resumed(tmp_path: Path, tiny_model_dir: str) -> None:
    """The reviewer's case: therapy, 3 conversations of 3 turns, killed at seeded moments until it finishes; both
    the target and the simulated user sample, so a resumed turn that drew from another stream would show."""
    save_axis(Axis(torch.randn(3, 64, generator=torch.Generator().manual_seed(1))), tmp_path / "axis.safetensors")

    def command(out: Path) -> list[str]:
        return _cli("simulate", "--model", tiny_model_dir, "--dtype", "float32", "--axis",
                    str(tmp_path / "axis.safetensors"), "--domain", "therapy", "--n", "3", "--turns", "3",
                    "--batch-size", "2", "--max-new-tokens", "5", "--user-max-new-tokens", "5", "--temperature",
                    "0.9", "--seed", "7", "--json", "--out", str(out))

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    expected = json.loads(_finish(command(whole)).stdout)["conversations"]
    rng = random.Random(SEED + 2)
    kills: list[tuple[int, bool]] = []
    for _ in range(12):
        torn = rng.random() < 0.5
        n = rng.randint(2 if torn else 1, 3)  # a torn first write might save nothing: never tear the first
        hook = {KILL_WRITES_TO: "*.jsonl", (KILL_IN_WRITE if torn else KILL_AFTER_WRITES): str(n)}
        done = subprocess.run(command(killed), env=_env(**hook), capture_output=True, text=True, timeout=300)
        if done.returncode == 0:
            break
        assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
        kills.append((n, torn))
    else:
        pytest.fail(f"still not finished after 12 kills: {kills}")
    assert len(kills) >= 2 and any(torn for _, torn in kills), kills
    assert json.loads(done.stdout)["conversations"] == expected, kills
    _same_records(whole, killed, ["conversations", "turns"])
    turns = read_jsonl(killed / "turns.jsonl")
    assert len(turns) == len({(r["id"], r["turn"]) for r in turns}) == 3 * 2  # turns 1 and 2, each once
