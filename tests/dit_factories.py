"""Tiny diffusion transformers (FLUX, SD 3) and their pipelines, with adapter files in the published layouts.

Real diffusers classes with small configs: the key layouts and shape patterns are the published ones, only sizes
shrink. Nothing here touches the network.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from tests import factories

FLUX_JOINT = 32  # joint_attention_dim: T5 width, and the IP tokens' width in the XLabs files
FLUX_WIDTH = 32  # 2 heads × 16
CLIP_DIM = 24  # tiny CLIP ViT-L/14 stand-in: image_embeds width (factories.tiny_image_encoder)


def flux_transformer(seed: int = 0, *, joint: int = FLUX_JOINT, double: int = 2, head_dim: int = 16):
    """Two heads of `head_dim` (the rotary axes split it 1:1:2)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=double, num_single_layers=1, attention_head_dim=head_dim,
        num_attention_heads=2, joint_attention_dim=joint, pooled_projection_dim=32,
        axes_dims_rope=[head_dim // 4, head_dim // 4, head_dim // 2],
    ).eval()


def _rand(g: torch.Generator, *shape: int, scale: float = 0.3) -> torch.Tensor:
    return torch.randn(*shape, generator=g) * scale


def xlabs_state(*, tokens: int = 4, cross: int = FLUX_JOINT, width: int = FLUX_WIDTH, blocks: int = 2,
                clip_dim: int = CLIP_DIM, seed: int = 1) -> dict[str, torch.Tensor]:
    """An XLabs FLUX IP-Adapter file's tensors (flat keys as in `ip_adapter.safetensors`)."""
    g = torch.Generator().manual_seed(seed)
    flat = {
        "ip_adapter_proj_model.proj.weight": _rand(g, tokens * cross, clip_dim),
        "ip_adapter_proj_model.proj.bias": _rand(g, tokens * cross),
        "ip_adapter_proj_model.norm.weight": 1 + _rand(g, cross, scale=0.1),
        "ip_adapter_proj_model.norm.bias": _rand(g, cross, scale=0.1),
    }
    for i in range(blocks):
        for kv in "kv":
            prefix = f"double_blocks.{i}.processor.ip_adapter_double_stream_{kv}_proj"
            flat[f"{prefix}.weight"] = _rand(g, width, cross)
            flat[f"{prefix}.bias"] = _rand(g, width)
    return flat


def xlabs_as_diffusers(flat: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """The same tensors as diffusers' FLUX loader hands them to the transformer (its own key renaming, written out
    here from the XLabs names so the oracle reads exactly the file's tensors)."""
    out: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    for key, value in flat.items():
        if key.startswith("ip_adapter_proj_model."):
            out["image_proj"][key.split(".", 1)[1]] = value.clone()
        else:
            _, i, _, name, kind = key.split(".")
            kv = "k" if "_k_proj" in name else "v"
            out["ip_adapter"][f"{i}.to_{kv}_ip.{kind}"] = value.clone()
    return out


def flux_vae(seed: int = 2):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                         latent_channels=1, norm_num_groups=4, sample_size=32, use_quant_conv=False,
                         use_post_quant_conv=False, shift_factor=0.06, scaling_factor=1.5).eval()


def t5(seed: int = 6, d_model: int = FLUX_JOINT):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=80, d_model=d_model, d_kv=8, d_ff=37, num_layers=1, num_heads=2,
                   relative_attention_num_buckets=8, relative_attention_max_distance=16)
    return T5EncoderModel(cfg).eval()


