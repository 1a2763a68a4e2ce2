"""Simulated multi-turn conversations by domain, their drift along the axis, and a drift predictor.

A simulated user (a local model, or any OpenAI-compatible endpoint) plays a persona from
data/domains.json (coding, writing, therapy, philosophy) and talks with the target model for a
number of turns. Each target reply's mean projection on the unit axis at one layer is captured
while the reply is generated (no second pass). From those conversations: per-turn means with 95 %
t-intervals per domain, and a ridge regression from the embedding of each user message to the
projection of the reply that follows it, cross-validated with whole conversations held out.
"""

from __future__ import annotations

import hashlib
import json
import urllib.error
import urllib.request
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from torch import Tensor
from tqdm.auto import tqdm

from persona_axis.axis import Axis
from persona_axis.chat_api import TRANSPORT_ERRORS, NotAChatCompletion, completions_url, error_detail, post_chat
from persona_axis.errors import PersonaAxisError
from persona_axis.generation import generate
from persona_axis.judges.offline import load_embedder
from persona_axis.models import LoadedModel, Message
from persona_axis.steering import InterventionMap
from persona_axis.store import RunStore, read_jsonl

DOMAINS_FILE = Path(__file__).parent / "data" / "domains.json"
CONVERSATIONS = "conversations"
SIMULATOR_PROMPT = """\
You are role-playing a human user who is chatting with an AI assistant. Stay in character the whole time.
Who you are: {persona}
What you want from this conversation: {topic}
The assistant's messages are shown to you as the other side of the chat. Write only your own next \
message to the assistant, in the first person, as this user would type it: one or a few sentences, \
no role labels, no quotation marks, no stage directions. Never answer as the assistant."""
SIMULATOR_KICKOFF = "(The chat window opens. Write your first message to the assistant.)"
Record = dict[str, Any]  # one simulated conversation (see `simulate`)
Stats = dict[str, dict[bool, list[dict[str, Any]]]]  # domain -> capped -> per-turn rows (see `turn_statistics`)


@dataclass(frozen=True)
class DomainPersona:
    """One simulated user: who they are (second person), what they want, and their first message."""

    id: str
    domain: str
    persona: str
    topic: str
    opening: str


def load_domains(domain: str = "all") -> dict[str, list[DomainPersona]]:
    """The built-in domain catalogue {domain: personas}; `domain` picks one domain or "all"."""
    try:
        raw = json.loads(DOMAINS_FILE.read_text(encoding="utf-8"))
        catalogue = {name: [DomainPersona(domain=name, **entry) for entry in entries] for name, entries in raw.items()}
    except (OSError, ValueError, TypeError) as exc:
        raise PersonaAxisError(f"{DOMAINS_FILE} is malformed ({exc}): reinstall persona-axis") from None
    if domain == "all":
        return catalogue
    if domain not in catalogue:
        raise PersonaAxisError(f"unknown domain {domain!r}: choose one of {', '.join(catalogue)}, or all")
    return {domain: catalogue[domain]}


class UserSimulator(Protocol):
    """Writes the simulated user's next message for a batch of conversations.

    histories are from the target's point of view: "user" = the simulated user, "assistant" = the target.
    """

    id: str

    def next_messages(self, personas: list[DomainPersona], histories: list[list[Message]]) -> list[str]: ...


def simulator_messages(persona: DomainPersona, history: Sequence[Message]) -> list[Message]:
    """The simulator's own view: its instructions, then the history with roles swapped (target → "user")."""
    swap = {"user": "assistant", "assistant": "user"}
    return [
        {"role": "system", "content": SIMULATOR_PROMPT.format(persona=persona.persona, topic=persona.topic)},
        {"role": "user", "content": SIMULATOR_KICKOFF},
        *({"role": swap[m["role"]], "content": m["content"]} for m in history),
    ]


class LocalUserSimulator:
    """A local chat model playing the user; one batched generate call per turn (no capture)."""

    def __init__(self, lm: LoadedModel, max_new_tokens: int = 80, temperature: float = 0.8, seed: int = 0) -> None:
        self.lm, self.max_new_tokens, self.temperature, self.seed = lm, max_new_tokens, temperature, seed
        self.id = f"local:{lm.name}:{lm.source_hash[:16]}:t{temperature:g}:m{max_new_tokens}:s{seed}"

    def next_messages(self, personas: list[DomainPersona], histories: list[list[Message]]) -> list[str]:
        prompts = [simulator_messages(p, h) for p, h in zip(personas, histories)]
        result = generate(self.lm, prompts, max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                          seed=self.seed, capture=False)
        return [text.strip() for text in result.texts]


