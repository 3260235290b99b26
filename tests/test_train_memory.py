"""`--dry-run`'s counts and memory estimate on tiny models, against the real models and a real training forward."""

from __future__ import annotations

import pytest
import torch

from ipadapter.train import TrainConfig
from ipadapter.train.memory import estimate
from tests import factories


def test_static_memory_is_weights_gradients_optimizer_states_and_ema() -> None:
    """Frozen weights in the run's precision; per trainable weight: fp32 value and gradient (4 + 4 bytes), AdamW's two
    fp32 states (8) or 8-bit AdamW's two 1-byte states (2), and an fp32 EMA copy (4) when asked."""
    from ipadapter.train.memory import static_bytes

    assert static_bytes(10, 3, dtype=torch.float32, optimizer="adamw", ema=False) == 10 * 4 + 3 * 16
    assert static_bytes(10, 3, dtype=torch.float16, optimizer="adamw8bit", ema=True) == 10 * 2 + 3 * 14
    assert static_bytes(10, 3, dtype=torch.bfloat16, optimizer="adamw", ema=True) == 10 * 2 + 3 * 20


def test_the_report_adds_each_batchs_activations_to_the_static_part() -> None:
    from ipadapter.train.memory import Estimate, report

    found = Estimate(frozen_params=1_000_000, trainable_params=2_345, static_bytes=3 * 2**29,
                     activations={4: 2**29, 1: 2**20 - 2**19})
    config = TrainConfig(base="some/base", variant="plus", resolution=256, mixed_precision="fp16",
                         optimizer="adamw8bit", gradient_checkpointing=True, cache="cache", ema_decay=0.999)
    assert report(config, found).splitlines() == [
        "base some/base, variant plus, 256 px, precision fp16, optimizer adamw8bit, gradient checkpointing on, "
        "feature cache on",
        "parameters: 1,002,345 (frozen in memory 1,000,000; trainable 2,345)",
        "weights, gradients, optimizer states, EMA: 1.50 GiB",
        "estimated peak memory per process (weights + states + activations saved for backward; allocator overhead "
        "and kernel workspaces not counted):",
        "  batch 1: 1.50 GiB (activations 0.5 MiB)",
        "  batch 4: 2.00 GiB (activations 512.0 MiB)",
    ]
    from ipadapter.train.memory import size

    assert (size(2**30), size(2**30 - 2**19)) == ("1.00 GiB", "1023.5 MiB")  # GiB from one GiB up
    plain = report(TrainConfig(base="b"), Estimate(1, 1, 2**30 - 2**19, {1: 0}))
    assert "gradient checkpointing off, feature cache off" in plain
    assert "weights, gradients, optimizer states: 1023.5 MiB" in plain


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dry")
    return factories.write_base(tmp / "base"), factories.write_image_encoder(tmp / "enc")


def test_dry_run_counts_the_real_models_parameters(folders) -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from ipadapter.encoders import ImageEncoder
    from ipadapter.train.trainer import adapter_config_for
    from ipadapter import IPAdapter

    base, enc = folders
    config = TrainConfig(base=str(base), image_encoder=str(enc), resolution=factories.RES, variant="plus")
    found = estimate(config, batch_sizes=(1, 2, 4))
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    encoder = ImageEncoder.from_pretrained(str(enc))
    real = [unet, AutoencoderKL.from_pretrained(base, subfolder="vae"),
            CLIPTextModel.from_pretrained(base, subfolder="text_encoder"), encoder.model]
    assert found.frozen_params == sum(p.numel() for m in real for p in m.parameters())
    adapter = IPAdapter.for_unet(unet, adapter_config_for("plus", cross_dim=factories.CROSS, embed_dim=encoder.global_dim,
                                                          hidden_dim=encoder.patch_dim,
                                                          patch_tokens=encoder.patch_tokens))
    assert found.trainable_params == sum(p.numel() for p in adapter.parameters())
    # fp32 weights + gradients + AdamW's two states for the trainable part, fp32 frozen weights
    assert found.static_bytes == 4 * found.frozen_params + 16 * found.trainable_params
    # activations saved for backward: a per-sample part times the batch plus a shared part (affine in the batch)
    act = found.activations
    assert act[1] < act[2] < act[4] and act[4] - act[2] == 2 * (act[2] - act[1])
    cached = estimate(config.replace(cache="somewhere", gradient_checkpointing=True), batch_sizes=(1,))
    assert cached.frozen_params == sum(p.numel() for p in unet.parameters())  # the cache replaces the encoders
    assert cached.activations[1] < found.activations[1]


