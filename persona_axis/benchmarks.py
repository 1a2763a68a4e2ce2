"""Throughput measurements, taken in one run and reported as ratios (absolute times wobble here).

Variants are interleaved round by round and each figure is the median over rounds.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from persona_axis.capture import response_means_by_forward
from persona_axis.generation import GenerationResult, generate
from persona_axis.models import LoadedModel, Message

# Open-ended requests that make a small chat model write at length.
BENCH_REQUESTS = [
    "Write a long story about a lighthouse keeper who finds a message in a bottle.",
    "Explain in detail how a bicycle gear system works.",
    "Describe a busy market in a coastal town, with sounds and smells.",
    "Give me a detailed plan for learning to cook over six months.",
    "Tell me the history of a fictional kingdom, from its founding to its fall.",
    "Explain step by step how bread rises and why kneading matters.",
    "Write a letter from a sailor to his sister about a storm at sea.",
    "Describe how you would design a small garden for a rainy climate.",
    "Explain how the water cycle shapes mountains and valleys over time.",
    "Write a detailed review of an imaginary restaurant.",
    "Tell a long fable about a fox, a crow and a clever farmer.",
    "Describe the daily routine of a medieval blacksmith in detail.",
    "Explain how a city decides where to build new roads.",
    "Write a diary entry of a scientist spending winter in Antarctica.",
    "Explain the rules of a board game you invent, with examples.",
    "Describe a journey by train across a large country, stop by stop.",
]


def bench_conversations(n: int) -> list[list[Message]]:
    return [[{"role": "user", "content": BENCH_REQUESTS[i % len(BENCH_REQUESTS)]}] for i in range(n)]


def generated_tokens(result: GenerationResult) -> int:
    """Tokens the model produced: response tokens plus each end-of-turn token."""
    return sum(len(t) for t in result.token_ids) + sum(result.finished)


def matmul_flops(dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """Measured FLOP/s of a [size, size] x [size, size] matrix product in `dtype` (median of repeats)."""
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times)


def memory_bandwidth(n_bytes: int = 1 << 30, repeats: int = 3) -> float:
    """Measured bytes/s of reading a large float32 array once (median of repeats)."""
    x = torch.ones(n_bytes // 4)
    x.sum()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - start)
    return n_bytes / statistics.median(times)


def _interleaved(variants: dict[str, Callable[[], int]], rounds: int) -> dict[str, float]:
    """Run each variant once per round, in turn; return median tokens/s per variant."""
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, run in variants.items():
            start = time.perf_counter()
            tokens = run()
            rates[name].append(tokens / (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in rates.items()}


def bench_generate(lm: LoadedModel, batch: int = 16, new_tokens: int = 128, rounds: int = 3) -> dict[str, float | int | str]:
    """Plain vs one-pass capture vs generate-then-forward (two-pass) vs transformers' generate()."""
    conversations = bench_conversations(batch)
    all_layers = list(range(lm.n_layers))
    prompt_ids = [lm.tokenizer(lm.chat_prompt(c), add_special_tokens=False).input_ids for c in conversations]

    def plain() -> int:
        return generated_tokens(generate(lm, conversations, max_new_tokens=new_tokens, batch_size=batch, capture=False))

    def onepass() -> int:
        return generated_tokens(generate(lm, conversations, max_new_tokens=new_tokens, batch_size=batch, capture=True))

    def twopass() -> int:
        result = generate(lm, conversations, max_new_tokens=new_tokens, batch_size=batch, capture=False)
        response_means_by_forward(lm, prompt_ids, result.token_ids, all_layers, batch_size=batch)
        return generated_tokens(result)

    def hf_generate() -> int:
        enc = lm.tokenizer([lm.chat_prompt(c) for c in conversations], return_tensors="pt", padding=True,
                           add_special_tokens=False).to(lm.device)
        with torch.inference_mode():
            out = lm.model.generate(**enc, max_new_tokens=new_tokens, do_sample=False,
                                    pad_token_id=lm.tokenizer.pad_token_id)
        new = out[:, enc.input_ids.shape[1]:]
        return int((new != lm.tokenizer.pad_token_id).sum()) + int((new == lm.tokenizer.pad_token_id).any(1).sum())

    plain()  # warm-up: allocator, thread pools, tokenizer caches
    rates = _interleaved({"plain": plain, "onepass": onepass, "twopass": twopass, "hf": hf_generate}, rounds)
    flops = matmul_flops(lm.dtype)
    bandwidth = memory_bandwidth()
    weight_bytes = lm.n_parameters * lm.dtype.itemsize
    weight_read_limit = batch * bandwidth / weight_bytes
    return {
        "model": lm.name,
        "dtype": str(lm.dtype).removeprefix("torch."),
        "batch": batch,
        "new_tokens": new_tokens,
        "rounds": rounds,
        "parameters": lm.n_parameters,
        "plain_tokens_per_s": round(rates["plain"], 1),
        "onepass_tokens_per_s": round(rates["onepass"], 1),
        "twopass_tokens_per_s": round(rates["twopass"], 1),
        "hf_generate_tokens_per_s": round(rates["hf"], 1),
        "speedup_vs_twopass": round(rates["onepass"] / rates["twopass"], 3),
        "capture_overhead": round(1 - rates["onepass"] / rates["plain"], 4),
        "plain_vs_hf_generate": round(rates["plain"] / rates["hf"], 3),
        "matmul_flops": round(flops),
        "roofline_fraction": round(2 * lm.n_parameters * rates["onepass"] / flops, 4),
        "memory_bandwidth_bytes_per_s": round(bandwidth),
        "weight_read_limit_tokens_per_s": round(weight_read_limit, 1),
        "fraction_of_weight_read_limit": round(rates["onepass"] / weight_read_limit, 4),
    }
