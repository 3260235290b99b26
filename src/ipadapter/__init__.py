"""ipadapter: image prompts for Stable Diffusion (IP-Adapter, decoupled cross-attention)."""

from ipadapter.adapter import AdapterConfig, IPAdapter
from ipadapter.attach import Attachment, attach
from ipadapter.checkpoint import load_adapter, save_adapter, save_published
from ipadapter.errors import IPAdapterError
from ipadapter.runtime import AdapterPrompt, Reference
from ipadapter.variants import VARIANTS

__all__ = [
    "AdapterConfig", "AdapterPrompt", "Attachment", "IPAdapter", "IPAdapterError", "Reference", "VARIANTS",
    "attach", "load_adapter", "save_adapter", "save_published",
]
__version__ = "0.1.0"
