"""`train_transformer` on a tiny FLUX pipeline folder: what one run reports (`on_step`, the log, the loss file, the
bar, the card, skipped samples), the frozen models it sets up, that a seed fixes the run and the dropout rates reach
the loop, and the refusals that stop it before or after training in one line."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ipadapter.errors import IPAdapterError
from ipadapter.train import TrainConfig
from ipadapter.train.transformer import train_transformer as train_flux
from tests import dit_factories as df
from tests import factories

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return df.save_flux_base(tmp_path_factory.mktemp("flux"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Four good images and one that cannot be decoded."""
    return factories.write_images(tmp_path_factory.mktemp("data"), 4, corrupt=1)


def _config(base, data, tmp_path, **overrides) -> TrainConfig:
    values = dict(variant="flux-v2", base=str(base), image_encoder=str(Path(base) / "image_encoder"), data=str(data),
                  resolution=16, batch_size=2, max_steps=3, num_workers=0, seed=0, output=str(tmp_path / "run"))
    return TrainConfig(**{**values, **overrides})


def _projection(path) -> torch.Tensor:
    return load_file(str(path))["ip_adapter_proj_model.proj.weight"]


def test_a_run_reports_every_step_logs_every_nth_and_counts_what_it_skipped(base, data, tmp_path, caplog,
                                                                             capsys) -> None:
    seen: list[tuple[int, float]] = []
    with caplog.at_level(logging.INFO, logger="ipadapter.train"):
        result = train_flux(_config(base, data, tmp_path, log_every=2), on_step=lambda i, loss: seen.append((i, loss)))
    out = tmp_path / "run"
    assert seen == list(enumerate(result.losses, start=1)) and result.step == 3
    rows = [line.split(",") for line in (out / "logs" / "losses.csv").read_text().splitlines()]
    assert [(int(step), float(loss)) for step, loss in rows] == seen
    messages = [r.getMessage() for r in caplog.records]
    assert [m.split(":")[0] for m in messages if m.startswith("step ")] == ["step 2"]
    skipped = result.skipped["undecodable image"]  # the bad file, met once in each pass over the data
    assert skipped >= 1 and sum(result.skipped.values()) == skipped
    assert f"done at step 3: skipped {skipped} sample(s): {skipped} undecodable image; adapter written to " \
           f"{out / 'ip-adapter.safetensors'}" in messages
    bar = capsys.readouterr().err
    assert "training: " in bar and "3/3" in bar and "step/s" in bar and f"loss={seen[-1][1]:.4f}" in bar
    manifest_lines = len(data.read_text().splitlines())
    assert f"| training data | {manifest_lines:,} samples" in (out / "README.md").read_text()
    assert (out / "config.json").read_text() == _config(base, data, tmp_path, log_every=2).to_json()
    assert result.published == out / "ip-adapter.safetensors" and result.own == out / "adapter.ipadapter.safetensors"
    assert result.output == out
    assert not result.adapter.training
    assert all(not p.requires_grad and p.dtype == torch.float32 for p in result.adapter.parameters())
    before = (out / "logs" / "losses.csv").read_text()
    with pytest.raises(IPAdapterError, match=r"already holds a training run .*; continue it with --resume latest or "
                                             r"choose another --output$"):
        train_flux(_config(base, data, tmp_path, max_steps=1))  # the same folder without --resume: refused as is
    assert (out / "logs" / "losses.csv").read_text() == before


@pytest.mark.parametrize("precision, checkpointing", [("bf16", True), ("no", False)])
def test_the_frozen_models_run_in_the_runs_precision_and_checkpointing_only_when_asked(
        base, data, tmp_path, monkeypatch, precision, checkpointing) -> None:
    import ipadapter.train.feed as feed
    import ipadapter.train.transformer_feed as run

    made = {}

    def pipeline(source, family, dtype, **parts):
        made["pipe"] = load(source, family, dtype, **parts)
        return made["pipe"]

    def image_encoder(config):
        made["encoder"] = read(config)
        return made["encoder"]

    load, read = run.load_transformer_pipeline, feed.load_image_encoder
    monkeypatch.setattr(run, "load_transformer_pipeline", pipeline)
    monkeypatch.setattr(feed, "load_image_encoder", image_encoder)
    train_flux(_config(base, data, tmp_path, mixed_precision=precision, gradient_checkpointing=checkpointing,
                       max_steps=1))
    pipe = made["pipe"]
    frozen = [pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, made["encoder"].model]
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    assert all(p.dtype == dtype and not p.requires_grad for m in frozen for p in m.parameters())
    assert pipe.transformer.is_gradient_checkpointing == checkpointing
    assert not any("ip" in type(p).__name__.lower() for p in pipe.transformer.attn_processors.values())


