"""The rollout plan: every group answers the same questions, defaults as many times as the preset asks, traits
the first few of those questions; ids stay unique and keep the earlier form where nothing changed."""

from __future__ import annotations

from dataclasses import replace

from persona_axis.build.plan import PRESETS, plan_rollouts, select_roles, select_traits
from persona_axis.catalog import load_catalog


def test_quick_samples_the_default_pairs_many_times_and_traits_answer_one_question() -> None:
    catalog = load_catalog()
    settings = PRESETS["quick"]
    roles, traits = select_roles(catalog, settings, None), select_traits(catalog, settings)
    plan = plan_rollouts(catalog, settings, roles, traits)
    assert len({item.id for item in plan}) == len(plan)
    by_kind = {kind: [item for item in plan if item.kind == kind] for kind in ("default", "role", "trait")}
    questions = [q.id for q in catalog.questions[: settings.questions]]
    assert len(by_kind["default"]) == len(catalog.defaults) * len(questions) * settings.default_samples
    assert {item.question_id for item in by_kind["default"]} == set(questions)
    assert {item.question_id for item in by_kind["role"]} == set(questions)  # the same questions: nothing leaks
    assert {item.question_id for item in by_kind["trait"]} == set(questions[: settings.trait_questions])
    assert len(by_kind["trait"]) == len(traits) * settings.trait_questions  # type: ignore[operator]


def test_one_sample_per_pair_keeps_the_plan_of_earlier_releases() -> None:
    catalog = load_catalog()
    settings = replace(PRESETS["standard"], roles_per_group=1, traits=2)
    plan = plan_rollouts(catalog, settings, select_roles(catalog, settings, None), select_traits(catalog, settings))
    first = plan[0]
    assert first.id == f"{first.role}|p0|{catalog.questions[0].id}" and first.kind == "default"
    assert not any("|s" in item.id for item in plan)
    assert {item.question_id for item in plan if item.kind == "trait"} == \
        {q.id for q in catalog.questions[: settings.questions]}
