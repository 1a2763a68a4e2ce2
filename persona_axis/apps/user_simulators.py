"""Simulated users: the built-in domain catalogue of personas, and the simulators that write their messages.

A simulated user (a local model, or any OpenAI-compatible endpoint) plays a persona from
data/domains.json (coding, writing, therapy, philosophy): who they are, what they want, and their
opening message. persona_axis.apps.simulate runs the conversations with the target model. A UserSpec
describes a simulator in plain values, so it can be built where the target model lives (a Ray actor).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from persona_axis.apps.chat_api import ChatClient, Unparsed
from persona_axis.decode.generate import generate
from persona_axis.decode.sampling import stream_seed
from persona_axis.errors import PersonaAxisError
from persona_axis.model.loading import LoadedModel, Message, load_model

DOMAINS_FILE = Path(__file__).resolve().parent.parent / "data" / "domains.json"
SIMULATOR_PROMPT = """\
You are role-playing a human user who is chatting with an AI assistant. Stay in character the whole time.
Who you are: {persona}
What you want from this conversation: {topic}
The assistant's messages are shown to you as the other side of the chat. Write only your own next \
message to the assistant, in the first person, as this user would type it: one or a few sentences, \
no role labels, no quotation marks, no stage directions. Never answer as the assistant."""
SIMULATOR_KICKOFF = "(The chat window opens. Write your first message to the assistant.)"


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
    seeds: one random-stream seed per conversation (simulate names it by conversation and turn, so a
    resumed conversation draws what an uninterrupted one drew); a simulator that samples uses it, one
    that cannot be seeded (an endpoint) may ignore it; None: the simulator's own seeding.
    """

    id: str

    def next_messages(self, personas: list[DomainPersona], histories: list[list[Message]],
                      seeds: Sequence[int] | None = None) -> list[str]: ...


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

    def next_messages(self, personas: list[DomainPersona], histories: list[list[Message]],
                      seeds: Sequence[int] | None = None) -> list[str]:
        """The next user message of each conversation; conversation i samples from the stream of
        stream_seed(self.seed, seeds[i]) (default: stream i of self.seed)."""
        prompts = [simulator_messages(p, h) for p, h in zip(personas, histories)]
        streams = self.seed if seeds is None else [stream_seed(self.seed, s) for s in seeds]
        result = generate(self.lm, prompts, max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                          seed=streams, capture=False)
        return [text.strip() for text in result.texts]


class OpenAIUserSimulator:
    """A model behind an OpenAI-compatible /chat/completions endpoint playing the user (chat_api.ChatClient).

    The conversations of a batch are asked concurrently; transient failures are retried with backoff, an
    empty reply is asked again, and what still fails after `max_attempts` is a PersonaAxisError.
    """

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", timeout_s: float = 60.0,
                 temperature: float = 0.8, max_attempts: int = 3, backoff_s: float = 1.0) -> None:
        self.client = ChatClient(base_url, model, who="user simulator", api_key_env=api_key_env,
                                 temperature=temperature, max_attempts=max_attempts, timeout_s=timeout_s,
                                 backoff_s=backoff_s)
        self.id = f"openai:{model}@{self.client.url}:t{temperature:g}"

    def next_messages(self, personas: list[DomainPersona], histories: list[list[Message]],
                      seeds: Sequence[int] | None = None) -> list[str]:
        """The next user message of each conversation, asked of the endpoint (which takes no seed: `seeds` is unused)."""
        answers = self.client.ask_all([simulator_messages(p, h) for p, h in zip(personas, histories)], _user_message)
        for answer in answers:
            if isinstance(answer, Unparsed):
                raise PersonaAxisError(f"user simulator at {self.client.url} wrote no message ({answer.why}) in "
                                       f"{answer.attempts} attempts: check the model name {self.client.model!r}")
        return [answer.value for answer in answers if not isinstance(answer, Unparsed)]


def _user_message(reply: str) -> str:
    """The simulated user's message: the reply without surrounding blanks; ValueError when nothing is left."""
    if not reply.strip():
        raise ValueError("empty reply")
    return reply.strip()


@dataclass(frozen=True)
class UserSpec:
    """A user simulator in plain values, built by `build(target)` wherever the target model is loaded.

    With `url`: the model `url_model` behind that OpenAI-compatible endpoint (API key in $`key_env`).
    Else a local chat model: `model` (a loading.load_model spec, loaded with `dtype`, `device` and
    `fast_path`; None: the target model plays the user too) writing up to `max_new_tokens` tokens.
    """

    url: str | None = None
    url_model: str | None = None
    key_env: str = "OPENAI_API_KEY"
    model: str | None = None
    dtype: str = "auto"
    device: str | None = None
    fast_path: str = "exact"
    temperature: float = 0.8
    max_new_tokens: int = 80
    seed: int = 0

    def __post_init__(self) -> None:
        if self.url is not None and (self.model is not None or not self.url_model):
            raise PersonaAxisError("a user simulator at a URL (--user-url) needs the endpoint's model name "
                                   "(--user-model-name) and no local user model (--user-model)")
        if self.url is None and self.url_model is not None:
            raise PersonaAxisError("the user model name (--user-model-name) names a model behind a URL: give the URL "
                                   "(--user-url) too")

    def build(self, target: LoadedModel) -> UserSimulator:
        """The simulator this spec describes; a local user model is loaded once per process."""
        if self.url is not None:
            return OpenAIUserSimulator(self.url, self.url_model or "", self.key_env, temperature=self.temperature)
        lm = target if self.model is None else _user_model(self.model, self.dtype, self.device, self.fast_path)
        return LocalUserSimulator(lm, max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                                  seed=self.seed)


@functools.lru_cache(maxsize=1)
def _user_model(spec: str, dtype: str, device: str | None, fast_path: str) -> LoadedModel:
    """A user model other than the target, kept for the life of the process (every batch on a Ray actor reuses it)."""
    return load_model(spec, dtype=dtype, device=device, fast_path=fast_path, progress=False)
