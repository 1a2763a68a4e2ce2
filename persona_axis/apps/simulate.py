"""Simulated multi-turn conversations with the target model, resumable turn by turn.

Each target reply's mean projection on the unit axis at one layer is captured while the reply is
generated (no second pass); with caps or steering, that layer is one no intervention touches (see
persona_axis.measurement), recorded with every conversation. The users are persona_axis.apps.user_simulators;
statistics are in persona_axis.apps.drift_stats, the predictor in persona_axis.apps.drift_predictor.

Persistence: the unit of saved work is one turn (a user message and the target's reply). With
`out`, every turn of a batch of conversations is appended to turns.jsonl as soon as the target's
replies of that turn are in, one record per conversation and turn; at a conversation's last turn
its whole record goes to conversations.jsonl instead, so a conversation is finished exactly when it
is there. A killed run loses at most the turn in progress. A re-run rebuilds each unfinished batch
from its stored turns and continues it at the first turn some conversation of the batch lacks,
regenerating that turn for the whole batch (so every reply meets the companions of an
uninterrupted run) and appending only what is missing. Every message draws from its own random
stream, named by the run's seed, the conversation id, the turn and the side (target or user),
never by a position in a batch or by a count of calls, so the resumed turns are those an
uninterrupted run writes, texts and projections alike.
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

from persona_axis.apps.user_simulators import DomainPersona, LocalUserSimulator, UserSimulator, UserSpec, load_domains
from persona_axis.axis import Axis
from persona_axis.build.executors import Executor, LocalExecutor, executor_or_local
from persona_axis.decode.generate import generate
from persona_axis.decode.interventions import InterventionMap
from persona_axis.decode.row_interventions import Guard
from persona_axis.errors import PersonaAxisError
from persona_axis.measurement import measured_layer
from persona_axis.model.loading import LoadedModel, Message
from persona_axis.store import RunStore

CONVERSATIONS = "conversations"  # finished conversations, one record each
TURNS = "turns"  # the finished turns of conversations not finished yet, one record per conversation and turn
# Version of the run directory's layout and random streams, part of a simulation's identity. 2: one record per
# turn, streams named by conversation and turn. Directories of version 1 (one record per batch, streams by
# position in the batch) are read by load_simulations and drift-report but never resumed.
SIMULATION_FORMAT = 2
Record = dict[str, Any]  # one simulated conversation, or one turn of it (see `simulate`)
META_KEYS = ("id", "domain", "persona_id", "capped", "layer")  # a conversation's fields every turn record repeats


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


def turn_seed(seed: int, conversation: str, turn: int, side: str) -> int:
    """The random-stream seed of one message: `side` ("target" or "user") writing turn `turn` (1-based) of
    `conversation`, in a simulation seeded with `seed` (a stable 63-bit hash)."""
    digest = hashlib.blake2b(f"persona-axis:simulate:{seed}:{conversation}:{turn}:{side}".encode(),
                             digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _turn_records(record: Record) -> list[Record]:
    """A whole conversation record split into its turn records (see `_converse`)."""
    meta = {k: record[k] for k in META_KEYS}
    messages = record["messages"]
    turns = [{**meta, "turn": k + 1, "user": messages[2 * k]["content"], "reply": messages[2 * k + 1]["content"],
              "projection": value} for k, value in enumerate(record["projections"])]
    if record.get("guard") is not None:
        for k, turn in enumerate(turns):
            turn.update(guard=record["guard"], guarded=record["guarded"][k], guard_fired_at=record["guard_fired_at"][k])
    return turns


def _conversation(turns: Sequence[Record]) -> Record:
    """The conversation record of turn records 1..k of one conversation, in order."""
    meta = {k: turns[0][k] for k in META_KEYS}
    messages: list[Message] = []
    for turn in turns:
        messages += [{"role": "user", "content": turn["user"]}, {"role": "assistant", "content": turn["reply"]}]
    record = {**meta, "messages": messages, "projections": [turn["projection"] for turn in turns]}
    if turns[0].get("guard") is not None:
        record.update(guard=turns[0]["guard"], guarded=[t["guarded"] for t in turns],
                      guard_fired_at=[t["guard_fired_at"] for t in turns])
    return record


def _guard_on(done: Sequence[Record]) -> bool:
    """Whether a conversation's guard has fired in one of these turn records (its later turns are capped)."""
    return any(turn.get("guarded") or turn.get("guard_fired_at") is not None for turn in done)


