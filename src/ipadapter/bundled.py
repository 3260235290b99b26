"""Where the bundled miniature model's shipped weights live, and one clear error (naming the recipe that rebuilds
them) if not. The weights are data in the package (`ipadapter/miniature/assets/`); the core reads them from here
without importing the miniature recipes."""

from __future__ import annotations

from pathlib import Path

from ipadapter.errors import IPAdapterError

ASSETS_DIR = Path(__file__).resolve().parent / "miniature" / "assets"
PIPELINE_DIR = ASSETS_DIR / "pipeline"
JUDGE_DIR = ASSETS_DIR / "judge"
CUSTOM_LORA_DIR = ASSETS_DIR / "custom_lora"
CONTROLNET_DIR = ASSETS_DIR / "controlnet"

_REBUILD = {
    "pipeline": "ipadapter miniature train clip && ipadapter miniature train vae && "
    "ipadapter miniature train unet && ipadapter miniature export",
    "judge": "ipadapter miniature train judge && ipadapter miniature export",
    "custom LoRA": "ipadapter miniature train custom && ipadapter miniature export",
    "controlnet": "ipadapter miniature train controlnet && ipadapter miniature export",
}


def _require(path: Path, marker: str, what: str) -> Path:
    if not (path / marker).is_file():
        raise IPAdapterError(
            f"The miniature {what} is missing ({path / marker} not found); rebuild it with `{_REBUILD[what]}`."
        )
    return path


def pipeline_path() -> Path:
    """The tiny Stable Diffusion folder (also holds `image_encoder/` and `feature_extractor/` for IP-Adapter)."""
    return _require(PIPELINE_DIR, "model_index.json", "pipeline")


def image_encoder_path() -> Path:
    """The adapters' image encoder (`CLIPVisionModelWithProjection`, 4 px patches), trained against the tiny CLIP's
    text tower."""
    return _require(pipeline_path() / "image_encoder", "config.json", "pipeline")


def judge_path() -> Path:
    """The judge folder: `classifier.*` and the independent judge CLIP in `clip/`."""
    return _require(JUDGE_DIR, "classifier.safetensors", "judge")


def controlnet_path() -> Path:
    """The miniature ControlNet (object mask -> layout), a `ControlNetModel` folder for the miniature pipeline."""
    return _require(CONTROLNET_DIR, "config.json", "controlnet")


def custom_lora_path() -> Path:
    """The miniature custom model's LoRA (diffusers format, "two-tone" style), for `load_lora_weights`."""
    name = "pytorch_lora_weights.safetensors"
    return _require(CUSTOM_LORA_DIR, name, "custom LoRA") / name
