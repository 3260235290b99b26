"""The models' fingerprint that keys the feature cache: what changes it and what must not."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ipadapter.train.models import module_fingerprint
from tests import factories


def _seeded_linear(config: dict) -> nn.Module:
    """The same weights every time, with a diffusers-like config (a mapping) of our choosing."""
    torch.manual_seed(0)
    module = nn.Linear(4, 4)
    module.config = config
    return module


def test_no_module_has_an_empty_fingerprint_and_a_copy_has_the_same() -> None:
    module = nn.Linear(8, 4)
    assert module_fingerprint(None) == ""
    fingerprint = module_fingerprint(module)
    assert len(fingerprint) == 16 and int(fingerprint, 16) >= 0
    assert module_fingerprint(copy.deepcopy(module)) == fingerprint


def test_values_are_sampled_every_numel_over_samples_th() -> None:
    """The docstring's stride: of 1,024 values with 256 samples every 4th counts (0, 4, 8, ...), the rest do not."""
    module = nn.Linear(32, 32, bias=False)
    before = module_fingerprint(module)
    with torch.no_grad():
        module.weight.view(-1)[5] += 1.0
    assert module_fingerprint(module) == before
    with torch.no_grad():
        module.weight.view(-1)[4] += 1.0
    assert module_fingerprint(module) != before
    assert module_fingerprint(module, samples=1024) != module_fingerprint(module, samples=256)


def test_names_and_shapes_count_as_well_as_values() -> None:
    a, b = nn.Module(), nn.Module()
    a.register_buffer("x", torch.arange(8.0).reshape(2, 4))
    b.register_buffer("y", torch.arange(8.0).reshape(2, 4))
    assert module_fingerprint(a) != module_fingerprint(b)
    b = nn.Module()
    b.register_buffer("x", torch.arange(8.0).reshape(4, 2))
    assert module_fingerprint(a) != module_fingerprint(b)


def test_the_config_counts_but_not_its_private_or_version_fields() -> None:
    """Same weights, another setting (a text encoder's layer-norm epsilon, a VAE's upcast flag): another model.
    Where it was saved from and with which library version: the same model."""
    encoder = factories.tiny_text_encoder(16)
    same = copy.deepcopy(encoder)
    same.config._name_or_path = "somewhere/else"
    same.config.transformers_version = "0.0.1"
    assert module_fingerprint(same) == module_fingerprint(encoder)
    other = copy.deepcopy(encoder)
    other.config.layer_norm_eps = 0.5
    assert module_fingerprint(other) != module_fingerprint(encoder)
    vae = factories.tiny_vae()
    before = module_fingerprint(vae)
    vae.register_to_config(force_upcast=not vae.config.force_upcast)
    assert module_fingerprint(vae) != before


def test_precision_and_provenance_fields_of_any_config_do_not_count() -> None:
    """A diffusers-like config (a mapping): the weights' precision as older and newer transformers name it
    (`torch_dtype`, `dtype`), the library version and private fields like `_name_or_path` leave the hash alone;
    every other field is hashed."""
    def with_config(**config) -> nn.Module:
        return _seeded_linear({"hidden": 4, **config})

    base = module_fingerprint(with_config(torch_dtype="float32", dtype="float32", transformers_version="4.40.0",
                                          _name_or_path="a"))
    assert module_fingerprint(with_config(torch_dtype="float16", dtype="bfloat16", transformers_version="5.0.0",
                                          _name_or_path="b")) == base
    assert module_fingerprint(with_config()) == base
    assert module_fingerprint(with_config(hidden=8)) != base
    assert module_fingerprint(with_config(extra=None)) != base


def test_a_small_tensor_counts_every_value() -> None:
    module = nn.Module()
    module.register_buffer("x", torch.zeros(8))
    before = module_fingerprint(module)
    module.x[1] = 1.0
    assert module_fingerprint(module) != before


def test_a_configs_field_order_does_not_count_and_any_value_is_hashed() -> None:
    """Fields written in another order: the same model. A value JSON cannot hold (a dtype) is hashed by its name."""
    assert module_fingerprint(_seeded_linear({"a": 1, "b": 2})) == module_fingerprint(_seeded_linear({"b": 2, "a": 1}))
    half, bf16 = (module_fingerprint(_seeded_linear({"compute": d})) for d in (torch.float16, torch.bfloat16))
    assert half != bf16
