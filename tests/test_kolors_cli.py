"""`ipadapter generate` on a Kolors pipeline folder, text encoder included: the saved image equals what diffusers'
own KolorsPipeline makes with `load_ip_adapter` on the same weights, seed and settings.

The folder holds real classes with tiny random weights: ChatGLM (diffusers' copy) with a sentencepiece tokenizer
trained here on a few lines, the SDXL-shaped Kolors UNet of test_kolors.py, and a ViT-L/14-336-like CLIP beside it.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from ipadapter.cli.main import main
from tests import factories
from tests.test_kolors import CROSS, TEXT, kolors_unet, vit_l_336_like

pytest.importorskip("sentencepiece")  # the ChatGLM tokenizer's vocabulary format

LINES = ["a photo of a cat", "a red square on a blue ground", "a dog on a beach", "the quick brown fox jumps",
         "an image prompt adapter", "colours, shapes and textures"]


def chatglm_tokenizer(folder):
    """A ChatGLMTokenizer whose sentencepiece model is trained here (a 40-piece unigram vocabulary)."""
    import sentencepiece as spm
    from diffusers.pipelines.kolors.tokenizer import ChatGLMTokenizer

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(LINES * 5), model_writer=model, vocab_size=40,
                                   model_type="unigram", character_coverage=1.0, minloglevel=2)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    return ChatGLMTokenizer(vocab_file=str(folder / "tokenizer.model"))


def chatglm(seed: int = 5, layers: int = 1):
    """ChatGLM layers of TEXT width: their hidden states are what the Kolors UNet's text projection reads."""
    from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig, ChatGLMModel

    torch.manual_seed(seed)
    model = ChatGLMModel(ChatGLMConfig(num_layers=layers, padded_vocab_size=64, hidden_size=TEXT, ffn_hidden_size=64,
                                       kv_channels=TEXT // 2, num_attention_heads=2, seq_length=256,
                                       original_rope=True), empty_init=False).eval()
    with torch.no_grad():  # its RMSNorm weights are left uninitialised (torch.empty) even with empty_init=False
        for name, param in model.named_parameters():
            if name.endswith("layernorm.weight"):
                param.fill_(1.0)
    return model


def write_kolors(root, layers: int = 1):
    """`root` holding a Kolors pipeline folder (`kolors/`), the image encoder (`clip/`), a Plus adapter file in the
    published layout and a reference image (`ref.png`)."""
    from diffusers import EulerDiscreteScheduler
    from diffusers.pipelines.kolors.pipeline_kolors import KolorsPipeline

    pipe = KolorsPipeline(vae=factories.tiny_vae(2), text_encoder=chatglm(layers=layers),
                          tokenizer=chatglm_tokenizer(root / "tok"), unet=kolors_unet(),
                          scheduler=EulerDiscreteScheduler(beta_schedule="scaled_linear"))
    pipe.save_pretrained(root / "kolors")
    encoder = vit_l_336_like()
    encoder.model.save_pretrained(root / "clip")
    encoder.processor.save_pretrained(root / "clip")
    nested = factories.published(pipe.unet, "plus", CROSS)
    save_file({f"{group}.{k}": v.contiguous() for group, tensors in nested.items() for k, v in tensors.items()},
              str(root / "ip_adapter_plus_general.safetensors"))
    reference = Image.fromarray(np.random.default_rng(0).integers(0, 255, (28, 28, 3), dtype=np.uint8))
    reference.save(root / "ref.png")
    return root


@pytest.fixture(scope="module")
def kolors_folder(tmp_path_factory):
    return write_kolors(tmp_path_factory.mktemp("kolors"))


