"""Runtime's per-call memos: the step factors once per UNet call, and as a float32 tensor a compiled UNet reads.

The truth here is each AdapterPrompt's own `step_factor` (a closed form of its window and schedule), called directly.
"""

from __future__ import annotations

import pytest
import torch

from ipadapter import AdapterPrompt, Reference
from ipadapter.embed_cache import tensor_key
from ipadapter.runtime import Runtime


def _prompts() -> dict[str, AdapterPrompt]:
    tokens = torch.zeros(1, 4, 8)
    return {
        "a": AdapterPrompt([Reference(tokens)], start=0.0, end=0.5),
        "b": AdapterPrompt([Reference(tokens)], start=0.2, end=1.0, schedule=lambda p: 1.0 - p),
        "c": AdapterPrompt([Reference(tokens)], start=0.0, end=1.0),
    }


_step_factor = AdapterPrompt.step_factor  # the unpatched closed form, for the expected values


def _expected(prompts: dict[str, AdapterPrompt], progress: float) -> list[float]:
    return [_step_factor(p, progress) for p in prompts.values()]


def test_step_factors_are_each_prompts_factor_computed_once_per_progress_and_generation(monkeypatch) -> None:
    calls: list[float | None] = []

    def counted(self: AdapterPrompt, progress: float | None) -> float:
        calls.append(progress)
        return _step_factor(self, progress)

    prompts = _prompts()
    runtime = Runtime()
    runtime.set(prompts, cfg=False)
    monkeypatch.setattr(AdapterPrompt, "step_factor", counted)
    runtime.progress = 0.3
    for _ in range(5):  # five layers of one UNet call
        factors = runtime.step_factors()
    assert list(factors.values()) == pytest.approx(_expected(prompts, 0.3)) and len(calls) == len(prompts)
    runtime.progress = 0.6
    factors = runtime.step_factors()
    assert list(factors.values()) == pytest.approx(_expected(prompts, 0.6)) and len(calls) == 2 * len(prompts)
    runtime.set(prompts, cfg=False)  # a new generation at the same progress computes again
    runtime.progress = 0.6
    runtime.step_factors()
    assert len(calls) == 3 * len(prompts)


def test_step_factors_are_the_same_dict_while_their_values_stay_and_a_new_one_when_they_change() -> None:
    """What the processors key their per-step decisions on: without a window or schedule every step gives the same
    factors, so the same dict; a step where a window opens or closes gives a new one, with the new values."""
    tokens = torch.zeros(1, 4, 8)
    runtime = Runtime()
    runtime.set({"a": AdapterPrompt([Reference(tokens)]), "b": AdapterPrompt([Reference(tokens)], end=0.5)}, cfg=True)
    seen = []
    for progress in (0.0, 0.25, 0.5, 0.75):
        runtime.progress = progress
        seen.append(runtime.step_factors())
    assert seen[0] is seen[1] and seen[2] is seen[3] and seen[1] is not seen[2]
    assert seen[1] == {"a": 1.0, "b": 1.0} and seen[2] == {"a": 1.0, "b": 0.0}


def test_step_tensor_holds_the_step_factors_in_prompt_order_as_float32_updated_in_place() -> None:
    prompts = _prompts()
    runtime = Runtime()
    runtime.set(prompts, cfg=False)
    runtime.progress = 0.1
    runtime.refresh_step_tensor(torch.device("cpu"))
    first = runtime.step_tensor
    assert first.dtype == torch.float32 and first.device.type == "cpu"
    assert first.tolist() == pytest.approx(_expected(prompts, 0.1))
    runtime.progress = 0.7
    runtime.refresh_step_tensor(torch.device("cpu"))
    assert runtime.step_tensor is first, "a compiled graph holds this tensor: a new step must change its values"
    assert first.tolist() == pytest.approx(_expected(prompts, 0.7))
    fewer = dict(list(prompts.items())[:2])
    runtime.set(fewer, cfg=False)
    runtime.progress = 0.7
    runtime.refresh_step_tensor(torch.device("cpu"))
    assert runtime.step_tensor is not first and runtime.step_tensor.tolist() == pytest.approx(_expected(fewer, 0.7))


def test_step_tensor_follows_the_device_and_stays_float32_under_another_default_dtype() -> None:
    prompts = _prompts()
    runtime = Runtime()
    runtime.set(prompts, cfg=False)
    runtime.progress = 0.3
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        runtime.refresh_step_tensor(torch.device("meta"))
        assert runtime.step_tensor.device.type == "meta" and runtime.step_tensor.dtype == torch.float32
        runtime.refresh_step_tensor(torch.device("cpu"))
        assert runtime.step_tensor.device.type == "cpu" and runtime.step_tensor.dtype == torch.float32
        assert runtime.step_tensor.tolist() == pytest.approx(_expected(prompts, 0.3))
    finally:
        torch.set_default_dtype(previous)


def test_the_prompts_with_per_layer_weights_are_known_however_the_runtime_got_them() -> None:
    """Layers share one plan unless a prompt varies per layer; `per_layer` says which do, whether the prompts came
    through `set` or the constructor, and cannot be given apart from them."""
    tokens = torch.zeros(1, 4, 8)
    prompts = {"plain": AdapterPrompt([Reference(tokens)]),
               "layered": AdapterPrompt([Reference(tokens)], layer_weights={"a": 1.0}),
               "uncond": AdapterPrompt([Reference(tokens)], uncond_layers=frozenset({"a"})),
               "own": AdapterPrompt([Reference(tokens, layer_weights={"a": 0.5})])}
    assert Runtime(prompts=prompts).per_layer == {"layered", "uncond", "own"}
    runtime = Runtime()
    runtime.set(prompts, cfg=False)
    assert runtime.per_layer == {"layered", "uncond", "own"}
    with pytest.raises(TypeError):
        Runtime(per_layer=frozenset())


def test_a_references_tokens_key_is_the_digest_of_the_tokens_it_holds_at_the_call(monkeypatch) -> None:
    """`tokens_key` finds K'/V' kept across generations: it must be `tensor_key(cond, uncond)` of the tensors the
    Reference holds when asked, after either is replaced (by another tensor, or None) or written in place. It is
    computed once while they stay (the digest reads the tokens: on a GPU, a wait)."""
    from ipadapter import runtime

    digests = []
    monkeypatch.setattr(runtime, "tensor_key", lambda *t: digests.append(1) or tensor_key(*t))
    ref = Reference(torch.randn(1, 4, 8), torch.randn(1, 4, 8))
    assert ref.tokens_key() == ref.tokens_key() == tensor_key(ref.cond, ref.uncond)
    assert len(digests) == 1
    changes = [lambda: setattr(ref, "cond", torch.randn(1, 4, 8)), lambda: setattr(ref, "uncond", torch.randn(1, 4, 8)),
               lambda: ref.uncond.mul_(2), lambda: ref.cond.mul_(2), lambda: ref.cond[0, 0].add_(1),
               lambda: setattr(ref, "uncond", None)]
    for change in changes:
        before = ref.tokens_key()
        change()
        assert ref.tokens_key() == tensor_key(ref.cond, ref.uncond) != before
    with torch.inference_mode():
        ref.cond = torch.randn(1, 4, 8)  # keeps no version counter
    assert ref.tokens_key() == ref.tokens_key() == tensor_key(ref.cond, None)
