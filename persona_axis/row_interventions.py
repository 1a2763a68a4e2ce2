"""Interventions and projections that differ from batch row to batch row, as tensors.

A serving batch holds requests with different caps, steering and watched layers. Each layer that
some row intervenes on keeps, per slot: a cap's unit axis [slots, hidden], floor [slots] and
on/off flag [slots], and a steering vector [slots, hidden] with its flag. One hook per layer then
applies every row's own settings in a few batched operations; a row whose flags are off gets its
hidden states back unchanged (torch.where, not an addition of zero).

Order inside a layer: the watched projection is read first (the value the cap sees), then the cap
raises the row to its floor, then the steering vector is added. Every forward pass names the slots
its batch rows belong to (`for_rows`): the decode step feeds every slot, a prefill only the entering ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from persona_axis.hooks import LayerOp


@dataclass(frozen=True)
class RowSettings:
    """One request's interventions and watch. caps: {layer: (unit axis [hidden], floor)}; additions:
    {layer: vector [hidden] added at every position}; watch: (layer, unit direction [hidden]) or None."""

    caps: Mapping[int, tuple[Tensor, float]]
    additions: Mapping[int, Tensor]
    watch: tuple[int, Tensor] | None


def _grown(t: Tensor, slots: int) -> Tensor:
    """t [slots', ...] padded with zeros (False) to [slots, ...] or cut to it."""
    out = t.new_zeros(slots, *t.shape[1:])
    n = min(slots, t.shape[0])
    out[:n] = t[:n]
    return out


class _LayerTable:
    """Per-slot cap and steering settings at one layer."""

    def __init__(self, slots: int, hidden: int, device: torch.device) -> None:
        self.cap_units = torch.zeros(slots, hidden, device=device)
        self.floors = torch.zeros(slots, device=device)
        self.capped = torch.zeros(slots, dtype=torch.bool, device=device)
        self.additions = torch.zeros(slots, hidden, device=device)
        self.added = torch.zeros(slots, dtype=torch.bool, device=device)

    def tensors(self) -> list[str]:
        return ["cap_units", "floors", "capped", "additions", "added"]

    def remap(self, slots: int | None = None, keep: Tensor | None = None) -> None:
        for name in self.tensors():
            t = getattr(self, name)
            setattr(self, name, t[keep] if keep is not None else _grown(t, slots or 0))

    def clear(self, slot: int) -> None:
        self.capped[slot] = False
        self.added[slot] = False


class RowInterventions:
    """Per-slot caps, steering and watched projections for a batch of `slots` rows (see the module doc).

    After each forward pass: `projections` [rows] float32 holds each row's watched projection at its
    last position (0 for rows that watch nothing), and `raised[layer]` [rows] bool which rows that
    layer's cap raised (during counted passes only, see `counting`).
    """

    def __init__(self, slots: int, hidden: int, device: torch.device) -> None:
        self.slots, self.hidden, self.device = slots, hidden, device
        self.tables: dict[int, _LayerTable] = {}
        self.watch_layer = torch.full((slots,), -1, dtype=torch.long, device=device)
        self.watch_units = torch.zeros(slots, hidden, device=device)
        self.rows: Tensor | None = None  # slots of the current forward pass's rows (None: every slot in order)
        self.counting = False
        self.projections = torch.zeros(slots, device=device)
        self.raised: dict[int, Tensor] = {}

    def set_row(self, slot: int, settings: RowSettings) -> None:
        """Give `slot` a request's settings (replacing whatever it held)."""
        self.clear_row(slot)
        for layer, (unit, floor) in settings.caps.items():
            table = self._table(layer)
            table.cap_units[slot], table.floors[slot], table.capped[slot] = unit.to(self.device), floor, True
        for layer, vector in settings.additions.items():
            table = self._table(layer)
            table.additions[slot], table.added[slot] = vector.to(self.device), True
        if settings.watch is not None:
            self.watch_layer[slot], self.watch_units[slot] = settings.watch[0], settings.watch[1].to(self.device)

    def clear_row(self, slot: int) -> None:
        for table in self.tables.values():
            table.clear(slot)
        self.watch_layer[slot] = -1

    def resize(self, slots: int) -> None:
        """Room for `slots` slots (new ones hold nothing), keeping the first slots' settings."""
        for table in self.tables.values():
            table.remap(slots=slots)
        self.watch_layer = torch.cat([self.watch_layer[:slots], self.watch_layer.new_full(
            (max(0, slots - self.slots),), -1)])
        self.watch_units = _grown(self.watch_units, slots)
        self.slots = slots

    def keep(self, keep: Tensor) -> None:
        """Keep only the slots listed in `keep` [k] long, in that order."""
        for table in self.tables.values():
            table.remap(keep=keep)
        self.watch_layer, self.watch_units = self.watch_layer[keep], self.watch_units[keep]
        self.slots = int(keep.shape[0])

    def _table(self, layer: int) -> _LayerTable:
        if layer not in self.tables:
            self.tables[layer] = _LayerTable(self.slots, self.hidden, self.device)
        return self.tables[layer]

    def for_rows(self, rows: Tensor | None, counting: bool) -> dict[int, list[LayerOp]]:
        """Hook operations for a forward pass whose batch rows are the slots `rows` [b] long (None: all slots).

        counting: record which rows each cap raised (decode steps; one position per row).
        """
        self.rows, self.counting, self.raised = rows, counting, {}
        self.projections = torch.zeros(self.slots if rows is None else rows.shape[0], device=self.device)
        ops: dict[int, list[LayerOp]] = {}
        watched = self._pick(self.watch_layer)
        for layer in sorted(set(watched[watched >= 0].tolist())):
            ops.setdefault(layer, []).append(self._watcher(layer))
        for layer, table in self.tables.items():
            if bool(self._pick(table.capped).any()) or bool(self._pick(table.added).any()):
                ops.setdefault(layer, []).append(self._intervener(layer, table))
        return ops

    def _pick(self, t: Tensor) -> Tensor:
        return t if self.rows is None else t[self.rows]

    def _watcher(self, layer: int) -> LayerOp:
        watching, units = self._pick(self.watch_layer) == layer, self._pick(self.watch_units)

        def read(hidden: Tensor) -> None:
            values = (hidden[:, -1].float() * units).sum(-1)
            self.projections = torch.where(watching, values, self.projections)

        return read

    def _intervener(self, layer: int, table: _LayerTable) -> LayerOp:
        units, floors, capped = self._pick(table.cap_units), self._pick(table.floors), self._pick(table.capped)
        additions, added = self._pick(table.additions), self._pick(table.added)
        any_cap, any_addition = bool(capped.any()), bool(added.any())

        def apply(hidden: Tensor) -> Tensor:
            out = hidden
            if any_cap:
                raise_by = (floors[:, None] - torch.einsum("bsh,bh->bs", hidden.float(), units)).clamp_min(0.0)
                if self.counting:
                    self.raised[layer] = (raise_by[:, -1] > 0) & capped
                raised = hidden + raise_by.to(hidden.dtype)[..., None] * units.to(hidden.dtype)[:, None, :]
                out = torch.where(capped[:, None, None], raised, out)
            if any_addition:
                out = torch.where(added[:, None, None], out + additions.to(hidden.dtype)[:, None, :], out)
            return out

        return apply
