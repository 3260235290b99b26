"""Resumable generation: an interrupted run continues without redoing or losing samples."""

from __future__ import annotations

import dataclasses
import json
import types

import pytest
import torch
from PIL import Image

from ipadapter.errors import IPAdapterError
from ipadapter.evaluate.manifests import read_manifest, write_manifest
from ipadapter.evaluate.runner import Plan, base_modules, generate, jobs, sample_path, sample_seed, weights_digest
from tests import factories


class Crash(Exception):
    pass


class FakeSampler:
    """Solid images whose colour encodes the seed; counts calls and can crash after `crash_after` calls."""

    def __init__(self, crash_after: int | None = None) -> None:
        self.calls, self.seeds, self.crash_after = 0, [], crash_after

    def __call__(self, job, reference):
        if self.crash_after is not None and self.calls >= self.crash_after:
            raise Crash
        self.calls += 1
        self.seeds += [(job.scale, s) for s in job.seeds]
        return [Image.new("RGB", (8, 8), (s % 256, s // 256 % 256, 0)) for s in job.seeds]


@pytest.fixture
def entries(tmp_path):
    for i in range(3):
        factories.reference_image(i, size=16).save(tmp_path / f"r{i}.png")
    return read_manifest(write_manifest(tmp_path / "m.jsonl", [{"image_file": f"r{i}.png", "text": f"t{i}"}
                                                             for i in range(3)])).entries


PLAN = Plan(("m",), (0.5, 1.0), samples=2, seed=7, empty_prompt=True, settings={"steps": 2})


def _samples(out):
    return {p: p.stat().st_mtime_ns for p in (out / "samples").rglob("*.png")}


def test_interrupted_run_resumes_without_redoing_or_losing_samples(tmp_path, entries) -> None:
    out = tmp_path / "run"
    first = FakeSampler(crash_after=2)
    with pytest.raises(Crash):
        generate(PLAN, entries, out, first, progress=False)
    before = _samples(out)
    assert len(before) == 4 and first.calls == 2
    second = FakeSampler()
    assert generate(PLAN, entries, out, second, progress=False) == 8
    assert second.calls == 4 and not set(first.seeds) & set(second.seeds), "no sample generated twice"
    assert len(set(first.seeds) | set(second.seeds)) == 12
    after = _samples(out)
    assert len(after) == 12 and all(after[p] == t for p, t in before.items()), "finished samples untouched"
    for e in entries:
        for k in range(2):
            seed = 7 + e.index * 10_000 + k  # docs/evaluation.md: sample k of reference i, the same at every scale
            assert sample_seed(7, e.index, k) == seed
            assert Image.open(sample_path(out, "m", 1.0, e.index, k)).getpixel((0, 0))[:2] == (seed % 256, seed // 256)
    third = FakeSampler()
    assert generate(PLAN, entries, out, third, progress=False) == 0 and third.calls == 0


def test_a_partly_written_batch_regenerates_only_its_missing_sample(tmp_path, entries) -> None:
    out = tmp_path / "run"
    generate(PLAN, entries, out, FakeSampler(), progress=False)
    sample_path(out, "m", 0.5, 1, 1).unlink()
    (todo,) = jobs(PLAN, entries, out)
    assert todo.samples == (1,) and todo.seeds == (sample_seed(7, 1, 1),)
    again = FakeSampler()
    generate(PLAN, entries, out, again, progress=False)
    assert again.seeds == [(0.5, sample_seed(7, 1, 1))]


def test_more_samples_or_scales_extend_a_run_but_other_settings_are_refused(tmp_path, entries) -> None:
    out = tmp_path / "run"
    generate(PLAN, entries, out, FakeSampler(), progress=False)
    wider = Plan(("m",), (0.5, 1.0, 2.0), samples=3, seed=7, empty_prompt=True, settings={"steps": 2})
    extra = FakeSampler()
    generate(wider, entries, out, extra, progress=False)
    assert len(extra.seeds) == 3 * 3 * 3 - 12
    with pytest.raises(IPAdapterError, match="steps"):
        generate(Plan(("m",), (1.0,), 2, 7, True, {"steps": 5}), entries, out, FakeSampler(), progress=False)


def test_prompter_sampler_images_do_not_depend_on_their_batch(tmp_path) -> None:
    import numpy as np
    import torch

    from ipadapter import load_adapter
    from ipadapter.encoders import ImageEncoder
    from ipadapter.evaluate.manifests import Entry
    from ipadapter.evaluate.runner import Job, prompter_sampler
    from ipadapter.prompter import ImagePrompter

    pipe = factories.tiny_sd15_pipeline(tmp_path)
    torch.save(factories.published(pipe.unet, "base", factories.SD15_CROSS), tmp_path / "a.bin")
    encoder, processor = factories.tiny_image_encoder()
    prompter = ImagePrompter(pipe, load_adapter(tmp_path / "a.bin", pipe.unet), ImageEncoder(encoder, processor))
    sample = prompter_sampler(prompter, {"m": "0"}, steps=2, guidance=5.0, width=32, height=32)
    entry, ref = Entry(0, tmp_path / "r.png", "a cat"), factories.reference_image(0)
    both = sample(Job("m", entry, 0.7, "a cat", (0, 1), (5, 6)), ref)
    alone = sample(Job("m", entry, 0.7, "a cat", (1,), (6,)), ref)
    a, b = np.asarray(both[1], np.int16), np.asarray(alone[0], np.int16)
    assert np.abs(a - b).max() <= 1 and not np.array_equal(np.asarray(both[0]), np.asarray(both[1]))


def test_weights_digest_sees_every_value_or_the_documented_sample() -> None:
    """Whole: any changed value changes the digest. `per_tensor=4` of 10 values: the evenly spaced indices 0, 3, 6, 9
    (first and last included) are hashed, the others are not."""
    def module(values: list[float]) -> torch.nn.Module:
        m = torch.nn.Module()
        m.register_buffer("w", torch.tensor(values))
        return m

    base = [float(i) for i in range(10)]
    assert weights_digest([module(base)]) == weights_digest([module(list(base))])
    for i in range(10):
        changed = base[:i] + [base[i] + 0.5] + base[i + 1:]
        assert weights_digest([module(changed)]) != weights_digest([module(base)])
        sampled = weights_digest([module(changed)], per_tensor=4) != weights_digest([module(base)], per_tensor=4)
        assert sampled == (i in (0, 3, 6, 9)), i


def test_base_modules_add_the_image_encoder_once() -> None:
    unet, vae, encoder = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    pipe = types.SimpleNamespace(components={"unet": unet, "vae": vae, "scheduler": object(), "tokenizer": None})
    found = base_modules(types.SimpleNamespace(pipe=pipe, encoder=types.SimpleNamespace(model=encoder)))
    assert [id(m) for m in found] == [id(unet), id(vae), id(encoder)]
    pipe.components["image_encoder"] = encoder  # already a pipeline component: not twice
    found = base_modules(types.SimpleNamespace(pipe=pipe, encoder=types.SimpleNamespace(model=encoder)))
    assert [id(m) for m in found] == [id(unet), id(vae), id(encoder)]
    assert base_modules(types.SimpleNamespace(pipe=pipe, encoder=None)) == [unet, vae, encoder]


def test_prompts_progress_and_the_pinned_plan(tmp_path, entries) -> None:
    """`empty_prompt` gives every job the empty text (else the reference's caption); progress.json says done/total
    over all samples; a plan.json that lacks or adds a setting is another plan, refused by name."""
    prompts = []

    def sampler(job, reference):
        prompts.append(job.prompt)
        return FakeSampler()(job, reference)

    for plan, expected in ((PLAN, [""] * 6), (dataclasses.replace(PLAN, empty_prompt=False), ["t0", "t1", "t2"] * 2)):
        out = tmp_path / str(plan.empty_prompt)
        prompts.clear()
        generate(plan, entries, out, sampler, progress=False)
        assert sorted(prompts) == sorted(expected)
        progress = json.loads((out / "progress.json").read_text())
        assert (progress["total"], progress["done"]) == (12, 12)
    out = tmp_path / "True"
    pinned = json.loads((out / "plan.json").read_text())
    for changed in ({k: v for k, v in pinned.items() if k != "steps"}, {**pinned, "guidance": 5.0}):
        (out / "plan.json").write_text(json.dumps(changed))
        with pytest.raises(IPAdapterError, match=r"holds samples made with other settings \((steps|guidance)\)"):
            generate(PLAN, entries, out, FakeSampler(), progress=False)
