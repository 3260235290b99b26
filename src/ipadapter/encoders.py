"""Image encoders: CLIP vision (global embeddings or penultimate patch features) and face identity (ArcFace).

The unconditional input of each kind (docs/checkpoints.md §4) depends only on the encoder, so it is computed once and kept.
"""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ipadapter import clip_file
from ipadapter.embed_cache import EmbeddingCache, image_key
from ipadapter.errors import IPAdapterError, first_clause
from ipadapter.sources import ENCODERS_BY_WIDTH, VIT_BIGG, VIT_H, from_cache_or_hub

_ENCODER_NAMES = {VIT_H: "ViT-H/14", VIT_BIGG: "ViT-bigG/14"}  # h94's, named by the width (ENCODERS_BY_WIDTH)
_NPY_MAGIC = b"\x93NUMPY"


def _describe(dim: int, kind: str) -> str:
    name = _ENCODER_NAMES.get(ENCODERS_BY_WIDTH.get((kind, dim)))
    if name and kind == "global":  # the embeddings are OpenCLIP's projection
        name = f"OpenCLIP {name}"
    return f"{dim}-d{f' ({name})' if name else ''}"


def _where(source: str | os.PathLike, subfolder: str | None) -> str:
    return f"{source}{'/' + subfolder if subfolder else ''}"


def clip_tower_config(
    config_class: type, source: str | os.PathLike, subfolder: str | None, local_files_only: bool,
) -> Any:
    """One CLIP tower's config (`CLIPVisionConfig` or `CLIPTextConfig`), also from a whole `CLIPModel` folder or
    repository. Its projection width is then the model's top-level `projection_dim`: the tower's own section may leave
    it out or hold transformers' default, and a projection of that width would be refused or drawn at random.
    ValueError for a diffusers model's config (callers name the source)."""
    found, _ = config_class.get_config_dict(str(source), subfolder=subfolder or "", local_files_only=local_files_only)
    if "_class_name" in found:  # a diffusers model's (a UNet's): read as a CLIP config, it fails on its fields
        raise ValueError(f"its config is a {found['_class_name']}'s, not a CLIP model's")
    if found.get("model_type") != "clip":
        return config_class.from_dict(found)
    tower = dict(found.get(config_class.base_config_key) or {})
    tower["projection_dim"] = found.get("projection_dim", tower.get("projection_dim"))
    return config_class(**tower)


def _processor(source: str | os.PathLike, subfolder: str | None, image_size: int | None, local: bool) -> object:
    """`ImageEncoder.load_processor` reading from disk only when `local`; the libraries' errors as they raise them."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig

    kwargs = {"subfolder": subfolder} if subfolder else {}
    try:
        return CLIPImageProcessor.from_pretrained(str(source), local_files_only=local, **kwargs)
    except (OSError, ValueError):
        pass
    if image_size is None:
        folder = Path(source, subfolder or "")
        if folder.is_dir() and not (folder / "config.json").is_file():  # transformers would make up a 224 px one
            raise IPAdapterError(f"could not read the CLIP vision config of {_where(source, subfolder)}: "
                                 "the folder has no config.json")
        image_size = CLIPVisionConfig.from_pretrained(str(source), local_files_only=local, **kwargs).image_size
    return _clip_processor(image_size)


def _clip_processor(image_size: int) -> object:
    """CLIP's own preprocessing at the encoder's size: shortest side → size (bicubic), centre crop, CLIP mean/std."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})


class _LastLayerInput(Exception):
    """Carries the last encoder layer's input out of the forward pass, which then stops: that layer need not run."""


