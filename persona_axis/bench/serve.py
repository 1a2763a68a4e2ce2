"""`bench serve`: a bounded load test of the server on 127.0.0.1, with offline generation in the same run.

For 1, 4 and 16 concurrent clients (each sends a fixed number of streamed requests, one after the other):
aggregate generated tokens/s, time to first token and the gap between tokens (p50/p95). Then two ratios:
16 clients' aggregate throughput over offline batch-16 `generate` of the same prompts and lengths, and a
batch whose 16 requests carry different caps and steering over one whose requests all carry the same cap.
Last, on the engine itself: how long a decoding reply stalls while a long prompt (LONG_PROMPT_TOKENS)
enters, prefilled in one pass vs in chunks (engine.PREFILL_CHUNK), and that prompt's time to first token.
Every request runs to exactly `new_tokens` tokens (ignore_eos), so all variants do the same work.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

import httpx
import torch

from persona_axis.apps.server import PersonaServer, ServerLimits
from persona_axis.apps.server_http import build_app
from persona_axis.apps.server_run import BackgroundServer
from persona_axis.axis import Axis
from persona_axis.bench.throughput import bench_conversations, fixed_generate
from persona_axis.control.capping import CapLayer, CappingConfig, Experiment, default_layer_block, experiment_id
from persona_axis.decode.engine import PREFILL_CHUNK, Engine
from persona_axis.decode.requests import Sampling, TokenEvent
from persona_axis.decode.row_interventions import RowSettings
from persona_axis.model.context_window import context_length
from persona_axis.model.loading import LoadedModel

LONG_PROMPT_TOKENS = 1500  # cut to the model's context
LONG_PROMPT_LINE = "The keeper climbed the spiral stairs at dusk, trimmed the wick and wrote the weather in his log. "


def synthetic_axis_and_config(lm: LoadedModel) -> tuple[Axis, CappingConfig]:
    """A random axis and one capping experiment over the default block (speed does not depend on the values)."""
    generator = torch.Generator().manual_seed(0)
    axis = Axis(torch.randn(lm.n_layers, lm.hidden_size, generator=generator))
    block = default_layer_block(lm.n_layers)
    eid = experiment_id(block.start, block.stop, 0.25)
    caps = [CapLayer(layer, axis.unit(layer), 0.0) for layer in block]
    return axis, CappingConfig(lm.name, "", lm.n_layers, lm.hidden_size, "bench", "synthetic", {eid: Experiment(eid, caps)})


def _percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _client(url: str, bodies: list[dict[str, Any]], out: dict[str, list[float]]) -> None:
    """Send `bodies` one after the other as streamed requests; record first-token times, token gaps and counts."""
    with httpx.Client(timeout=600) as http:
        for body in bodies:
            start = time.perf_counter()
            last, tokens = None, 0
            with http.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}) as response:
                response.raise_for_status()
                for line in response.iter_lines():
                    if '"projection"' not in line:
                        continue
                    now = time.perf_counter()
                    out["ttft" if last is None else "gaps"].append(now - (start if last is None else last))
                    last, tokens = now, tokens + 1
            out["tokens"].append(tokens)


def _load(url: str, bodies_per_client: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """Run one client thread per body list at once; aggregate tokens/s over the wall time and latency percentiles."""
    records = [{"ttft": [], "gaps": [], "tokens": []} for _ in bodies_per_client]  # type: ignore[var-annotated]
    threads = [threading.Thread(target=_client, args=(url, bodies, rec)) for bodies, rec in zip(bodies_per_client, records)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ttft = [v for r in records for v in r["ttft"]]
    gaps = [v for r in records for v in r["gaps"]]
    return {"aggregate_tokens_per_s": sum(v for r in records for v in r["tokens"]) / wall,
            "ttft_p50_s": _percentile(ttft, 0.5), "ttft_p95_s": _percentile(ttft, 0.95),
            "token_latency_p50_s": _percentile(gaps, 0.5), "token_latency_p95_s": _percentile(gaps, 0.95)}


def bench_serve(lm: LoadedModel, axis: Axis | None = None, config: CappingConfig | None = None,
                clients: Sequence[int] = (1, 4, 16), requests_per_client: int = 2, new_tokens: int = 64) -> dict[str, Any]:
    """The load test described in the module doc; returns one JSON-ready dict (figures keyed by client count)."""
    if axis is None or config is None:
        axis, config = synthetic_axis_and_config(lm)
    experiment = next(iter(config.experiments))
    steer_layer = min(c.layer for c in config.experiments[experiment].caps) - 1
    prompts = bench_conversations(max(16, max(clients) * requests_per_client))

    def body(i: int, extension: dict[str, Any]) -> dict[str, Any]:
        return {"model": "bench", "messages": prompts[i % len(prompts)], "max_tokens": new_tokens, "temperature": 0,
                "persona_axis": {**extension, "ignore_eos": True}}

    report: dict[str, Any] = {"clients": list(clients), "new_tokens": new_tokens,
                              "requests_per_client": requests_per_client}
    server = PersonaServer(lm, axis, config, ServerLimits(max_rows=max(16, max(clients)), max_waiting=256))
    with BackgroundServer(build_app(server)) as background:
        url = background.url
        _load(url, [[body(0, {})]])  # warm-up
        for n in clients:
            result = _load(url, [[body(c * requests_per_client + r, {"cap": experiment}) for r in range(requests_per_client)]
                                 for c in range(n)])
            for key, value in result.items():
                report.setdefault(key, {})[str(n)] = value
        uniform = _load(url, [[body(c, {"cap": experiment})] for c in range(16)])["aggregate_tokens_per_s"]
        mixes: list[dict[str, Any]] = [{"cap": experiment}, {}, {"steer": [{"layer": max(0, steer_layer), "coef": -1.0}]},
                 {"cap": experiment, "steer": [{"layer": max(0, steer_layer), "coef": 1.0}]}]
        mixed = _load(url, [[body(c, mixes[c % 4])] for c in range(16)])["aggregate_tokens_per_s"]
        served16 = _load(url, [[body(c, {})] for c in range(16)])["aggregate_tokens_per_s"]
    start = time.perf_counter()
    offline_result = fixed_generate(lm, prompts[:16], new_tokens, batch=16)
    offline = sum(len(ids) for ids in offline_result.token_ids) / (time.perf_counter() - start)
    report.update({"offline_batch16_tokens_per_s": offline, "serve16_plain_tokens_per_s": served16,
                   "serve_vs_offline_ratio": served16 / offline, "mixed_vs_uniform_ratio": mixed / uniform,
                   "mixed_tokens_per_s": mixed, "uniform_tokens_per_s": uniform})
    report.update(long_prompt_stall(lm, prompts[0]))
    return report


def _stall(lm: LoadedModel, short: list[int], long: list[int], chunk: int) -> tuple[float, float]:
    """(longest gap between a decoding reply's tokens while `long` enters, `long`'s time to first token) in s."""
    engine, plain = Engine(lm, max_rows=2, prefill_chunk=chunk), RowSettings()
    times: list[float] = []
    first: list[float] = []
    engine.submit(short, Sampling(64, ignore_eos=True), plain,
                  lambda event: times.append(time.perf_counter()) if isinstance(event, TokenEvent) else None)
    for _ in range(8):
        engine.step()
    start = time.perf_counter()
    engine.submit(long, Sampling(4, ignore_eos=True), plain,
                  lambda event: first.append(time.perf_counter()) if isinstance(event, TokenEvent) else None)
    while not first or len(times) < 16:
        engine.step()
    return max(b - a for a, b in zip(times[7:], times[8:])), first[0] - start


def long_prompt_stall(lm: LoadedModel, conversation: list[dict[str, str]]) -> dict[str, Any]:
    """The stall a long prompt causes the running replies, prefilled at once vs in chunks of PREFILL_CHUNK."""
    tokens = min(LONG_PROMPT_TOKENS, context_length(lm) - 16)
    long = lm.prompt_ids([{"role": "user", "content": LONG_PROMPT_LINE * (tokens // 8)}])[-tokens:]
    short = lm.prompt_ids(conversation)
    _stall(lm, short, long, PREFILL_CHUNK)  # warm-up
    whole_stall, whole_ttft = _stall(lm, short, long, len(long))
    chunked_stall, chunked_ttft = _stall(lm, short, long, PREFILL_CHUNK)
    return {"long_prompt_tokens": len(long), "prefill_chunk": PREFILL_CHUNK,
            "long_prompt_stall_s": {"whole": whole_stall, "chunked": chunked_stall},
            "long_prompt_ttft_s": {"whole": whole_ttft, "chunked": chunked_ttft},
            "chunked_vs_whole_stall": chunked_stall / whole_stall}
