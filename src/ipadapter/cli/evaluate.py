"""`ipadapter evaluate`: generate over a manifest under a protocol, measure, and write the report."""

from __future__ import annotations

import argparse
import hashlib
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from ipadapter.cli.generate import add_model_flags, as_flags, finite_float, with_flags
from ipadapter.errors import IPAdapterError
from ipadapter.extras import needs

if TYPE_CHECKING:
    from ipadapter.batch.shards import Shard
    from ipadapter.evaluate.manifests import Manifest
    from ipadapter.evaluate.protocols import Protocol

MANIFEST_EXAMPLES = """examples:
  ipadapter manifest coco annotations/captions_val2017.json val2017/ --out coco_val2017.jsonl
  ipadapter manifest dreambench dreambooth/dataset/ --out dreambench.jsonl
"""
EXAMPLES = """examples:
  ipadapter evaluate --out eval/miniature                      # bundled miniature model, its judge, held-out scenes
  ipadapter evaluate --out eval/sweep --scales 0,0.5,1 --samples 2 --limit 8
  ipadapter evaluate --protocol paper-table1 --manifest coco_val2017.jsonl --out eval/table1 \\
      --base stable-diffusion-v1-5/stable-diffusion-v1-5 --adapter h94/IP-Adapter --subfolder models \\
      --weight-name ip-adapter_sd15.bin
""" + MANIFEST_EXAMPLES.removeprefix("examples:\n")


def parse_scales(text: str | None) -> tuple[float, ...] | None:
    """The --scales list; negative scales are refused as `generate --scale` and manifests refuse them."""
    from ipadapter.validation import check_not_negative

    if not text:
        return None
    try:
        scales = tuple(finite_float(part.strip()) for part in text.split(",") if part.strip())
    except argparse.ArgumentTypeError as err:
        raise IPAdapterError(f"--scales must be a comma list of numbers: {err}") from None
    check_not_negative(("--scales", scale) for scale in scales)
    return scales


SUMMARY = "measure adapters under a protocol: CLIP-I, CLIP-T, DINO-I, FID, LPIPS, face ID"
# Each option's help, by its flag (prose for people, kept apart from the parser's wiring).
HELP = {
    "--manifest": "JSONL of {image_file, text} (default on the miniature model: held-out scenes)",
    "--out": "run folder: samples/, results.json, report.md, PNGs (resumable)",
    "--protocol": "preset (default: miniature without --base, else paper-table1); flags override its fields",
    "--scales": "comma list of image prompt scales, e.g. 0,0.5,1.0",
    "--samples": "samples per reference and scale",
    "--steps": "denoising steps",
    "--guidance": "classifier-free guidance scale",
    "--seed": "sample k of reference i uses seed + 10000·i + k (default 0)",
    "--judge": "judge CLIP folder or Hub id (a full CLIPModel)",
    "--prompt-mode": "generate from the image alone (empty) or with the manifest text (text)",
    "--limit": "use the first N references (the miniature manifest has N, default 12)",
    "--name": "method name per --adapter for the tables",
    "--dino": "DINOv2 folder or cached Hub id for DINO-I (default facebook/dinov2-base)",
    "--inception": "inception-2015-12-05.pt TorchScript file for FID",
    "--width": "image width in pixels (default: the base's)",
    "--height": "image height in pixels (default: the base's)",
}
MANIFEST_HELP = {
    "manifest": "write an evaluation manifest from COCO captions or a DreamBench folder",
    "coco": "COCO captions JSON + image folder → one entry per image (first caption)",
    "captions": "captions_val2017.json",
    "images": "the folder holding the COCO images",
    "--limit": "first N images by id (N at least 1; default: all)",
    "dreambench": "DreamBench folder → subject × prompt entries",
    "folder": "folder with one subfolder per subject and prompts_and_classes.txt",
    "--images-per-subject": "reference images per subject (default 1)",
    "--out": "manifest .jsonl to write",
}


