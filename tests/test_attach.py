"""Attaching leaves what the caller passed as it was: the adapter's dtype and device, the UNet's processors."""

from __future__ import annotations

import pytest
import torch

from ipadapter import IPAdapterError, attach
from ipadapter.adapter import AdapterConfig, IPAdapter
from ipadapter.projection import ProjectionConfig
from tests import factories


def _new_adapter(unet) -> IPAdapter:
    config = AdapterConfig("base", ProjectionConfig("linear", in_dim=8, cross_dim=factories.SD15_CROSS, tokens=4))
    return IPAdapter.for_unet(unet, config)


def test_attach_to_a_bf16_unet_keeps_the_fp32_adapter_bit_for_bit() -> None:
    """The trainer's order: adapter made from the fp32 UNet (K'/V' = to_k/to_v), UNet cast to bf16, then attached."""
    unet = factories.sd15_unet()
    adapter = _new_adapter(unet)
    fp32_kv = {name: (unet.get_submodule(name).to_k.weight.clone(), unet.get_submodule(name).to_v.weight.clone())
               for name, layer in adapter.named_layers() if layer.has_ip}
    unet.to(torch.bfloat16)
    attachment = attach(unet, adapter)
    try:
        assert adapter.dtype == torch.float32
        for name, (k, v) in fp32_kv.items():
            layer = adapter.layer(name)
            assert torch.equal(layer.to_k_ip.weight, k) and torch.equal(layer.to_v_ip.weight, v)
    finally:
        attachment.detach()


def test_attach_refuses_an_adapter_on_another_device_without_moving_it() -> None:
    unet = factories.sd15_unet()
    adapter = _new_adapter(unet).to("meta")
    with pytest.raises(IPAdapterError) as caught:
        attach(unet, adapter)
    assert str(caught.value) == (
        "adapter '0' is on meta but the UNet on cpu; move it first (adapter.to(unet.device)) or load it for this UNet "
        "(load_adapter places it on the UNet's device)")
    assert adapter.device == torch.device("meta")
    assert not any("IPAttn" in type(p).__name__ for p in unet.attn_processors.values())