def penultimate_hidden_states(model: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """What `model(pixels, output_hidden_states=True).hidden_states[-2]` is (the input of the encoder's last layer),
    without running that layer or keeping every layer's output (33 of them for ViT-H: 43 MB an image in fp32, held
    until the forward returns). Models without one `encoder.layers` list take the long way."""
    found = [m for name, m in model.named_modules() if name.endswith("encoder.layers")]
    if len(found) != 1 or not isinstance(found[0], torch.nn.ModuleList) or not len(found[0]):
        return model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    caller = threading.get_ident()  # another thread running the same model meanwhile is left alone

    def stop(_: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if threading.get_ident() == caller:
            raise _LastLayerInput(args[0] if args else kwargs["hidden_states"])

    handle = found[0][-1].register_forward_pre_hook(stop, with_kwargs=True)
    try:
        model(pixel_values=pixels)
    except _LastLayerInput as stopped:
        return stopped.args[0]
    finally:
        handle.remove()
    raise RuntimeError(f"{type(model).__name__} returned without running its last encoder layer")


class ImageEncoder:
    """A `CLIPVisionModelWithProjection` with its own image processor."""

    def __init__(self, model: torch.nn.Module, processor: object, name: str = "", cache: EmbeddingCache | None = None) -> None:
        self.model = model.eval().requires_grad_(False)
        self.processor = processor
        self.name = name or getattr(model.config, "_name_or_path", "") or "clip-vision"
        self.cache = cache if cache is not None else EmbeddingCache()
        self._uncond_patches: dict[tuple, torch.Tensor] = {}
        from ipadapter.conditioning.embeds_file import EncoderIdentity

        ident = EncoderIdentity.of(self.model, self.name)
        self._identity = f"{ident.name}#{ident.config_hash}"  # once: hashing the config takes ~44 µs

    @classmethod
    def from_pretrained(
        cls, source: str | os.PathLike, *, subfolder: str | None = None, device: str | torch.device = "cpu",
        dtype: torch.dtype | str = torch.float32,
    ) -> "ImageEncoder":
        """CLIP vision weights and their processor (`from_cache_or_hub`), or one `.safetensors` file as ComfyUI keeps
        it (clip_file.py); `dtype="auto"` keeps the checkpoint's own dtype."""
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        if Path(source).is_file() and not subfolder:
            model = clip_file.load_model(source, dtype)
            return cls(model.to(device), _clip_processor(model.config.image_size), name=str(source))
        kwargs = {"subfolder": subfolder} if subfolder else {}

        def read(local: bool) -> tuple[Any, dict, object]:
            model, info = CLIPVisionModelWithProjection.from_pretrained(
                str(source), config=clip_tower_config(CLIPVisionConfig, source, subfolder, local), dtype=dtype,
                output_loading_info=True, local_files_only=local, **kwargs)
            return model, info, _processor(source, subfolder, model.config.image_size, local)

        try:
            model, info, processor = from_cache_or_hub(read, str(source), "the image encoder", subfolder=subfolder)
        except (OSError, ValueError, RuntimeError) as err:
            reason = ("its weights do not fit a CLIP vision model (a text encoder?)" if isinstance(err, RuntimeError)
                      else first_clause(str(err)))
            raise IPAdapterError(
                f"could not load a CLIP vision encoder from {_where(source, subfolder)} (not found offline, or not a "
                f"CLIP vision model): {reason}"
            ) from None
        missing = info.get("missing_keys") or []
        if missing:
            raise IPAdapterError(
                f"{_where(source, subfolder)} is not a CLIP vision encoder: {len(missing)} of its weights are missing "
                f"(e.g. {sorted(missing)[0]}); give a CLIPVisionModelWithProjection folder or Hub id"
            )
        return cls(model.to(device), processor, name=_where(source, subfolder))

    @staticmethod
    def load_processor(
        source: str | os.PathLike, *, subfolder: str | None = None, image_size: int | None = None
    ) -> object:
        """The `CLIPImageProcessor` saved with the encoder, else CLIP's preprocessing (shortest side → size, centre
        crop, CLIP mean/std) sized to the encoder. Reads configs only, so a run training from a feature cache can check
        the cache's fingerprint without loading the weights."""
        if Path(source).is_file() and not subfolder:
            return _clip_processor(image_size or clip_file.vision_config(source).image_size)
        try:
            return from_cache_or_hub(lambda local: _processor(source, subfolder, image_size, local), str(source),
                                     "the image encoder", subfolder=subfolder)
        except (OSError, ValueError) as err:
            raise IPAdapterError(f"could not read the CLIP vision config of {_where(source, subfolder)}: "
                                 f"{first_clause(str(err))}") from None

    @property
    def device(self) -> torch.device:
        return self.placement()[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.placement()[1]

    def placement(self) -> tuple[torch.device, torch.dtype]:
        """The model's device and dtype from one look at its parameters (each look walks the model's modules)."""
        first = next(self.model.parameters())
        return first.device, first.dtype

    @property
    def global_dim(self) -> int:
        return int(self.model.config.projection_dim)

    @property
    def patch_dim(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def patch_tokens(self) -> int:
        """Patch features per image: the grid's patches plus the class token."""
        config = self.model.config
        return (config.image_size // config.patch_size) ** 2 + 1

    def identity(self) -> str:
        """Name + hash of the config: recorded with saved embeddings and caches, checked when they are reused."""
        return self._identity

    def dim(self, features: str) -> int:
        return self.global_dim if features == "global" else self.patch_dim

    def check_fits(self, in_dim: int, features: str, adapter_name: str = "the adapter") -> None:
        """The mismatch users meet most: the message names the published encoder of that width, where one is."""
        if self.dim(features) != in_dim:
            published = ENCODERS_BY_WIDTH.get((features, in_dim))
            hint = (f"the published encoder of that width is image_encoder={'/'.join(filter(None, published))}"
                    if published else "use the encoder the adapter was trained with")
            raise IPAdapterError(
                f"{adapter_name} expects {_describe(in_dim, features)} {features} image features but the image "
                f"encoder {self.name} gives {_describe(self.dim(features), features)}; {hint}"
            )

    def pixel_values(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = self.processor(images=images, return_tensors="pt").pixel_values
        return pixels.to(self.device, self.dtype)

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor, features: str) -> torch.Tensor:
        """Features of a preprocessed batch, never cached: the trainer's batches arrive as pixel tensors on the CPU, so
        they are moved to the encoder's device and dtype here."""
        pixels = pixels.to(*self.placement())
        if features == "global":
            return self.model(pixel_values=pixels).image_embeds  # (B, D)
        return penultimate_hidden_states(self.model, pixels)  # (B, P, H)

    def encode(self, images: list[Image.Image], features: str) -> torch.Tensor:
        """Features per image; images seen before (same pixels, same encoder) come from the LRU cache. Each new image
        is encoded alone: a batched matmul rounds differently, so an image's features (and the pixels made from them)
        would otherwise depend on which images it was first encoded with. One image's features are the cache's own
        tensor (read-only): a copy would be held beside it while the unconditional image is encoded, the peak of a
        generation's encoding (1.3 MiB for ViT-H patch features)."""
        keys = [(self._identity, features, image_key(img)) for img in images]
        found = [self.cache.get(key) for key in keys]
        for i, (image, key) in enumerate(zip(images, keys)):
            if found[i] is None:
                found[i] = self.encode_pixels(self.pixel_values([image]), features)[0]
                self.cache.put(key, found[i])
        device, dtype = self.placement()
        if len(found) == 1:
            return found[0].to(device, dtype)[None]
        return torch.stack([f.to(device, dtype) for f in found])

    def uncond(self, features: str, *, keep: bool = True) -> torch.Tensor:
        """Global: a zero embedding. Patch: the encoder's output for zero pixel values (kept: it never changes;
        `keep=False` for a caller that keeps what it makes of them instead, as generation keeps their tokens)."""
        if features == "global":
            return torch.zeros(1, self.global_dim, device=self.device, dtype=self.dtype)
        key = (self.device, self.dtype)
        found = self._uncond_patches.get(key)
        if found is None:
            size = self.model.config.image_size
            zeros = torch.zeros(1, 3, size, size, device=self.device, dtype=self.dtype)
            found = self.encode_pixels(zeros, "patch")
            if keep:
                self._uncond_patches[key] = found
        return found


def decode_embedding(raw: bytes, suffix: str) -> torch.Tensor:
    """A tensor from the bytes of a `.npy` file or of a tensors-only torch file (`.pt`/`.pth`), never unpickled;
    shared by generation (a file a user names) and training (a file or a WebDataset member)."""
    if suffix.lower().lstrip(".") == "npy":
        return torch.from_numpy(np.load(io.BytesIO(raw), allow_pickle=False))
    return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)


def _decode_problem(raw: bytes, suffix: str, err: Exception) -> str:
    """What is wrong with bytes `decode_embedding` refused, in words: torch's weights-only unpickler reports text or
    torn bytes as a bare KeyError ("101") or IndexError, which says nothing to the user."""
    from ipadapter.checkpoint import is_torch_file, refused_global

    if suffix.lower().lstrip(".") == "npy":
        if not raw.startswith(_NPY_MAGIC):
            return "not a .npy file (no NumPy header), or empty"
        return str(err).splitlines()[0] if str(err) else "truncated"  # numpy's own sentence names the problem
    if not is_torch_file(raw[:4]):
        return "not a torch file (text, an image or another format?), or truncated"
    refused = refused_global(err)
    if refused is not None:
        return f"its pickle carries code or objects other than tensors ({refused})"
    return "truncated or corrupt"


def load_face_embedding(
    source: str | os.PathLike | list[float] | np.ndarray | torch.Tensor, dim: int = 512
) -> torch.Tensor:
    """A precomputed ArcFace embedding (512-d) from `.npy`, `.pt`/`.pth` (tensors only), or a list → (N, dim)."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise IPAdapterError(f"face embedding file not found: {path}")
        raw = path.read_bytes()
        try:
            data = decode_embedding(raw, path.suffix)
        except Exception as err:  # noqa: BLE001 - any decoding failure is the same user error
            raise IPAdapterError(f"{path} is not a readable face embedding (.npy or tensor .pt): "
                                 f"{_decode_problem(raw, path.suffix, err)}") from None
    else:
        data = torch.as_tensor(np.asarray(source, dtype=np.float32))
    if not isinstance(data, torch.Tensor) or data.numel() % dim or data.numel() == 0:
        raise IPAdapterError(f"a face embedding must hold {dim} values per face, got {getattr(data, 'shape', data)!r}")
    data = data.float().reshape(-1, dim)
    if not bool(torch.isfinite(data).all()):
        raise IPAdapterError("a face embedding must hold finite values (it has NaN or infinity)")
    return data


class FaceAnalyzer:
    """ArcFace embeddings and aligned face crops via insightface (optional dependency), largest face first."""

    def __init__(self, name: str = "buffalo_l", det_size: int = 640) -> None:
        try:
            from insightface.app import FaceAnalysis
        except ImportError:
            raise IPAdapterError(
                "computing face embeddings needs insightface (pip install 'ipadapter[face]'); or pass a precomputed "
                "512-d ArcFace embedding (.npy/.pt) instead"
            ) from None
        self.app = FaceAnalysis(name=name, providers=["CPUExecutionProvider"])
        self.app.prepare(ctx_id=-1, det_size=(det_size, det_size))

    def analyze(self, image: Image.Image, source: str = "the image") -> tuple[torch.Tensor, Image.Image]:
        """(1, 512) normed embedding of the largest face, and its 224-px aligned crop for the Plus variants."""
        from insightface.utils import face_align

        bgr = np.asarray(image.convert("RGB"))[:, :, ::-1]
        faces = self.app.get(bgr)
        if not faces:
            raise IPAdapterError(f"no face found in {source}; use a clearer frontal photo or a precomputed embedding")
        face = max(faces, key=lambda f: (f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]))
        crop = face_align.norm_crop(bgr, landmark=face.kps, image_size=224)
        return torch.from_numpy(face.normed_embedding).float()[None], Image.fromarray(crop[:, :, ::-1].copy())
