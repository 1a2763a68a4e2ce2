"""Judges of role adherence: an OpenAI-compatible HTTP judge and an offline judge."""

from persona_axis.judges.base import SCORES, Judge, JudgeItem, Verdict

__all__ = ["SCORES", "Judge", "JudgeItem", "Verdict"]
