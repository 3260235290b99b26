"""The feature cache: built once, reused, refused for other models or settings; training from it works."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ipadapter import IPAdapterError
from ipadapter.encoders import ImageEncoder
from ipadapter.train import TrainConfig, train
from ipadapter.train.cache import CacheReader
from tests import factories


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cache")
    manifest = factories.write_images(tmp / "data", 5, corrupt=1)
    models, encoder = factories.in_memory()
    config = TrainConfig(data=str(manifest), output=str(tmp / "out"), resolution=factories.RES, batch_size=2, max_steps=2,
                         num_workers=0, variant="plus", cache=str(tmp / "cache"), save_every=1000)
    result = train(config, models=models, image_encoder=encoder, log_with=None)
    factories.reset_accelerate()
    return {"config": config, "models": models, "encoder": encoder, "result": result}


def test_cache_holds_every_good_sample_and_the_dropped_constants(cached) -> None:
    reader = CacheReader(cached["config"].cache)
    assert reader.index["rows"] == 5 and reader.index["skipped"] == {"undecodable image": 1}
    row = reader(reader.records()[0])
    assert set(row) == {"latent_mean", "latent_std", "text_embeds", "image"}
    assert row["latent_mean"].shape == (4, factories.RES // 2, factories.RES // 2) and row["image"].shape == (17, 40)
    # a dropped patch-variant image = the encoder's features of zero pixel values
    enc: ImageEncoder = cached["encoder"]
    zeros = enc.encode_pixels(torch.zeros(1, 3, 32, 32), "patch")[0]
    torch.testing.assert_close(reader.constants["uncond_image"], zeros)
    assert cached["result"].step == 2


def test_training_from_cache_reuses_it_without_encoders(cached, tmp_path) -> None:
    """A second run reads the cache; its frozen encoders are never called (here: they would raise)."""
    models, encoder = cached["models"], cached["encoder"]

    def boom(*a, **k):
        raise AssertionError("a frozen encoder ran although the cache holds its outputs")

    hooks = [m.register_forward_pre_hook(boom) for m in (models.vae, encoder.model, *models.text_encoders)]
    try:
        config = cached["config"].replace(output=str(tmp_path / "again"))
        result = train(config, models=models, image_encoder=encoder, log_with=None)
    finally:
        for h in hooks:
            h.remove()
    assert result.step == 2 and all(torch.isfinite(torch.tensor(result.losses)))


def test_a_complete_cache_trains_without_the_data_it_was_built_from(cached, tmp_path) -> None:
    """`--cache` alone (no `--data`): the cache holds what training reads, so the data's fingerprint is not checked."""
    config = cached["config"].replace(output=str(tmp_path / "alone"), data="")
    result = train(config, models=cached["models"], image_encoder=cached["encoder"], log_with=None)
    assert result.step == 2 and all(torch.isfinite(torch.tensor(result.losses)))


def test_an_interrupted_cache_build_starts_again(cached, tmp_path) -> None:
    """A cache folder without index.json is a build that was killed: it is rebuilt from the start, and what the
    killed build left is gone."""
    folder = tmp_path / "cache"
    folder.mkdir()
    (folder / "part-000-00000.safetensors").write_bytes(b"half a file")
    config = cached["config"].replace(output=str(tmp_path / "out"), cache=str(folder))
    train(config, models=cached["models"], image_encoder=cached["encoder"], log_with=None)
    reader = CacheReader(str(folder))
    assert reader.index["rows"] == 5 and (folder / "part-000-00000.safetensors").read_bytes() != b"half a file"
    torch.testing.assert_close(reader(reader.records()[0])["image"],
                               CacheReader(cached["config"].cache)(CacheReader(cached["config"].cache).records()[0])["image"])


