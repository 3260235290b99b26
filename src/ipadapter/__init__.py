"""ipadapter: image prompts for Stable Diffusion (IP-Adapter, decoupled cross-attention).

    import ipadapter
    with ipadapter.load(pipe, "h94/IP-Adapter", subfolder="models", weight_name="ip-adapter_sd15.bin") as prompter:
        images = prompter.generate(reference, prompt="best quality", scale=0.6)
"""

from ipadapter.adapter import AdapterConfig, IPAdapter
from ipadapter.attach import Attachment, attach
from ipadapter.checkpoint import adapter_from_state_dict, load_adapter, save_adapter, save_published
from ipadapter.errors import IPAdapterError
from ipadapter.loading import load
from ipadapter.prompter import ImagePrompter
from ipadapter.runtime import AdapterPrompt, Reference
from ipadapter.variants import VARIANTS

__all__ = [
    "AdapterConfig", "AdapterPrompt", "Attachment", "IPAdapter", "IPAdapterError", "ImagePrompter", "Reference",
    "VARIANTS", "adapter_from_state_dict", "attach", "load", "load_adapter", "save_adapter", "save_published",
]
__version__ = "0.1.0"
