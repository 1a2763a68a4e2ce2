"""persona-axis: find, monitor and cap the Assistant Axis of a chat model."""

from persona_axis.axis import Axis, compute_axis, load_axis, save_axis
from persona_axis.decode.capture import response_means_by_forward
from persona_axis.decode.generate import GenerationResult, generate
from persona_axis.decode.interventions import Ablation, Addition, Cap, mean_ablation, steer
from persona_axis.errors import PersonaAxisError
from persona_axis.model.loading import LoadedModel, load_model, wrap_model

__all__ = [
    "Ablation",
    "Addition",
    "Axis",
    "Cap",
    "GenerationResult",
    "LoadedModel",
    "PersonaAxisError",
    "compute_axis",
    "generate",
    "load_axis",
    "load_model",
    "mean_ablation",
    "response_means_by_forward",
    "save_axis",
    "steer",
    "wrap_model",
]
