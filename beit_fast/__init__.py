"""beit-fast: a performance-first engine for BEiT masked-image-modeling pretraining."""

from .config import PRESETS, BeitConfig
from .dropin import (
    PatchReport,
    patch,
    patch_report,
    patch_timm_models,
    patch_transformers_models,
    unpatch,
    unpatch_models,
)
from .masking import BlockwiseMaskGenerator, RandomMaskGenerator
from .model import BeitForImageClassification, BeitForMaskedImageModeling, BeitModel, MaskedImageModelingOutput
from .segmentation import BeitForSemanticSegmentation

__version__ = "0.1.0"

__all__ = [
    "BeitConfig",
    "PRESETS",
    "BeitModel",
    "BeitForMaskedImageModeling",
    "BeitForImageClassification",
    "BeitForSemanticSegmentation",
    "MaskedImageModelingOutput",
    "BlockwiseMaskGenerator",
    "RandomMaskGenerator",
    "patch",
    "patch_report",
    "patch_timm_models",
    "patch_transformers_models",
    "unpatch",
    "unpatch_models",
    "PatchReport",
    "__version__",
]
