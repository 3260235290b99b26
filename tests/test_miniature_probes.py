"""The miniature stage probes: linear probes read exactly what the features carry, and caption retrieval through
another image encoder measures the same thing as through the CLIP's own tower when that encoder is the tower."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ipadapter.miniature import probes, tiny_clip
from ipadapter.miniature import tokenizer as tok
from ipadapter.miniature.world import ATTRIBUTES, SLOTS, caption, make_batch


def test_linear_probe_reads_each_attribute_from_its_own_features() -> None:
    """Features that are the one-hot shape label and noise: shape is read perfectly, the rest near chance."""
    torch.manual_seed(0)

    def features(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        _, attrs = make_batch(seed, n)
        y = tiny_clip.labels(attrs)
        x = torch.cat([torch.nn.functional.one_hot(y[:, 0], len(ATTRIBUTES["shape"])).float(),
                       torch.randn(n, 4)], dim=1)
        return x, y

    report = probes.linear_probe(*features(600, 1), *features(300, 2), iters=200)
    assert report["shape"] == 1.0
    assert all(report[a] < 0.5 for a in ("colour", "position", "bg_colour"))


def test_told_apart_through_an_encoder_equal_to_the_clip_tower_equals_the_clip(tmp_path) -> None:
    from transformers import CLIPModel

    torch.manual_seed(0)
    clip = CLIPModel(tiny_clip.clip_config(tiny_clip.ClipSize(hidden=32, layers=1, heads=2, projection=16))).eval()
    tokenizer = tok.load_tokenizer(tok.save_tokenizer(tmp_path / "tokenizer"))
    own = probes.text_told_apart(clip, tokenizer, n=12)
    through = probes.text_told_apart(clip, tokenizer, n=12, image_encoder=tiny_clip.vision_tower(clip).eval())
    assert own == through and set(own) == set(ATTRIBUTES)
    other = tiny_clip.vision_tower(clip).eval()
    torch.nn.init.normal_(other.visual_projection.weight)
    assert probes.text_told_apart(clip, tokenizer, n=12, image_encoder=other) != own


class OneHotText:
    """A text encoder whose state at each position is the one-hot vector of the token there."""

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab

    def __call__(self, input_ids: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(last_hidden_state=F.one_hot(input_ids, self.vocab).float())


def test_one_changed_word_moves_one_hot_states_by_root_two_over_root_length(tmp_path) -> None:
    """A full caption fills all 16 positions, each a unit vector: the state's norm is 4, and a slot of one word
    changed to another word differs at one position by two unit vectors, root 2 apart."""
    tokenizer = tok.load_tokenizer(tok.save_tokenizer(tmp_path))
    report = probes.text_state_gap(OneHotText(tok.vocab_size()), tokenizer, n=5)
    assert list(report) == list(SLOTS)
    for slot in ("shape", "colour", "size", "bg_colour"):
        assert report[slot] == pytest.approx(math.sqrt(2) / math.sqrt(tok.MAX_LENGTH))
    assert report["position"] > report["shape"] and report["pattern"] > report["shape"]


def test_image_features_in_batches_are_the_encoders_own_outputs() -> None:
    from transformers import CLIPVisionModelWithProjection

    torch.manual_seed(0)
    size = tiny_clip.ClipSize(hidden=32, layers=2, heads=2, projection=16)
    encoder = CLIPVisionModelWithProjection(tiny_clip.vision_config(size, patch=16)).eval()
    images, _ = make_batch(3, 5)
    globals_, patches = probes.image_features(encoder, images, batch=2)
    with torch.no_grad():
        out = encoder(pixel_values=tiny_clip.pixels(images), output_hidden_states=True)
    torch.testing.assert_close(globals_, out.image_embeds)
    torch.testing.assert_close(patches, out.hidden_states[1].reshape(5, -1))
    assert patches.shape == (5, 17 * 32)


class IdentityVae:
    def encode(self, x: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=x, sample=lambda: x + 1))

    def decode(self, z: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(sample=z * 1.5)


class RecordingJudge:
    """Records what it was shown; predicts the slots in `right` as `truth` has them and every other slot wrong."""

    def __init__(self, truth: list = (), right: frozenset[str] = frozenset(ATTRIBUTES)) -> None:
        self.truth, self.right, self.seen = truth, right, []

    def accuracy(self, images, attrs) -> dict[str, float]:
        self.seen.append((images, attrs))
        return {"shape": 0.5}

    def predict(self, images) -> list[dict[str, str]]:
        self.seen.append(images)
        return [dict.fromkeys(ATTRIBUTES, "wrong") | {s: getattr(a, s) for s in self.right} for a in self.truth]


def test_the_vae_ceiling_judges_decoded_latent_means_of_held_out_scenes() -> None:
    """Decoded pixels are clamped to [-1, 1] and rounded back to 8 bits; batches of 128 join in order."""
    judge = RecordingJudge()
    assert probes.vae_ceiling(IdentityVae(), judge, n=130) == {"shape": 0.5}
    (pixels, attrs), = judge.seen
    images, truth = make_batch(2027, 130, "heldout")
    assert attrs == truth and pixels.dtype == np.uint8 and pixels.shape == images.shape
    x = images.astype(np.float64) / 127.5 - 1
    expected = np.floor((np.clip(1.5 * x, -1, 1) + 1) * 127.5 + 0.5)
    assert np.abs(pixels - expected).max() <= 1 and (pixels == expected).mean() > 0.99


def test_partial_accuracy_counts_only_the_samples_whose_caption_named_the_slot() -> None:
    _, attrs = make_batch(4, 4, "heldout")
    judge = RecordingJudge(attrs, right=frozenset({"shape", "colour"}))
    keeps = [frozenset({"shape", "size"}), frozenset({"shape"}), frozenset({"colour", "size"}), frozenset({"size"})]
    report = probes.partial_accuracy(judge, "images", attrs, keeps)
    assert report == {"shape": 1.0, "colour": 1.0, "size": 0.0, "position": None, "bg_colour": None,
                      "pattern": None}
    assert judge.seen == ["images"]


@pytest.mark.parametrize("partial", [False, True])
def test_text_only_samples_captions_of_held_out_scenes(monkeypatch, partial) -> None:
    """Full captions name every slot; partial ones a non-empty subset, scored on what each names."""
    from ipadapter.miniature import base_model

    calls = []

    def sample(pipe, captions, **kwargs):
        calls.append((pipe, captions, kwargs))
        return "images"

    monkeypatch.setattr(base_model, "sample", sample)
    judge = RecordingJudge(make_batch(31, 24, "heldout")[1])
    report = probes.base_text_only("pipe", judge, n=24, partial=partial, seed=31, steps=7, guidance=2.5)
    (pipe, captions, kwargs), = calls
    assert pipe == "pipe" and kwargs == {"seed": 31, "steps": 7, "guidance": 2.5} and judge.seen == ["images"]
    full = [caption(a) for a in judge.truth]
    if not partial:
        assert captions == full and report == dict.fromkeys(SLOTS, 1.0)
        return
    assert all(c and c != f for c, f in zip(captions, full))
    named = {"colour": [], "size": [], "bg_colour": []}
    for a, text in zip(judge.truth, captions):
        obj, _, background = text.partition("on a ")
        named["colour"].append(f" {a.colour} " in f" {obj}")
        named["size"].append(f" {a.size} " in f" {obj}")
        named["bg_colour"].append(background.startswith(a.bg_colour))
    assert all(any(v) and not all(v) for v in named.values())
    assert all(report[s] == 1.0 for s in named)
    probes.base_text_only("pipe", judge, n=24, partial=True, seed=31, steps=7, guidance=2.5)
    assert calls[1][1] == captions, "the same seed leaves out the same slots"


def test_encoder_probes_train_on_the_documented_train_scenes_and_test_on_held_out_ones(monkeypatch) -> None:
    """The module's docstring names the scenes; each of the two feature kinds gets its own probe of `iters` steps."""
    batches, probed = [], []
    real_batch = probes.make_batch

    def make_batch(seed, n, split):
        batches.append((seed, n, split))
        return real_batch(seed, 4, split)

    def image_features(encoder, images):
        """Features that say which call made them: the first 1 and -2, the second 2 and -3."""
        assert encoder == "encoder" and images.shape == (4, 64, 64, 3)
        probed.append(images)
        return torch.full((4, 2), float(len(probed))), torch.full((4, 3), -1.0 - len(probed))

    monkeypatch.setattr(probes, "make_batch", make_batch)
    monkeypatch.setattr(probes, "image_features", image_features)
    monkeypatch.setattr(probes, "linear_probe", lambda *args: args)
    report = probes.encoder_probes("encoder")
    assert batches == [(2024, 3072, "train"), (2025, 1024, "heldout")]
    train_labels = tiny_clip.labels(real_batch(2024, 4, "train")[1])
    test_labels = tiny_clip.labels(real_batch(2025, 4, "heldout")[1])
    (train_g, ytr, test_g, yte, iters), patch = report["global"], report["patch"]
    assert set(report) == {"global", "patch"} and iters == patch[4] == 300
    assert torch.equal(ytr, train_labels) and torch.equal(yte, test_labels)
    assert torch.equal(patch[1], train_labels) and torch.equal(patch[3], test_labels)
    assert train_g.shape == (4, 2) and patch[0].shape == (4, 3) and train_g[0, 0] == 1 and test_g[0, 0] == 2
    assert patch[0][0, 0] == -2 and patch[2][0, 0] == -3
    assert np.array_equal(probed[0], real_batch(2024, 4, "train")[0])
    assert np.array_equal(probed[1], real_batch(2025, 4, "heldout")[0])
    assert probes.encoder_probes("encoder", n_train=4, n_test=4, iters=9)["patch"][4] == 9


