"""Where models come from: the bundled miniature model by default, local folders, or Hugging Face Hub ids.

The published image encoders live next to the adapters (h94/IP-Adapter): `models/image_encoder` is OpenCLIP
ViT-H/14 (most SD 1.5 adapters, FaceID-Plus, and the SDXL "_vit-h" adapters), `sdxl_models/image_encoder` is
ViT-bigG/14 (the other SDXL adapters and `ip-adapter_sd15_vit-G`); the width an adapter reads tells which. The newer
families name theirs in their model cards: XLabs' FLUX adapters OpenAI's CLIP ViT-L/14, InstantX's SD 3.5 adapter
SigLIP so400m, Kolors' adapter the ViT-L/14-336 in its own repository.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ipadapter.errors import IPAdapterError, first_clause

T = TypeVar("T")

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

# An adapter reads the encoder whose features have the width its head takes, where one published encoder gives that
# width (h94's adapters, renamed files, community adapters): ViT-H/14 gives 1024-wide global embeddings and
# 1280-wide patches, ViT-bigG/14 1280 and 1664, OpenAI's ViT-L/14 768-wide embeddings, SigLIP so400m 1152-wide patches.
# (1024-wide patches are ViT-L/14's at 224 px and at 336 px alike, so they name no encoder.)
ENCODERS_BY_WIDTH: dict[tuple[str, int], tuple[str, str | None]] = {
    ("global", 1024): VIT_H,
    ("patch", 1280): VIT_H,
    ("global", 1280): VIT_BIGG,
    ("patch", 1664): VIT_BIGG,
    ("global", 768): ("openai/clip-vit-large-patch14", None),
    ("patch", 1152): ("google/siglip-so400m-patch14-384", None),
}


@dataclass(frozen=True)
class AdapterSource:
    source: str
    subfolder: str | None = None
    weight_name: str | None = None

    @property
    def path(self) -> Path:
        """Where the adapter would lie on disk: the file, or the folder holding it when no file is named."""
        return Path(self.source, self.subfolder or "", self.weight_name or "")


PUBLISHED_PREFIX = "h94:"
# `--adapter h94:NAME`: h94's published adapters by what they do, the file for the base's family, as
# "owner/repo/path" (docs/checkpoints.md). SDXL's "base" and "plus" files are the ViT-H ones, so that every h94
# adapter but "base-vit-g" shares one encoder and any of them combine; "base-vit-g" is the bigG-trained pair.
PUBLISHED_ADAPTERS: dict[str, dict[str, str]] = {
    "base": {"sd15": "h94/IP-Adapter/models/ip-adapter_sd15.safetensors",
             "sdxl": "h94/IP-Adapter/sdxl_models/ip-adapter_sdxl_vit-h.safetensors"},
    "base-vit-g": {"sd15": "h94/IP-Adapter/models/ip-adapter_sd15_vit-G.safetensors",
                   "sdxl": "h94/IP-Adapter/sdxl_models/ip-adapter_sdxl.safetensors"},
    "light": {"sd15": "h94/IP-Adapter/models/ip-adapter_sd15_light_v11.bin"},
    "plus": {"sd15": "h94/IP-Adapter/models/ip-adapter-plus_sd15.safetensors",
             "sdxl": "h94/IP-Adapter/sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors"},
    "plus-face": {"sd15": "h94/IP-Adapter/models/ip-adapter-plus-face_sd15.safetensors",
                  "sdxl": "h94/IP-Adapter/sdxl_models/ip-adapter-plus-face_sdxl_vit-h.safetensors"},
    "full-face": {"sd15": "h94/IP-Adapter/models/ip-adapter-full-face_sd15.safetensors"},
    "faceid": {"sd15": "h94/IP-Adapter-FaceID/ip-adapter-faceid_sd15.bin",
               "sdxl": "h94/IP-Adapter-FaceID/ip-adapter-faceid_sdxl.bin"},
    "faceid-plus": {"sd15": "h94/IP-Adapter-FaceID/ip-adapter-faceid-plus_sd15.bin"},
    "faceid-plusv2": {"sd15": "h94/IP-Adapter-FaceID/ip-adapter-faceid-plusv2_sd15.bin",
                      "sdxl": "h94/IP-Adapter-FaceID/ip-adapter-faceid-plusv2_sdxl.bin"},
    "faceid-portrait": {"sd15": "h94/IP-Adapter-FaceID/ip-adapter-faceid-portrait-v11_sd15.bin",
                        "sdxl": "h94/IP-Adapter-FaceID/ip-adapter-faceid-portrait_sdxl.bin"},
}
FAMILY_NAMES = {"sd15": "SD 1.5", "sdxl": "SDXL"}


def is_published_name(source: str) -> bool:
    """Whether an adapter source is an `h94:` short name (checked against the table when resolved)."""
    return str(source).startswith(PUBLISHED_PREFIX)


def published_files(source: str) -> dict[str, str]:
    """The files an `h94:NAME` stands for, by base family; an unknown name is refused with the valid ones."""
    files = PUBLISHED_ADAPTERS.get(source[len(PUBLISHED_PREFIX):])
    if files is None:
        raise IPAdapterError(f"unknown published adapter {source!r}; valid: "
                             f"{', '.join(PUBLISHED_PREFIX + n for n in PUBLISHED_ADAPTERS)}")
    return files


def published_adapter(source: str, family: str | None) -> AdapterSource:
    """The h94 file an `h94:NAME` names for a base of `family` ("sd15", "sdxl"; None: neither, e.g. FLUX)."""
    files = published_files(source)
    if family not in files:
        made = " and ".join(FAMILY_NAMES[f] for f in files)
        raise IPAdapterError(f"{source} is published for {made} only, and this base is "
                             f"{FAMILY_NAMES.get(family, 'neither')}")
    owner, repo, path = files[family].split("/", 2)
    return AdapterSource(f"{owner}/{repo}", None, path)  # the path inside the repository names the file


def miniature_base() -> Path:
    from ipadapter.bundled import pipeline_path

    return pipeline_path()


def miniature_adapter(name: str = "base") -> AdapterSource:
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


def is_hub_id(source: str) -> bool:
    """Whether `source` can only be a Hub repository id: no local path of that name, and a valid id."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if Path(source).expanduser().exists():
        return False
    try:
        validate_repo_id(source)
    except HFValidationError:
        return False
    return True