def test_plain_attention_blocks_before_transformer_ones_are_stepped_over() -> None:
    """UNets may mix plain self-attention blocks (`AttnDownBlock2D`: `attentions.0` is itself the Attention, no
    transformer blocks) with transformer ones. Only transformer layers take an adapter, each at its position in
    `unet.attn_processors` (the checkpoint order, docs/checkpoints.md), however many plain ones come before it."""
    from diffusers import UNet2DConditionModel

    from ipadapter.layers import attention_layers

    unet = UNet2DConditionModel(
        sample_size=16, layers_per_block=1, block_out_channels=(32, 64), cross_attention_dim=32, attention_head_dim=8,
        norm_num_groups=8, down_block_types=("AttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "AttnUpBlock2D"),
    )
    names = [k.removesuffix(".processor") for k in unet.attn_processors]
    expected = {name: i for i, name in enumerate(names) if ".transformer_blocks." in name}
    assert len(expected) == 8 and len(names) == 11  # 3 plain ones: the first down block's, the last up block's two
    assert {layer.name: layer.index for layer in attention_layers(unet)} == expected


def test_an_adapter_for_an_unknown_family_is_named_by_its_token_width(sd15_unet) -> None:
    config = AdapterConfig("base", ProjectionConfig("linear", in_dim=8, cross_dim=16, tokens=4))
    adapter = IPAdapter.for_unet(sd15_unet, config)
    with pytest.raises(IPAdapterError) as err:
        attach(sd15_unet, adapter)
    assert str(err.value) == (
        "adapter '0' was made for a model with 16-wide text tokens (token width 16) but this UNet is a model with "
        "32-wide text tokens (width 32); use an adapter made for a model with 32-wide text tokens"
    )


def test_detach_leaves_the_unet_as_never_touched_and_may_be_called_twice(sd15_unet) -> None:
    """The same processor objects and no hook left behind; a second detach (a `with` block around an explicit
    detach) changes nothing and raises nothing."""
    processors = dict(sd15_unet.attn_processors)
    hooks = dict(sd15_unet._forward_pre_hooks)
    attachment = attach(sd15_unet, _new_adapter(sd15_unet))
    assert dict(sd15_unet._forward_pre_hooks) != hooks
    for _ in range(2):
        attachment.detach()
        assert dict(sd15_unet._forward_pre_hooks) == hooks
        assert all(p is processors[n] for n, p in sd15_unet.attn_processors.items())


def test_while_attached_the_adapters_layers_move_with_the_unet() -> None:
    """Model offloading moves the UNet (`unet.to(...)`) just before it runs: while attached, the adapter's layers are
    submodules of the UNet's processors, as diffusers' own IP-Adapter processors hold their K'/V' weights, so they
    move and cast with it (a dtype stands in for a device here). Detached, the UNet holds none of them."""
    unet = factories.sd15_unet()
    adapter = _new_adapter(unet)
    keys = set(unet.state_dict())
    attachment = attach(unet, adapter)
    try:
        unet.to(torch.float64)
        assert {p.dtype for p in adapter.layers.parameters()} == {torch.float64}
        assert len(set(unet.state_dict()) - keys) == len(adapter.layers.state_dict())
    finally:
        attachment.detach()
    assert set(unet.state_dict()) == keys


def test_a_processor_replaced_after_attaching_is_one_sentence(sd15_unet) -> None:
    from diffusers.models.attention_processor import AttnProcessor2_0

    attachment = attach(sd15_unet, _new_adapter(sd15_unet))
    name = "up_blocks.1.attentions.0.transformer_blocks.0.attn2"
    sd15_unet.get_submodule(name).set_processor(AttnProcessor2_0())
    with pytest.raises(IPAdapterError) as err:
        attachment.check_intact()
    attachment.detach()
    assert str(err.value) == (
        f"the attention processor of {name} was replaced after the adapter was attached (for example by "
        "set_attn_processor or enable_xformers_memory_efficient_attention); attach the adapter again"
    )


def test_a_layer_removed_after_attaching_is_named_as_a_replaced_one() -> None:
    """A block rebuilt after attaching (its attention layer gone from the path) loses the adapter there as surely as
    a replaced processor: the layer is named, not skipped with every layer after it. (The UNet is the test's own:
    with a layer gone, it cannot be detached.)"""
    unet = factories.sd15_unet()
    attachment = attach(unet, _new_adapter(unet))
    first = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    del unet.get_submodule(first.rsplit(".", 1)[0]).attn2
    with pytest.raises(IPAdapterError, match=f"the attention processor of {first} was replaced"):
        attachment.check_intact()


def test_a_layer_whose_processor_this_attachment_did_not_put_in_is_named(sd15_unet) -> None:
    """An adapter processor of the same kind, but not the one attached (the layer copied, e.g. by a deep copy of
    the block), would escape `detach` and the next prompts: named as a replacement too."""
    import copy

    attachment = attach(sd15_unet, _new_adapter(sd15_unet))
    block = "down_blocks.0.attentions.0.transformer_blocks.0"
    original = sd15_unet.get_submodule(block).attn2
    sd15_unet.get_submodule(block).attn2 = copy.deepcopy(original)
    try:
        with pytest.raises(IPAdapterError, match=f"^the attention processor of {block}.attn2 was replaced after"):
            attachment.check_intact()
    finally:
        sd15_unet.get_submodule(block).attn2 = original
        attachment.detach()


def test_an_adapters_layer_is_found_by_a_cross_attention_layers_name_only(sd15_unet) -> None:
    """`IPAdapter.layer(name)`: the weights at a cross-attention layer (diffusers' `Attention.is_cross_attention`),
    None at every other module path of the UNet, the blocks that hold those layers included."""
    from diffusers.models.attention_processor import Attention

    from ipadapter.adapter import AdapterLayer

    adapter = _new_adapter(sd15_unet)
    cross = {n for n, m in sd15_unet.named_modules() if isinstance(m, Attention) and m.is_cross_attention}
    assert len(cross) == 16
    for name, _ in sd15_unet.named_modules():
        found = adapter.layer(name)
        assert isinstance(found, AdapterLayer) if name in cross else found is None, name


@pytest.mark.parametrize("dynamo", ["inside", "outside", "no flag", "not imported"])
def test_processors_are_prepared_exactly_when_dynamo_runs_a_compiled_module(sd15_unet, monkeypatch, dynamo) -> None:
    """The hook prepares every processor's plan when dynamo's own flag (`_is_in_optimized_module`, set while a
    `torch.compile(module)` call runs) says so, and never otherwise: not outside such a call, not on a torch whose
    dynamo lacks the flag, not before dynamo is imported. tests/test_compile.py checks the same under real dynamo."""
    import sys

    import torch._dynamo.eval_frame as eval_frame

    from ipadapter.attention import IPAttnProcessor

    if dynamo == "no flag":
        monkeypatch.delattr(eval_frame, "_is_in_optimized_module")
    elif dynamo == "not imported":
        monkeypatch.delitem(sys.modules, "torch._dynamo.eval_frame")
    else:
        monkeypatch.setattr(eval_frame, "_is_in_optimized_module", lambda: dynamo == "inside")
    prepared = []
    original = IPAttnProcessor.prepare
    monkeypatch.setattr(IPAttnProcessor, "prepare",
                        lambda self, *args, **kwargs: (prepared.append(self), original(self, *args, **kwargs))[1])
    attachment = attach(sd15_unet, _new_adapter(sd15_unet))
    g = torch.Generator().manual_seed(0)
    sample, text = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 6, factories.SD15_CROSS, generator=g)
    with torch.no_grad():
        sd15_unet(sample, 10, encoder_hidden_states=text)
    attachment.detach()
    assert len(prepared) == (16 if dynamo == "inside" else 0)
    assert len(set(map(id, prepared))) == len(prepared)


