"""What to do with a conversation longer than the model's context: a sliding window of whole messages.

Policy (the server and `persona-axis monitor --window` share it): the system message, if any, is
always kept; the oldest other messages are dropped, whole, until the rendered conversation fits the
token budget. The number dropped is reported with the result. When even the system message and the
last message alone do not fit, the conversation is refused with a one-line error.
"""

from __future__ import annotations

from collections.abc import Callable

from persona_axis.errors import PersonaAxisError
from persona_axis.model.loading import LoadedModel, Message


def context_length(lm: LoadedModel) -> int:
    """The model's context in tokens (max_position_embeddings; the tokenizer's limit where the config has none)."""
    limit = getattr(lm.model.config.get_text_config(), "max_position_embeddings", None)
    return int(limit) if limit else int(lm.tokenizer.model_max_length)


def fit_window(messages: list[Message], budget: int, count: Callable[[list[Message]], int]) -> tuple[list[Message], int]:
    """(the latest messages whose token count `count` is at most `budget`, how many were dropped).

    The system message stays; older messages go first. A PersonaAxisError when the last message does not fit.
    """
    head = messages[:1] if messages and messages[0]["role"] == "system" else []
    rest = messages[len(head):]
    if count(messages) <= budget:
        return messages, 0
    low, high = 1, len(rest) - 1  # smallest number of dropped messages that fits, by bisection
    if high < low or count(head + rest[high:]) > budget:
        raise PersonaAxisError(f"the last message alone is longer than the {budget}-token window: shorten it")
    while low < high:
        middle = (low + high) // 2
        if count(head + rest[middle:]) <= budget:
            high = middle
        else:
            low = middle + 1
    return head + rest[low:], low


def prompt_window(lm: LoadedModel, messages: list[Message], budget: int) -> tuple[list[Message], int]:
    """`fit_window` for a prompt that opens the assistant's reply (chat template with the generation prompt)."""
    return fit_window(messages, budget, lm.prompt_length)
