"""What prefilling shared prompt prefixes once buys (decode/prefix_cache.py), measured in one run against the same
calls with every prompt prefilled whole."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from persona_axis.decode.generate import generate
from persona_axis.model.loading import LoadedModel, Message


def _ratio(rates: dict[str, float]) -> float:
    return round(rates["shared"] / rates["whole"], 3)


def standard_plan_conversations(lm: LoadedModel, n: int) -> list[list[Message]]:
    """The `standard` preset's first n role rollouts (each role prompt answers 8 questions, so 8 share a prefix)."""
    from persona_axis.build.plan import PRESETS, plan_rollouts, select_roles
    from persona_axis.catalog import load_catalog, short_model_name

    settings = PRESETS["standard"]
    catalog = load_catalog(None).for_model(short_model_name(lm.name))
    plan = [item for item in plan_rollouts(catalog, settings, select_roles(catalog, settings, None)) if item.kind == "role"]
    return [item.messages() for item in plan[:n]]


def jailbreak_conversations(personas: int, requests: int) -> list[list[Message]]:
    """`personas` persona jailbreaks of the standard eval set (their long system prompts), each asked `requests`
    of the set's harmful requests: the shape of an eval chunk where every persona meets several requests."""
    from persona_axis.evals.harm_set import build_eval_set, preset_settings

    items = build_eval_set(preset_settings("standard")).items
    systems = list(dict.fromkeys(i.messages[0]["content"] for i in items
                                 if i.kind == "persona_jailbreak" and i.messages[0]["role"] == "system"))
    systems.sort(key=len, reverse=True)
    asked = [i.request for i in items if i.kind == "plain_harmful"][:requests]
    return [[{"role": "system", "content": s}, {"role": "user", "content": r}] for s in systems[:personas] for r in asked]


def bench_prefix_sharing(lm: LoadedModel, rounds: int, interleaved: Callable[[dict[str, Callable[[], int]], int],
                                                                           dict[str, float]]) -> dict[str, Any]:
    """standard-plan rollouts (64 replies in one batch, 64 new tokens, sampled as the pipeline does, every layer
    captured) and a persona-jailbreak prefill (4 personas x 16 requests, one new token) with and without shared prefixes.
    `interleaved` runs each variant once per round in turn and returns tokens/s (throughput._interleaved)."""
    rollouts = standard_plan_conversations(lm, 64)
    jailbreaks = jailbreak_conversations(4, 16)

    def rollout(share: bool) -> int:
        result = generate(lm, rollouts, max_new_tokens=64, temperature=0.7, top_p=0.9, batch_size=64,
                          share_prefixes=share)
        return sum(map(len, result.token_ids))

    def prefill(share: bool) -> int:
        generate(lm, jailbreaks, max_new_tokens=1, batch_size=64, capture=False, share_prefixes=share)
        return sum(len(lm.prompt_ids(c)) for c in jailbreaks)  # prompt tokens/s

    rollout_rates = interleaved({"shared": lambda: rollout(True), "whole": lambda: rollout(False)}, rounds)
    prefill_rates = interleaved({"shared": lambda: prefill(True), "whole": lambda: prefill(False)}, rounds)
    return {"prefix_sharing_tokens_per_s": round(rollout_rates["shared"], 1),
            "prefix_sharing_whole_tokens_per_s": round(rollout_rates["whole"], 1),
            "prefix_sharing_speedup": _ratio(rollout_rates),
            "jailbreak_prefill_prompt_tokens_per_s": round(prefill_rates["shared"], 1),
            "jailbreak_prefill_speedup": _ratio(prefill_rates)}
