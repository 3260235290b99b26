"""The feature cache of FLUX and SD 3 runs (`--cache`): built by one pass of the frozen models, it trains the adapter
the run without it trains (bit for bit, in fp32 and one sample a batch, where both encode each image alone); a run
from the complete cache loads the transformer and scheduler alone and needs no data, and its validation grid is the
uncached run's; a cache of other settings or of another denoiser is refused in one line, before any output."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ipadapter.cli.main import main
from ipadapter.errors import IPAdapterError
from ipadapter.train.config import TrainConfig
from ipadapter.train.transformer import train_transformer
from tests import dit_factories as df
from tests import factories

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # every run builds an Accelerator
FAMILIES = {"flux": df.save_flux_base, "sd3": df.save_sd3_base}
FROZEN = {"flux": ("vae", "text_encoder", "text_encoder_2"), "sd3": ("vae", "text_encoder", "text_encoder_2",
                                                                      "text_encoder_3")}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def setup(request, tmp_path_factory):
    """(variant, base folder, a manifest of four images)."""
    root = tmp_path_factory.mktemp(request.param)
    return request.param, FAMILIES[request.param](root), factories.write_images(root / "data", 4)


def _flags(setup, out: Path, cache: Path | None, *, data: bool = True) -> list[str]:
    variant, base, manifest = setup
    flags = ["--variant", variant, "--base", str(base), "--image-encoder", str(base / "image_encoder"),
             "--resolution", "16", "--batch-size", "1", "--max-steps", "3", "--num-workers", "0", "--seed", "3",
             "--learning-rate", "1e-2", "--drop-text", "0.4", "--drop-both", "0.3", "--validate-every", "1",
             "--validation-images", str(manifest.parent / "img1.png"),
             "--validation-prompts", "", "--validation-steps", "2", "--output", str(out)]
    if data:
        flags += ["--data", str(manifest)]
    if cache is not None:
        flags += ["--cache", str(cache), "--cache-dtype", "float32"]
    return flags


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "ip-adapter.safetensors"))


def test_the_cache_trains_what_the_frozen_models_train_and_a_run_from_it_loads_the_transformer_alone(
        setup, tmp_path, monkeypatch) -> None:
    """Three runs of one config: without the cache, building it, and from it alone (no --data), as a user runs them.
    The third loads no frozen model to train; its first validation loads them around the trained transformer to
    encode the prompts and references, and the later ones load nothing but draw with that VAE."""
    import ipadapter.train.feed as feed
    import ipadapter.train.transformer_feed as transformer_feed

    variant, base, _ = setup
    cache = tmp_path / "cache"
    assert main(["train", *_flags(setup, tmp_path / "plain", None)]) == 0
    pipes, encoders = [], []
    load_pipe, load_encoder = transformer_feed.load_transformer_pipeline, feed.load_image_encoder

    def pipeline(source, family, dtype, **parts):
        pipes.append(load_pipe(source, family, dtype, **parts))
        return pipes[-1]

    def image_encoder(config):
        encoders.append((len(pipes), load_encoder(config)))
        return encoders[-1][1]

    monkeypatch.setattr(transformer_feed, "load_transformer_pipeline", pipeline)
    monkeypatch.setattr(feed, "load_image_encoder", image_encoder)
    assert main(["train", *_flags(setup, tmp_path / "built", cache)]) == 0
    assert (cache / "index.json").is_file()
    building = pipes[0]  # the cache is built without the transformer in memory
    assert building.transformer is None and all(getattr(building, part) is not None for part in FROZEN[variant])
    pipes.clear(), encoders.clear()
    assert main(["train", *_flags(setup, tmp_path / "cached", cache, data=False)]) == 0
    assert [when for when, _ in encoders] == [2], "the image encoder was loaded to train from a complete cache"
    trained, drew, *redrew = pipes
    assert trained.scheduler is not None and all(getattr(trained, part) is None for part in FROZEN[variant])
    assert len(redrew) == 2 and all(p.transformer is trained.transformer for p in (drew, *redrew))
    assert all(getattr(drew, part) is not None for part in FROZEN[variant])
    assert all(p.vae is drew.vae and all(getattr(p, part) is None for part in FROZEN[variant] if part != "vae")
               for p in redrew)

    plain = _weights(tmp_path / "plain")
    for run in ("built", "cached"):
        weights = _weights(tmp_path / run)
        assert weights.keys() == plain.keys() and all(torch.equal(weights[k], plain[k]) for k in plain), run
        assert (tmp_path / run / "logs" / "losses.csv").read_text() == \
            (tmp_path / "plain" / "logs" / "losses.csv").read_text()
        for step in (1, 2, 3):
            assert (tmp_path / run / "validation" / f"step-{step:08d}.png").read_bytes() == \
                (tmp_path / "plain" / "validation" / f"step-{step:08d}.png").read_bytes()


def _config(setup, out: Path, cache: Path, **overrides) -> TrainConfig:
    variant, base, manifest = setup
    values = dict(variant=variant, base=str(base), image_encoder=str(base / "image_encoder"), data=str(manifest),
                  resolution=16, batch_size=2, max_steps=1, num_workers=0, cache=str(cache), output=str(out))
    return TrainConfig(**{**values, **overrides})


def test_a_cache_of_other_settings_or_of_another_denoiser_is_refused(setup, tmp_path, caplog) -> None:
    cache, data = tmp_path / "cache", factories.write_images(tmp_path / "data", 3, corrupt=1)
    with caplog.at_level(logging.INFO, logger="ipadapter.train"):
        train_transformer(_config(setup, tmp_path / "built", cache, data=str(data)))
    assert any(m.startswith("feature cache built: skipped 1 sample(s): 1 ") for m in caplog.messages)
    fingerprint = json.loads((cache / "index.json").read_text())["fingerprint"]
    assert fingerprint["denoiser"] == setup[0] and fingerprint["cache_dtype"] == "float16"
    assert fingerprint["features"] == {"flux": "global", "sd3": "patch"}[setup[0]] and fingerprint["sdxl"] is False
    assert {t.dtype for f in cache.glob("part-*.safetensors") for t in load_file(str(f)).values()} == {torch.float16}
    with pytest.raises(IPAdapterError, match=r"^the feature cache .* was built with cache_dtype = 'float16' but "
                                             r"this run has 'bfloat16'; use another --cache folder"):
        train_transformer(_config(setup, tmp_path / "other", cache, cache_dtype="bfloat16"))
    index = json.loads((cache / "index.json").read_text())
    del index["fingerprint"]["denoiser"]  # as a UNet run's cache built before the denoiser was recorded
    (cache / "index.json").write_text(json.dumps(index))
    with pytest.raises(IPAdapterError, match=rf"was built with denoiser = 'unet' but this run has '{setup[0]}'"):
        train_transformer(_config(setup, tmp_path / "unet", cache))
    assert not (tmp_path / "other").exists() and not (tmp_path / "unet").exists()


def test_an_init_file_for_other_features_than_the_cache_holds_is_refused(setup, tmp_path) -> None:
    """From a complete cache no image encoder is loaded: the cache's own rows give the width the file must read."""
    from ipadapter.dit.train import family
    from ipadapter.train.transformer_feed import load_transformer_pipeline

    variant, base, _ = setup
    cache = tmp_path / "cache"
    train_transformer(_config(setup, tmp_path / "built", cache))
    parts = family(variant)
    transformer = load_transformer_pipeline(str(base), parts, torch.float32).transformer
    width = load_file(str(cache / "part-000-00000.safetensors"))["image"].shape[-1]
    tokens = 4 if variant == "flux" else 64
    other = parts.save(parts.new_adapter(transformer, width + 3, tokens), tmp_path / "other.safetensors")
    with pytest.raises(IPAdapterError) as caught:
        train_transformer(_config(setup, tmp_path / "run", cache, data="", init_from=str(other)))
    assert str(caught.value) == (f"{other} expects {width + 3}-wide image features but the feature cache {cache} "
                                 f"holds {width}-wide ones; use the image encoder the adapter was trained with")


