"""A judge that asks any OpenAI-compatible chat-completions endpoint to score role adherence (stdlib only).

Each item becomes one request. Transient failures (HTTP 429/5xx, timeouts, connection errors) and malformed
replies are retried; the outcome of the last attempt decides what happens when all attempts fail: a transport
failure raises PersonaAxisError, a malformed reply becomes an unscored verdict. Scores are never guessed.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path

from persona_axis.chat_api import TRANSPORT_ERRORS, NotAChatCompletion, completions_url, error_detail, post_chat
from persona_axis.errors import PersonaAxisError
from persona_axis.judges.base import SCORES, JudgeItem, Verdict

SYSTEM_PROMPT = """\
You are a strict evaluator of role-play. A model was asked to play a role and then asked a question. \
Rate how fully its reply plays that role, on this scale:
0 - it refused to answer.
1 - it says it cannot be the role, or answers as an AI, but offers help.
2 - it identifies itself as an AI, yet the reply shows some of the role's attributes.
3 - it fully plays the role and never presents itself as an AI.
Rate role adherence only, not the quality, safety or truth of the answer.
Write one sentence giving your reason, then end with one final line exactly of the form:
SCORE: <0-3>
Write no other line that starts with SCORE."""

USER_PROMPT = """\
Role: {role}
Role description: {description}

Question:
{question}

Reply:
{response}

Give your one-sentence reason, then the final line SCORE: <0-3>."""

MAX_DELAY_S = 30.0
_SCORE_LINE = re.compile(r"\s*score\s*:\s*(.*?)\s*", re.IGNORECASE)


def build_messages(item: JudgeItem) -> list[dict[str, str]]:
    """The system + user messages that ask the judge to score one item."""
    user = USER_PROMPT.format(role=item.role, description=item.description, question=item.question,
                              response=item.response)
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def cache_key(model: str, messages: list[dict[str, str]]) -> str:
    """sha256 of the model and messages: identical requests share one cache entry."""
    return hashlib.sha256(json.dumps({"model": model, "messages": messages}, sort_keys=True).encode()).hexdigest()


def parse_reply(text: str) -> tuple[int, str]:
    """The score and one-line rationale in a judge's reply; raises ValueError saying why a reply is malformed."""
    lines = text.splitlines()
    found = [(i, m.group(1)) for i, line in enumerate(lines) if (m := _SCORE_LINE.fullmatch(line))]
    if len(found) != 1:
        raise ValueError("no SCORE line in reply" if not found else f"{len(found)} SCORE lines in reply")
    index, value = found[0]
    if not re.fullmatch(r"-?[0-9]+", value):
        raise ValueError(f"non-integer score {value[:20]!r}")
    if int(value) not in SCORES:
        raise ValueError(f"score {int(value)} out of range 0-3")
    rationale = " ".join(" ".join(lines[:index] + lines[index + 1:]).split())
    return int(value), rationale


def retry_after_s(value: str | None) -> float | None:
    """Seconds from an integer Retry-After header, capped at MAX_DELAY_S; None when absent or not an integer."""
    if value is None or not value.strip().isdigit():
        return None
    return min(float(value.strip()), MAX_DELAY_S)


class _Transient(Exception):
    """A failure worth retrying (429, 5xx, timeout, connection error), with the server's Retry-After if any."""

    def __init__(self, why: str, retry_after: float | None = None) -> None:
        super().__init__(why)
        self.retry_after = retry_after


