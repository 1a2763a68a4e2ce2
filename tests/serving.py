"""A real persona-axis server on 127.0.0.1 (ephemeral port) around a tiny random model, its axis and capping
config: for the server, client and browser tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from conftest import tiny_model

from persona_axis.apps.server import PersonaServer, ServerLimits
from persona_axis.apps.server_http import build_app
from persona_axis.apps.server_run import BackgroundServer
from persona_axis.axis import Axis
from persona_axis.control.capping import CapLayer, CappingConfig, Experiment
from persona_axis.model.loading import LoadedModel, wrap_model

EXPERIMENT = "layers_1:3-p0.25"


def tiny_axis_and_config(lm: LoadedModel) -> tuple[Axis, CappingConfig]:
    """A random axis and one experiment capping layers 1-2 at a floor the random model sits below (the cap acts)."""
    torch.manual_seed(7)
    axis = Axis(torch.randn(lm.n_layers, lm.hidden_size))
    caps = [CapLayer(layer, axis.unit(layer), 0.5) for layer in (1, 2)]
    config = CappingConfig("tiny-llama", "", lm.n_layers, lm.hidden_size, "test", "test",
                           {EXPERIMENT: Experiment(EXPERIMENT, caps)})
    return axis, config


def tiny_lm(tokenizer: Any) -> LoadedModel:
    return wrap_model(tiny_model("llama"), tokenizer, name="tiny-llama")


@contextmanager
def running_server(tokenizer: Any, limits: ServerLimits | None = None) -> Iterator[tuple[str, PersonaServer]]:
    """(base URL without /v1, the PersonaServer) for a server running in a thread until the block ends."""
    lm = tiny_lm(tokenizer)
    axis, config = tiny_axis_and_config(lm)
    server = PersonaServer(lm, axis, config, limits or ServerLimits())
    with BackgroundServer(build_app(server)) as background:
        yield background.url, server