def _replies(target: LoadedModel, histories: list[list[Message]], seeds: list[int], layer: int, axis: Axis,
             interventions: InterventionMap, guard: Guard | None, fired: list[bool],
             generation: dict[str, Any]) -> tuple[list[str], list[list[int]], list[float], list[int | None]]:
    """One turn's target replies: (texts, token ids, mean projections at `layer`, the token each guard fired on).

    Without a guard, one generate call under `interventions`. With one, conversations whose guard fired in an
    earlier turn reply under `interventions` and the guard's, from their first token; the rest under
    `interventions` with the guard waiting (watching `layer`)."""
    groups: list[tuple[list[int], InterventionMap, Guard | None]] = [(list(range(len(histories))), interventions, None)]
    if guard is not None:
        groups = [([i for i, on in enumerate(fired) if on], guard.acting_with(interventions), None),
                  ([i for i, on in enumerate(fired) if not on], interventions, guard)]
    texts, ids, values = [""] * len(histories), [[] for _ in histories], [0.0] * len(histories)  # type: ignore[var-annotated]
    fired_at: list[int | None] = [None] * len(histories)
    for rows, acting, waiting in groups:
        if not rows:
            continue
        result = generate(target, [histories[i] for i in rows], capture=[layer], interventions=acting, guard=waiting,
                          watch=(layer, axis.unit(layer)) if waiting is not None else None,
                          **{**generation, "seed": [seeds[i] for i in rows]})
        projected = axis.project(result.captured_means()[:, 0], layer).tolist()
        for k, i in enumerate(rows):
            texts[i], ids[i], values[i] = result.texts[k], result.token_ids[k], projected[k]
            if result.guard_fired_at is not None:
                fired_at[i] = result.guard_fired_at[k]
    return texts, ids, values, fired_at


def _stored_turns(records: Sequence[Record], finished: set[str]) -> dict[str, list[Record]]:
    """{conversation id: its turn records 1..k} of the conversations not in `finished`: per conversation the
    first record of each turn number, cut at the first missing turn."""
    by_id: dict[str, dict[int, Record]] = {}
    for record in records:
        if record["id"] not in finished:
            by_id.setdefault(record["id"], {}).setdefault(record["turn"], record)
    stored: dict[str, list[Record]] = {}
    for cid, by_turn in by_id.items():
        stored[cid] = []
        while len(stored[cid]) + 1 in by_turn:
            stored[cid].append(by_turn[len(stored[cid]) + 1])
    return stored


def _converse(target: LoadedModel, axis: Axis, simulator: UserSimulator, plan: list[tuple[str, DomainPersona]],
              turns: int, layer: int, interventions: InterventionMap, generation: dict[str, Any],
              stored: Sequence[Sequence[Record]], guard: Guard | None = None) -> Iterator[list[Record]]:
    """Run a batch of conversations to `turns` exchanges; one target generate and one simulator call per turn.

    stored[i]: the turn records conversation i already has (1..k_i, possibly all `turns`). The batch
    continues at turn min(k_i) + 1, every conversation from its stored history, so each turn is
    generated for the whole batch. Yields, after each turn t, the turn records of t for the
    conversations that lacked it: {"id", "domain", "persona_id", "capped", "layer", "turn" (1-based),
    "user", "reply", "projection" (None for an empty reply)}. The target's reply to turn t of
    conversation c samples from the stream turn_seed(seed, c, t, "target"), the user's message from
    turn_seed(seed, c, t, "user"), whatever the batch, the executor or the turn the batch resumed at.
    With a `guard` (the serving drift guard), the records also hold "guard" (its threshold), "guarded" (the
    guard fired in an earlier turn, so this reply was capped from its first token) and "guard_fired_at" (the
    reply token on which it fired in this turn, or None).
    """
    personas = [persona for _, persona in plan]
    meta = [{"id": cid, "domain": p.domain, "persona_id": p.id, "capped": bool(interventions), "layer": layer}
            for cid, p in plan]
    have = [len(done) for done in stored]
    fired = [_guard_on(done[:min(have)]) for done in stored] if have else []
    start = min(have) if have else turns
    histories: list[list[Message]] = [_conversation(done[:start])["messages"] if start else [] for done in stored]
    for turn in range(start + 1, turns + 1):
        if turn == 1:
            for history, persona in zip(histories, personas):
                history.append({"role": "user", "content": persona.opening})
        else:
            seeds = [turn_seed(generation["seed"], cid, turn, "user") for cid, _ in plan]
            for history, text in zip(histories, simulator.next_messages(personas, histories, seeds=seeds)):
                history.append({"role": "user", "content": text})
        seeds = [turn_seed(generation["seed"], cid, turn, "target") for cid, _ in plan]
        texts, token_ids, values, fired_at = _replies(target, histories, seeds, layer, axis, interventions, guard,
                                                      fired, generation)
        made = []
        for i, (history, text, ids, value) in enumerate(zip(histories, texts, token_ids, values)):
            history.append({"role": "assistant", "content": text})
            if have[i] < turn:  # an empty reply has no tokens to average
                made.append({**meta[i], "turn": turn, "user": history[-2]["content"], "reply": text,
                             "projection": value if ids else None,
                             **({"guard": guard.threshold, "guarded": fired[i], "guard_fired_at": fired_at[i]}
                                if guard is not None else {})})
        if guard is not None:
            fired = [on or at is not None for on, at in zip(fired, fired_at)]
        yield made