class OpenAIUserSimulator:
    """A model behind an OpenAI-compatible /chat/completions endpoint playing the user (stdlib HTTP)."""

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", timeout_s: float = 60.0,
                 temperature: float = 0.8) -> None:
        self.url = completions_url(base_url)
        self.model, self.api_key_env, self.timeout_s, self.temperature = model, api_key_env, timeout_s, temperature
        self.id = f"openai:{model}@{self.url}:t{temperature:g}"

    def next_messages(self, personas: list[DomainPersona], histories: list[list[Message]]) -> list[str]:
        return [self._post(simulator_messages(p, h)).strip() for p, h in zip(personas, histories)]

    def _post(self, messages: list[Message]) -> str:
        """One chat-completions request -> the reply text; any failure is a PersonaAxisError."""
        try:
            content = post_chat(self.url, self.model, messages, self.api_key_env, self.timeout_s, self.temperature)
        except urllib.error.HTTPError as exc:
            raise PersonaAxisError(f"user simulator request failed with HTTP {exc.code} at {self.url} "
                                   f"({error_detail(exc) or 'no detail'}): check the URL, the model name "
                                   f"{self.model!r} and the API key in ${self.api_key_env}") from None
        except NotAChatCompletion:
            content = None
        except TRANSPORT_ERRORS as exc:
            raise PersonaAxisError(f"user simulator unreachable at {self.url} ({getattr(exc, 'reason', exc)}): "
                                   "check the server is running and the URL is right") from None
        if content is None:
            raise PersonaAxisError(f"user simulator at {self.url} did not answer with a chat completion: "
                                   "check the URL points at the API root (often ending in /v1)")
        return content


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
              turns: int, layer: int, interventions: InterventionMap, generation: dict[str, Any],
              bar: tqdm) -> list[Record]:
    """Run `turns` exchanges for a batch of conversations; one target generate and one simulator call per turn."""
    personas = [persona for _, persona in plan]
    histories: list[list[Message]] = [[{"role": "user", "content": p.opening}] for p in personas]
    projections: list[list[float | None]] = [[] for _ in plan]
    for turn in range(turns):
        if turn:
            for history, text in zip(histories, simulator.next_messages(personas, histories)):
                history.append({"role": "user", "content": text})
        result = generate(target, histories, capture=[layer], interventions=interventions,
                          **{**generation, "seed": generation["seed"] + turn})
        assert result.means is not None
        values = axis.project(result.means[:, 0], layer).tolist()
        for history, row, text, ids, value in zip(histories, projections, result.texts, result.token_ids, values):
            history.append({"role": "assistant", "content": text})
            row.append(value if ids else None)  # an empty reply has no tokens to average
        bar.update(len(plan))
    return [{"id": cid, "domain": p.domain, "persona_id": p.id, "capped": bool(interventions), "layer": layer,
             "messages": h, "projections": row} for (cid, p), h, row in zip(plan, histories, projections)]


