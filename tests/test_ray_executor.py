"""The Ray executor on a local Ray cluster started by the test (loopback only, 2 CPUs): the smoke preset
on the tiny model gives the local executor's axis bit for bit, also when an actor is killed mid-run;
`simulate` and `eval run` on two actors write the local executor's records. A missing ray is tested in
test_executors.py."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
import torch
from chat_server import FakeServer, Reply

from persona_axis.build.pipeline import Settings, plan_rollouts, preset_settings, run_pipeline, select_roles, select_traits
from persona_axis.build.ray_executor import ModelSpec, RayExecutor, init_ray
from persona_axis.catalog import load_catalog
from persona_axis.judges.base import JudgeItem, Verdict
from persona_axis.model.loading import load_model
from persona_axis.store import RunStore, load_tensors

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow


class LengthJudge:
    """Deterministic per reply, whatever order the replies are judged in: 3 for an even length, else 1."""

    id = "length-parity"

    def score(self, items: Sequence[JudgeItem]) -> list[Verdict]:
        return [Verdict(3 if len(item.response) % 2 == 0 else 1, "length parity", self.id) for item in items]


def smoke_settings(batch_size: int) -> Settings:
    """The smoke preset (57 replies) in chunks of `batch_size`: 1 gives 57 chunks in 4 waves, 2 gives 29 in 2."""
    return preset_settings("smoke", max_new_tokens=6, batch_size=batch_size, min_score3=1)


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    init_ray(None, num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def local_run(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], Path]:
    """The smoke run (in chunks of a given size) by the local executor, single-threaded like each actor."""
    runs: dict[int, Path] = {}

    def run(batch_size: int) -> Path:
        if batch_size not in runs:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                lm = load_model(tiny_model_dir, dtype="float32", device="cpu", progress=False)
                runs[batch_size] = run_pipeline(tmp_path_factory.mktemp("local") / "run", lm, load_catalog(),
                                                smoke_settings(batch_size), LengthJudge(), progress=False)
            finally:
                torch.set_num_threads(threads)
        return runs[batch_size]

    return run


def _executor(tiny_model_dir: str) -> RayExecutor:
    return RayExecutor(ModelSpec(tiny_model_dir, dtype="float32", device="cpu"), actors=2, threads_per_actor=1)


def assert_same_run(run: Path, local: Path, settings: Settings) -> None:
    """Same axis, vectors and chunk files bit for bit; every planned rollout recorded exactly once."""
    for name in ("axis.safetensors", "vectors.safetensors", "trait_vectors.safetensors"):
        ours, theirs = load_tensors(run / name)[0], load_tensors(local / name)[0]
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
    chunks = sorted(p.name for p in (run / "activations").iterdir())
    assert chunks == sorted(p.name for p in (local / "activations").iterdir())
    records = RunStore(run).records("rollouts")
    ids = [r["id"] for r in records]
    catalog = load_catalog()
    plan = plan_rollouts(catalog, settings, select_roles(catalog, settings, None), select_traits(catalog, settings))
    assert len(ids) == len(set(ids)) == len(plan) and set(ids) == {item.id for item in plan}
    local_texts = {r["id"]: r["response"] for r in RunStore(local).records("rollouts")}
    assert {r["id"]: r["response"] for r in records} == local_texts


def test_two_actors_give_the_local_axis_bit_for_bit(local_ray: None, local_run: Callable[[int], Path],
                                                   tiny_model_dir: str, tmp_path: Path) -> None:
    settings = smoke_settings(batch_size=2)  # two waves, each a continuous batch of two slots
    with _executor(tiny_model_dir) as executor:
        run = run_pipeline(tmp_path / "run", None, load_catalog(), settings, LengthJudge(), progress=False,
                           executor=executor)
        assert executor.jobs_by_actor == {0: 1, 1: 1} and executor.retried_jobs == 0  # one wave each
    assert_same_run(run, local_run(2), settings)


def test_a_killed_actor_loses_nothing_and_duplicates_nothing(local_ray: None, local_run: Callable[[int], Path],
                                                            tiny_model_dir: str, tmp_path: Path) -> None:
    out, settings = tmp_path / "run", smoke_settings(batch_size=1)  # four waves: a wave is still queued or running
    failures: list[BaseException] = []

    def driver(executor: RayExecutor) -> None:
        try:
            run_pipeline(out, None, load_catalog(), settings, LengthJudge(), progress=False, executor=executor)
        except BaseException as exc:  # reported by the test thread below
            failures.append(exc)

    with _executor(tiny_model_dir) as executor:
        victim = executor.actors[1]
        thread = threading.Thread(target=driver, args=(executor,))
        thread.start()
        deadline = time.monotonic() + 300
        while not (out / RunStore.chunk_file(0)).exists() and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        ray.kill(victim, no_restart=True)  # the first wave is in: the other actor is mid-wave
        thread.join(timeout=300)
        assert not thread.is_alive() and not failures, failures
        assert executor.retried_jobs >= 1 and len(executor.actors) == 1
    assert_same_run(out, local_run(1), settings)


def test_bench_executor_reports_rates_and_identity(local_ray: None, tiny_model_dir: str) -> None:
    from persona_axis.bench.executor import bench_executor

    report = bench_executor(ModelSpec(tiny_model_dir, dtype="float32", device="cpu"), threads=1, replies=4)
    assert report["replies"] == 4 and report["waves"] == 1
    assert report["local_rollouts_per_s"] > 0 and report["ray_rollouts_per_s"] > 0
    assert report["ray_overhead_ratio"] == pytest.approx(report["local_rollouts_per_s"] / report["ray_rollouts_per_s"],
                                                         rel=0.01)
    # One thread everywhere: both Ray configurations reproduce the local chunks bit for bit.
    assert report["ray_identical_to_local"] and report["ray_1_actors_x1_thread_identical_to_local"]


def _single_threaded_main(args: list[str]) -> int:
    """The CLI in this process with one torch thread, like each actor (bit-identity needs equal thread counts)."""
    from persona_axis.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(args)
    finally:
        torch.set_num_threads(threads)


def _sorted_records(run: Path, name: str) -> list[dict]:
    return sorted(RunStore(run).records(name), key=lambda r: json.dumps(r, sort_keys=True))


def test_simulate_on_two_actors_writes_the_local_conversations(local_ray: None, local_run: Callable[[int], Path],
                                                               tiny_model_dir: str, tmp_path: Path) -> None:
    # Three conversations in batches of two: two jobs, one per actor; the target also plays the user.
    args = ["simulate", "--model", tiny_model_dir, "--dtype", "float32", "--device", "cpu", "--axis",
            str(local_run(2)), "--domain", "therapy", "--n", "3", "--turns", "2", "--batch-size", "2",
            "--max-new-tokens", "6", "--user-max-new-tokens", "6", "--json"]
    assert _single_threaded_main([*args, "--out", str(tmp_path / "local")]) == 0
    assert _single_threaded_main([*args, "--out", str(tmp_path / "ray"), "--executor", "ray", "--actors", "2"]) == 0
    local, on_ray = (_sorted_records(tmp_path / name, "conversations") for name in ("local", "ray"))
    assert len(local) == 3 and on_ray == local
    assert all(len(r["messages"]) == 4 and None not in r["projections"] for r in local)
    # Same run identity: the Ray run resumes from the local one's directory with nothing left to do.
    assert RunStore(tmp_path / "ray").read_manifest()["identity"] == RunStore(tmp_path / "local").read_manifest()["identity"]


def test_the_user_endpoints_api_key_reaches_the_actors(local_ray: None, local_run: Callable[[int], Path],
                                                       tiny_model_dir: str, server: FakeServer, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # Ray's processes started before this variable was set: only the executor's env_vars can hand it over.
    monkeypatch.setenv("PERSONA_AXIS_TEST_KEY", "s3cret")
    server.play(Reply("I keep thinking about it."))
    args = ["simulate", "--model", tiny_model_dir, "--dtype", "float32", "--device", "cpu", "--axis",
            str(local_run(2)), "--domain", "therapy", "--n", "2", "--turns", "2", "--batch-size", "1",
            "--max-new-tokens", "4", "--user-url", server.base_url, "--user-model-name", "user-m",
            "--user-key-env", "PERSONA_AXIS_TEST_KEY", "--json", "--executor", "ray", "--actors", "2"]
    assert _single_threaded_main(args) == 0
    assert len(server.requests) == 2  # one user message per conversation, each written on an actor
    assert all(headers.get("Authorization") == "Bearer s3cret" for _, headers, _ in server.requests)


def test_a_simulator_holding_a_model_is_refused_before_anything_runs(tiny_model_dir: str) -> None:
    from persona_axis.apps.simulate import simulate
    from persona_axis.apps.user_simulators import LocalUserSimulator
    from persona_axis.axis import Axis
    from persona_axis.errors import PersonaAxisError

    lm = load_model(tiny_model_dir, dtype="float32", device="cpu", progress=False)
    executor = _executor(tiny_model_dir)  # not started: the refusal comes first
    with pytest.raises(PersonaAxisError, match="UserSpec"):
        simulate(None, Axis(torch.zeros(lm.n_layers, lm.hidden_size)), LocalUserSimulator(lm), "therapy", 1, 1,
                 executor=executor)


def test_eval_on_two_actors_writes_the_local_records(local_ray: None, local_run: Callable[[int], Path],
                                                     tiny_model_dir: str, tmp_path: Path) -> None:
    from persona_axis.control.calibration import calibrate
    from persona_axis.control.capping import save_config

    axis_run, cap = local_run(2), "layers_1:3-p0.5"
    save_config(calibrate(axis_run, range(1, 3), [0.5]), tmp_path / "capping")
    args = ["eval", "run", "--model", tiny_model_dir, "--dtype", "float32", "--device", "cpu", "--axis", str(axis_run),
            "--config", str(tmp_path / "capping"), "--cap", cap, "--steer=-1@0", "--preset", "smoke", "--quiet"]
    assert _single_threaded_main([*args, "--out", str(tmp_path / "local")]) == 0
    assert _single_threaded_main([*args, "--out", str(tmp_path / "ray"), "--executor", "ray", "--actors", "2"]) == 0
    for name in ("replies", "capabilities", "verdicts"):
        local, on_ray = _sorted_records(tmp_path / "local", name), _sorted_records(tmp_path / "ray", name)
        assert local and on_ray == local, name
    conditions = {r["condition"] for r in _sorted_records(tmp_path / "ray", "replies")}
    assert conditions == {"uncapped", f"cap:{cap}", "steer:-1@0"}
    checks = {(r["condition"], r["check"]) for r in _sorted_records(tmp_path / "ray", "capabilities")}
    assert checks == {(c, k) for c in conditions for k in ("ifbench", "bigbench", "kl")}
