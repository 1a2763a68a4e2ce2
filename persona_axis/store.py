"""The run directory: manifest, append-only JSONL records, safetensors tensors, one writer at a time.

Crash safety: a record batch is appended with one write and fsync; a crash mid-write leaves at most
one torn last line, which readers drop and the next writer cuts off before appending. Tensors and
the manifest are written to a temporary file and renamed into place, so they are whole or absent.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from persona_axis.errors import PersonaAxisError

LOCK_NAME = ".lock"
CHUNK_PATTERN = "activations/chunk-*.safetensors"


def _readable_mode(path: str) -> None:
    """Give a temporary file (created 0600) the permissions a normal new file would get under the umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temporary file in the same directory and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _readable_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
        lock = (self.root / LOCK_NAME).open("a+")
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
        path = self.root / "manifest.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        atomic_write_bytes(self.root / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True).encode())

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
        return read_jsonl(self.root / f"{name}.jsonl")

    def append(self, name: str, records: list[dict[str, Any]]) -> None:
        """Append records with a single write, then fsync."""
        if not records:
            return
        path = self.root / f"{name}.jsonl"
        _cut_torn_tail(path)
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
        with path.open("ab") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    # -- tensors --------------------------------------------------------------------------
    def save_tensors(self, relative: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        os.close(fd)
        try:
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
            _readable_mode(tmp)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def has(self, relative: str) -> bool:
        return (self.root / relative).exists()

    # -- activations ----------------------------------------------------------------------
    @staticmethod
    def chunk_file(index: int) -> str:
        """Relative path of activation chunk `index` (the unit of resumable rollout work)."""
        return f"activations/chunk-{index:05d}.safetensors"

    def save_chunk(self, index: int, means: torch.Tensor, ids: list[str]) -> None:
        """Save one chunk's response means [n, layers, hidden] with the record ids of its rows."""
        self.save_tensors(self.chunk_file(index), {"means": means}, {"ids": json.dumps(ids)})

    def activation_chunks(self) -> Iterator[tuple[list[str], torch.Tensor]]:
        """(record ids [n], response means [n, layers, hidden]) of every stored chunk, one chunk at a time, in order."""
        for path in sorted(self.root.glob(CHUNK_PATTERN)):
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