def simulate(target: LoadedModel, axis: Axis, simulator: UserSimulator, domain: str, turns: int, n: int,
             layer: int | None = None, interventions: InterventionMap | None = None, max_new_tokens: int = 96,
             seed: int = 0, out: str | Path | None = None, progress: bool = False, *, temperature: float = 0.0,
             batch_size: int = 32) -> list[Record]:
    """Simulate n conversations of `turns` exchanges per domain ("all": every domain) with the target.

    Turn 1 is each persona's opening; later user turns come from `simulator`. The target replies greedily
    unless temperature > 0 (seeded by seed + turn); `interventions` (e.g. caps from chat.build_interventions)
    apply to every target reply and mark the records capped. Conversations run in batches of `batch_size`.
    Returns one record per conversation {"id", "domain", "persona_id", "capped", "layer", "messages",
    "projections" [turns] (None for an empty reply)}: each reply's mean projection on the unit axis at
    `layer` (default: the middle layer), captured during generation.
    With `out`, finished batches are appended to <out>/conversations.jsonl and a re-run skips them.
    """
    axis.check_model(target.n_layers, target.hidden_size, target.name)
    if turns < 1 or n < 1 or batch_size < 1:
        raise PersonaAxisError(f"turns, n and batch_size must be at least 1, got {turns}, {n} and {batch_size}")
    layer = target.check_layer(axis.layer_or_middle(layer))
    plan = conversation_plan(domain, n)
    interventions = interventions or {}
    generation = {"max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed}
    with RunStore.open(out) if out is not None else nullcontext() as store:
        done: dict[str, Record] = {}
        if store is not None:
            identity = {"kind": "drift-simulation", "model": target.name, "model_hash": target.source_hash,
                        "axis_sha256": _digest(axis.vectors), "domain": domain, "turns": turns, "n": n,
                        "personas_sha256": _digest([asdict(p) for _, p in plan]), "layer": layer,
                        "capping": _interventions_digest(interventions), "simulator": simulator.id, **generation}
            store.claim(identity, {"axis_metadata": axis.metadata})
            done = {r["id"]: r for r in store.records(CONVERSATIONS)}
        todo = [item for item in plan if item[0] not in done]
        with tqdm(total=len(todo) * turns, desc="simulating", unit="reply", disable=not progress) as bar:
            for start in range(0, len(todo), batch_size):
                records = _converse(target, axis, simulator, todo[start:start + batch_size], turns, layer,
                                    interventions, generation, bar)
                if store is not None:
                    store.append(CONVERSATIONS, records)
                done.update((r["id"], r) for r in records)
    return [done[cid] for cid, _ in plan]


def load_simulations(directories: Sequence[str | Path]) -> list[Record]:
    """Conversation records of one or more simulation run directories, in file order, each with its "run"."""
    records = []
    for directory in directories:
        path = Path(directory) / f"{CONVERSATIONS}.jsonl"
        if not path.exists():
            raise PersonaAxisError(f"{directory} holds no {path.name}: "
                                   f"run `persona-axis simulate --out {directory}` first")
        records.extend({**record, "run": str(directory)} for record in read_jsonl(path))
    return records


def _mean_interval(values: list[float], confidence: float) -> dict[str, Any]:
    """Mean of values, its t-based confidence interval (None for a single value), and n."""
    from scipy.stats import t

    mean, n = float(np.mean(values)), len(values)
    if n < 2:
        return {"mean": mean, "ci_low": None, "ci_high": None, "n": n}
    half = float(t.ppf((1 + confidence) / 2, n - 1) * np.std(values, ddof=1) / np.sqrt(n))
    return {"mean": mean, "ci_low": mean - half, "ci_high": mean + half, "n": n}


def turn_statistics(records: Sequence[Record], confidence: float = 0.95) -> Stats:
    """Per domain, per capped flag, per turn: {"turn" (1-based), "mean", "ci_low", "ci_high", "n"}.

    The interval is the t-based confidence interval of the mean projection (None when n = 1);
    empty replies (projection None) are left out.
    """
    values: dict[tuple[str, bool, int], list[float]] = {}
    for record in records:
        for turn, value in enumerate(record["projections"], 1):
            if value is not None:
                values.setdefault((record["domain"], record["capped"], turn), []).append(value)
    stats: Stats = {}
    for (domain, capped, turn), found in sorted(values.items(), key=lambda item: item[0][2]):  # by turn, stable
        stats.setdefault(domain, {}).setdefault(capped, []).append({"turn": turn, **_mean_interval(found, confidence)})
    return stats


def plot_domains(stats: Stats, path: str | Path) -> Path:
    """PNG of the mean projection per turn, one colour per domain (dashed: capped), with CI bands."""
    from matplotlib.figure import Figure  # Agg canvas, no pyplot state
    from matplotlib.ticker import MaxNLocator

    if not stats:
        raise PersonaAxisError("no conversations to plot")
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    for n, (domain, by_cap) in enumerate(sorted(stats.items())):
        for capped, rows in sorted(by_cap.items()):
            turns = [r["turn"] for r in rows]
            ax.plot(turns, [r["mean"] for r in rows], marker="o", color=f"C{n % 10}", linestyle="--" if capped else "-",
                    label=domain + (" (capped)" if capped else ""))
            banded = [r for r in rows if r["ci_low"] is not None]
            ax.fill_between([r["turn"] for r in banded], [r["ci_low"] for r in banded], [r["ci_high"] for r in banded],
                            color=f"C{n % 10}", alpha=0.15, linewidth=0)
    ax.set(xlabel="turn", ylabel="mean projection (95 % CI)", title="Position on the Assistant Axis per turn")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    return Path(path)


def _conversation_key(record: Record) -> str:
    """The conversation's id, prefixed by its run directory when it has one (ids repeat across runs)."""
    return f"{record['run']}/{record['id']}" if "run" in record else record["id"]


def _assistant_turns(record: Record) -> list[tuple[str, str, float | None]]:
    """(user message before it, reply, projection) for each assistant turn, in order."""
    turns, user = [], ""
    for message in record["messages"]:
        if message["role"] == "user":
            user = message["content"]
        elif message["role"] == "assistant":
            turns.append((user, message["content"], record["projections"][len(turns)]))
    return turns


def drift_dataset(records: Sequence[Record],
                  embedder: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One row per assistant turn with a projection: X [m, dim] embeddings of the user message before
    it (dim 384 for the default all-MiniLM-L6-v2; `embedder` is any object with `encode(texts)`),
    y_abs [m] the reply's projection, y_delta [m] its change from the previous reply (NaN when there
    is none), groups [m] conversation keys ("run/id" for records read from run directories, else "id").
    """
    texts, y_abs, y_delta, groups = [], [], [], []
    for record in records:
        previous = None
        for user, _, value in _assistant_turns(record):
            if value is not None:
                texts.append(user)
                y_abs.append(value)
                y_delta.append(np.nan if previous is None else value - previous)
                groups.append(_conversation_key(record))
            previous = value
    if not texts:
        raise PersonaAxisError("no assistant turns with a projection: simulate some conversations first")
    embedder = embedder if embedder is not None else load_embedder()
    X = np.asarray(embedder.encode(texts, show_progress_bar=False), dtype=np.float64)
    return X, np.asarray(y_abs), np.asarray(y_delta), np.asarray(groups, dtype=object)


def group_folds(groups: np.ndarray, folds: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train indices, test indices) per fold with GroupKFold: a group is never on both sides.

    With fewer groups than folds, one fold per group; fewer than 2 groups is an error.
    """
    from sklearn.model_selection import GroupKFold

    n_groups = len(set(groups.tolist()))
    if folds < 2 or n_groups < 2:
        raise PersonaAxisError(f"cross-validation needs at least 2 folds and 2 conversations, got {folds} folds "
                               f"and {n_groups} conversation(s): simulate more conversations")
    return list(GroupKFold(n_splits=min(folds, n_groups)).split(np.zeros(len(groups)), groups=groups))


def _cross_validated_r2(X: np.ndarray, y: np.ndarray, groups: np.ndarray, folds: int, alpha: float) -> float:
    """R² of ridge predictions pooled over the out-of-fold predictions of every fold."""
    from sklearn.linear_model import Ridge
    from sklearn.metrics import r2_score

    predicted = np.empty_like(y)
    for train, test in group_folds(groups, folds):
        predicted[test] = Ridge(alpha=alpha).fit(X[train], y[train]).predict(X[test])
    return float(r2_score(y, predicted))


def fit_drift_predictor(records: Sequence[Record], folds: int = 5, alpha: float = 1.0,
                        embedder: Any = None) -> dict[str, Any]:
    """Cross-validated R² of ridge regressions from user-message embeddings to the next reply's
    projection ("r2_absolute") and to its change from the previous reply ("r2_delta"; turns with a
    previous reply only; None when fewer than 2 conversations have one)."""
    X, y_abs, y_delta, groups = drift_dataset(records, embedder)
    r2_absolute = _cross_validated_r2(X, y_abs, groups, folds, alpha)  # raises with fewer than 2 conversations
    n_conversations, previous = len(set(groups.tolist())), ~np.isnan(y_delta)
    r2_delta = (_cross_validated_r2(X[previous], y_delta[previous], groups[previous], folds, alpha)
                if len(set(groups[previous].tolist())) >= 2 else None)
    return {"method": f"ridge regression (alpha={alpha:g}) on {X.shape[1]}-d user-message embeddings; GroupKFold "
                      f"by conversation; R² pooled over out-of-fold predictions",
            "n_turns": len(y_abs), "n_conversations": n_conversations, "folds": min(folds, n_conversations),
            "r2_absolute": r2_absolute, "r2_delta": r2_delta}


def lowest_turns(records: Sequence[Record], k: int = 5) -> list[dict[str, Any]]:
    """The k assistant turns with the lowest projections (least Assistant-like), lowest first."""
    turns = [{"domain": r["domain"], "conversation": _conversation_key(r), "capped": r["capped"], "turn": index,
              "projection": value, "user": user, "reply": reply}
             for r in records for index, (user, reply, value) in enumerate(_assistant_turns(r), 1) if value is not None]
    return sorted(turns, key=lambda turn: turn["projection"])[:k]