def flux_pipeline(folder: Path, seed: int = 0):
    """A FluxPipeline with tiny random weights; `folder` receives its tokenizers (CLIP-style for both encoders: the
    pipeline only calls them). The image encoder is not part of it, as with the published FLUX checkpoints."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(factories.write_tokenizer(folder / "tok")))
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=flux_vae(2 + seed),
        text_encoder=factories.tiny_text_encoder(factories.CROSS, 1 + seed), tokenizer=tok, text_encoder_2=t5(6 + seed),
        tokenizer_2=tok, transformer=flux_transformer(seed),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def transformer_file(root: Path, repo_id: str, pipe, transformer, original: Callable, name: str) -> SimpleNamespace:
    """What the transformer-file tests share: `transformer` written alone in its family's original layout
    (`original`) as `root/name`; `pipe` laid out as the family repository `repo_id` in a Hugging Face cache
    (`root/hub`), its transformer that one's config alone (the repository's own weights absent, so a read of them
    fails); a reference image `root/ref.png`."""
    from PIL import Image
    from safetensors.torch import save_file

    repo = root / "repo"
    pipe.save_pretrained(repo)
    for weights in (repo / "transformer").glob("*.safetensors"):
        weights.unlink()
    transformer.save_config(repo / "transformer")
    factories.write_hub_cache(root / "hub", repo_id, repo)
    save_file(original(transformer), str(root / name))
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / "ref.png")
    return SimpleNamespace(root=root, cache=root / "hub", path=root / name, repo=repo, transformer=transformer)


def flux_transformer_full_width(seed: int = 0):
    """A FLUX.1 [dev] transformer at FLUX.1's own width (24 heads of 128: diffusers' conversion of Black Forest
    Labs' files is written for 3,072) with one block of each kind, 531M parameters in bf16; its text and latent
    widths are the tiny pipeline's. Random normal weights × 0.02, drawn in bf16 (a second or two)."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                       attention_head_dim=128, num_attention_heads=24, joint_attention_dim=FLUX_JOINT,
                                       pooled_projection_dim=32, guidance_embeds=True)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=g, dtype=torch.bfloat16) * 0.02)
    return model.eval()


def flux_as_bfl(model) -> dict[str, torch.Tensor]:
    """A FLUX transformer's weights in Black Forest Labs' layout (ComfyUI's `models/unet/` files), written out from
    the inverse of diffusers' `convert_flux_transformer_checkpoint_to_diffusers`: fused q/k/v (and the single blocks'
    MLP input), the final modulation's shift and scale in BFL's order."""
    sd = model.state_dict()
    out: dict[str, torch.Tensor] = {}

    def same(bfl: str, ours: str) -> None:
        for kind in ("weight", "bias"):
            out[f"{bfl}.{kind}"] = sd.pop(f"{ours}.{kind}")

    def fused(bfl: str, ours: list[str]) -> None:
        for kind in ("weight", "bias"):
            out[f"{bfl}.{kind}"] = torch.cat([sd.pop(f"{name}.{kind}") for name in ours])

    for bfl, ours in (("time_in", "timestep_embedder"), ("vector_in", "text_embedder"),
                      ("guidance_in", "guidance_embedder")):
        same(f"{bfl}.in_layer", f"time_text_embed.{ours}.linear_1")
        same(f"{bfl}.out_layer", f"time_text_embed.{ours}.linear_2")
    same("txt_in", "context_embedder")
    same("img_in", "x_embedder")
    same("final_layer.linear", "proj_out")
    for kind in ("weight", "bias"):
        scale, shift = sd.pop(f"norm_out.linear.{kind}").chunk(2)
        out[f"final_layer.adaLN_modulation.1.{kind}"] = torch.cat([shift, scale])
    for i in range(model.config.num_layers):
        d, b = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        for bfl, ours in (("img_mod.lin", "norm1.linear"), ("txt_mod.lin", "norm1_context.linear"),
                          ("img_mlp.0", "ff.net.0.proj"), ("img_mlp.2", "ff.net.2"),
                          ("txt_mlp.0", "ff_context.net.0.proj"), ("txt_mlp.2", "ff_context.net.2"),
                          ("img_attn.proj", "attn.to_out.0"), ("txt_attn.proj", "attn.to_add_out")):
            same(d + bfl, b + ours)
        fused(d + "img_attn.qkv", [f"{b}attn.to_{x}" for x in "qkv"])
        fused(d + "txt_attn.qkv", [f"{b}attn.add_{x}_proj" for x in "qkv"])
        for bfl, ours in (("img_attn.norm.query_norm", "norm_q"), ("img_attn.norm.key_norm", "norm_k"),
                          ("txt_attn.norm.query_norm", "norm_added_q"), ("txt_attn.norm.key_norm", "norm_added_k")):
            out[f"{d}{bfl}.scale"] = sd.pop(f"{b}attn.{ours}.weight")
    for i in range(model.config.num_single_layers):
        s, b = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        same(s + "modulation.lin", b + "norm.linear")
        fused(s + "linear1", [f"{b}attn.to_{x}" for x in "qkv"] + [f"{b}proj_mlp"])
        same(s + "linear2", b + "proj_out")
        out[f"{s}norm.query_norm.scale"] = sd.pop(f"{b}attn.norm_q.weight")
        out[f"{s}norm.key_norm.scale"] = sd.pop(f"{b}attn.norm_k.weight")
    assert not sd, f"weights the layout does not place: {sorted(sd)}"
    return {k: v.contiguous() for k, v in out.items()}


