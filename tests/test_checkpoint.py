"""Checkpoint files: formats, round trips, variant detection, and every bad file turned into one sentence."""

from __future__ import annotations

import copy
import errno
import os
import struct

import pytest
import torch
from safetensors.torch import save_file

from ipadapter import IPAdapterError, adapter_from_state_dict, load_adapter, save_adapter, save_published
from ipadapter.checkpoint import published_state_dict
from tests import factories


def _flat(state: dict) -> dict:
    return {f"{g}.{k}": v.contiguous() for g, t in state.items() for k, v in t.items()}


@pytest.mark.parametrize("family,tokens", [("base", 4), ("plus", 16), ("full", 257), ("faceid", 4),
                                           ("faceid-portrait", 16), ("faceid-plus", 4)])
def test_variant_and_tokens_detected_from_keys(sd15_unet, family, tokens, tmp_path) -> None:
    lora = 8 if family in ("faceid", "faceid-plus") else 0
    state = factories.published(sd15_unet, family, factories.SD15_CROSS, lora_rank=lora)
    save_file(_flat(state), tmp_path / "a.safetensors")
    adapter = load_adapter(tmp_path / "a.safetensors", sd15_unet)
    assert (adapter.config.variant, adapter.config.tokens, adapter.config.lora_rank) == (family, tokens, lora)


def test_plusv2_told_apart_by_file_name(sd15_unet, tmp_path) -> None:
    state = factories.published(sd15_unet, "faceid-plus", factories.SD15_CROSS)
    torch.save(state, tmp_path / "ip-adapter-faceid-plusv2_sd15.bin")
    assert load_adapter(tmp_path / "ip-adapter-faceid-plusv2_sd15.bin", sd15_unet).config.variant == "faceid-plusv2"


def test_bin_safetensors_and_own_format_round_trip(sd15_unet, tmp_path) -> None:
    state = factories.published(sd15_unet, "faceid", factories.SD15_CROSS, lora_rank=4)
    torch.save(state, tmp_path / "a.bin")
    a = load_adapter(tmp_path / "a.bin", sd15_unet)
    again = published_state_dict(a, sd15_unet)
    for group in state:
        assert set(again[group]) == set(state[group])
        assert all(torch.equal(again[group][k], state[group][k]) for k in state[group])
    b = load_adapter(save_published(a, sd15_unet, tmp_path / "p.safetensors"), sd15_unet)
    c = load_adapter(save_adapter(a, tmp_path / "own.safetensors"), sd15_unet)
    for other in (b, c):
        assert other.config.variant == "faceid"
        sa, so = a.state_dict(), other.state_dict()
        assert set(sa) == set(so) and all(torch.equal(sa[k], so[k]) for k in sa)


@pytest.mark.parametrize("name", ["safetensors-as.bin", "torch-as.safetensors", "safetensors-as.pt", "noext"])
def test_a_file_is_read_by_its_bytes_not_its_name(sd15_unet, tmp_path, name) -> None:
    """A safetensors file saved under a torch name, or the other way round, loads the tensors it holds: the format is
    told from the first bytes (safetensors' 8-byte header length and `{`, torch's zip or pickle magic)."""
    state = factories.published(sd15_unet, "plus", factories.SD15_CROSS)
    path = tmp_path / name
    torch.save(state, path) if name.startswith("torch") else save_file(_flat(state), path)
    loaded = published_state_dict(load_adapter(path, sd15_unet), sd15_unet)
    for group in state:
        assert set(loaded[group]) == set(state[group])
        assert all(torch.equal(loaded[group][k], state[group][k]) for k in state[group])


def test_own_format_is_keyed_by_layer_name(sd15_unet, tmp_path) -> None:
    from safetensors import safe_open

    state = factories.published(sd15_unet, "base", factories.SD15_CROSS)
    torch.save(state, tmp_path / "a.bin")
    path = save_adapter(load_adapter(tmp_path / "a.bin", sd15_unet), tmp_path / "own.safetensors")
    with safe_open(str(path), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert "layers.mid_block.attentions.0.transformer_blocks.0.attn2.to_k_ip.weight" in keys
    assert torch.equal(
        safe_open(str(path), "pt").get_tensor("layers.mid_block.attentions.0.transformer_blocks.0.attn2.to_k_ip.weight"),
        state["ip_adapter"]["31.to_k_ip.weight"],
    ), "index 31 is the mid block in SD 1.5's checkpoint order"
    assert meta["variant"] == "base" and meta["tokens"] == "4"


class Evil:
    """Unpickling it runs a shell command that writes `marker` (a file of the test's own, so that a run where the code
    did run cannot leave a trace that fails later runs)."""

    def __init__(self, marker: os.PathLike) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"echo pwned > {self.marker}",))