def test_prepared_plans_are_forgotten_once_when_the_unet_runs_eager_again(sd15_unet, monkeypatch) -> None:
    """A compiled call's prepared plans (terms on the device) are dropped at the first eager call after it, once for
    every processor, and not again at the eager calls that follow."""
    import torch._dynamo.eval_frame as eval_frame

    from ipadapter.attention import IPAttnProcessor

    compiled = []
    monkeypatch.setattr(eval_frame, "_is_in_optimized_module", lambda: compiled[-1])
    forgotten = []
    original = IPAttnProcessor.forget_prepared
    monkeypatch.setattr(IPAttnProcessor, "forget_prepared", lambda self: (forgotten.append(self), original(self))[1])
    attachment = attach(sd15_unet, _new_adapter(sd15_unet))
    g = torch.Generator().manual_seed(0)
    sample, text = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 6, factories.SD15_CROSS, generator=g)
    counts = []
    for inside in (True, False, False, True, False):
        compiled.append(inside)
        with torch.no_grad():
            sd15_unet(sample, 10, encoder_hidden_states=text)
        counts.append(len(forgotten))
    attachment.detach()
    assert counts == [0, 16, 16, 16, 32]


def test_prompts_for_an_adapter_not_attached_are_one_sentence_naming_the_attached_ones(sd15_unet) -> None:
    """`set_prompts` with a name no attached adapter has: refused before anything is set, naming the first unknown
    name in sorted order and every attached one; a name that is attached is then accepted."""
    from ipadapter import AdapterPrompt, Reference

    attachment = attach(sd15_unet, {"style": _new_adapter(sd15_unet), "face": _new_adapter(sd15_unet)})
    prompt = AdapterPrompt([Reference(cond=torch.randn(1, 4, factories.SD15_CROSS))])
    try:
        for names, first in ((["z"], "z"), (["style", "y", "x"], "x")):
            with pytest.raises(IPAdapterError) as caught:
                attachment.set_prompts({name: prompt for name in names})
            assert str(caught.value) == f"no adapter named {first!r}; attached: style, face"
            assert attachment.runtime.prompts == {}
        attachment.set_prompts({"face": prompt})
        assert set(attachment.runtime.prompts) == {"face"}
    finally:
        attachment.detach()


