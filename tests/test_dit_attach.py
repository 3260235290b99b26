"""Attaching transformer adapters (FLUX, SD 3) and reading their files: every refusal is one sentence naming what
does not fit, given before anything changes; every published form and the loader's options arrive at the same
weights."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
from safetensors.torch import save_file

from ipadapter.checkpoint import adapter_from_state_dict, flatten, save_adapter
from ipadapter.dit.attach import attach_dit
from ipadapter.dit.blocks import denoiser_of, dit_blocks
from ipadapter.dit.checkpoint import dit_adapter_from_state_dict, load_dit_adapter
from ipadapter.errors import IPAdapterError
from ipadapter.runtime import AdapterPrompt, Reference
from tests import dit_factories as df
from tests import factories


def flux_adapter(model=None, **state):
    return dit_adapter_from_state_dict(df.xlabs_state(**state), model if model is not None else df.flux_transformer())


def a_prompt(adapter, **kwargs) -> AdapterPrompt:
    return AdapterPrompt([Reference(cond=adapter.project(torch.zeros(1, df.CLIP_DIM)))], **kwargs)


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_prompts_naming_what_a_transformer_lacks_are_refused() -> None:
    model = df.flux_transformer()
    adapter = flux_adapter(model)
    attachment = attach_dit(model, {"style": adapter, "layout": flux_adapter(model, seed=2)})
    stray = {"transformer_blocks.0.attn": 1.0, "down_blocks.0.attentions.0": 1.0}
    prompt = a_prompt(adapter)
    prompt.references[0].layer_weights = stray
    cases = [
        ({"face": a_prompt(adapter)}, "no adapter named 'face'; attached: style, layout"),
        ({"style": a_prompt(adapter, uncond_layers=frozenset({"transformer_blocks.0.attn"}))},
         "adapter 'style': unconditional layers are a UNet preset; a transformer has none"),
        ({"style": a_prompt(adapter, layer_weights=stray)},
         "adapter 'style': layer weights name 'down_blocks.0.attentions.0', which is not an adapted block of this "
         "transformer (blocks are named like 'transformer_blocks.0.attn')"),
        ({"style": prompt}, "adapter 'style': layer weights name 'down_blocks.0.attentions.0', which is not"),
    ]
    for prompts, sentence in cases:
        with pytest.raises(IPAdapterError) as error:
            attachment.set_prompts(prompts)
        assert str(error.value).startswith(sentence)
    assert attachment.runtime.prompts == {}


def test_adapters_that_do_not_fit_are_refused_before_anything_changes() -> None:
    model = df.flux_transformer()
    originals = dict(model.attn_processors)
    unet_adapter = adapter_from_state_dict(factories.published(factories.sd15_unet(), "base", factories.SD15_CROSS),
                                           factories.sd15_unet())
    sd3_adapter = dit_adapter_from_state_dict(df.instantx_state(), df.sd3_transformer())
    deeper = flux_adapter(df.flux_transformer(double=3), blocks=3)
    wider = dit_adapter_from_state_dict(df.xlabs_state(width=64), df.flux_transformer(head_dim=32))
    on_meta = flux_adapter(model).to("meta")
    cases = [
        (unet_adapter, "adapter '0' is an IP-Adapter for a UNet; this base is a FLUX transformer"),
        (sd3_adapter, "adapter '0' is an IP-Adapter for an SD 3 / 3.5 transformer but this base is a FLUX "
                      "transformer; use an adapter made for it"),
        (deeper, "adapter '0' has weights for 3 blocks but this transformer has 2; it was made for another model size"),
        (wider, "adapter '0''s block transformer_blocks.0.attn is 64 wide but the transformer's is 32; it was made for "
                "another model size"),
        (on_meta, "adapter '0' is on meta but the transformer on cpu; move it first"),
    ]
    for adapter, sentence in cases:
        with pytest.raises(IPAdapterError) as error:
            attach_dit(model, adapter)
        assert str(error.value) == sentence
        assert all(model.attn_processors[k] is v for k, v in originals.items())
    attachment = attach_dit(model, flux_adapter(model))
    with pytest.raises(IPAdapterError, match="^this transformer already has adapters attached; detach them first or "
                                             "attach all together$"):
        attach_dit(model, flux_adapter(model))
    attachment.detach()


class _Stub(torch.nn.Module):
    """A diffusers-like model with attention processors but none of the blocks an IP-Adapter fits."""

    attn_processors: dict = {}
    device = torch.device("cpu")


def test_a_model_of_another_kind_is_named_by_its_class() -> None:
    with pytest.raises(IPAdapterError, match="^adapter '0' is an IP-Adapter for a FLUX transformer but this base is "
                                             "_Stub; use an adapter made for it$"):
        attach_dit(_Stub(), flux_adapter())


def test_any_one_key_of_a_layout_names_it() -> None:
    """The published key patterns (docs/checkpoints.md): any one of a layout's marks names it, so even a partial
    file is called by the base it was made for."""
    from ipadapter.dit.layouts import published_layout

    marks = {"flux": ["ip_adapter_proj_model.proj.weight", "double_blocks.0.processor.ip_adapter_double_stream_k_proj."
                      "weight", "ip_adapter.0.to_k_ip.bias"],
             "sd3": ["image_proj.time_embedding.linear_1.weight", "ip_adapter.3.norm_ip.linear.weight"],
             "unet": ["image_proj.proj.weight", "ip_adapter.1.to_k_ip.weight"]}
    for layout, keys in marks.items():
        for key in keys:
            assert published_layout([key, "unrelated.weight"]) == layout, key
    assert published_layout(["unrelated.weight"]) is None


def test_a_processor_replaced_after_attaching_is_named() -> None:
    model = df.flux_transformer()
    attachment = attach_dit(model, flux_adapter(model))
    attachment.check_intact()
    model.transformer_blocks[1].attn.set_processor(FluxAttnProcessor())
    with pytest.raises(IPAdapterError, match=r"^the attention processor of transformer_blocks\.1\.attn was replaced "
                                             r"after the adapter was attached \(for example by set_attn_processor\); "
                                             "attach the adapter again$"):
        attachment.check_intact()


def test_models_without_adapted_blocks_are_named() -> None:
    with pytest.raises(IPAdapterError, match="^object has neither a UNet nor a transformer to attach an IP-Adapter "
                                             "to$"):
        denoiser_of(object())
    with pytest.raises(IPAdapterError, match="^UNet2DConditionModel is not a FLUX or SD 3 transformer$"):
        dit_blocks(factories.sd15_unet())
    assert [(b.name, b.index, b.width, b.head_dim) for b in dit_blocks(df.sd3_transformer())] == [
        ("transformer_blocks.0.attn", 0, df.SD3_WIDTH, 8), ("transformer_blocks.1.attn", 1, df.SD3_WIDTH, 8)]


def test_every_published_form_gives_the_same_adapter(tmp_path) -> None:
    """XLabs' flat file, diffusers' nested form of it, a file with unrelated metadata, the project's own file, and
    a file found by folder, subfolder and weight name all load to the same weights."""
    model = df.flux_transformer()
    state = df.xlabs_state()
    xlabs = dit_adapter_from_state_dict(state, model)
    nested = dit_adapter_from_state_dict(df.xlabs_as_diffusers(state), model)
    tagged = dit_adapter_from_state_dict(state, model, metadata={"source": "a converter"})
    own = load_dit_adapter(save_adapter(xlabs, tmp_path / "own.safetensors"), model)
    (tmp_path / "repo" / "flux").mkdir(parents=True)
    save_file(state, str(tmp_path / "repo" / "flux" / "ip_adapter.safetensors"))
    found = load_dit_adapter(tmp_path / "repo", model, subfolder="flux", weight_name="ip_adapter.safetensors")
    for other in (nested, tagged, own, found):
        assert other.config == xlabs.config and same_weights(other, xlabs)


def test_dtype_and_device_follow_the_model_unless_asked(tmp_path) -> None:
    model = df.flux_transformer().to(torch.bfloat16)
    path = tmp_path / "ip_adapter.safetensors"
    save_file(df.xlabs_state(), str(path))
    assert load_dit_adapter(path, model).dtype == torch.bfloat16
    assert load_dit_adapter(path, model, dtype=torch.float16).dtype == torch.float16
    assert load_dit_adapter(path, model, device="meta").device == torch.device("meta")
    assert dit_adapter_from_state_dict(df.xlabs_state(), model, device="meta").device == torch.device("meta")


def test_wrong_files_name_the_file_and_what_is_wrong(tmp_path) -> None:
    model = df.flux_transformer()
    state = df.xlabs_state()
    unet_state = factories.published(factories.sd15_unet(), "base", factories.SD15_CROSS)
    unet_own = save_adapter(adapter_from_state_dict(unet_state, factories.sd15_unet()), tmp_path / "unet.safetensors")
    k_bias = "double_blocks.0.processor.ip_adapter_double_stream_k_proj.bias"
    without_bias = {k: v for k, v in state.items() if k != k_bias}
    extra = {**state, "ip_adapter.0.to_q_ip.weight": torch.zeros(2, 2)}
    cases = [
        ({"vae.weight": torch.zeros(1)},
         "x.safetensors is not an IP-Adapter file (no image projection or block weights)"),
        ({**state, "ip_adapter.stray": torch.zeros(1)},
         "x.safetensors: unexpected key 'ip_adapter.stray' in ip_adapter weights"),
        ({**state, "vae.weight": torch.zeros(1)},
         "x.safetensors: unexpected key 'vae.weight' (not an IP-Adapter weight)"),
        (without_bias, "x.safetensors: its weights do not fit this transformer (missing "
                       "layers.transformer_blocks.0.attn.to_k_ip.bias); wrong base model or file?"),
        (extra, "x.safetensors: its weights do not fit this transformer (unexpected "
                "layers.transformer_blocks.0.attn.to_q_ip.weight); wrong base model or file?"),
        (df.xlabs_state(width=64), "x.safetensors: weight layers.transformer_blocks.0.attn.to_k_ip.bias has shape "
                                   "(64,), this transformer needs (32,); it was made for another model size"),
        (df.xlabs_state(blocks=3), "x.safetensors has weights for 3 blocks but this transformer has 2; it was made for "
                                   "another model size"),
        (unet_state, "x.safetensors is an IP-Adapter for a UNet (SD 1.5 / 2.x / SDXL / Kolors) but this base is a FLUX "
                     "transformer; use an adapter made for this base model"),
    ]
    for i, (tensors, sentence) in enumerate(cases):
        path = tmp_path / str(i) / "x.safetensors"
        path.parent.mkdir()
        save_file(flatten(tensors), str(path))
        with pytest.raises(IPAdapterError) as error:
            load_dit_adapter(path, model)
        assert str(error.value) == sentence.replace("x.safetensors", str(path), 1)
    with pytest.raises(IPAdapterError) as error:
        load_dit_adapter(unet_own, model)
    assert str(error.value) == (f"{unet_own} is an IP-Adapter for a UNet (SD 1.5 / 2.x / SDXL / Kolors) but this base "
                                "is a FLUX transformer; use an adapter made for this base model")
    with pytest.raises(IPAdapterError, match="^the state dict is not an IP-Adapter file"):
        dit_adapter_from_state_dict({"vae.weight": torch.zeros(1)}, model)


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_the_original_processor_gets_every_argument(kind: str) -> None:
    """Whether an adapter acts or not, the block's own processor is called with every argument the block was
    given (mask, rotary embedding, extras); a call without text (no joint attention) is the original's alone."""
    if kind == "flux":
        model = df.flux_transformer()
        adapter = flux_adapter(model)
        embeds = adapter.project(torch.zeros(1, df.CLIP_DIM))
        x = {"hidden_states": torch.randn(2, 24, 4), "encoder_hidden_states": torch.randn(2, 5, df.FLUX_JOINT),
             "pooled_projections": torch.randn(2, 32), "timestep": torch.full((2,), 0.5),
             "img_ids": torch.zeros(24, 3), "txt_ids": torch.zeros(5, 3)}
        positional, defaults = ("the mask", "the rotary embedding", "an extra"), (None, None)
        length = 24
    else:
        model = df.sd3_transformer()
        adapter = dit_adapter_from_state_dict(df.instantx_state(), model)
        embeds = torch.randn(1, 9, df.SIGLIP_DIM)
        x = {"hidden_states": torch.randn(2, 4, 8, 6), "encoder_hidden_states": torch.randn(2, 5, 32),
             "pooled_projections": torch.randn(2, 64), "timestep": torch.full((2,), 500.0)}
        positional, defaults = ("the mask", "an extra"), (None,)
        length = 48
    attachment = attach_dit(model, adapter)
    attn = model.transformer_blocks[0].attn
    processor = attn.processor
    seen = []

    def recording(attn, hidden, text=None, *args, **kwargs):
        seen.append((args, kwargs))
        return hidden + 1 if text is None else (hidden + 1, text + 1)

    for prompts in ({}, {"0": AdapterPrompt([Reference(cond=embeds)])}):
        attachment.set_prompts(prompts, rows=2)
        with torch.no_grad():
            model(**x)  # the hook's per-call state (SD 3: this call's time tokens)
            processor.original = recording
            hidden, text = torch.randn(2, length, attn.to_q.in_features), torch.randn(2, 5, attn.to_q.in_features)
            out = processor(attn, hidden, text, *positional, extra=1)
            alone = processor(attn, hidden)
        processor.original = attachment._originals["transformer_blocks.0.attn"]
        assert seen[-2:] == [(positional, {"extra": 1}), (defaults, {})]
        assert torch.equal(out[1], text + 1) and torch.equal(alone, hidden + 1)
        # FLUX hands its branch back as a third output, SD 3 adds it to the image stream
        acted = len(out) == 3 if kind == "flux" else not torch.equal(out[0], hidden + 1)
        assert acted == bool(prompts)
