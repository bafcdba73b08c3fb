"""What a policy sees at one reduction point: a read-only view of the layer with lazy signals."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass(frozen=True)
class QKV:
    """The queries, keys and values of one attention layer, per head: each ``[B, H, N, head_dim]``, as the
    layer's projections produced them (after any q/k norm, before scaling). ``scale`` is the factor the
    layer applies to ``q·kᵀ`` before its softmax (usually ``head_dim ** -0.5``)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scale: float


@dataclass
class LayerView:
    """One reduction point, handed by an adapter to a policy.

    ``hidden`` is the sequence at the reduction point ``[B, N, C]``; its first ``num_protected`` tokens
    (roles in ``prefix_roles``: ``"cls"``, ``"dist"``, ``"register"``) must survive unchanged and stay in
    front. ``size`` is the number of original tokens inside each token ``[B, N, 1]`` (``None`` before
    the first merge). Signals are computed only when a policy asks for them: ``"keys"`` (keys averaged
    over heads ``[B, N, head_dim]``), ``"qkv"`` (a :class:`QKV` of the layer's attention), ``"hidden"``.

    ``memory`` is a dict private to this policy for the duration of one call (one forward), for
    policies that carry scores from layer to layer (FlowCut's cumulative importance). ``grid`` is the
    ``(rows, cols)`` patch grid when the non-prefix tokens are still the full, unreduced grid in raster
    order (projector site), else ``None``. ``anyres``: every sequence of the batch is one crop of an
    image encoded crop by crop (LLaVA-NeXT); budgets then apply per crop. ``last_layer``: the last layer
    whose output is used (LLaVA's feature layer, 22 of 0..23), when it is not the last one
    (:attr:`final_layer`).
    """

    site: str
    layer: int
    num_layers: int
    hidden: torch.Tensor
    num_protected: int
    prefix_roles: tuple[str, ...]
    size: torch.Tensor | None
    _provider: Callable[[str], torch.Tensor] = field(repr=False, default=None)  # type: ignore[assignment]
    _cache: dict = field(default_factory=dict, repr=False)
    memory: dict = field(default_factory=dict, repr=False)
    grid: tuple[int, int] | None = None
    anyres: bool = False
    last_layer: int | None = None

    @property
    def num_tokens(self) -> int:
        return self.hidden.shape[1]

    @property
    def final_layer(self) -> int:
        """The last layer whose output is used: ``last_layer``, else ``num_layers - 1``."""
        return self.last_layer if self.last_layer is not None else self.num_layers - 1

    @property
    def has_class_token(self) -> bool:
        return "cls" in self.prefix_roles

    def signal(self, name: str) -> torch.Tensor:
        """The named signal for this layer (computed at most once)."""
        if name == "hidden":
            return self.hidden
        if name not in self._cache:
            if self._provider is None:
                raise ValueError(f"signal {name!r} is not available at {self.site} layer {self.layer}")
            self._cache[name] = self._provider(name)
        return self._cache[name]

    @property
    def keys(self) -> torch.Tensor:
        return self.signal("keys")

    @property
    def qkv(self) -> QKV:
        return self.signal("qkv")  # type: ignore[return-value]
