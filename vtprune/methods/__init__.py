"""The policies shipped with vtprune (each registers itself by name)."""
from .baselines import Pool2d, RandomKeep
from .fastv import FastV, PDrop
from .flowcut import FlowCut, FlowCutLLM
from .pitome import PiToMe
from .tome import ToMe
from .transprune import TransPrune
from .visionzip import VisionZip

__all__ = ["FastV", "FlowCut", "FlowCutLLM", "PDrop", "PiToMe", "Pool2d", "RandomKeep", "ToMe", "TransPrune", "VisionZip"]
