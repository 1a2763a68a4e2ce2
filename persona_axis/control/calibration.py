"""Calibrating caps from a run: floors at projection percentiles or at the default mean, and whether the caps bind.

A floor τ_l at layer l is a percentile of the projections of a run's stored response means on
the unit axis â_l, or (DEFAULT_MEAN) the mean projection of the run's default-Assistant
replies. Which rollouts count is the population; the default, "roles+traits", is the paper's:
every role and trait rollout, where the 25th percentile is meant to land near the default mean.
Every cap records that default mean and its percentile rank in the population
(`default_percentile`), so how near it lands is measured. `measure_engagement` then generates a
sample of default and of role-play replies with each experiment's caps on, and records the share
of generated tokens each cap raised: a cap that never engages changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from torch import Tensor
from tqdm.auto import tqdm

from persona_axis.axis import Axis, load_axis
from persona_axis.catalog import Catalog, default_conversations, role_play_conversations
from persona_axis.control.capping import DEFAULT_MEAN, CapLayer, CappingConfig, Experiment, experiment_id
from persona_axis.decode.generate import generate
from persona_axis.decode.interventions import Cap
from persona_axis.errors import PersonaAxisError
from persona_axis.measurement import check_layer_index
from persona_axis.model.loading import LoadedModel, Message
from persona_axis.store import RunLayout, RunStore

POPULATIONS = ("roles+traits", "all", "roles", "traits", "default", "roles_score3")
_KINDS = {"roles+traits": {"role", "trait"}, "all": {"default", "role", "trait"}, "roles": {"role"},
          "traits": {"trait"}, "default": {"default"}, "roles_score3": {"role"}}


def _run_judge(run_dir: Path) -> str:
    """The judge id the run's vectors step used (metadata only; the tensors are not read)."""
    path = RunLayout(run_dir).require_vectors("population 'roles_score3' (the vectors name the run's judge)")
    import json

    with safe_open(str(path), framework="pt") as f:
        return str(json.loads((f.metadata() or {})["summary"])["judge"])


def population_ids(run_dir: Path, population: str) -> set[str]:
    """Record ids of the rollouts in a population (see `run_projections`)."""
    if population not in POPULATIONS:
        raise PersonaAxisError(f"unknown population {population!r}: choose one of {', '.join(POPULATIONS)}")
    store = RunStore(run_dir)
    ids = {i for i, kind in store.rollout_kinds().items() if kind in _KINDS[population]}
    if population != "roles_score3":
        return ids
    scores = store.scores_by(_run_judge(run_dir), ids)
    return {i for i, score in scores.items() if score == 3}


def run_projections(run_dir: str | Path, axis: Axis, layers: Sequence[int], population: str = "roles+traits") -> Tensor:
    """Projections of a run's response means on the unit axis -> [n, len(layers)] float32.

    population: "roles+traits" (role and trait rollouts), "all" (also default ones), "roles",
    "traits", "default", or "roles_score3" (role rollouts the run's judge scored 3). Chunks are
    read one at a time, in file order.
    """
    root, layers = Path(run_dir), list(layers)
    if not layers:
        raise PersonaAxisError("no layers to project at: give at least one")
    for layer in layers:
        check_layer_index(layer, axis.n_layers, "layer")
    wanted = population_ids(root, population)
    units = torch.stack([axis.unit(layer) for layer in layers])  # [k, hidden]
    parts = []
    for ids, means in RunStore(root).activation_chunks():
        if tuple(means.shape[1:]) != (axis.n_layers, axis.hidden_size):
            raise PersonaAxisError(f"{root} holds activations {tuple(means.shape[1:])} that do not fit the axis "
                                   f"[{axis.n_layers}, {axis.hidden_size}]: use this run's own axis")
        rows = [row for row, record_id in enumerate(ids) if record_id in wanted]
        parts.append(torch.einsum("nkh,kh->nk", means[rows][:, layers].float(), units))
    projections = torch.cat(parts) if parts else torch.zeros(0, len(layers))
    if len(projections) == 0:
        raise PersonaAxisError(f"{root} has no stored activations of population {population!r}: "
                               "finish the run's rollouts or choose another population")
    return projections


