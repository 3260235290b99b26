"""The `ipadapter generate` command that reproduces a result of the app, quoted for a POSIX shell.

The app and the CLI build the same `GenerationRequest` from the same files (uploads by their saved path, masks as
the greyscale files the app wrote) and the same defaults, so running the line gives the same pixels.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from typing import Any

from ipadapter.app.form import Form

# argparse attribute → flag, for the model flags of `add_model_flags` (repeatable ones are lists).
MODEL_FLAGS = {
    "base": "--base", "adapter": "--adapter", "weight_name": "--weight-name", "subfolder": "--subfolder",
    "image_encoder": "--image-encoder", "device": "--device", "dtype": "--dtype", "scheduler": "--scheduler",
    "vae": "--vae", "text_encoder": "--text-encoder",
}


def model_flags(args: Any) -> list[str]:
    """The model flags the app was started with, as `ipadapter generate` takes them."""
    flags: list[str] = []
    for attr, flag in MODEL_FLAGS.items():
        value = getattr(args, attr, None)
        for item in value if isinstance(value, list) else [value] if value else []:
            flags += [flag, str(item)]
    return flags


def generate_argv(model: Sequence[str], form: Form, mask_paths: Sequence[str], out: str = "out.png") -> list[str]:
    """The argument list of the reproducing command; defaults left out only where the CLI's equal the app's. Without a
    reference the page's image settings changed nothing, and the CLI refuses them, so they are left out too."""
    argv = ["ipadapter", "generate", *model]
    if form.prompt:
        argv += ["--prompt", form.prompt]
    if form.negative_prompt:
        argv += ["--negative-prompt", form.negative_prompt]
    if form.references:
        argv += image_argv(form, mask_paths)
    argv += ["--seed", str(form.seed), "--steps", str(form.steps), "--num-images", str(form.num_images), "--out", out]
    return argv


def image_argv(form: Form, mask_paths: Sequence[str]) -> list[str]:
    """The references and the settings of the image prompt."""
    argv: list[str] = []
    for path in form.references:
        argv += ["--image", path]
    for path in mask_paths:
        argv += ["--mask", path]
    argv += ["--scale", repr(float(form.scale))]
    if form.preset:
        argv += ["--preset", form.preset]
    if (form.start, form.end) != (0.0, 1.0):
        argv += ["--start", repr(float(form.start)), "--end", repr(float(form.end))]
    if form.combine != "concat":
        argv += ["--combine", form.combine]
    if form.negative_image:
        argv += ["--negative-image", form.negative_image]
    if form.content_subtract.strip():
        argv += ["--content-subtract", form.content_subtract, "--content-strength", repr(float(form.content_strength))]
    return argv


def generate_command(model: Sequence[str], form: Form, mask_paths: Sequence[str]) -> str:
    """One line to paste into a shell."""
    return shlex.join(generate_argv(model, form, mask_paths))
