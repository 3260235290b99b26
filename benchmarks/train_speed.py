"""Training throughput: this trainer with the feature cache vs a plain loop of the authors' method.

Both train the same base adapter on the same SD-1.5-architecture models (random weights): the full SD 1.5 UNet
(860M), SD's VAE, a CLIP-L-shaped text encoder and a ViT-H/14-shaped image encoder (632M), same data, batch and
resolution, in one process, their steps interleaved (this 2-core machine is shared: interleaving gives both the same
load). The plain loop is the authors' tutorial_train.py per step: decode
and preprocess the images, run VAE, text encoder and image encoder (all frozen, no grad), then the UNet forward and
backward with the adapter. The trainer with `--cache` computes the frozen outputs once, then each step reads them.

    python benchmarks/train_speed.py                      # 256 px (32x32 latents), batch 2, 3 timed steps each
    python benchmarks/train_speed.py --resolution 128 --steps 2 --small-encoder   # a quicker look

Prints a table: samples/s of each, the ratio, the one-off cache build cost and the cache's size per sample.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import inference  # noqa: E402


def write_tokenizer(folder: Path) -> Path:
    """A character-level vocabulary in CLIP's BPE file format (offline; the speed does not depend on the vocab)."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz0123456789":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "CLIPTokenizer",
                                                              "model_max_length": 77, "do_lower_case": True, **special}))
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    return folder


def build_models(tmp: Path, small_encoder: bool):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import (CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, CLIPTokenizer, CLIPVisionConfig,
                              CLIPVisionModelWithProjection)

    from ipadapter.encoders import ImageEncoder
    from ipadapter.train.models import BaseModels

    torch.manual_seed(0)
    t0 = time.perf_counter()
    unet = UNet2DConditionModel(cross_attention_dim=768)  # SD 1.5's block config: 860M parameters
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        scaling_factor=0.18215)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                        num_attention_heads=12, max_position_embeddings=77, vocab_size=49408))
    if small_encoder:
        vision = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                  image_size=224, patch_size=16, projection_dim=1024)
    else:  # OpenCLIP ViT-H/14's shape
        vision = CLIPVisionConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                  num_attention_heads=16, image_size=224, patch_size=14, projection_dim=1024,
                                  hidden_act="gelu")
    image = CLIPVisionModelWithProjection(vision)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012)
    tokenizer = CLIPTokenizer.from_pretrained(str(write_tokenizer(tmp / "tokenizer")))
    models = BaseModels(unet=unet.eval(), scheduler_config=dict(scheduler.config), vae=vae.eval(),
                        tokenizers=[tokenizer], text_encoders=[text.eval()], name="sd15-random")
    encoder = ImageEncoder(image, CLIPImageProcessor(), name="vit-h-random")
    counts = {k: sum(p.numel() for p in m.parameters()) / 1e6 for k, m in
              (("unet", unet), ("vae", vae), ("text encoder", text), ("image encoder", image))}
    return models, encoder, counts, time.perf_counter() - t0


