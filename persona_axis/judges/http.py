"""A judge that asks any OpenAI-compatible chat-completions endpoint for 0-3 scores.

Roles are scored for role adherence with the reference's rubric (an in-character refusal scores 3; a
refusal as the AI scores 0), using the role's own eval_prompt from the catalogue when it has one; traits
(JudgeItem.kind "trait") are scored for trait expression. The scales are in `judges.base`.

Each item becomes one request through persona_axis.apps.chat_api.ChatClient. Transient failures (HTTP 429/5xx,
timeouts, connection errors) and malformed replies are retried; the outcome of the last attempt decides what
happens when all attempts fail: a transport failure raises PersonaAxisError, a malformed reply becomes an
unscored verdict. Scores are never guessed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from persona_axis.apps.chat_api import ChatClient, Unparsed, parse_int_field
from persona_axis.judges.base import SCORES, JudgeItem, Verdict

_FORMAT = """
Write one sentence giving your reason, then end with one final line exactly of the form:
SCORE: <0-3>
Write no other line that starts with SCORE."""

SYSTEM_PROMPT = """\
You are a strict evaluator of role-play. A model was asked to play a role and then asked a question. \
Rate how fully its reply plays that role, on this scale:
0 - it breaks character to refuse: it declines speaking as an AI or assistant ("As an AI, I can't...").
1 - it speaks as an AI or assistant, with none of the role's attributes, but tries to answer.
2 - it presents itself as an AI or assistant, yet the reply shows some of the role's attributes.
3 - it fully plays the role: it never presents itself as an AI, or it takes another name. A refusal given \
in character (the character itself declines, still speaking as the character) is playing the role and scores 3.
Rate role adherence only, not the quality, safety or truth of the answer.""" + _FORMAT

TRAIT_SYSTEM_PROMPT = """\
You are a strict evaluator of personality traits. A model was asked to show a trait and then asked a question. \
Rate how clearly its reply expresses that trait, on this scale:
0 - it refuses to answer.
1 - the trait is absent from the reply.
2 - the trait is partly expressed: some signs of it, or signs mixed with its opposite.
3 - the trait is clearly expressed throughout the reply.
Rate trait expression only, not the quality, safety or truth of the answer.""" + _FORMAT

USER_PROMPT = """\
Role: {role}
Role description: {description}

Question:
{question}

Reply:
{response}"""

TRAIT_USER_PROMPT = """\
Trait: {role}
Trait description: {description}

Question:
{question}

Reply:
{response}"""

CLOSING = "Give your one-sentence reason, then the final line SCORE: <0-3>."

_SCORE_LINE = re.compile(r"\s*score\s*:\s*(.*?)\s*", re.IGNORECASE)
_SLOT = re.compile(r"\{(question|answer)\}")


def _role_request(item: JudgeItem) -> str:
    """The user message for a role: the role's eval_prompt when it has one, else our layout.

    An eval_prompt with an {answer} slot is the role's whole judge prompt (the reference's form): its
    {question} and {answer} slots are filled. Any other eval_prompt is role-specific guidance put before
    our layout.
    """
    if "{answer}" in item.eval_prompt:
        values = {"question": item.question, "answer": item.response}
        return _SLOT.sub(lambda m: values[m[1]], item.eval_prompt.strip())
    body = USER_PROMPT.format(role=item.role, description=item.description, question=item.question,
                              response=item.response)
    return f"Role-specific guidance:\n{item.eval_prompt.strip()}\n\n{body}" if item.eval_prompt.strip() else body


def build_messages(item: JudgeItem) -> list[dict[str, str]]:
    """The system + user messages that ask the judge to score one item (role adherence or trait expression).

    Traits always get the trait rubric and layout; only roles use an eval_prompt.
    """
    if item.kind == "trait":
        system = TRAIT_SYSTEM_PROMPT
        body = TRAIT_USER_PROMPT.format(role=item.role, description=item.description, question=item.question,
                                        response=item.response)
    else:
        system, body = SYSTEM_PROMPT, _role_request(item)
    return [{"role": "system", "content": system}, {"role": "user", "content": f"{body}\n\n{CLOSING}"}]


def parse_reply(text: str) -> tuple[int, str]:
    """The score and one-line rationale in a judge's reply; raises ValueError saying why a reply is malformed."""
    lines = text.splitlines()
    found = [(i, m.group(1)) for i, line in enumerate(lines) if (m := _SCORE_LINE.fullmatch(line))]
    if len(found) != 1:
        raise ValueError("no SCORE line in reply" if not found else f"{len(found)} SCORE lines in reply")
    index, value = found[0]
    score = parse_int_field("score", value, min(SCORES), max(SCORES))
    rationale = " ".join(" ".join(lines[:index] + lines[index + 1:]).split())
    return score, rationale


class OpenAIJudge:
    """Scores items with a model behind an OpenAI-compatible /chat/completions endpoint (see chat_api.ChatClient)."""

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", concurrency: int = 8,
                 max_attempts: int = 5, timeout_s: float = 60.0, cache_dir: Path | None = None,
                 backoff_s: float = 1.0) -> None:
        self.client = ChatClient(base_url, model, who="judge", api_key_env=api_key_env, temperature=0,
                                 concurrency=concurrency, max_attempts=max_attempts, timeout_s=timeout_s,
                                 backoff_s=backoff_s, cache_dir=cache_dir)
        self.id = f"openai:{model}"

    def score(self, items: Sequence[JudgeItem]) -> list[Verdict]:
        """One verdict per item, in order, with at most `concurrency` requests in flight."""
        answers = self.client.ask_all([build_messages(item) for item in items], parse_reply)
        return [Verdict(score=None, rationale=f"unscored: {a.why} after {a.attempts} attempts", judge=self.id)
                if isinstance(a, Unparsed) else Verdict(score=a.value[0], rationale=a.value[1], judge=self.id)
                for a in answers]