def test_pickle_with_code_is_refused(sd15_unet, tmp_path) -> None:
    torch.save({"image_proj": {"x": Evil(tmp_path / "ran")}, "ip_adapter": {}}, tmp_path / "evil.bin")
    with pytest.raises(IPAdapterError, match="refusing to load"):
        load_adapter(tmp_path / "evil.bin", sd15_unet)
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_truncated_file(sd15_unet, tmp_path, suffix) -> None:
    state = factories.published(sd15_unet, "base", factories.SD15_CROSS)
    path = tmp_path / f"a{suffix}"
    torch.save(state, path) if suffix == ".bin" else save_file(_flat(state), path)
    raw = path.read_bytes()
    for cut in (len(raw) // 2, 4):  # at 4 bytes not even the header's length is left, whose bytes tell the format
        path.write_bytes(raw[:cut])
        with pytest.raises(IPAdapterError, match="truncated or corrupt"):
            load_adapter(path, sd15_unet)


def test_missing_file_and_wrong_content(sd15_unet, tmp_path) -> None:
    with pytest.raises(IPAdapterError, match="not found"):
        load_adapter(tmp_path / "nope.bin", sd15_unet)
    save_file({"foo": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(IPAdapterError, match="not an IP-Adapter file"):
        load_adapter(tmp_path / "other.safetensors", sd15_unet)


def test_sd15_adapter_on_sdxl_unet_says_so(sd15_unet, sdxl_unet, tmp_path) -> None:
    torch.save(factories.published(sd15_unet, "base", factories.SD15_CROSS), tmp_path / "a.bin")
    with pytest.raises(IPAdapterError) as err:
        load_adapter(tmp_path / "a.bin", sdxl_unet)
    assert "another base model" in str(err.value) or "made for" in str(err.value)


@pytest.mark.parametrize("key", ["to_k_ip.weight", "99.to_k_ip.weight"])
def test_a_published_key_outside_the_layout_is_one_sentence(sd15_unet, key) -> None:
    """The published layout keys K'/V' as "ip_adapter.{position in unet.attn_processors}.{name}" (docs/checkpoints.md):
    a key without a position, or with one past the UNet's attention layers, is named in one sentence."""
    state = factories.published(sd15_unet, "base", factories.SD15_CROSS)
    state["ip_adapter"][key] = torch.zeros(3, 3)
    with pytest.raises(IPAdapterError) as err:
        adapter_from_state_dict(state, sd15_unet, name="x.bin")
    expected = {
        "to_k_ip.weight": "x.bin: unexpected key 'to_k_ip.weight' in ip_adapter weights",
        "99.to_k_ip.weight": f"x.bin has weights for attention layer 99 but this UNet has "
                             f"{len(sd15_unet.attn_processors)} attention layers; the adapter was made for another "
                             "base model",
    }[key]
    assert str(err.value) == expected


def test_wrong_cross_dim_names_both_families(sd15_unet, tmp_path) -> None:
    from ipadapter.adapter import AdapterConfig, IPAdapter
    from ipadapter.attach import check_compatible
    from ipadapter.layers import attention_layers
    from ipadapter.projection import ProjectionConfig

    config = AdapterConfig("base", ProjectionConfig("linear", in_dim=8, cross_dim=2048, tokens=4))
    with pytest.raises(IPAdapterError, match="SDXL"):
        check_compatible(attention_layers(sd15_unet), IPAdapter(config, attention_layers(sd15_unet)), "adapter")


def test_hub_id_offline_without_cache_is_one_sentence(sd15_unet, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(IPAdapterError, match="local Hugging Face cache|could not fetch") as info:
        load_adapter("h94/IP-Adapter", sd15_unet, subfolder="models", weight_name="ip-adapter_sd15.bin")
    assert "\n" not in str(info.value)


def test_hub_id_resolves_from_local_cache(sd15_unet, tmp_path, monkeypatch) -> None:
    """Offline use works from the cache: lay a file out as huggingface_hub caches it and load by repo id."""
    cache = tmp_path / "hub"
    snap = cache / "models--h94--IP-Adapter" / "snapshots" / ("a" * 40) / "models"
    snap.mkdir(parents=True)
    (cache / "models--h94--IP-Adapter" / "refs").mkdir()
    (cache / "models--h94--IP-Adapter" / "refs" / "main").write_text("a" * 40)
    torch.save(factories.published(sd15_unet, "base", factories.SD15_CROSS), snap / "ip-adapter_sd15.bin")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    adapter = load_adapter("h94/IP-Adapter", sd15_unet, subfolder="models", weight_name="ip-adapter_sd15.bin")
    assert adapter.config.variant == "base"


def test_module_keys_are_the_own_file_keys(sd15_unet, tmp_path) -> None:
    from safetensors import safe_open

    state = factories.published(sd15_unet, "faceid", factories.SD15_CROSS, lora_rank=4)
    adapter = adapter_from_state_dict(state, sd15_unet)
    with safe_open(str(save_adapter(adapter, tmp_path / "own.safetensors")), "pt") as f:
        assert set(f.keys()) == set(adapter.state_dict())
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    assert adapter.get_submodule(f"layers.{name}") is adapter.layer(name)


def test_in_memory_state_dict_loads_like_the_file(sd15_unet, tmp_path) -> None:
    """Nested (as in .bin files) and flat (as in .safetensors) published layouts give the file's adapter."""
    state = factories.published(sd15_unet, "plus", factories.SD15_CROSS)
    torch.save(state, tmp_path / "plus.bin")
    expected = load_adapter(tmp_path / "plus.bin", sd15_unet).state_dict()
    for given in (state, _flat(state)):
        got = adapter_from_state_dict(given, sd15_unet).state_dict()
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)


def test_loading_draws_no_random_weights_and_keeps_no_link_to_a_callers_dict(sd15_unet, tmp_path) -> None:
    """The adapter is shaped on the meta device and given the file's tensors: torch's random generator is left as it
    was (a module built on the CPU draws every weight from it). From a dict in memory the weights are copies: the
    caller changing its tensors afterwards leaves the adapter as loaded."""
    state = factories.published(sd15_unet, "plus", factories.SD15_CROSS)
    torch.save(state, tmp_path / "plus.bin")
    before = torch.get_rng_state()
    from_file = load_adapter(tmp_path / "plus.bin", sd15_unet)
    assert torch.equal(torch.get_rng_state(), before)
    from_dict = adapter_from_state_dict(state, sd15_unet)
    assert torch.equal(torch.get_rng_state(), before)
    expected = {k: v.clone() for k, v in from_dict.state_dict().items()}
    for group in state.values():
        for tensor in group.values():
            tensor.add_(1.0)
    got = from_dict.state_dict()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert all(torch.equal(got[k], v) for k, v in from_file.state_dict().items())
    assert all(isinstance(p, torch.nn.Parameter) and p.requires_grad for p in from_file.parameters())


def test_weights_share_memory_with_neither_the_file_nor_each_other(sd15_unet, tmp_path) -> None:
    """A torch file is mapped, but the adapter's weights are its own: the file rewritten in place (or saved over
    from the adapter itself) leaves them as loaded, and two keys the file stored as one tensor load as two weights,
    no two of them overlapping in memory, which the safetensors writer then accepts (it refuses tensors that do)."""
    state = factories.published(sd15_unet, "base", factories.SD15_CROSS)
    layer = state["ip_adapter"]
    first_k = next(k for k in layer if k.endswith("to_k_ip.weight"))
    layer[first_k.replace("to_k_ip", "to_v_ip")] = layer[first_k]  # stored once, under two keys
    torch.save(state, tmp_path / "a.bin")
    adapter = load_adapter(tmp_path / "a.bin", sd15_unet)
    loaded = {k: v.clone() for k, v in adapter.state_dict().items()}
    spans = sorted((p.data_ptr(), p.data_ptr() + p.nbytes) for p in adapter.parameters())
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))
    save_adapter(adapter, tmp_path / "own.safetensors")

    torch.save(adapter.state_dict(), tmp_path / "a.bin")  # over the file it came from: truncated, then written
    with open(tmp_path / "a.bin", "r+b") as f:  # and scribbled over in place
        f.seek(0)
        f.write(bytes(os.path.getsize(tmp_path / "a.bin")))
    assert all(torch.equal(v, loaded[k]) for k, v in adapter.state_dict().items())


def test_on_the_cpu_the_weights_are_one_allocation_each_aligned_with_a_storage_of_its_own(sd15_unet) -> None:
    """Loading copies every weight into one allocation (separate copies left the allocator's slack between them):
    end to end in memory, each starting 64 bytes aligned as an allocation of its own would, each holding the
    file's values cast to the dtype asked for. Each has a storage of its own as accelerate tells storages apart: its
    safetensors saver drops all but one of the tensors that share one."""
    from accelerate.utils import id_tensor_storage

    state = factories.published(sd15_unet, "plus", factories.SD15_CROSS)
    adapter = adapter_from_state_dict(state, sd15_unet, dtype=torch.float16)
    spans = sorted((p.data_ptr(), p.data_ptr() + p.nbytes) for p in adapter.parameters())
    assert all(0 <= start - end < 64 for (_, end), (start, _) in zip(spans, spans[1:]))
    assert all(p.dtype == torch.float16 and p.data_ptr() % 64 == 0 for p in adapter.parameters())
    published = published_state_dict(adapter, sd15_unet)
    assert {g: t.keys() for g, t in published.items()} == {g: t.keys() for g, t in state.items()}
    assert all(torch.equal(published[g][k], v.half()) for g, tensors in state.items() for k, v in tensors.items())
    weights = adapter.state_dict().values()
    assert len({id_tensor_storage(t) for t in weights}) == len(weights)


def test_loaded_off_the_cpu_the_weights_are_cast_and_copies_never_the_tensors_given(sd15_unet) -> None:
    """Off the CPU (the meta device stands in for an accelerator) each weight is cast to the dtype asked for and
    copied even where the tensor given is already on that device in that dtype: the adapter never shares a storage
    with the caller's tensors."""
    unet = copy.deepcopy(sd15_unet).to("meta")
    state, metadata = _own_state(sd15_unet)
    for stored, dtype in ((torch.float32, torch.float16), (torch.float16, torch.float16)):
        given = {k: v.to("meta", stored) for k, v in state.items()}
        adapter = adapter_from_state_dict(given, unet, metadata=metadata, dtype=dtype)
        loaded = adapter.state_dict()
        assert loaded.keys() == given.keys() and {t.dtype for t in loaded.values()} == {dtype}
        assert all(t.device.type == "meta" for t in loaded.values())
        assert not {t.untyped_storage()._cdata for t in loaded.values()} & {
            t.untyped_storage()._cdata for t in given.values()}


def test_fill_keeps_what_each_tensor_of_a_module_is() -> None:
    """`fill` gives a module built on the meta device its weights: a buffer stays a buffer (not a parameter), a weight
    frozen before loading stays frozen and a trainable one trainable, and only floating-point tensors take the dtype
    asked for (a step counter stays an integer)."""
    from ipadapter.checkpoint import fill

    with torch.device("meta"):
        module = torch.nn.Linear(3, 2)
        module.register_buffer("steps", torch.zeros((), dtype=torch.int64))
        module.register_buffer("scale", torch.ones(2))
    module.bias.requires_grad_(False)
    own = {"weight": torch.randn(2, 3), "bias": torch.randn(2), "steps": torch.tensor(7), "scale": torch.rand(2)}
    fill(module, own, device="cpu", dtype=torch.float16)
    assert dict(module.named_buffers()).keys() == {"steps", "scale"}
    assert dict(module.named_parameters()).keys() == {"weight", "bias"}
    assert isinstance(module.weight, torch.nn.Parameter) and module.weight.requires_grad
    assert isinstance(module.bias, torch.nn.Parameter) and not module.bias.requires_grad
    assert not isinstance(module.steps, torch.nn.Parameter) and not isinstance(module.scale, torch.nn.Parameter)
    assert module.steps.dtype == torch.int64 and module.steps.item() == 7
    for name, tensor in own.items():
        if tensor.is_floating_point():
            assert torch.equal(getattr(module, name), tensor.half())


def test_a_path_that_cannot_be_read_is_one_sentence_with_the_systems_reason(tmp_path) -> None:
    from ipadapter.checkpoint import read_file

    with pytest.raises(IPAdapterError) as caught:
        read_file(tmp_path)
    assert str(caught.value) == f"cannot read {tmp_path} ({os.strerror(errno.EISDIR)})"


def test_a_safetensors_header_is_told_by_the_lengths_safetensors_reads(tmp_path) -> None:
    """`is_safetensors_file` takes the header lengths safetensors' own reader takes: from `{}` (2 bytes) up to the
    reader's limit, beyond which it says "header too large"; a whole file's bytes are a header as its first bytes
    are, and reading a file's head reads only what telling the format takes."""
    from safetensors import SafetensorError, safe_open

    from ipadapter.checkpoint import file_head, is_safetensors_file

    def reader_takes(length: int, body: bytes) -> bool:
        path = tmp_path / "h.safetensors"
        path.write_bytes(struct.pack("<Q", length) + body)
        try:
            with safe_open(str(path), framework="pt"):
                return True
        except SafetensorError as err:  # "invalid header length": a longer file would have been read
            return "header too large" not in str(err) and "invalid JSON" not in str(err)

    for length, body in ((1, b"{"), (2, b"{}"), (100_000_000, b"{}"), (100_000_001, b"{}"), (1 << 32, b"{}")):
        head = struct.pack("<Q", length) + body
        assert is_safetensors_file(head) == reader_takes(length, body), length
    save_file({"x": torch.zeros(4096)}, tmp_path / "a.safetensors")
    raw = (tmp_path / "a.safetensors").read_bytes()
    head = file_head(tmp_path / "a.safetensors")
    assert is_safetensors_file(raw) and is_safetensors_file(head)
    assert raw.startswith(head) and len(head) < 64 < len(raw)


def test_a_file_system_that_cannot_map_files_still_loads(sd15_unet, tmp_path, monkeypatch) -> None:
    """Torch zip files are mapped; where mapping fails the file is read instead, to the same weights."""
    state = factories.published(sd15_unet, "base", factories.SD15_CROSS)
    torch.save(state, tmp_path / "base.bin")
    mapped = load_adapter(tmp_path / "base.bin", sd15_unet).state_dict()
    real_load, calls = torch.load, []

    def no_mmap(*args, **kwargs):
        calls.append(kwargs.get("mmap", False))
        if kwargs.get("mmap"):
            raise OSError("mmap: Operation not supported")
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", no_mmap)
    read = load_adapter(tmp_path / "base.bin", sd15_unet).state_dict()
    assert calls == [True, False]
    assert read.keys() == mapped.keys() and all(torch.equal(read[k], mapped[k]) for k in read)


def test_own_format_metadata_round_trips_every_field_and_fills_the_defaults() -> None:
    """Every field the project's own file stores reads back as written; a file that leaves the optional ones out
    (only the variant and the head are required) reads with the dataclass's own defaults."""
    from ipadapter.adapter import AdapterConfig
    from ipadapter.projection import ProjectionConfig

    head = ProjectionConfig("linear", in_dim=8, cross_dim=16, tokens=4)
    full = AdapterConfig("faceid", head, lora_rank=4, encoder="openai/clip-vit-large-patch14", base="sd15",
                         extra={"trained_on": "shapes", "steps": "12000"}, attention="concat")
    meta = full.to_metadata()
    assert all(isinstance(v, str) for v in meta.values())  # safetensors metadata holds strings only
    assert AdapterConfig.from_metadata(meta) == full
    assert (meta["format"], meta["tokens"]) == ("ipadapter/1", "4")
    minimal = {k: meta[k] for k in ("variant", "projection")}
    assert AdapterConfig.from_metadata(minimal) == AdapterConfig("faceid", head)


def test_load_adapter_takes_the_variant_device_and_dtype_it_is_given(tmp_path) -> None:
    """FaceID-Plus and -PlusV2 files have the same layout (V2 differs only in how the shortcut is used), so the
    variant a file is loaded as is the caller's to say; device and dtype given override the UNet's (training loads
    fp32 weights for a low-precision UNet). The meta device stands in for an accelerator."""
    unet = factories.sd15_unet()
    torch.save(factories.published(unet, "faceid-plusv2", factories.SD15_CROSS, lora_rank=4), tmp_path / "face.bin")
    assert load_adapter(tmp_path / "face.bin", unet).config.variant == "faceid-plus"  # what the layout tells
    adapter = load_adapter(tmp_path / "face.bin", unet, variant="faceid-plusv2", dtype=torch.float64)
    assert adapter.config.variant == "faceid-plusv2"
    assert {p.dtype for p in adapter.parameters()} == {torch.float64}
    on_meta = load_adapter(tmp_path / "face.bin", unet, device="meta")
    assert {p.device.type for p in on_meta.parameters()} == {"meta"}


@pytest.mark.parametrize("part", ["image projection", "layer"])
def test_an_own_file_missing_a_weight_names_the_part_it_belongs_to(tmp_path, part: str) -> None:
    """The project's own format keeps the adapter's own keys: a file missing one is refused before anything is
    copied, naming the key and whether it belongs to the image projection or to an attention layer."""
    from safetensors import safe_open

    from ipadapter.adapter import AdapterConfig, IPAdapter
    from ipadapter.projection import ProjectionConfig

    unet = factories.sd15_unet()
    config = AdapterConfig("base", ProjectionConfig("linear", in_dim=8, cross_dim=factories.SD15_CROSS, tokens=4))
    save_adapter(IPAdapter.for_unet(unet, config), tmp_path / "own.safetensors")
    with safe_open(tmp_path / "own.safetensors", "pt") as f:
        state, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    key = sorted(k for k in state if k.startswith("image_proj.") == (part == "image projection"))[0]
    del state[key]
    save_file(state, tmp_path / "cut.safetensors", metadata=metadata)
    with pytest.raises(IPAdapterError) as caught:
        load_adapter(tmp_path / "cut.safetensors", unet)
    assert str(caught.value) == (f"{tmp_path / 'cut.safetensors'}: {part} weights do not fit this UNet (missing {key}); "
                                 "wrong base model or file?")


@pytest.mark.parametrize("lora_rank, variant", [(0, "faceid-portrait"), (4, "faceid")])
def test_sixteen_id_tokens_are_the_portrait_variant_only_without_lora(tmp_path, lora_rank: int, variant: str) -> None:
    """The detection table: FaceID-Portrait is the FaceID head with 16 tokens and no LoRA; a FaceID file with 16 tokens
    and LoRA weights (one trained here with more tokens) is plain FaceID."""
    unet = factories.sd15_unet()
    torch.save(factories.published(unet, "faceid-portrait", factories.SD15_CROSS, lora_rank=lora_rank),
               tmp_path / "face.bin")
    assert load_adapter(tmp_path / "face.bin", unet).config.variant == variant


def _own_state(unet) -> tuple[dict, dict]:
    from ipadapter.adapter import AdapterConfig, IPAdapter
    from ipadapter.projection import ProjectionConfig

    config = AdapterConfig("base", ProjectionConfig("linear", in_dim=8, cross_dim=factories.SD15_CROSS, tokens=4))
    adapter = IPAdapter.for_unet(unet, config)
    return dict(adapter.state_dict()), adapter.config.to_metadata()


def test_an_own_file_for_a_transformer_is_refused_by_its_base() -> None:
    """The own format says which denoiser it was made for (`base`): a file for FLUX or SD 3.5 is refused for a UNet in
    one sentence naming that model; no base, or "unet", loads."""
    unet = factories.sd15_unet()
    state, metadata = _own_state(unet)
    for base, model in (("flux", "a FLUX transformer"), ("sd3", "an SD 3 / 3.5 transformer")):
        with pytest.raises(IPAdapterError) as caught:
            adapter_from_state_dict(state, unet, metadata={**metadata, "base": base}, name="own.safetensors")
        assert str(caught.value) == (f"own.safetensors is an IP-Adapter for {model}, not for this UNet; give --base a "
                                     "pipeline of that model")
    for base in ("", "unet"):
        assert adapter_from_state_dict(state, unet, metadata={**metadata, "base": base}).config.variant == "base"


def test_what_is_not_an_adapter_and_what_is_an_incomplete_one() -> None:
    """Tensors with none of the adapter's key families are "not an IP-Adapter file" (named "the state dict" when no
    name is given); a file with only its attention weights, or a metadata dict without a format, is read as a
    published or own adapter and judged by what it holds."""
    unet = factories.sd15_unet()
    with pytest.raises(IPAdapterError) as caught:
        adapter_from_state_dict({"weight": torch.zeros(2)}, unet)
    assert str(caught.value) == "the state dict is not an IP-Adapter file (no image_proj / ip_adapter weights)"
    published = factories.published(unet, "base", factories.SD15_CROSS)
    assert adapter_from_state_dict(published, unet, metadata={"source": "a hub"}).config.variant == "base"
    state, metadata = _own_state(unet)
    layers_only = {k: v for k, v in state.items() if not k.startswith("image_proj.")}
    with pytest.raises(IPAdapterError, match=r"^the state dict: image projection weights do not fit this UNet"):
        adapter_from_state_dict(layers_only, unet, metadata=metadata)
    with pytest.raises(IPAdapterError) as caught:
        adapter_from_state_dict({"ip_adapter": published["ip_adapter"]}, unet)
    assert "not an IP-Adapter file" not in str(caught.value)


def test_a_file_for_another_token_width_is_named_in_the_sentence(tmp_path) -> None:
    """A published file or an own one made for another text width (SDXL's 2048 here) is refused before its weights
    are read, in a sentence that starts with the file's name; an adapter loads onto the UNet's own device (the meta
    device stands in for an accelerator)."""
    import json

    unet = factories.sd15_unet()
    torch.save(factories.published(unet, "base", 2048), tmp_path / "xl.bin")
    with pytest.raises(IPAdapterError) as caught:
        load_adapter(tmp_path / "xl.bin", unet)
    assert str(caught.value).startswith(f"{tmp_path / 'xl.bin'} was made for ")
    state, metadata = _own_state(unet)
    projection = {**json.loads(metadata["projection"]), "cross_dim": 2048}
    with pytest.raises(IPAdapterError) as caught:
        adapter_from_state_dict(state, unet, metadata={**metadata, "projection": json.dumps(projection)}, name="own")
    assert str(caught.value).startswith("own was made for ")
    on_meta = adapter_from_state_dict(state, unet.to("meta"), metadata=metadata)
    assert {p.device.type for p in on_meta.parameters()} == {"meta"}


def test_a_bin_saved_from_a_gpu_loads_on_the_cpu(sd15_unet, tmp_path) -> None:
    """A published `.bin` saved from a GPU names `cuda:0` for every tensor; it loads on a machine without one, with
    the same weights as the CPU file (torch alone refuses it unless told where to map it)."""
    from tests.test_face_embedding import _as_saved_on_a_gpu

    state = factories.published(sd15_unet, "base", factories.SD15_CROSS)
    torch.save(state, tmp_path / "cpu.bin")
    _as_saved_on_a_gpu(tmp_path / "cpu.bin", tmp_path / "gpu.bin")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(tmp_path / "gpu.bin", weights_only=True)
    want = load_adapter(tmp_path / "cpu.bin", sd15_unet).state_dict()
    got = load_adapter(tmp_path / "gpu.bin", sd15_unet).state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_a_pickled_bin_is_refused_even_when_the_environment_allows_unpickling(sd15_unet, tmp_path, monkeypatch) -> None:
    """torch unpickles anything under TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 unless the call sets `weights_only` itself:
    with the variable set, a `.bin` whose pickle runs code must still be refused, and the code never run."""
    marker = tmp_path / "ran"
    torch.save({"image_proj": {"x": Evil(marker)}, "ip_adapter": {}}, tmp_path / "evil.bin")
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(IPAdapterError) as caught:
        load_adapter(tmp_path / "evil.bin", sd15_unet)
    assert str(caught.value).startswith(f"refusing to load {tmp_path / 'evil.bin'}: its pickle carries code")
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_a_file_with_nan_is_refused_by_its_name_and_the_tensors(sd15_unet, tmp_path, suffix) -> None:
    """A damaged file (NaN in a weight) is refused in one sentence naming the file and the tensor."""
    state = factories.published(sd15_unet, "base", factories.SD15_CROSS)
    state["image_proj"]["proj.weight"][0, 0] = float("nan")
    path = tmp_path / f"nan{suffix}"
    torch.save(state, path) if suffix == ".bin" else save_file(_flat(state), path)
    with pytest.raises(IPAdapterError) as caught:
        load_adapter(path, sd15_unet)
    assert str(caught.value).startswith(f"{path}: tensor image_proj.proj.weight holds NaN or Inf values")


def test_where_an_adapter_file_is_not_is_one_sentence(sd15_unet, tmp_path, monkeypatch) -> None:
    """A name with a checkpoint suffix, or a path starting with "." or "/", is a file that is not there (not a Hub
    id); a folder without the named file says which file and how to name it."""
    monkeypatch.chdir(tmp_path)
    for name in ("missing.bin", "missing.safetensors", "missing.pt", "missing.pth", "./missing", str(tmp_path / "x")):
        with pytest.raises(IPAdapterError) as caught:
            load_adapter(name, sd15_unet)
        assert str(caught.value) == f"adapter file not found: {name}"
    (tmp_path / "repo").mkdir()
    with pytest.raises(IPAdapterError) as caught:
        load_adapter(tmp_path / "repo", sd15_unet, subfolder="models", weight_name="a.bin")
    assert str(caught.value) == (f"no adapter file {tmp_path / 'repo' / 'models' / 'a.bin'} (give weight_name= and "
                                 f"subfolder= inside {tmp_path / 'repo'})")


def test_unreadable_torch_files_are_one_sentence_naming_what_is_wrong(sd15_unet, tmp_path) -> None:
    """A pickle with code quotes torch's sentence naming the refused global (whole, not cut mid-word); a damaged
    torch file says so; a file holding something other than a dict names what it holds."""
    import os
    import pickle

    evil = tmp_path / "evil.bin"
    torch.save({"image_proj": {"x": Evil(tmp_path / "ran")}, "ip_adapter": {}}, evil)
    with pytest.raises(pickle.UnpicklingError):  # torch itself refuses it, so the sentence is torch's
        torch.load(evil, map_location="cpu", weights_only=True)
    with pytest.raises(IPAdapterError) as caught:
        load_adapter(evil, sd15_unet)
    system = f"{os.system.__module__}.system"  # posix.system on Linux: the global the pickle asks for
    assert str(caught.value) == (f"refusing to load {evil}: its pickle carries code or objects other than tensors "
                                 f"(Trying to load unsupported GLOBAL {system} whose module {os.system.__module__} is "
                                 "blocked); use a .safetensors file")
    damaged = tmp_path / "damaged.bin"
    torch.save(factories.published(sd15_unet, "base", factories.SD15_CROSS), damaged)
    damaged.write_bytes(damaged.read_bytes()[:2000])
    with pytest.raises(IPAdapterError) as caught:
        load_adapter(damaged, sd15_unet)
    assert str(caught.value) == f"{damaged} is not a readable checkpoint (truncated or corrupt)"
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(2), tensor)
    with pytest.raises(IPAdapterError) as caught:
        load_adapter(tensor, sd15_unet)
    assert str(caught.value) == f"{tensor} holds a Tensor, not an IP-Adapter state dict"


