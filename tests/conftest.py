"""Shared fixtures: the embedded tokenizer and tiny random models built from configs (no download)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import transformers
from chat_server import server  # noqa: F401  (fixture: a chat-completions server on 127.0.0.1)

from persona_axis.model.loading import LoadedModel, converted_gguf_dir, embedded_gguf_path, wrap_model

VOCAB = 49152  # the embedded SmolLM2 tokenizer's vocabulary, so tiny models can share it


def _text_kwargs() -> dict[str, Any]:
    return dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


def tiny_config(family: str) -> transformers.PretrainedConfig:
    """A 3-layer, 64-wide random config of a model family."""
    t = _text_kwargs()
    if family == "llama":
        return transformers.LlamaConfig(**t)
    if family == "qwen2":
        return transformers.Qwen2Config(**t)
    if family == "qwen3":
        return transformers.Qwen3Config(**t, head_dim=16)
    if family == "mistral":
        return transformers.MistralConfig(**t)
    if family == "phi3":
        return transformers.Phi3Config(**t, pad_token_id=0)
    if family == "gemma2":
        return transformers.Gemma2Config(**t, head_dim=16)
    if family == "gemma3_text":
        return transformers.Gemma3TextConfig(**t, head_dim=16)
    if family == "gemma3_multimodal":
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      image_size=28, patch_size=14)
        return transformers.Gemma3Config(text_config={**t, "head_dim": 16}, vision_config=vision, mm_tokens_per_image=4)
    if family == "gpt2":
        return transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=3, n_head=4, n_positions=512)
    if family == "gpt_neox":
        return transformers.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                          num_attention_heads=4, max_position_embeddings=512)
    raise ValueError(family)


FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "phi3", "gemma2", "gemma3_text", "gemma3_multimodal", "gpt2",
            "gpt_neox"]


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = tiny_config(family)
    if family == "gemma3_multimodal":
        return transformers.Gemma3ForConditionalGeneration(config).eval()
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="session")
def embedded_dir() -> str:
    directory, _ = converted_gguf_dir(embedded_gguf_path())
    return str(directory)


@pytest.fixture()
def tokenizer(embedded_dir: str) -> Any:
    return transformers.AutoTokenizer.from_pretrained(embedded_dir)


@pytest.fixture()
def tiny_llama(tokenizer: Any) -> LoadedModel:
    return wrap_model(tiny_model("llama"), tokenizer, name="tiny-llama")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, embedded_dir: str) -> str:
    """A tiny random Llama saved as a model directory (with the embedded tokenizer), loadable by spec."""
    directory = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_model("llama")
    model.generation_config.eos_token_id = 2
    model.save_pretrained(directory)
    transformers.AutoTokenizer.from_pretrained(embedded_dir).save_pretrained(directory)
    return str(directory)
