"""Recorders on their own: the two-pass reference against transformers' hidden states (left padding
included), read-only hooks, and the step recorders' masking. One-pass capture during generation
against these references is in test_generation.py."""

from __future__ import annotations

import torch

from persona_axis.decode.capture import (
    MaskedMeanRecorder,
    StepMeanRecorder,
    StepProjectionRecorder,
    response_means_by_forward,
)
from persona_axis.decode.hooks import layer_hooks
from persona_axis.model.loading import LoadedModel

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]
RESPONSES = [[20, 21], [22, 23, 24, 25, 26], [27]]


def hf_response_means(lm: LoadedModel, prompt: list[int], response: list[int]) -> torch.Tensor:
    """[layers - 1, hidden]: transformers' own hidden states of one unpadded sequence, averaged over the
    response; hidden_states[layer + 1] is layer's output except for the last layer (final norm applied)."""
    with torch.no_grad():
        states = lm.model(input_ids=torch.tensor([prompt + response]), output_hidden_states=True).hidden_states
    return torch.stack([states[layer + 1][0, len(prompt):].mean(0) for layer in range(lm.n_layers - 1)])


def test_two_pass_means_match_transformers_whatever_the_padding(tiny_llama: LoadedModel) -> None:
    layers = range(tiny_llama.n_layers)
    batched = response_means_by_forward(tiny_llama, PROMPTS, RESPONSES, layers, batch_size=3)  # left-padded
    alone = response_means_by_forward(tiny_llama, PROMPTS, RESPONSES, layers, batch_size=1)
    assert batched.shape == (3, 3, 64) and batched.dtype is torch.float32
    torch.testing.assert_close(batched, alone, atol=1e-4, rtol=1e-4)
    for i, (prompt, response) in enumerate(zip(PROMPTS, RESPONSES)):
        expected = hf_response_means(tiny_llama, prompt, response)
        torch.testing.assert_close(batched[i, :-1], expected, atol=1e-4, rtol=1e-4)


def test_recording_changes_nothing_in_the_forward(tiny_llama: LoadedModel) -> None:
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        plain = tiny_llama.model(input_ids=ids).logits
        recorder = MaskedMeanRecorder([0, 1, 2], torch.ones(1, len(PROMPTS[0])))
        with layer_hooks(tiny_llama.layers, recorder.ops()):
            recorded = tiny_llama.model(input_ids=ids).logits
    torch.testing.assert_close(recorded, plain, atol=0, rtol=0)
    assert recorder.means().shape == (1, 3, 64)


def test_masked_mean_recorder_is_the_plain_masked_mean() -> None:
    hidden = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 0]])
    recorder = MaskedMeanRecorder([7], mask)
    [op] = recorder.ops()[7]
    op(hidden)
    means = recorder.means()
    torch.testing.assert_close(means[0, 0], hidden[0, 1:3].mean(0))
    assert means[1].abs().sum() == 0  # no selected position: zero, not NaN


def test_step_mean_recorder_averages_only_the_committed_rows_of_the_last_position() -> None:
    recorder = StepMeanRecorder([0, 2], batch=2, hidden=3, device=torch.device("cpu"))
    ops = recorder.ops()
    steps = [torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(k)) for k in range(3)]
    masks = [torch.tensor([True, False]), torch.tensor([True, False]), torch.tensor([False, False])]
    for hidden, mask in zip(steps, masks):
        ops[0][0](hidden)
        ops[2][0](hidden * 2)
        recorder.commit(mask)
    means = recorder.means()  # [batch, layers, hidden]
    expected = (steps[0][0, -1] + steps[1][0, -1]) / 2
    torch.testing.assert_close(means[0, 0], expected)
    torch.testing.assert_close(means[0, 1], 2 * expected)
    assert means[1].abs().sum() == 0 and recorder.counts.tolist() == [2.0, 0.0]


def test_step_projection_recorder_keeps_masked_tokens_in_order_on_the_unit_direction() -> None:
    direction = torch.tensor([3.0, 4.0])  # norm 5: projections use the unit direction
    recorder = StepProjectionRecorder(1, direction, batch=2, device=torch.device("cpu"))
    [op] = recorder.ops()[1]
    assert recorder.values == [[], []]
    for step, mask in enumerate([[True, True], [False, True], [True, False]]):
        op(torch.tensor([[[0.0, 0.0], [5.0 * step, 0.0]], [[0.0, 0.0], [0.0, 10.0 * step]]]))
        recorder.commit(torch.tensor(mask))
    assert recorder.values == [[0.0, 6.0], [0.0, 8.0]]
    assert recorder.last.tolist() == [6.0, 16.0]
