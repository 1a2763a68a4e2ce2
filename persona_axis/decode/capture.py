"""Recorders: read the residual stream during a forward pass without changing it."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from persona_axis.decode.hooks import LayerOp, layer_hooks
from persona_axis.model.loading import LoadedModel
from persona_axis.vectors import unit_vector


class StepMeanRecorder:
    """Per-layer running means of the last position's hidden state, over the decode steps a mask selects.

    During generation each decode step feeds one token per sequence; the layer outputs at that
    position are the activations of that token. Hooks copy them into a float32 staging buffer
    [layers, batch, hidden]; `commit(mask)` then adds the selected rows to the running sums in one
    operation. `means()` returns [batch, layers, hidden] float32.
    """

    def __init__(self, layers: Sequence[int], batch: int, hidden: int, device: torch.device) -> None:
        self.layers = list(layers)
        self._staging = torch.zeros(len(self.layers), batch, hidden, dtype=torch.float32, device=device)
        self._sums = torch.zeros_like(self._staging)
        self.counts = torch.zeros(batch, dtype=torch.float32, device=device)

    def ops(self) -> dict[int, list[LayerOp]]:
        """Hook operations, one per recorded layer."""
        return {layer: [self._copier(slot)] for slot, layer in enumerate(self.layers)}

    def _copier(self, slot: int) -> LayerOp:
        staging = self._staging[slot]

        def copy_last(hidden: Tensor) -> None:
            staging.copy_(hidden[:, -1])

        return copy_last

    def commit(self, mask: Tensor) -> None:
        """Add the staged step to the sums for sequences where `mask` [batch] is true."""
        weights = mask.to(self._sums.dtype)
        self._sums.addcmul_(self._staging, weights[None, :, None])
        self.counts += weights

    def means(self) -> Tensor:
        """[batch, layers, hidden] float32 means; rows with no recorded step are zero."""
        return (self._sums / self.counts.clamp_min(1.0)[None, :, None]).transpose(0, 1).contiguous()

    def keep(self, rows: Tensor) -> None:
        """Keep only the batch rows listed in `rows` [k] long, in that order (call ops() again for the new batch)."""
        self._staging = self._staging[:, rows].contiguous()
        self._sums, self.counts = self._sums[:, rows], self.counts[rows]

    def resize(self, batch: int) -> None:
        """Room for `batch` rows (new ones empty), keeping the first rows (call ops() again for the new batch)."""
        layers, rows, hidden = self._sums.shape
        keep = min(rows, batch)
        sums, counts = self._sums.new_zeros(layers, batch, hidden), self.counts.new_zeros(batch)
        sums[:, :keep], counts[:keep] = self._sums[:, :keep], self.counts[:keep]
        self._staging, self._sums, self.counts = torch.zeros_like(sums), sums, counts

    def pop(self, row: int) -> Tensor:
        """Row `row`'s means [layers, hidden] float32 (zero with no recorded step); the row then starts afresh."""
        means = self._sums[:, row] / self.counts[row].clamp_min(1.0)
        self._sums[:, row] = 0.0
        self.counts[row] = 0.0
        return means


class MaskedMeanRecorder:
    """Per-layer means over the positions a [batch, seq] mask selects, within one forward pass.

    `means()` returns [batch, layers, hidden] float32. With `norms=True` it also sums each selected position's L2
    norm: `norms()` returns [batch, layers] float32, the typical size of one token's residual stream (not the norm
    of the mean, which averaging shrinks).
    """

    def __init__(self, layers: Sequence[int], mask: Tensor, norms: bool = False) -> None:
        self.layers = list(layers)
        self.mask = mask.float()
        self.with_norms = norms
        self._sums: dict[int, Tensor] = {}
        self._norm_sums: dict[int, Tensor] = {}

    def ops(self) -> dict[int, list[LayerOp]]:
        return {layer: [self._summer(layer)] for layer in self.layers}

    def _summer(self, layer: int) -> LayerOp:
        def record(hidden: Tensor) -> None:
            # .to(): on a device-mapped model, layers live on different devices; the sums gather on the mask's.
            mask = self.mask.to(hidden.device)
            self._sums[layer] = torch.einsum("bth,bt->bh", hidden.float(), mask).to(self.mask.device)
            if self.with_norms:
                self._norm_sums[layer] = (hidden.float().norm(dim=-1) * mask).sum(1).to(self.mask.device)

        return record

    def _counts(self) -> Tensor:
        return self.mask.sum(1).clamp_min(1.0)[:, None]

    def means(self) -> Tensor:
        return torch.stack([self._sums[layer] / self._counts() for layer in self.layers], dim=1)

    def norms(self) -> Tensor:
        if not self.with_norms:
            raise ValueError("this recorder was made with norms=False")
        return torch.stack([self._norm_sums[layer] for layer in self.layers], dim=1) / self._counts()


