"""The CLIP text model paired with an image encoder: InstantStyle's content subtraction takes the content words' text
embedding out of the image's global embedding, which only means something when both come from one CLIP.

Where it is found, first match wins:
1. the one named (`--content-text-encoder`: a folder, a Hub id, or `owner/repo/subfolder`; a full `CLIPModel` works);
2. the base pipeline's own text encoders: SDXL's `text_encoder_2` is OpenCLIP ViT-bigG/14's text tower, the pair of
   h94's SDXL image encoder; SD 1.5's ViT-L text encoder has no projection and never pairs with ViT-H;
3. the bundled miniature's tiny CLIP, whose text tower its image encoder was trained against;
4. beside the encoder's folder: `clip_text/` in it or next to it, then a sibling `text_encoder/`.

A candidate counts only with its own trained `text_projection` and the encoder's embedding width. A plain
`CLIPTextModel` (SD's text encoder) loaded as `CLIPTextModelWithProjection` gets a randomly initialised projection,
whose "text embedding" would subtract noise from the image embedding.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ipadapter.encoders import ImageEncoder, clip_tower_config
from ipadapter.errors import IPAdapterError, first_clause
from ipadapter.sources import from_cache_or_hub, split_hub_path

TextModel = tuple[Any, Any]  # (CLIPTextModelWithProjection, CLIPTokenizer)
_TOKENIZER_OF = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}  # diffusers' pipeline layout


def _tokenizer_source(repo: str, subfolder: str | None) -> tuple[str, str | None]:
    """The tokenizer beside the model, or in a pipeline's sibling `tokenizer*/` folder when the model's has none."""
    inner = Path(subfolder or repo)
    here = Path(repo, subfolder or "")
    own = here.is_dir() and any((here / f).is_file() for f in ("vocab.json", "tokenizer.json"))
    if inner.name not in _TOKENIZER_OF or own:
        return repo, subfolder
    sibling = str(inner.with_name(_TOKENIZER_OF[inner.name]))
    return (repo, sibling) if subfolder else (sibling, None)


def load_text_model(source: str, dim: int) -> TextModel:
    """A `CLIPTextModelWithProjection` and its tokenizer from `source`, refused without its trained projection or
    with a width other than `dim`."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    repo, subfolder = split_hub_path(source)
    tokenizer_repo, tokenizer_subfolder = _tokenizer_source(repo, subfolder)

    def read(local: bool) -> tuple[Any, dict, Any]:
        config = clip_tower_config(CLIPTextConfig, repo, subfolder, local)
        model, info = CLIPTextModelWithProjection.from_pretrained(repo, subfolder=subfolder or "", config=config,
                                                                  output_loading_info=True, local_files_only=local)
        tokenizer = CLIPTokenizer.from_pretrained(tokenizer_repo, subfolder=tokenizer_subfolder or "",
                                                  local_files_only=local)
        return model, info, tokenizer

    try:
        model, info, tokenizer = from_cache_or_hub(read, repo, "the CLIP text model", subfolder=subfolder)
    except (OSError, ValueError, RuntimeError) as err:  # RuntimeError: weights of other shapes than the config's
        reason = "its weights do not fit its config" if isinstance(err, RuntimeError) else first_clause(str(err))
        raise IPAdapterError(f"cannot load a CLIP text model from {source} ({reason})") from None
    if "text_projection.weight" in info["missing_keys"]:
        raise IPAdapterError(f"{source} holds no trained text projection (a plain CLIPTextModel, such as a Stable "
                             "Diffusion text encoder); content subtraction needs the CLIP text model with projection")
    if model.config.projection_dim != dim:
        raise IPAdapterError(f"{source} embeds text in {model.config.projection_dim} dimensions but the image encoder "
                             f"in {dim}; use the text model of the image encoder's own CLIP")
    return model.eval(), tokenizer


def _pipeline_models(pipe: Any, dim: int) -> Iterator[TextModel]:
    from transformers import CLIPTextModelWithProjection

    for model_name, tokenizer_name in _TOKENIZER_OF.items():
        model, tokenizer = getattr(pipe, model_name, None), getattr(pipe, tokenizer_name, None)
        if isinstance(model, CLIPTextModelWithProjection) and tokenizer is not None and model.config.projection_dim == dim:
            yield model, tokenizer


def _folders_beside(encoder: ImageEncoder) -> Iterator[Path]:
    from ipadapter.bundled import ASSETS_DIR, PIPELINE_DIR

    root = Path(encoder.name)
    if root.resolve() == (PIPELINE_DIR / "image_encoder").resolve():
        yield ASSETS_DIR / "clip"
    yield from (root / "clip_text", root.parent / "clip_text", root.parent / "text_encoder")


def _candidates(pipe: Any, encoder: ImageEncoder) -> Iterator[TextModel]:
    dim = encoder.global_dim
    yield from _pipeline_models(pipe, dim)
    for folder in _folders_beside(encoder):
        if (folder / "config.json").is_file():
            try:
                yield load_text_model(str(folder), dim)
            except IPAdapterError:
                continue


class PairedText:
    """The text model paired with `encoder`, found (or loaded from `source`) at the first call and kept: a manifest's
    jobs embed their content words with one model. Calls give (1, D) in the encoder's dtype, on its device."""

    def __init__(self, pipe: Any, encoder: ImageEncoder | None, source: str | None = None) -> None:
        self.pipe, self.encoder, self.source = pipe, encoder, source
        self._found: TextModel | None = None

    def _find(self) -> TextModel:
        encoder = self.encoder
        if encoder is None:
            raise IPAdapterError("content subtraction acts on CLIP image embeddings; this adapter has no image encoder")
        if self.source:
            return load_text_model(self.source, encoder.global_dim)
        found = next(_candidates(self.pipe, encoder), None)
        if found is None:
            raise IPAdapterError(
                f"content subtraction needs the CLIP text model paired with the image encoder {encoder.name} "
                f"({encoder.global_dim}-d, with its text projection) and none was found in the base model or beside "
                "the encoder; name it with --content-text-encoder (e.g. the CLIP repository the encoder comes from)")
        return found

    def __call__(self, text: str) -> torch.Tensor:
        if self._found is None:
            self._found = self._find()
        model, tokenizer = self._found
        device = next(model.parameters()).device
        ids = tokenizer([text], padding="max_length", truncation=True, return_tensors="pt").input_ids.to(device)
        with torch.no_grad():
            return model(input_ids=ids).text_embeds.to(self.encoder.device, self.encoder.dtype)


def paired_text_embeds(pipe: Any, encoder: ImageEncoder | None, text: str, source: str | None = None) -> torch.Tensor:
    """`text`'s CLIP text embedding (1, D) from the text model paired with `encoder` (`PairedText`, for one text)."""
    return PairedText(pipe, encoder, source)(text)
