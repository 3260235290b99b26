"""Checks on user input that run before any model is loaded or any image generated, each failing with one sentence.

Shared by the CLI, the trainer, the app and the evaluation, so one rule holds everywhere:
- reference images are regular files (not folders, FIFOs or devices) whose header declares at most `max_pixels()`
  pixels (default 4096 × 4096 = 16.7 MP, set with the environment variable IPADAPTER_MAX_PIXELS); the header is read
  before the pixels, so a small file declaring a huge picture is refused without being decoded;
- output paths name a file (not a folder) in a folder that exists or can be created, and that can be written;
- generation sizes are positive multiples of the base's step; a lone width or height keeps the base's default
  aspect ratio (square for Stable Diffusion);
- the device exists; seeds fit a 64-bit generator; scales and guidance are not negative.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ipadapter.errors import IPAdapterError, first_clause

PIXELS_ENV = "IPADAPTER_MAX_PIXELS"
DEFAULT_MAX_PIXELS = 4096 * 4096
MAX_SEED = 2**64 - 1


def max_pixels() -> int:
    """The pixel limit for one reference or training image: IPADAPTER_MAX_PIXELS, else 4096 × 4096."""
    text = os.environ.get(PIXELS_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(float(text))
    except ValueError:
        value = 0
    if value < 1:
        raise IPAdapterError(f"{PIXELS_ENV} must be a positive number of pixels, got {text!r}")
    return value


def check_pixels(width: int, height: int, what: str, limit: int | None = None) -> None:
    """Exact pixel counts in the refusal: rounded to megapixels, an image just over the limit read as equal to it."""
    limit = max_pixels() if limit is None else limit
    if width * height > limit:
        raise IPAdapterError(
            f"{what} is {width}x{height} px ({width * height:,} pixels); the limit is {limit:,} pixels "
            f"(set {PIXELS_ENV} to allow more)"
        )


def regular_file(path: str | os.PathLike, what: str) -> Path:
    """`path` if it is an existing regular file; a folder, FIFO, socket or device is refused (a FIFO would hang)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise IPAdapterError(f"{what} not found: {path}") from None
    except OSError as err:
        raise IPAdapterError(f"cannot read {what} {path} ({err.strerror})") from None
    if stat.S_ISDIR(mode):
        raise IPAdapterError(f"{what} {path} is a folder, not a file")
    if not stat.S_ISREG(mode):
        raise IPAdapterError(f"{what} {path} is not a regular file (a pipe or device?)")
    return Path(path)


def check_image_file(path: str | os.PathLike, what: str = "image") -> Path:
    """A regular file whose image header is readable and within the pixel limit (pixels are not decoded here)."""
    from PIL import Image

    path = regular_file(path, what)
    try:
        with Image.open(path) as probe:
            width, height = probe.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise IPAdapterError(f"cannot read {path} as an image ({type(err).__name__}: {err})") from None
    check_pixels(width, height, str(path))
    return path


def output_file(path: str | os.PathLike, flag: str, suffix: str | None = None) -> Path:
    """An output file that can be written: not a folder, its folder creatable, writable."""
    path = Path(path)
    if suffix and path.suffix.lower() != suffix:
        raise IPAdapterError(f"{flag} must name a {suffix} file, got {path}")
    if path.is_dir():
        raise IPAdapterError(f"{flag} {path} is a folder; name a file inside it")
    if path.exists() and not path.is_file():
        raise IPAdapterError(f"{flag} {path} exists and is not a regular file")
    output_folder(path.parent, flag, shown=path)
    return path


def output_folder(folder: str | os.PathLike, flag: str, shown: str | os.PathLike | None = None) -> Path:
    """A folder that exists or can be created, and can be written; nothing is left here. Writable is tried, not
    asked: a file is made in the nearest existing folder, since os.access answers yes to root (and for the real,
    not the effective, user) where a write fails, e.g. in /proc. The file is unnamed where the system has those
    (Linux's O_TMPFILE), so there is nothing to remove, even in an append-only folder; else it is named and removed."""
    folder = Path(folder)
    shown = shown or folder
    probe = folder.absolute()
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise IPAdapterError(f"{flag} {shown}: {probe} is a file, not a folder")
    unnamed = getattr(os, "O_TMPFILE", 0)
    if unnamed:
        try:
            os.close(os.open(probe, unnamed | os.O_WRONLY, 0o600))
            return folder
        except OSError:  # not writable, or a file system without unnamed files: the named file decides
            pass
    try:
        handle, made = tempfile.mkstemp(dir=probe, prefix=".ipadapter-write-probe-")
    except OSError:
        raise IPAdapterError(f"{flag} {shown}: the folder {probe} is not writable") from None
    os.close(handle)
    with contextlib.suppress(OSError):  # an append-only folder takes files but keeps them: writable all the same
        os.unlink(made)
    return folder


