from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import FAMILIES, tiny_model

from persona_axis.decode.hooks import layer_hooks
from persona_axis.errors import PersonaAxisError
from persona_axis.model import loading as models
from persona_axis.model.loading import (
    cpu_flags,
    embedded_gguf_path,
    find_decoder_layers,
    load_model,
    prepare_messages,
    resolve_dtype,
    wrap_model,
)

NO_SYSTEM_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


@pytest.mark.parametrize("family", FAMILIES)
def test_decoder_layers_are_found_and_hooked(family: str, tokenizer: Any) -> None:
    model = tiny_model(family)
    lm = wrap_model(model, tokenizer)
    assert lm.n_layers == 3 and lm.hidden_size == 64
    assert lm.layers is find_decoder_layers(model)
    seen: list[tuple[int, ...]] = []
    ops = {i: [lambda h: seen.append(tuple(h.shape))] for i in range(3)}
    with layer_hooks(lm.layers, ops), torch.no_grad():
        model(input_ids=torch.tensor([[5, 6, 7, 8]]))
    assert seen == [(1, 4, 64)] * 3  # each decoder layer's output is the residual stream


def test_template_without_system_role_folds_system_into_first_user_turn(tokenizer: Any) -> None:
    tokenizer.chat_template = NO_SYSTEM_TEMPLATE
    lm = wrap_model(tiny_model("gemma2"), tokenizer)
    assert lm.system_role is False
    text = lm.chat_prompt([{"role": "system", "content": "You are a hermit."}, {"role": "user", "content": "Hello?"}])
    assert text == "<start_of_turn>user\nYou are a hermit.\n\nHello?<end_of_turn>\n<start_of_turn>model\n"


def test_system_role_kept_and_empty_system_dropped(tiny_llama: Any) -> None:
    assert tiny_llama.system_role is True
    with_system = tiny_llama.chat_prompt([{"role": "system", "content": "You are a hermit."},
                                          {"role": "user", "content": "Hi"}])
    assert "<|im_start|>system\nYou are a hermit.<|im_end|>" in with_system
    empty = tiny_llama.chat_prompt([{"role": "system", "content": " "}, {"role": "user", "content": "Hi"}])
    assert empty == tiny_llama.chat_prompt([{"role": "user", "content": "Hi"}])  # the model's own default applies


def test_prepare_messages_without_user_turn() -> None:
    assert prepare_messages([{"role": "system", "content": "S"}], system_role=False) == [{"role": "user", "content": "S"}]


def test_check_layer(tiny_llama: Any) -> None:
    assert tiny_llama.check_layer(-1) == 2
    with pytest.raises(PersonaAxisError, match="layer 3 is out of range.*has 3 layers"):
        tiny_llama.check_layer(3)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no-such-model", "unknown model 'no-such-model'"),
        ("/nonexistent/model.gguf", "GGUF file not found"),
    ],
)
def test_bad_model_specs(spec: str, message: str) -> None:
    with pytest.raises(PersonaAxisError, match=message):
        load_model(spec)


def test_directory_without_config(tmp_path: Path) -> None:
    with pytest.raises(PersonaAxisError, match="without config.json"):
        load_model(str(tmp_path))


def test_local_directory_loads(tmp_path: Path, tokenizer: Any) -> None:
    tiny_model("qwen2").save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    lm = load_model(str(tmp_path), dtype="float32", device="cpu")
    assert (lm.n_layers, lm.hidden_size, lm.dtype) == (3, 64, torch.float32)
    assert lm.source_hash


@pytest.mark.parametrize("flags, expected", [({"avx2", "amx_bf16"}, torch.bfloat16),
                                             ({"avx512f", "avx512_bf16"}, torch.bfloat16),
                                             ({"avx2", "avx512f"}, torch.float32), (set(), torch.float32)])
def test_auto_dtype_follows_the_cpu_flags(monkeypatch: pytest.MonkeyPatch, flags: set[str],
                                          expected: torch.dtype) -> None:
    monkeypatch.setattr(models, "cpu_flags", lambda: flags)
    assert resolve_dtype("auto", torch.device("cpu")) is expected


def test_cpu_flags_reads_the_flags_line(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: amx_bf16 lookalike\nflags\t\t: fpu avx2 amx_bf16\n\n"
                       "processor\t: 1\nflags\t\t: fpu avx2 amx_bf16\n")
    assert cpu_flags(cpuinfo) == {"fpu", "avx2", "amx_bf16"}
    assert cpu_flags(tmp_path / "missing") == set()


def test_resolve_dtype() -> None:
    assert resolve_dtype("float32", torch.device("cpu")) is torch.float32
    with pytest.raises(PersonaAxisError, match="unknown dtype"):
        resolve_dtype("int3", torch.device("cpu"))


@pytest.mark.parametrize("make", [lambda gguf: gguf.read_bytes()[:1000],  # truncated inside the header
                                  lambda gguf: gguf.read_bytes()[:3_000_000],  # truncated inside the tensors
                                  lambda gguf: bytes(range(256)) * 20])  # not a GGUF file at all
def test_broken_gguf_is_a_one_line_error_and_leaves_no_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              make: Any) -> None:
    monkeypatch.setenv("PERSONA_AXIS_CACHE", str(tmp_path / "cache"))
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(make(embedded_gguf_path()))
    with pytest.raises(PersonaAxisError, match=r"cannot read .*broken\.gguf .*truncated, corrupt or not a GGUF") as info:
        load_model(str(broken), dtype="float32", progress=False)
    assert "\n" not in str(info.value)
    cache = tmp_path / "cache" / "gguf"
    assert not cache.exists() or not any(cache.iterdir())


def test_progress_false_silences_transformers_bars_and_restores_them(tmp_path: Path, tokenizer: Any,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    tiny_model("llama").save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    seen: list[bool] = []
    load = AutoModelForCausalLM.from_pretrained

    def watched(*args: Any, **kwargs: Any) -> Any:
        seen.append(hf_logging.is_progress_bar_enabled())
        return load(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", watched)
    hf_logging.enable_progress_bar()
    load_model(str(tmp_path), dtype="float32", device="cpu", progress=False)
    load_model(str(tmp_path), dtype="float32", device="cpu")
    assert seen == [False, True]
    assert hf_logging.is_progress_bar_enabled()