def register(sub: argparse._SubParsersAction) -> None:
    from ipadapter.evaluate.protocols import PROTOCOLS

    p = sub.add_parser("evaluate", help=SUMMARY, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p)
    options = {"--out": {"required": True}, "--protocol": {"choices": sorted(PROTOCOLS)},
               "--samples": {"type": int}, "--steps": {"type": int}, "--guidance": {"type": finite_float},
               "--seed": {"type": int, "default": 0}, "--prompt-mode": {"choices": ("empty", "text")},
               "--limit": {"type": int}, "--name": {"action": "append"}, "--width": {"type": int},
               "--height": {"type": int}}
    for flag, text in HELP.items():
        p.add_argument(flag, help=text, **options.get(flag, {}))
    p.set_defaults(func=run)
    needs(p, "eval")

    m = sub.add_parser("manifest", help=MANIFEST_HELP["manifest"], epilog=MANIFEST_EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    kinds = m.add_subparsers(dest="manifest_kind", required=True)
    coco = kinds.add_parser("coco", help=MANIFEST_HELP["coco"])
    coco.add_argument("captions", help=MANIFEST_HELP["captions"])
    coco.add_argument("images", help=MANIFEST_HELP["images"])
    coco.add_argument("--limit", type=int, help=MANIFEST_HELP["--limit"])
    dream = kinds.add_parser("dreambench", help=MANIFEST_HELP["dreambench"])
    dream.add_argument("folder", help=MANIFEST_HELP["folder"])
    dream.add_argument("--images-per-subject", type=int, default=1, help=MANIFEST_HELP["--images-per-subject"])
    for kind in (coco, dream):
        kind.add_argument("--out", required=True, help=MANIFEST_HELP["--out"])
        kind.set_defaults(func=write_manifest_command)


def write_manifest_command(args: argparse.Namespace) -> int:
    """Check the flags and the output path, convert, then report what the file holds: its entries, and the
    references left out of it."""
    from ipadapter.evaluate.manifests import from_coco_captions, from_dreambench
    from ipadapter.validation import check_counts, output_file

    coco = args.manifest_kind == "coco"
    check_counts([("--limit", args.limit) if coco else ("--images-per-subject", args.images_per_subject)])
    out = output_file(args.out, "--out")
    if coco:
        manifest = from_coco_captions(args.captions, args.images, out, limit=args.limit)
    else:
        manifest = from_dreambench(args.folder, out, images_per_subject=args.images_per_subject)
    left_out = f", {len(manifest.skipped)} left out" if manifest.skipped else ""
    print(f"wrote {manifest.path}: {len(manifest.entries)} entries{left_out}")
    for line in manifest.skipped[:20]:
        print(f"  left out {line}")
    if len(manifest.skipped) > 20:
        print(f"  ... and {len(manifest.skipped) - 20} more")
    return 0


def method_names(args: argparse.Namespace) -> list[str]:
    """One name per --adapter (the bundled base adapter without one), checked before anything loads."""
    count = len(args.adapter or ()) or 1
    if args.name:
        if len(args.name) != count:
            raise IPAdapterError(f"give --name once per adapter ({count}), not {len(args.name)} times")
        return list(args.name)
    if not args.adapter:
        return ["miniature base adapter"]
    names = [Path(w or a).stem for a, w in zip(args.adapter, args.weight_name or [None] * count)]
    return [n if names.count(n) == 1 else f"{n} ({i})" for i, n in enumerate(names)]


# The flags that choose a measuring model, and the metrics that model serves: a protocol measuring none of them
# would leave the flag unused.
MEASURING_FLAGS = {"judge": ("clip_i", "clip_t"), "dino": ("dino_i",), "inception": ("fid",)}


def refuse_unused(args: argparse.Namespace, chosen: Protocol) -> None:
    """A measuring model the protocol never uses is refused, naming the protocols that would use it."""
    from ipadapter.evaluate.protocols import PROTOCOLS

    for flag, metrics in MEASURING_FLAGS.items():
        if getattr(args, flag) is None or set(metrics) & set(chosen.metrics):
            continue
        users = [p.name for p in PROTOCOLS.values() if set(metrics) & set(p.metrics)]
        raise IPAdapterError(f"--{flag} is not used by the {chosen.name} protocol (it measures "
                             f"{', '.join(chosen.metrics)}); it serves --protocol {' or '.join(users)}")


def check_flags(args: argparse.Namespace, chosen: Protocol) -> Path:
    """Every flag checked, reading configs at most: a refused run loads no model and leaves nothing in --out.
    Returns the output folder (not created)."""
    from ipadapter.evaluate.protocols import MINIATURE_JUDGE
    from ipadapter.loading import base_geometry, check_model_args
    from ipadapter.validation import (check_counts, check_not_negative, check_seed, generation_size, model_source,
                                      output_folder)

    check_counts((f"--{flag}", getattr(args, flag)) for flag in ("samples", "steps", "limit"))
    check_model_args(args)
    check_seed(args.seed)
    check_not_negative([("--guidance", args.guidance)])
    refuse_unused(args, chosen)
    if args.judge and args.judge != MINIATURE_JUDGE:
        model_source(args.judge, "--judge")
    if not args.manifest and chosen.name != "miniature":
        raise IPAdapterError(f"the {chosen.name} protocol needs --manifest ({chosen.references})")
    out = output_folder(args.out, "--out")
    if args.width is not None or args.height is not None:
        args.width, args.height = generation_size(args.width, args.height, *base_geometry(args.base))
    return out


def miniature_references(out: Path, count: int) -> Manifest:
    """The miniature protocol's references, built whole into `out`/references (by the main process; the others read
    `out`/references/manifest.jsonl once it is there)."""
    from ipadapter.atomic import replacing_folder
    from ipadapter.evaluate.manifests import read_manifest
    from ipadapter.miniature.protocol import miniature_manifest

    folder = out / "references"
    with replacing_folder(folder) as building:
        miniature_manifest(building, count)
    return read_manifest(folder / "manifest.jsonl")


def judge_loaders(source: str, device: str):
    """(judge CLIP loader, attribute-classifier loader); "miniature" means the bundled judge's models."""
    from ipadapter.evaluate.judges import ClipJudge
    from ipadapter.evaluate.protocols import MINIATURE_JUDGE

    def judge() -> ClipJudge:
        if source != MINIATURE_JUDGE:
            return ClipJudge.load(source, device=device)
        from ipadapter.miniature.protocol import clip_judge

        return clip_judge()

    def attributes():
        from ipadapter.miniature.protocol import attribute_judge

        return attribute_judge()

    return judge, attributes


def run(args: argparse.Namespace) -> int:
    try:
        return _evaluate(args)
    except IPAdapterError as err:
        raise as_flags(err) from None


def _toolbox(box):
    """The metrics' reasons for skipping, in the command line's words."""
    box.skipped = {metric: with_flags(why) for metric, why in box.skipped.items()}
    return box


def _evaluate(args: argparse.Namespace) -> int:
    from ipadapter.batch.launch import current
    from ipadapter.evaluate.manifests import read_manifest
    from ipadapter.evaluate.protocols import protocol

    chosen = protocol(args.protocol or ("paper-table1" if args.base else "miniature"))
    out = check_flags(args, chosen)
    names = method_names(args)
    scales = parse_scales(args.scales) or chosen.scales
    given = read_manifest(args.manifest, limit=args.limit) if args.manifest else None  # read only: checked first
    shard = current()  # under `accelerate launch`: this process's share; the main process measures and reports
    if shard.device is not None and args.device in (None, "cuda"):
        args.device = shard.device  # one GPU per process for generation
    fresh = not out.exists()
    try:
        return _measure(args, chosen, out, names, scales, given, shard)
    except BaseException:
        if fresh and shard.count == 1 and not any((out / "samples").rglob("*.png")):
            shutil.rmtree(out, ignore_errors=True)  # a run that made no sample leaves no folder behind
        raise


def _measure(args: argparse.Namespace, chosen: Protocol, out: Path, names: list[str], scales: tuple[float, ...],
             given: Manifest | None, shard: Shard) -> int:
    """Load the measuring and generating models, then write: the references (miniature), the samples, the report."""
    from ipadapter.cli.generate import load_from_flags
    from ipadapter.evaluate.manifests import read_manifest
    from ipadapter.evaluate.protocols import deviations
    from ipadapter.evaluate.report import Report, write_report
    from ipadapter.evaluate.runner import Plan, base_modules, generate, prompter_sampler, weights_digest
    from ipadapter.evaluate.scoring import build_toolbox, score

    samples = args.samples or chosen.samples
    empty_prompt = chosen.empty_prompt if args.prompt_mode is None else args.prompt_mode == "empty"
    judge_source = args.judge or chosen.judge
    args.scheduler = args.scheduler or chosen.scheduler
    device = args.device or "cpu"

    # Measuring models first: a wrong judge should fail before hours of generation, not after.
    judge, attributes = judge_loaders(judge_source, device)
    has_attrs = given is None or any(e.attrs for e in given.entries)  # the miniature's references have them
    box = shard.agree(lambda: _toolbox(build_toolbox(chosen.metrics, judge, dino=args.dino, inception=args.inception,
                                                     attributes=attributes if has_attrs else None, device=device))
                      if shard.is_main else None)
    loaded = shard.agree(lambda: load_from_flags(args))
    loaded.prompter.pipe.set_progress_bar_config(disable=True)
    count = args.limit or chosen.reference_count
    manifest = given or shard.agree(lambda: miniature_references(out, count) if shard.is_main else None)
    manifest = manifest or read_manifest(out / "references" / "manifest.jsonl")
    steps = args.steps or chosen.steps
    guidance = args.guidance if args.guidance is not None else chosen.guidance
    settings = {"manifest_sha256": hashlib.sha256(manifest.path.read_bytes()).hexdigest()[:16], "base": loaded.base,
                "adapters": args.adapter or ["miniature base"], "weight_names": args.weight_name,
                "adapter_weights": weights_digest(list(loaded.prompter.adapters.values())),
                "base_weights": weights_digest(base_modules(loaded.prompter), per_tensor=64),
                "image_encoder": args.image_encoder, "steps": steps, "guidance": guidance,
                "scheduler": args.scheduler, "width": args.width, "height": args.height, "dtype": args.dtype}
    plan = Plan(tuple(names), scales, samples, args.seed, empty_prompt, settings)
    sampler = prompter_sampler(loaded.prompter, dict(zip(names, loaded.prompter.adapters)), steps=steps,
                               guidance=guidance, width=args.width, height=args.height)
    generate(plan, manifest.entries, out, sampler, shard=shard)
    shard.wait()
    if not shard.is_main:
        return 0

    rows = score(plan, manifest.entries, out, box)
    used = {"samples": samples, "scales": list(scales), "steps": steps, "guidance": guidance,
            "scheduler": args.scheduler, "empty_prompt": empty_prompt, "judge": judge_source,
            "references": len(manifest.entries)}
    report = Report(chosen, {**used, "seed": args.seed, "methods": names},
                    deviations(chosen, used), judge_source, rows, manifest.skipped, box.skipped)
    paths = write_report(report, plan, manifest.entries, out)
    for row in rows:
        shown = {k: round(v, 4) for k, v in row.items() if isinstance(v, float) and k != "scale"}
        print(f"{row['name']} @ {row['scale']:g}: {shown}")
    if manifest.skipped:
        print(f"skipped {len(manifest.skipped)} reference(s); listed in {paths['markdown']}")
    print(f"wrote {paths['results']} and {paths['markdown']}")
    return 0
