"""Each metric against its definition or an independent implementation, on small inputs and tiny random models."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ipadapter.errors import IPAdapterError
from ipadapter.evaluate import extractors, metrics
from ipadapter.evaluate.judges import ClipJudge, pooled
from tests import factories


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    return factories.save_judge(tmp_path_factory.mktemp("judge"))


def test_fid_of_a_set_with_itself_is_zero() -> None:
    features = np.random.default_rng(0).standard_normal((64, 8))
    assert metrics.fid(features, features) == pytest.approx(0.0, abs=1e-8)


def _trace_sqrt_product(s1: np.ndarray, s2: np.ndarray) -> float:
    """Tr((Σ1Σ2)^½) = Σ √λ(Σ1^½ Σ2 Σ1^½), computed with symmetric eigendecompositions only."""
    w, v = np.linalg.eigh(s1)
    root = v @ np.diag(np.sqrt(np.clip(w, 0, None))) @ v.T
    return float(np.sqrt(np.clip(np.linalg.eigvalsh(root @ s2 @ root), 0, None)).sum())


def test_frechet_distance_matches_direct_numpy_for_known_gaussians() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((5, 5)), rng.standard_normal((5, 5))
    s1, s2 = a @ a.T + 0.1 * np.eye(5), b @ b.T + 0.1 * np.eye(5)
    mu1, mu2 = rng.standard_normal(5), rng.standard_normal(5)
    direct = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * _trace_sqrt_product(s1, s2)
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(direct, rel=1e-6)
    # diagonal case, closed form: |Δμ|² + Σ (σ1 + σ2 − 2√(σ1σ2))
    d1, d2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    closed = 9.0 + np.sum(d1 + d2 - 2 * np.sqrt(d1 * d2))
    assert metrics.frechet_distance(np.array([3.0, 0, 0]), np.diag(d1), np.zeros(3), np.diag(d2)) == pytest.approx(closed)


def test_fid_uses_sample_mean_and_unbiased_covariance() -> None:
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((40, 3)), rng.standard_normal((30, 3)) * 2 + 1
    expected = metrics.frechet_distance(x.mean(0), np.cov(x.T), y.mean(0), np.cov(y.T))
    assert metrics.fid(x, y) == pytest.approx(expected)
    with pytest.raises(ValueError):
        metrics.fid(x[:1], y)


def test_a_product_without_a_square_root_gets_the_documented_ridge() -> None:
    """Σ1Σ2 nilpotent has no square root (scipy returns inf); with eps·I added to both the closed form is
    Tr((1+ε)[[ε, 1], [0, ε]])^½ = 2√(ε(1+ε)), so the distance is 0 + 1·0 + 2 − 4√(ε(1+ε))."""
    eps = 1e-6
    s1, s2 = np.array([[0.0, 1.0], [0.0, 0.0]]), np.eye(2)
    with warnings.catch_warnings():  # scipy may warn that the matrix is singular (older releases print it)
        warnings.simplefilter("ignore")
        value = metrics.frechet_distance(np.zeros(2), s1, np.zeros(2), s2, eps=eps)
    assert value == pytest.approx(2 - 4 * np.sqrt(eps * (1 + eps)), rel=1e-9)


def test_feature_statistics_need_two_rows_of_vectors_and_use_float64() -> None:
    for bad in (np.zeros(5), np.zeros((1, 3)), np.zeros((2, 3, 1))):
        with pytest.raises(ValueError, match="FID needs at least 2 feature vectors"):
            metrics.feature_statistics(bad)
    rng = np.random.default_rng(3)
    x = (1e4 + rng.standard_normal((50, 4))).astype(np.float32)  # float32 sums lose the small spread
    mean, cov = metrics.feature_statistics(x)
    exact = x.astype(np.float64)
    np.testing.assert_allclose(mean, exact.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(cov, np.cov(exact, rowvar=False), rtol=1e-9)
    assert metrics.feature_statistics(x[:2])[1].shape == (4, 4)


def test_clip_score_is_weighted_positive_part() -> None:
    cos = torch.tensor([-0.5, 0.0, 0.1, 0.4])
    assert torch.allclose(metrics.clip_score(cos), torch.tensor([0.0, 0.0, 0.25, 1.0]))


def test_clip_t_and_clip_i_equal_transformers_cosines(judge_dir) -> None:
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    judge = ClipJudge.load(judge_dir)
    images = [factories.reference_image(s) for s in range(4)]
    refs = [factories.reference_image(10), factories.reference_image(11)]
    texts = ["a red circle", "two blue squares"]
    model, tok = CLIPModel.from_pretrained(judge_dir).eval(), AutoTokenizer.from_pretrained(judge_dir)
    processor = CLIPImageProcessor.from_pretrained(judge_dir)
    with torch.no_grad():
        ids = tok(texts, padding=True, return_tensors="pt")
        text = pooled(model.get_text_features(**ids))
        image = pooled(model.get_image_features(pixel_values=processor(images=images, return_tensors="pt").pixel_values))
        ref = pooled(model.get_image_features(pixel_values=processor(images=refs, return_tensors="pt").pixel_values))
    expected_t = F.cosine_similarity(image, text.repeat_interleave(2, 0), dim=-1)
    expected_i = F.cosine_similarity(image, ref.repeat_interleave(2, 0), dim=-1)
    assert torch.allclose(metrics.clip_t(judge, images, texts, per_text=2), expected_t, atol=1e-5)
    assert torch.allclose(metrics.clip_i(judge, images, refs, per_reference=2), expected_i, atol=1e-5)
    assert torch.allclose(metrics.clip_i(judge, refs, refs), torch.ones(2), atol=1e-5)


def test_a_judge_that_is_not_a_clip_is_a_user_error(tmp_path) -> None:
    vision, _ = factories.tiny_image_encoder()
    vision.save_pretrained(tmp_path / "vision")
    with pytest.raises(IPAdapterError, match="must be a CLIP"):
        ClipJudge.load(tmp_path / "vision")
    with pytest.raises(IPAdapterError) as missing:
        ClipJudge.load(tmp_path / "nothing-here")
    assert str(missing.value) == (f"judge not found: {tmp_path / 'nothing-here'} (no such file or folder; a Hub model "
                                  "id has the form owner/name)")


def test_dino_i_is_the_cls_token_cosine(tmp_path) -> None:
    from transformers import Dinov2Model

    path = factories.save_dino(tmp_path / "dino")
    embed = extractors.dino_embedder(path)
    images = [factories.reference_image(s) for s in range(3)]
    model = Dinov2Model.from_pretrained(path).eval()
    pixels = extractors.normalized(images, 28, extractors.IMAGENET_MEAN, extractors.IMAGENET_STD)
    with torch.no_grad():
        cls = model(pixel_values=pixels).last_hidden_state[:, 0]
    expected = F.cosine_similarity(cls, cls[:1].expand(3, -1), dim=-1)
    assert torch.allclose(metrics.embedding_cosine(embed, images, images[:1], per_reference=3), expected, atol=1e-5)


def test_a_cosine_of_batches_of_different_shapes_is_refused_not_broadcast() -> None:
    """Three generations against one reference embedding without `per_reference=3` is a caller's mistake; broadcasting
    would score all three against the first reference without a word."""
    generated, reference = torch.randn(3, 8), torch.randn(1, 8)
    with pytest.raises(ValueError, match=r"\(3, 8\) and \(1, 8\)"):
        metrics.cosine(generated, reference)
    assert torch.allclose(metrics.cosine(generated, generated), torch.ones(3))


def test_missing_networks_are_reported_by_name(tmp_path) -> None:
    with pytest.raises(extractors.MetricUnavailable, match="dinov2"):
        extractors.dino_embedder(tmp_path / "no-dinov2")
    with pytest.raises(extractors.MetricUnavailable, match=extractors.INCEPTION_FILE):
        extractors.inception_features(tmp_path / "missing.pt")


class _FakeInception(torch.nn.Module):
    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return x.mean(dim=(2, 3)) if return_features else x.sum(dim=(1, 2, 3))


def test_inception_file_is_read_as_torchscript_with_return_features(tmp_path) -> None:
    path = tmp_path / extractors.INCEPTION_FILE
    torch.jit.script(_FakeInception()).save(str(path))
    features = extractors.inception_features(path)([factories.reference_image(0), factories.reference_image(1)])
    assert features.shape == (2, 3) and 0 <= features.min() and features.max() <= 255


def test_diversity_is_mean_pairwise_distance_averaged_over_references() -> None:
    groups = [[0.0, 1.0, 3.0], [2.0, 2.0], [5.0]]
    distance = lambda a, b: abs(a - b)  # noqa: E731
    assert metrics.diversity(groups, distance) == pytest.approx(np.mean([(1 + 3 + 2) / 3, 0.0]))
    assert metrics.diversity([[1.0]], distance) is None


def test_feature_distance_is_a_semimetric_on_images() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU())
    distance = extractors.feature_distance(net, size=16)
    a, b = factories.reference_image(0), factories.reference_image(1)
    assert distance(a, a) == pytest.approx(0.0, abs=1e-7)
    assert distance(a, b) == pytest.approx(distance(b, a), rel=1e-5) and distance(a, b) > 0


def test_lpips_absent_is_a_skip_message() -> None:
    try:
        import lpips  # noqa: F401
    except ImportError:
        with pytest.raises(extractors.MetricUnavailable, match="lpips"):
            extractors.lpips_distance()
    else:
        pytest.skip("lpips is installed")
