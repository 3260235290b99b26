"""Seeded, batched, resumable generation over references × methods × scales × samples.

Every sample has its own seed (`sample_seed`), so an image does not depend on which others shared its batch: a
rerun generates exactly the missing samples and gets the images an uninterrupted run would have. Samples are
written atomically to DIR/samples/<method>/scale-<s>/<ref>-<k>.png; a PNG on disk is a finished sample.
DIR/plan.json pins the settings that define the images (with digests of the adapters' and the base models' weights:
a file retrained under the same path is another model), so a resumed run cannot mix two models' samples.
Under `accelerate launch` each process generates the (method, scale, reference) cells at its positions modulo the
process count (`ipadapter.batch.shards`); the seeds are the cell's, so any process count makes the same images.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ipadapter.atomic import save_png
from ipadapter.batch.shards import Progress, Shard, fresh_progress_folder
from ipadapter.errors import IPAdapterError
from ipadapter.evaluate.files import slug, write_json
from ipadapter.evaluate.manifests import Entry

log = logging.getLogger(__name__)
SEED_STRIDE = 10_000  # sample k of reference i uses seed + i·SEED_STRIDE + k (the same seeds at every scale)


@dataclass(frozen=True)
class Job:
    """The missing samples of one (method, reference, scale): one batched generator call."""

    method: str
    entry: Entry
    scale: float
    prompt: str
    samples: tuple[int, ...]
    seeds: tuple[int, ...]


# (job, reference image) -> one image per seed, in order.
SampleFn = Callable[[Job, Image.Image], list[Image.Image]]


@dataclass(frozen=True)
class Plan:
    """`settings` are what makes the images (models, steps, guidance, size, seed, prompt mode): pinned on disk."""

    methods: tuple[str, ...]
    scales: tuple[float, ...]
    samples: int
    seed: int
    empty_prompt: bool
    settings: dict

    def pinned(self) -> dict:
        """As JSON reads it back (tuples become lists), so a rerun compares equal."""
        return json.loads(json.dumps({**self.settings, "seed": self.seed, "empty_prompt": self.empty_prompt}))


def weights_digest(modules: Sequence[torch.nn.Module], per_tensor: int | None = None) -> str:
    """A hash of the modules' weights (names, shapes and bytes): adapters are small, so hashing all of them costs
    milliseconds. `per_tensor`: only that many evenly spaced values of each tensor, for base models of gigabytes
    (retraining or fine-tuning a tensor changes nearly every value, so a sample is enough to notice)."""
    h = hashlib.sha256()
    for module in modules:
        for name, tensor in sorted(module.state_dict().items()):
            flat = tensor.detach().reshape(-1)  # 0-dim too
            if per_tensor is not None and flat.numel() > per_tensor:
                flat = flat[torch.linspace(0, flat.numel() - 1, per_tensor, device=flat.device).long()]
            h.update(f"{name}{tuple(tensor.shape)}".encode())
            h.update(flat.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def base_modules(prompter) -> list[torch.nn.Module]:
    """Every model that draws the images besides the adapters: the pipeline's components (UNet or transformer, VAE,
    text encoders, ControlNet) and the adapters' image encoder."""
    found = [m for m in prompter.pipe.components.values() if isinstance(m, torch.nn.Module)]
    encoder = getattr(prompter.encoder, "model", None)
    if isinstance(encoder, torch.nn.Module) and all(encoder is not m for m in found):
        found.append(encoder)
    return found


def sample_seed(seed: int, ref_index: int, sample: int) -> int:
    return seed + ref_index * SEED_STRIDE + sample


def sample_path(out: Path, method: str, scale: float, ref_index: int, sample: int) -> Path:
    return out / "samples" / slug(method) / f"scale-{scale:g}" / f"{ref_index:05d}-{sample:02d}.png"


