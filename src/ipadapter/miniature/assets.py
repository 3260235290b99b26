"""The recipes' view of the bundled weights: `ipadapter.bundled` is their one home (the core reads it too)."""

from ipadapter.bundled import (
    ASSETS_DIR, CONTROLNET_DIR, CUSTOM_LORA_DIR, JUDGE_DIR, PIPELINE_DIR, controlnet_path, custom_lora_path,
    image_encoder_path, judge_path, pipeline_path,
)

__all__ = ["ASSETS_DIR", "CONTROLNET_DIR", "CUSTOM_LORA_DIR", "JUDGE_DIR", "PIPELINE_DIR", "controlnet_path",
           "custom_lora_path", "image_encoder_path", "judge_path", "pipeline_path"]
