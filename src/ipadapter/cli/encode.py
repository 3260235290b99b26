"""`ipadapter encode`: run the image encoder once and save the features for later `generate --embeds`."""

from __future__ import annotations

import argparse

from ipadapter.cli.generate import add_model_flags


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "encode", help="encode reference images once and save the embeddings (safetensors)",
        epilog="example:\n  ipadapter encode --image ref.png --out ref.embeds.safetensors\n"
               "  ipadapter generate --embeds ref.embeds.safetensors --out out.png",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_flags(p)
    p.add_argument("--image", action="append", required=True, help="reference image (repeatable)")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ipadapter.conditioning.embeds_file import EncoderIdentity, save_embeds
    from ipadapter.conditioning.images import load_image
    from ipadapter.errors import IPAdapterError
    from ipadapter.cli.generate import load_from_flags
    from ipadapter.loading import check_model_args
    from ipadapter.validation import output_file

    check_model_args(args)
    output_file(args.out, "--out", ".safetensors")
    images = [load_image(p) for p in args.image]
    loaded = load_from_flags(args)
    prompter = loaded.prompter
    adapter = prompter.adapter()
    if prompter.encoder is None:
        raise IPAdapterError("this adapter takes face embeddings, not CLIP features: pass them with --face-embed")
    features = prompter.features(adapter, images)
    save_embeds(args.out, {f"cond.{i}": f for i, f in enumerate(features)},
                encoder=EncoderIdentity.of(prompter.encoder.model, prompter.encoder.name),
                features=adapter.variant.features)
    print(args.out)
    return 0
