"""The one OpenAI-compatible chat-completions client (stdlib only), shared by the HTTP judge and user simulator.

`post_chat` sends one request and returns the reply's text; transport errors propagate as the
standard library raises them (urllib.error.HTTPError / URLError, OSError, http.client.HTTPException)
so each caller decides what is transient and what is fatal.
"""

from __future__ import annotations

import http.client
import json
import os
import urllib.error
import urllib.request

TRANSPORT_ERRORS = (urllib.error.URLError, OSError, http.client.HTTPException)


class NotAChatCompletion(ValueError):
    """A 200 response whose body is not a chat completion (usually a wrong URL)."""


def completions_url(base_url: str) -> str:
    return base_url.rstrip("/") + "/chat/completions"


def post_chat(url: str, model: str, messages: list[dict[str, str]], api_key_env: str, timeout_s: float,
              temperature: float, max_tokens: int = 200) -> str | None:
    """POST one chat-completions request; return the assistant message's text (None when it has none)."""
    body = {"model": model, "messages": messages, "temperature": temperature, "max_tokens": max_tokens}
    headers = {"Content-Type": "application/json"}
    if key := os.environ.get(api_key_env):
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        payload = response.read()
    try:
        content = json.loads(payload)["choices"][0]["message"].get("content")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        raise NotAChatCompletion(url) from None
    return content if isinstance(content, str) else None


def error_detail(exc: urllib.error.HTTPError) -> str:
    """The first 300 bytes of an HTTP error's body on one line (the response is closed)."""
    with exc:
        return " ".join(exc.read(300).decode("utf-8", "replace").split())
