"""The llama.cpp reference of `bench generate`: a clear error without the optional build, and (where
scripts/install-bench-extras.sh has built llama-cpp-python) the same greedy start as our model on the embedded GGUF."""

from __future__ import annotations

import sys

import pytest
import torch

from persona_axis.bench.llamacpp_peer import INSTALL_HINT, LlamaCppPeer
from persona_axis.errors import PersonaAxisError
from persona_axis.model.loading import embedded_gguf_path, load_model


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
    peer = LlamaCppPeer(embedded_gguf_path(), sequences=2, length=max(map(len, prompts)) + 8, threads=1)
    try:
        together = peer.generate(prompts, 4)
        alone = [peer.generate([p], 4)[0] for p in prompts]
    finally:
        peer.close()
    assert together == alone  # parallel sequences do not leak into each other
    # llama.cpp multiplies Q4_1 weights by 8-bit activations, we run their float32 dequantisation: near-ties
    # may flip (the first prompt's top two logits differ by 0.08), so its first token is one of our top 3.
    with torch.inference_mode():
        for prompt, reply in zip(prompts, together):
            logits = lm.model(input_ids=torch.tensor([prompt])).logits[0, -1]
            assert reply[0] in logits.topk(3).indices.tolist()
