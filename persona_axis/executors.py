"""Where a run's rollouts are generated: the executor interface and the local executor (this process, the default).

The pipeline cuts its plan into chunks and its chunks into waves (pipeline.CHUNKS_PER_WAVE); a
wave is generated as one continuous batch, so the unit an executor hands out is a wave, never a
lone chunk: every reply then meets the same batch companions wherever it runs, and with one
random stream per reply (sampling.py) its tokens and means do not depend on the executor.
An executor only computes: the driver (step_rollouts) records each finished chunk itself, so the
run directory keeps one writer. The Ray executor lives in ray_executor.py.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from persona_axis.generation import Reply, decode_spec, stream_replies
from persona_axis.models import LoadedModel
from persona_axis.sampling import stream_seed

if TYPE_CHECKING:
    from persona_axis.pipeline import PlanItem, Settings

# One wave: {chunk index: the chunk's plan items, in order}.
Wave = dict[int, list["PlanItem"]]
# A finished chunk: (chunk index, its replies in item order; each reply's means [layers, hidden] on the CPU).
ChunkReplies = tuple[int, list[Reply]]


@dataclass(frozen=True)
class ModelIdentity:
    """What a run records of the model that generates its rollouts (the same on every worker)."""

    name: str
    source_hash: str
    numerics: tuple[tuple[str, str], ...]  # (key, value) of LoadedModel.numerics(): dtype, fast path if on
    n_layers: int
    hidden_size: int

    @classmethod
    def of(cls, lm: LoadedModel) -> ModelIdentity:
        return cls(lm.name, lm.source_hash, tuple(lm.numerics().items()), lm.n_layers, lm.hidden_size)


class Executor(Protocol):
    """Generates waves of chunks and yields each chunk once its replies are in, in any order, each chunk once."""

    name: str

    def model_identity(self) -> ModelIdentity:
        """The model (and dtype) every wave is generated with."""

    def run_waves(self, waves: Sequence[Wave], settings: Settings) -> Iterator[ChunkReplies]: ...


def wave_replies(lm: LoadedModel, wave: Wave, settings: Settings) -> Iterator[ChunkReplies]:
    """(chunk index, its replies in item order) for each chunk of a wave, as soon as its last reply ends.

    The wave is one continuous batch of `settings.batch_size` slots; reply j of chunk k samples
    from the stream of (settings.seed + k, j).
    """
    items = [(k, j, item) for k, chunk in wave.items() for j, item in enumerate(chunk)]
    conversations = [item.messages() for _, _, item in items]
    spec = decode_spec(lm, max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                       top_p=settings.top_p)
    seeds = [stream_seed(settings.seed + k, j) for k, j, _ in items]
    waiting: dict[int, dict[int, Reply]] = {}
    for n, reply in stream_replies(lm, conversations, spec, seed=seeds, batch_size=settings.batch_size):
        k, j, _ = items[n]
        got = waiting.setdefault(k, {})
        got[j] = reply
        if len(got) == len(wave[k]):
            yield k, [got[j] for j in range(len(got))]
            del waiting[k]


class LocalExecutor:
    """Every wave in this process, one after the other, on an already-loaded model."""

    name = "local"

    def __init__(self, lm: LoadedModel) -> None:
        self.lm = lm

    def model_identity(self) -> ModelIdentity:
        return ModelIdentity.of(self.lm)

    def run_waves(self, waves: Sequence[Wave], settings: Settings) -> Iterator[ChunkReplies]:
        for wave in waves:
            yield from wave_replies(self.lm, wave, settings)
