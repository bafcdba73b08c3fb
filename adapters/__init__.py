"""Adapters: one module per host-model family. Installed as ``vtprune.adapters``."""
from __future__ import annotations

from torch import nn

from .base import Adapter, Inspection
from .patching import Patch
from .timm_vit import TimmViTAdapter

ADAPTERS: list[Adapter] = [TimmViTAdapter()]


class UnsupportedModelError(TypeError):
    """No adapter matches the model."""


def find_adapter(model: nn.Module) -> Adapter:
    """The adapter for ``model``; raises :class:`UnsupportedModelError` listing the supported families."""
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"vtprune patches torch.nn.Module models, got {type(model).__name__}")
    for adapter in ADAPTERS:
        if adapter.matches(model):
            return adapter
    families = "; ".join(f"{adapter.name}: {adapter.family}" for adapter in ADAPTERS)
    raise UnsupportedModelError(
        f"no vtprune adapter matches {type(model).__module__}.{type(model).__name__}. Supported families: "
        f"{families}. Pass the vision model itself (e.g. a timm VisionTransformer), not a wrapper around it."
    )


__all__ = ["ADAPTERS", "Adapter", "Inspection", "Patch", "TimmViTAdapter", "UnsupportedModelError", "find_adapter"]
from .hf_clip import HFVisionAdapter  # noqa: E402
ADAPTERS.append(HFVisionAdapter())
from .open_clip_vit import OpenClipViTAdapter  # noqa: E402
ADAPTERS.append(OpenClipViTAdapter())
from .hf_llava import HFLlavaAdapter  # noqa: E402
ADAPTERS.append(HFLlavaAdapter())
