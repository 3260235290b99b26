"""The adapter families as one table: every fact about a variant lives in its row, and nowhere else.

Checkpoint detection (checkpoint.py), new adapters for training (train/trainer.py), generation (prompter.py) and
the command lines read this table. Adding a variant is one row here plus its projection head in projection/.
See docs/checkpoints.md for the published files each row describes.
"""

from __future__ import annotations

from dataclasses import dataclass

from ipadapter.errors import IPAdapterError


@dataclass(frozen=True)
class Variant:
    """One family of adapters.

    head: the projection head (projection/detect.py builds it). clip: the CLIP image features it reads, "global"
    (`image_embeds`), "patch" (penultimate hidden states) or "" (none); face_id: it reads an ArcFace identity
    embedding. Unconditional input: a zero embedding for global and ID features, the encoder's output on zero
    pixels for patch features (encoders.py). tokens: image tokens of a new adapter (0: one per encoder token).
    lora: it carries LoRA deltas on every attention layer. shortcut: FaceID-PlusV2's
    `id_tokens + s_scale · perceiver(...)`, not visible in the keys. Detection, among variants of one head: a row
    with `when_tokens` / `when_lora` / `when_file` is chosen when all of those hold, the plain row otherwise.
    trainable: `ipadapter train` can make it. denoiser: the model its weights sit in, "unet" (SD 1.5 / 2.x / SDXL /
    Kolors), "flux" (FLUX double-stream blocks) or "sd3" (SD 3 / 3.5 joint blocks); detection looks only at rows of
    the file's own denoiser.
    """

    name: str
    head: str
    clip: str
    face_id: bool = False
    tokens: int = 4
    lora: bool = False
    shortcut: bool = False
    trainable: bool = True
    when_tokens: int | None = None
    when_lora: bool | None = None
    when_file: str | None = None
    description: str = ""
    denoiser: str = "unet"

    @property
    def features(self) -> str:
        """What the encoders deliver, as one word: "global", "patch", "faceid" or "faceid+patch"."""
        return "+".join(kind for kind in ("faceid" if self.face_id else "", self.clip) if kind)

    def detected_by(self, *, tokens: int, lora_rank: int, file_name: str) -> bool:
        """Whether this row's detection conditions hold (a row without any holds for every file of its head)."""
        return ((self.when_tokens is None or tokens == self.when_tokens)
                and (self.when_lora is None or bool(lora_rank) == self.when_lora)
                and (self.when_file is None or self.when_file in file_name.lower()))

    @property
    def specific(self) -> bool:
        return (self.when_tokens, self.when_lora, self.when_file) != (None, None, None)


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("base", "linear", "global", description="global CLIP embedding → 4 tokens"),
        Variant("plus", "resampler", "patch", tokens=16, description="perceiver resampler over CLIP patches"),
        Variant("full", "token_mlp", "patch", tokens=0, description="per-token MLP over all CLIP tokens (257 ViT-H)"),
        Variant("faceid", "faceid", "", face_id=True, lora=True, description="ArcFace ID → 4 tokens + LoRA"),
        Variant("faceid-portrait", "faceid", "", face_id=True, tokens=16, trainable=False, when_tokens=16,
                when_lora=False, description="several ArcFace IDs, 16 tokens each"),
        Variant("faceid-plus", "faceid_plus", "patch", face_id=True, lora=True,
                description="ID tokens as perceiver latents over CLIP patches of the face + LoRA"),
        Variant("faceid-plusv2", "faceid_plus", "patch", face_id=True, lora=True, shortcut=True,
                when_file="v2", description="FaceID-Plus with the ID-token shortcut (s_scale)"),
        Variant("flux", "linear", "global", denoiser="flux",
                description="XLabs FLUX v1: CLIP ViT-L/14 embedding → 4 tokens on the double-stream blocks"),
        Variant("flux-v2", "linear", "global", tokens=16, when_tokens=16, denoiser="flux",
                description="XLabs FLUX v2: CLIP ViT-L/14 embedding → 16 tokens on the double-stream blocks"),
        Variant("sd3", "time_resampler", "patch", tokens=64, denoiser="sd3",
                description="InstantX SD 3.5: SigLIP patches → timestep-aware resampler on every joint block"),
    )
}
TRAINABLE = tuple(name for name, v in VARIANTS.items() if v.trainable)

# How an adapter's image tokens enter the UNet: the paper's decoupled cross-attention, or its "simple adapter"
# ablation (tokens concatenated to the text tokens of the frozen cross-attention).
ATTENTION_MODES = ("decoupled", "concat")


def get_variant(name: str) -> Variant:
    if name not in VARIANTS:
        raise IPAdapterError(f"unknown adapter variant {name!r}; valid: {', '.join(VARIANTS)}")
    return VARIANTS[name]


def detect_variant_name(
    head: str, *, tokens: int, lora_rank: int, file_name: str = "", denoiser: str = "unet",
) -> str:
    """The variant of a published file from its denoiser, projection head and what its weights and name show."""
    rows = [v for v in VARIANTS.values() if v.head == head and v.denoiser == denoiser
            and v.detected_by(tokens=tokens, lora_rank=lora_rank, file_name=file_name)]
    if not rows:
        raise IPAdapterError(f"no adapter variant has a {head!r} projection head")
    return max(rows, key=lambda v: v.specific).name
