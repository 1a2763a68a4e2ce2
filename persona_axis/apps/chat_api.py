"""The one OpenAI-compatible chat-completions client (httpx), shared by the HTTP judges and the user simulator.

`ChatClient.ask_all` sends one request per conversation, with at most `concurrency` in flight, and
returns what the caller's `parse` makes of each reply. Transient failures (HTTP 429/5xx, timeouts,
connection errors) are retried after the server's Retry-After or an exponential backoff with jitter; a
reply that `parse` rejects (ValueError) is retried at once, except that at temperature 0 a rejected reply that
comes back word for word ends the attempts (the server answers that request deterministically: asking again
would only repeat it). When every attempt fails, the last outcome
decides: a transport failure raises PersonaAxisError, a rejected reply becomes `Unparsed`. Any other
HTTP error, or a 200 whose body is not a chat completion, raises at once and stops the rest of the batch.
Replies that parsed are cached on disk (optional), keyed by model and messages.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import httpx

from persona_axis.errors import PersonaAxisError
from persona_axis.store import atomic_write_bytes

T = TypeVar("T")
ChatMessages = list[dict[str, str]]
MAX_DELAY_S = 30.0  # longest wait between attempts, whatever Retry-After or the backoff say


@dataclass(frozen=True)
class Unparsed:
    """Every attempt got a reply that `parse` rejected: the last rejection and the number of attempts."""

    why: str
    attempts: int


@dataclass(frozen=True)
class Answer(Generic[T]):
    """What `parse` made of a reply, and the reply's raw text."""

    value: T
    reply: str


class _Transient(Exception):
    """A failure worth retrying, with the server's Retry-After (seconds) if it sent one."""

    def __init__(self, why: str, retry_after: float | None = None) -> None:
        super().__init__(why)
        self.retry_after = retry_after


class _Stopped(Exception):
    """Another request of the batch failed for good, so this one gave up."""


def endpoint_base_url(url: str | None, model: str | None, who: str) -> str:
    """The API root to call: `url`, else $OPENAI_BASE_URL; an error naming the flags when it or `model` is missing."""
    base_url = url or os.environ.get("OPENAI_BASE_URL")
    if not base_url or not model:
        raise PersonaAxisError(f"the openai {who} needs --judge-url (or OPENAI_BASE_URL) and --judge-model")
    return base_url


def completions_url(base_url: str) -> str:
    """The chat-completions endpoint under an API root such as http://host/v1."""
    return base_url.rstrip("/") + "/chat/completions"


def cache_key(model: str, messages: ChatMessages) -> str:
    """sha256 of the model and messages: identical requests share one cache entry."""
    return hashlib.sha256(json.dumps({"model": model, "messages": messages}, sort_keys=True).encode()).hexdigest()


def retry_after_s(value: str | None) -> float | None:
    """Seconds from an integer Retry-After header, capped at MAX_DELAY_S; None when absent or not an integer."""
    if value is None or not value.strip().isdigit():
        return None
    return min(float(value.strip()), MAX_DELAY_S)


def parse_int_field(label: str, value: str, low: int, high: int) -> int:
    """`value` as an integer in [low, high]; raises ValueError naming `label` when it is not one (strict reply parsing)."""
    if not re.fullmatch(r"-?[0-9]+", value):
        raise ValueError(f"non-integer {label} {value[:20]!r}")
    if not low <= int(value) <= high:
        raise ValueError(f"{label} {int(value)} out of range {low}-{high}")
    return int(value)


def completion_text(body: bytes) -> str:
    """The assistant message's text in a chat-completion body ("" when its content is null).

    Raises ValueError when the body is not a chat completion (not JSON, no choices[0].message, or a
    content that is neither a string nor null).
    """
    try:
        message = json.loads(body)["choices"][0]["message"]
        content = message.get("content")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        raise ValueError("not a chat completion") from None
    if content is not None and not isinstance(content, str):
        raise ValueError("message content is not text")
    return content or ""