def test_a_probe_reads_the_same_from_features_shifted_and_scaled_per_column() -> None:
    """Features are standardised with the training set's per-column mean and spread, so any affine change of a
    column (here scales from 1e-3 to 1e3 and offsets of 50 times the scale, the test set moved with the training set)
    leaves every probe's accuracy as it was, up to a sample (of 200) on which float32 rounding tips a near tie."""
    torch.manual_seed(0)

    def features(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        _, attrs = make_batch(seed, n)
        y = tiny_clip.labels(attrs)
        signal = torch.cat([F.one_hot(y[:, 0], 6), F.one_hot(y[:, 1], 8)], dim=1).float()
        return signal + 0.5 * torch.randn(n, 14), y

    train, test = features(400, 1), features(200, 2)
    plain = probes.linear_probe(train[0], train[1], test[0], test[1], iters=60)
    scale = torch.logspace(-3, 3, 14)
    moved = probes.linear_probe((train[0] + 50) * scale, train[1], (test[0] + 50) * scale, test[1], iters=60)
    assert all(abs(moved[a] - plain[a]) <= 1 / 200 + 1e-6 for a in ATTRIBUTES)
    assert 0.6 < plain["shape"] < 1 and 0.6 < plain["colour"] < 1


def test_text_only_by_default_samples_the_documented_full_captions(monkeypatch) -> None:
    """The module's docstring: 64 full captions of `make_batch(778, 64, "heldout")`, 25 steps, guidance 5."""
    from ipadapter.miniature import base_model

    calls = []
    monkeypatch.setattr(base_model, "sample", lambda pipe, captions, **kwargs: calls.append((captions, kwargs)))
    judge = RecordingJudge(make_batch(778, 64, "heldout")[1])
    assert probes.base_text_only("pipe", judge) == dict.fromkeys(SLOTS, 1.0)
    (captions, kwargs), = calls
    assert captions == [caption(a) for a in judge.truth] and kwargs == {"seed": 778, "steps": 25, "guidance": 5.0}
