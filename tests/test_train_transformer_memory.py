"""`ipadapter train --dry-run` for FLUX and SD 3 runs: the parameters it counts are the real pipeline's (the
transformer alone with a feature cache), the trainable ones a new adapter's, and the activations it estimates on fake
tensors are what a real run's training step saves for its backward pass."""

from __future__ import annotations

import weakref

import pytest
import torch

from ipadapter.train.config import TrainConfig
from ipadapter.train.transformer_memory import estimate_transformer
from tests import dit_factories as df
from tests import factories

FAMILIES = {"flux": df.save_flux_base, "sd3": df.save_sd3_base}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def setup(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    return request.param, FAMILIES[request.param](root), factories.write_images(root / "data", 2)


def _config(setup, tmp_path, **overrides) -> TrainConfig:
    variant, base, data = setup
    values = dict(variant=variant, base=str(base), image_encoder=str(base / "image_encoder"), data=str(data),
                  resolution=16, batch_size=2, max_steps=1, num_workers=0, drop_image=0.0, drop_text=0.0,
                  drop_both=0.0, output=str(tmp_path / "run"))
    return TrainConfig(**{**values, **overrides})


def _count(modules) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def test_the_counts_are_the_real_pipelines_and_a_new_adapters(setup, tmp_path) -> None:
    from ipadapter.dit.train import family
    from ipadapter.siglip import encoder_class
    from ipadapter.train.transformer_feed import load_transformer_pipeline

    variant, base, _ = setup
    parts = family(variant)
    pipe = load_transformer_pipeline(str(base), parts, torch.float32)
    encoder = encoder_class(str(base / "image_encoder"), None).from_pretrained(str(base / "image_encoder"))
    modules = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)] + [encoder.model]
    adapter = parts.new_adapter(pipe.transformer, encoder.dim(parts.image_features), 4 if variant == "flux" else 64)
    found = estimate_transformer(_config(setup, tmp_path), batch_sizes=(1,))
    assert found.frozen_params == _count(modules) and found.trainable_params == _count([adapter])
    cached = estimate_transformer(_config(setup, tmp_path, cache="somewhere"), batch_sizes=(1,))
    assert cached.frozen_params == _count([pipe.transformer]) and cached.trainable_params == found.trainable_params


@pytest.mark.usefixtures("fresh_accelerate_state")
@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_the_estimated_activations_are_what_a_real_training_step_saves(setup, tmp_path, monkeypatch,
                                                                        precision) -> None:
    """The dry run (fake tensors, shapes from the configs: the text tokens as the family's encoders pad them, the
    image features as its encoder gives them, FLUX's packed latents) against a real run's step on the CPU."""
    import ipadapter.dit.flow as flow
    from ipadapter.train.transformer import train_transformer

    config = _config(setup, tmp_path, mixed_precision=precision)
    found = estimate_transformer(config, batch_sizes=(2,)).activations[2]
    loss, seen = flow.flow_matching_loss, []

    def measured(*args, **kwargs):
        saved: dict[int, tuple[weakref.ref, int]] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            if not isinstance(t._base if t._base is not None else t, torch.nn.Parameter):
                saved[id(t)] = weakref.ref(t), t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            result = loss(*args, **kwargs)
        seen.append(sum(size for alive, size in saved.values() if alive() is not None))
        return result

    monkeypatch.setattr(flow, "flow_matching_loss", measured)
    train_transformer(config)
    assert len(seen) == 1 and seen[0] > 0
    if precision == "no":
        assert seen[0] == found
    else:  # the fake kernels may keep a normalisation's statistics in another precision than the CPU's: a few bytes
        assert seen[0] == pytest.approx(found, rel=1e-3)