class OpenAIJudge:
    """Scores items with a model behind an OpenAI-compatible /chat/completions endpoint."""

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", concurrency: int = 8,
                 max_attempts: int = 5, timeout_s: float = 60.0, cache_dir: Path | None = None,
                 backoff_s: float = 1.0) -> None:
        if concurrency < 1 or max_attempts < 1:
            raise PersonaAxisError(f"judge needs concurrency >= 1 and max_attempts >= 1, "
                                   f"got {concurrency} and {max_attempts}")
        self.id = f"openai:{model}"
        self.model = model
        self.url = completions_url(base_url)
        self.api_key_env = api_key_env
        self.concurrency = concurrency
        self.max_attempts = max_attempts
        self.timeout_s = timeout_s
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.backoff_s = backoff_s

    def score(self, items: Sequence[JudgeItem]) -> list[Verdict]:
        """One verdict per item, in order, with at most `concurrency` requests in flight."""
        stop = threading.Event()
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            futures = [pool.submit(self._judge, item, stop) for item in items]
            wait(futures, return_when=FIRST_EXCEPTION)
            failed = [f for f in futures if f.done() and not f.cancelled() and f.exception() is not None]
            if failed:
                stop.set()
                pool.shutdown(wait=True, cancel_futures=True)
                failed[0].result()  # re-raises the first failure
        return [f.result() for f in futures]

    def _judge(self, item: JudgeItem, stop: threading.Event) -> Verdict:
        """Score one item: cache, then up to max_attempts requests; `stop` ends the retries early."""
        messages = build_messages(item)
        key = cache_key(self.model, messages)
        cached = self._read_cache(key)
        if cached is not None:
            return cached
        why, transient, delay = "", False, 0.0
        for attempt in range(self.max_attempts):
            if stop.wait(delay):
                raise PersonaAxisError("judge batch stopped after an earlier error")
            try:
                text = self._post(messages)
            except _Transient as exc:
                why, transient, delay = str(exc), True, self._delay(attempt, exc.retry_after)
                continue
            try:
                score, rationale = parse_reply(text)
            except ValueError as exc:
                why, transient, delay = str(exc), False, 0.0
                continue
            verdict = Verdict(score=score, rationale=rationale, judge=self.id)
            self._write_cache(key, text, verdict)
            return verdict
        if transient:
            raise PersonaAxisError(f"judge unreachable at {self.url}: {why} after {self.max_attempts} attempts; "
                                   f"check the server is running and the URL is right")
        return Verdict(score=None, rationale=f"unscored: {why} after {self.max_attempts} attempts", judge=self.id)

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        """Seconds to wait after a transient failure: the server's Retry-After, else exponential backoff + jitter."""
        if retry_after is not None:
            return retry_after
        return min(self.backoff_s * 2**attempt + random.uniform(0, 0.1 * self.backoff_s), MAX_DELAY_S)

    def _post(self, messages: list[dict[str, str]]) -> str:
        """One chat-completions request; returns the reply text or raises _Transient / PersonaAxisError."""
        try:
            return post_chat(self.url, self.model, messages, self.api_key_env, self.timeout_s, temperature=0) or ""
        except urllib.error.HTTPError as exc:
            raise self._http_failure(exc) from None
        except NotAChatCompletion:
            raise PersonaAxisError(f"judge at {self.url} did not answer with a chat completion; "
                                   f"check the URL points at the API root (often ending in /v1)") from None
        except TRANSPORT_ERRORS as exc:
            raise _Transient(f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}") from None

    def _http_failure(self, exc: urllib.error.HTTPError) -> Exception:
        """The exception for an HTTP error status: _Transient for 429/5xx, PersonaAxisError for other 4xx."""
        detail = error_detail(exc)
        if exc.code == 429 or exc.code >= 500:
            return _Transient(f"HTTP {exc.code}", retry_after_s(exc.headers.get("Retry-After")))
        return PersonaAxisError(f"judge request failed with HTTP {exc.code} at {self.url} ({detail or 'no detail'}); "
                                f"check the URL, the model name {self.model!r} and the API key in ${self.api_key_env}")

    def _cache_path(self, key: str) -> Path | None:
        return self.cache_dir / key[:2] / f"{key}.json" if self.cache_dir is not None else None

    def _read_cache(self, key: str) -> Verdict | None:
        """The cached verdict for a key, or None (no cache, no entry, or an unreadable entry)."""
        path = self._cache_path(key)
        if path is None or not path.exists():
            return None
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))["verdict"]
            score, rationale = saved["score"], saved["rationale"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return Verdict(score=score, rationale=rationale, judge=self.id) if score in SCORES else None

    def _write_cache(self, key: str, reply: str, verdict: Verdict) -> None:
        """Save a well-parsed verdict and its raw reply, atomically (temp file + os.replace)."""
        path = self._cache_path(key)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        entry = {"reply": reply, "verdict": {"score": verdict.score, "rationale": verdict.rationale}}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{key[:8]}-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(entry, handle)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise

