"""IP-Adapters on diffusion transformers: FLUX's double-stream blocks and SD 3 / 3.5's joint blocks.

The same runtime (`runtime.AdapterPrompt`, `Reference`) drives them as the UNet's cross-attention: per-block weights,
step window, several adapters, masks on the known token grid, negatives, exact detach. Entry points:
`dit.checkpoint.load_dit_adapter`, `dit.attach.attach_dit`; `ImagePrompter` and `ipadapter.load` pick them for a
pipeline with a transformer. docs/architecture.md shows where these modules sit; docs/checkpoints.md lists the
published layouts they read.
"""
