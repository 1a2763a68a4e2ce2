"""Simulated multi-turn conversations with the target model, resumable, one record per conversation.

Each target reply's mean projection on the unit axis at one layer is captured while the reply is
generated (no second pass); with caps or steering, that layer is one no intervention touches (see
persona_axis.measurement), recorded with every conversation. The users are persona_axis.user_simulators;
statistics are in persona_axis.drift_stats, the predictor in persona_axis.drift_predictor.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from torch import Tensor
from tqdm.auto import tqdm

from persona_axis.axis import Axis
from persona_axis.errors import PersonaAxisError
from persona_axis.executors import Executor, LocalExecutor, executor_or_local
from persona_axis.generation import generate
from persona_axis.measurement import measured_layer
from persona_axis.models import LoadedModel, Message
from persona_axis.steering import InterventionMap
from persona_axis.store import RunStore
from persona_axis.user_simulators import DomainPersona, LocalUserSimulator, UserSimulator, UserSpec, load_domains

CONVERSATIONS = "conversations"
Record = dict[str, Any]  # one simulated conversation (see `simulate`)


def _digest(obj: Any) -> str:
    """sha256 of a JSON-able object, tensors hashed by their float32 bytes."""
    def encode(value: Any) -> Any:
        if isinstance(value, Tensor):
            return hashlib.sha256(value.float().cpu().numpy().tobytes()).hexdigest()
        return str(value)

    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=encode).encode()).hexdigest()


def _interventions_digest(interventions: InterventionMap) -> str | None:
    """A fingerprint of {layer: intervention(s)} (types, vectors, coefficients); None when there are none."""
    described = {str(layer): [[type(i).__name__, *(getattr(i, f.name) for f in fields(i))]
                              for i in (items if isinstance(items, Sequence) else [items])]
                 for layer, items in sorted(interventions.items())}
    return _digest(described) if described else None


def conversation_plan(domain: str, n: int) -> list[tuple[str, DomainPersona]]:
    """(conversation id, persona) for n conversations per chosen domain; personas cycle through the list."""
    return [(f"{name}-c{k:04d}", personas[k % len(personas)])
            for name, personas in load_domains(domain).items() for k in range(n)]


def _converse(target: LoadedModel, axis: Axis, simulator: UserSimulator, plan: list[tuple[str, DomainPersona]],
              turns: int, layer: int, interventions: InterventionMap,
              generation: dict[str, Any]) -> Iterator[list[Record]]:
    """Run `turns` exchanges for a batch of conversations; one target generate and one simulator call per turn.

    Yields [] after each turn but the last (progress), then the batch's records.
    """
    personas = [persona for _, persona in plan]
    histories: list[list[Message]] = [[{"role": "user", "content": p.opening}] for p in personas]
    projections: list[list[float | None]] = [[] for _ in plan]
    for turn in range(turns):
        if turn:
            for history, text in zip(histories, simulator.next_messages(personas, histories)):
                history.append({"role": "user", "content": text})
        result = generate(target, histories, capture=[layer], interventions=interventions,
                          **{**generation, "seed": generation["seed"] + turn})
        values = axis.project(result.captured_means()[:, 0], layer).tolist()
        for history, row, text, ids, value in zip(histories, projections, result.texts, result.token_ids, values):
            history.append({"role": "assistant", "content": text})
            row.append(value if ids else None)  # an empty reply has no tokens to average
        if turn < turns - 1:
            yield []
    yield [{"id": cid, "domain": p.domain, "persona_id": p.id, "capped": bool(interventions), "layer": layer,
            "messages": h, "projections": row} for (cid, p), h, row in zip(plan, histories, projections)]


@dataclass(frozen=True)
class ConversationBatch:
    """A job (executors.Job): a batch of conversations, every turn, on the executor's model (see `_converse`)."""

    axis: Axis
    simulator: UserSimulator | UserSpec
    plan: list[tuple[str, DomainPersona]]
    turns: int
    layer: int
    interventions: InterventionMap
    generation: dict[str, Any]

    def __call__(self, lm: LoadedModel) -> Iterator[list[Record]]:
        simulator = self.simulator.build(lm) if isinstance(self.simulator, UserSpec) else self.simulator
        return _converse(lm, self.axis, simulator, self.plan, self.turns, self.layer, self.interventions,
                         self.generation)


@dataclass(frozen=True)
class SimulatorId:
    """A job: the id of the simulator a UserSpec builds on the executor's model (part of a run's identity)."""

    simulator: UserSpec

    def __call__(self, lm: LoadedModel) -> Iterator[str]:
        yield self.simulator.build(lm).id


def _simulator_id(executor: Executor, simulator: UserSimulator | UserSpec) -> str:
    if not isinstance(simulator, UserSpec):
        return simulator.id
    [(_, found)] = list(executor.run_jobs([SimulatorId(simulator)]))
    return found