def save_flux_base(root: Path) -> Path:
    """A FLUX pipeline folder with an image_encoder/ beside it, as `ipadapter generate --base` reads it."""
    pipe = flux_pipeline(root / "parts")
    folder = root / "flux"
    pipe.save_pretrained(folder)
    factories.write_image_encoder(folder / "image_encoder")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    return folder


# ---- SD 3 / 3.5 (InstantX layout) -------------------------------------------------------------------------------

SD3_WIDTH = 32  # 4 heads × 8: the joint blocks' width, which is also the IP tokens' width
SIGLIP_DIM = 40  # tiny SigLIP hidden size (the published encoder: so400m, 1152)
# diffusers' renaming of the InstantX resampler keys, undone so the factory writes the published names
_INSTANTX_NAMES = [("ln0", "0.norm1"), ("ln1", "0.norm2"), ("attn.to_q", "0.to_q"), ("attn.to_kv", "0.to_kv"),
                   ("attn.to_out.0", "0.to_out"), ("adaln_norm", "1.0"), ("ff.net.0.proj", "1.1"),
                   ("ff.net.2", "1.3"), ("adaln_proj", "2.1")]


def sd3_transformer(seed: int = 0, *, layers: int = 2, joint: int = 32, dual: tuple[int, ...] = ()):
    """A tiny SD 3 transformer; with `dual`, SD 3.5 Medium's kind (MMDiT-X): those blocks add a second attention
    (`attn2`, the image tokens alone), and every block normalises queries and keys (RMS)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    medium = {"dual_attention_layers": dual, "qk_norm": "rms_norm"} if dual else {}
    return SD3Transformer2DModel(sample_size=16, patch_size=1, in_channels=4, num_layers=layers, attention_head_dim=8,
                                 num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=joint,
                                 pooled_projection_dim=64, out_channels=4, **medium).eval()


def sd35_large_like(seed: int = 0):
    """A tiny SD 3.5 transformer that diffusers reads as SD 3.5 Large from Stability's layout: 38 joint blocks (the
    header rule is block 37's presence; the conversion takes every width from the file) with RMS query/key norms."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(sample_size=16, patch_size=1, in_channels=4, num_layers=38, attention_head_dim=8,
                                 num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=64,
                                 pooled_projection_dim=64, out_channels=4, qk_norm="rms_norm").eval()