class ReplyCache:
    """Raw replies on disk, one JSON file {"reply": text} per request at <dir>/<key[:2]>/<key>.json."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.json"

    def get(self, key: str) -> str | None:
        """The cached reply, or None (no entry, or an unreadable one)."""
        try:
            reply = json.loads(self.path(key).read_text(encoding="utf-8"))["reply"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return reply if isinstance(reply, str) else None

    def put(self, key: str, reply: str) -> None:
        """Save a reply atomically (temporary file, fsync, rename)."""
        atomic_write_bytes(self.path(key), json.dumps({"reply": reply}).encode())


class ChatClient:
    """Asks a model behind an OpenAI-compatible /chat/completions endpoint; `who` names it in errors."""

    def __init__(self, base_url: str, model: str, *, who: str = "chat endpoint", api_key_env: str = "OPENAI_API_KEY",
                 temperature: float = 0.0, max_tokens: int = 200, concurrency: int = 8, max_attempts: int = 5,
                 timeout_s: float = 60.0, backoff_s: float = 1.0, cache_dir: str | Path | None = None) -> None:
        if concurrency < 1 or max_attempts < 1:
            raise PersonaAxisError(f"the {who} needs concurrency >= 1 and max_attempts >= 1, "
                                   f"got {concurrency} and {max_attempts}")
        self.url, self.model, self.who = completions_url(base_url), model, who
        self.api_key_env, self.temperature, self.max_tokens = api_key_env, temperature, max_tokens
        self.concurrency, self.max_attempts = concurrency, max_attempts
        self.timeout_s, self.backoff_s = timeout_s, backoff_s
        self.cache = ReplyCache(cache_dir) if cache_dir is not None else None

    def ask_all(self, conversations: Sequence[ChatMessages], parse: Callable[[str], T]) -> list[Answer[T] | Unparsed]:
        """One answer per conversation, in order; `parse` turns a reply's text into a value or raises ValueError."""
        stop = threading.Event()
        headers = {"Authorization": f"Bearer {key}"} if (key := os.environ.get(self.api_key_env)) else {}
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        with httpx.Client(timeout=self.timeout_s, headers=headers, limits=limits) as client, \
                ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            futures = [pool.submit(self._ask, client, messages, parse, stop) for messages in conversations]
            wait(futures, return_when=FIRST_EXCEPTION)
            failed = [e for f in futures if f.done() and not f.cancelled() and (e := f.exception()) is not None]
            if failed:
                stop.set()
                pool.shutdown(wait=True, cancel_futures=True)
                raise next((e for e in failed if not isinstance(e, _Stopped)), failed[0])
        return [f.result() for f in futures]

    def _ask(self, client: httpx.Client, messages: ChatMessages, parse: Callable[[str], T],
             stop: threading.Event) -> Answer[T] | Unparsed:
        """The cached answer, else up to max_attempts requests; a fatal error sets `stop` for the whole batch."""
        key = cache_key(self.model, messages)
        cached = self.cache.get(key) if self.cache is not None else None
        if cached is not None:
            try:
                return Answer(parse(cached), cached)
            except ValueError:
                pass  # written by an older parser: ask again
        try:
            return self._attempts(client, messages, parse, stop, key)
        except PersonaAxisError:
            stop.set()
            raise

    def _attempts(self, client: httpx.Client, messages: ChatMessages, parse: Callable[[str], T],
                  stop: threading.Event, key: str) -> Answer[T] | Unparsed:
        why, transient, delay, rejected = "", False, 0.0, None
        for attempt in range(self.max_attempts):
            if stop.wait(delay):
                raise _Stopped(f"{self.who} batch stopped after an earlier error")
            try:
                reply = self._post(client, messages)
            except _Transient as exc:
                why, transient, delay = str(exc), True, self.delay_s(attempt, exc.retry_after)
                continue
            try:
                value = parse(reply)
            except ValueError as exc:
                if self.temperature == 0 and reply == rejected:
                    return Unparsed(f"{exc} (the same reply twice at temperature 0)", attempt + 1)
                why, transient, delay, rejected = str(exc), False, 0.0, reply
                continue
            if self.cache is not None:
                self.cache.put(key, reply)
            return Answer(value, reply)
        if transient:
            raise PersonaAxisError(f"{self.who} unreachable at {self.url}: {why} after {self.max_attempts} attempts; "
                                   "check the server is running and the URL is right")
        return Unparsed(why, self.max_attempts)

    def delay_s(self, attempt: int, retry_after: float | None) -> float:
        """Seconds to wait after failed attempt `attempt` (0-based): Retry-After, else backoff · 2^attempt + jitter."""
        if retry_after is not None:
            return retry_after
        return min(self.backoff_s * 2.0**attempt + random.uniform(0, 0.1 * self.backoff_s), MAX_DELAY_S)

    def _post(self, client: httpx.Client, messages: ChatMessages) -> str:
        """One request -> the reply text; raises _Transient (retry) or PersonaAxisError (give up)."""
        body = {"model": self.model, "messages": messages, "temperature": self.temperature,
                "max_tokens": self.max_tokens}
        try:
            response = client.post(self.url, json=body)
        except httpx.TransportError as exc:
            raise _Transient(f"{type(exc).__name__}: {exc}") from None
        status = response.status_code
        if status == 429 or status >= 500:
            raise _Transient(f"HTTP {status}", retry_after_s(response.headers.get("Retry-After")))
        if status != 200:
            detail = " ".join(response.text[:300].split())
            raise PersonaAxisError(f"{self.who} request failed with HTTP {status} at {self.url} "
                                   f"({detail or 'no detail'}); check the URL, the model name {self.model!r} "
                                   f"and the API key in ${self.api_key_env}")
        try:
            return completion_text(response.content)
        except ValueError:
            raise PersonaAxisError(f"{self.who} at {self.url} did not answer with a chat completion; "
                                   "check the URL points at the API root (often ending in /v1)") from None
