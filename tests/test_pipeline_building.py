"""`ipadapter.pipelines`: the pipeline an adapter attaches to, loaded, given a fused LoRA or a ControlNet; what each
builds, checked against diffusers' own loading and the LoRA's closed form, and the sentences each refuses with."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch

from ipadapter.errors import IPAdapterError, first_clause
from ipadapter.pipelines import add_controlnet, fuse_base_lora, load_pipeline
from tests import factories

NO_TORCHSDE = importlib.util.find_spec("torchsde") is None


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A tiny SD 1.5 pipeline folder, and beside it LoRA files of its UNet (see `_save_lora`)."""
    return factories.save_tiny_sd15_pipeline(tmp_path_factory.mktemp("building"), adapters=())


def _fresh(folder: Path, dtype: torch.dtype = torch.float32):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(folder, dtype=dtype)


ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")


def _save_lora(unet, folder: Path, *, alpha: int, safetensors: bool = True, targets=ATTENTION, seed: int = 0):
    """A rank-4 LoRA of `unet`'s attention projections with random B (so it changes the model), saved by diffusers
    (`save_lora_weights`; the peft config as metadata in a .safetensors file, none in a .bin); returns (file, the peft
    model it came from)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    model = copy.deepcopy(unet)
    model.add_adapter(LoraConfig(r=4, lora_alpha=alpha, target_modules=list(targets), init_lora_weights="gaussian"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    name = "lora.safetensors" if safetensors else "lora.bin"
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(model)), weight_name=name,
        safe_serialization=safetensors,
        unet_lora_adapter_metadata=model.peft_config["default"].to_dict() if safetensors else None)
    return folder / name, model


def _unconditional():
    """A real diffusers pipeline of another kind: unconditional DDPM, no text, no LoRA loader."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(sample_size=8, block_out_channels=(8, 8), norm_num_groups=4,
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
    return DDPMPipeline(unet=unet, scheduler=DDPMScheduler())


# --- load_pipeline ----------------------------------------------------------------------------------------------


def test_load_pipeline_drops_the_safety_checker_and_clears_its_step_bar(tmp_path, monkeypatch) -> None:
    """A folder saved with SD 1.5's safety checker: diffusers loads it, `load_pipeline` leaves it out without reading
    it, and takes a copy whose checker folder was deleted to save space (its model_index.json still names one)."""
    import shutil

    from diffusers import StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    pipe = factories.tiny_sd15_pipeline(tmp_path)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=100)
    checker = StableDiffusionSafetyChecker(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8))
    StableDiffusionPipeline(**{**pipe.components, "safety_checker": checker,
                               "feature_extractor": CLIPImageProcessor(size=32, crop_size=32)},
                            requires_safety_checker=True).save_pretrained(tmp_path / "checked")
    assert StableDiffusionPipeline.from_pretrained(tmp_path / "checked").safety_checker is not None
    shutil.copytree(tmp_path / "checked", tmp_path / "pruned")
    shutil.rmtree(tmp_path / "pruned" / "safety_checker")

    def never(*args, **kwargs):
        raise AssertionError("the safety checker was read")

    monkeypatch.setattr(StableDiffusionSafetyChecker, "from_pretrained", never)
    loaded, pruned = load_pipeline(tmp_path / "checked"), load_pipeline(tmp_path / "pruned")
    assert type(loaded) is StableDiffusionPipeline and loaded.safety_checker is None and pruned.safety_checker is None
    assert loaded.config.requires_safety_checker is False  # saved True: diffusers would warn that it is off
    bar = loaded.progress_bar(total=1)
    assert bar.leave is False
    bar.close()


def test_a_scheduler_is_named_by_its_diffusers_class(saved) -> None:
    """The saved scheduler's config under the class named, as diffusers' `from_config` builds it."""
    import diffusers

    plain = load_pipeline(saved)
    assert type(plain.scheduler) is diffusers.DDIMScheduler
    euler = load_pipeline(saved, scheduler="EulerDiscreteScheduler")
    expected = diffusers.EulerDiscreteScheduler.from_config(plain.scheduler.config)
    assert type(euler.scheduler) is diffusers.EulerDiscreteScheduler
    assert dict(euler.scheduler.config) == dict(expected.config)


