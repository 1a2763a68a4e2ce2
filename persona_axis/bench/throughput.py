"""Throughput measurements, taken in one run and reported as ratios (absolute times wobble here).

Variants are interleaved round by round and each figure is the median over rounds.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from persona_axis.bench.llamacpp_peer import LlamaCppPeer
from persona_axis.bench.prefix import bench_prefix_sharing
from persona_axis.decode.capture import response_means_by_forward
from persona_axis.decode.generate import GenerationResult, generate
from persona_axis.decode.sampling import stream_seed
from persona_axis.errors import PersonaAxisError
from persona_axis.model.linear_layout import use_stock_layout
from persona_axis.model.loading import LoadedModel, Message, find_decoder_layers, int8_copy

if TYPE_CHECKING:
    from persona_axis.build.plan import Settings

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


# Questions a chat model answers in a sentence: mixed with BENCH_REQUESTS, replies end at very different lengths.
SHORT_QUESTIONS = [
    "What is the capital of France?",
    "How many days are in a week?",
    "What colour is a ripe banana?",
    "What is two plus three?",
    "Which planet do we live on?",
    "What language is spoken in Brazil?",
    "How many legs does a spider have?",
    "What is the opposite of cold?",
]


def mixed_conversations(n: int) -> list[list[Message]]:
    """n single-turn conversations alternating a long writing request and a one-line question."""
    return [[{"role": "user", "content": (BENCH_REQUESTS if i % 2 == 0 else SHORT_QUESTIONS)[(i // 2) % 8]}]
            for i in range(n)]


def bench_conversations(n: int) -> list[list[Message]]:
    return [[{"role": "user", "content": BENCH_REQUESTS[i % len(BENCH_REQUESTS)]}] for i in range(n)]


def fixed_generate(lm: LoadedModel, conversations: list[list[Message]], new_tokens: int, batch: int,
                   **kwargs: Any) -> GenerationResult:
    """Generate exactly `new_tokens` per reply (end-of-turn ignored; no capture unless asked), in one batch.

    Every benchmark variant runs through this, so all do the same work: otherwise a variant that
    changes the text also changes how many rows of the batch idle after finishing.
    """
    return generate(lm, conversations, max_new_tokens=new_tokens, batch_size=batch, stop_at_eos=False,
                    **{"capture": False, **kwargs})


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
    """Run each variant once per round, in turn (in reverse order every other round, so no variant always
    runs first); return median tokens/s per variant."""
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for round_index in range(rounds):
        order = list(variants.items())
        for name, run in order if round_index % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            tokens = run()
            rates[name].append(tokens / (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in rates.items()}


def bench_generate(lm: LoadedModel, batch: int = 16, new_tokens: int = 128, rounds: int = 3,
                   peer_gguf: Path | None = None) -> dict[str, Any]:
    """Plain vs one-pass capture vs generate-then-forward (two-pass) vs transformers' generate() at `batch`;
    batch 1 with all-layer capture (the model's path, and the int8 fast path beside an exact model);
    llama.cpp on `peer_gguf` at batch 1 and `batch`; continuous vs static batching of rollouts; shared prompt
    prefixes prefilled once vs every prompt whole (bench/prefix.py)."""
    conversations = bench_conversations(batch)
    all_layers = list(range(lm.n_layers))
    prompt_ids = [lm.prompt_ids(c) for c in conversations]

    def plain() -> int:
        return generated_tokens(fixed_generate(lm, conversations, new_tokens, batch))

    def onepass() -> int:
        return generated_tokens(fixed_generate(lm, conversations, new_tokens, batch, capture=True))

    def twopass() -> int:
        result = fixed_generate(lm, conversations, new_tokens, batch)
        response_means_by_forward(lm, prompt_ids, result.token_ids, all_layers, batch_size=batch)
        return generated_tokens(result)

    def hf_generate() -> int:
        enc = lm.tokenizer([lm.chat_prompt(c) for c in conversations], return_tensors="pt", padding=True,
                           add_special_tokens=False).to(lm.device)
        with torch.inference_mode():
            # transformers adds generate() through a mixin that its type stubs do not show on PreTrainedModel
            out = lm.model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens,  # type: ignore[operator]
                                    do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)
        return out[:, enc.input_ids.shape[1]:].numel()

    plain()  # warm-up: allocator, thread pools, tokenizer caches
    rates = _interleaved({"plain": plain, "onepass": onepass, "twopass": twopass, "hf": hf_generate}, rounds)
    flops = matmul_flops(lm.dtype)
    bandwidth = memory_bandwidth()
    weight_bytes = lm.n_parameters * lm.dtype.itemsize
    weight_read_limit = batch * bandwidth / weight_bytes
    return {
        "model": lm.name,
        "dtype": str(lm.dtype).removeprefix("torch."),
        "fast_path": lm.fast_path,
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
        "batch16_vs_hf_generate": round(rates["onepass"] / rates["hf"], 3),
        "matmul_flops": round(flops),
        "roofline_fraction": round(2 * lm.n_parameters * rates["onepass"] / flops, 4),
        "memory_bandwidth_bytes_per_s": round(bandwidth),
        "weight_read_limit_tokens_per_s": round(weight_read_limit, 1),
        "fraction_of_weight_read_limit": round(rates["onepass"] / weight_read_limit, 4),
        **batch1_and_peer(lm, conversations, prompt_ids, new_tokens, rounds, peer_gguf, rates["onepass"]),
        **rollout_batching(lm, batch, new_tokens, rounds),
        **mixed_batching(lm, batch, new_tokens, rounds),
        **bench_prefix_sharing(lm, rounds, _interleaved),
    }


def stock_layout_copy(lm: LoadedModel) -> LoadedModel:
    """A copy of an exact CPU model with its linear layers back in nn.Linear's layout (the previous release's)."""
    model = copy.deepcopy(lm.model)
    use_stock_layout(model)
    return replace(lm, model=model, layers=find_decoder_layers(model))


def batch1_and_peer(lm: LoadedModel, conversations: list[list[Message]], prompt_ids: list[list[int]],
                    new_tokens: int, rounds: int, peer_gguf: Path | None, batch_rate: float) -> dict[str, Any]:
    """One conversation decoded with all layers captured (the model's path; beside an exact CPU model, the int8
    path and the stock weight layout of the previous release), and llama.cpp on the same GGUF and prompt ids,
    greedy, at batch 1 and the whole batch.

    conversations, prompt_ids: the caller's batch (its first conversation is the batch-1 one).
    batch_rate: our one-pass capture rate on that batch (measured by the caller), for the batch ratio.
    """
    fast = int8_copy(lm) if lm.fast_path == "exact" and lm.device.type == "cpu" else None
    previous = stock_layout_copy(lm) if fast is not None else None
    variants: dict[str, Callable[[], int]] = {
        "batch1": lambda: generated_tokens(fixed_generate(lm, conversations[:1], new_tokens, 1, capture=True))}
    if fast is not None and previous is not None:
        variants["batch1_int8"] = lambda: generated_tokens(
            fixed_generate(fast, conversations[:1], new_tokens, 1, capture=True))
        variants["batch1_previous_exact"] = lambda: generated_tokens(
            fixed_generate(previous, conversations[:1], new_tokens, 1, capture=True))
    peer, peer_note = _peer(peer_gguf, len(prompt_ids), max(map(len, prompt_ids)) + new_tokens)
    if peer is not None:
        variants["llamacpp_batch1"] = lambda: sum(map(len, peer.generate(prompt_ids[:1], new_tokens)))
        variants["llamacpp_batch"] = lambda: sum(map(len, peer.generate(prompt_ids, new_tokens)))
    try:
        for run in variants.values():
            run()  # warm-up
        rates = _interleaved(variants, rounds)
    finally:
        if peer is not None:
            peer.close()
    report: dict[str, Any] = {"batch1_tokens_per_s": round(rates["batch1"], 1)}
    if fast is not None:
        report |= {"batch1_int8_tokens_per_s": round(rates["batch1_int8"], 1),
                   "batch1_int8_vs_exact": round(rates["batch1_int8"] / rates["batch1"], 3),
                   "batch1_previous_exact_tokens_per_s": round(rates["batch1_previous_exact"], 1),
                   "batch1_vs_previous_exact": round(rates["batch1"] / rates["batch1_previous_exact"], 3)}
    if peer is None:
        return report | {"llamacpp": peer_note}
    report |= {"llamacpp": peer_note,
               "llamacpp_batch1_tokens_per_s": round(rates["llamacpp_batch1"], 1),
               "llamacpp_batch16_tokens_per_s": round(rates["llamacpp_batch"], 1),
               "batch1_vs_llamacpp": round(rates["batch1"] / rates["llamacpp_batch1"], 3),
               "batch16_vs_llamacpp": round(batch_rate / rates["llamacpp_batch"], 3)}
    if fast is not None:
        report["batch1_int8_vs_llamacpp"] = round(rates["batch1_int8"] / rates["llamacpp_batch1"], 3)
    return report


def _peer(gguf: Path | None, sequences: int, length: int) -> tuple[LlamaCppPeer | None, str]:
    """llama.cpp on `gguf` with the torch thread count, or None and why not."""
    if gguf is None:
        return None, "skipped: the model was not loaded from a GGUF file"
    try:
        return LlamaCppPeer(gguf, sequences, length, torch.get_num_threads()), f"llama.cpp on {gguf.name}"
    except PersonaAxisError as exc:
        return None, f"skipped: {exc}"


def quick_plan_chunks(lm: LoadedModel, n: int, size: int) -> tuple[list[list[list[Message]]], Settings]:
    """n chunks of `size` consecutive rollouts of the `quick` preset's plan, spread evenly over it, and the preset."""
    from persona_axis.build.plan import PRESETS, plan_rollouts, select_roles, select_traits
    from persona_axis.catalog import load_catalog, short_model_name

    settings = PRESETS["quick"]
    catalog = load_catalog(None).for_model(short_model_name(lm.name))
    plan = plan_rollouts(catalog, settings, select_roles(catalog, settings, None), select_traits(catalog, settings))
    starts = [k * max(0, len(plan) - size) // max(1, n - 1) for k in range(n)]
    return [[item.messages() for item in plan[start : start + size]] for start in starts], settings


def rollout_batching(lm: LoadedModel, batch: int, new_tokens: int, rounds: int) -> dict[str, float | int]:
    """Rollouts as the pipeline generated them (static batches, one per chunk) vs as it does now (one continuous batch).

    Three chunks of `batch` rollouts from the quick preset's plan, sampled with its settings, all
    layers captured, each reply ending at end-of-turn or at min(new_tokens, the preset's limit).
    Both produce the same replies (chunk k seeded with k); tokens/s counts the tokens the model produced.
    """
    chunks, settings = quick_plan_chunks(lm, 3, batch)
    limit = min(new_tokens, settings.max_new_tokens)

    def run(conversations: list[list[Message]], seed: int | list[int], continuous: bool) -> int:
        return generated_tokens(generate(lm, conversations, max_new_tokens=limit, temperature=settings.temperature,
                                         top_p=settings.top_p, seed=seed, batch_size=batch, continuous=continuous))

    def static() -> int:
        return sum(run(chunk, k, continuous=False) for k, chunk in enumerate(chunks))

    def continuous() -> int:
        seeds = [stream_seed(k, j) for k, chunk in enumerate(chunks) for j in range(len(chunk))]
        return run([c for chunk in chunks for c in chunk], seeds, continuous=True)

    rates = _interleaved({"static": static, "continuous": continuous}, rounds)
    return {"rollouts_replies": sum(len(chunk) for chunk in chunks), "rollouts_max_new_tokens": limit,
            "rollouts_static_tokens_per_s": round(rates["static"], 1),
            "rollouts_continuous_tokens_per_s": round(rates["continuous"], 1),
            "rollouts_continuous_vs_static": round(rates["continuous"] / rates["static"], 3)}


def mixed_batching(lm: LoadedModel, batch: int, new_tokens: int, rounds: int) -> dict[str, float | int]:
    """Continuous vs static batching where reply lengths differ: 3 × `batch` conversations alternating long
    requests and one-line questions (`mixed_conversations`), greedy, all layers captured, each reply
    ending at end-of-turn or `new_tokens`. Both loops produce the same replies."""
    conversations = mixed_conversations(3 * batch)

    def run(continuous: bool) -> GenerationResult:
        return generate(lm, conversations, max_new_tokens=new_tokens, batch_size=batch, continuous=continuous)

    lengths = [len(t) for t in run(True).token_ids]
    rates = _interleaved({"static": lambda: generated_tokens(run(False)),
                          "continuous": lambda: generated_tokens(run(True))}, rounds)
    return {"mixed_replies": len(conversations), "mixed_reply_tokens_min": min(lengths),
            "mixed_reply_tokens_median": round(statistics.median(lengths)), "mixed_reply_tokens_max": max(lengths),
            "mixed_static_tokens_per_s": round(rates["static"], 1),
            "mixed_continuous_tokens_per_s": round(rates["continuous"], 1),
            "mixed_continuous_vs_static": round(rates["continuous"] / rates["static"], 3)}


def _cap_block(lm: LoadedModel, size: int = 8) -> list[int]:
    """A contiguous block of `size` layers at about 70 % depth (clipped to the model)."""
    start = min(round(0.7 * lm.n_layers), lm.n_layers - size)
    return list(range(max(0, start), max(0, start) + min(size, lm.n_layers)))


def _random_directions(lm: LoadedModel, seed: int = 0) -> torch.Tensor:
    """One random unit direction per layer [layers, hidden] float32 (speed does not depend on the direction)."""
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(lm.n_layers, lm.hidden_size, generator=generator)
    return directions / directions.norm(dim=-1, keepdim=True)


def _naive_cap_hooks(lm: LoadedModel, directions: torch.Tensor, layers: list[int]) -> list[Any]:
    """Capping written the obvious way: per-layer hooks with an einsum projection, a clamp and a subtraction.

    Ceiling form, as other tools store it: cap c along v = −â with c = −τ (the same floor, τ = 0 here).
    """
    handles = []
    for layer in layers:
        v = (-directions[layer]).to(lm.device, lm.dtype)

        def hook(_module: Any, _inputs: Any, output: Any, v: torch.Tensor = v) -> Any:
            hidden = output[0] if isinstance(output, tuple) else output
            excess = (torch.einsum("bsd,d->bs", hidden, v) - 0.0).clamp(min=0)
            hidden = hidden - excess.unsqueeze(-1) * v
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        handles.append(lm.layers[layer].register_forward_hook(hook))
    return handles


def bench_steer(lm: LoadedModel, batch: int = 16, new_tokens: int = 128, rounds: int = 3) -> dict[str, Any]:
    """Tokens/s with capping on 8 layers, addition on 1 layer (ours, steering-vectors, repeng), naive capping.

    Directions are random unit vectors with floors at 0 (caps then engage on a large share of
    positions, more than a calibrated 25th-percentile floor would); the cost of our caps does not
    depend on how often they engage. Every variant runs through the same decode loop.
    """
    from persona_axis.decode.interventions import Addition, Cap

    conversations = bench_conversations(batch)
    directions = _random_directions(lm)
    block, middle = _cap_block(lm), lm.n_layers // 2
    add_vector = directions[middle] * 4.0

    def run(**kwargs: Any) -> int:
        return generated_tokens(fixed_generate(lm, conversations, new_tokens, batch, **kwargs))

    def naive_cap8() -> int:
        handles = _naive_cap_hooks(lm, directions, block)
        try:
            return run()
        finally:
            for handle in handles:
                handle.remove()

    variants: dict[str, Callable[[], int]] = {
        "plain": run,
        "cap8": lambda: run(interventions={layer: Cap(directions[layer], 0.0) for layer in block}),
        "add1": lambda: run(interventions={middle: Addition(add_vector)}),
        "naive_cap8": naive_cap8,
    }
    variants.update(_peer_variants(lm, middle, add_vector, run))
    run()  # warm-up
    rates = _interleaved(variants, rounds)
    report: dict[str, Any] = {"model": lm.name, "dtype": str(lm.dtype).removeprefix("torch."), "batch": batch,
                              "new_tokens": new_tokens, "rounds": rounds, "cap_layers": f"{block[0]}:{block[-1] + 1}",
                              "add_layer": middle, "plain_tokens_per_s": round(rates["plain"], 1)}
    for name in ("cap8", "add1", "steering_vectors_add1", "repeng_add1", "naive_cap8"):
        report[f"{name}_ratio"] = round(rates[name] / rates["plain"], 4) if name in rates else None
    report["cap8_vs_naive_cap8"] = round(rates["cap8"] / rates["naive_cap8"], 4)
    ours, naive = _cap_op_times(lm, directions[block[0]], batch)
    step_us = 1e6 * batch / rates["plain"]
    report.update({"cap_op_us": round(ours, 2), "naive_cap_op_us": round(naive, 2),
                   "cap8_share_of_decode_step": round(len(block) * ours / step_us, 5)})
    return report


def _cap_op_times(lm: LoadedModel, direction: torch.Tensor, batch: int, calls: int = 2000,
                  rounds: int = 5) -> tuple[float, float]:
    """Microseconds per call of our Cap and of the naive hook body on one decode step's hidden state
    [batch, 1, hidden]: the part of capping that differs between them, timed without generation noise."""
    from persona_axis.decode.interventions import Cap

    hidden = torch.randn(batch, 1, lm.hidden_size, generator=torch.Generator().manual_seed(1)).to(lm.device, lm.dtype)
    cap, v = Cap(direction, 0.0), (-direction).to(lm.device, lm.dtype)

    def naive(h: torch.Tensor) -> torch.Tensor:
        return h - torch.einsum("bsd,d->bs", h, v).clamp(min=0).unsqueeze(-1) * v

    timings: dict[str, list[float]] = {"ours": [], "naive": []}
    with torch.inference_mode():
        for _ in range(rounds):
            for name, op in (("ours", cap), ("naive", naive)):
                start = time.perf_counter()
                for _ in range(calls):
                    op(hidden)
                timings[name].append(1e6 * (time.perf_counter() - start) / calls)
    return statistics.median(timings["ours"]), statistics.median(timings["naive"])


def _peer_variants(lm: LoadedModel, layer: int, vector: torch.Tensor,
                   run: Callable[..., int]) -> dict[str, Callable[[], int]]:
    """The same one-layer addition through steering-vectors and repeng, when they are installed."""
    variants: dict[str, Callable[[], int]] = {}
    try:
        from steering_vectors import SteeringVector
    except ImportError:
        SteeringVector = None  # noqa: N806
    if SteeringVector is not None:
        steering = SteeringVector({layer: vector.to(lm.device, lm.dtype)}, layer_type="decoder_block")

        def steering_vectors_add1() -> int:
            with steering.apply(lm.model, multiplier=1.0):
                return run()

        variants["steering_vectors_add1"] = steering_vectors_add1
    repeng = _import_repeng()
    if repeng is not None:
        model_type = lm.model.config.model_type
        control = repeng.ControlVector(model_type, {layer: vector.float().numpy()})

        def repeng_add1() -> int:
            wrapped = repeng.ControlModel(lm.model, [layer])
            try:
                wrapped.set_control(control, coeff=1.0)
                return run()
            finally:
                wrapped.unwrap()

        variants["repeng_add1"] = repeng_add1
    return variants


def _import_repeng() -> Any:
    """repeng, or None when it is not installed.

    repeng 0.4.0 names np.float_ (removed in NumPy 2) in annotations evaluated when its module loads, so
    the alias exists only while it is imported, then numpy is left as it was.
    """
    import numpy as np

    added = not hasattr(np, "float_")
    if added:
        np.float_ = np.float64  # type: ignore[attr-defined]
    try:
        import repeng
    except ImportError:
        return None
    finally:
        if added:
            del np.float_  # type: ignore[attr-defined]
    return repeng


def bench_monitor(lm: LoadedModel, batch: int = 16, new_tokens: int = 128, rounds: int = 3) -> dict[str, Any]:
    """Live-monitor overhead on decoding, and one-pass vs per-prefix projection of multi-turn conversations."""
    from persona_axis.axis import Axis
    from persona_axis.control.monitor import project_by_prefix, project_conversation

    conversations = bench_conversations(batch)
    axis = Axis(_random_directions(lm))
    layer = lm.n_layers // 2

    def run(**kwargs: Any) -> int:
        return generated_tokens(fixed_generate(lm, conversations, new_tokens, batch, **kwargs))

    run()
    rates = _interleaved({"plain": run, "monitored": lambda: run(watch=(layer, axis.vectors[layer]))}, rounds)
    replies = generate(lm, conversations[:4], max_new_tokens=48, batch_size=4, capture=False).texts
    dialogues = _bench_dialogues(replies, turns=8)

    def onepass() -> int:
        for dialogue in dialogues:
            project_conversation(lm, axis, dialogue, layer=layer)
        return len(dialogues)

    def per_prefix() -> int:
        for dialogue in dialogues:
            project_by_prefix(lm, axis, dialogue, layer)
        return len(dialogues)

    conv_rates = _interleaved({"onepass": onepass, "per_prefix": per_prefix}, rounds)
    return {
        "model": lm.name, "dtype": str(lm.dtype).removeprefix("torch."), "batch": batch, "new_tokens": new_tokens,
        "rounds": rounds, "layer": layer,
        "plain_tokens_per_s": round(rates["plain"], 1),
        "monitored_tokens_per_s": round(rates["monitored"], 1),
        "monitor_ratio": round(rates["monitored"] / rates["plain"], 4),
        "conversations": len(dialogues), "turns_per_conversation": len(dialogues[0]),
        "onepass_conversations_per_s": round(conv_rates["onepass"], 3),
        "per_prefix_conversations_per_s": round(conv_rates["per_prefix"], 3),
        "conversation_speedup": round(conv_rates["onepass"] / conv_rates["per_prefix"], 3),
    }


def _bench_dialogues(replies: list[str], turns: int) -> list[list[Message]]:
    """Conversations of `turns` user/assistant pairs built from bench requests and real replies."""
    dialogues = []
    for k in range(len(replies)):
        messages: list[Message] = [{"role": "system", "content": "You are a helpful assistant."}]
        for t in range(turns):
            messages.append({"role": "user", "content": BENCH_REQUESTS[(k + t) % len(BENCH_REQUESTS)]})
            messages.append({"role": "assistant", "content": replies[(k + t) % len(replies)].strip() or "Sure."})
        dialogues.append(messages)
    return dialogues