@pytest.mark.parametrize("content", [b"hello\n", b"q\x00", b"", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", b"# README\n",
                                     b'{"a": 1}\n'], ids=["text", "two-bytes", "empty", "png", "markdown", "json"])
def test_a_file_that_is_no_torch_file_is_named_as_such(sd15_unet, tmp_path, content) -> None:
    """Text, an image or an empty file given as an adapter is one sentence saying it is no checkpoint: not a
    traceback (torch's weights-only unpickler raises KeyError on "hello", IndexError on "q\\0"), and not the refusal
    meant for pickles that carry code."""
    path = tmp_path / "adapter.bin"
    path.write_bytes(content)
    with pytest.raises(IPAdapterError) as caught:
        load_adapter(path, sd15_unet)
    assert str(caught.value) == (f"{path} is not a readable checkpoint (not a .safetensors, .bin or .pt file, "
                                 "or truncated)")


def test_a_torn_legacy_torch_file_is_no_traceback(sd15_unet, tmp_path) -> None:
    """The pre-zip `torch.save` format is a bare pickle: cut short, torch raises whatever the torn bytes provoke."""
    path = tmp_path / "legacy.bin"
    torch.save(factories.published(sd15_unet, "base", factories.SD15_CROSS), path, _use_new_zipfile_serialization=False)
    raw = path.read_bytes()
    for cut in (2, 3, 40):
        path.write_bytes(raw[:cut])
        with pytest.raises(IPAdapterError, match="is not a readable checkpoint"):
            load_adapter(path, sd15_unet)