@pytest.mark.parametrize("change, field", [
    ({"resolution": 20}, "resolution"),
    ({"cache_dtype": "float32"}, "cache_dtype"),
    ({"variant": "base"}, "features"),
    ("other encoder", "image encoder"),
    ("other vae", "base \\(VAE \\+ text encoders\\)"),
])
def test_cache_refuses_other_models_or_settings(cached, tmp_path, change, field) -> None:
    models, encoder = cached["models"], cached["encoder"]
    config = cached["config"].replace(output=str(tmp_path / "o"))
    if change == "other encoder":
        encoder = ImageEncoder(factories.tiny_image_encoder(seed=77)[0], encoder.processor)
    elif change == "other vae":
        models = type(models)(**{**models.__dict__, "vae": factories.tiny_vae(seed=77)})
    else:
        config = config.replace(**change)
    with pytest.raises(IPAdapterError, match=f"feature cache .* was built with {field} = .* but this run has"):
        train(config, models=models, image_encoder=encoder, log_with=None)


def test_folder_models_cache_reused_without_loading_encoders(tmp_path, monkeypatch) -> None:
    """From folders (an encoder without a saved processor): the second run loads only the UNet."""
    from ipadapter.train import models

    base, encoder = factories.write_base(tmp_path / "base"), factories.write_image_encoder(tmp_path / "enc", processor=False)
    config = TrainConfig(base=str(base), image_encoder=str(encoder), data=str(factories.write_images(tmp_path / "d", 3)),
                         output=str(tmp_path / "o1"), cache=str(tmp_path / "cache"), resolution=factories.RES, batch_size=2,
                         max_steps=1, num_workers=0)
    train(config, log_with=None)
    factories.reset_accelerate()

    def no(*a, **k):
        raise AssertionError("a frozen encoder was loaded although the cache holds its outputs")

    monkeypatch.setattr(ImageEncoder, "from_pretrained", no)
    monkeypatch.setattr(models, "load_text_encoders", no)
    monkeypatch.setattr(models, "load_vae", no)
    result = train(config.replace(output=str(tmp_path / "o2")), log_with=None)
    assert result.step == 1