def percentile_rank(values: Tensor, x: float) -> float:
    """The p in [0, 1] with torch.quantile(values, p) == x (linear interpolation), clipped at the ends.

    Sorted values v_0 ≤ … ≤ v_{n−1} sit at p = k / (n − 1); x between two of them gets the
    interpolated p, so percentile_rank(v, quantile(v, p)) == p for distinct values.
    """
    ordered = torch.sort(values.double()).values.numpy()
    return float(np.interp(x, ordered, np.linspace(0.0, 1.0, len(ordered))))


def calibrate(
    run_dir: str | Path,
    layers: Sequence[range] | range,
    percentiles: Sequence[float | str],
    population: str = "roles+traits",
    *,
    axis: Axis | None = None,
) -> CappingConfig:
    """One experiment per (layer range, percentile): floor τ_l = quantile of the projections at layer l.

    axis: the axis to project on (default: the run's axis.safetensors). Ranges are half-open and
    contiguous; percentiles lie strictly between 0 and 1, or are DEFAULT_MEAN ("mean"): τ_l = the
    mean projection of the run's default-Assistant replies at layer l. Each cap records that
    `default_mean` and `default_percentile`, its percentile rank among the population's
    projections at the layer (percentile_rank).
    """
    blocks = [layers] if isinstance(layers, range) else list(layers)
    if not percentiles or any(p != DEFAULT_MEAN and not (isinstance(p, (int, float)) and 0 < p < 1)
                              for p in percentiles):
        raise PersonaAxisError(f"percentiles must lie strictly between 0 and 1 (e.g. 0.25) or be {DEFAULT_MEAN!r}, "
                               f"got {list(percentiles)}")
    if not blocks or any(len(b) == 0 or b.step != 1 for b in blocks):
        raise PersonaAxisError(f"layer ranges must be non-empty and contiguous, got {blocks}")
    axis = load_axis(run_dir) if axis is None else axis
    used = sorted({layer for block in blocks for layer in block})
    projections = run_projections(run_dir, axis, used, population)
    default_mean = run_projections(run_dir, axis, used, "default").mean(0)
    stats = {layer: {"default_mean": float(default_mean[k]),
                     "default_percentile": percentile_rank(projections[:, k], float(default_mean[k]))}
             for k, layer in enumerate(used)}
    experiments = {}
    for block in blocks:
        for p in percentiles:
            caps = [CapLayer(layer, axis.unit(layer), stats[layer]["default_mean"] if p == DEFAULT_MEAN
                             else float(torch.quantile(projections[:, used.index(layer)], float(p))),
                             dict(stats[layer]))
                    for layer in block]
            eid = experiment_id(block.start, block.stop, p)
            experiments[eid] = Experiment(eid, caps)
    return CappingConfig(axis.metadata.get("model", ""), axis.metadata.get("model_hash", ""), axis.n_layers,
                         axis.hidden_size, str(run_dir), population, experiments)


def engagement_samples(catalog: Catalog, n_default: int, n_roles: int) -> dict[str, list[list[Message]]]:
    """Conversations to measure engagement on: {"default": default prompts × questions, "roles": role-play prompts}."""
    return {"default": default_conversations(catalog, n_default),
            "roles": [c for _, c in role_play_conversations(catalog, n_roles, 1)]}


def measure_engagement(lm: LoadedModel, config: CappingConfig, samples: dict[str, list[list[Message]]],
                       max_new_tokens: int = 48, progress: bool = False) -> None:
    """Generate each sample with each experiment's caps on; store per cap `engaged_<sample>` in its stats.

    engaged_<sample> is the share of generated-token positions at which the cap raised the
    projection (greedy decoding, so the figure is reproducible).
    """
    config.check_model(lm)
    for experiment in tqdm(list(config.experiments.values()), desc="engagement", unit="experiment",
                           disable=not progress):
        for name, conversations in samples.items():
            caps = {cap.layer: Cap(cap.axis, cap.floor, track=True) for cap in experiment.caps}
            generate(lm, conversations, max_new_tokens=max_new_tokens, capture=False, interventions=caps,
                     batch_size=len(conversations))
            for cap in experiment.caps:
                cap.stats[f"engaged_{name}"] = caps[cap.layer].engaged()
