"""bench/serve.py's pieces directly (the end-to-end `bench serve` run is in test_bench_commands.py).

No figure here is a timing: the checks are on counts, keys and the rules that pick values.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from chat_server import FakeServer, Reply
from conftest import tiny_model

from persona_axis.bench import serve as serve_bench
from persona_axis.bench.serve import _client, _load, _percentile, long_prompt_stall, synthetic_axis_and_config
from persona_axis.decode.engine import PREFILL_CHUNK
from persona_axis.model.loading import wrap_model


@pytest.mark.parametrize("values, q, expected", [
    ([], 0.5, None),
    ([3.0], 0.95, 3.0),
    ([5.0, 1.0, 3.0], 0.5, 3.0),  # sorted first
    ([1.0, 2.0, 3.0, 4.0], 0.5, 3.0),  # nearest rank: round(0.5 * 3) = 2 (Python rounds half to even)
    ([1.0, 2.0, 3.0, 4.0, 5.0], 0.5, 3.0),
    (list(map(float, range(1, 21))), 0.95, 19.0),  # round(0.95 * 19) = 18 -> the 19th value
    (list(map(float, range(1, 101))), 0.95, 95.0),  # round(0.95 * 99) = 94
    ([1.0, 2.0], 1.0, 2.0),
    ([1.0, 2.0], 0.0, 1.0),
])
def test_percentile_is_the_nearest_rank_of_the_sorted_values(values: list[float], q: float,
                                                              expected: float | None) -> None:
    assert _percentile(values, q) == expected


def test_synthetic_axis_and_config_caps_the_default_block(tokenizer: Any) -> None:
    lm = wrap_model(tiny_model("llama"), tokenizer, name="tiny")
    axis, config = synthetic_axis_and_config(lm)
    again, _ = synthetic_axis_and_config(lm)
    assert torch.equal(axis.vectors, again.vectors)  # seeded: the same axis every run
    assert axis.vectors.shape == (3, 64)
    assert list(config.experiments) == ["layers_2:3-p0.25"]  # 3 layers: the default block is 2:3
    [experiment] = config.experiments.values()
    assert [c.layer for c in experiment.caps] == [2] and all(c.floor == 0.0 for c in experiment.caps)
    torch.testing.assert_close(experiment.caps[0].axis, axis.unit(2))
    assert (config.n_layers, config.hidden_size) == (3, 64)


def _stream(tokens: int) -> bytes:
    events = [{"choices": [{"delta": {"content": "x"}}], "persona_axis": {"projection": 0.5}} for _ in range(tokens)]
    events.append({"choices": [{"delta": {}, "finish_reason": "length"}]})  # no projection: not a token
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"


def test_client_counts_tokens_first_token_times_and_gaps(server: FakeServer) -> None:
    server.play(Reply(body=_stream(5)), Reply(body=_stream(3)))
    out: dict[str, list[float]] = {"ttft": [], "gaps": [], "tokens": []}
    url = server.base_url.removesuffix("/v1")
    _client(url, [{"model": "m", "messages": []}, {"model": "m", "messages": []}], out)
    assert out["tokens"] == [5, 3]
    assert len(out["ttft"]) == 2 and len(out["gaps"]) == 4 + 2  # one first token per request, the rest are gaps
    assert all(v >= 0 for v in out["ttft"] + out["gaps"])
    assert [body["stream"] for _, _, body in server.requests] == [True, True]  # every request is streamed


def test_load_runs_one_client_per_list_and_aggregates(server: FakeServer) -> None:
    server.play(Reply(body=_stream(4)))
    url = server.base_url.removesuffix("/v1")
    result = _load(url, [[{"model": "m", "messages": []}] * 2, [{"model": "m", "messages": []}]])
    assert len(server.requests) == 3
    assert set(result) == {"aggregate_tokens_per_s", "ttft_p50_s", "ttft_p95_s", "token_latency_p50_s",
                           "token_latency_p95_s"}
    assert result["aggregate_tokens_per_s"] > 0 and all(v is not None and v >= 0 for v in result.values())


def test_client_raises_on_an_http_error(server: FakeServer) -> None:
    import httpx

    server.play(Reply(status=500))
    with pytest.raises(httpx.HTTPStatusError):
        _client(server.base_url.removesuffix("/v1"), [{"model": "m", "messages": []}],
                {"ttft": [], "gaps": [], "tokens": []})


def test_long_prompt_is_cut_to_the_context(tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The long prompt is min(LONG_PROMPT_TOKENS, context - 16) tokens, and each prefill mode runs on it."""
    lm = wrap_model(tiny_model("llama"), tokenizer)
    chunks: list[int] = []

    def fake_stall(lm: Any, short: list[int], long: list[int], chunk: int) -> tuple[float, float]:
        chunks.append(chunk)
        return float(len(long)), float(len(long))

    monkeypatch.setattr(serve_bench, "_stall", fake_stall)
    report = long_prompt_stall(lm, [{"role": "user", "content": "Hi"}])
    assert report["long_prompt_tokens"] == 512 - 16 and report["prefill_chunk"] == PREFILL_CHUNK
    assert chunks == [PREFILL_CHUNK, 512 - 16, PREFILL_CHUNK]  # warm-up, whole, chunked
    assert set(report["long_prompt_stall_s"]) == {"whole", "chunked"}
    assert report["chunked_vs_whole_stall"] == 1.0  # the fake stall: the same for both


def test_stall_measures_on_the_engine(tokenizer: Any) -> None:
    """One real `_stall` on the tiny model: it ends, and returns two non-negative durations (values not checked)."""
    lm = wrap_model(tiny_model("llama"), tokenizer)
    short = lm.prompt_ids([{"role": "user", "content": "Hi"}])
    stall, ttft = serve_bench._stall(lm, short, list(range(100, 400)), PREFILL_CHUNK)
    assert stall >= 0 and ttft >= 0
