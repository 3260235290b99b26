"""The miniature IP-Adapters: each one `ipadapter train` run on the frozen miniature pipeline, as a table.

All three see the same 16,384 training scenes (seed 100, four in five captions partial) and the same recipe
(batch 32, AdamW 5e-4 after 100 warm-up steps, offset noise 0.2 as the UNet was trained with, the paper's 5/5/5%
condition dropout, the loss weighted by min-SNR-5, an EMA of the weights, 0.999, which is what is saved); they differ
only in what the table says. `simple` is the paper's "simple adapter" ablation: the same projection as `base`, its
tokens concatenated to the text tokens of the frozen cross-attention (`attention="concat"`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ipadapter.errors import IPAdapterError
from ipadapter import bundled
from ipadapter.miniature.runloop import log, size_mb

DATA_SEED, DATA_SIZE = 100, 16384
# Four in five captions name a random subset of the slots (one in 64 of those nothing): with full captions the text
# alone explains the target and an adapter learns to carry little.
PARTIAL_CAPTIONS = 0.8


@dataclass(frozen=True)
class AdapterRecipe:
    variant: str
    steps: int
    attention: str = "decoupled"

    @property
    def features(self) -> str:
        from ipadapter.variants import get_variant

        return get_variant(self.variant).features


# The shipped steps (v4): the learning rate is constant after warm-up, so one run follows the schedule of the shipped
# ones (6,000 steps, resumed to 12,000; Plus then 8,000 more from its weights). Position is the slot that comes last
# (Plus: 16% at 6,000 steps, 93% at 12,000, 100% at 20,000).
ADAPTERS: dict[str, AdapterRecipe] = {
    "base": AdapterRecipe("base", 12000),
    "plus": AdapterRecipe("plus", 20000),
    "simple": AdapterRecipe("base", 12000, attention="concat"),
}


def training_config(out: Path, name: str, steps: int | None = None, resume: bool = False):
    """The `TrainConfig` of one shipped adapter; `ipadapter train` with these fields rebuilds it."""
    from ipadapter.train import TrainConfig

    recipe = ADAPTERS[name]
    pipeline = out / "pipeline"
    return TrainConfig(
        base=str(pipeline), image_encoder=str(pipeline / "image_encoder"),
        data=str(out / "adapter_data" / "manifest.jsonl"), variant=recipe.variant, attention=recipe.attention,
        output=str(out / f"adapter-{name}"), max_steps=steps or recipe.steps, batch_size=32, resolution=64,
        learning_rate=5e-4, warmup_steps=100, noise_offset=0.2, snr_gamma=5.0, ema_decay=0.999, seed=0,
        cache=str(out / f"adapter_cache_{'plus' if recipe.features == 'patch' else 'base'}"),
        num_workers=1, save_every=500, log_every=50, resume="latest" if resume else "",
    ).validate()


def train_adapter(out: Path, name: str, steps: int | None = None, resume: bool = False) -> Path:
    """Write the training scenes once, then train; returns the adapter in the project's own format."""
    from ipadapter.miniature.world import write_dataset
    from ipadapter.train import train

    if not (out / "pipeline" / "model_index.json").is_file():
        raise IPAdapterError(f"{out / 'pipeline'} is missing; run `ipadapter miniature train unet` first.")
    manifest = out / "adapter_data" / "manifest.jsonl"
    if not manifest.is_file():
        write_dataset(out / "adapter_data", DATA_SIZE, DATA_SEED, partial=PARTIAL_CAPTIONS)
    result = train(training_config(out, name, steps, resume))
    log.info("adapter %s: %s", name, result.own)
    return Path(result.own)


def export_adapters(out: Path, assets_dir: Path = bundled.ASSETS_DIR) -> dict[str, float]:
    """fp16 copies of the trained adapters (own format, metadata kept) into the package; returns sizes in MB."""
    from safetensors import safe_open

    from ipadapter.atomic import save_safetensors

    sizes = {}
    for name in ADAPTERS:
        source = out / f"adapter-{name}" / "adapter.ipadapter.safetensors"
        if not source.is_file():
            log.info("adapter %s not trained (%s missing); not exported", name, source)
            continue
        with safe_open(source, framework="pt") as f:
            # the shipped file names its models relative to the package, not to the run folder it was trained in
            meta = {**(f.metadata() or {}), "encoder": "miniature/pipeline/image_encoder", "base": "miniature/pipeline"}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        target = assets_dir / "adapters" / f"{name}.safetensors"
        target.parent.mkdir(parents=True, exist_ok=True)
        save_safetensors({k: v.to(torch.float16) for k, v in tensors.items()}, target, meta)
        sizes[name] = size_mb(target)
    return sizes