def simulate(target: LoadedModel | None, axis: Axis, simulator: UserSimulator | UserSpec, domain: str, turns: int,
             n: int, layer: int | None = None, interventions: InterventionMap | None = None,
             max_new_tokens: int = 96, seed: int = 0, out: str | Path | None = None, progress: bool = False, *,
             temperature: float = 0.0, batch_size: int = 32, executor: Executor | None = None) -> list[Record]:
    """Simulate n conversations of `turns` exchanges per domain ("all": every domain) with the target.

    Turn 1 is each persona's opening; later user turns come from `simulator` (an object, or a
    UserSpec built beside the target). The target replies greedily unless temperature > 0 (seeded
    by seed + turn); `interventions` (e.g. caps from chat.build_interventions) apply to every target
    reply and mark the records capped. Conversations run in batches of `batch_size`, each batch a
    job on `executor` (default: this process, on `target`; a RayExecutor runs batches on its actors,
    so `target` may then be None and the simulator must be a UserSpec or hold no model); the
    records do not depend on the executor.
    Returns one record per conversation {"id", "domain", "persona_id", "capped", "layer", "messages",
    "projections" [turns] (None for an empty reply)}: each reply's mean projection on the unit axis at
    "layer", captured during generation: `layer` if given (an intervened layer is refused), else the
    middle layer, or the layer `measurement.measured_layer` picks outside the interventions.
    With `out`, finished batches are appended to <out>/conversations.jsonl and a re-run skips them.
    """
    executor = _executor_for(target, executor, simulator)
    model = executor.model_identity()
    axis.check_model(model.n_layers, model.hidden_size, model.name)
    if turns < 1 or n < 1 or batch_size < 1:
        raise PersonaAxisError(f"turns, n and batch_size must be at least 1, got {turns}, {n} and {batch_size}")
    interventions = interventions or {}
    layer = measured_layer(axis, interventions, layer)
    plan = conversation_plan(domain, n)
    generation = {"max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed}
    with RunStore.open(out) if out is not None else nullcontext() as store:
        done: dict[str, Record] = {}
        if store is not None:
            identity = {"kind": "drift-simulation", "model": model.name, "model_hash": model.source_hash,
                        "axis_sha256": _digest(axis.vectors), "domain": domain, "turns": turns, "n": n,
                        "personas_sha256": _digest([asdict(p) for _, p in plan]), "layer": layer,
                        "capping": _interventions_digest(interventions),
                        "simulator": _simulator_id(executor, simulator), **generation}
            store.claim(identity, {"axis_metadata": axis.metadata})
            done = {r["id"]: r for r in store.records(CONVERSATIONS)}
        todo = [item for item in plan if item[0] not in done]
        jobs = [ConversationBatch(axis, simulator, todo[start:start + batch_size], turns, layer, interventions,
                                  generation) for start in range(0, len(todo), batch_size)]
        with tqdm(total=len(todo) * turns, desc=f"simulating ({executor.name})", unit="reply",
                  disable=not progress) as bar:
            for index, records in executor.run_jobs(jobs):
                bar.update(len(jobs[index].plan))
                if records and store is not None:
                    store.append(CONVERSATIONS, records)
                done.update((r["id"], r) for r in records)
    return [done[cid] for cid, _ in plan]


def _executor_for(target: LoadedModel | None, executor: Executor | None,
                  simulator: UserSimulator | UserSpec) -> Executor:
    """`executor`, or the local one on `target`; refuses a simulator that would ship its model to other processes."""
    executor = executor_or_local(executor, target, "simulate")
    if isinstance(simulator, LocalUserSimulator) and not isinstance(executor, LocalExecutor):
        raise PersonaAxisError(f"a LocalUserSimulator holds its model and cannot travel to the {executor.name} "
                               "executor's workers: describe the user with a UserSpec")
    return executor


def load_simulations(directories: Sequence[str | Path]) -> list[Record]:
    """Conversation records of one or more simulation run directories, each with its "run"; per directory in plan
    order (catalogue domain, then id), whatever order an executor appended its batches in."""
    records: list[Record] = []
    domains = list(load_domains())
    for directory in directories:
        store = RunStore(Path(directory))
        if not store.has(f"{CONVERSATIONS}.jsonl"):
            raise PersonaAxisError(f"{directory} holds no {CONVERSATIONS}.jsonl: "
                                   f"run `persona-axis simulate --out {directory}` first")
        found = sorted(store.records(CONVERSATIONS), key=lambda r: (domains.index(r["domain"]) if r["domain"] in domains
                                                                    else len(domains), str(r["id"])))
        records.extend({**record, "run": str(directory)} for record in found)
    return records