@dataclass(frozen=True)
class ConversationBatch:
    """A job (executors.Job): a batch of conversations, each continued from its `stored` turns to the last turn,
    on the executor's model; yields each turn's new turn records (see `_converse`)."""

    axis: Axis
    simulator: UserSimulator | UserSpec
    plan: list[tuple[str, DomainPersona]]
    turns: int
    layer: int
    interventions: InterventionMap
    generation: dict[str, Any]
    stored: tuple[tuple[Record, ...], ...] = ()  # per conversation of `plan`; () : nothing stored
    guard: Guard | None = None

    def __call__(self, lm: LoadedModel) -> Iterator[list[Record]]:
        simulator = self.simulator.build(lm) if isinstance(self.simulator, UserSpec) else self.simulator
        stored = self.stored or tuple(() for _ in self.plan)
        return _converse(lm, self.axis, simulator, self.plan, self.turns, self.layer, self.interventions,
                         self.generation, stored, self.guard)


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


def _refuse_old_format(store: RunStore) -> None:
    """A PersonaAxisError for a directory an earlier persona-axis simulated into (it cannot be continued)."""
    identity = store.read_manifest().get("identity", {})
    if identity.get("kind") == "drift-simulation" and identity.get("format") != SIMULATION_FORMAT:
        raise PersonaAxisError(f"{store.root} holds a simulation of an earlier persona-axis (format "
                               f"{identity.get('format', 1)}, this one writes {SIMULATION_FORMAT}): drift-report "
                               "still reads it, but simulate into a new --out to add conversations")


