"""`ipadapter app`: the local web page for image prompting (needs the `app` extra: pip install 'ipadapter[app]')."""

from __future__ import annotations

import argparse
import math
import signal
import tempfile

from ipadapter.cli.generate import add_cache_kv_flag, add_model_flags
from ipadapter.errors import FieldError, IPAdapterError
from ipadapter.extras import needs

EXAMPLES = """examples:
  ipadapter app                                    # bundled miniature model, http://127.0.0.1:7860
  ipadapter app --port 8000 --max-upload-mb 5 --max-side 2048
  ipadapter app --base stable-diffusion-v1-5/stable-diffusion-v1-5 --adapter h94/IP-Adapter \\
      --subfolder models --weight-name ip-adapter_sd15.bin
  ipadapter app --host 0.0.0.0                     # reachable from other machines: only on a network you trust
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("app", help="start the local web app", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port to serve on (default 7860)")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest accepted upload in MB (default 20)")
    p.add_argument("--max-side", type=int, default=4096, help="largest accepted image side in pixels (default 4096)")
    p.add_argument("--cache-mb", type=float, default=256.0,
                   help="MB for reference embeddings and projected tokens, reused while the app runs "
                        "(default 256; 0: off)")
    add_cache_kv_flag(p, default=True)  # a re-run with the same reference is the page's common case
    p.set_defaults(func=run)
    needs(p, "app")


def run(args: argparse.Namespace) -> int:
    if not 0 < args.port < 65536:
        raise IPAdapterError(f"--port must be between 1 and 65535, got {args.port}")
    if not args.cache_mb >= 0:
        raise IPAdapterError(f"--cache-mb must be 0 (off) or more, got {args.cache_mb}")
    from ipadapter.app.limits import MB, UploadLimits
    from ipadapter.app.service import GenerationService

    max_bytes = args.max_upload_mb * MB
    if not (math.isfinite(max_bytes) and round(max_bytes) >= 1):  # in MB: UploadLimits counts bytes
        raise IPAdapterError(f"--max-upload-mb must be a positive number of MB, got {args.max_upload_mb:g}")
    try:
        limits = UploadLimits(max_bytes=round(max_bytes), max_side=args.max_side)
    except FieldError as err:
        raise IPAdapterError(err.worded({"max_side": "--max-side"})) from None
    # The masks the page writes live while it serves and go when it stops, on Ctrl-C or on the SIGTERM of `kill`,
    # `docker stop` or a service manager, which stops it the same way.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        with tempfile.TemporaryDirectory(prefix="ipadapter-app-", ignore_cleanup_errors=True) as workdir:
            service = GenerationService.from_args(args, limits=limits, workdir=workdir)
            service.loaded.prompter.cache.resize(round(args.cache_mb * MB))
            from ipadapter.app.ui import build_ui, launch  # gradio takes seconds to import: once the models load

            launch(build_ui(service), host=args.host, port=args.port, limits=limits)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # gradio closes its server on it, as on Ctrl-C
