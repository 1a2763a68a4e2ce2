"""`bench serve`: a bounded load test of the server on 127.0.0.1, with offline generation in the same run.

For 1, 4 and 16 concurrent clients (each sends a fixed number of streamed requests, one after the other):
aggregate generated tokens/s, time to first token and the gap between tokens (p50/p95). Then two ratios:
16 clients' aggregate throughput over offline batch-16 `generate` of the same prompts and lengths, and a
batch whose 16 requests carry different caps and steering over one whose requests all carry the same cap.
Every request runs to exactly `new_tokens` tokens (ignore_eos), so all variants do the same work.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

import httpx
import torch

from persona_axis.axis import Axis
from persona_axis.benchmarks import bench_conversations, fixed_generate
from persona_axis.capping import CapLayer, CappingConfig, Experiment, default_layer_block, experiment_id
from persona_axis.models import LoadedModel
from persona_axis.server import BackgroundServer, PersonaServer, ServerLimits, build_app


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
    return report