def _padded_batches(lm: LoadedModel, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
                    batch_size: int) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Batches of prompt+response, left-padded: (ids, attention mask, response mask), each [batch, width]."""
    pad = lm.tokenizer.pad_token_id
    for start in range(0, len(prompt_ids), batch_size):
        prompts, responses = prompt_ids[start : start + batch_size], response_ids[start : start + batch_size]
        seqs = [list(p) + list(r) for p, r in zip(prompts, responses)]
        width = max(len(s) for s in seqs)
        ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs], device=lm.device)
        attention = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=lm.device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in responses], device=lm.device)
        yield ids, attention, mask


def _forward(lm: LoadedModel, ids: Tensor, attention: Tensor) -> None:
    lm.model.base_model(input_ids=ids, attention_mask=attention, position_ids=(attention.cumsum(-1) - 1).clamp_min(0))


def _recorded(lm: LoadedModel, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
              layers: Sequence[int], batch_size: int, norms: bool) -> Iterator[MaskedMeanRecorder]:
    """One teacher-forced pass per batch of prompt+response; yields each batch's recorder of the response tokens."""
    for ids, attention, mask in _padded_batches(lm, prompt_ids, response_ids, batch_size):
        recorder = MaskedMeanRecorder(layers, mask, norms=norms)
        with layer_hooks(lm.layers, recorder.ops()):
            _forward(lm, ids, attention)
        yield recorder


@torch.inference_mode()
def response_means_by_forward(
    lm: LoadedModel,
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    layers: Sequence[int],
    batch_size: int = 16,
) -> Tensor:
    """Per-layer mean activations over response tokens from a separate forward pass over prompt+response.

    This is the two-pass way (generate, then run the texts again); generate.generate captures
    the same means in one pass. Returns [n, len(layers), hidden] float32.
    """
    return torch.cat([r.means().cpu() for r in _recorded(lm, prompt_ids, response_ids, layers, batch_size, False)])


@torch.inference_mode()
def response_means_and_norms_by_forward(
    lm: LoadedModel,
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    layers: Sequence[int],
    batch_size: int = 16,
) -> tuple[Tensor, Tensor]:
    """As `response_means_by_forward` (teacher-forced), and in the same pass the mean L2 norm of the response
    tokens' hidden states. Returns means [n, len(layers), hidden] and token norms [n, len(layers)], float32."""
    recorders = list(_recorded(lm, prompt_ids, response_ids, layers, batch_size, True))
    return torch.cat([r.means().cpu() for r in recorders]), torch.cat([r.norms().cpu() for r in recorders])


class StepProjectionRecorder:
    """Per-token projections on a unit direction at one layer, for the decode steps a mask selects.

    The live monitor: each decode step costs one [batch, hidden] x [hidden] product. `values[i]`
    lists the projections of row i's recorded tokens, in order; `last` [batch] holds the latest step's.
    """

    def __init__(self, layer: int, direction: Tensor, batch: int, device: torch.device) -> None:
        self.layer = layer
        self._unit = unit_vector(direction.float(), "watched direction").to(device)
        self._staging = torch.zeros(batch, dtype=torch.float32, device=device)
        self.values: list[list[float]] = [[] for _ in range(batch)]
        self.last: Tensor = self._staging

    def ops(self) -> dict[int, list[LayerOp]]:
        def project_last(hidden: Tensor) -> None:
            if hidden.device == self._staging.device:
                torch.mv(hidden[:, -1].float(), self._unit, out=self._staging)
            else:  # a layer on another shard of a device-mapped model
                self._staging.copy_(hidden[:, -1].float() @ self._unit.to(hidden.device))

        return {self.layer: [project_last]}

    def commit(self, mask: Tensor) -> None:
        """Keep this step's projections for sequences where `mask` [batch] is true."""
        self.last = self._staging.clone()
        for row, (value, keep) in enumerate(zip(self.last.tolist(), mask.tolist())):
            if keep:
                self.values[row].append(value)

    def keep(self, rows: Tensor) -> None:
        """Keep only the batch rows listed in `rows` [k] long, in that order (call ops() again for the new batch)."""
        self._staging = self._staging[rows]
        self.last = self.last[rows]
        self.values = [self.values[row] for row in rows.tolist()]

    def pop(self, row: int) -> list[float]:
        """Row `row`'s projections so far; the row then starts afresh."""
        values, self.values[row] = self.values[row], []
        return values
