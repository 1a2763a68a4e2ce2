"""The Ray executor: jobs (executors.Job) as Ray tasks on actors that each hold one copy of the model.

Needs the optional `ray` extra (`pip install -e ".[ray]"`). The driver hands each idle actor the
next job and the caller records what comes back (build/executors.py: the pipeline's jobs are waves;
simulate's are batches of conversations; an eval's are chunks of replies and capability checks).
When an actor dies (its node lost, the process killed, out of memory) the job it held goes back
to the front of the queue and runs on another actor; the dead actor returns nothing, so nothing
is recorded twice. An error raised inside a job (bad input, a bug) is not retried: it would fail again.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from persona_axis.build.executors import Job, ModelIdentity, Piece
from persona_axis.errors import PersonaAxisError, import_optional

if TYPE_CHECKING:
    from persona_axis.model.loading import LoadedModel

MISSING_RAY = "the Ray executor needs the ray extra: pip install -e \".[ray]\" (or pip install \"persona-axis[ray]\")"


def import_ray() -> Any:
    """The `ray` module, else a PersonaAxisError naming the extra to install."""
    return import_optional("ray", MISSING_RAY)


def init_ray(address: str | None, num_cpus: int | None = None, attempts: int = 3) -> None:
    """Connect to the cluster at `address` ("auto", "HOST:PORT"), or start a local Ray (address None) with
    `num_cpus` CPUs. Ray gives its local processes a fixed 30 s to come up, which a busy machine can
    miss: starting is tried `attempts` times before a PersonaAxisError."""
    ray = import_ray()
    for attempt in range(attempts):
        try:
            ray.init(address=address, num_cpus=num_cpus, include_dashboard=False, logging_level="ERROR")
            return
        except ConnectionError as exc:
            raise PersonaAxisError(f"cannot reach the Ray cluster at {address or 'RAY_ADDRESS'}: {exc}") from None
        except Exception as exc:  # ray raises a bare Exception when its processes time out during start-up
            ray.shutdown()
            if attempt == attempts - 1:
                raise PersonaAxisError(f"Ray did not start ({exc}); start it first with `ray start --head` and pass "
                                       "--ray-address auto") from None


@dataclass(frozen=True)
class ModelSpec:
    """How each actor loads its model (the arguments of loading.load_model).

    device None: cuda where the actor has a GPU, else cpu. device_map "auto": shard a model larger
    than one GPU over the actor's GPUs (accelerate).
    """

    spec: str = "default"
    dtype: str = "auto"
    device: str | None = None
    device_map: str | None = None
    fast_path: str = "exact"

    def load(self, progress: bool = False) -> LoadedModel:
        """The LoadedModel this spec names (loading.load_model)."""
        from persona_axis.model.loading import load_model

        return load_model(self.spec, dtype=self.dtype, device=self.device, device_map=self.device_map,
                          fast_path=self.fast_path, progress=progress)


class ModelActor:
    """One model in one Ray actor process; runs whole jobs (run as `ray.remote(ModelActor)`)."""

    def __init__(self, model: ModelSpec, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        self.lm = model.load()

    def model_identity(self) -> ModelIdentity:
        return ModelIdentity.of(self.lm)

    def run(self, job: Job[Piece]) -> list[Piece]:
        """Every piece the job yields on this actor's model."""
        return list(job(self.lm))


