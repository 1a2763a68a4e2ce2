"""What a pipeline run generates: its settings and presets, the plan of rollouts, and the waves they run in.

A plan lists every (system prompt, question) pair; it is cut into fixed chunks of `batch_size`
items (the unit saved to disk) and those into waves of CHUNKS_PER_WAVE chunks. A wave is one job
for an executor (persona_axis.build.executors): one continuous batch, so every reply meets the same batch
companions wherever it runs, and with one random stream per reply (decode/sampling.py) its tokens and
means do not depend on the executor.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from persona_axis.build.executors import Executor
from persona_axis.catalog import DEFAULT_ROLE, Catalog, Role
from persona_axis.decode.generate import Reply, decode_spec, stream_replies
from persona_axis.decode.sampling import stream_seed
from persona_axis.model.loading import LoadedModel, Message


@dataclass(frozen=True)
class Settings:
    """What a run generates.

    Default prompts and roles answer the same first `questions` questions, so question content
    cannot leak into the axis; traits answer the first `trait_questions` of them (None: all `questions`;
    traits are ranked along the axis, not part of it). roles_per_group=None means every role;
    default_prompts=None every default prompt; traits=None every trait (0: none). default_samples:
    answers sampled for each (default prompt, question) pair: the default vector is half of the axis and,
    with one answer per pair, the noisiest half. Replies are sampled at `temperature` with nucleus `top_p`
    (temperature 0: greedy); reply j of chunk k samples from the stream of (seed + k, j). batch_size:
    replies per chunk, and replies decoded at once.
    """

    prompts_per_role: int
    questions: int
    max_new_tokens: int
    min_score3: int
    roles_per_group: int | None = None
    default_prompts: int | None = None
    traits: int | None = 0
    prompts_per_trait: int = 1
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int = 0
    batch_size: int = 64
    default_samples: int = 1
    trait_questions: int | None = None


PRESETS: dict[str, Settings] = {
    # CI-sized: 2 roles per group and 4 traits, a handful of short answers; well under 3 minutes on 2 cores.
    "smoke": Settings(prompts_per_role=1, questions=3, max_new_tokens=24, min_score3=1, roles_per_group=2,
                      default_prompts=3, traits=4, batch_size=16),
    # Every role and every trait, once or twice: minutes on 2 cores; the README's main command.
    "quick": Settings(prompts_per_role=3, questions=2, max_new_tokens=32, min_score3=1, traits=None, default_samples=8,
                      trait_questions=1),
    # Every role and trait with enough answers for stable vectors, sized for under an hour on a 2-core float32 machine:
    # 6 384 replies of 64 tokens.
    "standard": Settings(prompts_per_role=2, questions=8, max_new_tokens=64, min_score3=3, traits=None),
    # The published design: 5 prompts x 240 questions for every role and trait, 50 score-3 answers per kept
    # vector (days on a CPU; meant for a GPU).
    "paper": Settings(prompts_per_role=5, questions=240, max_new_tokens=256, min_score3=50, traits=None,
                      prompts_per_trait=5),
}


@dataclass(frozen=True)
class PlanItem:
    """One rollout to generate: `system` prompt + `question`, answered as `kind` ("default", "role", "trait")."""

    id: str
    role: str
    prompt_index: int
    question_id: str
    system: str
    question: str
    kind: str = "role"

    def messages(self) -> list[Message]:
        """The conversation to answer: the system prompt, then the question."""
        return [{"role": "system", "content": self.system}, {"role": "user", "content": self.question}]


def select_roles(catalog: Catalog, settings: Settings, names: list[str] | None) -> tuple[Role, ...]:
    """Roles a run covers: explicit names, else the first `roles_per_group` of each group, else all."""
    if names:
        return catalog.select_roles(names)
    if settings.roles_per_group is None:
        return catalog.roles
    taken: dict[str, int] = {}
    chosen = []
    for role in catalog.roles:
        if taken.get(role.group, 0) < settings.roles_per_group:
            taken[role.group] = taken.get(role.group, 0) + 1
            chosen.append(role)
    return tuple(chosen)


def select_traits(catalog: Catalog, settings: Settings) -> tuple[Role, ...]:
    """Traits a run covers: the catalogue's first `settings.traits` (all when None, none when 0)."""
    return catalog.traits if settings.traits is None else catalog.traits[: settings.traits]


def trait_record_name(name: str) -> str:
    """The key a trait's rollouts and vector are stored under, apart from role names: "trait:<name>"."""
    return f"trait:{name}"


def plan_rollouts(catalog: Catalog, settings: Settings, roles: tuple[Role, ...],
                  traits: tuple[Role, ...] = ()) -> list[PlanItem]:
    """Every (system prompt, question) pair to generate: default prompts (`default_samples` answers each), then
    each role, then each trait.

    Defaults and roles answer the catalogue's first `settings.questions` questions, traits the first
    `settings.trait_questions` of those. A default pair's k-th extra answer has the id suffix "|s<k>".
    """
    questions = catalog.questions[: settings.questions]
    trait_questions = questions[: settings.trait_questions] if settings.trait_questions is not None else questions
    defaults = catalog.defaults[: settings.default_prompts] if settings.default_prompts else catalog.defaults
    plan = [PlanItem(f"{DEFAULT_ROLE}|p{p}|{q.id}" + (f"|s{k}" if k else ""), DEFAULT_ROLE, p, q.id, system, q.text,
                     "default")
            for p, system in enumerate(defaults) for q in questions for k in range(settings.default_samples)]
    groups = [("role", role.name, role.prompts[: settings.prompts_per_role], questions) for role in roles]
    groups += [("trait", trait_record_name(t.name), t.prompts[: settings.prompts_per_trait], trait_questions)
               for t in traits]
    return plan + [PlanItem(f"{name}|p{p}|{q.id}", name, p, q.id, system, q.text, kind)
                   for kind, name, prompts, asked in groups for p, system in enumerate(prompts) for q in asked]


def question_ids_by_kind(plan: list[PlanItem]) -> dict[str, list[str]]:
    """{kind: the distinct question ids its rollouts answer, in plan order} (recorded in the manifest)."""
    found: dict[str, dict[str, None]] = {}
    for item in plan:
        found.setdefault(item.kind, {})[item.question_id] = None
    return {kind: list(ids) for kind, ids in found.items()}


CHUNKS_PER_WAVE = 16
ROLLOUT_ENGINE = (f"one decode engine, continuous batching in waves of {CHUNKS_PER_WAVE} chunks; one random stream "
                  "per reply; shared prompt prefixes prefilled once; on CPU, widening linear layers in [in, out] layout")


# One wave: {chunk index: the chunk's plan items, in order}.
Wave = dict[int, list[PlanItem]]
# A finished chunk: (chunk index, its replies in item order; each reply's means [layers, hidden] on the CPU).
ChunkReplies = tuple[int, list[Reply]]


def rollout_waves(plan: list[PlanItem], settings: Settings) -> list[Wave]:
    """The plan cut into chunks of `settings.batch_size` items, grouped in waves of CHUNKS_PER_WAVE chunks."""
    chunks = [plan[start : start + settings.batch_size] for start in range(0, len(plan), settings.batch_size)]
    return [{k: chunks[k] for k in range(first, min(first + CHUNKS_PER_WAVE, len(chunks)))}
            for first in range(0, len(chunks), CHUNKS_PER_WAVE)]


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
