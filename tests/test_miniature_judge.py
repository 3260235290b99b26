"""The judge's attribute classifier as its recipe trains it: the degraded images it trains on, a killed run resuming to
the weights of an uninterrupted one, what it saves being what `Judge.load` reads back."""

from __future__ import annotations

import pytest
import torch

from ipadapter.miniature import judge, tiny_clip
from tests.killed_runs import assert_same_weights, kill_and_resume


def _upsample_2x(v: torch.Tensor) -> torch.Tensor:
    """Bilinear 2x upsampling on pixel centres written out: output pixel i reads the input at (i + 0.5) / 2 - 0.5,
    clamped to the image, along each axis in turn."""
    def along_last(a: torch.Tensor) -> torch.Tensor:
        n = a.shape[-1]
        s = ((torch.arange(2 * n, dtype=torch.float64) + 0.5) / 2 - 0.5).clamp(0, n - 1)
        lo = s.floor().long()
        hi = (lo + 1).clamp(max=n - 1)
        return a[..., lo] * (1 - (s - lo)) + a[..., hi] * (s - lo)

    return along_last(along_last(v).transpose(-1, -2)).transpose(-1, -2)


@pytest.mark.parametrize("degrade, share, std", [(judge._degrade, 0.5, 0.05), (tiny_clip.augment, 0.25, 0.02)],
                         ids=["judge", "clips"])
def test_a_blurred_training_image_is_its_2x2_average_upsampled_bilinearly_on_pixel_centres(degrade, share, std) -> None:
    """The judge (half its images blurred, noise 0.05) and the CLIPs (a quarter, 0.02): a blurred image is its 2x2
    block means spread back by bilinear interpolation between pixel centres (as PIL and the VAE's decoder place
    pixels); which images are blurred and the noise come from the generator in that order."""
    g = torch.Generator().manual_seed(5)
    x = torch.rand(64, 3, 8, 8, generator=g, dtype=torch.float64)
    out = degrade(x, torch.Generator().manual_seed(1))
    again = torch.Generator().manual_seed(1)
    pick = (torch.rand(64, 1, 1, 1, generator=again) < share).double()
    noise = torch.randn(x.shape, generator=again, dtype=torch.float32).double()
    means = x.reshape(64, 3, 4, 2, 4, 2).mean(dim=(3, 5))
    expected = pick * _upsample_2x(means) + (1 - pick) * x + std * noise
    assert 0 < pick.sum() < 64
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_a_killed_classifier_run_resumes_to_the_uninterrupted_weights(tmp_path, monkeypatch, every_step_checkpoints):
    torch.manual_seed(0)

    def run(out, resume):
        return judge.train_classifier(out, steps=4, batch=4, resume=resume)

    def checkpointed_two_steps(cut):
        assert torch.load(cut / "classifier.ckpt.pt", weights_only=True)["step"] == 2

    whole, resumed, drawn = kill_and_resume(run, judge, "make_batch", tmp_path, monkeypatch,
                                            after_kill=checkpointed_two_steps)
    assert drawn == 2 and "resumed from" in (tmp_path / "cut" / "classifier.log").read_text()
    assert_same_weights(whole, resumed)
    log = (tmp_path / "cut" / "classifier.log").read_text()
    parameters = sum(p.numel() for p in whole.parameters())
    assert f"classifier: {parameters} parameters" in log
    assert f"classifier: saved to {tmp_path / 'cut' / 'judge'} (final loss " in log


def test_the_saved_classifier_reads_back_as_the_judge_that_predicts_as_it_does(tmp_path, monkeypatch) -> None:
    from ipadapter.miniature.world import make_batch

    torch.manual_seed(0)
    model = judge.train_classifier(tmp_path, steps=2, batch=4)
    monkeypatch.setattr(judge.ClipJudge, "load", classmethod(lambda cls, *a, **k: None))  # the classifier alone
    loaded = judge.Judge.load(tmp_path / "judge")
    images, _ = make_batch(7, 6, "heldout")
    pixels = judge.tiny_clip.pixels(judge.to_uint8(images))
    with torch.no_grad():
        expected = {n: logits.argmax(dim=1) for n, logits in model.eval()(pixels).items()}
    predicted = loaded.predict(images)
    for name, values in judge.ATTRIBUTES.items():
        assert [p[name] for p in predicted] == [values[i] for i in expected[name].tolist()], name
    assert loaded.classifier.width == model.width == 32


