"""The llama.cpp reference of `bench generate`: a clear error without the optional build, and (where
scripts/install-bench-extras.sh has built llama-cpp-python) the same greedy start as our model on the embedded GGUF."""

from __future__ import annotations

import sys

import pytest

from persona_axis.errors import PersonaAxisError
from persona_axis.generation import generate
from persona_axis.llamacpp_peer import INSTALL_HINT, LlamaCppPeer
from persona_axis.models import embedded_gguf_path, load_model


def test_missing_llama_cpp_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # makes `import llama_cpp` raise ImportError
    with pytest.raises(PersonaAxisError, match="install-bench-extras"):
        LlamaCppPeer(embedded_gguf_path(), sequences=1, length=64, threads=1)
    assert "\n" not in INSTALL_HINT


def test_peer_decodes_the_embedded_gguf_like_our_model() -> None:
    pytest.importorskip("llama_cpp", reason="optional: scripts/install-bench-extras.sh builds llama-cpp-python")
    lm = load_model("default", dtype="float32", progress=False)
    conversations = [[{"role": "user", "content": "What is the capital of France?"}],
                     [{"role": "user", "content": "Name three primary colours."}]]
    prompts = [lm.tokenizer(lm.chat_prompt(c), add_special_tokens=False).input_ids for c in conversations]
    replies = generate(lm, conversations, max_new_tokens=4, capture=False, stop_at_eos=False).token_ids
    peer = LlamaCppPeer(embedded_gguf_path(), sequences=2, length=max(map(len, prompts)) + 8, threads=1)
    try:
        together = peer.generate(prompts, 4)
        alone = [peer.generate([p], 4)[0] for p in prompts]
    finally:
        peer.close()
    assert together == alone  # parallel sequences do not leak into each other
    assert [r[:2] for r in together] == [r[:2] for r in replies]  # Q4_1 in llama.cpp vs its float32 dequantisation
