"""The run directory: manifest, append-only JSONL records, safetensors tensors, one writer at a time.

Crash safety: a record batch is appended with one write and fsync; a crash mid-write leaves at most
one torn last line, which readers drop and the next writer cuts off before appending. Tensors and
the manifest are written to a temporary file and renamed into place, so they are whole or absent.
"""

from __future__ import annotations

import fcntl
import fnmatch
import json
import os
import signal
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import torch
from safetensors.torch import load_file, save_file

from persona_axis.errors import PersonaAxisError


class RunLayout:
    """Every file name of a pipeline run directory (ARCHITECTURE.md's "Run directory"), spelled here only.

    Names are relative to the run directory; the properties give full paths under `root`.
    """

    LOCK = ".lock"
    MANIFEST = "manifest.json"
    CHUNKS = "activations/chunk-*.safetensors"  # [n, layers, hidden] response means, one file per chunk
    VECTORS = "vectors.safetensors"  # default + kept role vectors [layers, hidden]
    TRAIT_VECTORS = "trait_vectors.safetensors"
    ALL_ANSWER_VECTORS = "role_vectors_all_answers.safetensors"
    AXIS = "axis.safetensors"
    CAPPING = "capping"  # stem of the capping config: capping.json + capping.safetensors
    PERSONA_SPACE = "persona_space.json"
    REAL_CHAT = "real_chat.json"  # persona space against real conversations (`persona-axis real-chat`)
    REAL_CHAT_CHUNKS = "real_chat/chunk-*.safetensors"  # their response means [n, layers, hidden] + token norms

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @staticmethod
    def records_file(name: str) -> str:
        """The JSONL file of a record stream ("rollouts", "scores", ...)."""
        return f"{name}.jsonl"

    @staticmethod
    def chunk_file(index: int) -> str:
        """Relative path of activation chunk `index` (the unit of resumable rollout work)."""
        return f"activations/chunk-{index:05d}.safetensors"

    @staticmethod
    def real_chat_chunk_file(index: int) -> str:
        """Relative path of real-chat activation chunk `index` (the unit of resumable `real-chat` work)."""
        return f"real_chat/chunk-{index:05d}.safetensors"

    @property
    def real_chat(self) -> Path:
        return self.root / self.REAL_CHAT

    @property
    def vectors(self) -> Path:
        return self.root / self.VECTORS

    @property
    def axis(self) -> Path:
        return self.root / self.AXIS

    @property
    def capping(self) -> Path:
        return self.root / self.CAPPING

    @property
    def capping_json(self) -> Path:
        return self.root / f"{self.CAPPING}.json"

    def require_vectors(self, needed_for: str) -> Path:
        """The run's vectors file; a one-line error saying what needed it when the run has none yet."""
        if not self.vectors.is_file():
            raise PersonaAxisError(f"{needed_for} needs {self.vectors}, which is not there: finish the run first "
                                   "(`persona-axis run` writes it at its vectors step) or give a finished run directory")
        return self.vectors