def _stored_in_fp16(folder: Path) -> None:
    """Every weights file under `folder` rewritten in fp16, as a base shipped in half precision (the miniature) is;
    transformers' configs say so (`dtype`), and transformers then loads those models in fp16."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    for path in folder.rglob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        save_file({k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}, str(path), metadata=meta)
    for path in folder.rglob("config.json"):
        config = json.loads(path.read_text())
        if "model_type" in config:
            path.write_text(json.dumps({**config, "dtype": "float16"}))


@pytest.mark.parametrize("stored", ["fp32", "fp16"])
def test_validation_of_a_cached_run_loads_the_frozen_parts_from_the_base(tmp_path, monkeypatch, stored) -> None:
    """Training from the cache holds no VAE, text encoder or image encoder; the first validation loads them from the
    run's base and encoder folders, frozen (no gradients, eval mode), in the run's precision whatever the files store
    (a base stored in fp16 met the fp32 UNet as fp16: a dtype error), and encodes its prompts and references; the
    next loads nothing (the VAE was kept), and its grid is what a user gets from that step's adapter on the whole
    pipeline."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from PIL import Image
    from transformers import CLIPTextModel, CLIPTokenizer

    from ipadapter.prompter import ImagePrompter
    from ipadapter.train import models

    base, encoder = factories.write_base(tmp_path / "base"), factories.write_image_encoder(tmp_path / "enc")
    if stored == "fp16":
        _stored_in_fp16(base)
        _stored_in_fp16(encoder)
    data = factories.write_images(tmp_path / "d", 3)
    config = TrainConfig(base=str(base), image_encoder=str(encoder), data=str(data), output=str(tmp_path / "o1"),
                         cache=str(tmp_path / "cache"), resolution=factories.RES, batch_size=2, max_steps=1,
                         num_workers=0)
    train(config, log_with=None)
    factories.reset_accelerate()

    loaded: dict[str, list] = {"vae": [], "text": [], "image": []}

    def recording(name, load):
        def wrapped(*args, **kwargs):
            out = load(*args, **kwargs)
            loaded[name].append((args, kwargs, out))
            return out
        return wrapped

    monkeypatch.setattr(models, "load_vae", recording("vae", models.load_vae))
    monkeypatch.setattr(models, "load_text_encoders", recording("text", models.load_text_encoders))
    monkeypatch.setattr(ImageEncoder, "from_pretrained", recording("image", ImageEncoder.from_pretrained))
    reference = tmp_path / "d" / "img0.png"
    result = train(config.replace(output=str(tmp_path / "o2"), validate_every=1, validation_steps=2, max_steps=2,
                                  validation_images=[str(reference)], validation_prompts=["", "a cat"]),
                   log_with=None)
    assert [len(loaded[name]) for name in ("vae", "text", "image")] == [1, 1, 1]
    (vae_args, _, vae), (text_args, text_kwargs, (_, texts)), (image_args, _, image) = (
        loaded["vae"][0], loaded["text"][0], loaded["image"][0])
    assert vae_args == (str(base),) and text_args[0] == str(base)
    assert text_kwargs == {} and image_args == (str(encoder),)
    frozen = [vae, *texts, image.model]
    assert all(not m.training and not any(p.requires_grad for p in m.parameters()) for m in frozen)
    assert {p.dtype for m in frozen for p in m.parameters()} == {torch.float32}

    grid = Image.open(result.output / "validation" / "step-00000002.png").convert("RGB")
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(base / "vae").float(), unet=UNet2DConditionModel.from_pretrained(
            base / "unet").float(), text_encoder=CLIPTextModel.from_pretrained(base / "text_encoder").float(),
        tokenizer=CLIPTokenizer.from_pretrained(base / "tokenizer"), safety_checker=None, feature_extractor=None,
        scheduler=DDIMScheduler.from_pretrained(base / "scheduler"), requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    res = factories.RES
    image_encoder = ImageEncoder.from_pretrained(str(encoder), dtype=torch.float32)
    with ImagePrompter(pipe, {"0": result.adapter}, image_encoder) as prompter:
        for column, prompt in enumerate(["", "a cat"], start=1):
            expected = prompter.generate(Image.open(reference).convert("RGB"), prompt=prompt, steps=2,
                                         guidance=config.validation_guidance, seed=config.seed, width=res,
                                         height=res)[0]
            got = grid.crop((res * column, 0, res * column + res, res))
            assert np.abs(np.asarray(got, np.int16) - np.asarray(expected, np.int16)).max() <= 1


@pytest.mark.parametrize("size", [6, 8, 12, 20])
def test_a_weights_file_is_told_apart_by_its_first_and_last_bytes(tmp_path, size) -> None:
    """The fingerprint reads a file's size and its first and last `edge` bytes: any change there (for a file under
    two edges: anywhere) gives another hash."""
    import hashlib

    from ipadapter.train.cache import _hash_file

    def digest(data: bytes) -> str:
        (tmp_path / "w.bin").write_bytes(data)
        h = hashlib.sha256()
        _hash_file(tmp_path / "w.bin", h, edge=4)
        return h.hexdigest()

    data = bytes(range(size))
    changed = [digest(data[:i] + b"\xff" + data[i + 1:]) for i in range(size)]
    outside = set(range(4, size - 4))  # the middle of a file over two edges is not read, by design
    assert all((c != digest(data)) == (i not in outside) for i, c in enumerate(changed))


def test_a_cache_refuses_any_other_setting_but_no_data(tmp_path) -> None:
    """Each fingerprint entry must match, falsy ones included (no ID embeddings, not SDXL); only an empty `data`
    (training from the cache alone) is not compared."""
    import json

    from ipadapter.train.cache import check_fingerprint

    built = {"image encoder": "abc", "id_dim": 512, "sdxl": True, "resolution": 64, "data": "d1"}
    (tmp_path / "index.json").write_text(json.dumps({"fingerprint": built, "rows": 1, "files": []}))
    assert check_fingerprint(tmp_path, {**built, "data": ""})["rows"] == 1
    for key, value in (("id_dim", 0), ("sdxl", False), ("image encoder", ""), ("data", "d2"), ("resolution", 32)):
        with pytest.raises(IPAdapterError, match=f"built with {key} = {built[key]!r} but this run has {value!r}"):
            check_fingerprint(tmp_path, {**built, key: value})