def test_cli_generate_on_kolors_equals_diffusers(kolors_folder, tmp_path) -> None:
    from diffusers import DiffusionPipeline
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    root = kolors_folder
    out = tmp_path / "kolors.png"
    settings = dict(prompt="a cat", negative_prompt="a dog", scale=0.6, steps=2, guidance=5.0, seed=1, size=16)
    argv = ["generate", "--base", str(root / "kolors"), "--adapter", str(root / "ip_adapter_plus_general.safetensors"),
            "--image-encoder", str(root / "clip"), "--image", str(root / "ref.png"), "--prompt", settings["prompt"],
            "--negative-prompt", settings["negative_prompt"], "--scale", str(settings["scale"]),
            "--steps", str(settings["steps"]), "--guidance", str(settings["guidance"]), "--seed", str(settings["seed"]),
            "--width", str(settings["size"]), "--height", str(settings["size"]), "--device", "cpu", "--out", str(out)]
    assert main(argv) == 0
    ours = np.asarray(Image.open(out).convert("RGB")).astype(np.int16)

    pipe = DiffusionPipeline.from_pretrained(str(root / "kolors"))
    assert type(pipe).__name__ == "KolorsPipeline"
    pipe.set_progress_bar_config(disable=True)
    common = dict(prompt=settings["prompt"], negative_prompt=settings["negative_prompt"],
                  num_inference_steps=settings["steps"], guidance_scale=settings["guidance"],
                  width=settings["size"], height=settings["size"], output_type="np")
    plain = pipe(generator=torch.Generator().manual_seed(settings["seed"]), **common).images[0]
    pipe.load_ip_adapter(str(root), subfolder="", weight_name="ip_adapter_plus_general.safetensors",
                         image_encoder_folder=None)
    pipe.image_encoder = CLIPVisionModelWithProjection.from_pretrained(str(root / "clip")).eval()
    pipe.feature_extractor = CLIPImageProcessor.from_pretrained(str(root / "clip"))
    pipe.set_ip_adapter_scale(settings["scale"])
    expected = pipe(ip_adapter_image=Image.open(root / "ref.png").convert("RGB"),
                    generator=torch.Generator().manual_seed(settings["seed"]), **common).images[0]
    assert np.abs(expected - plain).max() > 2 / 255  # the adapter shows in the image, beyond PNG rounding
    assert np.abs(ours - np.round(expected * 255)).max() <= 1  # PNG: 8 bits per channel


def test_a_kolors_base_without_sentencepiece_is_a_one_line_error(kolors_folder, tmp_path, monkeypatch, capsys) -> None:
    """The tokenizer's own check (as on a machine without sentencepiece) becomes one line naming the extra."""
    import diffusers.pipelines.kolors.tokenizer as chatglm_tokenizer_module

    monkeypatch.setattr(chatglm_tokenizer_module, "is_sentencepiece_available", lambda: False)
    root = kolors_folder
    out = tmp_path / "x.png"
    code = main(["generate", "--base", str(root / "kolors"), "--adapter", str(root / "ip_adapter_plus_general.safetensors"),
                 "--image-encoder", str(root / "clip"), "--image", str(root / "ref.png"), "--device", "cpu",
                 "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "ipadapter[kolors]" in err[0]
    assert not out.exists()


def test_a_kolors_folder_missing_its_tokenizer_is_a_one_line_error(kolors_folder, tmp_path, capsys) -> None:
    """diffusers hands ChatGLM's tokenizer a missing vocabulary as None, which fails with a TypeError (a traceback):
    every part model_index.json names is looked for first."""
    import shutil

    base = tmp_path / "kolors"
    shutil.copytree(kolors_folder / "kolors", base)
    shutil.rmtree(base / "tokenizer")
    root = kolors_folder
    code = main(["generate", "--base", str(base), "--adapter", str(root / "ip_adapter_plus_general.safetensors"),
                 "--image-encoder", str(root / "clip"), "--image", str(root / "ref.png"), "--device", "cpu",
                 "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"ipadapter: error: {base} is missing its tokenizer folder (its model_index.json "
                                 "names a ChatGLMTokenizer)"]


def test_a_kolors_tokenizer_without_its_vocabulary_is_a_one_line_error(kolors_folder, tmp_path, capsys) -> None:
    """The tokenizer folder there but its sentencepiece model gone: ChatGLM's tokenizer would get None for it (a
    TypeError); the file is looked for first and named."""
    import shutil

    base = tmp_path / "kolors"
    shutil.copytree(kolors_folder / "kolors", base)
    (base / "tokenizer" / "tokenizer.model").unlink()
    root = kolors_folder
    code = main(["generate", "--base", str(base), "--adapter", str(root / "ip_adapter_plus_general.safetensors"),
                 "--image-encoder", str(root / "clip"), "--image", str(root / "ref.png"), "--device", "cpu",
                 "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"ipadapter: error: cannot load the tokenizer from {base}/tokenizer: ")
    assert "tokenizer/tokenizer.model" in err[0]
