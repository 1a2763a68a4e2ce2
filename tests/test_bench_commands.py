"""Each `persona-axis bench ...` subcommand, run once at the smallest sizes on the tiny random model.

These check that the commands run and report what they promise; the figures themselves mean nothing here.
The machine probes (matmul, memory bandwidth) run on small arrays and the monitor bench's dialogues are
two turns long (the tiny model's context is 512 tokens), so each run takes seconds.
"""

from __future__ import annotations

import json
from functools import partial

import pytest

from persona_axis.bench import throughput as benchmarks
from persona_axis.cli import main

COMMON = ["--batch", "2", "--new-tokens", "2", "--rounds", "1", "--dtype", "float32", "--json"]
EXPECTED = {
    "generate": {"plain_tokens_per_s", "onepass_tokens_per_s", "speedup_vs_twopass", "roofline_fraction",
                 "rollouts_continuous_vs_static", "batch16_vs_hf_generate", "fast_path", "batch1_tokens_per_s",
                 "batch1_int8_tokens_per_s", "batch1_int8_vs_exact", "batch1_vs_previous_exact", "llamacpp",
                 "mixed_continuous_vs_static", "prefix_sharing_speedup", "jailbreak_prefill_speedup"},
    "steer": {"plain_tokens_per_s", "cap8_ratio", "add1_ratio", "naive_cap8_ratio", "cap_op_us"},
    "monitor": {"plain_tokens_per_s", "monitor_ratio", "onepass_conversations_per_s", "conversation_speedup"},
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bench_command_runs_at_tiny_size(name: str, tiny_model_dir: str, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(benchmarks, "matmul_flops", partial(benchmarks.matmul_flops, size=128, repeats=1))
    monkeypatch.setattr(benchmarks, "memory_bandwidth", partial(benchmarks.memory_bandwidth, n_bytes=1 << 22))
    dialogues = benchmarks._bench_dialogues
    monkeypatch.setattr(benchmarks, "_bench_dialogues", lambda replies, turns: dialogues(replies, turns=2))
    assert main(["bench", name, "--model", tiny_model_dir, *COMMON]) == 0
    report = json.loads(capsys.readouterr().out)
    assert EXPECTED[name] <= set(report)
    assert (report["batch"], report["new_tokens"], report["rounds"]) == (2, 2, 1)
    assert report["plain_tokens_per_s"] > 0
    if name == "generate":
        assert report["rollouts_replies"] == 6 and report["rollouts_max_new_tokens"] == 2  # 3 chunks of --batch, --new-tokens
        assert report["fast_path"] == "exact" and report["batch1_int8_tokens_per_s"] > 0
        assert report["llamacpp"].startswith("skipped: the model was not loaded from a GGUF file")
    if name == "monitor":
        assert report["turns_per_conversation"] == 5  # a system message and two user/assistant turns


def test_bench_serve_runs_at_tiny_size(tiny_model_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The load test against a real server on 127.0.0.1, at 1 and 2 clients with one short request each."""
    assert main(["bench", "serve", "--model", tiny_model_dir, "--dtype", "float32", "--clients", "1,2",
                 "--requests", "1", "--new-tokens", "3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["clients"] == [1, 2]
    for key in ("aggregate_tokens_per_s", "ttft_p50_s", "ttft_p95_s", "token_latency_p50_s", "token_latency_p95_s"):
        assert set(report[key]) == {"1", "2"}
    assert report["aggregate_tokens_per_s"]["2"] > 0 and report["ttft_p95_s"]["2"] >= report["ttft_p50_s"]["2"] > 0
    assert report["serve_vs_offline_ratio"] > 0 and report["mixed_vs_uniform_ratio"] > 0
    assert report["long_prompt_tokens"] == 496 > report["prefill_chunk"]  # the tiny model's 512 positions less 16
    assert report["long_prompt_stall_s"]["chunked"] > 0 and report["chunked_vs_whole_stall"] > 0