def test_images_of_any_form_become_64px_uint8_the_way_pil_would_make_them() -> None:
    """PIL images of any mode and size, arrays of another size, floats in [0, 1] (clipped, rounded to the nearest
    level) all give [N, 64, 64, 3] uint8; an image already at 64 px comes back unchanged."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)
    exact = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    resized = np.asarray(Image.fromarray(small).resize((64, 64), Image.BICUBIC))
    grey = Image.fromarray(exact[..., 0], mode="L")
    got = judge.to_uint8([Image.fromarray(small), grey, exact])
    assert got.dtype == np.uint8 and got.shape == (3, 64, 64, 3)
    assert np.array_equal(got[0], resized)
    assert np.array_equal(got[1], np.repeat(exact[..., :1], 3, axis=-1))
    assert np.array_equal(got[2], exact)
    assert np.array_equal(judge.to_uint8(np.stack([small, small])), np.stack([resized, resized]))
    floats = np.array([-0.5, 0.0, 0.5 / 255, 0.49 / 255, 0.5, 1.0, 2.0], np.float32)
    batch = np.broadcast_to(floats[:, None, None, None], (7, 64, 64, 3))
    assert judge.to_uint8(batch)[:, 0, 0, 0].tolist() == [0, 0, 1, 0, 128, 255, 255]
    assert np.array_equal(judge.to_uint8(batch), judge.to_uint8(list(batch)))


def test_the_judge_reads_its_clip_from_the_folder_given_else_beside_the_classifier(tmp_path, monkeypatch) -> None:
    torch.manual_seed(0)
    judge.train_classifier(tmp_path, steps=1, batch=2)
    loads = []
    monkeypatch.setattr(judge.ClipJudge, "load", classmethod(lambda cls, where, **kw: loads.append((where, kw))))
    judge.Judge.load(tmp_path / "judge")
    judge.Judge.load(tmp_path / "judge", clip_dir=tmp_path / "elsewhere")
    assert [where for where, _ in loads] == [tmp_path / "judge" / "clip", tmp_path / "elsewhere"]
    expected = judge.tiny_clip.image_processor()
    for _, kwargs in loads:
        assert kwargs["processor"].to_dict() == expected.to_dict()


def test_the_judge_recipe_trains_both_models_and_reports_held_out_accuracy(tmp_path, monkeypatch) -> None:
    """`train_judge`: the judge CLIP at its own size for the steps given, the classifier for three times as many, then
    the classifier's accuracy on 2,048 held-out scenes, returned and written to judge_eval.json. The scenes are drawn
    once (a second identical draw took a second): a call with the same arguments gets a copy of the same batch."""
    import json

    from transformers import CLIPConfig

    drawn: dict[tuple, tuple] = {}
    real = judge.make_batch

    def make_batch(*args):
        if args not in drawn:
            drawn[args] = real(*args)
        images, attrs = drawn[args]
        return images.copy(), list(attrs)

    monkeypatch.setattr(judge, "make_batch", make_batch)
    torch.manual_seed(0)
    report = judge.train_judge(tmp_path, steps=1)
    config = CLIPConfig.from_pretrained(tmp_path / "judge_clip")
    size = judge.JUDGE_CLIP_SIZE
    assert (config.text_config.hidden_size, config.text_config.num_hidden_layers, config.projection_dim) == (
        size.hidden, size.layers, size.projection)
    assert "classifier step 3/3 " in (tmp_path / "classifier.log").read_text()
    saved = json.loads((tmp_path / "judge_eval.json").read_text())
    assert saved == {"heldout_n": 2048, "accuracy": report}
    images, attrs = make_batch(12345, 2048, "heldout")
    loaded = judge.Judge.load(tmp_path / "judge", clip_dir=tmp_path / "judge_clip")
    assert report == loaded.accuracy(images, attrs)
    assert set(report) == {*judge.ATTRIBUTES, "all"}


def test_the_shipped_judge_reads_scenes_drawn_by_the_world() -> None:
    """The yardstick of every report: on held-out scenes drawn exactly by the world, the bundled classifier reads every
    attribute at least 95% of the time (docs/miniature.md: 100% on 512 plain scenes)."""
    from ipadapter import bundled
    from ipadapter.miniature.world import make_batch

    images, attrs = make_batch(4242, 128, "heldout")
    accuracy = judge.Judge(judge.Judge.load(bundled.JUDGE_DIR).classifier, clip=None).accuracy(images, attrs)
    assert all(accuracy[name] >= 0.95 for name in judge.ATTRIBUTES), accuracy


def test_the_shipped_classifier_is_four_conv_blocks_then_a_relu_layer_then_one_head_per_attribute() -> None:
    """The docstring's architecture written out with functional ops on the shipped weights: four blocks of a 3x3
    stride-2 convolution, batch norm on its running statistics and a ReLU, then a ReLU layer of 256 on the flattened
    4x4 map, then a linear head per attribute."""
    import torch.nn.functional as F
    from safetensors.torch import load_file

    from ipadapter import bundled
    from ipadapter.miniature.world import ATTRIBUTES, make_batch

    w = {k: v.float() for k, v in load_file(bundled.JUDGE_DIR / judge.CLASSIFIER_WEIGHTS).items()}
    images, _ = make_batch(21, 6, "heldout")
    h = tiny_clip.pixels(images)
    for block in range(4):
        conv, norm = f"features.{3 * block}", f"features.{3 * block + 1}"
        h = F.conv2d(h, w[f"{conv}.weight"], w[f"{conv}.bias"], stride=2, padding=1)
        h = F.batch_norm(h, w[f"{norm}.running_mean"], w[f"{norm}.running_var"], w[f"{norm}.weight"],
                         w[f"{norm}.bias"], training=False, eps=1e-5)
        h = F.relu(h)
    assert h.shape[1:] == (128, 4, 4)
    h = F.relu(F.linear(h.flatten(1), w["features.13.weight"], w["features.13.bias"]))
    model = judge.Judge.load(bundled.JUDGE_DIR).classifier
    with torch.no_grad():
        logits = model(tiny_clip.pixels(images))
    for name in ATTRIBUTES:
        expected = F.linear(h, w[f"heads.{name}.weight"], w[f"heads.{name}.bias"])
        torch.testing.assert_close(logits[name], expected, rtol=1e-4, atol=1e-4)
