"""Harm and capability evaluation: eval sets built from shipped data packages, harm judges, capability checks,
the eval run directory and its report."""

from persona_axis.evals.conditions import Condition, pc1_axis, plan_conditions
from persona_axis.evals.harm_judges import HarmItem, HarmJudge, HarmVerdict, make_harm_judge
from persona_axis.evals.harm_set import EvalItem, EvalSet, build_eval_set, read_eval_set, write_eval_set
from persona_axis.evals.report import eval_report
from persona_axis.evals.report_html import write_eval_report
from persona_axis.evals.run import EvalSettings, eval_preset, run_eval

__all__ = ["Condition", "EvalItem", "EvalSet", "EvalSettings", "HarmItem", "HarmJudge", "HarmVerdict",
           "build_eval_set", "eval_preset", "eval_report", "make_harm_judge", "pc1_axis", "plan_conditions",
           "read_eval_set", "run_eval", "write_eval_report", "write_eval_set"]
