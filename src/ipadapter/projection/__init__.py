"""Projection heads: image (or face-ID) features → tokens in the UNet's cross-attention space.

Module names copy the published checkpoints' `image_proj` keys, so loading is a key-for-key copy.
"""

from ipadapter.projection.detect import ProjectionConfig, build_projection, detect_projection, new_projection
from ipadapter.projection.faceid import FaceIDPlusProjection, FaceIDProjection
from ipadapter.projection.linear import LinearProjection
from ipadapter.projection.resampler import Resampler
from ipadapter.projection.token_mlp import TokenMLPProjection

__all__ = [
    "FaceIDPlusProjection",
    "FaceIDProjection",
    "LinearProjection",
    "ProjectionConfig",
    "Resampler",
    "TokenMLPProjection",
    "build_projection",
    "detect_projection",
    "new_projection",
]