def _saved_by_the_training_forward(monkeypatch) -> list[int]:
    """Per call of the real training forward (`TrainModule.forward`, on the CPU, as `train` runs it): the bytes of the
    tensors autograd saved for backward that the prediction's graph still holds when it returns. Weights, and views
    of them, are not activations (they are counted as weights)."""
    import weakref

    from ipadapter.train.trainer import TrainModule

    calls: list[int] = []
    forward = TrainModule.forward

    def measured(self, *args, **kwargs):
        saved = {}

        def pack(t):
            if not isinstance(t._base if t._base is not None else t, torch.nn.Parameter):
                saved[id(t)] = weakref.ref(t), t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            prediction = forward(self, *args, **kwargs)
        calls.append(sum(size for alive, size in saved.values() if alive() is not None))
        return prediction

    monkeypatch.setattr(TrainModule, "forward", measured)
    return calls


@pytest.mark.usefixtures("fresh_accelerate_state")
@pytest.mark.parametrize("sdxl, variant, settings", [
    (False, "base", {}),
    (False, "plus", {"references": 2}),
    (True, "plus", {}),
    (False, "faceid-plus", {"id_dim": 16}),
    (False, "base", {"attention": "concat"}),
    (False, "plus", {"mixed_precision": "bf16"}),
    (True, "base", {"mixed_precision": "bf16"}),
])
def test_the_estimated_activations_are_what_a_real_training_forward_saves(tmp_path, monkeypatch, sdxl, variant,
                                                                            settings) -> None:
    """The dry run (fake tensors, shapes from the configs) against a real run's first forward on the CPU: captions as
    long as the base's tokenizer pads them, the encoder's features through the trainable projection, SDXL's added
    conditioning, several references per sample, attention by PyTorch's fused CPU kernel, bf16 autocast."""
    from ipadapter.train import train

    import json

    base = factories.write_base(tmp_path / "base", sdxl=sdxl)
    data = factories.write_images(tmp_path / "data", 2, id_dim=settings.get("id_dim", 0))
    if settings.get("references", 1) > 1:  # each sample conditioned on both images
        entries = [json.loads(line) for line in data.read_text().splitlines()]
        data.write_text("".join(json.dumps({**e, "ref_image_file": ["img0.png", "img1.png"]}) + "\n" for e in entries))
    config = factories.train_config(tmp_path, data, base=str(base), variant=variant, max_steps=1,
                                    image_encoder=str(factories.write_image_encoder(tmp_path / "enc")), **settings)
    found = estimate(config, batch_sizes=(2,), autocast="cpu")  # the CPU run's mixed precision
    calls = _saved_by_the_training_forward(monkeypatch)
    train(config)
    if config.mixed_precision == "no":
        assert calls == [found.activations[2]]
    else:  # the fake kernels' layer norms keep their row statistics in bf16, the CPU's in fp32: a few bytes each
        assert len(calls) == 1 and calls[0] == pytest.approx(found.activations[2], rel=1e-3)


def test_cudas_autocast_keeps_normalisations_and_softmax_in_fp32() -> None:
    """PyTorch's autocast reference lists group_norm, layer_norm and softmax among the CUDA operations that autocast
    to float32; linear layers autocast to the half precision either way."""
    import torch.nn.functional as F

    from ipadapter.train.memory import _CudaAutocast

    x, w = torch.randn(2, 4, 3, 3, dtype=torch.bfloat16), torch.randn(3, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16), _CudaAutocast():
        outputs = [F.group_norm(x, 2), F.layer_norm(x, (3,), weight=w), F.softmax(x, dim=-1), torch.softmax(x, -1),
                   x.softmax(dim=2)]
        linear = F.linear(torch.randn(2, 3), torch.randn(5, 3))
    assert [o.dtype for o in outputs] == [torch.float32] * 5 and linear.dtype == torch.bfloat16
    x32 = x.float()  # computed in fp32 from the half-precision input, keyword arguments and all
    expected = [F.group_norm(x32, 2), F.layer_norm(x32, (3,), weight=w.float()), F.softmax(x32, dim=-1),
                torch.softmax(x32, -1), x32.softmax(dim=2)]
    assert all(torch.equal(o, e) for o, e in zip(outputs, expected))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the CPU's own rules, for contrast
        assert F.group_norm(x, 2).dtype == torch.bfloat16


