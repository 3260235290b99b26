"""The miniature "shapes world": a procedurally drawn dataset and the tiny models trained on it on a CPU.

It lets `ipadapter generate` run offline in seconds and lets IP-Adapter quality be measured honestly: a tiny CLIP
(text encoder + the adapters' image encoder), a tiny Stable Diffusion, and an independent judge. See
docs/miniature.md for the recipes, their measured times and accuracies.
"""
