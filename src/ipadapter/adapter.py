"""One IP-Adapter as a module: its projection head and, per UNet attention layer (by name), K'/V' and LoRA."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ipadapter.layers import AttentionLayer, attention_layers
from ipadapter.projection.detect import ProjectionConfig, build_projection
from ipadapter.variants import ATTENTION_MODES, get_variant


@dataclass(frozen=True)
class AdapterConfig:
    """What the adapter is; recorded in the project's own files, detected from keys for published ones."""

    variant: str
    projection: ProjectionConfig
    lora_rank: int = 0
    encoder: str = ""
    base: str = ""
    extra: dict[str, str] = field(default_factory=dict)
    # "decoupled": the paper's separate K'/V' per layer; "concat": the paper's "simple adapter" ablation, image
    # tokens appended to the text tokens of the frozen cross-attention (only the projection is trained).
    attention: str = "decoupled"

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_MODES:
            from ipadapter.errors import IPAdapterError

            raise IPAdapterError(f"unknown attention mode {self.attention!r}; valid: {', '.join(ATTENTION_MODES)}")

    @property
    def tokens(self) -> int:
        return self.projection.tokens

    @property
    def cross_dim(self) -> int:
        return self.projection.cross_dim

    def to_metadata(self) -> dict[str, str]:
        import json

        return {
            "format": "ipadapter/1", "variant": self.variant, "projection": json.dumps(self.projection.to_dict()),
            "lora_rank": str(self.lora_rank), "encoder": self.encoder, "base": self.base, "tokens": str(self.tokens),
            "extra": json.dumps(self.extra), "attention": self.attention,
        }

    @classmethod
    def from_metadata(cls, meta: dict[str, str]) -> "AdapterConfig":
        import json

        return cls(
            variant=meta["variant"], projection=ProjectionConfig(**json.loads(meta["projection"])),
            lora_rank=int(meta.get("lora_rank", "0")), encoder=meta.get("encoder", ""), base=meta.get("base", ""),
            extra=json.loads(meta.get("extra", "{}")), attention=meta.get("attention", "decoupled"),
        )

class LoRA(nn.Module):
    """Low-rank delta `up(down(x))`; key names `down`/`up` as in the FaceID files."""

    def __init__(self, in_features: int, out_features: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=False)
        nn.init.normal_(self.down.weight, std=1 / rank)
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x.to(self.down.weight.dtype)))


class AdapterLayer(nn.Module):
    """The adapter's weights at one attention layer: image K'/V' (cross-attention only), optional LoRA.

    A "concat" adapter has no weights of its own here: its tokens go through the layer's frozen to_k/to_v.
    """

    def __init__(
        self, layer: AttentionLayer, cross_dim: int, lora_rank: int = 0, image_branch: bool = True, concat: bool = False,
    ) -> None:
        super().__init__()
        self.has_ip = layer.cross and image_branch
        self.concat = concat and self.has_ip
        if self.has_ip and not self.concat:
            self.to_k_ip = nn.Linear(cross_dim, layer.width, bias=False)
            self.to_v_ip = nn.Linear(cross_dim, layer.width, bias=False)
        self.has_lora = lora_rank > 0
        if self.has_lora:
            query_dim = layer.width
            self.to_q_lora = LoRA(query_dim, layer.width, lora_rank)
            # `cross_dim` is to_k's input width: the text's in cross-attention, the hidden states' in self-attention.
            self.to_k_lora = LoRA(layer.cross_dim, layer.width, lora_rank)
            self.to_v_lora = LoRA(layer.cross_dim, layer.width, lora_rank)
            self.to_out_lora = LoRA(layer.width, query_dim, lora_rank)


def _nested(layers: dict[str, nn.Module]) -> nn.ModuleDict:
    """Modules placed at their UNet module paths ("down_blocks.1....attn2" → down_blocks/1/.../attn2), so the
    adapter's state-dict keys are the layer names themselves: the own file format is `adapter.state_dict()`."""
    root = nn.ModuleDict()
    for name, module in layers.items():
        *parents, leaf = name.split(".")
        node = root
        for part in parents:
            if part not in node:
                node[part] = nn.ModuleDict()
            node = node[part]
        node[leaf] = module
    return root


