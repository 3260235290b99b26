"""Library chatter off for command-line runs, so a user's error is the one line on stderr.

transformers, diffusers, accelerate and huggingface_hub log warnings (deprecations, missing optional trackers,
backend fallbacks) and draw loading bars that say nothing a user can act on. Unless `--verbose` or `--debug` is
given, their loggers are set to errors only, their loading bars are off, and Python warnings are ignored. The
denoising and training progress bars are plain tqdm and stay. Environment variables carry the same settings to
worker processes (`accelerate launch`) and to libraries imported later; a value the user has set is kept.
"""

from __future__ import annotations

import logging
import os
import warnings

LIBRARIES = ("transformers", "diffusers", "accelerate", "huggingface_hub", "torch", "PIL", "httpx", "gradio")
ENVIRONMENT = {
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
    "ACCELERATE_LOG_LEVEL": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "PYTHONWARNINGS": "ignore",
}


def quiet_libraries() -> None:
    """All of the above, in this process and, through the environment, in the processes it starts."""
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as transformers_logging

    for key, value in ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    warnings.simplefilter("ignore")
    for name in LIBRARIES:
        logging.getLogger(name).setLevel(logging.ERROR)
    for library in (transformers_logging, diffusers_logging):
        library.set_verbosity_error()
        library.disable_progress_bar()
    disable_progress_bars()


def show_own_logs() -> None:
    """This project's INFO lines (stages, resumes, checkpoints) on stderr. The level is set on the "ipadapter" logger
    itself: accelerate sets the *root* logger's level from ACCELERATE_LOG_LEVEL (errors only, above) each time it
    makes a logger, which silenced a level set on the root."""
    logging.basicConfig(format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("ipadapter").setLevel(logging.INFO)
