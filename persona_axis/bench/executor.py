"""`bench executor`: the quick preset's rollouts through the local executor and through Ray, in one run.

Each configuration generates the same waves (the pipeline's: chunks of the preset's batch size,
CHUNKS_PER_WAVE chunks a wave) once; actor start-up (Ray workers importing torch and loading the
model) is timed apart from generation, since a run pays it once. Rates count replies per second.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from persona_axis.build.executors import LocalExecutor
from persona_axis.build.plan import ChunkReplies, Wave, run_waves
from persona_axis.build.ray_executor import ModelSpec, RayExecutor, import_ray, init_ray
from persona_axis.model.loading import LoadedModel


def quick_waves(lm: LoadedModel, replies: int | None) -> tuple[list[Wave], Any]:
    """The quick preset's waves for this model (only its first `replies` rollouts when given) and the settings."""
    from persona_axis.build.plan import PRESETS, plan_rollouts, rollout_waves, select_roles, select_traits
    from persona_axis.catalog import load_catalog, short_model_name

    settings = PRESETS["quick"]
    catalog = load_catalog(None).for_model(short_model_name(lm.name))
    plan = plan_rollouts(catalog, settings, select_roles(catalog, settings, None), select_traits(catalog, settings))
    return rollout_waves(plan[:replies] if replies else plan, settings), settings


def _timed(run: Callable[[], Iterator[ChunkReplies]]) -> tuple[float, dict[int, ChunkReplies]]:
    start = time.perf_counter()
    chunks = {k: (k, replies) for k, replies in run()}
    return time.perf_counter() - start, chunks


def _same(a: dict[int, ChunkReplies], b: dict[int, ChunkReplies]) -> bool:
    """Same chunks, same reply texts and bit-identical captured means."""
    return a.keys() == b.keys() and all(
        x.text == y.text and torch.equal(x.captured_means(), y.captured_means())
        for k in a for x, y in zip(a[k][1], b[k][1]))


def _on_ray(executor: RayExecutor, waves: list[Wave], settings: Any) -> tuple[float, float, dict[int, ChunkReplies]]:
    """(seconds until every actor holds the model, seconds generating the waves, the chunks)."""
    with executor:
        start = time.perf_counter()
        executor.model_identity()
        start_s = time.perf_counter() - start
        run_s, chunks = _timed(lambda: run_waves(executor, waves, settings))
    return start_s, run_s, chunks


def bench_executor(model: ModelSpec, threads: int = 2, replies: int | None = None,
                   address: str | None = None) -> dict[str, Any]:
    """Rollouts/s of the quick plan: local with `threads` threads, Ray with one `threads`-thread actor, and
    Ray with `threads` one-thread actors; plus whether each Ray configuration produced the local chunks bit for bit."""
    ray = import_ray()
    lm = model.load()
    waves, settings = quick_waves(lm, replies)
    n = sum(len(chunk) for wave in waves for chunk in wave.values())
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        local_s, local = _timed(lambda: run_waves(LocalExecutor(lm), waves, settings))
    finally:
        torch.set_num_threads(before)
    started_ray = not ray.is_initialized()
    if started_ray:
        init_ray(address, num_cpus=None if address else threads)
    try:
        report: dict[str, Any] = {}
        runs = {"ray": (1, threads), f"ray_{threads}x1": (threads, 1)}
        for name, (actors, each) in runs.items():
            start_s, run_s, chunks = _on_ray(RayExecutor(model, actors=actors, threads_per_actor=each, address=address),
                                             waves, settings)
            report[name] = {"start_s": start_s, "run_s": run_s, "same": _same(chunks, local)}
    finally:
        if started_ray:
            ray.shutdown()
    ray_rate, split_rate = n / report["ray"]["run_s"], n / report[f"ray_{threads}x1"]["run_s"]
    return {
        "model": lm.name, "dtype": str(lm.dtype).removeprefix("torch."), "replies": n, "waves": len(waves),
        "max_new_tokens": settings.max_new_tokens, "threads": threads,
        "local_rollouts_per_s": round(n / local_s, 3),
        "ray_rollouts_per_s": round(ray_rate, 3),
        "ray_overhead_ratio": round((n / local_s) / ray_rate, 3),
        "ray_actor_start_s": round(report["ray"]["start_s"], 2),
        f"ray_{threads}_actors_x1_thread_rollouts_per_s": round(split_rate, 3),
        f"ray_{threads}_actors_x1_vs_1_actor_x{threads}": round(split_rate / ray_rate, 3),
        # Bit-identical needs the same thread count: 1-thread actors sum in another order than a multi-thread run.
        "ray_identical_to_local": report["ray"]["same"],
        f"ray_{threads}_actors_x1_thread_identical_to_local": report[f"ray_{threads}x1"]["same"],
    }
