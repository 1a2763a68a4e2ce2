"""Where model work runs: the executor interface, jobs, and the local executor (this process, the default).

An executor holds a model (here, or on each actor of a cluster) and runs jobs on it. A job is a
picklable callable (a frozen dataclass; nothing in it may hold a model) that takes the model and
yields its results piece by piece, with any tensors in them on the CPU: locally each piece
reaches the caller as soon as it is made, from a Ray actor all of a job's pieces arrive when the
job returns. An executor only computes: the caller (step_rollouts, simulate, the eval steps)
records what comes back, so a run directory keeps one writer, and a job's result depends only on
the job, never on where it ran.

The pipeline's jobs are waves (pipeline.CHUNKS_PER_WAVE chunks generated as one continuous batch),
never a lone chunk: every reply then meets the same batch companions wherever it runs, and with one
random stream per reply (sampling.py) its tokens and means do not depend on the executor. The Ray
executor lives in ray_executor.py.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar

from persona_axis.errors import PersonaAxisError
from persona_axis.generation import Reply, decode_spec, stream_replies
from persona_axis.models import LoadedModel
from persona_axis.sampling import stream_seed

if TYPE_CHECKING:
    from persona_axis.pipeline import PlanItem, Settings

Piece = TypeVar("Piece")
Piece_co = TypeVar("Piece_co", covariant=True)

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


class Job(Protocol[Piece_co]):
    """Work on one model: picklable (it may travel to a Ray actor), yields its results piece by piece (CPU tensors)."""

    def __call__(self, lm: LoadedModel) -> Iterator[Piece_co]: ...


class Executor(Protocol):
    """Runs jobs on its model and yields (job index, piece) for every piece of every job, each once.

    Jobs may finish in any order; the pieces of one job come in the order the job yields them.
    """

    name: str

    def model_identity(self) -> ModelIdentity:
        """The model (and dtype) every job runs on."""

    def run_jobs(self, jobs: Sequence[Job[Piece]]) -> Iterator[tuple[int, Piece]]: ...


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


@dataclass(frozen=True)
class WaveJob:
    """One wave of the pipeline's chunks: yields each chunk with its replies once its last reply ends."""

    wave: Wave
    settings: Settings

    def __call__(self, lm: LoadedModel) -> Iterator[ChunkReplies]:
        return wave_replies(lm, self.wave, self.settings)


def run_waves(executor: Executor, waves: Sequence[Wave], settings: Settings) -> Iterator[ChunkReplies]:
    """Every chunk of every wave with its replies, in any order, each chunk once."""
    for _, chunk in executor.run_jobs([WaveJob(wave, settings) for wave in waves]):
        yield chunk


def executor_or_local(executor: Executor | None, lm: LoadedModel | None, caller: str) -> Executor:
    """`executor`, else the local executor on `lm`; a PersonaAxisError naming `caller` when neither is given."""
    if executor is not None:
        return executor
    if lm is None:
        raise PersonaAxisError(f"{caller} needs a model or an executor that holds one")
    return LocalExecutor(lm)


class LocalExecutor:
    """Every job in this process, one after the other, on an already-loaded model."""

    name = "local"

    def __init__(self, lm: LoadedModel) -> None:
        self.lm = lm

    def model_identity(self) -> ModelIdentity:
        return ModelIdentity.of(self.lm)

    def run_jobs(self, jobs: Sequence[Job[Piece]]) -> Iterator[tuple[int, Piece]]:
        for index, job in enumerate(jobs):
            for piece in job(self.lm):
                yield index, piece
