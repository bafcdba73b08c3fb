"""What a policy sees at one reduction point: a read-only view of the layer with lazy signals."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class LayerView:
    """One reduction point, handed by an adapter to a policy.

    ``hidden`` is the sequence at the reduction point ``[B, N, C]``; its first ``num_protected`` tokens
    (roles in ``prefix_roles``: ``"cls"``, ``"dist"``, ``"register"``) must survive unchanged and stay in
    front. ``size`` is the number of original tokens inside each token ``[B, N, 1]`` (``None`` before
    the first merge). Signals (``"keys"``: keys averaged over heads ``[B, N, head_dim]``; ``"hidden"``)
    are computed only when a policy asks for them.
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

    @property
    def num_tokens(self) -> int:
        return self.hidden.shape[1]

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