def test_the_dry_run_prints_the_estimate_and_writes_nothing(setup, tmp_path, capsys) -> None:
    from ipadapter.cli.main import main

    variant, base, data = setup
    out = tmp_path / "run"
    assert main(["train", "--variant", variant, "--base", str(base), "--image-encoder", str(base / "image_encoder"),
                 "--resolution", "16", "--dry-run", "--output", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"base {base}, variant {variant}, 16 px, precision no")
    assert [line.split(":")[0].strip() for line in lines[-4:]] == [f"batch {b}" for b in (1, 2, 4, 8)]
    assert not out.exists()


@pytest.mark.parametrize("flags, says", [(["--resolution", "15"], "--resolution 15"),
                                         (["--stages", "16:1", "15:1"], "--stages entry 15:1: resolution 15")])
def test_a_size_the_run_would_refuse_is_refused_by_the_dry_run(setup, capsys, flags, says) -> None:
    from ipadapter.cli.main import main

    variant, base, _ = setup
    step = {"flux": 4, "sd3": 2}[variant]  # the tiny bases' VAE downscale (2) × FLUX's packing or SD 3's patch (1)
    name = {"flux": "FLUX", "sd3": "SD 3"}[variant]
    assert main(["train", "--variant", variant, "--base", str(base), "--image-encoder", str(base / "image_encoder"),
                 "--dry-run", *flags]) != 0
    assert capsys.readouterr().err.strip().startswith(f"ipadapter: error: {says} does not fit this {name} base: it "
                                                      f"must be a multiple of {step} (")


def test_the_optimizer_and_ema_change_the_static_part_by_their_states(setup, tmp_path) -> None:
    """Per trainable weight: 8-bit AdamW keeps 2 one-byte states where AdamW keeps 2 fp32 ones (6 bytes fewer), an
    EMA one fp32 copy more (4 bytes); the frozen weights are counted in the run's precision."""
    plain = estimate_transformer(_config(setup, tmp_path), batch_sizes=(1,))
    assert plain.static_bytes == plain.frozen_params * 4 + plain.trainable_params * (4 + 4 + 8)
    for change, per_trainable in (({"optimizer": "adamw8bit"}, -6), ({"ema_decay": 0.999}, 4)):
        changed = estimate_transformer(_config(setup, tmp_path, **change), batch_sizes=(1,))
        assert changed.static_bytes - plain.static_bytes == per_trainable * plain.trainable_params
    half = estimate_transformer(_config(setup, tmp_path, mixed_precision="bf16"), batch_sizes=(1,))
    assert plain.static_bytes - half.static_bytes == 2 * plain.frozen_params


def test_a_hub_base_and_encoder_are_read_from_the_cache_alone(setup, tmp_path, monkeypatch) -> None:
    """Online, a base and an encoder (in a subfolder of its repository) in the Hugging Face cache are read from it
    without a request, as a run reads them; a part missing from the cache is named with its download advice."""
    import shutil

    from ipadapter.errors import IPAdapterError

    variant, base, _ = setup
    cache = tmp_path / "hub"
    factories.write_hub_cache(cache, "qa/base", base)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    sent = factories.hub_without_network(monkeypatch, cache)
    local = estimate_transformer(_config(setup, tmp_path), batch_sizes=(1,))
    hub = _config(setup, tmp_path, base="qa/base", image_encoder="qa/base/image_encoder")
    assert estimate_transformer(hub, batch_sizes=(1,)) == local and [url for url in sent if "qa/" in url] == []
    snapshot = next((cache / "models--qa--base" / "snapshots").iterdir())
    for part in ("text_encoder/config.json", "model_index.json", "image_encoder/config.json"):
        (snapshot / part).rename(tmp_path / "aside")
        with pytest.raises(IPAdapterError) as caught:
            estimate_transformer(hub, batch_sizes=(1,))
        what = "the image encoder" if part.startswith("image") else "the base model"
        assert str(caught.value).startswith(f"{what} qa/base")
        assert "hf download qa/base" in str(caught.value)
        shutil.move(tmp_path / "aside", snapshot / part)
