"""Optional measuring networks (DINOv2, Inception-v3, LPIPS, ArcFace), each found locally or reported as missing.

A missing network raises `MetricUnavailable` with the file or model it needs; the run skips that metric, says why
in the report, and computes the others. Nothing here downloads.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ipadapter.errors import IPAdapterError, first_clause
from ipadapter.evaluate.metrics import EmbedFn

DINO_DEFAULT = "facebook/dinov2-base"
INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_SIZE = 299
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FeatureFn = Callable[[Sequence[Image.Image]], np.ndarray]
Distance = Callable[[Image.Image, Image.Image], float]


class MetricUnavailable(Exception):
    """A metric's network is not installed; the message names what to install or where to put which file."""


def dino_embedder(source: str | os.PathLike = DINO_DEFAULT, device: str = "cpu") -> EmbedFn:
    """DINO-I features: the CLS token of `Dinov2Model.last_hidden_state`, from a local folder or the HF cache."""
    from transformers import AutoImageProcessor, Dinov2Model

    try:
        model = Dinov2Model.from_pretrained(str(source), local_files_only=True).to(device).eval()
    except (OSError, ValueError):
        raise MetricUnavailable(
            f"DINO-I needs the DINOv2 model {source} (Dinov2Model) in a local folder or the Hugging Face cache; "
            "download it once (hf download facebook/dinov2-base) or give dino=FOLDER"
        ) from None
    try:
        processor = AutoImageProcessor.from_pretrained(str(source), local_files_only=True)
    except (OSError, ValueError):
        processor = None

    @torch.no_grad()
    def embed(images: Sequence[Image.Image]) -> torch.Tensor:
        rgb = [im.convert("RGB") for im in images]
        if processor is not None:
            pixels = processor(images=rgb, return_tensors="pt").pixel_values
        else:
            pixels = normalized(rgb, model.config.image_size, IMAGENET_MEAN, IMAGENET_STD)
        return model(pixel_values=pixels.to(device)).last_hidden_state[:, 0].float().cpu()

    return embed


def normalized(images: Sequence[Image.Image], size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Bicubic resize to size×size, [0, 1], per-channel normalisation → [N, 3, size, size]."""
    arrays = [np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC), np.float32) / 255.0 for im in images]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def inception_candidates(path: str | os.PathLike | None) -> list[Path]:
    if path:
        return [Path(path)]
    home = Path.home() / ".cache"
    return [home / "ipadapter" / INCEPTION_FILE, home / "torch" / "hub" / "checkpoints" / INCEPTION_FILE]


def inception_features(path: str | os.PathLike | None = None, device: str = "cpu", batch: int = 32) -> FeatureFn:
    """FID features: 2048-d pool features of the TensorFlow FID Inception-v3 (2015-12-05), as a TorchScript file.

    The file is NVIDIA's TorchScript port used by StyleGAN2-ADA/StyleGAN3 and clean-fid: it takes [N, 3, 299, 299]
    floats in [0, 255] and `return_features=True` gives the pool3 features. No torchvision needed.
    """
    found = next((p for p in inception_candidates(path) if p.is_file()), None)
    if found is None:
        raise MetricUnavailable(
            f"FID needs the Inception-v3 TorchScript file {INCEPTION_FILE} (StyleGAN2-ADA metrics); put it at "
            f"{inception_candidates(None)[0]} or give inception=FILE"
        )
    try:
        model = torch.jit.load(str(found), map_location=device).eval()
    except RuntimeError as err:
        raise IPAdapterError(f"{found} is not a TorchScript Inception model: {first_clause(str(err))}") from None

    @torch.no_grad()
    def features(images: Sequence[Image.Image]) -> np.ndarray:
        out = []
        for i in range(0, len(images), batch):
            arrays = [np.asarray(im.convert("RGB").resize((INCEPTION_SIZE,) * 2, Image.BICUBIC), np.float32)
                      for im in images[i : i + batch]]
            x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).to(device)
            out.append(model(x, return_features=True).float().cpu().numpy())
        return np.concatenate(out)

    return features


def lpips_distance(device: str = "cpu") -> Distance:
    """LPIPS (AlexNet) from the `lpips` package, on images scaled to [-1, 1]."""
    try:
        import lpips
    except ImportError:
        raise MetricUnavailable("LPIPS diversity needs the lpips package (pip install lpips) and its AlexNet weights") \
            from None
    try:
        net = lpips.LPIPS(net="alex", verbose=False).to(device).eval()
    except Exception as err:  # noqa: BLE001 - lpips fetches torchvision weights; any failure means "not available"
        raise MetricUnavailable(
            f"LPIPS could not load its AlexNet weights ({type(err).__name__}); run it once online to cache them"
        ) from None

    def to_tensor(image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
        x = torch.from_numpy(np.asarray(image.convert("RGB").resize(size, Image.BICUBIC), np.float32) / 127.5 - 1)
        return x.permute(2, 0, 1)[None].to(device)

    @torch.no_grad()
    def distance(a: Image.Image, b: Image.Image) -> float:
        return float(net(to_tensor(a, a.size), to_tensor(b, a.size)).item())

    return distance


def arcface_embedder() -> EmbedFn:
    """ArcFace (insightface buffalo_l) normed embeddings; an image with no face gives a NaN row, dropped later."""
    from ipadapter.encoders import FaceAnalyzer

    try:
        analyzer = FaceAnalyzer()
    except IPAdapterError as err:
        raise MetricUnavailable(f"face-ID cosine: {err}") from None

    def embed(images: Sequence[Image.Image]) -> torch.Tensor:
        rows = []
        for image in images:
            try:
                rows.append(analyzer.analyze(image)[0])
            except IPAdapterError:
                rows.append(torch.full((1, 512), float("nan")))
        return torch.cat(rows)

    return embed


def feature_distance(network: Callable[[torch.Tensor], torch.Tensor], size: int) -> Distance:
    """A distance from any feature network: mean squared difference of unit-normalised feature maps (LPIPS-like,
    without the learned per-channel weights) on images resized to `size` — for tests and for runs that inject their
    own network."""

    @torch.no_grad()
    def distance(a: Image.Image, b: Image.Image) -> float:
        x = normalized([a, b], size, (0.5,) * 3, (0.5,) * 3)
        fa, fb = F.normalize(network(x), dim=1).unbind(0)
        return float(((fa - fb) ** 2).sum(dim=0).mean())

    return distance