@pytest.mark.parametrize("precision, more", [("bf16", True), ("fp16", True), ("no", False)])
def test_a_gpu_runs_estimate_keeps_more_under_mixed_precision_than_a_cpu_runs(folders, precision, more) -> None:
    base, enc = folders
    config = TrainConfig(base=str(base), image_encoder=str(enc), resolution=factories.RES, mixed_precision=precision)
    gpu, cpu = (estimate(config, batch_sizes=(2,), autocast=rules).activations[2] for rules in ("cuda", "cpu"))
    assert (gpu > cpu) if more else (gpu == cpu)
    assert estimate(config, batch_sizes=(2,)).activations[2] == gpu  # what `--dry-run` prints: a GPU run's


def test_the_vaes_downscale_is_two_to_the_number_of_its_halvings() -> None:
    from ipadapter.validation import vae_downscale

    assert vae_downscale({"block_out_channels": [128, 256, 512, 512]}) == 8  # SD 1.5 / SDXL: 512 px → 64 latents
    assert [vae_downscale({"block_out_channels": [1] * n}) for n in (1, 2, 3)] == [1, 2, 4]


@pytest.mark.parametrize("change, per_trainable", [({"optimizer": "adamw8bit"}, -6), ({"ema_decay": 0.5}, 4)])
def test_the_optimizer_and_ema_change_the_static_part_by_their_states(folders, change, per_trainable) -> None:
    """8-bit AdamW keeps 2 one-byte states where AdamW keeps 2 fp32 ones (6 bytes fewer per trainable weight); an EMA
    of any decay above 0 keeps one fp32 copy more (4 bytes)."""
    base, enc = folders
    config = TrainConfig(base=str(base), image_encoder=str(enc), resolution=factories.RES)
    plain, changed = (estimate(c, batch_sizes=(1,)) for c in (config, config.replace(**change)))
    assert changed.static_bytes - plain.static_bytes == per_trainable * plain.trainable_params


@pytest.mark.parametrize("variant, settings", [("base", {"num_tokens": 8}), ("faceid", {"lora_rank": 4, "id_dim": 16})])
def test_the_trainable_count_follows_tokens_and_lora_rank(folders, variant, settings) -> None:
    from diffusers import UNet2DConditionModel

    from ipadapter import IPAdapter
    from ipadapter.encoders import ImageEncoder
    from ipadapter.train.trainer import adapter_config_for

    base, enc = folders
    found = estimate(TrainConfig(base=str(base), image_encoder=str(enc), resolution=factories.RES, variant=variant,
                                 **settings), batch_sizes=(1,))
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    encoder = ImageEncoder.from_pretrained(str(enc))
    adapter = IPAdapter.for_unet(unet, adapter_config_for(variant, cross_dim=factories.CROSS,
                                                          embed_dim=encoder.global_dim, **settings))
    assert found.trainable_params == sum(p.numel() for p in adapter.parameters())


def test_an_sdxl_dry_run_counts_both_text_encoders(tmp_path) -> None:
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    base = factories.write_base(tmp_path / "xl", sdxl=True)
    config = TrainConfig(base=str(base), variant="faceid", id_dim=16, resolution=factories.RES)
    uncached, cached = (estimate(c, batch_sizes=(1,)) for c in (config, config.replace(cache="somewhere")))
    parts = [AutoencoderKL.from_pretrained(base, subfolder="vae"),
             CLIPTextModel.from_pretrained(base, subfolder="text_encoder"),
             CLIPTextModelWithProjection.from_pretrained(base, subfolder="text_encoder_2")]
    assert uncached.frozen_params - cached.frozen_params == sum(p.numel() for m in parts for p in m.parameters())


def test_a_base_without_a_tokenizer_is_named_in_one_line(tmp_path) -> None:
    import shutil

    from ipadapter.errors import IPAdapterError

    base = factories.write_base(tmp_path / "base")
    shutil.rmtree(base / "tokenizer")
    with pytest.raises(IPAdapterError) as info:
        estimate(TrainConfig(base=str(base), variant="faceid", id_dim=16, resolution=factories.RES), batch_sizes=(1,))
    assert str(info.value).startswith(f"cannot read {base}/tokenizer: ") and "tokenizer_config.json" in str(info.value)


@pytest.mark.parametrize("missing, command", [("tokenizer", "hf download qa/base"),
                                              ("text_encoder", "hf download qa/base"), ("nothing", None)])