def test_the_seed_fixes_the_run_and_another_seed_changes_it(base, data, tmp_path) -> None:
    runs = [train_flux(_config(base, data, tmp_path / name, seed=seed, max_steps=2))
            for name, seed in (("a", 4), ("b", 4), ("c", 5))]
    assert runs[0].losses == runs[1].losses != runs[2].losses
    first, again, other = (_projection(r.published) for r in runs)
    assert torch.equal(first, again) and not torch.equal(first, other)
    # From one start file, on data whose order cannot matter (one sample, twice), the seed still decides the noise,
    # the noise levels and the dropout of every step.
    twice = tmp_path / "twice.jsonl"
    line = data.read_text().splitlines()[0]
    twice.write_text(f"{line}\n{line}\n".replace('"image_file": "', f'"image_file": "{data.parent}/'))
    start = str(runs[0].published)
    resumed = [train_flux(_config(base, twice, tmp_path / name, seed=seed, max_steps=1, init_from=start))
               for name, seed in (("d", 4), ("e", 5), ("f", 5))]
    assert resumed[0].losses != resumed[1].losses == resumed[2].losses


def test_an_image_dropped_from_every_sample_leaves_the_projections_weight_where_it_started(base, data,
                                                                                        tmp_path) -> None:
    """With the CLIP embedding zeroed in every row the projection's weight gets a zero gradient; without weight decay
    AdamW leaves it untouched. With the image kept, it moves."""
    from diffusers import FluxTransformer2DModel

    from ipadapter.dit.train_flux import new_flux_adapter
    from ipadapter.encoders import ImageEncoder

    transformer = FluxTransformer2DModel.from_pretrained(base, subfolder="transformer")
    torch.manual_seed(0)  # the run seeds torch with its seed just before making its new adapter
    start = new_flux_adapter(transformer, clip_dim=ImageEncoder.from_pretrained(str(base / "image_encoder")).global_dim,
                             tokens=16).state_dict()["image_proj.proj.weight"]
    dropped = train_flux(_config(base, data, tmp_path / "dropped", drop_image=1.0, drop_text=0.0, drop_both=0.0,
                                 weight_decay=0.0, max_steps=2))
    kept = train_flux(_config(base, data, tmp_path / "kept", drop_image=0.0, drop_text=0.0, drop_both=0.0,
                              weight_decay=0.0, max_steps=2))
    assert torch.equal(_projection(dropped.published), start)
    assert not torch.equal(_projection(kept.published), start)


def test_init_from_an_adapter_of_the_other_flux_variant_is_refused(base, data, tmp_path) -> None:
    first = train_flux(_config(base, data, tmp_path / "first", variant="flux", max_steps=1))
    assert _projection(first.published).shape[0] == 4 * df.FLUX_JOINT  # the first FLUX adapter: 4 tokens
    with pytest.raises(IPAdapterError) as err:
        train_flux(_config(base, data, tmp_path, init_from=str(first.published)))
    assert str(err.value) == f"--init-from {first.published} is a 'flux' adapter; this run trains 'flux-v2'"
    assert not (tmp_path / "run" / "ip-adapter.safetensors").exists()