def test_a_legacy_torch_file_cut_anywhere_is_torn_not_code(sd15_unet, tmp_path) -> None:
    """Cut inside a global's name ("torch._utils._reb", "collections.Ordered"), torch's unpickler refuses the stub as
    an unsupported GLOBAL: the file is torn, and saying it carries code would send the user after the wrong problem."""
    path = tmp_path / "legacy.bin"
    torch.save({"image_proj": {"proj.weight": torch.zeros(2, 2)}}, path, _use_new_zipfile_serialization=False)
    raw = path.read_bytes()
    messages = set()
    for cut in range(2, len(raw)):
        path.write_bytes(raw[:cut])
        with pytest.raises(IPAdapterError) as caught:
            load_adapter(path, sd15_unet)
        messages.add(str(caught.value))
    assert messages == {f"{path} is not a readable checkpoint (truncated or corrupt)"}


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads Linux's list of the process's mappings")
def test_a_torch_zip_file_is_mapped_not_read_when_asked(tmp_path) -> None:
    """`_torch_load(mapped=True)`: a `torch.save` zip file's tensors lie in a mapping of that file (the kernel's own
    list, /proc/self/maps, says so), not in memory read from it; `mapped=False`, and the legacy format that cannot be
    mapped, are read. The values are the file's either way."""
    from pathlib import Path

    from ipadapter.checkpoint import _torch_load

    def in_mapping_of(t: torch.Tensor, path: Path) -> bool:
        for line in Path("/proc/self/maps").read_text().splitlines():
            fields = line.split()
            if len(fields) >= 6 and fields[5] == str(path):
                low, high = (int(x, 16) for x in fields[0].split("-"))
                if low <= t.data_ptr() < high:
                    return True
        return False

    weights = {"x": torch.arange(6.0)}
    zipped, legacy = tmp_path / "zipped.bin", tmp_path / "legacy.bin"
    torch.save(weights, zipped)
    torch.save(weights, legacy, _use_new_zipfile_serialization=False)
    loaded = {(path.name, mapped): _torch_load(path, mapped=mapped)["x"] for path in (zipped, legacy)
              for mapped in (True, False)}
    assert {key: in_mapping_of(t, tmp_path / key[0]) for key, t in loaded.items()} == {
        ("zipped.bin", True): True, ("zipped.bin", False): False, ("legacy.bin", True): False,
        ("legacy.bin", False): False}
    assert all(torch.equal(t, weights["x"]) for t in loaded.values())