def sd3_as_stability(model) -> dict[str, torch.Tensor]:
    """An SD 3 / 3.5 transformer's weights in Stability's layout (`sd3.5_large.safetensors`), written out from the
    inverse of diffusers' `convert_sd3_transformer_checkpoint_to_diffusers`: fused q/k/v, the last block's text side
    without output projection or MLP, the last modulations' shift and scale in Stability's order."""
    sd = model.state_dict()
    out: dict[str, torch.Tensor] = {"pos_embed": sd.pop("pos_embed.pos_embed")}

    def same(theirs: str, ours: str) -> None:
        for kind in ("weight", "bias"):
            out[f"{theirs}.{kind}"] = sd.pop(f"{ours}.{kind}")

    def swapped(theirs: str, ours: str) -> None:
        for kind in ("weight", "bias"):
            scale, shift = sd.pop(f"{ours}.{kind}").chunk(2)
            out[f"{theirs}.{kind}"] = torch.cat([shift, scale])

    same("x_embedder.proj", "pos_embed.proj")
    same("context_embedder", "context_embedder")
    for theirs, ours in (("t_embedder", "timestep_embedder"), ("y_embedder", "text_embedder")):
        same(f"{theirs}.mlp.0", f"time_text_embed.{ours}.linear_1")
        same(f"{theirs}.mlp.2", f"time_text_embed.{ours}.linear_2")
    last = model.config.num_layers - 1
    for i in range(model.config.num_layers):
        j, b = f"joint_blocks.{i}.", f"transformer_blocks.{i}."
        for block, names in (("x_block", [f"{b}attn.to_{x}" for x in "qkv"]),
                             ("context_block", [f"{b}attn.add_{x}_proj" for x in "qkv"])):
            for kind in ("weight", "bias"):
                out[f"{j}{block}.attn.qkv.{kind}"] = torch.cat([sd.pop(f"{name}.{kind}") for name in names])
        for theirs, ours in (("x_block.attn.ln_q", "norm_q"), ("x_block.attn.ln_k", "norm_k"),
                             ("context_block.attn.ln_q", "norm_added_q"), ("context_block.attn.ln_k", "norm_added_k")):
            out[f"{j}{theirs}.weight"] = sd.pop(f"{b}attn.{ours}.weight")
        same(j + "x_block.attn.proj", b + "attn.to_out.0")
        same(j + "x_block.adaLN_modulation.1", b + "norm1.linear")
        same(j + "x_block.mlp.fc1", b + "ff.net.0.proj")
        same(j + "x_block.mlp.fc2", b + "ff.net.2")
        if i == last:
            swapped(j + "context_block.adaLN_modulation.1", b + "norm1_context.linear")
        else:
            same(j + "context_block.attn.proj", b + "attn.to_add_out")
            same(j + "context_block.adaLN_modulation.1", b + "norm1_context.linear")
            same(j + "context_block.mlp.fc1", b + "ff_context.net.0.proj")
            same(j + "context_block.mlp.fc2", b + "ff_context.net.2")
    same("final_layer.linear", "proj_out")
    swapped("final_layer.adaLN_modulation.1", "norm_out.linear")
    assert not sd, f"weights the layout does not place: {sorted(sd)}"
    return {k: v.contiguous() for k, v in out.items()}


