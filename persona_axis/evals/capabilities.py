"""Capability cost of an intervention on default-Assistant prompts: next-token KL and top-1 agreement.

The other capability checks (IFBench instruction following, BIG-bench multiple choice) live in
capabilities_ifbench.py and capabilities_bigbench.py; all take `interventions` as
`persona_axis.decode.generate.generate` does, so the same check runs uncapped and capped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from persona_axis.decode.generate import generate
from persona_axis.decode.interventions import InterventionMap, steer
from persona_axis.errors import PersonaAxisError
from persona_axis.model.loading import LoadedModel, Message


@dataclass(frozen=True)
class KLResult:
    """kl: mean KL(uncapped ‖ intervened) per position, in nats; top1_agreement: share of positions whose
    most likely next token is the same under both; over n_positions positions of n_conversations prompts."""

    kl: float
    top1_agreement: float
    n_positions: int
    n_conversations: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@torch.inference_mode()
def _log_probs(lm: LoadedModel, ids: Tensor, mask: Tensor) -> Tensor:
    """Next-token log-probabilities [batch, seq, vocab] float32 of right-padded ids [batch, seq] (mask 1 = token)."""
    return lm.model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device)).logits.float().log_softmax(-1)


def next_token_kl(lm: LoadedModel, conversations: Sequence[list[Message]], conditions: Sequence[InterventionMap],
                  max_new_tokens: int = 64, batch_size: int = 4) -> list[KLResult]:
    """Per condition ({layer: intervention(s)}): next-token KL(uncapped ‖ intervened) and top-1 agreement.

    Each conversation is answered once without interventions (greedy, `max_new_tokens`); every
    position of prompt + that reply is then scored teacher-forced with and without the condition's
    interventions: KL = Σ_v p(v) (log p(v) − log q(v)) per position, averaged over all positions of
    all conversations. An empty condition gives KL 0 and agreement 1. Sequences run right-padded,
    `batch_size` at a time (padding positions are not counted).
    """
    if not conversations:
        raise PersonaAxisError("the KL check needs at least one default conversation")
    replies = generate(lm, conversations, max_new_tokens=max_new_tokens, capture=False)
    seqs = [lm.prompt_ids(list(c)) + r for c, r in zip(conversations, replies.token_ids)]
    kl_sums, agree_sums = [0.0] * len(conditions), [0] * len(conditions)
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start : start + batch_size]
        ids = torch.full((len(chunk), max(map(len, chunk))), lm.tokenizer.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, seq in enumerate(chunk):
            ids[r, : len(seq)], mask[r, : len(seq)] = torch.tensor(seq), 1
        plain, real = _log_probs(lm, ids, mask), mask.bool().to(lm.device)
        for k, interventions in enumerate(conditions):
            with steer(lm, interventions):
                other = _log_probs(lm, ids, mask)
            kl_sums[k] += float((plain.exp() * (plain - other)).sum(-1)[real].sum())
            agree_sums[k] += int((plain.argmax(-1) == other.argmax(-1))[real].sum())
    positions = sum(map(len, seqs))
    return [KLResult(kl=s / positions, top1_agreement=a / positions, n_positions=positions,
                     n_conversations=len(conversations)) for s, a in zip(kl_sums, agree_sums)]