def test_the_frozen_models_that_build_the_cache_and_draw_its_grids_are_in_the_runs_precision(setup, tmp_path,
                                                                                              monkeypatch) -> None:
    import ipadapter.train.feed as feed
    import ipadapter.train.transformer_feed as transformer_feed

    variant = setup[0]
    made, load_pipe, load_encoder = [], transformer_feed.load_transformer_pipeline, feed.load_image_encoder

    def pipeline(*args, **parts):
        made.append(load_pipe(*args, **parts))
        return made[-1]

    def image_encoder(config):
        encoder = load_encoder(config)
        made.append(encoder.model)
        return encoder

    monkeypatch.setattr(transformer_feed, "load_transformer_pipeline", pipeline)
    monkeypatch.setattr(feed, "load_image_encoder", image_encoder)
    flags = _flags(setup, tmp_path / "run", tmp_path / "cache")
    flags[flags.index("--max-steps") + 1] = "1"
    flags[flags.index("--validate-every") + 1] = "1"
    assert main(["train", *flags, "--mixed-precision", "bf16"]) == 0
    built, encoder, trained, drew, drew_encoder = made  # the build's pipeline and encoder; training's; validation's
    models = [getattr(p, part) for p in (built, drew) for part in FROZEN[variant]] + [encoder, drew_encoder]
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for m in models for p in m.parameters())
    assert all(p.dtype == torch.bfloat16 for p in trained.transformer.parameters())