def jobs(plan: Plan, entries: Sequence[Entry], out: Path, shard: Shard | None = None) -> list[Job]:
    """What is still missing of `shard`'s cells (default: all), grouped per (method, reference, scale)."""
    cells = [(method, scale, entry) for method in plan.methods for scale in plan.scales for entry in entries]
    todo = []
    for method, scale, entry in (shard or Shard()).mine(cells):
        missing = tuple(k for k in range(plan.samples) if not sample_path(out, method, scale, entry.index, k).is_file())
        if missing:
            todo.append(Job(method, entry, scale, "" if plan.empty_prompt else entry.text, missing,
                            tuple(sample_seed(plan.seed, entry.index, k) for k in missing)))
    return todo


def pin(plan: Plan, out: Path, write: bool = True) -> None:
    """Record the plan's settings (when `write`), or check they equal those of the samples already in `out`. A plan
    beside no sample pins nothing (a run that failed before its first sample): it is replaced, so a corrected rerun
    into the same folder is not refused."""
    path = out / "plan.json"
    if path.is_file() and any((out / "samples").rglob("*.png")):
        before = json.loads(path.read_text(encoding="utf-8"))
        changed = sorted(k for k in set(before) | set(plan.pinned()) if before.get(k) != plan.pinned().get(k))
        if changed:
            raise IPAdapterError(
                f"{out} holds samples made with other settings ({', '.join(changed)}); use another output folder or remove it"
            )
    elif write:
        write_json(path, plan.pinned())


def generate(plan: Plan, entries: Sequence[Entry], out: Path, sample: SampleFn, progress: bool = True,
             shard: Shard | None = None) -> int:
    """Generate every missing sample of `shard`'s share (default: all); returns how many this process generated.
    Safe to interrupt at any point. Only the main process shows progress (the overall count) and writes the plan."""
    shard = shard or Shard()
    out.mkdir(parents=True, exist_ok=True)
    shard.agree(lambda: pin(plan, out, write=shard.is_main))
    total = len(plan.methods) * len(plan.scales) * len(entries) * plan.samples
    remaining = sum(len(j.samples) for j in jobs(plan, entries, out))  # counted before any process writes
    fresh_progress_folder(out / ".progress", shard)
    shard.wait()
    log.info("%d of %d samples to generate (%d already on disk)", remaining, total, total - remaining)
    bar = Progress(out / ".progress", shard, total, total - remaining, "generating", show=progress)
    done = 0
    try:  # the bar is closed before an error is printed, so the error is the last line
        for job in jobs(plan, entries, out, shard):
            images = sample(job, job.entry.image())
            if len(images) != len(job.seeds):
                raise RuntimeError(f"the sampler returned {len(images)} images for {len(job.seeds)} seeds")
            for k, image in zip(job.samples, images):
                save_png(image, sample_path(out, job.method, job.scale, job.entry.index, k))
            done += len(images)
            bar.advance(len(images))
            if shard.is_main:
                write_json(out / "progress.json", {"total": total, "done": bar.done, "time": time.time()})
    finally:
        bar.close()
    return done


def prompter_sampler(prompter, adapters: dict[str, str], *, steps: int | None, guidance: float | None,
                     width: int | None = None, height: int | None = None) -> SampleFn:
    """Image-prompted generation with an `ImagePrompter`: one call per job, one seeded generator per sample."""
    from ipadapter.request import GenerationRequest, build_prompt

    def sample(job: Job, reference: Image.Image) -> list[Image.Image]:
        request = GenerationRequest(images=[reference], scale=job.scale)
        prompts = build_prompt(prompter, request, adapter=adapters[job.method])
        generators = [torch.Generator("cpu").manual_seed(s) for s in job.seeds]
        return prompter.generate(prompts, prompt=job.prompt, num_images=len(job.seeds), steps=steps,
                                 guidance=guidance, width=width, height=height, generator=generators)

    return sample


def load_samples(plan: Plan, entry: Entry, method: str, scale: float, out: Path) -> list[Image.Image]:
    return [Image.open(sample_path(out, method, scale, entry.index, k)).convert("RGB") for k in range(plan.samples)]
