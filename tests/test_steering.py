from __future__ import annotations

import pytest
import torch

from persona_axis.decode.hooks import layer_hooks
from persona_axis.decode.interventions import Ablation, Addition, Cap, check_vector, mean_ablation, steer
from persona_axis.errors import PersonaAxisError
from persona_axis.model.loading import LoadedModel

H = 64


@pytest.fixture()
def x() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(3, 7, H) * 5


@pytest.fixture()
def v() -> torch.Tensor:
    torch.manual_seed(2)
    return torch.randn(H)


def test_addition(x: torch.Tensor, v: torch.Tensor) -> None:
    torch.testing.assert_close(Addition(v, coef=2.5)(x), x + 2.5 * v)


def test_ablation_sets_projection_and_keeps_orthogonal_part(x: torch.Tensor, v: torch.Tensor) -> None:
    d = v / v.norm()
    out = Ablation(v, coef=1.5)(x)
    torch.testing.assert_close(out @ d, torch.full(x.shape[:2], 1.5), atol=1e-4, rtol=0)
    torch.testing.assert_close(out - (out @ d)[..., None] * d, x - (x @ d)[..., None] * d, atol=1e-4, rtol=0)


def test_mean_ablation_uses_projection_of_mean(x: torch.Tensor, v: torch.Tensor) -> None:
    mean = x.reshape(-1, H).mean(0)
    out = mean_ablation(v, mean)(x)
    d = v / v.norm()
    torch.testing.assert_close(out @ d, torch.full(x.shape[:2], float(mean @ d)), atol=1e-4, rtol=0)


def test_cap_is_a_floor_and_changes_nothing_above(x: torch.Tensor, v: torch.Tensor) -> None:
    a = v / v.norm()
    proj = x @ a
    tau = float(proj.median())
    out = Cap(v, floor=tau)(x)
    after = out @ a
    assert (after >= tau - 1e-4).all()
    above = proj >= tau
    assert above.any() and (~above).any()
    torch.testing.assert_close(out[above], x[above])  # untouched where already at or above the floor
    torch.testing.assert_close(after[~above], torch.full_like(after[~above], tau), atol=1e-4, rtol=0)
    expected = x + torch.clamp(tau - proj, min=0)[..., None] * a  # the plain formula
    torch.testing.assert_close(out, expected)


def test_cap_in_bfloat16_computes_projection_in_float32(x: torch.Tensor, v: torch.Tensor) -> None:
    a = v / v.norm()
    out = Cap(v, floor=3.0)(x.bfloat16())
    assert out.dtype is torch.bfloat16
    assert ((out.float() @ a) >= 3.0 - 0.1).all()  # bf16 rounding of the result only


def test_last_position_only(x: torch.Tensor, v: torch.Tensor) -> None:
    out = Addition(v, coef=1.0, positions="last")(x)
    torch.testing.assert_close(out[:, :-1], x[:, :-1])
    torch.testing.assert_close(out[:, -1], x[:, -1] + v)


def test_vector_checks() -> None:
    with pytest.raises(PersonaAxisError, match=r"shape \(10,\) but the model's hidden size is 64"):
        check_vector(torch.zeros(10), 64)
    with pytest.raises(PersonaAxisError, match="NaN or inf"):
        check_vector(torch.full((64,), float("nan")), 64)
    with pytest.raises(PersonaAxisError, match="all zeros"):
        Cap(torch.zeros(64), floor=1.0)
    with pytest.raises(PersonaAxisError, match="positions"):
        Addition(torch.ones(64), positions="first")  # type: ignore[arg-type]


def _hook_count(lm: LoadedModel) -> int:
    return sum(len(layer._forward_hooks) for layer in lm.layers)


def test_steer_changes_the_forward_and_removes_hooks(tiny_llama: LoadedModel, v: torch.Tensor) -> None:
    ids = torch.tensor([[10, 11, 12, 13]])
    with torch.no_grad():
        base = tiny_llama.model(input_ids=ids).logits
        with steer(tiny_llama, {1: Addition(v, coef=10.0), 2: [Cap(v, floor=50.0), Addition(v, coef=1.0)]}):
            assert _hook_count(tiny_llama) == 2  # one fused hook per layer
            steered = tiny_llama.model(input_ids=ids).logits
        assert _hook_count(tiny_llama) == 0
        again = tiny_llama.model(input_ids=ids).logits
    assert not torch.allclose(base, steered)
    torch.testing.assert_close(base, again)


def test_steer_removes_hooks_on_exception(tiny_llama: LoadedModel, v: torch.Tensor) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with steer(tiny_llama, {0: Addition(v)}):
            raise RuntimeError("boom")
    assert _hook_count(tiny_llama) == 0


def test_steer_rejects_bad_layer_and_size(tiny_llama: LoadedModel) -> None:
    with pytest.raises(PersonaAxisError, match="out of range"):
        with steer(tiny_llama, {7: Addition(torch.ones(64))}):
            pass
    with pytest.raises(PersonaAxisError, match="hidden size is 64"):
        with steer(tiny_llama, {0: Addition(torch.ones(65))}):
            pass
    assert _hook_count(tiny_llama) == 0


def test_cap_on_model_layer_holds_floor(tiny_llama: LoadedModel, v: torch.Tensor) -> None:
    a = v / v.norm()
    seen: list[torch.Tensor] = []
    with torch.no_grad(), steer(tiny_llama, {1: Cap(v, floor=0.7)}):
        with layer_hooks(tiny_llama.layers, {1: [lambda h: seen.append(h @ a)]}):  # runs after the cap
            tiny_llama.model(input_ids=torch.tensor([[3, 4, 5, 6, 7]]))
    assert (seen[0] >= 0.7 - 1e-5).all()


def test_cap_tracks_engagement_on_generated_positions_only(v: torch.Tensor) -> None:
    a = v / v.norm()
    cap = Cap(v, floor=0.0, track=True)
    prompt = torch.stack([a, -a, -a])[None] * 3  # [1, 3, H]: a prefill pass is not counted
    cap(prompt)
    assert cap.engaged() == 0.0
    for sign in (1, -1, -1, -1):  # four generated tokens, three below the floor
        cap((sign * a)[None, None])
    assert cap.engaged() == 0.75
    cap.reset()
    assert cap.engaged() == 0.0
