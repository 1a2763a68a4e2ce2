"""Interventions and projections that differ from batch row to batch row, as tensors.

A serving batch holds requests with different caps, steering, ablations and watched layers. Each
layer that some row intervenes on keeps lanes: a lane holds one intervention kind's settings for
every slot (its `row_params` stacked to [slots, ...]), an on/off flag [slots] and the positions
it acts on [slots]; a row with two interventions of one kind at a layer uses two lanes. One hook
per layer then applies every lane with the kind's own `apply_rows` (decode/interventions.py: the arithmetic
is the hook form's), and a row whose flag is off gets its hidden states back unchanged
(torch.where, not an addition of zero). Nothing here depends on which kinds exist.

Order inside a layer: the watched projection is read first (the value the interventions see), then
the lanes act in their kind's rank order (ablations, caps, additions), as in the hook form. Every
forward pass names the slots its batch rows belong to (`for_rows`): the decode step feeds every
slot, a prefill only the entering ones.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import Tensor

from persona_axis.decode.hooks import LayerOp
from persona_axis.decode.interventions import POSITIONS, Intervention, layer_lists, position_mask
from persona_axis.errors import PersonaAxisError


@dataclass(frozen=True)
class Guard:
    """Interventions held back while a reply stays itself: they start acting once the running mean of the
    watched projection over the reply's tokens falls below `threshold` (from its `min_tokens`-th token on),
    and act for the rest of the reply."""

    threshold: float
    interventions: Mapping[int, Sequence[Intervention]]
    min_tokens: int = 4

    def __post_init__(self) -> None:
        if self.min_tokens < 1 or not self.interventions:
            raise PersonaAxisError("a guard needs interventions to turn on and min_tokens >= 1")

    def acting_with(self, interventions: Mapping[int, Intervention | Sequence[Intervention]]) -> dict[int, list[Intervention]]:
        """{layer: `interventions` there, then this guard's}: what acts once the guard has fired."""
        merged = {layer: list(items) for layer, items in layer_lists(interventions).items()}
        for layer, items in layer_lists(self.interventions).items():
            merged.setdefault(layer, []).extend(items)
        return merged


@dataclass(frozen=True)
class RowSettings:
    """One request's interventions {layer: [intervention, ...]} (any kind of decode/interventions.py), its watch:
    (layer, unit direction [hidden]) whose projection every token reports, or None, and an optional guard
    (which needs the watch: it reads the watched projection)."""

    interventions: Mapping[int, Sequence[Intervention]] = field(default_factory=dict)
    watch: tuple[int, Tensor] | None = None
    guard: Guard | None = None

    def __post_init__(self) -> None:
        if self.guard is not None and self.watch is None:
            raise PersonaAxisError("a guard reads the watched projection: give the request a watch")

    def guarded(self) -> RowSettings:
        """These settings with the guard's interventions acting beside the others (and no guard left)."""
        assert self.guard is not None
        return RowSettings(self.guard.acting_with(self.interventions), self.watch)

    @property
    def engaged_layers(self) -> list[int]:
        """The layers whose interventions report engagement (caps): each token says whether they changed it."""
        return sorted(layer for layer, items in self.interventions.items()
                      if any(type(item).counts_engagement for item in items))

    @cached_property
    def prefix_key(self) -> Hashable:
        """What a prompt prefix's keys and values depend on besides its tokens: the interventions acting at every
        position ("all"), by layer, kind and settings. "last" and "reply" ones never act inside a prefix."""
        return tuple((layer, type(item).name, tuple((name, value.detach().cpu().numpy().tobytes())
                                                    for name, value in sorted(item.row_params().items())))
                     for layer, items in sorted(layer_lists(self.interventions).items())
                     for item in items if item.positions == "all")

    @property
    def acts_only_at_all_positions(self) -> bool:
        """True when every intervention acts at every position, so a reply's keys and values equal what
        prefilling the same tokens would give (a finished conversation can seed the next turn's prefix)."""
        return all(item.positions == "all" for items in layer_lists(self.interventions).values() for item in items)


def _grown(t: Tensor, slots: int) -> Tensor:
    """t [slots', ...] padded with zeros (False) to [slots, ...] or cut to it."""
    out = t.new_zeros(slots, *t.shape[1:])
    n = min(slots, t.shape[0])
    out[:n] = t[:n]
    return out


class _Lane:
    """One kind's settings for every slot at one layer: params {name: [slots, ...]}, on [slots] bool,
    positions [slots] long (indices into interventions.POSITIONS)."""

    def __init__(self, kind: type[Intervention], template: Mapping[str, Tensor], slots: int,
                 device: torch.device) -> None:
        self.kind = kind
        self.params = {name: torch.zeros(slots, *t.shape, device=device) for name, t in template.items()}
        self.on = torch.zeros(slots, dtype=torch.bool, device=device)
        self.positions = torch.zeros(slots, dtype=torch.long, device=device)

    def set(self, slot: int, params: Mapping[str, Tensor], positions: int) -> None:
        for name, value in params.items():
            self.params[name][slot] = value.to(self.params[name].device)
        self.on[slot], self.positions[slot] = True, positions

    def remap(self, slots: int | None = None, keep: Tensor | None = None) -> None:
        pick = (lambda t: t[keep]) if keep is not None else (lambda t: _grown(t, slots or 0))
        self.params = {name: pick(t) for name, t in self.params.items()}
        self.on, self.positions = pick(self.on), pick(self.positions)


class RowInterventions:
    """Per-slot interventions and watched projections for a batch of `slots` rows (see the module doc).

    After each forward pass: `projections` [rows] float32 holds each row's watched projection at its
    last position (0 for rows that watch nothing), and `raised[layer]` [rows] bool which rows that
    layer's engagement-counting interventions changed (during counted passes only, see `for_rows`).
    """

    def __init__(self, slots: int, hidden: int, device: torch.device) -> None:
        self.slots, self.hidden, self.device = slots, hidden, device
        self.lanes: dict[int, list[_Lane]] = {}
        self.watch_layer = torch.full((slots,), -1, dtype=torch.long, device=device)
        self.watch_units = torch.zeros(slots, hidden, device=device)
        self.rows: Tensor | None = None  # slots of the current forward pass's rows (None: every slot in order)
        self.counting = False
        self.projections = torch.zeros(slots, device=device)
        self.raised: dict[int, Tensor] = {}

    def set_row(self, slot: int, settings: RowSettings) -> None:
        """Give `slot` a request's settings (replacing whatever it held)."""
        self.clear_row(slot)
        for layer, items in layer_lists(settings.interventions).items():
            used: dict[type[Intervention], int] = {}
            for item in items:
                kind = type(item)
                params = item.row_params()
                self._lane(layer, kind, used.get(kind, 0), params).set(slot, params, POSITIONS.index(item.positions))
                used[kind] = used.get(kind, 0) + 1
        if settings.watch is not None:
            self.watch_layer[slot], self.watch_units[slot] = settings.watch[0], settings.watch[1].to(self.device)

    def clear_row(self, slot: int) -> None:
        for lanes in self.lanes.values():
            for lane in lanes:
                lane.on[slot] = False
        self.watch_layer[slot] = -1

    def resize(self, slots: int) -> None:
        """Room for `slots` slots (new ones hold nothing), keeping the first slots' settings."""
        for lanes in self.lanes.values():
            for lane in lanes:
                lane.remap(slots=slots)
        self.watch_layer = torch.cat([self.watch_layer[:slots], self.watch_layer.new_full(
            (max(0, slots - self.slots),), -1)])
        self.watch_units = _grown(self.watch_units, slots)
        self.slots = slots

    def keep(self, keep: Tensor) -> None:
        """Keep only the slots listed in `keep` [k] long, in that order."""
        for lanes in self.lanes.values():
            for lane in lanes:
                lane.remap(keep=keep)
        self.watch_layer, self.watch_units = self.watch_layer[keep], self.watch_units[keep]
        self.slots = int(keep.shape[0])

    def _lane(self, layer: int, kind: type[Intervention], index: int, template: Mapping[str, Tensor]) -> _Lane:
        """The `index`-th lane of `kind` at `layer`, made (in rank order among the layer's lanes) if missing."""
        lanes = self.lanes.setdefault(layer, [])
        same = [lane for lane in lanes if lane.kind is kind]
        if index < len(same):
            return same[index]
        lane = _Lane(kind, template, self.slots, self.device)
        lanes.append(lane)
        lanes.sort(key=lambda lane: lane.kind.rank)  # stable: a kind's lanes keep their order
        return lane

    def for_rows(self, rows: Tensor | None, counting: bool, prompt_ends: bool = True) -> dict[int, list[LayerOp]]:
        """Hook operations for a forward pass whose batch rows are the slots `rows` [b] long (None: all slots).

        counting: a decode step (one generated token per row): record which rows each layer's
        engagement-counting interventions changed; any other pass feeds prompt tokens, however few.
        prompt_ends: a prompt pass whose last column is each prompt's last token (False for the
        earlier chunks of a chunked prefill).
        """
        self.rows, self.counting, self.raised = rows, counting, {}
        self.projections = torch.zeros(self.slots if rows is None else rows.shape[0], device=self.device)
        ops: dict[int, list[LayerOp]] = {}
        watched = self._pick(self.watch_layer)
        for layer in sorted(set(watched[watched >= 0].tolist())):
            ops.setdefault(layer, []).append(self._watcher(layer))
        for layer, lanes in self.lanes.items():
            active = [lane for lane in lanes if bool(self._pick(lane.on).any())]
            if active:
                ops.setdefault(layer, []).append(self._intervener(layer, active, prompt_ends))
        return ops

    def _pick(self, t: Tensor) -> Tensor:
        return t if self.rows is None else t[self.rows]

    def _watcher(self, layer: int) -> LayerOp:
        watching, units = self._pick(self.watch_layer) == layer, self._pick(self.watch_units)

        def read(hidden: Tensor) -> None:
            values = (hidden[:, -1].float() * units).sum(-1)
            self.projections = torch.where(watching, values, self.projections)

        return read

    def _intervener(self, layer: int, lanes: list[_Lane], prompt_ends: bool) -> LayerOp:
        picked = [(lane.kind, {name: self._pick(t) for name, t in lane.params.items()}, self._pick(lane.on),
                   self._pick(lane.positions)) for lane in lanes]

        def apply(hidden: Tensor) -> Tensor:
            out = hidden
            for kind, params, on, positions in picked:
                new, changed = kind.apply_rows(out, params)
                mask = on[:, None] & position_mask(positions, hidden.shape[1], prompt_ends, self.counting)  # [b, s]
                out = torch.where(mask[..., None], new, out)
                if self.counting and changed is not None:
                    flags = (changed & mask)[:, -1]
                    self.raised[layer] = self.raised[layer] | flags if layer in self.raised else flags
            return out

        return apply
