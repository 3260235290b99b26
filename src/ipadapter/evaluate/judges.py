"""The judges: a CLIP (any `transformers.CLIPModel` with its tokenizer and image processor) for CLIP-I / CLIP-T, and
an attribute judge for worlds whose scenes have known attributes. Both are used only to measure.

The paper's judge is openai/clip-vit-large-patch14; the miniature model has its own independently trained CLIP and
attribute classifier (`ipadapter.miniature.judge.Judge`, an `AttributeJudge`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from PIL import Image

from ipadapter.errors import IPAdapterError, first_clause
from ipadapter.sources import from_cache_or_hub
from ipadapter.validation import model_source

PAPER_JUDGE = "openai/clip-vit-large-patch14"


def pooled(output: object) -> torch.Tensor:
    """`get_*_features` return a tensor in transformers 4 and an output with `pooler_output` in 5."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _read_judge(source: str, processor: object | None, local: bool) -> tuple[torch.nn.Module, object, object]:
    """The judge's model, tokenizer and image processor (`processor` when given; else its saved one, else CLIP's
    preprocessing at its image size); `local`: from disk only."""
    from transformers import AutoConfig, AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel

    config = AutoConfig.from_pretrained(source, local_files_only=local)
    if not isinstance(config, CLIPConfig):
        raise IPAdapterError(
            f"the judge must be a CLIP with image and text towers (CLIPModel), but {source} is a "
            f"{type(config).__name__.removesuffix('Config')} model"
        )
    model = CLIPModel.from_pretrained(source, dtype=torch.float32, local_files_only=local)
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local)
    if processor is None:
        try:
            processor = CLIPImageProcessor.from_pretrained(source, local_files_only=local)
        except (OSError, ValueError):
            size = config.vision_config.image_size
            processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return model, tokenizer, processor


class ClipJudge:
    """Unit-norm CLIP image and text embeddings; CLIP-I and CLIP-T are dot products of these."""

    def __init__(self, model: torch.nn.Module, tokenizer: object, processor: object) -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.processor = processor

    @classmethod
    def load(cls, source: str | os.PathLike, *, processor: object | None = None, device: str = "cpu") -> "ClipJudge":
        """A folder or Hub id holding a full CLIP (both towers); anything else is a user error. Read from disk when it
        is there (a folder, or the id in the local Hugging Face cache), from the Hub only otherwise
        (`from_cache_or_hub`). A path that does not exist is named as one, not as a malformed Hub id."""
        source = str(source)
        model_source(source, "judge")
        try:
            model, tokenizer, image_processor = from_cache_or_hub(
                lambda local: _read_judge(source, processor, local), source, "the judge")
        except (OSError, ValueError) as err:
            raise IPAdapterError(f"could not load the judge {source}: {first_clause(str(err))}") from None
        return cls(model.to(device), tokenizer, image_processor)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def image_embeds(self, images: Sequence[Image.Image], batch: int = 32) -> torch.Tensor:
        out = []
        for i in range(0, len(images), batch):
            chunk = [im.convert("RGB") for im in images[i : i + batch]]
            pixels = self.processor(images=chunk, return_tensors="pt").pixel_values.to(self.device)
            out.append(F.normalize(pooled(self.model.get_image_features(pixel_values=pixels)).float(), dim=-1))
        return torch.cat(out).cpu()

    @torch.no_grad()
    def text_embeds(self, texts: Sequence[str], batch: int = 64) -> torch.Tensor:
        """Captions longer than the text tower's positions are truncated, as CLIPScore does."""
        limit = self.model.config.text_config.max_position_embeddings
        out = []
        for i in range(0, len(texts), batch):
            tokens = self.tokenizer(list(texts[i : i + batch]), padding=True, truncation=True, max_length=limit,
                                    return_tensors="pt").to(self.device)
            features = self.model.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
            out.append(F.normalize(pooled(features).float(), dim=-1))
        return torch.cat(out).cpu()


class AttributeJudge(Protocol):
    """Reads named attributes (shape, colour, ...) off images; what per-attribute agreement is measured with."""

    def accuracy(self, images: Sequence[Image.Image], attrs: Sequence[Mapping[str, str]]) -> dict[str, float]:
        """Per attribute, the fraction of images whose judged value is the asked-for one; "all": every one right."""
        ...