def test_a_hub_base_cached_in_part_names_itself_and_its_download(tmp_path, monkeypatch, missing, command) -> None:
    """Offline, a Hub base whose configs are cached but not its tokenizer (or text encoder): the one line names the
    base and the command that downloads it."""
    import shutil

    import huggingface_hub.constants as hub

    from ipadapter.errors import IPAdapterError

    base = factories.write_base(tmp_path / "base")
    if command is not None:
        shutil.rmtree(base / missing)
    cache = tmp_path / "hub"
    factories.write_hub_cache(cache, "qa/base", base)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(cache))
    config = TrainConfig(base="qa/base", variant="faceid", id_dim=16, resolution=factories.RES)
    if command is None:  # the whole base cached: read from the cache, so the refusals above are of the part missing
        assert estimate(config, batch_sizes=(1,)).frozen_params > 0
        return
    with pytest.raises(IPAdapterError) as info:
        estimate(config, batch_sizes=(1,))
    assert str(info.value).startswith("the base model qa/base is not in the local Hugging Face cache and offline mode "
                                      "is on (")
    assert f"({command})" in str(info.value)


@pytest.mark.parametrize("sdxl", [False, True])
def test_a_hub_base_is_estimated_from_the_cache_without_a_request(tmp_path, monkeypatch, sdxl) -> None:
    """Online mode on, the base cached: its text encoders' configs are read from the cache alone (the requests are
    recorded, and fail), and the estimate is the folder's."""
    base = factories.write_base(tmp_path / "base", sdxl=sdxl)
    factories.write_hub_cache(tmp_path / "hub", "qa/base", base)
    sent = factories.hub_without_network(monkeypatch, tmp_path / "hub")
    config = TrainConfig(base="qa/base", variant="faceid", id_dim=16, resolution=factories.RES)
    assert estimate(config, batch_sizes=(1,)) == estimate(config.replace(base=str(base)), batch_sizes=(1,))
    assert [url for url in sent if "qa/base" in url] == []


def test_cli_dry_run_prints_the_estimate(folders, capsys) -> None:
    from ipadapter.cli.main import main

    base, enc = folders
    code = main(["train", "--dry-run", "--base", str(base), "--image-encoder", str(enc), "--resolution", "16",
                 "--optimizer", "adamw8bit"])
    out = capsys.readouterr().out
    assert code == 0
    assert "trainable" in out and "batch 8:" in out and "optimizer adamw8bit" in out


def test_dry_run_of_the_simple_adapter_counts_only_its_projection(folders) -> None:
    """The ablation trains the projection alone (its tokens go through the frozen to_k/to_v); the dry run traces the
    concatenated attention on the meta device."""
    from diffusers import UNet2DConditionModel

    from ipadapter.encoders import ImageEncoder
    from ipadapter.train.trainer import adapter_config_for
    from ipadapter import IPAdapter

    base, enc = folders
    config = TrainConfig(base=str(base), image_encoder=str(enc), resolution=factories.RES, attention="concat")
    found = estimate(config, batch_sizes=(1,))
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    encoder = ImageEncoder.from_pretrained(str(enc))
    adapter = IPAdapter.for_unet(unet, adapter_config_for("base", cross_dim=factories.CROSS,
                                                          embed_dim=encoder.global_dim))
    assert found.trainable_params == sum(p.numel() for p in adapter.image_proj.parameters())