@pytest.mark.parametrize("name", ["NoSuchScheduler", "UNet2DConditionModel", "SchedulerMixin"])
def test_a_name_that_is_no_diffusers_scheduler_is_refused(saved, name, tmp_path) -> None:
    """A model class has `from_config` too: built as the scheduler, it failed only mid-generation. The name is
    checked before the pipeline loads (a missing base is not what the message names)."""
    for base in (saved, tmp_path / "no-such-base"):
        with pytest.raises(IPAdapterError) as caught:
            load_pipeline(base, scheduler=name)
        assert str(caught.value) == f"unknown scheduler {name!r} (use a diffusers class name such as DDIMScheduler)"


@pytest.mark.skipif(not NO_TORCHSDE, reason="torchsde is installed: diffusers' SDE schedulers are real here")
def test_a_scheduler_whose_library_is_missing_says_which(saved) -> None:
    """diffusers puts a stand-in under the name, which raises ImportError on use (a traceback, before)."""
    import diffusers

    with pytest.raises(ImportError) as theirs:
        diffusers.DPMSolverSDEScheduler.from_config({})
    with pytest.raises(IPAdapterError) as caught:
        load_pipeline(saved, scheduler="DPMSolverSDEScheduler")
    assert str(caught.value) == f"the scheduler DPMSolverSDEScheduler cannot be used here: {first_clause(theirs.value)}"
    assert "pip install torchsde" in str(caught.value)


@pytest.mark.skipif(not NO_TORCHSDE, reason="torchsde is installed: diffusers' SDE schedulers are real here")
def test_a_saved_part_whose_library_is_missing_is_one_line_without_the_kolors_hint(saved, tmp_path) -> None:
    import json
    import shutil

    import diffusers

    folder = tmp_path / "sde"
    shutil.copytree(saved, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "scheduler": ["diffusers", "DPMSolverSDEScheduler"]}))
    with pytest.raises(ImportError) as theirs:
        diffusers.DiffusionPipeline.from_pretrained(folder)
    with pytest.raises(IPAdapterError) as caught:
        load_pipeline(folder)
    assert str(caught.value) == f"could not load a diffusers pipeline from {folder}: {first_clause(theirs.value)}"


def test_a_folder_diffusers_cannot_read_is_one_line_with_its_reason(saved, tmp_path) -> None:
    """Every part there, but the UNet's weights gone: diffusers' own error (tried again as fp16 files, which are not
    there either), first clause, after the folder's name."""
    import shutil

    import diffusers

    folder = tmp_path / "no-weights"
    shutil.copytree(saved, folder)
    for weights in (folder / "unet").glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(OSError) as theirs:
        diffusers.DiffusionPipeline.from_pretrained(folder)
    with pytest.raises(IPAdapterError) as caught:
        load_pipeline(folder)
    assert str(caught.value) == f"could not load a diffusers pipeline from {folder}: {first_clause(theirs.value)}"


@pytest.mark.parametrize("cached", ["nothing", "configs"])
def test_a_hub_base_not_in_the_cache_offline_names_its_download(saved, tmp_path, monkeypatch, cached) -> None:
    """Offline, a Hub id with nothing in the cache, or its configs without the weights: one line naming the id and
    the command that downloads it."""
    import huggingface_hub.constants as hub

    if cached == "configs":
        factories.write_hub_cache(tmp_path / "hub", "qa/pipe", saved)
        for weights in (tmp_path / "hub").rglob("*.safetensors"):
            weights.unlink()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(IPAdapterError) as caught:
        load_pipeline("qa/pipe")
    assert str(caught.value).startswith("the diffusers pipeline qa/pipe is not in the local Hugging Face cache and "
                                        "offline mode is on (")
    assert "(hf download qa/pipe" in str(caught.value)


