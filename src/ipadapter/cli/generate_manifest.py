"""`ipadapter generate --manifest FILE.jsonl --out-dir DIR`: the generate flags as per-job defaults, the jobs from the
manifest, the work from `ipadapter.batch` (sharded when started with `accelerate launch`)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
import functools
import sys

from ipadapter.cli.true_cfg import check_true_cfg, true_cfg_kwargs
from ipadapter.errors import IPAdapterError
from ipadapter.validation import check_counts, model_source

# Flags that name one request's inputs: with --manifest each job names its own (or the flag has no manifest form).
PER_REQUEST = {"image": "--image", "mask": "--mask", "image_weight": "--image-weight", "embeds": "--embeds",
               "face_embed": "--face-embed"}


def check_flags(args: argparse.Namespace) -> None:
    given = [flag for name, flag in PER_REQUEST.items() if getattr(args, name)]
    if given:
        raise IPAdapterError(f"{given[0]} names one request's input; with --manifest give it per job (image, mask, "
                             "image_weight), as --embeds and --face-embed have no manifest form")
    if args.content_text_encoder:
        model_source(args.content_text_encoder, "--content-text-encoder", subfolders=True)
    if not args.out_dir:
        raise IPAdapterError("--manifest needs --out-dir (the folder for the images, index.jsonl and errors.jsonl)")
    check_counts([("--batch-size", args.batch_size)])


def run(args: argparse.Namespace, load: Callable, control: Callable) -> int:
    """`load(args)`: the models the flags name; `control(args)`: the ControlNet keywords (both from `cli.generate`)."""
    from ipadapter.batch.jobs import OPTIONS, read_jobs, require_adapter_names
    from ipadapter.batch.run import Defaults, run_manifest
    from ipadapter.paired_text import PairedText
    from ipadapter.batch.launch import current
    from ipadapter.loading import base_geometry, check_model_args
    from ipadapter.validation import output_folder

    check_flags(args)
    out = output_folder(args.out_dir, "--out-dir")
    shard = current()
    if shard.device is not None and args.device in (None, "cuda"):
        args.device = shard.device  # one GPU per process
    check_model_args(args)
    check_true_cfg(args)
    control = control(args)
    defaults = {name: getattr(args, name) for name in OPTIONS}
    adapters = [str(i) for i in range(max(1, len(args.adapter or [])))]
    manifest = shard.agree(lambda: require_adapter_names(
        read_jobs(args.manifest, defaults, adapters, functools.cache(lambda: base_geometry(args.base))), adapters))
    loaded = shard.agree(lambda: load(args))
    prompter = loaded.prompter
    control = {**control, **true_cfg_kwargs(args.true_cfg, prompter.pipe)}  # one setting for every job of the run
    prompter.pipe.set_progress_bar_config(disable=True)
    prompter.set_s_scale(args.s_scale)
    settings = {name: getattr(args, name) for name in (
        "base", "adapter", "subfolder", "weight_name", "image_encoder", "dtype", "scheduler", "base_lora",
        "base_lora_scale", "controlnet", "control_image", "control_scale", "s_scale", "content_text_encoder",
        "true_cfg")}
    defaults = Defaults(loaded.default_steps, loaded.default_guidance, control,
                        PairedText(prompter.pipe, prompter.encoder, args.content_text_encoder))
    failures = run_manifest(prompter, manifest, out, batch_size=args.batch_size, shard=shard, settings=settings,
                            defaults=defaults)
    if shard.is_main:
        jobs = len(manifest.jobs) + len(manifest.failures)
        print(f"{jobs - len(failures)} of {jobs} jobs done in {out} (index.jsonl)")
        if failures:
            print(f"{len(failures)} failed, listed in {out / 'errors.jsonl'}; first: line {failures[0].line}: "
                  f"{failures[0].error}", file=sys.stderr)
    return 1 if failures else 0
