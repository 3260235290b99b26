"""Fine control over the image prompt : pure building blocks the generation code and CLI compose.

presets: per-layer weights; schedules: step windows and per-step weights; combine: several references into one;
negatives: noise negatives and content subtraction; images / masks: loading and preparing references and masks;
embeds_file: encoded embeddings on disk.
"""