def test_a_build_removes_only_what_a_killed_build_left(tmp_path) -> None:
    """A build starts by removing the folder it is given: only a killed build's files (shards, part records,
    constants, atomic writes' temporary files) may be there, so that `--cache` naming another folder deletes nothing."""
    import shutil

    from ipadapter.train.cache import check_rebuildable

    folder = tmp_path / "cache"
    check_rebuildable(folder)  # absent
    folder.mkdir()
    for name in ("part-000-00000.safetensors", "part-001.json", "constants.safetensors",
                 ".part-000-00001.safetensors.tmp-4242"):
        (folder / name).write_bytes(b"")
    check_rebuildable(folder)
    for name in ("photo.png", "index.json.bak", "part-000.safetensors", "sub/"):
        other = tmp_path / "other"
        shutil.copytree(folder, other)
        if name.endswith("/"):
            (other / name).mkdir()
        else:
            (other / name).write_bytes(b"")
        with pytest.raises(IPAdapterError) as caught:
            check_rebuildable(other)
        assert str(caught.value) == (f"--cache {other} holds files that are not a feature cache's "
                                     f"({name.rstrip('/')}); give a new or empty folder for the cache")
        shutil.rmtree(other)
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(IPAdapterError, match=r" is a file, not a folder$"):
        check_rebuildable(tmp_path / "file")


def test_a_cache_built_before_the_denoiser_was_recorded_is_a_unet_cache(tmp_path) -> None:
    import json

    from ipadapter.train.cache import check_fingerprint

    (tmp_path / "index.json").write_text(json.dumps({"fingerprint": {"resolution": 64}, "rows": 1, "files": []}))
    assert check_fingerprint(tmp_path, {"denoiser": "unet", "resolution": 64})["rows"] == 1
    with pytest.raises(IPAdapterError, match="built with denoiser = 'unet' but this run has 'sd3'"):
        check_fingerprint(tmp_path, {"denoiser": "sd3", "resolution": 64})