_UIDS = itertools.count()


class IPAdapter(nn.Module):
    """A loaded (or new, trainable) adapter, independent of any UNet until attached.

    `layers` holds one `AdapterLayer` at each UNet attention layer's module path, never by position; state-dict
    keys: "image_proj.*" and "layers.{layer name}.to_k_ip.weight", ... (the project's own file format).
    """

    def __init__(self, config: AdapterConfig, layers: list[AttentionLayer]) -> None:
        super().__init__()
        variant = get_variant(config.variant)
        self.config = config
        self.variant = variant
        self.image_proj = build_projection(config.projection, shortcut=variant.shortcut)
        self.layers = _nested(
            {l.name: AdapterLayer(l, config.cross_dim, config.lora_rank, concat=config.attention == "concat")
             for l in layers if l.cross or config.lora_rank}
        )
        self.uid = next(_UIDS)
        self.weights_version = 0
        for module in self.modules():  # a load into any part of the adapter changes its weights
            module.register_load_state_dict_post_hook(self._weights_loaded)

    @classmethod
    def for_unet(cls, unet: nn.Module, config: AdapterConfig, *, init_from_unet: bool = True) -> "IPAdapter":
        """A new adapter shaped for `unet`; K'/V' start as copies of each layer's to_k/to_v (the paper's init)."""
        adapter = cls(config, attention_layers(unet))
        if init_from_unet:
            with torch.no_grad():
                for name, layer in adapter.named_layers():
                    if layer.has_ip and not layer.concat:
                        attn = unet.get_submodule(name)
                        if attn.to_k.weight.shape == layer.to_k_ip.weight.shape:
                            layer.to_k_ip.weight.copy_(attn.to_k.weight)
                            layer.to_v_ip.weight.copy_(attn.to_v.weight)
        return adapter

    def named_layers(self) -> list[tuple[str, AdapterLayer]]:
        """(UNet layer name, its weights), in the UNet's checkpoint order."""
        return [(name, m) for name, m in self.layers.named_modules() if isinstance(m, AdapterLayer)]

    def layer(self, name: str) -> AdapterLayer | None:
        try:
            found = self.layers.get_submodule(name)
        except AttributeError:
            return None
        return found if isinstance(found, AdapterLayer) else None

    def project(self, *features: torch.Tensor) -> torch.Tensor:
        """Encoder features → tokens (B, T, C). FaceID-Plus takes (id_embeds, patches)."""
        return self.image_proj(*features)

    @property
    def clip_width(self) -> int:
        """The width of the CLIP features the head reads (0: none): what the image encoder must deliver."""
        if not self.variant.clip:
            return 0
        projection = self.config.projection
        return projection.clip_dim if self.variant.face_id else projection.in_dim

    def _weights_loaded(self, module: nn.Module, incompatible_keys: Any) -> None:
        self.weights_changed()

    def weights_changed(self) -> None:
        """Say that the weights changed in place (an optimizer step, a manual edit): tokens and K'/V' cached for the
        old weights are not served again. Loads (`load_state_dict` on any part), moves and casts need no call."""
        self.weights_version += 1

    def weights_token(self) -> tuple:
        """Equal while the weights are: this adapter object, its load/change count, its device and dtype."""
        return (self.uid, self.weights_version, *self.placement())

    def projection_key(self) -> tuple:
        """Keys the projected-token cache: the weights token and the head's one setting that is not a weight,
        FaceID-PlusV2's `s_scale`."""
        return (*self.weights_token(), getattr(self.image_proj, "s_scale", None))

    @property
    def device(self) -> torch.device:
        return self.placement()[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.placement()[1]

    def placement(self) -> tuple[torch.device, torch.dtype]:
        """The weights' device and dtype from one look at the parameters (each look walks the modules), as
        `ImageEncoder.placement`."""
        first = next(self.parameters())
        return first.device, first.dtype
