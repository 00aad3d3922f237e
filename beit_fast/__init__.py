"""beit-fast: a performance-first engine for BEiT masked-image-modeling pretraining."""

from .config import PRESETS, BeitConfig
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
    "__version__",
]