def test_init_from_an_adapter_for_another_image_encoder_is_refused(base, data, tmp_path) -> None:
    from diffusers import FluxTransformer2DModel

    from ipadapter.dit.train_flux import new_flux_adapter, save_xlabs
    from ipadapter.encoders import ImageEncoder

    transformer = FluxTransformer2DModel.from_pretrained(base, subfolder="transformer")
    other = save_xlabs(new_flux_adapter(transformer, clip_dim=7, tokens=16), tmp_path / "other.safetensors")
    width = ImageEncoder.from_pretrained(str(base / "image_encoder")).global_dim
    with pytest.raises(IPAdapterError) as err:
        train_flux(_config(base, data, tmp_path, init_from=str(other)))
    assert str(err.value).startswith(f"{other} expects 7-d global image features but the image encoder "
                                     f"{base / 'image_encoder'} gives {width}-d; ")


def test_a_unet_base_is_not_taken_for_a_flux_pipeline(data, tmp_path) -> None:
    unet_base = factories.write_base(tmp_path / "sd")
    config = _config(unet_base, data, tmp_path, image_encoder=str(factories.write_image_encoder(tmp_path / "enc")))
    with pytest.raises(IPAdapterError, match=rf"^--base {unet_base} is not a FLUX pipeline: it has no transformer "
                                             "folder$"):
        train_flux(config)


