"""Content subtraction's text model: the CLIP text tower paired with the image encoder, with its trained projection.
Expected embeddings come from transformers' own models (`CLIPModel.get_text_features`, the pipeline's
`text_encoder_2`), computed here; a plain text encoder beside the encoder must be refused, not given a random
projection."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from transformers import CLIPModel, CLIPTokenizer

from ipadapter import IPAdapterError
from ipadapter.bundled import ASSETS_DIR, image_encoder_path
from ipadapter.cli.main import main
from ipadapter.encoders import ImageEncoder
from ipadapter.paired_text import paired_text_embeds
from tests import factories

NO_PIPE = SimpleNamespace()


def _clip_text_features(folder, text: str) -> torch.Tensor:
    """The oracle: a full CLIPModel's text features, padded to the tokenizer's length."""
    model = CLIPModel.from_pretrained(str(folder), dtype=torch.float32).eval()
    ids = CLIPTokenizer.from_pretrained(str(folder))([text], padding="max_length", truncation=True,
                                                     return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.get_text_features(input_ids=ids)
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _encoder(folder, projection_dim: int = 24) -> ImageEncoder:
    model, processor = factories.tiny_image_encoder(projection_dim=projection_dim)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return ImageEncoder.from_pretrained(str(folder))


def test_the_miniature_encoder_pairs_with_the_tiny_clip_it_was_trained_against() -> None:
    encoder = ImageEncoder.from_pretrained(str(image_encoder_path()))
    got = paired_text_embeds(NO_PIPE, encoder, "a blue cross")
    torch.testing.assert_close(got, _clip_text_features(ASSETS_DIR / "clip", "a blue cross"), atol=1e-5, rtol=1e-4)


def test_a_text_encoder_without_its_projection_is_never_taken(tmp_path) -> None:
    """SD's text encoder (a CLIPTextModel) beside the encoder, of the encoder's width: loading it as a model with
    projection would draw that projection at random."""
    encoder = _encoder(tmp_path / "image_encoder", projection_dim=32)
    factories.tiny_text_encoder(32).save_pretrained(tmp_path / "text_encoder")
    factories.write_tokenizer(tmp_path / "tokenizer", max_length=16)
    with pytest.raises(IPAdapterError) as err:
        paired_text_embeds(NO_PIPE, encoder, "a cat")
    assert str(err.value) == (
        f"content subtraction needs the CLIP text model paired with the image encoder {tmp_path / 'image_encoder'} "
        "(32-d, with its text projection) and none was found in the base model or beside the encoder; name it with "
        "--content-text-encoder (e.g. the CLIP repository the encoder comes from)")
    with pytest.raises(IPAdapterError) as err:
        paired_text_embeds(NO_PIPE, encoder, "a cat", source=str(tmp_path / "text_encoder"))
    assert str(err.value) == (
        f"{tmp_path / 'text_encoder'} holds no trained text projection (a plain CLIPTextModel, such as a Stable "
        "Diffusion text encoder); content subtraction needs the CLIP text model with projection")
    with pytest.raises(IPAdapterError) as err:
        paired_text_embeds(NO_PIPE, None, "a cat")
    assert str(err.value) == "content subtraction acts on CLIP image embeddings; this adapter has no image encoder"


def test_sdxl_second_text_encoder_pairs_when_its_width_matches(tmp_path) -> None:
    pipe = factories.tiny_sdxl_pipeline(tmp_path)
    ids = pipe.tokenizer_2(["a red cat"], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = pipe.text_encoder_2(input_ids=ids).text_embeds
    encoder = _encoder(tmp_path / "image_encoder", projection_dim=pipe.text_encoder_2.config.projection_dim)
    torch.testing.assert_close(paired_text_embeds(pipe, encoder, "a red cat"), expected)
    narrower = _encoder(tmp_path / "other_encoder", projection_dim=24)
    with pytest.raises(IPAdapterError, match="none was found"):
        paired_text_embeds(pipe, narrower, "a red cat")


def test_a_named_clip_folder_or_pipeline_text_encoder_is_used(tmp_path) -> None:
    clip = tmp_path / "clip"
    factories.tiny_clip().save_pretrained(clip)
    factories.tiny_tokenizer(clip).save_pretrained(clip)
    encoder = _encoder(tmp_path / "image_encoder", projection_dim=24)
    torch.testing.assert_close(paired_text_embeds(NO_PIPE, encoder, "a dog", source=str(clip)),
                               _clip_text_features(clip, "a dog"))
    base = factories.write_base(tmp_path / "sdxl", sdxl=True)  # text_encoder_2 with projection, tokenizer_2 beside
    wide = _encoder(tmp_path / "wide_encoder", projection_dim=factories.CROSS)
    got = paired_text_embeds(NO_PIPE, wide, "a dog", source=str(base / "text_encoder_2"))
    from transformers import CLIPTextModelWithProjection

    model = CLIPTextModelWithProjection.from_pretrained(str(base / "text_encoder_2")).eval()
    ids = CLIPTokenizer.from_pretrained(str(base / "tokenizer_2"))(["a dog"], padding="max_length",
                                                                    return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(got, model(input_ids=ids).text_embeds)
    with pytest.raises(IPAdapterError, match="embeds text in 24 dimensions but the image encoder in 32"):
        paired_text_embeds(NO_PIPE, wide, "a dog", source=str(clip))


def test_the_command_line_subtracts_content_on_the_miniature(tmp_path, capsys) -> None:
    ref = tmp_path / "ref.png"
    Image.new("RGB", (48, 48), (30, 60, 200)).save(ref)
    common = ["generate", "--image", str(ref), "--steps", "2", "--device", "cpu"]
    assert main([*common, "--content-subtract", "a blue cross", "--out", str(tmp_path / "a.png")]) == 0
    assert (tmp_path / "a.png").is_file()
    assert main([*common, "--content-text-encoder", str(ASSETS_DIR / "clip"), "--out", str(tmp_path / "b.png")]) == 2
    assert "--content-text-encoder is the text model of --content-subtract" in capsys.readouterr().err
    assert not (tmp_path / "b.png").exists()


def _with_projection(folder, seed: int, max_length: int | None = None):
    """A CLIPTextModelWithProjection of width 32 saved at `folder` (with its own tokenizer when `max_length`)."""
    model = factories.tiny_text_encoder(32, seed, projection=32)
    model.save_pretrained(folder)
    if max_length:
        factories.write_tokenizer(folder, max_length=max_length)
    return model


def _embeds(model, tokenizer_folder, text: str) -> torch.Tensor:
    ids = CLIPTokenizer.from_pretrained(str(tokenizer_folder))([text], padding="max_length", return_tensors="pt")
    with torch.no_grad():
        return model(input_ids=ids.input_ids).text_embeds


def _other_vocabulary(folder):
    """A tokenizer folder whose words have other ids than `write_tokenizer`'s: the wrong one gives other embeddings
    (a longer padding alone would not: CLIP's pooled output is read at the end token, before any padding)."""
    import json

    factories.write_tokenizer(folder, max_length=16)
    vocab = json.loads((folder / "vocab.json").read_text())
    words = [w for w in vocab if vocab[w] > 1]
    ids = sorted(vocab[w] for w in words)
    (folder / "vocab.json").write_text(json.dumps({**vocab, **dict(zip(words, reversed(ids)))}))
    return folder


def test_the_tokenizer_is_the_models_own_else_the_pipelines_sibling(tmp_path) -> None:
    from ipadapter.paired_text import _tokenizer_source

    base = tmp_path / "sdxl"
    _other_vocabulary(base / "tokenizer_2")
    own = _with_projection(base / "text_encoder_2", 5, max_length=16)  # its own vocabulary, 16 positions
    encoder = _encoder(tmp_path / "image_encoder", projection_dim=32)
    torch.testing.assert_close(paired_text_embeds(NO_PIPE, encoder, "a dog", source=str(base / "text_encoder_2")),
                               _embeds(own, base / "text_encoder_2", "a dog"))
    # Hub ids: the sibling subfolder of the same repository; a model folder that is not a pipeline's keeps its own
    assert _tokenizer_source("org/sdxl", "text_encoder_2") == ("org/sdxl", "tokenizer_2")
    assert _tokenizer_source("org/sd", "text_encoder") == ("org/sd", "tokenizer")
    assert _tokenizer_source("org/sdxl", "sub/text_encoder_2") == ("org/sdxl", "sub/tokenizer_2")
    assert _tokenizer_source("laion/clip", None) == ("laion/clip", None)
    assert _tokenizer_source(str(tmp_path / "x" / "text_encoder"), None) == (str(tmp_path / "x" / "tokenizer"), None)


def test_folders_beside_the_encoder_in_order_and_a_bad_one_is_passed_over(tmp_path) -> None:
    encoder = _encoder(tmp_path / "image_encoder", projection_dim=32)
    sibling = _with_projection(tmp_path / "text_encoder", 1)
    factories.write_tokenizer(tmp_path / "tokenizer", max_length=16)
    expected = _embeds(sibling, tmp_path / "tokenizer", "a cat")
    factories.tiny_text_encoder(32, 2).save_pretrained(tmp_path / "clip_text")  # no projection: passed over
    factories.write_tokenizer(tmp_path / "clip_text", max_length=16)
    torch.testing.assert_close(paired_text_embeds(NO_PIPE, encoder, "a cat"), expected)
    beside = _with_projection(tmp_path / "clip_text", 3, max_length=16)  # next to the encoder: before text_encoder/
    torch.testing.assert_close(paired_text_embeds(NO_PIPE, encoder, "a cat"), _embeds(beside, tmp_path / "clip_text",
                                                                                      "a cat"))
    inside = _with_projection(tmp_path / "image_encoder" / "clip_text", 4, max_length=16)  # inside it: first
    torch.testing.assert_close(paired_text_embeds(NO_PIPE, encoder, "a cat"),
                               _embeds(inside, tmp_path / "image_encoder" / "clip_text", "a cat"))


def test_a_pipelines_first_text_encoder_pairs_when_it_has_a_projection(tmp_path) -> None:
    tokenizer = factories.tiny_tokenizer(tmp_path / "tok")
    first = factories.tiny_text_encoder(32, 6, projection=32)
    pipe = SimpleNamespace(text_encoder=first, tokenizer=tokenizer, text_encoder_2=None)
    encoder = _encoder(tmp_path / "image_encoder", projection_dim=32)
    torch.testing.assert_close(paired_text_embeds(pipe, encoder, "a cow"), _embeds(first, tmp_path / "tok", "a cow"))


def test_a_manifest_run_loads_its_text_model_once(tmp_path, monkeypatch) -> None:
    import ipadapter.paired_text as paired

    clip = tmp_path / "clip"
    factories.tiny_clip().save_pretrained(clip)
    factories.tiny_tokenizer(clip).save_pretrained(clip)
    loads = []
    real = paired.load_text_model
    monkeypatch.setattr(paired, "load_text_model", lambda *a: loads.append(a) or real(*a))
    embed = paired.PairedText(NO_PIPE, _encoder(tmp_path / "image_encoder"), str(clip))
    for words in ("a dog", "a cat", "a dog"):
        torch.testing.assert_close(embed(words), _clip_text_features(clip, words))
    assert len(loads) == 1


def test_hub_ids_with_a_subfolder_read_the_model_and_its_sibling_tokenizer(tmp_path, monkeypatch) -> None:
    """`owner/repo/text_encoder_2` from a Hub cache laid out here (offline): the model from that subfolder, the
    tokenizer from `tokenizer_2/` of the same repository; a whole CLIP repository from its root."""
    import huggingface_hub.constants as hub
    import transformers.utils.hub as transformers_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    for name in ("HF_HUB_CACHE", "TRANSFORMERS_CACHE"):
        if hasattr(transformers_hub, name):
            monkeypatch.setattr(transformers_hub, name, str(tmp_path / "hub"))

    def snapshot(repo: str):
        entry = tmp_path / "hub" / ("models--" + repo.replace("/", "--"))
        (entry / "refs").mkdir(parents=True)
        (entry / "refs" / "main").write_text("0" * 40)
        return entry / "snapshots" / ("0" * 40)

    sdxl = snapshot("org/sdxl")
    model = _with_projection(sdxl / "text_encoder_2", 8)
    _other_vocabulary(sdxl / "tokenizer_2")
    encoder = _encoder(tmp_path / "image_encoder", projection_dim=32)
    torch.testing.assert_close(paired_text_embeds(NO_PIPE, encoder, "a fox", source="org/sdxl/text_encoder_2"),
                               _embeds(model, sdxl / "tokenizer_2", "a fox"))
    clip = snapshot("org/clip")
    factories.tiny_clip().save_pretrained(clip)
    factories.tiny_tokenizer(clip).save_pretrained(clip)
    torch.testing.assert_close(paired_text_embeds(NO_PIPE, _encoder(tmp_path / "e24"), "a fox", source="org/clip"),
                               _clip_text_features(clip, "a fox"))


def test_a_text_model_that_does_not_load_is_one_sentence(tmp_path) -> None:
    import json

    from ipadapter.paired_text import load_text_model

    folder = tmp_path / "t"
    _with_projection(folder, 1, max_length=16)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "projection_dim": 48}))
    with pytest.raises(IPAdapterError) as err:
        load_text_model(str(folder), 48)
    assert str(err.value) == f"cannot load a CLIP text model from {folder} (its weights do not fit its config)"
    from transformers import CLIPTextConfig

    with pytest.raises(OSError) as transformers_err:  # transformers' own reason, quoted in the sentence
        CLIPTextConfig.get_config_dict(str(tmp_path / "empty"))
    with pytest.raises(IPAdapterError) as err:
        load_text_model(str(tmp_path / "empty"), 32)
    reason = str(transformers_err.value).splitlines()[0][:200]
    assert str(err.value) == f"cannot load a CLIP text model from {tmp_path / 'empty'} ({reason})"


def test_long_words_are_cut_to_the_text_models_length_and_the_embedding_takes_the_encoders_dtype(tmp_path) -> None:
    clip = tmp_path / "clip"
    factories.tiny_clip().save_pretrained(clip)
    factories.tiny_tokenizer(clip).save_pretrained(clip)
    encoder = _encoder(tmp_path / "image_encoder")
    words = "a small red circle on a wide green field at noon"  # longer than the 16 positions
    torch.testing.assert_close(paired_text_embeds(NO_PIPE, encoder, words, source=str(clip)),
                               _clip_text_features(clip, words))
    encoder.model.to(torch.bfloat16)
    assert paired_text_embeds(NO_PIPE, encoder, "a dog", source=str(clip)).dtype == torch.bfloat16