def _offline_switch() -> str | None:
    """What put huggingface_hub in offline mode, for the message (None: it is online). Its own flag decides
    (`constants.HF_HUB_OFFLINE`, read once at import from the first of HF_HUB_OFFLINE and TRANSFORMERS_OFFLINE
    that is set), so the variable named is the one it read."""
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE:
        return None
    named = next((name for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") if os.environ.get(name)), None)
    return f"{named} is set" if named else "huggingface_hub.constants.HF_HUB_OFFLINE is on"


def hub_answers(repo_id: str, what: str, *, subfolder: str | None = None, filename: str | None = None,
                include: Sequence[str] = (), instead: str | None = None) -> None:
    """One request for `repo_id`'s model page, without retries: raises when the Hub cannot be reached or has no such
    model, so an uncached model fails in one line and at once (huggingface_hub retries each download for about 50 s,
    logging every try). In offline mode no request is sent and the message says offline mode is why. `subfolder` and
    `filename` (or the patterns `include`) say which part is needed, for the download command; `instead` replaces
    the advice to give a local copy."""
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError

    part = "/".join(p for p in (subfolder, filename) if p)
    patterns = " ".join(f"'{pattern}'" for pattern in include or ([f"{subfolder}/*"] if subfolder else []))
    if filename:
        command = f"hf download {repo_id} {part}"
    elif patterns:
        command = f"hf download {repo_id} --include {patterns}"
    else:
        command = f"hf download {repo_id}"
    missing = f"{what} {repo_id}{'/' + part if part else ''} is not in the local Hugging Face cache"
    instead = instead or f"give a local {'file' if filename else 'folder'}"
    switch = _offline_switch()
    if switch:
        raise IPAdapterError(
            f"{missing} and offline mode is on ({switch}); download it once with network access and offline mode off "
            f"({command}) or {instead}"
        )
    try:
        huggingface_hub.model_info(repo_id, timeout=10)
    except HfHubHTTPError as err:
        raise IPAdapterError(f"could not load {what} {repo_id} from the Hub: {first_clause(str(err))}") from None
    except Exception:  # noqa: BLE001 - DNS, refused or timed-out connections: all mean "not reachable"
        raise IPAdapterError(
            f"{missing} and the Hub cannot be reached; download it once with network access ({command}) or {instead}"
        ) from None


def from_cache_or_hub(load: Callable[[bool], T], source: str, what: str, *, subfolder: str | None = None,
                      filename: str | None = None, include: Sequence[str] = (), instead: str | None = None) -> T:
    """`load(local_files_only)` from disk first: a local path, or a Hub id's files in the local Hugging Face cache,
    without any HTTP request. Only when a Hub id's files are not all there (the libraries raise an OSError) is the
    Hub asked once (`hub_answers`), then `load(False)` downloads what is missing."""
    try:
        return load(True)
    except OSError:
        if not is_hub_id(source):
            raise
    hub_answers(source, what, subfolder=subfolder, filename=filename, include=include, instead=instead)
    return load(False)


FP16 = {"variant": "fp16"}  # diffusers' and transformers' name for weights stored as `*.fp16.safetensors`


def plain_or_fp16(load: Callable[[dict[str, str]], T]) -> T:
    """`load({})`, the weight files without a variant in their names, else `load(FP16)`: some repositories hold only
    the fp16 files (Kwai-Kolors/Kolors-diffusers), which the libraries read only when told the variant. Neither:
    the first error."""
    try:
        return load({})
    except OSError as err:
        try:
            return load(FP16)
        except (OSError, ValueError):  # diffusers says ValueError where no file has the variant
            raise err from None


def base_part(cls: Any, source: str, what: str, subfolder: str) -> Any:
    """One part of a base (`cls` from its `subfolder`), from disk when it is there (`from_cache_or_hub`), in plain or
    fp16 files; unreadable: one line naming it."""
    try:
        return from_cache_or_hub(lambda local: plain_or_fp16(lambda variant: cls.from_pretrained(
            source, subfolder=subfolder, local_files_only=local, **variant)), source, "the base model")
    except (OSError, ValueError) as err:
        raise IPAdapterError(f"cannot load the {what} from {source}/{subfolder}: {first_clause(str(err))}") from None


# Tokenizers that take a missing vocabulary file for None and fail on it with a TypeError (a traceback, not a reason):
# the file each reads, looked for first.
VOCABULARIES = {"ChatGLMTokenizer": "tokenizer.model"}


def require_vocabulary(tokenizer_class: str, source: str, what: str, subfolder: str = "tokenizer") -> None:
    """The vocabulary file a `VOCABULARIES` tokenizer reads is there (from disk, else the Hub); missing: one line."""
    from transformers.utils import cached_file

    filename = VOCABULARIES.get(tokenizer_class)
    if filename is None:
        return
    try:
        from_cache_or_hub(lambda local: cached_file(source, filename, subfolder=subfolder, local_files_only=local),
                          source, what)
    except OSError as err:
        raise IPAdapterError(f"cannot load the tokenizer from {source}/{subfolder}: {first_clause(str(err))}") from None


def read_config(cls: Any, source: str, subfolder: str) -> dict[str, Any]:
    """A base part's config (`cls.load_config`: no weights read), from disk when it is there (`from_cache_or_hub`;
    the download advice names the whole base, which the caller goes on to use). Unreadable: one line naming the
    folder, with the libraries' reason."""
    try:
        return dict(from_cache_or_hub(lambda local: cls.load_config(source, subfolder=subfolder, local_files_only=local),
                                      source, "the base model"))
    except (OSError, ValueError) as err:
        raise IPAdapterError(f"cannot read {source}/{subfolder}: {first_clause(str(err))}") from None


def default_image_encoder(
    base: str | None, adapter: AdapterSource, needs: set[tuple[str, int]] = frozenset(),
) -> tuple[str, str | None] | None:
    """The encoder a user almost always means: the base folder's own, one beside the adapter, in the folder above or
    in a sibling folder (a local copy of h94/IP-Adapter keeps ViT-H in `models/` and bigG in `sdxl_models/`), the
    first whose config gives the (features, width) pairs the adapters `needs`; else the one a newer family's model
    card names. h94's adapters on the Hub are left to `encoder_by_width`: their widths tell ViT-H from bigG exactly,
    where file names do not (`ip-adapter_sd15_vit-G` is an SD 1.5 adapter on bigG)."""
    if base and (Path(base) / "image_encoder" / "config.json").is_file() and _fits(Path(base, "image_encoder"), needs):
        return str(Path(base)), "image_encoder"
    folder = adapter.path if adapter.path.is_dir() else adapter.path.parent
    for candidate in (folder / "image_encoder", folder.parent / "image_encoder",
                      *sorted(folder.parent.glob("*/image_encoder"))):
        if (candidate / "config.json").is_file() and _fits(candidate, needs):
            return str(candidate), None
    return PUBLISHED_ENCODERS.get(split_hub_path(adapter.source)[0])


def _fits(folder: Path, needs: set[tuple[str, int]]) -> bool:
    """Whether the CLIP vision config in `folder` gives every (features, width) in `needs`; True where the config
    does not say (another kind of encoder, or a config without the widths)."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return True
    tower = config.get("vision_config") or config  # a whole CLIP model's: its projection width is the top level's
    hidden, projection = tower.get("hidden_size"), config.get("projection_dim")
    if hidden is None or projection is None:
        return True
    return needs <= {("global", projection), ("patch", hidden)}


def encoder_by_width(needs: set[tuple[str, int]]) -> tuple[str, str | None] | None:
    """The one published encoder giving every (features, width) in `needs`; None when a width names none, or the
    adapters need different encoders."""
    found = {ENCODERS_BY_WIDTH.get(need) for need in needs}
    return found.pop() if len(found) == 1 else None
