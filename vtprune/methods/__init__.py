"""The policies shipped with vtprune (each registers itself by name)."""
from .baselines import Pool2d, RandomKeep
from .flowcut import FlowCut
from .pitome import PiToMe
from .tome import ToMe
from .visionzip import VisionZip

__all__ = ["FlowCut", "PiToMe", "Pool2d", "RandomKeep", "ToMe", "VisionZip"]
