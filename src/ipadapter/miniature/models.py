"""The miniature models a report measures: the bundled ones, or any folder laid out as the bundle or as a run.

Two layouts are read. The bundled one: a diffusers `pipeline/` with the adapters' image encoder in
`image_encoder/`, and the whole tiny CLIP in `clip/` (the pipeline keeps its text tower only; the report's text
retrieval check needs the projection too). The stage layout of a rebuild: `clip/`, `vae/`, `unet/` and, when
trained, a separate `image_encoder/`; without it the adapters read the CLIP's vision tower. A `pipeline/` beside the
stages (a run folder once assembled) is what generates; `clip/` and `image_encoder/` are still read when present.
Beside either: the adapters (`adapters/<name>.safetensors` as exported, or `adapter-<name>/adapter.ipadapter.safetensors`
as trained), `controlnet/`, `custom_lora/` and `judge/` (the bundled judge when a folder has none).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ADAPTER_NAMES = ("base", "plus", "simple")
CONFIG = "config.json"


def _first(*paths: Path) -> Path | None:
    return next((p for p in paths if p.exists()), None)


@dataclass
class Models:
    """Where each model comes from; None: absent (the rows that need it are skipped, saying why)."""

    pipeline: Path | None = None  # a diffusers folder; None: assembled from clip + vae + unet
    clip: Path | None = None  # a full CLIPModel: text tower of the stage layout, and the text retrieval check
    vae: Path | None = None
    unet: Path | None = None
    image_encoder: Path | None = None  # None: the pipeline's image_encoder/, else the CLIP's vision tower
    adapters: dict[str, Path] = field(default_factory=dict)
    controlnet: Path | None = None
    custom_lora: Path | None = None
    judge: Path | None = None
    judge_clip: Path | None = None  # None: judge/clip

    @classmethod
    def from_folder(cls, folder: str | Path) -> "Models":
        from ipadapter.bundled import JUDGE_DIR
        from ipadapter.errors import IPAdapterError

        root = Path(folder)
        pipeline = root if (root / "model_index.json").is_file() else root / "pipeline"
        pipeline = pipeline if (pipeline / "model_index.json").is_file() else None
        staged = all((root / part / CONFIG).is_file() for part in ("clip", "vae", "unet"))
        if not staged and pipeline is None:
            raise IPAdapterError(
                f"{root} holds no miniature model: expected pipeline/model_index.json, or clip/, vae/ and unet/ "
                "folders (each with config.json)"
            )
        adapters = {name: path for name in ADAPTER_NAMES if (path := _first(
            root / "adapters" / f"{name}.safetensors", root / f"adapter-{name}" / "adapter.ipadapter.safetensors"))}
        judge = root / "judge" if (root / "judge" / "classifier.safetensors").is_file() else JUDGE_DIR
        return cls(
            pipeline=pipeline,
            clip=root / "clip" if (root / "clip" / CONFIG).is_file() else None,
            vae=root / "vae" if pipeline is None else None,
            unet=root / "unet" if pipeline is None else None,
            # the adapters train against pipeline/image_encoder; a run's image_encoder/ is only the encoder recipe's
            # output, which differs from the pipeline's once the encoder trains further
            image_encoder=root / "image_encoder" if pipeline is None and (root / "image_encoder" / CONFIG).is_file()
            else None,
            adapters=adapters,
            controlnet=root / "controlnet" if (root / "controlnet" / CONFIG).is_file() else None,
            custom_lora=_first(root / "custom_lora" / "pytorch_lora_weights.safetensors"),
            judge=judge,
            judge_clip=_first(judge / "clip", root / "judge_clip"),
        )

    @classmethod
    def bundled(cls) -> "Models":
        from ipadapter.bundled import ASSETS_DIR

        return cls.from_folder(ASSETS_DIR)

    def missing(self, adapter: str, model: str = "base", control: bool = False) -> str | None:
        """Why a condition cannot run (a model it needs is absent, with the recipe that makes it), or None."""
        if adapter not in self.adapters:
            return f"no {adapter} adapter (`ipadapter miniature train adapter{'' if adapter == 'base' else '-' + adapter}`)"
        if model == "custom" and self.custom_lora is None:
            return "no custom_lora/ (`ipadapter miniature train custom`)"
        if control and self.controlnet is None:
            return "no controlnet/ (`ipadapter miniature train controlnet`)"
        return None

    def described(self) -> dict[str, Any]:
        """Every source as a string, for the report; `base` and `encoder` say what the pipeline and the adapters'
        image encoder are made of."""
        sources = {k: (str(v) if isinstance(v, Path) else {n: str(p) for n, p in v.items()} if isinstance(v, dict)
                       else v) for k, v in self.__dict__.items()}
        base = self.pipeline or f"{self.clip} + {self.vae} + {self.unet}"
        encoder = (self.image_encoder or (self.pipeline / "image_encoder" if self.pipeline else None)
                   or f"the vision tower of {self.clip}")
        return {**sources, "base": str(base), "encoder": str(encoder)}


class Loaded:
    """The models of a `Models`, each loaded once on first use (fp32, CPU)."""

    def __init__(self, models: Models) -> None:
        self.models = models
        self._pipes: dict[tuple[str, bool], Any] = {}
        self._encoder = None
        self._clip: Any = None

    @property
    def clip(self):
        """The full tiny CLIP (clip/ of a run folder or of the bundle), in fp32 like every model here."""
        if self._clip is None and self.models.clip is not None:
            import torch
            from transformers import CLIPModel

            self._clip = CLIPModel.from_pretrained(self.models.clip, dtype=torch.float32).eval()
        return self._clip

    def pipeline(self, model: str = "base", control: bool = False):
        """The base pipeline, the custom model (base + fused LoRA), or either with the ControlNet."""
        key = (model, control)
        if key not in self._pipes:
            if control:
                from ipadapter.pipelines import add_controlnet

                pipe = add_controlnet(self.pipeline(model), self.models.controlnet)
            elif model == "custom":
                from ipadapter.pipelines import fuse_base_lora

                pipe = fuse_base_lora(self._load_base(), self.models.custom_lora)
            else:
                pipe = self._load_base()
            pipe.set_progress_bar_config(disable=True)
            self._pipes[key] = pipe
        return self._pipes[key]

    def _load_base(self):
        if self.models.pipeline is not None:
            from ipadapter.pipelines import load_pipeline

            return load_pipeline(self.models.pipeline)
        from ipadapter.miniature.base_model import assemble_pipeline

        return assemble_pipeline(self.models.vae, self.models.clip, self.models.unet)

    @property
    def encoder(self):
        """The adapters' image encoder: the one given, else the pipeline's, else the CLIP's tower."""
        if self._encoder is None:
            from ipadapter.encoders import ImageEncoder
            from ipadapter.miniature.tiny_clip import image_processor, vision_tower

            if self.models.image_encoder is not None:
                self._encoder = ImageEncoder.from_pretrained(self.models.image_encoder)
            elif self.models.pipeline is not None:
                self._encoder = ImageEncoder.from_pretrained(self.models.pipeline / "image_encoder")
            else:
                self._encoder = ImageEncoder(vision_tower(self.clip), image_processor(), name="clip vision tower")
        return self._encoder

    @property
    def text_encoder(self):
        return self.pipeline().text_encoder

    @property
    def tokenizer(self):
        return self.pipeline().tokenizer

    @property
    def vae(self):
        return self.pipeline().vae

    def adapter(self, name: str, unet):
        from ipadapter.checkpoint import load_adapter

        return load_adapter(self.models.adapters[name], unet).float()

    def judge(self):
        from ipadapter.miniature.judge import Judge

        return Judge.load(self.models.judge, clip_dir=self.models.judge_clip)