def test_a_missing_sentencepiece_names_the_kolors_extra(monkeypatch, tmp_path) -> None:
    """Kolors' ChatGLM tokenizer's own error, as diffusers raises it while loading the pipeline."""
    import json

    import diffusers
    import diffusers.pipelines.kolors.tokenizer as chatglm

    monkeypatch.setattr(chatglm, "is_sentencepiece_available", lambda: False)
    with pytest.raises(ImportError) as theirs:
        chatglm.SPTokenizer("tokenizer.model")

    def from_pretrained(*_: object, **__: object) -> None:
        raise theirs.value

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", from_pretrained)
    folder = tmp_path / "kolors"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "KolorsPipeline"}))
    with pytest.raises(IPAdapterError) as caught:
        load_pipeline(folder)
    assert str(caught.value) == (f"could not load a diffusers pipeline from {folder}: {first_clause(theirs.value)}; "
                                 "for Kolors: pip install 'ipadapter[kolors]'")


# --- fuse_base_lora ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("safetensors", "alpha", "factor"), [(True, 8, 2.0), (True, 4, 1.0), (False, 8, 1.0)])
def test_a_fused_lora_file_is_w_plus_scale_alpha_over_rank_b_a(saved, tmp_path, safetensors, alpha, factor) -> None:
    """W' = W + scale * (alpha / r) * B A on every layer the LoRA targets, and no LoRA module left. A .safetensors
    file carries alpha in its metadata; a .bin has none, and diffusers then takes alpha = r."""
    from peft.tuners.lora import LoraLayer

    pipe = _fresh(saved)
    original = {name: module.weight.detach().clone() for name, module in pipe.unet.named_modules()
                if isinstance(module, torch.nn.Linear)}
    path, model = _save_lora(pipe.unet, tmp_path, alpha=alpha, safetensors=safetensors)
    fused = fuse_base_lora(pipe, path, scale=0.7)
    assert fused is pipe
    modules = dict(fused.unet.named_modules())
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    assert set(layers) == {name for name in original if name.endswith(ATTENTION)}
    for name, layer in layers.items():
        delta = layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        assert type(modules[name]) is torch.nn.Linear
        torch.testing.assert_close(modules[name].weight, original[name] + 0.7 * factor * delta, rtol=0, atol=1e-6)
    assert not any(isinstance(m, LoraLayer) for m in fused.unet.modules())
    assert fused.get_list_adapters() == {}


def test_a_lora_for_another_base_names_a_shape_that_differs(saved, tmp_path) -> None:
    """An SDXL-layout LoRA on SD 1.5: torch's message lists every mismatch; the last one is shown, shortened."""
    xl = factories.sdxl_unet()
    path, _ = _save_lora(xl, tmp_path, alpha=4, targets=(*ATTENTION, "conv1", "conv2"))
    with pytest.raises(RuntimeError) as theirs:
        _fresh(saved).load_lora_weights(str(path), adapter_name="base_lora")
    last = str(theirs.value).strip().splitlines()[-1]
    assert "size mismatch" in last and len(last) > 160
    with pytest.raises(IPAdapterError) as caught:
        fuse_base_lora(_fresh(saved), path)
    assert str(caught.value) == (f"could not load the LoRA {path}: its shapes differ from this model's, it was made "
                                 f"for another base model ({first_clause(last, 160)})")


def _renamed(path: Path, old: str, new: str) -> Path:
    from safetensors.torch import load_file, save_file

    out = path.with_name(f"renamed-{new}.safetensors")
    save_file({key.replace(old, new, 1): value for key, value in load_file(path).items()}, out)
    return out