def instantx_state(*, blocks: int = 2, width: int = SD3_WIDTH, feature_dim: int = SIGLIP_DIM, queries: int = 8,
                   hidden: int = 64, timestep_dim: int = 16, seed: int = 1) -> dict[str, dict[str, torch.Tensor]]:
    """An InstantX SD 3.5 IP-Adapter `.bin`'s nested tensors, random, in the published key names."""
    from diffusers.models.attention_processor import SD3IPAdapterJointAttnProcessor2_0
    from diffusers.models.embeddings import IPAdapterTimeImageProjection

    g = torch.Generator().manual_seed(seed)
    proj = IPAdapterTimeImageProjection(embed_dim=feature_dim, output_dim=width, hidden_dim=hidden, depth=4,
                                        heads=hidden // 64, num_queries=queries, timestep_in_dim=timestep_dim)
    image_proj = {}
    for key, value in proj.state_dict().items():
        if key.startswith("layers."):
            _, idx, rest = key.split(".", 2)
            for ours, theirs in _INSTANTX_NAMES:
                if rest.startswith(ours + "."):
                    rest = theirs + rest[len(ours):]
                    break
            key = f"layers.{idx}.{rest}"
        image_proj[key] = _rand(g, *value.shape, scale=0.2) + (1.0 if "norm" in key and key.endswith("weight") else 0)
    ip = {}
    for i in range(blocks):
        proc = SD3IPAdapterJointAttnProcessor2_0(width, width, width // 4, timesteps_emb_dim=hidden)
        for key, value in proc.state_dict().items():
            ip[f"{i}.{key}"] = _rand(g, *value.shape, scale=0.2) + (1.0 if key.startswith("norm_") and
                                                                     key.endswith(".weight") and "linear" not in key else 0)
    return {"image_proj": image_proj, "ip_adapter": ip}


def siglip(seed: int = 7):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed)
    cfg = SiglipVisionConfig(hidden_size=SIGLIP_DIM, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             image_size=24, patch_size=8)  # 3 × 3 = 9 patches
    return SiglipVisionModel(cfg).eval()


def sd3_pipeline(folder: Path, seed: int = 0, dual: tuple[int, ...] = ()):
    """A StableDiffusion3Pipeline with tiny random weights (CLIP-style tokenizers for all three text encoders: the
    pipeline only calls them). T5 is 64 wide: the two CLIP encoders' hidden states (32 + 32) are padded to it. `dual`:
    the transformer's blocks with a second attention (SD 3.5 Medium's kind)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(factories.write_tokenizer(folder / "tok")))
    torch.manual_seed(2 + seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=32, use_quant_conv=False,
                        use_post_quant_conv=False, shift_factor=0.06, scaling_factor=1.5).eval()
    pipe = StableDiffusion3Pipeline(
        transformer=sd3_transformer(seed, joint=64, dual=dual), scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
        text_encoder=factories.tiny_text_encoder(factories.CROSS, 1 + seed, projection=factories.CROSS), tokenizer=tok,
        text_encoder_2=factories.tiny_text_encoder(factories.CROSS, 5 + seed, projection=factories.CROSS), tokenizer_2=tok,
        text_encoder_3=t5(6 + seed, d_model=64), tokenizer_3=tok,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_sd3_base(root: Path, dual: tuple[int, ...] = ()) -> Path:
    """An SD 3 pipeline folder (`dual`: as `sd3_pipeline`) with a SigLIP image_encoder/ beside it."""
    from transformers import SiglipImageProcessor

    folder = root / "sd3"
    sd3_pipeline(root / "parts", dual=dual).save_pretrained(folder)
    siglip().save_pretrained(folder / "image_encoder")
    SiglipImageProcessor(size={"height": 24, "width": 24}).save_pretrained(folder / "image_encoder")
    return folder


def sd35_all_in_one(root: Path, repo_id: str) -> SimpleNamespace:
    """An SD 3.5 Large-like file that holds its text encoders and VAE too (ComfyUI's `models/checkpoints/` files,
    Stability's `sd3_medium_incl_clips_t5xxlfp16`): the transformer under `model.diffusion_model.`, the VAE in the
    original layout under `first_stage_model.`, CLIP-L, CLIP-G and T5 by transformers' names under
    `text_encoders.clip_l|clip_g|t5xxl.transformer.`. diffusers tells the two CLIPs in such a file apart by their
    widths, so they differ here (32 and 48) as CLIP-L's and CLIP-G's do (768, 1280). The pipeline is laid out as the
    family repository `repo_id` in the Hugging Face cache `root/hub` (its transformer's config alone, as
    `transformer_file` does) and returned with the file's path; beside them an InstantX adapter and its SigLIP
    (`sd35_adapter_files`) and a reference image `root/ref.png`."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    from PIL import Image
    from safetensors.torch import save_file
    from transformers import CLIPTokenizer

    from tests import ldm_format

    parts = sd3_pipeline(root / "parts")
    torch.manual_seed(11)
    transformer = SD3Transformer2DModel(sample_size=16, patch_size=1, in_channels=4, num_layers=38,
                                        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                        joint_attention_dim=96, pooled_projection_dim=64, out_channels=4,
                                        qk_norm="rms_norm").eval()
    tok = CLIPTokenizer.from_pretrained(str(factories.write_tokenizer(root / "tok")))
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=parts.scheduler, vae=parts.vae, tokenizer=tok, tokenizer_2=tok,
        tokenizer_3=tok, text_encoder=factories.tiny_text_encoder(32, 21, projection=32),
        text_encoder_2=factories.tiny_text_encoder(48, 22, projection=32), text_encoder_3=t5(23, d_model=96))
    pipe.set_progress_bar_config(disable=True)
    state = {"model.diffusion_model." + key: value for key, value in sd3_as_stability(transformer).items()}
    state |= ldm_format.vae_state(pipe.vae)
    for name, encoder in {"clip_l": pipe.text_encoder, "clip_g": pipe.text_encoder_2,
                          "t5xxl": pipe.text_encoder_3}.items():
        state |= {f"text_encoders.{name}.transformer." + (key if name == "t5xxl" or key.startswith("text_projection")
                                                         else ldm_format._text_model(key)): value
                  for key, value in encoder.state_dict().items()}
    path = root / "sd3.5_large_all_in_one.safetensors"
    save_file({key: value.clone().contiguous() for key, value in state.items()}, str(path))
    repo = root / "repo"
    pipe.save_pretrained(repo)
    for weights in (repo / "transformer").glob("*.safetensors"):
        weights.unlink()
    factories.write_hub_cache(root / "hub", repo_id, repo)
    sd35_adapter_files(root)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / "ref.png")
    return SimpleNamespace(root=root, path=path, repo=repo, pipe=pipe)