def _readable_mode(path: str) -> None:
    """Give a temporary file (created 0600) the permissions a normal new file would get under the umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


# Fault injection for the kill tests (tests/test_kill.py), read from the environment at every durable write
# (an append, the manifest, a tensor file). KILL_AFTER_WRITES=N: the process sends itself SIGKILL right after
# its Nth durable write is on disk. KILL_IN_WRITE=N: it dies in the middle of the Nth; an append leaves its
# bytes cut inside its last line (a torn last line), a renamed write leaves its temporary file unrenamed.
# KILL_WRITES_TO=PATTERN counts only writes to files whose name matches it (fnmatch: "scores.jsonl",
# "chunk-*"); WRITE_LOG=FILE appends the name of every counted write to FILE. Unset, they change nothing.
KILL_AFTER_WRITES = "PERSONA_AXIS_KILL_AFTER_WRITES"
KILL_IN_WRITE = "PERSONA_AXIS_KILL_IN_WRITE"
KILL_WRITES_TO = "PERSONA_AXIS_KILL_WRITES_TO"
WRITE_LOG = "PERSONA_AXIS_WRITE_LOG"
_counted_writes = 0


def _count_write(path: Path) -> tuple[bool, bool]:
    """Count a durable write to `path` for fault injection: (die in the middle of it, die right after it)."""
    global _counted_writes
    pattern = os.environ.get(KILL_WRITES_TO)
    if pattern is not None and not fnmatch.fnmatch(path.name, pattern):
        return False, False
    _counted_writes += 1
    log = os.environ.get(WRITE_LOG)
    if log:
        with open(log, "a", encoding="utf-8") as f:
            f.write(path.name + "\n")
    number = str(_counted_writes)
    return os.environ.get(KILL_IN_WRITE) == number, os.environ.get(KILL_AFTER_WRITES) == number


def _die() -> NoReturn:
    """SIGKILL this process (fault injection): no handler, no cleanup, no flush."""
    os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("SIGKILL did not end the process")


def _torn(data: bytes) -> bytes:
    """A prefix of `data` that ends inside a line (what a write cut short by a crash can leave)."""
    cut = len(data) // 2
    return data[:cut - 1] if data[cut - 1:cut] == b"\n" else data[:cut]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temporary file in the same directory and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tear, die = _count_write(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(_torn(data) if tear else data)
            f.flush()
            os.fsync(f.fileno())
            if tear:
                _die()
        _readable_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if die:
        _die()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """All complete records of a JSONL file; a torn (unterminated or unparsable) last line is dropped."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    complete, tail = lines[:-1], lines[-1]  # tail is b"" when the file ends with a newline
    records = []
    for number, line in enumerate(complete, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(complete) and not tail:
                break  # a torn line that happens to end at a newline boundary
            raise PersonaAxisError(f"{path} line {number} is corrupt (not JSON): fix or delete that line") from None
    return records


def _cut_torn_tail(path: Path) -> None:
    """Truncate a partial last line left by a crash, so the next append starts on a fresh line."""
    if not path.exists():
        return
    with path.open("rb+") as f:
        data = f.read()
        keep = data.rfind(b"\n") + 1
        if keep < len(data):
            f.truncate(keep)


class RunStore:
    """A run directory opened for writing by exactly one process (an exclusive, non-blocking lock)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.layout = RunLayout(root)
        self._lock_file: Any = None

    @classmethod
    @contextmanager
    def open(cls, root: str | Path) -> Iterator[RunStore]:
        store = cls(Path(root))
        store.root.mkdir(parents=True, exist_ok=True)
        store._acquire()
        try:
            yield store
        finally:
            store._release()

    def _acquire(self) -> None:
        lock = (self.root / RunLayout.LOCK).open("a+")
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            lock.close()
            raise PersonaAxisError(
                f"run directory {self.root} is in use by another persona-axis process (pid {holder}): "
                "wait for it to finish or use another --out"
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(str(os.getpid()))
        lock.flush()
        self._lock_file = lock

    def _release(self) -> None:
        if self._lock_file is not None:
            fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    # -- manifest -------------------------------------------------------------------------
    def read_manifest(self) -> dict[str, Any]:
        path = self.root / RunLayout.MANIFEST
        return json.loads(path.read_text()) if path.exists() else {}

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        atomic_write_bytes(self.root / RunLayout.MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode())

    def claim(self, identity: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
        """Start or resume a run: refuse when the directory holds a run with a different identity."""
        manifest = self.read_manifest()
        if manifest and manifest.get("identity") != identity:
            old = manifest.get("identity", {})
            changed = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
            detail = ", ".join(f"{k}: {old.get(k)!r} -> {identity.get(k)!r}" for k in changed[:3])
            raise PersonaAxisError(
                f"{self.root} holds a run with different settings ({detail}): use a new --out, or the same settings to resume"
            )
        manifest = {**manifest, **extra, "identity": identity}
        manifest.setdefault("steps", {})
        self.write_manifest(manifest)
        return manifest

    def mark_step(self, step: str, status: dict[str, Any]) -> None:
        manifest = self.read_manifest()
        manifest.setdefault("steps", {})[step] = status
        self.write_manifest(manifest)

    # -- records --------------------------------------------------------------------------
    def records(self, name: str) -> list[dict[str, Any]]:
        return read_jsonl(self.root / RunLayout.records_file(name))

    def append(self, name: str, records: list[dict[str, Any]]) -> None:
        """Append records with a single write, then fsync."""
        if not records:
            return
        path = self.root / RunLayout.records_file(name)
        _cut_torn_tail(path)
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
        tear, die = _count_write(path)
        with path.open("ab") as f:
            f.write(_torn(data) if tear else data)
            f.flush()
            os.fsync(f.fileno())
        if tear or die:
            _die()

    # -- tensors --------------------------------------------------------------------------
    def save_tensors(self, relative: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        tear, die = _count_write(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        os.close(fd)
        try:
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
            if tear:
                _die()  # the temporary file is left, never renamed into place
            _readable_mode(tmp)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        if die:
            _die()

    def has(self, relative: str) -> bool:
        return (self.root / relative).exists()

    # -- activations ----------------------------------------------------------------------
    chunk_file = staticmethod(RunLayout.chunk_file)

    def save_chunk(self, index: int, means: torch.Tensor, ids: list[str]) -> None:
        """Save one chunk's response means [n, layers, hidden] with the record ids of its rows."""
        self.save_tensors(self.chunk_file(index), {"means": means}, {"ids": json.dumps(ids)})

    def activation_chunks(self) -> Iterator[tuple[list[str], torch.Tensor]]:
        """(record ids [n], response means [n, layers, hidden]) of every stored chunk, one chunk at a time, in order."""
        for path in sorted(self.root.glob(RunLayout.CHUNKS)):
            tensors, meta = load_tensors(path)
            yield json.loads(meta["ids"]), tensors["means"]

    def rollout_kinds(self) -> dict[str, str]:
        """{record id: kind} of every rollout ("default", "role" or "trait"; see `rollout_kind`)."""
        return {r["id"]: rollout_kind(r) for r in self.records("rollouts")}

    def scores_by(self, judge: str, ids: Iterable[str] | None = None) -> dict[str, int | None]:
        """{record id: score} of the scores this judge gave (optionally only for `ids`)."""
        wanted = set(ids) if ids is not None else None
        return {r["id"]: r["score"] for r in self.records("scores")
                if r["judge"] == judge and (wanted is None or r["id"] in wanted)}


def rollout_kind(record: dict[str, Any]) -> str:
    """A rollout record's kind; records written before kinds existed are "default" or "role" by their role name."""
    return str(record.get("kind") or ("default" if record["role"] == "default" else "role"))


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and string metadata of a safetensors file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    return load_file(str(path)), metadata
