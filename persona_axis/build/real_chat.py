"""Persona space against real chat: how much of real conversations' activation variance the persona PCs explain.

Real chat is ShareGPT exchanges (build/sharegpt.py), each teacher-forced through the model: the user's message
rendered by the chat template with no system message (the template's own default applies, as in the default
rollout without a system prompt), then the dataset's reply as the assistant turn, cut to its first
`max_reply_tokens` tokens. A reply's activation at a layer is the mean over its tokens, as the pipeline
captures rollouts (end-of-turn token excluded); the same pass records each reply's mean per-token L2 norm.

Per layer, with X the [n, hidden] real-chat activations centred on their own mean and Q [k, hidden] orthonormal
rows, share(Q) = ||X Qᵀ||² / ||X||², the fraction of X's variance that lies in span(Q):
  persona: Q = the top k PCs of the run's role vectors at that layer (unstandardised: persona_space.pca), for
      k = 1, 3, 10 and the k that explains 70 % of the role vectors' variance, capped at the PCs there are;
  chance: the mean share of RANDOM_DRAWS uniformly random k-dimensional subspaces. Its expectation is exactly
      k / hidden for any X (a random projection keeps k / hidden of the trace), so a persona share well above
      it says real chat varies along the persona directions;
  axis: Q = the unit axis (chance 1 / hidden).
mean_norm is the mean over replies of |reply-mean activation|; token_norm the mean over replies of their tokens'
mean |h|, the typical size of one position's residual stream and the unit of `--steer COEFr@LAYER`.
Activations are saved in chunks of CHUNK_PAIRS pairs under the run directory, so an interrupted measurement
resumes and a larger --n with the same seed reuses the smaller one's pairs; the figures go to real_chat.json.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from persona_axis.axis import Axis, load_axis
from persona_axis.build.persona_space import n_components_for, pca
from persona_axis.build.sharegpt import ChatPair, draw_pairs
from persona_axis.catalog import DEFAULT_ROLE
from persona_axis.decode.capture import response_means_and_norms_by_forward
from persona_axis.errors import PersonaAxisError
from persona_axis.model.context_window import context_length
from persona_axis.model.loading import LoadedModel
from persona_axis.store import RunLayout, RunStore, atomic_write_bytes, load_tensors

K_VALUES = (1, 3, 10)
K70 = "70%"  # the label of "as many PCs as explain 70 % of the persona space"
RANDOM_DRAWS = 16
CHUNK_PAIRS = 16
CAPTURE = "reply-mean+token-norm/1"  # what a chunk holds; part of its fingerprint


@dataclass(frozen=True)
class Shares:
    """Per layer, keyed by label ("1", "3", "10", "70%"): variance shares of the centred real-chat activations.

    persona / chance / k map a label to [layers]: the top-k persona PCs' share, the mean share of random
    k-dimensional subspaces, and the k used (the label's, capped at the PCs there are). axis is [layers].
    """

    persona: dict[str, list[float]]
    chance: dict[str, list[float]]
    k: dict[str, list[int]]
    axis: list[float]


def subspace_share(x: Tensor, basis: Tensor) -> float:
    """Share of the variance of x [n, hidden] (centred here on its own mean) within the span of basis [k, hidden]
    (orthonormal rows): ||x_c basisᵀ||² / ||x_c||², in [0, 1]. Computed in float64."""
    centred = x.double() - x.double().mean(0)
    total = float((centred**2).sum())
    if total <= 0:
        raise PersonaAxisError("the real-chat activations do not vary: measure at least 2 different conversations")
    return min(1.0, float(((centred @ basis.double().T) ** 2).sum()) / total)


def random_share(x: Tensor, k: int, draws: int = RANDOM_DRAWS, generator: torch.Generator | None = None) -> float:
    """Mean `subspace_share` of x [n, hidden] over `draws` uniformly random k-dimensional subspaces (the chance
    level; its expectation is k / hidden)."""
    hidden = x.shape[1]
    values = []
    for _ in range(draws):
        q, _ = torch.linalg.qr(torch.randn(hidden, k, generator=generator, dtype=torch.float64))
        values.append(subspace_share(x, q.T))
    return sum(values) / len(values)


def persona_shares(activations: Tensor, role_vectors: Tensor, axis: Tensor, ks: Sequence[int] = K_VALUES,
                   draws: int = RANDOM_DRAWS, seed: int = 0) -> Shares:
    """Variance shares per layer (see the module doc): activations [n, layers, hidden] (n >= 2), role vectors
    [roles, layers, hidden] (roles >= 2), axis [layers, hidden]."""
    if activations.dim() != 3 or activations.shape[0] < 2:
        raise PersonaAxisError(f"need real-chat activations [n >= 2, layers, hidden]; got {tuple(activations.shape)}")
    if tuple(activations.shape[1:]) != tuple(axis.shape) or tuple(role_vectors.shape[1:]) != tuple(axis.shape):
        raise PersonaAxisError(f"real-chat activations {tuple(activations.shape[1:])}, role vectors "
                               f"{tuple(role_vectors.shape[1:])} and the axis {tuple(axis.shape)} differ in shape: "
                               "measure with the model the run was made with")
    generator = torch.Generator().manual_seed(seed)
    labels = [str(k) for k in ks] + [K70]
    persona: dict[str, list[float]] = {label: [] for label in labels}
    chance: dict[str, list[float]] = {label: [] for label in labels}
    used: dict[str, list[int]] = {label: [] for label in labels}
    axis_share = []
    for layer in range(axis.shape[0]):
        x = activations[:, layer]
        space = pca(role_vectors[:, layer])
        wanted = [*ks, n_components_for(space.variance_explained, 0.70)]
        for label, k in zip(labels, wanted):
            k = min(k, space.components.shape[0])
            used[label].append(k)
            persona[label].append(subspace_share(x, space.components[:k]))
            chance[label].append(random_share(x, k, draws, generator))
        direction = axis[layer].double()
        axis_share.append(subspace_share(x, (direction / direction.norm())[None]))
    return Shares(persona, chance, used, axis_share)


@dataclass(frozen=True)
class RealChatMeasurement:
    """A run's persona space against n real conversations (the content of real_chat.json).

    Lists are per layer: mean_norm (mean |reply-mean activation|), token_norm (mean per-token |h|, COEFr's unit),
    default_norm (|mean default-Assistant activation|, COEFn's unit). source records the data package and file.
    """

    source: dict[str, Any]
    model: str
    model_hash: str
    numerics: dict[str, str]
    n: int
    seed: int
    max_reply_tokens: int
    mean_reply_tokens: float
    n_roles: int
    hidden: int
    shares: Shares
    mean_norm: list[float]
    token_norm: list[float]
    default_norm: list[float]
    ids: list[str]

    @property
    def layers(self) -> int:
        return len(self.mean_norm)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RealChatMeasurement:
        return cls(**{**data, "shares": Shares(**data["shares"])})

    def _column(self, label: str) -> str:
        """A column's heading: k=LABEL, or k=USED (asked LABEL) where the run has fewer PCs than asked."""
        used = self.shares.k[label][0] if self.shares.k[label] else 0
        if label == K70 or str(used) == label:
            return f"k={label}"
        return f"k={used} (asked {label})"

    def table(self) -> str:
        """The figures as text: one row per layer."""
        labels = list(self.shares.persona)
        head = (f"{self.n} ShareGPT pairs (seed {self.seed}, replies cut to {self.max_reply_tokens} tokens, mean "
                f"{self.mean_reply_tokens:.0f}) through {self.model} ({', '.join(self.numerics.values())}); persona "
                f"space of {self.n_roles} roles, hidden {self.hidden}\n"
                "share of the real-chat variance (centred) in the top-k persona PCs [chance: k random directions]; "
                "k70 = PCs for 70 % of the persona space; norms: mean |reply mean|, mean per-token |h| (COEFr's "
                "unit), |mean default activation| (COEFn's unit)\n")
        columns = ("layer  k70 " + "".join(f"{self._column(label):>17}" for label in labels)
                   + "   axis [chance]  mean|x| token|h| default|m|")
        rows = []
        for layer in range(self.layers):
            cells = "".join(f"  {self.shares.persona[lab][layer]:6.3f} [{self.shares.chance[lab][layer]:6.3f}]"
                            for lab in labels)
            rows.append(f"{layer:5d} {self.shares.k[K70][layer]:4d} {cells}  {self.shares.axis[layer]:6.3f} "
                        f"[{1 / self.hidden:.3f}] {self.mean_norm[layer]:8.2f} {self.token_norm[layer]:7.2f} "
                        f"{self.default_norm[layer]:10.2f}")
        return head + columns + "\n" + "\n".join(rows)


def _fingerprint(lm: LoadedModel, max_reply_tokens: int, source: Mapping[str, Any]) -> str:
    """What a stored chunk must match to be reused: model, numerics, reply cut, data version, capture."""
    key = {"model_hash": lm.source_hash, "numerics": lm.numerics(), "max_reply_tokens": max_reply_tokens,
           "data": [source.get("package"), source.get("version")], "capture": CAPTURE}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def pair_ids(lm: LoadedModel, pair: ChatPair, max_reply_tokens: int) -> tuple[list[int], list[int]]:
    """(prompt ids: the user message with the generation prompt, reply ids: its first max_reply_tokens tokens)."""
    prompt = lm.prompt_ids([{"role": "user", "content": pair.user}])
    reply = list(lm.tokenizer(pair.reply, add_special_tokens=False).input_ids)[:max_reply_tokens]
    limit = context_length(lm)
    if len(prompt) + len(reply) > limit:
        raise PersonaAxisError(f"ShareGPT pair {pair.id} is {len(prompt) + len(reply)} tokens, more than the "
                               f"{limit}-token context of {lm.name}: lower --max-reply-tokens or use another model")
    return prompt, reply


def teacher_forced(lm: LoadedModel, pairs: Sequence[ChatPair], max_reply_tokens: int = 128, batch_size: int = 4,
                   bar: Any = None) -> tuple[Tensor, Tensor, list[int]]:
    """Reply means [n, layers, hidden], mean per-token norms [n, layers] (float32) and reply lengths [n] of pairs,
    teacher-forced at every layer; batches group pairs of similar length (less padding), results keep pair order."""
    ids = [pair_ids(lm, p, max_reply_tokens) for p in pairs]
    order = sorted(range(len(pairs)), key=lambda i: len(ids[i][0]) + len(ids[i][1]))
    means = torch.zeros(len(pairs), lm.n_layers, lm.hidden_size)
    norms = torch.zeros(len(pairs), lm.n_layers)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        m, t = response_means_and_norms_by_forward(lm, [ids[i][0] for i in rows], [ids[i][1] for i in rows],
                                                   range(lm.n_layers), batch_size)
        means[rows], norms[rows] = m, t
        if bar is not None:
            bar.update(len(rows))
    return means, norms, [len(r) for _, r in ids]


def _activations(store: RunStore, lm: LoadedModel, pairs: Sequence[ChatPair], fingerprint: str,
                 max_reply_tokens: int, batch_size: int, progress: bool) -> tuple[Tensor, Tensor, list[int]]:
    """Every pair's means, token norms and reply length: stored chunks that match are read, the others computed."""
    chunks = [list(pairs[i:i + CHUNK_PAIRS]) for i in range(0, len(pairs), CHUNK_PAIRS)]
    stored: dict[int, tuple[dict[str, Tensor], dict[str, str]]] = {}
    for k, chunk in enumerate(chunks):
        path = store.root / RunLayout.real_chat_chunk_file(k)
        if path.is_file():
            tensors, meta = load_tensors(path)
            if meta.get("fingerprint") == fingerprint and json.loads(meta.get("ids", "[]")) == [p.id for p in chunk]:
                stored[k] = tensors, meta
    parts: list[tuple[Tensor, Tensor, list[int]]] = []
    with tqdm(total=len(pairs), desc="real chat", unit="pair", disable=not progress) as bar:
        bar.update(sum(len(chunks[k]) for k in stored))
        for k, chunk in enumerate(chunks):
            if k in stored:
                tensors, meta = stored[k]
                parts.append((tensors["means"], tensors["token_norms"], json.loads(meta["reply_tokens"])))
                continue
            means, norms, lengths = teacher_forced(lm, chunk, max_reply_tokens, batch_size, bar)
            store.save_tensors(RunLayout.real_chat_chunk_file(k), {"means": means, "token_norms": norms},
                               {"ids": json.dumps([p.id for p in chunk]), "fingerprint": fingerprint,
                                "reply_tokens": json.dumps(lengths)})
            parts.append((means, norms, lengths))
    return (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
            [n for p in parts for n in p[2]])


def _run_space(root: Path, lm: LoadedModel) -> tuple[Axis, Tensor, Tensor]:
    """The run's axis, its kept role vectors stacked [roles, layers, hidden] and its default vector [layers, hidden]."""
    layout = RunLayout(root)
    path = layout.require_vectors("real-chat")
    axis = load_axis(root)
    axis.check_model(lm.n_layers, lm.hidden_size, lm.name)
    made_with = axis.metadata.get("model_hash")
    if made_with and made_with != lm.source_hash:
        raise PersonaAxisError(f"{root} was made with another model (hash {made_with[:12]}, not {lm.source_hash[:12]}): "
                               "measure with the run's own --model")
    tensors, meta = load_tensors(path)
    roles = json.loads(meta.get("summary", "{}")).get("roles_used") or [k for k in tensors if k != DEFAULT_ROLE]
    if len(roles) < 2 or DEFAULT_ROLE not in tensors:
        raise PersonaAxisError(f"{path} holds {len(roles)} role vectors and {'a' if DEFAULT_ROLE in tensors else 'no'} "
                               "default vector: real-chat needs at least 2 roles and the default")
    return axis, torch.stack([tensors[name].float() for name in roles]), tensors[DEFAULT_ROLE].float()


def measure_real_chat(run_dir: str | Path, lm: LoadedModel, n: int = 200, seed: int = 0, max_reply_tokens: int = 128,
                      batch_size: int = 4, progress: bool = True) -> RealChatMeasurement:
    """Teacher-force n ShareGPT pairs (drawn with `seed`) through lm and measure the run's persona space against
    them (module doc); writes <run>/real_chat.json and returns it. lm must be the model the run was made with."""
    if n < 2:
        raise PersonaAxisError(f"--n must be at least 2 (variance needs two conversations), not {n}")
    if max_reply_tokens < 1 or batch_size < 1:
        raise PersonaAxisError("--max-reply-tokens and --batch-size must be positive")
    root = Path(run_dir)
    axis, roles, default = _run_space(root, lm)
    file, pairs = draw_pairs(n, seed)
    source = file.record()
    with RunStore.open(root) as store:
        means, norms, lengths = _activations(store, lm, pairs, _fingerprint(lm, max_reply_tokens, source),
                                             max_reply_tokens, batch_size, progress)
        result = RealChatMeasurement(
            source=source, model=lm.name, model_hash=lm.source_hash, numerics=lm.numerics(), n=n, seed=seed,
            max_reply_tokens=max_reply_tokens, mean_reply_tokens=sum(lengths) / len(lengths), n_roles=roles.shape[0],
            hidden=lm.hidden_size, shares=persona_shares(means, roles, axis.vectors, seed=seed),
            mean_norm=means.double().norm(dim=-1).mean(0).tolist(), token_norm=norms.double().mean(0).tolist(),
            default_norm=default.double().norm(dim=-1).tolist(), ids=[p.id for p in pairs])
        atomic_write_bytes(RunLayout(root).real_chat, json.dumps(result.to_json(), indent=1).encode())
    return result


def load_real_chat(run_dir: str | Path) -> RealChatMeasurement:
    """The run's stored real-chat measurement; a one-line error naming the command that makes it when absent."""
    path = RunLayout(run_dir).real_chat
    if not path.is_file():
        raise PersonaAxisError(f"{path} is not there: run `persona-axis real-chat {run_dir}` first (it teacher-forces "
                               "ShareGPT conversations and stores their activation norms)")
    try:
        return RealChatMeasurement.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, TypeError, KeyError) as exc:
        raise PersonaAxisError(f"{path} is not a real-chat measurement ({exc}): run `persona-axis real-chat "
                               f"{run_dir}` again") from None


def real_chat_norms(run_dir: str | Path) -> Tensor:
    """Mean per-token L2 norm of real-chat reply activations per layer -> [layers] float32 (the COEFr unit)."""
    return torch.tensor(load_real_chat(run_dir).token_norm, dtype=torch.float32)
