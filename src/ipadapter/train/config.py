"""What a training run is: one dataclass, loadable from YAML or TOML, every field overridable by a CLI flag.

Defaults are the paper's recipe (docs/checkpoints.md §5): AdamW lr 1e-4 constant, weight decay 0.01, batch 8 per device,
512 px (shortest side → 512, centre crop), condition dropout 5% image / 5% text / 5% both.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Collection
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ipadapter.errors import FieldError, IPAdapterError, first_clause
from ipadapter.validation import model_source, read_utf8
from ipadapter.variants import ATTENTION_MODES, TRAINABLE, get_variant

TRAIN_VARIANTS = TRAINABLE
MIXED_PRECISION = ("no", "fp16", "bf16")
OPTIMIZERS = ("adamw", "adamw8bit")

# Settings a FLUX or SD 3 run (train/transformer.py) does not have, refused when set away from their defaults, with
# the reason; and how those runs are named in the refusal.
TRANSFORMER_RUNS = {"flux": "FLUX", "sd3": "SD 3"}
TRANSFORMER_REFUSED = {
    "attention": "the concat ablation is a UNet experiment",
    "references": "one reference image per sample",
    "num_tokens": "the variant sets the tokens (flux: 4, flux-v2: 16, sd3: 64)",
    "lora_rank": "it is a FaceID setting", "id_dim": "it is a FaceID setting",
    "noise_offset": "flow matching mixes latents and noise linearly",
    "snr_gamma": "min-SNR weighting is for DDPM noise levels; flow matching samples sigma instead",
    "prediction_type": "the transformer predicts the flow-matching velocity",
}


def flag(name: str) -> str:
    """The command-line flag of a config field: every field is one ("max_steps" → "--max-steps")."""
    return "--" + name.replace("_", "-")


def parse_stage(text: str) -> tuple[int, int] | None:
    """"512:8000" → (512, 8000); None when it is not two positive integers."""
    parts = str(text).split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        return None
    return int(parts[0]), int(parts[1])


@dataclass
class TrainConfig:
    """One training run. Paths are strings so the config serialises as written."""

    # what to train, on what
    base: str = ""
    image_encoder: str = ""
    data: str = ""
    data_root: str = ""
    variant: str = "base"
    attention: str = "decoupled"
    output: str = "runs/ip-adapter"
    init_from: str = ""
    references: int = 1  # condition images per sample (ref_image_file lists); their tokens are concatenated
    # the paper's recipe
    max_steps: int = 1000
    batch_size: int = 8
    resolution: int = 512
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    seed: int = 42
    drop_image: float = 0.05
    drop_text: float = 0.05
    drop_both: float = 0.05
    # adapter shape (0 = the variant's default)
    num_tokens: int = 0
    lora_rank: int = 128
    id_dim: int = 512
    # options
    grad_accum: int = 1
    max_grad_norm: float = 0.0
    warmup_steps: int = 0
    ema_decay: float = 0.0
    noise_offset: float = 0.0
    snr_gamma: float = 0.0  # min-SNR-gamma loss weighting; 0: the paper's uniform MSE
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    optimizer: str = "adamw"
    prediction_type: str = ""
    # data pipeline
    cache: str = ""
    cache_dtype: str = "float16"
    num_workers: int = 2
    shuffle_buffer: int = 1000
    buckets: bool = False  # aspect-ratio buckets of about resolution² pixels instead of square centre crops
    stages: list[str] = field(default_factory=list)  # "RESOLUTION:STEPS" each, run in order (e.g. 512:8000 1024:2000)
    # checkpoints, logs, validation
    resume: str = ""
    save_every: int = 1000
    keep_checkpoints: int = 1
    log_every: int = 10
    validate_every: int = 0
    validation_images: list[str] = field(default_factory=list)
    validation_prompts: list[str] = field(default_factory=lambda: [""])
    validation_steps: int = 30
    validation_guidance: float = 7.5
    validation_judge: str = ""  # a CLIP (both towers) for CLIP-I / CLIP-T of the validation images

    def __post_init__(self) -> None:
        self.validate()

    # ---- validation: every message names the bad value -------------------------------------------------------
    def validate(self) -> "TrainConfig":
        """Every value in range, or a `FieldError` naming its field (`from_dict` names a flag's value by the flag)."""

        def need(ok: bool, fields: str | tuple[str, ...], problem: str) -> None:
            if not ok:
                raise FieldError(fields, problem)

        if self.variant not in TRAIN_VARIANTS:
            raise IPAdapterError(f"unknown variant {self.variant!r}; valid: {', '.join(TRAIN_VARIANTS)}")
        if self.attention not in ATTENTION_MODES:
            raise IPAdapterError(f"unknown attention {self.attention!r}; valid: {', '.join(ATTENTION_MODES)}")
        need(self.attention == "decoupled" or self.variant == "base", "attention",
             f"{self.attention!r} (the simple-adapter ablation) is for the base variant, not {self.variant!r}")
        need(self.mixed_precision in MIXED_PRECISION, "mixed_precision",
             f"must be one of {', '.join(MIXED_PRECISION)}, not {self.mixed_precision!r}")
        need(self.prediction_type in ("", "epsilon", "v_prediction"), "prediction_type",
             f"must be epsilon or v_prediction (empty: as the base model), not {self.prediction_type!r}")
        need(self.optimizer in OPTIMIZERS, "optimizer",
             f"must be one of {', '.join(OPTIMIZERS)}, not {self.optimizer!r}")
        need(self.cache_dtype in ("float16", "bfloat16", "float32"), "cache_dtype",
             f"must be float16, bfloat16 or float32, not {self.cache_dtype!r}")
        for name in ("max_steps", "batch_size", "resolution", "grad_accum", "save_every", "keep_checkpoints",
                     "log_every", "validation_steps", "id_dim", "references"):
            need(getattr(self, name) >= 1, name, f"must be at least 1, got {getattr(self, name)}")
        for name in ("num_tokens", "lora_rank", "warmup_steps", "validate_every", "num_workers", "shuffle_buffer"):
            need(getattr(self, name) >= 0, name, f"must not be negative, got {getattr(self, name)}")
        for name in ("learning_rate", "weight_decay", "max_grad_norm", "noise_offset", "snr_gamma",
                     "adam_epsilon"):
            value = getattr(self, name)
            need(math.isfinite(value) and value >= 0, name, f"must be a finite number >= 0, got {value}")
        need(self.learning_rate > 0, "learning_rate", f"must be > 0, got {self.learning_rate}")
        for name in ("adam_beta1", "adam_beta2", "ema_decay"):
            value = getattr(self, name)
            need(0.0 <= value < 1.0, name, f"must be in [0, 1), got {value}")
        for name in ("drop_image", "drop_text", "drop_both"):
            value = getattr(self, name)
            need(0.0 <= value <= 1.0, name, f"must be a probability in [0, 1], got {value}")
        total = self.drop_image + self.drop_text + self.drop_both
        need(total <= 1.0 + 1e-9, ("drop_image", "drop_text", "drop_both"), f"must be <= 1, got {total:g}")
        need(not (self.buckets and self.cache), "buckets",
             "cannot be used with a feature cache (its rows have one size)")
        for stage in self.stages:
            need(parse_stage(stage) is not None, "stages",
                 f"must be RESOLUTION:STEPS with positive integers (e.g. 512:8000), not {stage!r}")
        if self.validate_every and not (self.data or self.validation_images):
            raise IPAdapterError("validation needs --validation-images or --data (a feature cache holds features, "
                                 "not images)")
        need(bool(self.validation_prompts), "validation_prompts", "must hold at least one prompt (\"\" for image only)")
        run = TRANSFORMER_RUNS.get(get_variant(self.variant).denoiser)
        if run:
            self._refuse_for_transformer(run)
        return self

    def _refuse_for_transformer(self, run: str) -> None:
        for f in fields(self):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if f.name in TRANSFORMER_REFUSED and getattr(self, f.name) != default:
                raise IPAdapterError(f"{flag(f.name)} does not apply to {run} training: {TRANSFORMER_REFUSED[f.name]}")
        if self.mixed_precision == "fp16":
            raise IPAdapterError(f"--mixed-precision fp16 does not apply to {run} training: use bf16 (no loss scaling "
                                 "on this path; FLUX and SD 3.5 are published in bf16)")

    def check_ready(self, *, data: bool = True) -> None:
        """What a run needs that a partial config (a file plus flags still to come) may lack; `data=False` for what
        only reads the models (`--dry-run`)."""
        if not self.base:
            raise IPAdapterError("no base model: give --base (a diffusers pipeline folder or Hub id) or `base:` in the config")
        model_source(self.base, "--base")
        if self.image_encoder:
            model_source(self.image_encoder, "--image-encoder", subfolders=True)
        if data and not self.data and not self.cache_complete():
            raise IPAdapterError("no training data: give --data (a JSON/JSONL manifest or a tar shard pattern)")
        if self.needs_image_encoder and not self.image_encoder:
            raise IPAdapterError(f"variant {self.variant!r} needs --image-encoder (a CLIP or SigLIP vision model "
                                 "folder or Hub id)")

    def cache_complete(self) -> bool:
        return bool(self.cache) and (Path(self.cache) / "index.json").is_file()

    @property
    def needs_image_encoder(self) -> bool:
        return bool(get_variant(self.variant).clip)

    @property
    def needs_id_embeds(self) -> bool:
        return get_variant(self.variant).face_id

    # ---- loading ----------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "the config",
                  flags: Collection[str] = ()) -> "TrainConfig":
        """A config from field: value pairs; an error about a value names its field (after `source` for a value of the
        wrong type), or its flag for the fields in `flags` (given on the command line)."""
        known = {f.name: f for f in fields(cls)}
        values = {k.replace("-", "_"): v for k, v in values.items()}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise IPAdapterError(f"{source}: unknown field {unknown[0]!r}; valid fields: {', '.join(known)}")
        names = {name: flag(name) for name in flags}
        converted = {k: _coerce(known[k], v, names.get(k, f"{source}: {k}")) for k, v in values.items()}
        try:
            return cls(**converted)
        except FieldError as err:
            raise IPAdapterError(err.worded(names)) from None

    @classmethod
    def load(cls, path: str | Path | None, overrides: dict[str, Any] | None = None) -> "TrainConfig":
        """A YAML (.yaml/.yml) or TOML (.toml) file, then `overrides` (the command line's flags) on top."""
        return cls.merge(read_config_file(path) if path else {}, overrides, source=str(path))

    @classmethod
    def merge(cls, values: dict[str, Any], overrides: dict[str, Any] | None, *, source: str) -> "TrainConfig":
        """A config file's `values` (read from `source`) with the flags given in `overrides` (None: not given) on
        top, for a caller that also reads the file's values itself."""
        given = {k: v for k, v in (overrides or {}).items() if v is not None}
        return cls.from_dict({**values, **given}, source=source, flags=given)  # without a file every value is a flag's

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    text = read_utf8(path, "config file")
    try:
        if path.suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python < 3.11
                import tomli as tomllib
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml", ".json"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            raise IPAdapterError(f"config file {path} must end in .yaml, .yml, .json or .toml")
    except IPAdapterError:
        raise
    except Exception as err:  # the parsers' own error types differ; all mean "not valid syntax"
        raise IPAdapterError(f"cannot parse {path}: {first_clause(str(err))}") from None
    if not isinstance(data, dict):
        raise IPAdapterError(f"{path} must hold a mapping of field: value, not a {type(data).__name__}")
    return data


def _coerce(f: dataclasses.Field, value: Any, name: str) -> Any:
    """`value` as the field's type; `name` is how an error calls the field."""
    kind = f.type  # a string: this module's annotations are postponed (`from __future__ import annotations`)
    try:
        if kind == "bool":
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if kind == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if kind == "float":
            return float(value)
        if kind.startswith("list"):
            if isinstance(value, str):
                return [value]
            return [str(v) for v in value]
        if value is None:
            return ""
        return str(value)
    except (TypeError, ValueError):
        raise IPAdapterError(f"{name} must be {kind}, not {value!r}") from None
