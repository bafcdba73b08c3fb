"""vtprune: visual-token pruning and merging for existing vision transformers and VLMs, no retraining.

    import timm, vtprune
    model = timm.create_model("vit_base_patch16_224", pretrained=True).eval()
    handle = vtprune.apply(model, vtprune.ToMe(r=16))
    logits = model(images)
    handle.remove()
"""
from .api import AlreadyPatchedError, Handle, applied, apply, handle_of, inspect, last_trace, remove
from .methods import FastV, FlowCut, FlowCutLLM, PDrop, PiToMe, Pool2d, RandomKeep, ToMe, TransPrune, VisionZip
from .policy import Policy, parse_spec
from .reduction import MergePlan
from .registry import make_policy, policies, register_policy
from .trace import LayerTokens, Trace
from . import viz  # noqa: E402  (numpy/pillow only; matplotlib loads inside plot_merges)
from . import flops  # noqa: E402  (no host library at import time)

__version__ = "0.1.0"

__all__ = [
    "AlreadyPatchedError", "FastV", "FlowCut", "FlowCutLLM", "Handle", "LayerTokens", "MergePlan", "PDrop", "PiToMe", "Policy",
    "Pool2d", "RandomKeep", "ToMe", "Trace", "TransPrune", "VisionZip",
    "apply", "applied", "handle_of", "inspect", "last_trace", "make_policy", "parse_spec", "policies",
    "register_policy", "remove", "viz", "flops", "__version__",
]
