"""ToMe: Token Merging (Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..matching import bipartite_matching_macs, bipartite_soft_matching
from ..policy import Policy, check_bool, check_float, check_int
from ..reduction import MergePlan
from ..registry import register_policy
from ..schedules import tome_schedule, tome_token_schedule
from ..view import LayerView


@register_policy
@dataclass(frozen=True)
class ToMe(Policy):
    """Merge ``r`` tokens per layer by bipartite soft matching on head-averaged keys.

    Merging happens between each block's attention and its MLP, size-weighted; with ``prop_attn``
    (default, as the official timm patch) attention adds ``log(size)`` to the key logits (paper Eq. 1).
    Protected prefix tokens (CLS, distillation, registers) are never merged. ``r`` is silently capped
    at ``(N - protected) // 2`` per layer, like the official code.

    Args:
        r: tokens merged per layer (int >= 0); or ToMe's schedule tuple ``(r, inflect)`` (split into
            ``r`` and ``inflect``, e.g. ``(16, -1)``); or a list with one entry per layer (zero-padded
            to the depth, extra entries ignored; stored as an immutable :class:`LayerSchedule`).
        inflect: schedule inflection in [-1, 1]; 0 = constant, -1 = decreasing from 2r to 0.
        prop_attn: proportional attention.
    """

    name: ClassVar[str] = "tome"
    site: ClassVar[str] = "vision"
    spec_fields: ClassVar[tuple[str, ...]] = ("r",)
    signals: ClassVar[tuple[str, ...]] = ("keys",)

    r: int | tuple | list = 16
    inflect: float = 0.0
    prop_attn: bool = True

    def __post_init__(self) -> None:
        r, inflect = self.r, self.inflect
        if isinstance(r, tuple) and not isinstance(r, LayerSchedule):
            if len(r) != 2:
                raise ValueError(f"tome: a tuple r is ToMe's (r, inflect) pair; got {r!r}. "
                                 "Pass a list for a per-layer schedule")
            if inflect != 0.0:
                raise ValueError("tome: give the inflection either inside r=(r, inflect) or as inflect=, not both")
            r, inflect = r
        if isinstance(r, list):
            r = LayerSchedule(r)
        if isinstance(r, LayerSchedule):
            if not r:
                raise ValueError("tome: a per-layer r list must not be empty")
            r = LayerSchedule(check_int(f"r[{i}]", value, policy="tome") for i, value in enumerate(r))
        else:
            r = check_int("r", r, policy="tome")
        inflect = check_float("inflect", inflect, low=-1.0, high=1.0, policy="tome")
        if isinstance(r, LayerSchedule) and inflect != 0.0:
            raise ValueError("tome: inflect applies to a constant r, not to a per-layer list")
        check_bool("prop_attn", self.prop_attn, policy="tome")
        object.__setattr__(self, "r", r)
        object.__setattr__(self, "inflect", inflect)

    def schedule(self, num_layers: int) -> list[int]:
        """Tokens to merge in each of ``num_layers`` layers (before the per-layer cap)."""
        if isinstance(self.r, LayerSchedule):
            return tome_schedule(num_layers, 0, layers=self.r)
        return tome_schedule(num_layers, self.r, self.inflect)

    def proportional_attention(self) -> bool:
        return self.prop_attn

    def token_schedule(self, num_tokens: int, num_layers: int,
                       num_protected: int = 0) -> list[tuple[int, int]]:
        """Attention and MLP token counts per layer: ``r_l`` capped at ``(N_l - num_protected) // 2``."""
        return tome_token_schedule(num_tokens, self.schedule(num_layers), num_protected)

    def matching_macs(self, num_tokens: int, num_protected: int, dims: dict[str, int], *, layer: int | None = None,
                      num_layers: int | None = None) -> int:
        """The score matrix ``A @ Bᵀ`` of bipartite matching: ``ceil(N/2) · floor(N/2) · d_keys``
        (protected tokens are in it, masked afterwards)."""
        return bipartite_matching_macs(num_tokens, dims["keys"])

    def reduce(self, view: LayerView) -> MergePlan | None:
        r = self.schedule(view.num_layers)[view.layer]
        if r <= 0:
            return None
        return bipartite_soft_matching(view.keys, r, view.num_protected)



class LayerSchedule(tuple):
    """A per-layer ``r`` (what a list becomes inside a frozen :class:`ToMe`); a plain tuple means
    ToMe's ``(r, inflect)`` pair, as in the official ``parse_r``."""
