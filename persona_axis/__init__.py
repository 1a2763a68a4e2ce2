"""persona-axis: find, monitor and cap the Assistant Axis of a chat model."""

from persona_axis.capture import response_means_by_forward
from persona_axis.errors import PersonaAxisError
from persona_axis.generation import GenerationResult, generate
from persona_axis.models import LoadedModel, load_model, wrap_model
from persona_axis.steering import Ablation, Addition, Cap, mean_ablation, steer

__all__ = [
    "Ablation",
    "Addition",
    "Cap",
    "GenerationResult",
    "LoadedModel",
    "PersonaAxisError",
    "generate",
    "load_model",
    "mean_ablation",
    "response_means_by_forward",
    "steer",
    "wrap_model",
]