def write_data(folder: Path, n: int) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        arr = (rng.random((300, 360, 3)) * 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"{i}.jpg", quality=90)
        lines.append(json.dumps({"image_file": f"{i}.jpg", "text": f"a photo of thing number {i}"}))
    (folder / "data.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "data.jsonl"


class PlainLoop:
    """The authors' tutorial_train.py step: every frozen encoder runs on every batch, images decoded every step.

    It runs on its own copy of the UNet, one step at a time, so the benchmark can interleave it with the trainer's
    steps (the same machine load for both; this 2-core machine is shared)."""

    def __init__(self, models, encoder, manifest: Path, *, resolution: int, batch: int) -> None:
        import copy

        from diffusers import DDPMScheduler

        from ipadapter import IPAdapter, attach
        from ipadapter.train.data import Decoder, IndexedStream, read_manifest
        from ipadapter.train.trainer import adapter_config_for

        self.unet = copy.deepcopy(models.unet)
        self.vae, self.text_encoder, self.tokenizer = models.vae, models.text_encoders[0], models.tokenizers[0]
        self.encoder, self.batch = encoder, batch
        for m in (self.unet, self.vae, self.text_encoder, encoder.model):
            m.requires_grad_(False)
        g = torch.Generator().manual_seed(0)
        self.adapter = IPAdapter.for_unet(self.unet, adapter_config_for("base", cross_dim=768,
                                                                        embed_dim=encoder.global_dim))
        self.attachment = attach(self.unet, self.adapter)
        self.attachment.runtime.cache_kv = False
        self.adapter.float().requires_grad_(True)
        self.optimizer = torch.optim.AdamW(self.adapter.parameters(), lr=1e-4, weight_decay=0.01)
        self.noise_scheduler = DDPMScheduler.from_config(models.scheduler_config)
        self.stream = IndexedStream(read_manifest(manifest), seed=1)
        self.decode = Decoder(resolution, encoder.processor)
        self.generator = g
        self.times: list[float] = []

    def step(self) -> float:
        import torch.nn.functional as F

        from ipadapter import AdapterPrompt, Reference
        from ipadapter.train.data import collate
        from ipadapter.train.dropout import draw, drop_texts, replace_rows

        t0 = time.perf_counter()
        phases = {}
        b = collate([self.decode(self.stream.next_record()) for _ in range(self.batch)])
        drops = draw(self.batch, 0.05, 0.05, 0.05, generator=self.generator)
        phases["data"] = time.perf_counter()
        with torch.no_grad():
            latents = self.vae.encode(b["pixels"]).latent_dist.sample(self.generator) * self.vae.config.scaling_factor
            phases["vae"] = time.perf_counter()
            embeds = replace_rows(self.encoder.model(b["clip"]).image_embeds, drops.image, 0.0)
            phases["image encoder"] = time.perf_counter()
            ids = self.tokenizer(drop_texts(b["text"], drops.text), padding="max_length", max_length=77,
                                 truncation=True, return_tensors="pt").input_ids
            text = self.text_encoder(ids)[0]
            phases["text encoder"] = time.perf_counter()
        noise = torch.randn(latents.shape, generator=self.generator)
        t = torch.randint(0, 1000, (self.batch,), generator=self.generator).long()
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        self.attachment.set_prompts({"0": AdapterPrompt([Reference(cond=self.adapter.project(embeds))])}, cfg=False)
        pred = self.unet(noisy, t, encoder_hidden_states=text).sample
        loss = F.mse_loss(pred.float(), noise.float())
        phases["unet forward"] = time.perf_counter()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        phases["backward + step"] = time.perf_counter()
        self.times.append(time.perf_counter() - t0)
        last, parts = t0, []
        for name, at in phases.items():
            parts.append(f"{name} {at - last:.2f}")
            last = at
        print(f"  plain step {len(self.times)}: {self.times[-1]:.2f} s ({', '.join(parts)})", flush=True)
        return self.times[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed steps for each (one untimed warm-up step more)")
    parser.add_argument("--small-encoder", action="store_true", help="a ViT-B/16-shaped encoder instead of ViT-H/14")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from ipadapter.train import TrainConfig, train
    from ipadapter.train.cache import CacheReader

    tmp = Path(tempfile.mkdtemp(prefix="ipadapter-bench-"))
    try:
        models, encoder, counts, build_s = build_models(tmp, args.small_encoder)
        print(f"built models in {build_s:.0f} s: " + ", ".join(f"{k} {v:.0f}M" for k, v in counts.items()), flush=True)
        n = max(8, args.batch * (args.steps + 1))
        manifest = write_data(tmp / "data", n)

        plain_loop = PlainLoop(models, encoder, manifest, resolution=args.resolution, batch=args.batch)

        config = TrainConfig(data=str(manifest), output=str(tmp / "run"), cache=str(tmp / "cache"),
                             resolution=args.resolution, batch_size=args.batch, max_steps=args.steps + 1,
                             save_every=10_000, num_workers=2, seed=0)
        from ipadapter.train import feed as feed_module

        build = {}
        real_build = feed_module.prepare_cache

        def timed_prepare(*a, **k):
            s = time.perf_counter()
            out = real_build(*a, **k)
            build["s"] = time.perf_counter() - s
            return out

        def after_step(step, loss):  # interleaved: one plain step after each of the trainer's steps
            print(f"  cached step {step}: loss {loss:.4f}", flush=True)
            plain_loop.step()

        feed_module.prepare_cache = timed_prepare
        t0 = time.perf_counter()
        result = train(config, models=models, image_encoder=encoder, log_with=None, on_step=after_step)
        total = time.perf_counter() - t0
        feed_module.prepare_cache = real_build
        plain = plain_loop.times[1:]
        cached = result.step_times[1:]
        reader = CacheReader(tmp / "cache")
        per_sample_kb = reader.size_bytes / reader.index["rows"] / 1024

        plain_sps = args.batch / statistics.median(plain)
        cached_sps = args.batch / statistics.median(cached)
        build_per_sample = build["s"] / reader.index["rows"]
        # what the cache costs over a real run: the paper's 1M steps × 64 samples over 10M pairs ≈ 6.4 epochs
        epochs = 6.4
        amortised = 1 / (1 / cached_sps + build_per_sample / epochs)
        machine = inference.machine("cuda" if torch.cuda.is_available() else "cpu")
        enc = "ViT-B/16-shaped (86M)" if args.small_encoder else "ViT-H/14-shaped (632M)"
        print()
        print(f"machine: {machine}; torch {torch.__version__}, fp32")
        print(f"models: SD 1.5 UNet {counts['unet']:.0f}M, VAE {counts['vae']:.0f}M, CLIP-L-shaped text encoder "
              f"{counts['text encoder']:.0f}M, {enc} image encoder; random weights")
        print(f"setting: base adapter, {args.resolution} px ({args.resolution // 8}x{args.resolution // 8} latents), "
              f"batch {args.batch}, median of {args.steps} steps after 1 warm-up step, the two loops interleaved")
        print()
        print("| loop | s/step (median) | samples/s | ratio |")
        print("|---|---|---|---|")
        print(f"| plain (authors' method: all frozen encoders every step) | {statistics.median(plain):.2f} | "
              f"{plain_sps:.3f} | 1.00x |")
        print(f"| this trainer, feature cache | {statistics.median(cached):.2f} | {cached_sps:.3f} | "
              f"{cached_sps / plain_sps:.2f}x |")
        print(f"| this trainer, cache build amortised over {epochs} epochs (the paper's run) | – | {amortised:.3f} | "
              f"{amortised / plain_sps:.2f}x |")
        pairs = [p / c for p, c in zip(plain, cached)]  # step i of each ran back to back: same machine load
        print()
        print(f"ratio of interleaved step pairs: median {statistics.median(pairs):.2f}x, min {min(pairs):.2f}x, "
              f"max {max(pairs):.2f}x")
        print()
        print(f"cache: {per_sample_kb:.1f} KiB per sample on disk (fp16: VAE mean+std, 77x768 text embeddings, "
              f"1024-d image embedding); built once at {build_per_sample:.2f} s per sample")
        print("cached step times:", ", ".join(f"{t:.2f}" for t in result.step_times),
              "| plain step times:", ", ".join(f"{t:.2f}" for t in plain_loop.times), "(first of each = warm-up)")
        print(f"whole run (cache build + {args.steps + 1} steps of each, interleaved): {total:.0f} s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
