"""Picking the next token, with one random stream per reply.

Each reply samples from its own torch.Generator, seeded from (seed, reply index), and draws a
fixed amount of numbers per generated token. A reply's tokens therefore do not depend on which other replies
share its batch, on the batch size, or on when the reply entered the batch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import Tensor


def stream_seed(seed: int, index: int) -> int:
    """The seed of reply `index`'s random stream in a generation seeded with `seed` (a stable 63-bit hash)."""
    digest = hashlib.blake2b(f"persona-axis:{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def reply_generator(seed: int, device: torch.device) -> torch.Generator:
    """A fresh random stream for one reply, on `device`."""
    return torch.Generator(device=device).manual_seed(seed)


def pick_tokens(logits: Tensor, temperature: float, top_p: float, generators: Sequence[torch.Generator]) -> Tensor:
    """Greedy when temperature <= 0, else nucleus sampling. logits [batch, vocab] -> ids [batch].

    Sampling races exponential clocks: row i draws one Exp(1) number per vocabulary entry from
    generators[i] and takes argmax(p / clock), a draw from p. Unlike inverting the cumulative
    distribution, the pick does not move when rounding noise (e.g. a different batch shape)
    nudges the probabilities, unless two racers finish within that noise of each other.
    """
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        sorted_probs[sorted_probs.cumsum(-1) - sorted_probs > top_p] = 0.0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    clocks = torch.stack([torch.empty(probs.shape[-1], device=g.device).exponential_(generator=g) for g in generators])
    return (probs / clocks.to(probs.device)).argmax(-1)