def vae_downscale(vae_config: Any) -> int:
    """Pixels per latent along a side: the VAE halves the image between its blocks (SD's four blocks: 8). A base's
    generation sizes and training resolutions are multiples of it."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def generation_size(width: int | None, height: int | None, step: int, default: tuple[int, int]) -> tuple[int, int]:
    """(width, height) for the pipeline: both given, or one given and the other from the base's default aspect."""
    for flag, value in (("--width", width), ("--height", height)):
        if value is not None and value <= 0:
            raise IPAdapterError(f"{flag} must be a positive number of pixels, got {value}")
    default_w, default_h = default
    if width is None and height is None:
        return default_w, default_h
    if height is None:
        height = max(step, round(width * default_h / default_w / step) * step)
    elif width is None:
        width = max(step, round(height * default_w / default_h / step) * step)
    for flag, value in (("--width", width), ("--height", height)):
        if value % step:
            lower = value - value % step
            nearest = f"{lower} or {lower + step}" if lower else f"{step}"
            raise IPAdapterError(f"{flag} {value} does not fit this base model: sizes are multiples of {step}; "
                                 f"try {nearest}")
    return width, height


def check_seed(seed: int) -> int:
    if not 0 <= seed <= MAX_SEED:
        raise IPAdapterError(f"--seed must be a whole number from 0 to 2**64-1, got {seed}")
    return seed


def check_counts(values: Iterable[tuple[str, int | None]]) -> None:
    """Counts named by their flag (None: not given) are at least 1."""
    for flag, value in values:
        if value is not None and value < 1:
            raise IPAdapterError(f"{flag} must be at least 1, got {value}")


def check_not_negative(values: Iterable[tuple[str, float | None]]) -> None:
    for flag, value in values:
        if value is not None and value < 0:
            raise IPAdapterError(f"{flag} must not be negative, got {value:g}")


def check_device(device: str | None) -> str:
    """The device to run on: the given one if this machine has it, else CUDA when available, else the CPU."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise IPAdapterError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise IPAdapterError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise IPAdapterError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise IPAdapterError(f"--device {device}: MPS is not available on this machine (use --device cpu)")
    elif parsed.type not in ("cpu", "cuda", "mps"):
        raise IPAdapterError(f"unsupported device {device!r}; use cpu, cuda, cuda:N or mps")
    return device


def model_source(value: str, what: str, *, subfolders: bool = False) -> str:
    """A local path that exists, or something shaped like a Hub id (`owner/name`, `owner/name/sub/folder` where
    `subfolders`); a path that does not exist is reported as a missing path, not as a malformed Hub id. `what`
    names it in the message: the flag, or the kind of model where that says more."""
    if Path(value).expanduser().exists():
        return value
    parts = value.split("/")
    looks_local = value.startswith((".", "/", "~")) or "\\" in value or value.endswith("/") or len(parts) < 2
    if looks_local or (len(parts) > 2 and not subfolders):
        raise IPAdapterError(f"{what} not found: {value} (no such file or folder; a Hub model id has the form "
                             "owner/name)")
    return value


def tensor_shapes(path: str | os.PathLike, advice: str) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in a safetensors file, from its header alone (no weight is read): what a file holds is
    checked before anything is loaded. A file safetensors cannot parse is refused, followed by `advice`."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except Exception as err:  # noqa: BLE001 - the library raises its own error types for a file it cannot parse
        reason = first_clause(str(err))
        raise IPAdapterError(f"{path} is not a .safetensors file ({reason}); {advice}") from None


def read_utf8(path: str | os.PathLike, what: str) -> str:
    """A text file's contents; a file that is not UTF-8 is refused with the line of the first bad byte."""
    raw = regular_file(path, what).read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise IPAdapterError(f"{what} {path} is not UTF-8 text (byte {err.start}, line {line}); save it as UTF-8") from None