@pytest.mark.parametrize("flags, message", [
    (["--resolution", "18"], "--resolution 18 does not fit this base model"),
    (["--stages", "16:1", "18:1"], "--stages entry 18:1: resolution 18 does not fit this base model"),
])
def test_cli_dry_run_refuses_a_resolution_the_run_would_refuse(folders, capsys, flags, message) -> None:
    """The tiny base takes multiples of 4 (VAE and UNet each halve): the estimate of a run that cannot start is not
    printed, and the one line names what the user typed."""
    from ipadapter.cli.main import main

    base, enc = folders
    assert main(["train", "--dry-run", "--base", str(base), "--image-encoder", str(enc), *flags]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith(f"ipadapter: error: {message}")


def test_dry_run_of_stages_is_the_largest_stage(folders) -> None:
    """A staged run's peak is its largest stage's: the estimate equals that of a plain run at that size."""
    from ipadapter.train.memory import report

    base, enc = folders
    plain = TrainConfig(base=str(base), image_encoder=str(enc), resolution=24)
    staged = plain.replace(resolution=factories.RES, stages=["16:2", "24:1"])
    assert estimate(staged, batch_sizes=(2,)) == estimate(plain, batch_sizes=(2,))
    assert estimate(staged, batch_sizes=(2,)) != estimate(plain.replace(resolution=16), batch_sizes=(2,))
    assert "24 px (the largest of the stages 16:2, 24:1)" in report(staged, estimate(staged, batch_sizes=(2,)))


@pytest.mark.parametrize("flags, message", [
    (["--variant", "flux", "--base", "{base}", "--image-encoder", "{enc}"],
     "--base {base} is not a FLUX pipeline: it has no transformer folder"),
    ([], "no base model: give --base (a diffusers pipeline folder or Hub id) or `base:` in the config"),
    (["--base", "{base}"], "variant 'base' needs --image-encoder (a CLIP or SigLIP vision model folder or Hub id)"),
    (["--base", "{tmp}/none", "--image-encoder", "{enc}"], "--base not found: {tmp}/none (no such file or folder; a "
                                                           "Hub model id has the form owner/name)"),
    (["--base", "{base}", "--image-encoder", "{tmp}/none"], "--image-encoder not found: {tmp}/none (no such file or "
                                                            "folder; a Hub model id has the form owner/name)"),
])
def test_cli_dry_run_refuses_what_a_run_would_in_one_sentence(folders, tmp_path, capsys, flags, message) -> None:
    """The dry run checks the models as the run does (no data needed), and prints nothing else."""
    from ipadapter.cli.main import main

    base, enc = folders
    fill = {"base": base, "enc": enc, "tmp": tmp_path}
    assert main(["train", "--dry-run", *[f.format(**fill) for f in flags]]) == 2
    assert tuple(capsys.readouterr()) == ("", f"ipadapter: error: {message.format(**fill)}\n")


@pytest.mark.parametrize("variant, encoder", [("faceid", ""), ("base", "image_encoder")])
def test_dry_run_on_the_bundled_model_takes_its_encoder_only_where_the_variant_reads_one(
        capsys, monkeypatch, variant, encoder) -> None:
    """`--base miniature`: a CLIP variant gets the bundled image encoder, FaceID (ID embeddings only) none."""
    from ipadapter import bundled
    from ipadapter.cli import train
    from ipadapter.cli.main import main

    seen = []
    real = train.with_bundled
    monkeypatch.setattr(train, "with_bundled", lambda config, **kw: seen.append(real(config, **kw)) or seen[-1])
    assert main(["train", "--dry-run", "--base", "miniature", "--variant", variant, "--resolution", "64"]) == 0
    assert seen[0].image_encoder == (str(bundled.image_encoder_path()) if encoder else "")
    assert capsys.readouterr().out.startswith(f"base {bundled.pipeline_path()}, variant {variant}, 64 px")


def _bundled_size() -> int:
    """The bundled pipeline's own size, from its saved configs: the UNet's sample size times the VAE's downscale."""
    import json

    from ipadapter import bundled

    folder = bundled.pipeline_path()
    unet = json.loads((folder / "unet" / "config.json").read_text())
    vae = json.loads((folder / "vae" / "config.json").read_text())
    return unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1)


@pytest.mark.parametrize("flags, config_text, expected", [
    ([], "", "bundled"),
    (["--resolution", "32"], "", 32),
    ([], "resolution: 128\n", 128),
    (["--resolution", "32"], "resolution: 128\n", 32),
    ([], "resolution: 512\n", 512),
])
def test_the_bundled_base_trains_at_its_own_size_unless_one_is_given(
        tmp_path, capsys, flags, config_text, expected) -> None:
    """Without --resolution or a config file's `resolution:`, `--base miniature` trains at the bundled model's size,
    not the paper's 512 px (64 times the pixels on a model made for 64 px); a size given either way stands."""
    from ipadapter.cli.main import main

    size = _bundled_size() if expected == "bundled" else expected
    config = []
    if config_text:
        (tmp_path / "run.yaml").write_text(config_text)
        config = ["--config", str(tmp_path / "run.yaml")]
    assert main(["train", "--dry-run", "--base", "miniature", *config, *flags]) == 0
    assert f", variant base, {size} px," in capsys.readouterr().out


def test_another_base_keeps_the_papers_size(folders, capsys) -> None:
    """The bundled model's size rule is for the keyword only: a pipeline folder trains at the paper's 512 px
    (TrainConfig's default) unless a resolution is given."""
    from ipadapter.cli.main import main

    base, enc = folders
    assert main(["train", "--dry-run", "--base", str(base), "--image-encoder", str(enc)]) == 0
    assert f", variant base, {TrainConfig().resolution} px," in capsys.readouterr().out
