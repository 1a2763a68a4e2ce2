"""The drift guard offline (generate, simulate) and its comparison with always-on capping (evals/guard.py)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from serving import EXPERIMENT, tiny_axis_and_config, tiny_lm

from persona_axis.apps.simulate import simulate
from persona_axis.apps.user_simulators import LocalUserSimulator
from persona_axis.decode.generate import generate
from persona_axis.decode.row_interventions import Guard
from persona_axis.errors import PersonaAxisError
from persona_axis.evals import guard as guard_eval

HELLO = [[{"role": "user", "content": "Hello there, who are you?"}],
         [{"role": "system", "content": "You are a lighthouse keeper."}, {"role": "user", "content": "Tell me of storms."}]]


def _setup(tokenizer: Any) -> tuple[Any, Any, dict[int, list[Any]], tuple[int, torch.Tensor]]:
    lm = tiny_lm(tokenizer)
    axis, config = tiny_axis_and_config(lm)
    caps = {layer: [cap] for layer, cap in config.experiments[EXPERIMENT].interventions().items()}
    return lm, axis, caps, (0, axis.unit(0))


def _threshold_between(projections: list[float], k: int) -> float:
    """A threshold the running mean crosses first at token k or later (just above the running mean at token k)."""
    return sum(projections[: k + 1]) / (k + 1) + 1e-4


def test_fire_index_is_where_the_engine_fires_and_the_guarded_replies_match_the_teacher_forced_cap(tokenizer: Any) -> None:
    lm, _, caps, watch = _setup(tokenizer)
    plain = generate(lm, HELLO, max_new_tokens=12, capture=False, watch=watch, stop_at_eos=False)
    assert plain.projections is not None and plain.guard_fired_at is None
    threshold = max(_threshold_between(p, 3) for p in plain.projections)
    guarded = generate(lm, HELLO, max_new_tokens=12, capture=False, watch=watch, stop_at_eos=False,
                       guard=Guard(threshold, caps, min_tokens=2))
    assert guarded.guard_fired_at is not None
    for conversation, projections, fired, reply in zip(HELLO, plain.projections, guarded.guard_fired_at,
                                                       guarded.token_ids):
        at = guard_eval.fire_index(projections, threshold, 2)
        assert at is not None and fired == at
        prompt = lm.prompt_ids(conversation)
        log_probs = guard_eval._log_probs(lm, prompt + reply, caps, len(prompt) + at + 1)
        picked = log_probs[len(prompt) - 1 : len(prompt) + len(reply) - 1].argmax(-1).tolist()
        assert picked == reply  # greedy decoding under the guard = argmax of the cap acting from that position


def test_kl_costs_are_zero_for_a_guard_that_never_fires_and_smaller_than_always_on_for_one_that_fires_late(
        tokenizer: Any) -> None:
    lm, _, caps, watch = _setup(tokenizer)
    never = guard_eval.kl_costs(lm, HELLO, caps, watch, -math.inf, 1, 10)
    assert never["kl"]["guard"] == 0 and never["kl"]["always"] > 0 and never["guard_fired_share_default"] == 0
    late = guard_eval.kl_costs(lm, HELLO, caps, watch, math.inf, 6, 10)
    assert late["guard_fired_share_default"] == 1 and 0 < late["kl"]["guard"] < late["kl"]["always"]


def test_a_guard_without_a_watch_is_a_one_line_error(tokenizer: Any) -> None:
    lm, _, caps, _ = _setup(tokenizer)
    with pytest.raises(PersonaAxisError, match="watched projection"):
        generate(lm, HELLO, max_new_tokens=4, guard=Guard(0.0, caps))


def test_simulate_with_a_guard_caps_the_turns_after_it_fired_and_resumes(tokenizer: Any, tmp_path: Any) -> None:
    lm, axis, caps, _ = _setup(tokenizer)
    user = LocalUserSimulator(lm, max_new_tokens=6)
    kwargs: dict[str, Any] = {"layer": 0, "max_new_tokens": 8}
    always = simulate(lm, axis, user, "coding", 3, 1, guard=Guard(math.inf, caps, min_tokens=1), **kwargs)
    assert always[0]["guard_fired_at"] == [0, None, None] and always[0]["guarded"] == [False, True, True]
    never = simulate(lm, axis, user, "coding", 3, 1, guard=Guard(-math.inf, caps), **kwargs)
    plain = simulate(lm, axis, user, "coding", 3, 1, **kwargs)
    assert never[0]["guard_fired_at"] == [None] * 3 and never[0]["messages"] == plain[0]["messages"]
    out = tmp_path / "sim"
    simulate(lm, axis, user, "coding", 2, 1, guard=Guard(math.inf, caps, min_tokens=1), out=out, **kwargs)
    with pytest.raises(PersonaAxisError):  # another guard is another simulation
        simulate(lm, axis, user, "coding", 2, 1, guard=Guard(-math.inf, caps), out=out, **kwargs)


def test_guard_vs_always_reports_every_cost_and_the_ratios(tokenizer: Any, tmp_path: Any) -> None:
    lm, axis, _, _ = _setup(tokenizer)
    _, config = tiny_axis_and_config(lm)
    settings = guard_eval.PRESETS["smoke"]
    report = guard_eval.guard_vs_always(lm, axis, config.experiments[EXPERIMENT], settings, threshold=math.inf,
                                        run_dir=tmp_path, out=tmp_path)
    assert report["layer"] == 0 and report["threshold_rule"] == "given"
    assert set(report["over_refusal"]) == set(report["low_decile"]) == {"none", "always", "guard"}
    assert report["guard_fired_share_default"] == 1 and report["guard_capped_share_turns"] == 1
    assert report["guard_vs_always_kl_ratio"] == pytest.approx(report["kl"]["guard"] / report["kl"]["always"])
    assert report["turns_n"] == settings.turns * settings.conversations * 4
    with pytest.raises(PersonaAxisError, match="threshold"):
        guard_eval.guard_vs_always(lm, axis, config.experiments[EXPERIMENT], settings)


def test_lowest_decile_mean_takes_the_lowest_tenth() -> None:
    assert guard_eval.lowest_decile_mean([5.0, 1.0, 3.0]) == 1.0
    assert guard_eval.lowest_decile_mean([float(v) for v in range(20)]) == 0.5