def test_a_base_whose_weights_cannot_be_read_is_named_in_one_line(base, data, tmp_path, monkeypatch) -> None:
    """Its configs read, its weights not: a folder missing a part (diffusers' reason, first clause), and a Hub id
    whose configs alone are in the cache (the download advice)."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(base, broken)
    shutil.rmtree(broken / "text_encoder_2")
    with pytest.raises(IPAdapterError, match=rf"^--base {broken} is not a FLUX pipeline \(Error no file named "):
        train_flux(_config(broken, data, tmp_path / "a"))
    for weights in broken.rglob("*.safetensors"):
        weights.unlink()
    factories.write_hub_cache(tmp_path / "hub", "qa/configs", broken)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(IPAdapterError) as err:
        train_flux(_config("qa/configs", data, tmp_path / "b", image_encoder=str(base / "image_encoder")))
    assert str(err.value).startswith("the base model qa/configs is not in the local Hugging Face cache and offline "
                                     "mode is on (")


def test_an_uncached_hub_base_is_named_with_its_download_command(data, tmp_path) -> None:
    with pytest.raises(IPAdapterError) as err:
        train_flux(_config("nobody/flux", data, tmp_path, image_encoder=str(tmp_path)))
    assert str(err.value).startswith("the base model nobody/flux is not in the local Hugging Face cache and offline "
                                     "mode is on (")
    assert str(err.value).endswith("(hf download nobody/flux) or give a local folder")


def test_an_output_under_a_file_is_refused_by_its_flag_before_loading(base, data, tmp_path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(IPAdapterError) as err:
        train_flux(_config(base, data, tmp_path, output=str(tmp_path / "file" / "run")))
    assert str(err.value) == f"--output {tmp_path / 'file' / 'run'}: {tmp_path / 'file'} is a file, not a folder"


def test_a_final_adapter_that_cannot_be_written_is_one_sentence(base, data, tmp_path, monkeypatch) -> None:
    import dataclasses

    from ipadapter.dit import train as families

    def full_disk(adapter, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setitem(families.FAMILIES, "flux", dataclasses.replace(families.FAMILIES["flux"], save=full_disk))
    with pytest.raises(IPAdapterError) as err:
        train_flux(_config(base, data, tmp_path, max_steps=1))
    assert str(err.value) == (f"could not write the final adapter to {tmp_path / 'run'} ([Errno 28] No space left on "
                              "device)")


def test_a_cached_hub_base_and_encoder_train_without_a_request(base, data, tmp_path, monkeypatch) -> None:
    """Online (offline mode off), a FLUX base and an encoder in the Hugging Face cache are read from it alone."""
    cache = tmp_path / "hub"
    for repo, folder in (("qa/flux", base), ("qa/enc", base / "image_encoder")):
        factories.write_hub_cache(cache, repo, folder)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    sent = factories.hub_without_network(monkeypatch, cache)
    result = train_flux(_config("qa/flux", data, tmp_path, image_encoder="qa/enc", max_steps=1))
    assert result.step == 1 and [url for url in sent if "qa/" in url] == []


def test_an_fp32_init_file_is_not_rounded_to_the_bf16_of_the_frozen_models(base, data, tmp_path) -> None:
    """Under bf16 the transformer is bf16, the adapter read from `--init-from` fp32: at a learning rate far below
    fp32's resolution the written weights are the file's, bit for bit (rounded through bf16, most would differ)."""
    start = train_flux(_config(base, data, tmp_path / "start", max_steps=1)).published
    result = train_flux(_config(base, data, tmp_path, init_from=str(start), mixed_precision="bf16", max_steps=1,
                                learning_rate=1e-20, weight_decay=0.0))
    written, initial = load_file(str(result.published)), load_file(str(start))
    assert written.keys() == initial.keys() and all(torch.equal(written[k], initial[k]) for k in initial)
    assert not all(torch.equal(t, t.bfloat16().float()) for t in initial.values())


def test_a_half_precision_init_file_trains_and_is_written_in_fp32(base, data, tmp_path) -> None:
    from diffusers import FluxTransformer2DModel

    from ipadapter.dit.train_flux import new_flux_adapter, save_xlabs
    from ipadapter.encoders import ImageEncoder

    transformer = FluxTransformer2DModel.from_pretrained(base, subfolder="transformer")
    width = ImageEncoder.from_pretrained(str(base / "image_encoder")).global_dim
    start = save_xlabs(new_flux_adapter(transformer, clip_dim=width, tokens=16).to(torch.bfloat16),
                       tmp_path / "bf16.safetensors")
    assert {t.dtype for t in load_file(str(start)).values()} == {torch.bfloat16}
    result = train_flux(_config(base, data, tmp_path, init_from=str(start), max_steps=1))
    assert {t.dtype for t in load_file(str(result.published)).values()} == {torch.float32}
    assert all(p.dtype == torch.float32 for p in result.adapter.parameters())


def test_one_pass_over_the_data_meets_every_sample_once(base, tmp_path, monkeypatch) -> None:
    """One process reads the whole manifest: the first pass (two batches of three here) meets each sample once."""
    import dataclasses

    from ipadapter.dit import train as families

    data = factories.write_images(tmp_path / "six", 6)
    entries = [{**json.loads(line), "text": f"sample {i}"} for i, line in enumerate(data.read_text().splitlines())]
    data.write_text("".join(json.dumps(e) + "\n" for e in entries))
    seen = []
    features = families.FAMILIES["flux"].features

    def spy(pipe, encoder, pixels, clip, texts, **kwargs):
        seen.append(list(texts))
        return features(pipe, encoder, pixels, clip, texts, **kwargs)

    monkeypatch.setitem(families.FAMILIES, "flux", dataclasses.replace(families.FAMILIES["flux"], features=spy))
    train_flux(_config(base, data, tmp_path, batch_size=3, max_steps=2))
    assert len(seen) == 2 and sorted(seen[0] + seen[1]) == [f"sample {i}" for i in range(6)]


def test_a_tiny_gradient_norm_limit_holds_the_weights_back(base, data, tmp_path) -> None:
    """Gradients clipped to a norm of 1e-12 are far below AdamW's epsilon (1e-8), so its steps shrink by orders of
    magnitude; without the limit (0) the first step moves each weight by about the learning rate."""
    def moved(max_grad_norm: float) -> float:
        start = train_flux(_config(base, data, tmp_path / f"s{max_grad_norm}", max_steps=1, learning_rate=1e-20,
                                   weight_decay=0.0)).published  # the seeded start, unmoved
        end = train_flux(_config(base, data, tmp_path / f"e{max_grad_norm}", max_steps=1, learning_rate=1e-3,
                                 weight_decay=0.0, max_grad_norm=max_grad_norm)).published
        return float((_projection(end) - _projection(start)).abs().max())

    assert moved(1e-12) < 1e-3 * moved(0.0)


def test_a_run_on_tar_shards_says_so_in_its_card(base, tmp_path) -> None:
    shards = factories.write_shards(tmp_path / "shards", 4, 2)
    result = train_flux(_config(base, shards, tmp_path, max_steps=1))
    assert f"| training data | tar shards (`{shards}`) |" in (result.output / "README.md").read_text()