def test_a_weights_file_is_told_by_its_first_bytes_whatever_its_name(tmp_path) -> None:
    """`is_weights_file`: safetensors and both `torch.save` formats (the legacy one in pickle protocols 2 to 5) are
    weights whatever they are called; an image, text, an empty file, a pickle protocol Python lacks, a folder or a
    missing path are not (the last two cannot be read)."""
    from safetensors.torch import save_file

    from ipadapter.checkpoint import is_weights_file

    weights = {"x": torch.zeros(2)}
    save_file(weights, tmp_path / "a.png")
    torch.save(weights, tmp_path / "b.txt")
    torch.save(weights, tmp_path / "c", _use_new_zipfile_serialization=False)
    torch.save(weights, tmp_path / "c5", _use_new_zipfile_serialization=False, pickle_protocol=5)
    (tmp_path / "c6").write_bytes(b"\x80\x06" + bytes(30))  # a pickle protocol Python does not have
    (tmp_path / "d.safetensors").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (tmp_path / "e.bin").write_text("hello\n")
    (tmp_path / "f.pt").write_bytes(b"")
    (tmp_path / "g.bin").mkdir()
    found = {name: is_weights_file(tmp_path / name) for name in ("a.png", "b.txt", "c", "c5", "c6", "d.safetensors",
                                                                "e.bin", "f.pt", "g.bin", "missing.bin")}
    assert found == {"a.png": True, "b.txt": True, "c": True, "c5": True, "c6": False, "d.safetensors": False,
                     "e.bin": False, "f.pt": False, "g.bin": False, "missing.bin": False}