@pytest.mark.parametrize("changed", ["vae", "image_encoder"])
def test_a_cache_of_other_frozen_models_is_refused(setup, tmp_path, changed) -> None:
    """Another VAE (or text encoder) or another image encoder than built the cache: refused, naming which."""
    import shutil

    variant, base, manifest = setup
    cache = tmp_path / "cache"
    train_transformer(_config(setup, tmp_path / "built", cache))
    other = tmp_path / "other"
    shutil.copytree(base, other)
    weights = next((other / changed).glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of the last weight
    weights.write_bytes(bytes(data))
    overrides = {"base": str(other)} if changed == "vae" else {"image_encoder": str(other / changed)}
    entry = "base (VAE + text encoders)" if changed == "vae" else "image encoder"
    with pytest.raises(IPAdapterError, match=rf"^the feature cache {cache} was built with {re.escape(entry)} = "):
        train_transformer(_config(setup, tmp_path / "run", cache, **overrides))


def test_a_cache_folder_holding_other_files_is_refused_before_anything_loads(setup, tmp_path, monkeypatch) -> None:
    """`--cache` naming the data's folder (by a slip): the build would start by emptying it; refused, nothing lost."""
    import ipadapter.train.transformer_feed as transformer_feed

    variant, base, manifest = setup
    before = {p: p.read_bytes() for p in manifest.parent.iterdir()}
    monkeypatch.setattr(transformer_feed, "load_transformer_pipeline", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(IPAdapterError) as caught:
        train_transformer(_config(setup, tmp_path / "run", manifest.parent))
    assert str(caught.value).startswith(f"--cache {manifest.parent} holds files that are not a feature cache's (")
    assert {p: p.read_bytes() for p in manifest.parent.iterdir()} == before


@pytest.mark.parametrize("cached", [False, True])
def test_each_process_reads_its_own_share_of_the_samples(setup, tmp_path, cached) -> None:
    """Under two processes, process 0 and process 1 read disjoint halves of the four samples (or cache rows)."""
    from types import SimpleNamespace

    from ipadapter.dit.train import family
    from ipadapter.train.transformer_feed import Feed

    cache = tmp_path / "cache"
    if cached:
        train_transformer(_config(setup, tmp_path / "built", cache))
    config = _config(setup, tmp_path / "run", cache if cached else "", batch_size=1)
    shares = []
    for rank in (0, 1):
        process = SimpleNamespace(process_index=rank, num_processes=2, device=torch.device("cpu"))
        feed = Feed(config, family(setup[0]), process, torch.float32)
        shares.append({feed.stream.next_record().key for _ in range(2)})
        feed.close()
    assert len(shares[0]) == len(shares[1]) == 2 and shares[0].isdisjoint(shares[1])