def test_a_models_fingerprint_reads_its_listed_subfolders(tmp_path, monkeypatch) -> None:
    """Files of the listed subfolders count (a missing one is passed over, not the end of the list), others do not;
    a Hub id reads its locally cached snapshot, as loading does, else the id itself is the identity."""
    import hashlib

    from huggingface_hub import constants

    from ipadapter.train.cache import folder_fingerprint

    base = tmp_path / "base"
    for sub, name in (("vae", "w.bin"), ("tokenizer", "vocab.json"), ("unet", "w.bin")):
        (base / sub).mkdir(parents=True)
        (base / sub / name).write_bytes(b"1")
    subs = ["vae", "text_encoder_2", "tokenizer"]
    first = folder_fingerprint(str(base), subs)
    (base / "unet" / "w.bin").write_bytes(b"2")
    assert folder_fingerprint(str(base), subs) == first
    (base / "tokenizer" / "vocab.json").write_bytes(b"2")
    assert folder_fingerprint(str(base), subs) != first

    cache = tmp_path / "hub"
    snapshot = cache / "models--org--model" / "snapshots" / ("a" * 40)
    snapshot.parent.parent.joinpath("refs").mkdir(parents=True)
    snapshot.parent.parent.joinpath("refs", "main").write_text("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "vae").mkdir()
    (snapshot / "vae" / "w.bin").write_bytes(b"1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert folder_fingerprint("org/model", subs) == folder_fingerprint(str(snapshot), subs)
    assert folder_fingerprint("org/other", subs) == hashlib.sha256(b"org/other").hexdigest()[:16]


def test_cache_files_hold_rows_in_the_cache_dtype_but_time_ids_exact(tmp_path, monkeypatch) -> None:
    """Each file holds at most ROWS_PER_FILE rows; floating features are stored in `cache_dtype`, SDXL's time_ids in
    float32 (bf16 would round an original size of 1025 px to 1024) and integers as they are."""
    from safetensors.torch import load_file

    from ipadapter.train import cache

    monkeypatch.setattr(cache, "ROWS_PER_FILE", 2)
    writer = cache.CacheWriter(tmp_path, 0, torch.bfloat16)
    latents = torch.randn(5, 3)
    time_ids = torch.tensor([[1025.0, 777.0, 0.0, 0.0, 1024.0, 1024.0]] * 5)
    tokens = torch.arange(5)
    for i, j in ((0, 2), (2, 3), (3, 5)):
        writer.add({"latents": latents[i:j], "time_ids": time_ids[i:j], "tokens": tokens[i:j]})
    writer.flush()
    assert [f["rows"] for f in writer.files] == [2, 3]  # a file is written once a batch brings it to 2 or more rows
    parts = [load_file(tmp_path / f["file"]) for f in writer.files]
    joined = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    assert {k: v.dtype for k, v in joined.items()} == {
        "latents": torch.bfloat16, "time_ids": torch.float32, "tokens": torch.int64}
    assert torch.equal(joined["latents"], latents.to(torch.bfloat16)) and torch.equal(joined["time_ids"], time_ids)
    assert torch.equal(joined["tokens"], tokens)


def test_an_sdxl_faceid_cache_holds_pooled_text_time_ids_and_id_embeddings(tmp_path) -> None:
    """SDXL's rows keep its pooled text embedding and its micro-conditioning: a 20x28 (w x h) image covers 16x16 at
    scale 0.8 (16x22, cropped 3 px from the top), so time_ids = (28, 20, 3, 0, 16, 16); FaceID rows keep each
    sample's ID embedding (at the cache's float16). A run from that cache trains."""
    import json

    import numpy as np

    manifest = factories.write_images(tmp_path / "data", 3, size=(20, 28), id_dim=8)
    models, encoder = factories.in_memory(sdxl=True)
    config = TrainConfig(data=str(manifest), output=str(tmp_path / "out"), resolution=factories.RES, batch_size=2,
                         max_steps=1, num_workers=0, variant="faceid-plus", id_dim=8, lora_rank=4,
                         cache=str(tmp_path / "cache"), save_every=1000)
    result = train(config, models=models, image_encoder=encoder, log_with=None)
    assert result.step == 1 and all(torch.isfinite(torch.tensor(result.losses)))
    reader = CacheReader(config.cache)
    rows = [reader(r) for r in reader.records()]
    assert len(rows) == 3 and {"pooled", "time_ids", "id", "image"} <= set(rows[0])
    assert all(row["time_ids"].tolist() == [28, 20, 3, 0, 16, 16] for row in rows)
    entries = [json.loads(line) for line in manifest.read_text().splitlines()]
    expected = sorted(torch.from_numpy(np.load(tmp_path / "data" / e["id_embed_file"])).half().float().tolist()
                      for e in entries)  # stored at the cache's dtype, float16 by default
    assert sorted(row["id"].tolist() for row in rows) == expected
    assert {tuple(row["pooled"].shape) for row in rows} == {tuple(reader.constants["uncond_pooled"].shape)}


def test_a_faceid_run_without_clip_features_trains_from_a_cache(tmp_path) -> None:
    """Basic FaceID reads the ID embedding alone: its cache holds no image features (nor their dropped constant), and
    the adapter's widths come from the ID embedding, as in a run without a cache."""
    manifest = factories.write_images(tmp_path / "data", 3, id_dim=8)
    models, encoder = factories.in_memory()
    config = TrainConfig(data=str(manifest), output=str(tmp_path / "out"), resolution=factories.RES, batch_size=2,
                         max_steps=1, num_workers=0, variant="faceid", id_dim=8, lora_rank=4,
                         cache=str(tmp_path / "cache"), save_every=1000)
    result = train(config, models=models, image_encoder=encoder, log_with=None)
    reader = CacheReader(config.cache)
    assert "uncond_image" not in reader.constants and "image" not in reader(reader.records()[0])
    assert result.step == 1 and result.adapter.config.variant == "faceid"
    assert result.adapter.config.projection.in_dim == 8