def test_a_refused_global_is_code_only_when_its_name_can_exist() -> None:
    """`names_a_global`, which tells a pickle carrying code from a torn one by the name torch quotes: a builtin
    (torch quotes them bare), an attribute chain of an imported module, or a package that is installed but not
    imported (nothing is imported to check) can be real; a name cut short, an attribute a module lacks, an empty
    part or an uninstalled package cannot. The truth is Python's own: the objects exist or do not."""
    import importlib.util
    import sys

    from ipadapter.checkpoint import names_a_global

    installed = next(n for n in ("pip", "setuptools", "wheel", "pytest_xdist", "xdist")
                     if n not in sys.modules and importlib.util.find_spec(n) is not None)
    real = [f"{os.system.__module__}.system", "eval", "getattr", "torch._utils._rebuild_tensor_v2", "torch.Tensor.add",
            "collections.OrderedDict", f"{installed}.anything"]
    cut = ["torch._utils._reb", "collections.Ordered", "collections", "torch.Tensor.nothere", "torch..Tensor", "",
           "nosuchpackage_ipadapter.x"]
    assert [names_a_global(n) for n in real] == [True] * len(real)
    assert [names_a_global(n) for n in cut] == [False] * len(cut)


def test_a_name_that_is_neither_a_path_nor_a_repo_id_is_not_found(sd15_unet, tmp_path, monkeypatch) -> None:
    """"nothere" is a missing file or folder (as the command line's check says), not a Hub repo id short of a weight
    name; "owner/name/more" is not a repo id either."""
    monkeypatch.chdir(tmp_path)
    for name in ("nothere", "a/b/c"):
        with pytest.raises(IPAdapterError) as caught:
            load_adapter(name, sd15_unet)
        assert str(caught.value) == (f"adapter not found: {name} (no such file or folder; a Hub model id has the form "
                                     "owner/name)")