@pytest.mark.parametrize("where", ["prompt layer_weights", "uncond_layers", "a reference's layer_weights"])
def test_a_layer_name_that_is_not_a_cross_attention_layer_is_one_sentence(sd15_unet, where: str) -> None:
    """Layer names come from three places (the prompt's weights, its unconditional-only layers, each reference's
    weights); a name that is not one of the UNet's cross-attention layers is refused from any of them, naming the
    adapter and the first such name, while known names beside it are accepted."""
    from ipadapter import AdapterPrompt, Reference

    known = "up_blocks.1.attentions.0.transformer_blocks.0.attn2"
    wrong = ["down_blocks.9.attentions.0.transformer_blocks.0.attn2", "mid_block.attn9"]
    layer_weights = {known: 1.0}
    uncond_layers = frozenset({known})
    ref_weights = {known: 0.5}
    if where == "prompt layer_weights":
        layer_weights = {**layer_weights, **dict.fromkeys(wrong, 1.0)}
    elif where == "uncond_layers":
        uncond_layers = uncond_layers | set(wrong)
    else:
        ref_weights = {**ref_weights, **dict.fromkeys(wrong, 1.0)}
    tokens = torch.randn(1, 4, factories.SD15_CROSS)
    prompt = AdapterPrompt([Reference(cond=tokens), Reference(cond=tokens, layer_weights=ref_weights)],
                           layer_weights=layer_weights, uncond_layers=uncond_layers)
    attachment = attach(sd15_unet, {"style": _new_adapter(sd15_unet)})
    try:
        with pytest.raises(IPAdapterError) as caught:
            attachment.set_prompts({"style": prompt})
        assert str(caught.value) == (
            f"adapter 'style': layer weights name {sorted(wrong)[0]!r}, which is not a cross-attention layer of this "
            "UNet (a weight map made for another base model?)"
        )
        fine = AdapterPrompt([Reference(cond=tokens, layer_weights={known: 0.5})], layer_weights={known: 1.0},
                             uncond_layers=frozenset({known}))
        attachment.set_prompts({"style": fine})
    finally:
        attachment.detach()


def test_attaching_to_a_unet_that_has_adapters_is_one_sentence_and_changes_nothing(sd15_unet) -> None:
    """A second `attach` on the same UNet is refused (two attachments would each see the other's processors as the
    originals); the first attachment still works and detaches the UNet back to its own processors."""
    originals = dict(sd15_unet.attn_processors)
    first = attach(sd15_unet, _new_adapter(sd15_unet))
    attached = dict(sd15_unet.attn_processors)
    try:
        with pytest.raises(IPAdapterError) as caught:
            attach(sd15_unet, _new_adapter(sd15_unet))
        assert str(caught.value) == (
            "this UNet already has adapters attached; detach them first or attach all together")
        assert dict(sd15_unet.attn_processors) == attached
        first.check_intact()
    finally:
        first.detach()
    assert dict(sd15_unet.attn_processors) == originals


def test_an_adapter_layer_holds_exactly_the_published_keys_of_its_kind() -> None:
    """Per layer, the published files hold `to_k_ip`/`to_v_ip` (image branch, cross-attention only) and, for FaceID,
    the four LoRA pairs; a layer made with the defaults is the plain image branch, with no LoRA."""
    from ipadapter.adapter import AdapterLayer
    from ipadapter.layers import AttentionLayer

    cross = AttentionLayer("x.attn2", 0, True, 64, 32, "down", 0, 0, 0)
    self_attn = AttentionLayer("x.attn1", 0, False, 64, 64, "down", 0, 0, 0)
    lora = {f"{p}_lora.{ud}.weight" for p in ("to_q", "to_k", "to_v", "to_out") for ud in ("down", "up")}
    assert set(AdapterLayer(cross, 32).state_dict()) == {"to_k_ip.weight", "to_v_ip.weight"}
    assert set(AdapterLayer(cross, 32, lora_rank=4).state_dict()) == {"to_k_ip.weight", "to_v_ip.weight"} | lora
    assert set(AdapterLayer(self_attn, 32, lora_rank=4).state_dict()) == lora
    assert set(AdapterLayer(cross, 32, concat=True).state_dict()) == set()
    rank_one = AdapterLayer(self_attn, 32, lora_rank=1).state_dict()
    assert set(rank_one) == lora and rank_one["to_k_lora.down.weight"].shape == (1, 64)