def test_a_file_that_is_no_lora_is_refused_with_diffusers_reason(saved, tmp_path) -> None:
    """Weights named without `lora` (a model's own weights given as a LoRA): diffusers' reason, its first clause."""
    from safetensors.torch import save_file

    path = tmp_path / "not-a-lora.safetensors"
    save_file({"unet.down_blocks.0.weight": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError) as theirs:
        _fresh(saved).load_lora_weights(str(path), adapter_name="base_lora")
    with pytest.raises(IPAdapterError) as caught:
        fuse_base_lora(_fresh(saved), path)
    assert str(caught.value) == f"could not load the LoRA {path}: {first_clause(str(theirs.value))}"


def test_a_lora_whose_layers_this_model_lacks_is_refused(saved, tmp_path) -> None:
    """Keys under the UNet that name no layer of it (peft's "not found in the base model"), and keys for no part of
    the pipeline at all (diffusers loads nothing and only logs it)."""
    path, _ = _save_lora(_fresh(saved).unet, tmp_path, alpha=4)
    unknown_layers = _renamed(path, "unet.", "unet.nothing_")
    with pytest.raises(IPAdapterError) as caught:
        fuse_base_lora(_fresh(saved), unknown_layers)
    assert str(caught.value) == (f"could not load the LoRA {unknown_layers}: none of its layers exist in this model, "
                                 "it was made for another base model")
    no_part = _renamed(path, "unet.", "prior.")
    pipe = _fresh(saved)
    with pytest.raises(IPAdapterError) as caught:
        fuse_base_lora(pipe, no_part)
    assert str(caught.value) == (f"no layer of this base model matches the LoRA {no_part}; it was made for another "
                                 "model")


def test_a_pipeline_holding_a_lora_or_unable_to_is_refused_untouched(saved, tmp_path) -> None:
    path, _ = _save_lora(_fresh(saved).unet, tmp_path, alpha=4)
    pipe = _fresh(saved)
    pipe.load_lora_weights(str(path), adapter_name="mine")
    pipe.load_lora_weights(str(path), adapter_name="also")
    weights = {name: p.detach().clone() for name, p in pipe.unet.named_parameters()}
    with pytest.raises(IPAdapterError) as caught:
        fuse_base_lora(pipe, path)
    assert str(caught.value) == ("this pipeline already holds the LoRA adapters also, mine; fuse the base LoRA first, "
                                 "then load them")
    assert pipe.get_list_adapters() == {"unet": ["mine", "also"]}
    assert all(torch.equal(p, weights[name]) for name, p in pipe.unet.named_parameters())

    with pytest.raises(IPAdapterError) as caught:
        fuse_base_lora(_unconditional(), path)
    assert str(caught.value) == "DDPMPipeline cannot load a LoRA (use a Stable Diffusion 1.5 / 2.x / SDXL base)"


# --- add_controlnet ---------------------------------------------------------------------------------------------


def _controlnet(folder: Path, **changes) -> Path:
    """A ControlNet copied from a tiny SD 1.5 UNet whose config differs by `changes`, saved in `folder`."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_config({**factories.sd15_unet().config, **changes})
    ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32)).save_pretrained(folder)
    return folder


def test_the_controlnet_takes_the_pipelines_dtype_device_and_progress_bar(saved, tmp_path) -> None:
    """diffusers' `from_pipe` casts every part to float32 unless told the dtype; the meta device stands for a GPU."""
    from diffusers import StableDiffusionControlNetPipeline

    source = _controlnet(tmp_path / "cn")
    pipe = _fresh(saved, torch.bfloat16)
    pipe.set_progress_bar_config(desc="steps", leave=False)
    out = add_controlnet(pipe, source)
    assert type(out) is StableDiffusionControlNetPipeline and out.unet is pipe.unet
    assert {p.dtype for part in (out.unet, out.vae, out.text_encoder, out.controlnet)
            for p in part.parameters()} == {torch.bfloat16}
    bar = out.progress_bar(total=1)
    assert (bar.desc, bar.leave) == ("steps", False)
    bar.close()
    on_meta = add_controlnet(_fresh(saved).to("meta"), source)
    assert {p.device.type for p in on_meta.controlnet.parameters()} == {"meta"}


def test_a_controlnet_in_a_hub_subfolder_is_read_from_the_cache_without_a_request(saved, tmp_path,
                                                                                  monkeypatch) -> None:
    """Online, a cached "owner/repo/subfolder" asks nothing about the model (huggingface_hub's own telemetry request,
    /api/agent-harnesses, names none); an uncached one asks once, then says how to download that subfolder."""
    from diffusers import ControlNetModel

    repo = tmp_path / "repo"
    _controlnet(repo / "sd15")
    factories.write_hub_cache(tmp_path / "hub", "ipadapter-tests/controlnets", repo)
    sent = factories.hub_without_network(monkeypatch, tmp_path / "hub")
    out = add_controlnet(_fresh(saved), "ipadapter-tests/controlnets/sd15")
    expected = ControlNetModel.from_pretrained(repo / "sd15")
    assert [url for url in sent if "ipadapter-tests" in url] == []
    assert all(torch.equal(a, b) for a, b in zip(out.controlnet.state_dict().values(), expected.state_dict().values()))
    with pytest.raises(IPAdapterError) as caught:
        add_controlnet(_fresh(saved), "ipadapter-tests/elsewhere/sd15")
    assert str(caught.value) == ("the ControlNet ipadapter-tests/elsewhere/sd15 is not in the local Hugging Face cache "
                                 "and the Hub cannot be reached; download it once with network access (hf download "
                                 "ipadapter-tests/elsewhere --include 'sd15/*') or give a local folder")
    asked = [url for url in sent if "ipadapter-tests" in url]
    assert asked == ["https://huggingface.co/api/models/ipadapter-tests/elsewhere"]


def test_a_missing_or_empty_controlnet_folder_is_one_sentence(saved, tmp_path, monkeypatch) -> None:
    from diffusers import ControlNetModel

    monkeypatch.chdir(tmp_path)
    for source in ("./none", str(tmp_path / "none")):
        with pytest.raises(IPAdapterError) as caught:
            add_controlnet(_fresh(saved), source)
        assert str(caught.value) == (f"ControlNet folder not found: {source} (no such file or folder; a Hub model id "
                                     "has the form owner/name)")
    (tmp_path / "empty").mkdir()
    with pytest.raises(OSError) as theirs:
        ControlNetModel.from_pretrained(tmp_path / "empty", local_files_only=True)
    with pytest.raises(IPAdapterError) as caught:
        add_controlnet(_fresh(saved), tmp_path / "empty")
    assert str(caught.value) == f"could not load a ControlNet from {tmp_path / 'empty'}: {first_clause(theirs.value)}"


@pytest.mark.parametrize("changes", [{"block_out_channels": (32, 64, 64, 32)}, {"cross_attention_dim": 48}])
def test_a_controlnet_for_another_base_is_refused_before_generating(saved, tmp_path, changes) -> None:
    """Either width differing is enough: the block widths (the residuals added to the UNet's) or the text width."""
    from diffusers import ControlNetModel

    source = _controlnet(tmp_path / "other", **changes)
    mine, base = ControlNetModel.from_pretrained(source).config, factories.sd15_unet().config
    with pytest.raises(IPAdapterError) as caught:
        add_controlnet(_fresh(saved), source)
    assert str(caught.value) == (
        f"the ControlNet {source} was made for another base model (widths {tuple(mine.block_out_channels)}, text "
        f"width {mine.cross_attention_dim}; this UNet: {tuple(base.block_out_channels)}, {base.cross_attention_dim})")


def test_a_controlnet_needs_a_stable_diffusion_text_to_image_base(tmp_path) -> None:
    with pytest.raises(IPAdapterError) as caught:
        add_controlnet(_unconditional(), _controlnet(tmp_path / "cn"))
    assert str(caught.value) == ("a ControlNet needs a Stable Diffusion 1.5 / 2.x or SDXL text-to-image base, not "
                                 "DDPMPipeline")