def test_hub_ids_that_cannot_be_fetched_are_one_exact_sentence(sd15_unet, monkeypatch) -> None:
    """A repo id needs a weight name; a file missing from the local cache while the Hub cannot be reached, or any
    other fetch error (its first line), is one sentence. Offline mode off, `hf_hub_download` and `model_info` are
    replaced by stand-ins that raise as a machine without network does: no network is touched."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    with pytest.raises(IPAdapterError) as caught:
        load_adapter("h94/IP-Adapter", sd15_unet)
    assert str(caught.value) == ("h94/IP-Adapter looks like a Hub repo id: also give the weight name "
                                 "(e.g. ip-adapter_sd15.bin)")
    raised: list[Exception] = []
    downloads: list[bool] = []

    def download(repo_id, filename, subfolder=None, local_files_only=False):
        downloads.append(local_files_only)
        raise raised[-1]

    def unreachable(repo_id, **kwargs):
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(huggingface_hub, "model_info", unreachable)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    offline = ("is not in the local Hugging Face cache and the Hub cannot be reached; download it once with network "
               "access (hf download h94/IP-Adapter {}) or give a local file")
    for subfolder, part in (("models", "models/a.bin"), (None, "a.bin")):
        raised.append(LocalEntryNotFoundError("not cached"))
        with pytest.raises(IPAdapterError) as caught:
            load_adapter("h94/IP-Adapter", sd15_unet, subfolder=subfolder, weight_name="a.bin")
        assert str(caught.value) == f"the adapter h94/IP-Adapter/{part} {offline.format(part)}"
    assert downloads == [True, True]  # the cache only: no download was tried once the Hub did not answer
    raised.append(ValueError("first line\nsecond line"))
    with pytest.raises(IPAdapterError) as caught:
        load_adapter("h94/IP-Adapter", sd15_unet, weight_name="a.bin")
    assert str(caught.value) == "could not fetch a.bin from h94/IP-Adapter: first line"


def test_saving_the_same_adapter_twice_writes_the_same_bytes(sd15_unet, tmp_path) -> None:
    """safetensors writes metadata in a random order on every save; an export that changed nothing must leave files
    that `git diff` and checksums see as unchanged, and the reordered header must still read back whole."""
    from safetensors import safe_open

    from ipadapter.atomic import save_safetensors

    adapter = adapter_from_state_dict(factories.published(sd15_unet, "plus", factories.SD15_CROSS), sd15_unet)
    own = [save_adapter(adapter, tmp_path / f"own{i}.safetensors") for i in range(4)]
    assert len({p.read_bytes() for p in own}) == 1
    meta = {f"key {i}": f'value "{i}"\n é' for i in range(12)}
    tensors = {"b": torch.ones(3, dtype=torch.float16), "a": torch.arange(4.0)}
    plain = [
        save_safetensors(tensors, tmp_path / f"plain{i}.safetensors", dict(reversed(meta.items())) if i % 2 else meta)
        for i in range(4)
    ]
    assert len({p.read_bytes() for p in plain}) == 1
    with safe_open(plain[0], "pt") as f:
        assert f.metadata() == meta
        assert all(torch.equal(f.get_tensor(k), v) for k, v in tensors.items())
    for extra in range(8):  # safetensors pads its header to a multiple of 8: one of these needs no padding at all
        pair = {"a": "x" * extra, "b": "y"}
        saved = {save_safetensors(tensors, tmp_path / f"pair{i}.safetensors", dict(reversed(pair.items())) if i else
                                  pair).read_bytes() for i in range(2)}
        assert len(saved) == 1, f"metadata values of {extra} characters"
    from safetensors.torch import save_file

    save_file(tensors, str(tmp_path / "theirs.safetensors"), metadata={"only": "one"})  # one key: nothing to sort
    ours = save_safetensors(tensors, tmp_path / "ours.safetensors", {"only": "one"})
    assert ours.read_bytes() == (tmp_path / "theirs.safetensors").read_bytes()