def simulate(target: LoadedModel | None, axis: Axis, simulator: UserSimulator | UserSpec, domain: str, turns: int,
             n: int, layer: int | None = None, interventions: InterventionMap | None = None,
             max_new_tokens: int = 96, seed: int = 0, out: str | Path | None = None, progress: bool = False, *,
             temperature: float = 0.0, batch_size: int = 32, executor: Executor | None = None,
             guard: Guard | None = None) -> list[Record]:
    """Simulate n conversations of `turns` exchanges per domain ("all": every domain) with the target.

    Turn 1 is each persona's opening; later user turns come from `simulator` (an object, or a
    UserSpec built beside the target). The target replies greedily unless temperature > 0; every
    message samples from its own stream (see `turn_seed`). `interventions` (e.g. caps from
    chat.build_interventions) apply to every target reply and mark the records capped.
    Conversations run in batches of `batch_size` (in plan order), each batch a job on `executor`
    (default: this process, on `target`; a RayExecutor runs batches on its actors, so `target` may
    then be None and the simulator must be a UserSpec or hold no model); the records do not depend
    on the executor.
    Returns one record per conversation {"id", "domain", "persona_id", "capped", "layer", "messages",
    "projections" [turns] (None for an empty reply)}: each reply's mean projection on the unit axis at
    "layer", captured during generation: `layer` if given (an intervened layer is refused), else the
    middle layer, or the layer `measurement.measured_layer` picks outside the interventions.
    With `out`, every finished turn is saved and a re-run continues where the last one stopped (see
    the module docstring); a directory holding a run with other settings is refused.
    guard: the serving drift guard (decode/row_interventions.Guard) read at `layer`: its interventions start
    once a reply's running mean projection falls below its threshold, and act on the conversation's later
    replies from their first token; records then carry the fields named in `_converse`.
    """
    executor = _executor_for(target, executor, simulator)
    model = executor.model_identity()
    axis.check_model(model.n_layers, model.hidden_size, model.name)
    if turns < 1 or n < 1 or batch_size < 1:
        raise PersonaAxisError(f"turns, n and batch_size must be at least 1, got {turns}, {n} and {batch_size}")
    interventions = interventions or {}
    layer = measured_layer(axis, [*interventions, *(guard.interventions if guard is not None else {})], layer)
    plan = conversation_plan(domain, n)
    generation = {"max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed}
    with RunStore.open(out) if out is not None else nullcontext() as store:
        done: dict[str, Record] = {}
        partial: dict[str, list[Record]] = {}
        if store is not None:
            _refuse_old_format(store)
            identity = {"kind": "drift-simulation", "format": SIMULATION_FORMAT, "model": model.name,
                        "model_hash": model.source_hash, "axis_sha256": _digest(axis.vectors), "domain": domain,
                        "turns": turns, "n": n, "personas_sha256": _digest([asdict(p) for _, p in plan]),
                        "layer": layer, "capping": _interventions_digest(interventions),
                        "simulator": _simulator_id(executor, simulator), "batch_size": batch_size, **generation,
                        **({"guard": [guard.threshold, guard.min_tokens, _interventions_digest(guard.interventions)]}
                           if guard is not None else {})}
            store.claim(identity, {"axis_metadata": axis.metadata})
            done = {r["id"]: r for r in store.records(CONVERSATIONS)}
            partial = _stored_turns(store.records(TURNS), set(done))
        batches = [plan[start:start + batch_size] for start in range(0, len(plan), batch_size)]
        jobs = [ConversationBatch(axis, simulator, batch, turns, layer, interventions, generation,
                                  tuple(tuple(_turn_records(done[cid]) if cid in done else partial.get(cid, []))
                                        for cid, _ in batch), guard)
                for batch in batches if any(cid not in done for cid, _ in batch)]
        left = sum(turns - len(stored) for job in jobs for stored in job.stored)
        with tqdm(total=left, desc=f"simulating ({executor.name})", unit="reply", disable=not progress) as bar:
            for _, made in executor.run_jobs(jobs):
                bar.update(len(made))
                for record in made:
                    partial.setdefault(record["id"], []).append(record)
                finished = [_conversation(partial[r["id"]]) for r in made if r["turn"] == turns]
                if store is not None:
                    store.append(CONVERSATIONS, finished)
                    store.append(TURNS, [r for r in made if r["turn"] < turns])
                done.update((r["id"], r) for r in finished)
    return [done[cid] for cid, _ in plan]


def _executor_for(target: LoadedModel | None, executor: Executor | None,
                  simulator: UserSimulator | UserSpec) -> Executor:
    """`executor`, or the local one on `target`; refuses a simulator that would ship its model to other processes."""
    executor = executor_or_local(executor, target, "simulate")
    if isinstance(simulator, LocalUserSimulator) and not isinstance(executor, LocalExecutor):
        raise PersonaAxisError(f"a LocalUserSimulator holds its model and cannot travel to the {executor.name} "
                               "executor's workers: describe the user with a UserSpec")
    return executor


def load_simulations(directories: Sequence[str | Path], unfinished: bool = False) -> list[Record]:
    """Conversation records of one or more simulation run directories, each with its "run" and "finished";
    per directory in plan order (catalogue domain, then id), whatever order an executor appended them in.

    Only finished conversations, unless `unfinished`: a conversation a stopped `simulate` left half-way
    then comes too, as a record of the same keys whose "messages" and "projections" hold only its
    finished turns (fewer than the run's turns), with "finished" False.
    """
    records: list[Record] = []
    domains = list(load_domains())
    for directory in directories:
        store = RunStore(Path(directory))
        if not store.has(f"{CONVERSATIONS}.jsonl") and not store.has(f"{TURNS}.jsonl"):
            raise PersonaAxisError(f"{directory} holds no {CONVERSATIONS}.jsonl: "
                                   f"run `persona-axis simulate --out {directory}` first")
        found = [{**r, "finished": True} for r in store.records(CONVERSATIONS)]
        half = [_conversation(turns) for turns in _stored_turns(store.records(TURNS), {r["id"] for r in found}).values()
                if turns]
        if not found and not unfinished:
            raise PersonaAxisError(f"{directory} holds no finished conversation yet ({len(half)} half-way): run the "
                                   f"same `persona-axis simulate --out {directory}` again to finish them")
        if unfinished:
            found += [{**r, "finished": False} for r in half]
        found.sort(key=lambda r: (domains.index(r["domain"]) if r["domain"] in domains else len(domains), str(r["id"])))
        records.extend({**record, "run": str(directory)} for record in found)
    return records


def unfinished_conversations(directory: str | Path) -> int:
    """How many conversations of a simulation directory have some turns saved but are not finished."""
    store = RunStore(Path(directory))
    finished = {r["id"] for r in store.records(CONVERSATIONS)}
    return sum(1 for turns in _stored_turns(store.records(TURNS), finished).values() if turns)
