"""Where model work runs: the executor interface, jobs, and the local executor (this process, the default).

An executor holds a model (here, or on each actor of a cluster) and runs jobs on it. A job is a
picklable callable (a frozen dataclass; nothing in it may hold a model) that takes the model and
yields its results piece by piece, with any tensors in them on the CPU: locally each piece
reaches the caller as soon as it is made, from a Ray actor all of a job's pieces arrive when the
job returns. An executor only computes: the caller (step_rollouts, simulate, the eval steps)
records what comes back, so a run directory keeps one writer, and a job's result depends only on
the job, never on where it ran.

The jobs themselves live beside the work they do: the pipeline's waves in build/plan.py, the
simulations' conversation batches in apps/simulate.py, the eval's reply chunks in evals/run.py. The Ray
executor lives in build/ray_executor.py.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from persona_axis.errors import PersonaAxisError
from persona_axis.model.loading import LoadedModel

Piece = TypeVar("Piece")
Piece_co = TypeVar("Piece_co", covariant=True)

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
