from __future__ import annotations

import torch

from persona_axis.decode.sampling import pick_tokens, reply_generator, stream_seed

CPU = torch.device("cpu")


def test_stream_seeds_are_stable_and_distinct() -> None:
    assert stream_seed(3, 1) == stream_seed(3, 1)
    assert len({stream_seed(s, i) for s in range(4) for i in range(50)}) == 200
    assert all(0 <= stream_seed(s, i) < 2**63 for s in (0, -1, 10**12) for i in (0, 7))


def test_greedy_takes_the_largest_logit_without_drawing() -> None:
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 0.0]])
    assert pick_tokens(logits, 0.0, 1.0, []).tolist() == [1, 0]


def test_sampling_follows_the_distribution_inside_the_nucleus() -> None:
    logits = torch.tensor([0.5, 0.3, 0.2]).log()[None]
    draws = [int(pick_tokens(logits, 1.0, 1.0, [reply_generator(k, CPU)])) for k in range(3000)]
    shares = [draws.count(t) / len(draws) for t in range(3)]
    assert all(abs(share - p) < 0.04 for share, p in zip(shares, [0.5, 0.3, 0.2]))
    nucleus = {int(pick_tokens(logits, 1.0, 0.6, [reply_generator(k, CPU)])) for k in range(300)}
    assert nucleus == {0, 1}  # the 0.2 token lies past the top-0.6 mass


def test_each_row_draws_from_its_own_stream_only() -> None:
    logits = torch.zeros(3, 1000)
    alone = [int(pick_tokens(logits[:1], 1.0, 1.0, [reply_generator(s, CPU)])) for s in (11, 12, 13)]
    together = pick_tokens(logits, 1.0, 1.0, [reply_generator(s, CPU) for s in (11, 12, 13)]).tolist()
    assert together == alone and len(set(alone)) == 3