def _unet(block_out_channels=(32, 64, 64, 64), layers_per_block=2):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=block_out_channels, layers_per_block=layers_per_block, sample_size=16, in_channels=4,
        out_channels=4, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=factories.SD15_CROSS,
        attention_head_dim=8, norm_num_groups=16,
    ).eval()


def _cross_layers(unet) -> list[str]:
    """diffusers' cross-attention modules in module order: down, up, then mid blocks, the published files' order."""
    from diffusers.models.attention_processor import Attention

    return [n for n, m in unet.named_modules() if isinstance(m, Attention) and m.is_cross_attention]


@pytest.mark.parametrize("made_for", ["more layers", "fewer layers"])
def test_an_adapter_for_another_layout_of_the_same_width_is_one_sentence(made_for: str) -> None:
    """Same text width, other blocks (two layers per block against one): refused before anything changes, naming
    the layer counts (diffusers' cross-attention modules) and the first layer (in checkpoint order) the adapter has
    and the UNet lacks, or else the first the UNet has and the adapter lacks."""
    big, small = _unet(layers_per_block=2), _unet(layers_per_block=1)
    source, target = (big, small) if made_for == "more layers" else (small, big)
    adapter = _new_adapter(source)
    before = dict(target.attn_processors)
    with pytest.raises(IPAdapterError) as caught:
        attach(target, {"style": adapter})
    assert dict(target.attn_processors) == before
    have, need = _cross_layers(source), _cross_layers(target)
    head = f"adapter 'style' has weights for {len(have)} cross-attention layers but this UNet has {len(need)} ("
    tail = "); it was made for another UNet architecture"
    text = str(caught.value)
    assert text.startswith(head) and text.endswith(tail), text
    unknown, missing = [n for n in have if n not in need], [n for n in need if n not in have]
    assert (unknown and not missing) if made_for == "more layers" else (missing and not unknown)
    expected = f"first unknown layer: {unknown[0]}" if unknown else f"first missing: {missing[0]}"
    assert text[len(head):-len(tail)] == expected


def test_an_adapter_for_other_layer_widths_is_one_sentence_naming_the_layer() -> None:
    """Same layers and text width, other widths (a block of 32 channels where the adapter's has 64)."""
    adapter = _new_adapter(_unet(block_out_channels=(32, 64, 64, 64)))
    target = _unet(block_out_channels=(32, 32, 64, 64))
    with pytest.raises(IPAdapterError) as caught:
        attach(target, {"style": adapter})
    text = str(caught.value)
    prefix, rest = text.split("'s layer ")
    layer, widths = rest.split(" is ", 1)
    assert prefix == "adapter 'style'" and widths == "64 wide but the UNet's is 32"
    assert target.get_submodule(layer).to_k.out_features == 32


def test_a_unet_without_cross_attention_is_one_sentence() -> None:
    """A UNet with no cross-attention (plain blocks, no middle block) has nowhere for image tokens to go."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2, mid_block_type=None,
        cross_attention_dim=factories.SD15_CROSS, norm_num_groups=16,
    ).eval()
    assert not _cross_layers(unet)
    with pytest.raises(IPAdapterError) as caught:
        attach(unet, _new_adapter(factories.sd15_unet()))
    assert str(caught.value) == "this UNet has no cross-attention layers to attach an IP-Adapter to"


def test_an_unknown_attention_mode_is_one_sentence_naming_the_modes() -> None:
    """The paper's decoupled cross-attention, or its "simple adapter" ablation (concatenated tokens); nothing else."""
    from ipadapter.adapter import AdapterConfig
    from ipadapter.projection import ProjectionConfig

    head = ProjectionConfig("linear", in_dim=8, cross_dim=32, tokens=4)
    with pytest.raises(IPAdapterError) as caught:
        AdapterConfig("base", head, attention="joint")
    assert str(caught.value) == "unknown attention mode 'joint'; valid: decoupled, concat"
    assert {AdapterConfig("base", head, attention=mode).attention for mode in ("decoupled", "concat")} == {
        "decoupled", "concat"}
