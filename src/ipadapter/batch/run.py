"""Generate a manifest's jobs into a folder: batched UNet calls, atomic files, resumable, one share per process.

Layout of the output folder (docs/scale.md):
  <id>-<k>.png      image k of a job (seed + k), written atomically
  .records/<key>.json  the job's record, written after its PNGs: a job is finished when its record and PNGs exist
  index.jsonl       one line per finished job of the manifest (manifest order), rewritten at the end of each run
  errors.jsonl      the jobs of this run that failed, with their one-line reason
  run.json          the model settings the images were made with; a run with other settings is refused
The unit of work is a batch (`jobs.batches`): a batch with an unfinished job is generated whole, so a resumed run
makes the bytes an uninterrupted one would have, and no process count changes which rows share a UNet call.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ipadapter.atomic import save_pngs, write_text
from ipadapter.batch.jobs import Failure, Job, Manifest, batches
from ipadapter.batch.shards import Progress, Shard, fresh_progress_folder
from ipadapter.errors import IPAdapterError
from ipadapter.paired_text import PairedText
from ipadapter.request import build_prompt, load_request
from ipadapter.runtime import AdapterPrompt

RECORDS, PROGRESS = ".records", ".progress"


@dataclass(frozen=True)
class Defaults:
    """What a job leaves to the model: its default steps and guidance, extra pipeline arguments (ControlNet), and the
    text model that embeds content words (the run's `--content-text-encoder`; default: the one `run_manifest` finds
    once for the whole run)."""

    steps: int | None = None
    guidance: float | None = None
    pipe_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    content_text: Callable[[str], torch.Tensor] | None = None  # a job's content words → their embedding


def merge(prompts: list[dict[str, AdapterPrompt]]) -> dict[str, AdapterPrompt]:
    """The prompts of several jobs of one group as one, each reference's tokens stacked one row per job (the layout
    `Reference` documents: R = number of prompts in the batch)."""
    if not prompts[0]:
        return {}
    ((name, first),) = prompts[0].items()
    if any(len(p[name].references) != len(first.references) for p in prompts):
        raise RuntimeError("jobs of one group must have as many references each")
    references = []
    for i, ref in enumerate(first.references):
        rows = [p[name].references[i] for p in prompts]
        uncond = None if ref.uncond is None else torch.cat([r.uncond for r in rows])
        references.append(dataclasses.replace(ref, cond=torch.cat([r.cond for r in rows]), uncond=uncond))
    return {name: dataclasses.replace(first, references=references)}


def generate_batch(prompter: Any, batch: list[Job], defaults: Defaults) -> tuple[dict[str, list], list[Failure]]:
    """Images per job id for the jobs of one batch that could be prepared, and the failures of the others
    (`defaults.content_text` set: `run_manifest` fills it in)."""
    kept, prompts, failures = [], [], []
    for job in batch:
        try:
            request = load_request(job.settings)
            if job.settings["content_subtract"]:
                request.content_text_embeds = defaults.content_text(job.settings["content_subtract"])
            # A text-only job prompts no adapter, so it names none even when several are attached.
            prompts.append(build_prompt(prompter, request, adapter=job.adapter) if request.images else {})
            kept.append(job)
        except IPAdapterError as err:
            failures.append(Failure(job.line, job.id, str(err)))
    if not kept:
        return {}, failures
    s = kept[0].settings
    negatives = [j.settings["negative_prompt"] for j in kept]
    generators = [torch.Generator("cpu").manual_seed(seed) for j in kept for seed in j.seeds]
    try:
        images = prompter.generate(
            merge(prompts), prompt=[j.settings["prompt"] for j in kept],
            negative_prompt=negatives if any(negatives) else "", num_images=s["num_images"],
            steps=s["steps"] or defaults.steps, guidance=s["guidance"] if s["guidance"] is not None else defaults.guidance,
            width=s["width"], height=s["height"], generator=generators, **defaults.pipe_kwargs,
        )
    except IPAdapterError as err:
        return {}, failures + [Failure(j.line, j.id, str(err)) for j in kept]
    n = s["num_images"]
    return {j.id: images[i * n : (i + 1) * n] for i, j in enumerate(kept)}, failures


def finished(out: Path, job: Job) -> bool:
    return (out / RECORDS / f"{job.key}.json").is_file() and all((out / f).is_file() for f in job.files)


def remove_partial_files(out: Path) -> None:
    """Temporary files a killed process left beside its targets (`ipadapter.atomic` names them .<name>.tmp-<pid>)."""
    for folder in (out, out / RECORDS):
        for path in folder.glob(".*.tmp-*"):
            path.unlink(missing_ok=True)


def pin(out: Path, settings: dict, shard: Shard) -> None:
    """Refuse a folder whose images were made with other model settings; record them in a new one."""
    path = out / "run.json"
    settings = json.loads(json.dumps(settings))
    if path.is_file():
        before = json.loads(path.read_text(encoding="utf-8"))
        changed = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
        if changed:
            raise IPAdapterError(f"{out} holds images made with other settings ({', '.join(changed)}); "
                                 "use another --out-dir or remove it")
    elif shard.is_main:
        write_text(path, json.dumps(settings, indent=2) + "\n")


def write_jsonl(path: Path, records: list[dict]) -> None:
    write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def run_manifest(prompter: Any, manifest: Manifest, out: Path, *, batch_size: int, shard: Shard,
                 defaults: Defaults, settings: dict) -> list[Failure]:
    """Generate this process's share of the unfinished batches; the main process then writes index.jsonl and
    errors.jsonl for the whole run. Returns every failure of the run (the same list on every process)."""
    if defaults.content_text is None:
        defaults = dataclasses.replace(defaults, content_text=PairedText(prompter.pipe, prompter.encoder))
    out.mkdir(parents=True, exist_ok=True)
    shard.agree(lambda: pin(out, settings, shard))
    total = sum(len(j.files) for j in manifest.jobs)
    done = sum(len(j.files) for j in manifest.jobs if finished(out, j))  # counted before any process writes
    if shard.is_main:
        remove_partial_files(out)
    fresh_progress_folder(out / PROGRESS, shard)
    shard.wait()
    plan = batches(manifest.jobs, batch_size)
    progress = Progress(out / PROGRESS, shard, total, done, "generating")
    failures: list[Failure] = []
    for batch in shard.mine(plan):
        todo = [j for j in batch if not finished(out, j)]
        if not todo:
            continue
        start = time.perf_counter()
        images, failed = generate_batch(prompter, batch, defaults)
        seconds = (time.perf_counter() - start) / max(1, sum(len(v) for v in images.values()))
        failures += [f for f in failed if f.id in {j.id for j in todo}]
        for job in todo:
            if job.id not in images:
                continue
            save_pngs(images[job.id], [out / f for f in job.files])
            record = {"id": job.id, "key": job.key, "adapter": job.adapter, "seeds": job.seeds, "files": job.files,
                      "settings": job.settings, "seconds_per_image": round(seconds, 4), "batch": len(images)}
            write_text(out / RECORDS / f"{job.key}.json", json.dumps(record))
            progress.advance(len(job.files))
    everything = sorted([*manifest.failures, *(Failure(**r) for r in shard.gather([f.record() for f in failures]))],
                        key=lambda f: f.line)
    if shard.is_main:
        index = []
        for job in manifest.jobs:
            if finished(out, job):
                record = json.loads((out / RECORDS / f"{job.key}.json").read_text(encoding="utf-8"))
                index.append({"line": job.line, **record})
        write_jsonl(out / "index.jsonl", index)
        write_jsonl(out / "errors.jsonl", [f.record() for f in everything])
        progress.close(sum(len(r["files"]) for r in index))
    else:
        progress.close()
    shard.wait()
    return everything
