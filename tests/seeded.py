"""Deterministic weights for tiny test models, independent of the host library's own initialiser.

timm's random initialisation differs between releases; golden fixtures generated with the official
ToMe / PiToMe code (on timm 0.4.12 and 1.0.x) must see the same weights as the tests here. Every
floating-point entry of the state dict is overwritten in sorted-key order from one seeded generator:
LayerNorm gains get ``1 + 0.1·N(0, 1)``, everything else ``0.05·N(0, 1)``.
"""
from __future__ import annotations

import torch
from torch import nn


def _layernorm_weight_keys(model: nn.Module) -> set[str]:
    keys = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.LayerNorm) and module.weight is not None:
            keys.add(f"{name}.weight" if name else "weight")
    return keys


@torch.no_grad()
def seeded_init_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Overwrite every floating-point parameter/buffer of ``model`` deterministically (in place)."""
    generator = torch.Generator().manual_seed(seed)
    gains = _layernorm_weight_keys(model)
    state = model.state_dict()
    new_state = {}
    for key in sorted(state):
        tensor = state[key]
        if not tensor.is_floating_point():
            new_state[key] = tensor
            continue
        noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32)
        value = 1.0 + 0.1 * noise if key in gains else 0.05 * noise
        new_state[key] = value.to(tensor.dtype)
    model.load_state_dict(new_state)
    return model


def seeded_images(batch: int = 4, size: int = 224, seed: int = 1, dtype=torch.float64) -> torch.Tensor:
    """Standard-normal images ``[batch, 3, size, size]`` from a seeded generator (drawn in float32)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=generator, dtype=torch.float32).to(dtype)