def configs_only_hub(repo: Path, repo_id: str, folder: Path) -> Path:
    """A Hugging Face cache at `folder/hub` holding the pipeline folder `repo`'s configs and tokenizers alone (no
    weights), as `repo_id`."""
    import shutil

    for path in repo.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".txt", ".model"):
            (folder / "kept" / path.relative_to(repo)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, folder / "kept" / path.relative_to(repo))
    factories.write_hub_cache(folder / "hub", repo_id, folder / "kept")
    return folder / "hub"


def sd35_adapter_files(root: Path) -> None:
    """An InstantX adapter for the 38-block SD 3.5 Large-like transformers (`root/ip-adapter.bin`) and the tiny
    SigLIP it reads (`root/siglip`)."""
    from transformers import SiglipImageProcessor

    torch.save(instantx_state(blocks=38), root / "ip-adapter.bin")
    siglip().save_pretrained(root / "siglip")
    SiglipImageProcessor(size={"height": 24, "width": 24}).save_pretrained(root / "siglip")


def assert_generate_matches(root: Path, base_flags: list[str], pipe, out: Path) -> None:
    """`ipadapter generate` with `base_flags` and the files of `sd35_adapter_files` in `root` (reference
    `root/ref.png`) makes, within one level, the image `ipadapter.load` makes on `pipe`, the pipeline those flags
    should have loaded."""
    import ipadapter
    from PIL import Image

    from ipadapter.cli.main import main

    assert main(["generate", *base_flags, "--adapter", str(root / "ip-adapter.bin"), "--image-encoder",
                 str(root / "siglip"), "--image", str(root / "ref.png"), "--out", str(out), "--prompt", "a cat",
                 "--steps", "2", "--width", "16", "--height", "16", "--seed", "3"]) == 0
    pipe.set_progress_bar_config(disable=True)
    with ipadapter.load(pipe, str(root / "ip-adapter.bin"), image_encoder=str(root / "siglip")) as prompter:
        expected = prompter.generate(Image.open(root / "ref.png"), prompt="a cat", steps=2, width=16, height=16,
                                     seed=3)[0]
    got = np.asarray(Image.open(out).convert("RGB"), np.int16)
    assert np.abs(got - np.asarray(expected, np.int16)).max() <= 1


def scaled_fp8_state(state: dict[str, torch.Tensor], layout: str = "older", chosen: Callable[[str], bool] = lambda key: True,
                     marker: str = "scaled_fp8") -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """`state` as ComfyUI writes a scaled fp8 file: each `chosen` linear weight divided by its scale (its largest
    magnitude over fp8's largest) and stored as float8_e4m3fn, in the older layout (`scale_weight`, `scale_input`, the
    `marker` tensor) or the newer (`weight_scale`, `input_scale`, `comfy_quant`); every other tensor as it is. Returns
    that, and what each tensor stands for: a stored fp8 value times its scale, in float32, or the tensor itself."""
    names = ("scale_weight", "scale_input") if layout == "older" else ("weight_scale", "input_scale")
    stored, meant = {}, {}
    for key, value in state.items():
        stored[key] = meant[key] = value
        if key.endswith(".weight") and value.ndim == 2 and chosen(key):
            layer, scale = key.removesuffix(".weight"), value.abs().amax().float() / 448
            stored[key] = (value / scale).to(torch.float8_e4m3fn)
            meant[key] = stored[key].float() * scale
            stored[f"{layer}.{names[0]}"], stored[f"{layer}.{names[1]}"] = scale, torch.ones(())
            if layout == "newer":
                stored[f"{layer}.comfy_quant"] = torch.tensor(list(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8)
    if layout == "older":
        stored[marker] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    return stored, meant
