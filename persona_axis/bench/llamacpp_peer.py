"""llama.cpp as the outside reference for decode speed (`persona-axis bench generate`).

Runs the same GGUF file our model was converted from, on the same prompt token ids, greedy, with
one llama.cpp sequence per prompt decoded together (llama_decode on a batch holding one token per
live sequence), so batch 1 and batch 16 are measured the way our loop runs them. Needs the
optional `llama-cpp-python` build from scripts/install-bench-extras.sh.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from persona_axis.errors import PersonaAxisError, import_optional

INSTALL_HINT = "llama-cpp-python is not installed: run scripts/install-bench-extras.sh"


def _silence(llama_cpp: Any) -> None:
    """Route llama.cpp's log lines to nowhere (it prints every load and context detail to stderr)."""
    global _QUIET
    if _QUIET is None:
        _QUIET = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
        llama_cpp.llama_log_set(_QUIET, ctypes.c_void_p(0))


_QUIET: Any = None


class LlamaCppPeer:
    """A llama.cpp model and context sized for `sequences` parallel sequences of up to `length` tokens each."""

    def __init__(self, gguf: str | Path, sequences: int, length: int, threads: int) -> None:
        llama_cpp = import_optional("llama_cpp", INSTALL_HINT)
        _silence(llama_cpp)
        llama_cpp.llama_backend_init()
        self._lib = llama_cpp
        self.model = llama_cpp.llama_model_load_from_file(str(gguf).encode(), llama_cpp.llama_model_default_params())
        if not self.model:
            raise PersonaAxisError(f"llama.cpp could not load {gguf}")
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = sequences * length
        params.n_batch = params.n_ubatch = max(512, sequences, length)
        params.n_seq_max = sequences
        params.kv_unified = True
        params.n_threads = params.n_threads_batch = threads
        self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise PersonaAxisError("llama.cpp could not create a context")
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.capacity = params.n_batch
        self.batch = llama_cpp.llama_batch_init(self.capacity, 0, 1)

    def close(self) -> None:
        self._lib.llama_batch_free(self.batch)
        self._lib.llama_free(self.ctx)
        self._lib.llama_model_free(self.model)

    def _decode(self, entries: Sequence[tuple[int, int, int, bool]]) -> None:
        """Feed (token, position, sequence, wants_logits) entries [at most `capacity`] in one llama_decode."""
        if len(entries) > self.capacity:
            raise PersonaAxisError(f"{len(entries)} tokens in one step; the peer's batch holds {self.capacity}")
        for i, (token, position, sequence, logits) in enumerate(entries):
            self.batch.token[i], self.batch.pos[i] = token, position
            self.batch.n_seq_id[i], self.batch.seq_id[i][0] = 1, sequence
            self.batch.logits[i] = logits
        self.batch.n_tokens = len(entries)
        if self._lib.llama_decode(self.ctx, self.batch) != 0:
            raise PersonaAxisError("llama_decode failed (context too small for the prompts?)")

    def _argmax(self, index: int) -> int:
        """Greedy token from the logits of batch entry `index` of the last decode."""
        logits = np.ctypeslib.as_array(self._lib.llama_get_logits_ith(self.ctx, index), shape=(self.n_vocab,))
        return int(logits.argmax())

    def generate(self, prompts: Sequence[Sequence[int]], new_tokens: int) -> list[list[int]]:
        """Greedy continuation of every prompt (token ids), exactly `new_tokens` each, all sequences decoded together."""
        self._lib.llama_memory_clear(self._lib.llama_get_memory(self.ctx), True)
        replies = []
        for seq, prompt in enumerate(prompts):  # each prompt prefilled in one call; its last token's logits kept
            self._decode([(token, position, seq, position == len(prompt) - 1) for position, token in enumerate(prompt)])
            replies.append([self._argmax(len(prompt) - 1)])
        for step in range(1, new_tokens):
            self._decode([(reply[-1], len(prompt) + step - 1, seq, True)
                          for seq, (prompt, reply) in enumerate(zip(prompts, replies))])
            for seq, reply in enumerate(replies):
                reply.append(self._argmax(seq))
        return replies
