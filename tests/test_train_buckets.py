"""Aspect-ratio buckets (SDXL's size/crop conditioning follows the bucket) and resolution stages, on tiny models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from ipadapter.train import TrainConfig, step, train, trainer
from ipadapter.train.buckets import bucket_sizes, grouped_order, nearest_bucket
from ipadapter.train.model_folder import read_losses
from ipadapter.errors import FieldError
from ipadapter.train.stages import run_losses, run_stages, stage_configs
from tests import factories


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def test_bucket_sizes_are_valid_and_cover_the_ratios() -> None:
    buckets = bucket_sizes(64, 8)
    assert (64, 64) in buckets
    for h, w in buckets:
        assert h % 8 == 0 and w % 8 == 0 and h * w <= 64 * 64 and 0.5 <= w / h <= 2
    assert bucket_sizes(16, 4) == [(20, 12), (16, 16), (12, 20)]  # 12·20 = 240 ≤ 256; 8·24 is 3:1, too narrow
    assert nearest_bucket((20, 40), bucket_sizes(16, 4)) == (12, 20)
    assert nearest_bucket((40, 21), bucket_sizes(16, 4)) == (20, 12)
    assert nearest_bucket((30, 31), bucket_sizes(16, 4)) == (16, 16)


@pytest.mark.parametrize("resolution, multiple", [(512, 64), (768, 64), (1024, 64), (1024, 16), (64, 8)])
def test_buckets_treat_portrait_and_landscape_alike(resolution: int, multiple: int) -> None:
    """Every bucket is within the area and the 1:2..2:1 ratios; no landscape size of the largest height for its
    width is missing; and the set is closed under transposition, so a portrait image gets the mirror of the bucket
    its landscape transpose gets."""
    buckets = bucket_sizes(resolution, multiple)
    area = resolution * resolution
    for h, w in buckets:
        assert h % multiple == 0 and w % multiple == 0 and h * w <= area and 0.5 <= w / h <= 2
    for width in range(resolution, 2 * resolution + 1, multiple):
        height = max(h for h in range(multiple, width + 1, multiple) if h * width <= area)
        assert ((height, width) in buckets) == (width <= 2 * height)
    assert {(w, h) for h, w in buckets} == set(buckets)
    for size in [(300, 700), (512, 1024), (999, 1001), (400, 1500)]:
        h, w = nearest_bucket(size, buckets)
        assert nearest_bucket(size[::-1], buckets) == (w, h)


def test_sdxl_buckets_reach_two_to_one_both_ways() -> None:
    buckets = bucket_sizes(1024, 64)
    assert buckets[0] == (1408, 704) and buckets[-1] == (704, 1408)  # 704 · 1408 ≤ 1024², exactly 1:2 and 2:1
    assert (1280, 768) in buckets and (768, 1280) in buckets


def test_grouped_order_gives_batches_of_one_group() -> None:
    groups = [0, 1, 0, 1, 2, 0, 1, 0, 1, 2]
    order = grouped_order(list(range(10)), groups, 2, torch.Generator().manual_seed(0))
    assert sorted(order) == list(range(10))
    full = [order[i : i + 2] for i in range(0, 8, 2)]  # 4 full pairs (0,0),(0,0),(1,1),(1,1); the 2-group last
    assert all(groups[a] == groups[b] for a, b in full)


def _mixed(folder, sizes):
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (w, h) in enumerate(sizes):
        Image.new("RGB", (w, h), factories.COLOURS[i % 6]).save(folder / f"m{i}.png")
        lines.append({"image_file": f"m{i}.png", "text": f"a {factories.WORDS[i % 6]} picture"})
    (folder / "m.jsonl").write_text("\n".join(json.dumps(l) for l in lines) + "\n")
    return folder / "m.jsonl"


def expected_time_ids(original: tuple[int, int], bucket: tuple[int, int]) -> list[float]:
    """Cover the bucket, centre crop: SDXL's (orig h, orig w, crop top, crop left, target h, target w)."""
    (h, w), (th, tw) = original, bucket
    scale = max(th / h, tw / w)
    nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
    return [h, w, (nh - th) // 2, (nw - tw) // 2, th, tw]


# (width, height): four images for each of the three buckets of 16 px, interleaved. Two epochs of six batches of
# two: an order that ignored the buckets would pair images of one bucket throughout with probability (27/10395)².
BUCKETED = [(40, 20), (20, 40), (24, 24), (42, 22), (22, 42), (30, 28), (44, 21), (21, 44), (26, 25), (38, 20),
            (20, 38), (27, 29)]


def test_sdxl_batches_are_bucketed_with_their_size_conditioning(tmp_path, monkeypatch) -> None:
    manifest = _mixed(tmp_path / "data", BUCKETED)
    seen = []
    forward = trainer.TrainModule.forward

    def recording(self, noisy, timesteps, text, feats, added=None):
        seen.append((tuple(noisy.shape[-2:]), added["time_ids"].tolist()))
        return forward(self, noisy, timesteps, text, feats, added)

    monkeypatch.setattr(trainer.TrainModule, "forward", recording)
    models, encoder = factories.in_memory(sdxl=True)
    config = TrainConfig(data=str(manifest), output=str(tmp_path / "out"), resolution=factories.RES, batch_size=2,
                         max_steps=12, num_workers=0, save_every=1000, buckets=True, seed=0)
    result = train(config, models=models, image_encoder=encoder, log_with=None)
    assert result.step == 12 and all(math.isfinite(v) for v in result.losses)
    buckets = bucket_sizes(factories.RES, 4)
    latent_sizes = set()
    for latent, time_ids in seen:
        bucket = (latent[0] * 2, latent[1] * 2)  # the tiny VAE halves each side
        latent_sizes.add(bucket)
        for row in time_ids:
            original = (int(row[0]), int(row[1]))
            assert nearest_bucket(original, buckets) == bucket  # every sample of a batch is of the batch's bucket
            assert row == expected_time_ids(original, bucket)
    assert latent_sizes == set(buckets)


def test_buckets_keep_exact_resume(tmp_path) -> None:
    from safetensors.torch import load_file

    manifest = _mixed(tmp_path / "data", [(40, 20), (20, 40), (24, 24), (42, 22), (22, 42), (30, 28)])
    models, encoder = factories.in_memory()
    options = dict(data=str(manifest), resolution=factories.RES, batch_size=2, max_steps=4, num_workers=0,
                   save_every=2, buckets=True, seed=0, learning_rate=1e-3)
    full = train(TrainConfig(output=str(tmp_path / "a"), **options), models=models, image_encoder=encoder,
                 log_with=None)

    class Killed(Exception):
        pass

    def stop(s, loss):
        if s == 3:
            raise Killed

    config = TrainConfig(output=str(tmp_path / "b"), **options)
    with pytest.raises(Killed):
        train(config, models=models, image_encoder=encoder, log_with=None, on_step=stop)
    resumed = train(config.replace(resume="latest"), models=models, image_encoder=encoder, log_with=None)
    a, b = load_file(str(full.published)), load_file(str(resumed.published))
    assert all(torch.equal(a[k], b[k]) for k in a) and full.losses[2:] == resumed.losses


def test_stages_run_in_order_from_the_previous_stage(tmp_path, monkeypatch) -> None:
    manifest = factories.write_images(tmp_path / "data", 4, size=(28, 28))
    sizes = []
    real = step.step_inputs

    def recording(run, batch):
        out = real(run, batch)
        sizes.append(run.config.resolution)
        assert out[0].shape[-1] == run.config.resolution // 2
        return out

    monkeypatch.setattr(step, "step_inputs", recording)
    models, encoder = factories.in_memory()
    config = TrainConfig(data=str(manifest), output=str(tmp_path / "out"), batch_size=2, num_workers=0,
                         save_every=1000, stages=["16:2", "24:1"], seed=0)
    result = train(config, models=models, image_encoder=encoder, log_with=None)
    assert sizes == [16, 16, 24]
    out = tmp_path / "out"
    assert (result.step, result.output, result.published) == (1, out, out / "ip-adapter.safetensors")
    first, second = out / "stages" / "1-16px", out / "stages" / "2-24px"
    assert json.loads((second / "config.json").read_text())["init_from"] == str(first / "adapter.ipadapter.safetensors")
    assert (out / "ip-adapter.safetensors").read_bytes() == (second / "ip-adapter.safetensors").read_bytes()
    assert json.loads((out / "config.json").read_text())["stages"] == ["16:2", "24:1"]
    assert "| 1 | 16 px | 2 | `stages/1-16px/` |\n| 2 | 24 px | 1 | `stages/2-24px/` |" in (out / "README.md").read_text()
    assert run_losses(stage_configs(config)) == [*read_losses(first), *((2 + s, v) for s, v in read_losses(second))]
    assert [s for s, _ in run_losses(stage_configs(config))] == [1, 2, 3]

    # finished stages are not run again; the result still names the finished folder
    sizes.clear()
    again = train(config.replace(resume="latest"), models=models, image_encoder=encoder, log_with=None)
    assert sizes == []
    assert (again.step, again.output, again.published, again.own) == (
        1, out, out / "ip-adapter.safetensors", out / "adapter.ipadapter.safetensors")


def test_an_unfit_later_stage_is_refused_before_the_first_trains(tmp_path) -> None:
    """The tiny base takes multiples of 4 (VAE and UNet each halve): 18 px in the second stage stops the run before the
    16 px stage spends its steps, naming the entry."""
    trained = []
    models, encoder = factories.in_memory()
    config = TrainConfig(data=str(tmp_path / "none.jsonl"), output=str(tmp_path / "out"), stages=["16:2", "18:1"])
    with pytest.raises(FieldError, match=r"^stages entry 18:1: resolution 18 does not fit this base model.*try 16 "
                                         r"or 20$"):
        run_stages(config, lambda stage, **kw: trained.append(stage), models=models, image_encoder=encoder)
    assert trained == [] and not (tmp_path / "out").exists()


def test_the_last_stage_is_copied_whole_or_not_at_all(tmp_path, monkeypatch) -> None:
    """Copying the last stage's files to the output is atomic: a copy that fails midway leaves the earlier file."""
    import shutil

    from ipadapter.train import stages

    out, last = tmp_path / "out", tmp_path / "out" / "stages" / "1-16px"
    last.mkdir(parents=True)
    (last / "adapter.ipadapter.safetensors").write_bytes(b"new adapter")
    (out / "adapter.ipadapter.safetensors").write_bytes(b"old adapter")

    def failing_copy(source, target):
        Path(target).write_bytes(b"new")
        raise OSError("No space left on device")

    monkeypatch.setattr(shutil, "copyfile", failing_copy)
    config = TrainConfig(data="unused", output=str(out), stages=["16:1"], resume="latest")
    with pytest.raises(OSError, match="No space"):
        stages.run_stages(config, lambda stage, **kwargs: None)
    assert (out / "adapter.ipadapter.safetensors").read_bytes() == b"old adapter"
    assert sorted(p.name for p in out.iterdir()) == ["adapter.ipadapter.safetensors", "stages"]


def test_a_stage_killed_midway_resumes_to_the_uninterrupted_run(tmp_path, monkeypatch) -> None:
    """Three stages, killed in the second: `--resume latest` skips the first, continues the second from its
    checkpoint and runs the third, to the bytes of an uninterrupted run. A finished run's command again without
    `--resume` is refused, as a plain run's is, rather than silently keeping the earlier run's stages."""
    from safetensors.torch import load_file

    from ipadapter import IPAdapterError

    manifest = factories.write_images(tmp_path / "data", 4, size=(28, 28))
    sizes = []
    real = step.step_inputs
    monkeypatch.setattr(step, "step_inputs", lambda run, batch: sizes.append(run.config.resolution) or real(run, batch))
    models, encoder = factories.in_memory()
    options = dict(data=str(manifest), batch_size=2, num_workers=0, save_every=1, stages=["16:1", "24:3", "16:1"],
                   seed=0, learning_rate=1e-3)
    train(TrainConfig(output=str(tmp_path / "a"), **options), models=models, image_encoder=encoder, log_with=None)

    class Killed(Exception):
        pass

    calls = []

    def stop(s, loss):
        calls.append(s)
        if len(calls) == 3:  # stage 2, after step 2 and its checkpoint: step 3 is left
            raise Killed

    config = TrainConfig(output=str(tmp_path / "b"), **options)
    with pytest.raises(Killed):
        train(config, models=models, image_encoder=encoder, log_with=None, on_step=stop)
    sizes.clear()
    train(config.replace(resume="latest"), models=models, image_encoder=encoder, log_with=None)
    assert sizes == [24, 16]
    a, b = tmp_path / "a", tmp_path / "b"
    for folder in ("1-16px", "2-24px", "3-16px"):
        assert json.loads((b / "stages" / folder / "config.json").read_text())["stages"] == []
    assert json.loads((b / "stages" / "3-16px" / "config.json").read_text())["init_from"] == str(
        b / "stages" / "2-24px" / "adapter.ipadapter.safetensors")
    final, uninterrupted = load_file(str(b / "ip-adapter.safetensors")), load_file(str(a / "ip-adapter.safetensors"))
    assert all(torch.equal(final[k], uninterrupted[k]) for k in uninterrupted)
    assert (b / "ip-adapter.safetensors").read_bytes() == (b / "stages" / "3-16px" / "ip-adapter.safetensors").read_bytes()
    with pytest.raises(IPAdapterError, match="already holds a staged training run.*--resume latest"):
        train(TrainConfig(output=str(a), **options), models=models, image_encoder=encoder, log_with=None)


def test_each_stage_caches_its_own_resolution(tmp_path) -> None:
    """A cache holds one resolution, so `--cache c` with stages builds `c-16px` and `c-24px`, each of its stage's
    latent size."""
    from ipadapter.train.cache import CacheReader

    manifest = factories.write_images(tmp_path / "data", 4, size=(28, 28))
    models, encoder = factories.in_memory()
    cache = tmp_path / "c"
    config = TrainConfig(data=str(manifest), output=str(tmp_path / "out"), batch_size=2, num_workers=0,
                         save_every=1000, stages=["16:1", "24:1"], seed=0, cache=str(cache))
    train(config, models=models, image_encoder=encoder, log_with=None)
    for i, resolution in enumerate((16, 24), start=1):
        stage = json.loads((tmp_path / "out" / "stages" / f"{i}-{resolution}px" / "config.json").read_text())
        assert stage["cache"] == f"{cache}-{resolution}px"
        reader = CacheReader(stage["cache"])
        assert reader(reader.records()[0])["latent_mean"].shape[-1] == resolution // 2  # the tiny VAE halves
    assert not cache.exists()


def test_bad_stage_and_buckets_with_cache_are_refused() -> None:
    from ipadapter import IPAdapterError

    with pytest.raises(IPAdapterError, match="stages must be RESOLUTION:STEPS.*'512x100'"):
        TrainConfig(stages=["512x100"])
    with pytest.raises(IPAdapterError, match="buckets cannot be used with a feature cache"):
        TrainConfig(buckets=True, cache="c")
