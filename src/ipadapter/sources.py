"""Where models come from: the bundled miniature model by default, local folders, or Hugging Face Hub ids.

The published image encoders live next to the adapters (h94/IP-Adapter): `models/image_encoder` is OpenCLIP
ViT-H/14 (SD 1.5 adapters, FaceID-Plus, and the SDXL "_vit-h" adapters), `sdxl_models/image_encoder` is ViT-bigG/14.
The newer families name theirs in their model cards: XLabs' FLUX adapters OpenAI's CLIP ViT-L/14, InstantX's SD 3.5
adapter SigLIP so400m, Kolors' adapter the ViT-L/14-336 in its own repository.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

H94 = "h94/IP-Adapter"
VIT_H = (H94, "models/image_encoder")
VIT_BIGG = (H94, "sdxl_models/image_encoder")
# Adapter repository → the encoder it was trained with (repository, subfolder), when no encoder is given.
PUBLISHED_ENCODERS: dict[str, tuple[str, str | None]] = {
    "XLabs-AI/flux-ip-adapter": ("openai/clip-vit-large-patch14", None),
    "XLabs-AI/flux-ip-adapter-v2": ("openai/clip-vit-large-patch14", None),
    "InstantX/SD3.5-Large-IP-Adapter": ("google/siglip-so400m-patch14-384", None),
    "Kwai-Kolors/Kolors-IP-Adapter-Plus": ("Kwai-Kolors/Kolors-IP-Adapter-Plus", "image_encoder"),
}


@dataclass(frozen=True)
class AdapterSource:
    source: str
    subfolder: str | None = None
    weight_name: str | None = None


def miniature_base() -> Path:
    from ipadapter.bundled import pipeline_path

    return pipeline_path()


def miniature_adapter(name: str = "base") -> AdapterSource:
    from ipadapter.errors import IPAdapterError
    from ipadapter.bundled import ASSETS_DIR

    path = ASSETS_DIR / "adapters" / f"{name}.safetensors"
    if not path.is_file():
        raise IPAdapterError(
            f"the miniature {name} adapter is missing ({path}); rebuild it with the recipe in docs/miniature.md "
            f"(`ipadapter miniature train adapter{'' if name == 'base' else '-' + name}` then `ipadapter miniature export`)"
        )
    return AdapterSource(str(path))


def split_hub_path(source: str) -> tuple[str, str | None]:
    """"owner/repo/sub/folder" → ("owner/repo", "sub/folder"); local paths and plain repo ids pass through."""
    if Path(source).exists() or source.count("/") < 2 or source.startswith((".", "/")):
        return source, None
    owner, repo, rest = source.split("/", 2)
    return f"{owner}/{repo}", rest


def default_image_encoder(base: str | None, adapter: AdapterSource) -> tuple[str, str | None] | None:
    """The encoder a user almost always means: the base folder's own, else the one published beside the adapter."""
    if base and (Path(base) / "image_encoder" / "config.json").is_file():
        return str(Path(base)), "image_encoder"
    folder = Path(adapter.source) if Path(adapter.source).is_dir() else Path(adapter.source).parent
    for candidate in (folder / "image_encoder", folder.parent / "image_encoder"):
        if (candidate / "config.json").is_file():
            return str(candidate), None
    published = PUBLISHED_ENCODERS.get(split_hub_path(adapter.source)[0])
    if published:
        return published
    name = (adapter.weight_name or Path(adapter.source).name).lower()
    if adapter.source.startswith("h94/"):
        sdxl = (adapter.subfolder or "").startswith("sdxl") or "sdxl" in name
        return VIT_BIGG if sdxl and "vit-h" not in name and "faceid" not in name else VIT_H
    return None