class RayExecutor:
    """Jobs on `actors` Ray actors, each with `threads_per_actor` CPU threads and `gpus_per_actor` GPUs
    (None: one where the cluster has GPUs, else none).

    address: "auto" (the cluster this machine belongs to), "HOST:PORT", or None (connect to
    $RAY_ADDRESS, else start a local Ray for this process). `env_vars` are set in every actor's
    environment (a node started by `ray start` does not see the driver's: API keys a job needs).
    Use as a context manager, or call start() and close(). `retried_jobs` counts jobs re-run after
    their actor died; `jobs_by_actor` the jobs each actor (by its index in start order) returned.
    """

    name = "ray"

    def __init__(self, model: ModelSpec, actors: int = 1, threads_per_actor: int = 1,
                 gpus_per_actor: float | None = None, address: str | None = None,
                 env_vars: Mapping[str, str] | None = None) -> None:
        if actors < 1 or threads_per_actor < 1 or (gpus_per_actor or 0) < 0:
            raise PersonaAxisError("the Ray executor needs at least one actor, one thread per actor and gpus >= 0")
        self.ray = import_ray()
        self.model, self.address, self.env_vars = model, address, dict(env_vars or {})
        self.n_actors, self.threads, self.gpus = actors, threads_per_actor, gpus_per_actor
        self.actors: list[Any] = []
        self.retried_jobs = 0
        self.jobs_by_actor: collections.Counter[int] = collections.Counter()
        self._started_ray = False
        self._numbers: dict[int, int] = {}

    def __enter__(self) -> RayExecutor:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Connect to Ray (unless this process already is) and start the actors; each loads the model."""
        ray = self.ray
        if not ray.is_initialized():
            init_ray(self.address)
            self._started_ray = True
        if self.gpus is None:
            self.gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        options: dict[str, Any] = {"runtime_env": {"env_vars": self.env_vars}} if self.env_vars else {}
        remote = ray.remote(num_cpus=self.threads, num_gpus=self.gpus, **options)(ModelActor)
        self.actors = [remote.remote(self.model, self.threads) for _ in range(self.n_actors)]
        self._numbers = {id(actor): n for n, actor in enumerate(self.actors)}

    def close(self) -> None:
        """Stop the actors (and Ray itself when start() started it)."""
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []
        if self._started_ray:
            self.ray.shutdown()
            self._started_ray = False

    def model_identity(self) -> ModelIdentity:
        """The model the actors loaded; a PersonaAxisError when they differ (another model, or dtype "auto"
        resolving differently on GPU and CPU nodes)."""
        if not self.actors:
            raise PersonaAxisError("the Ray executor is not started: use it as a context manager or call start()")
        try:
            found = set(self.ray.get([actor.model_identity.remote() for actor in self.actors]))
        except self.ray.exceptions.RayActorError as exc:
            detail = (str(exc).strip().splitlines() or [""])[-1][:300]
            raise PersonaAxisError(f"a Ray actor could not load {self.model.spec!r}: {detail}") from None
        if len(found) > 1:
            listed = "; ".join(f"{m.name} ({dict(m.numerics)}, hash {m.source_hash[:12]})" for m in found)
            raise PersonaAxisError(f"the Ray actors loaded different models: {listed}: give them one model and an "
                                   "explicit --dtype")
        return found.pop()

    def run_jobs(self, jobs: Sequence[Job[Piece]]) -> Iterator[tuple[int, Piece]]:
        """Hand each idle actor the next job; yield a job's pieces when it returns; re-queue a dead actor's job."""
        if not self.actors:
            raise PersonaAxisError("the Ray executor is not started: use it as a context manager or call start()")
        ray = self.ray
        queue = collections.deque(range(len(jobs)))
        idle = list(self.actors)
        running: dict[Any, tuple[Any, int]] = {}
        while queue or running:
            while queue and idle:
                actor, index = idle.pop(0), queue.popleft()
                running[actor.run.remote(jobs[index])] = (actor, index)
            ready, _ = ray.wait(list(running), num_returns=1)
            actor, index = running.pop(ready[0])
            try:
                finished = ray.get(ready[0])
            except ray.exceptions.RayActorError:
                self._lose(actor)
                queue.appendleft(index)
                self.retried_jobs += 1
                continue
            idle.append(actor)
            self.jobs_by_actor[self._numbers[id(actor)]] += 1
            for piece in finished:
                yield index, piece

    def _lose(self, actor: Any) -> None:
        self.actors.remove(actor)
        if not self.actors:
            raise PersonaAxisError("every Ray actor died (see the Ray logs: out of memory, a node lost?); run again "
                                   "to resume from the chunks already recorded")
