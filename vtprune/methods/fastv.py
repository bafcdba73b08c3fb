"""FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024) and PyramidDrop (Xing et al.,
"PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual Redundancy Reduction",
CVPR 2025): visual tokens dropped between decoder layers of the language model, ranked by one query
token's attention."""
from __future__ import annotations

import math

from dataclasses import dataclass
from typing import ClassVar

from ..policy import Policy, check_choice, check_float, check_int
from ..reduction import MergePlan
from ..registry import register_policy
from ..sequence import POSITION_MODES, keep_visual, query_rows, visual_scores
from ..view import LayerView



@register_policy
@dataclass(frozen=True)
class FastV(Policy):
    """After decoder layer ``k - 1`` (0-based; the ``k``-th layer), keep the ``floor(N·(1 - r))`` visual tokens
    the last prompt token attended to most in that layer (its own attention, averaged over heads: the
    official code's ranking; the paper's text says "average attention received"). Layers ``k`` onwards
    see only those.

    Args:
        k: the layer after which tokens are dropped, as in the paper (int >= 1; K = 2).
        r: fraction of the visual tokens dropped (paper R = 0.5 or 0.75), in [0, 1).
        position_mode: ``"compact"`` (positions renumbered over the kept tokens, like the official LLaVA
            codes of FlowCut/TransPrune; vtprune's default) or ``"keep"`` (original positions: the
            official FastV code).
    """

    name: ClassVar[str] = "fastv"
    site: ClassVar[str] = "llm"
    spec_fields: ClassVar[tuple[str, ...]] = ("k", "r")
    signals: ClassVar[tuple[str, ...]] = ("attention", "tokens")

    k: int = 2
    r: float = 0.5
    position_mode: str = "compact"

    def __post_init__(self) -> None:
        check_int("k", self.k, minimum=1, policy="fastv")
        object.__setattr__(self, "r", check_float("r", self.r, low=0.0, high=1.0, high_open=True, policy="fastv"))
        check_choice("position_mode", self.position_mode, POSITION_MODES, policy="fastv")

    def kept(self, num_tokens: int) -> int:
        """``floor(N·(1 - r))`` visual tokens kept (FastV's ``(1 - R) × N``), exact where ``N·(1 - r)`` is a whole
        number that binary floating point misses (2880 at ``r=0.9``: 288, not 287)."""
        return math.floor(round(num_tokens * (1 - self.r), 9))

    def token_schedule(self, num_tokens: int, num_layers: int, num_protected: int = 0) -> list[tuple[int, int]]:
        """Visual tokens per decoder layer: ``N`` in layers ``0..k-1``, :meth:`kept` after."""
        kept = self.kept(num_tokens)
        return [(num_tokens, num_tokens) if layer < self.k else (kept, kept) for layer in range(num_layers)]

    def reduce(self, view: LayerView) -> MergePlan | None:
        if view.layer != self.k - 1:
            return None
        tokens = view.signal("tokens")
        rows = query_rows(view.signal("attention"), tokens.last[:, None], tokens.attended)[:, 0]
        kept = self.kept(tokens.num_visual_original)
        return keep_visual(tokens, visual_scores(rows, tokens).topk(kept, dim=-1).indices, view.num_tokens)


@register_policy
@dataclass(frozen=True)
class PDrop(Policy):
    """PyramidDrop: at the end of each stage (before decoder layers ``layers``, 0-based, i.e. after layers
    8, 16 and 24 of 32 counted from 1) keep ``floor(N·lam)`` of the ``N`` visual tokens left, ranked by the
    last instruction token's attention computed with the next layer's query/key projections (576 -> 288
    -> 144 -> 72 on LLaVA-1.5).

    Args:
        layers: the decoder layers that start a new stage (ints >= 1, increasing; paper 8, 16, 24).
        lam: fraction kept at each stage boundary, in (0, 1] (paper λ = 0.5).
        position_mode: ``"compact"`` (default) or ``"keep"``; see :class:`FastV`.
    """

    name: ClassVar[str] = "pdrop"
    site: ClassVar[str] = "llm"
    spec_fields: ClassVar[tuple[str, ...]] = ("layers", "lam")
    signals: ClassVar[tuple[str, ...]] = ("next_attention", "tokens")

    layers: tuple = (8, 16, 24)
    lam: float = 0.5
    position_mode: str = "compact"

    def __post_init__(self) -> None:
        layers = tuple(self.layers) if isinstance(self.layers, (list, tuple)) else self.layers
        if not isinstance(layers, tuple) or not layers:
            raise ValueError(f"pdrop: layers must be a non-empty list of layer numbers, got {self.layers!r}")
        for index, layer in enumerate(layers):
            check_int(f"layers[{index}]", layer, minimum=1, policy="pdrop")
        if list(layers) != sorted(set(layers)):
            raise ValueError(f"pdrop: layers must be strictly increasing, got {list(layers)}")
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "lam", check_float("lam", self.lam, low=0.0, high=1.0, low_open=True,
                                                    policy="pdrop"))
        check_choice("position_mode", self.position_mode, POSITION_MODES, policy="pdrop")

    def kept(self, num_tokens: int, stage: int) -> int:
        for _ in range(stage):
            num_tokens = int(num_tokens * self.lam)
        return num_tokens

    def token_schedule(self, num_tokens: int, num_layers: int, num_protected: int = 0) -> list[tuple[int, int]]:
        stage = lambda layer: sum(1 for start in self.layers if layer >= start)  # noqa: E731
        return [(self.kept(num_tokens, stage(layer)),) * 2 for layer in range(num_layers)]

    def reduce(self, view: LayerView) -> MergePlan | None:
        if view.layer + 1 not in self.layers or view.layer + 1 >= view.num_layers:
            return None
        tokens = view.signal("tokens")
        rows = query_rows(view.signal("next_attention"), tokens.last[:, None], tokens.attended)[:, 0]
        kept = int(tokens.visual.shape[1] * self.lam)
        return keep_visual(tokens, visual_scores(rows, tokens).topk(kept, dim=-1).indices, view.num_tokens)
