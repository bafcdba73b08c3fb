"""PiToMe: energy-guided token merging (Tran et al., "Accelerating Transformers with Spectrum-Preserving
Token Merging", NeurIPS 2024), as in the official code at hchautran/PiToMe@550b5de."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..matching import bipartite_matching_macs, bipartite_soft_matching, pitome_matching, pitome_removed_count
from ..policy import Policy, check_bool, check_choice, check_float, check_int
from ..reduction import MergePlan, with_mean_weights
from ..registry import register_policy
from ..schedules import pitome_margin, pitome_token_schedule, pitome_uses_bsm
from ..view import LayerView


@register_policy
@dataclass(frozen=True)
class PiToMe(Policy):
    """Merge ``floor(T - T*ratio)`` of the ``T`` unprotected tokens in every layer, guided by energy.

    Energy ``E_i = mean_j ELU(cos(v_i, v_j) - m_l)`` (the paper's energy score; its kernel exactly as
    the official code at 550b5de computes it, which is the reference here) with
    margin ``m_l = margin_start - margin_slope * l / L``. High-energy tokens (in large clusters) are
    merged first; low-energy (isolated) tokens are protected. Defaults reproduce the official DeiT
    configuration: keys as metric, BSM-PiToMe in the first ``ceil(L/2)`` layers and pure PiToMe after,
    size-weighted merging, no proportional attention.

    Args:
        ratio: per-layer keep fraction of the unprotected tokens, in (0, 1]; 1 disables merging.
            Below 0.5 a layer removes at most half of its tokens (the official code crashes there).
        margin_start, margin_slope: the margin schedule ``m_l = start - slope * l / L``.
        bsm_layers: which layers use a bipartite layer instead of pure PiToMe: ``"first_half"`` (DeiT),
            ``"second_half"`` (MAE), ``"all"``, ``"none"``, or an int ``k``: the first ``k`` layers.
        metric: ``"keys"`` (head-averaged keys) or ``"hidden"`` (hidden states at the merge point).
        alpha: ELU's alpha.
        prop_attn: proportional attention (off in the official DeiT patch).
        bsm: the bipartite layers' kind: ``"pitome"`` (BSM-PiToMe: energy-ordered split) or ``"tome"``
            (ToMe's bipartite soft matching, merging ``floor(N - N*ratio)`` of all ``N`` tokens, the
            official LLaVA patch).
        placement: ``"mid"`` (between attention and MLP) or ``"post"`` (after the MLP; the official
            LLaVA patch). ``"post"`` needs the hf-clip-vision or hf-llava adapter.
        merge: ``"weighted"`` (size-weighted average) or ``"mean"`` (plain mean of each group, sizes
            ignored: the official LLaVA patch's ``merge_mean``).

    ``PiToMe.preset(family)`` gives the official per-family settings, ``"clip_hf"`` the LLaVA-1.5 one.
    """

    name: ClassVar[str] = "pitome"
    site: ClassVar[str] = "vision"
    spec_fields: ClassVar[tuple[str, ...]] = ("ratio",)

    ratio: float = 0.9
    margin_start: float = 0.75
    margin_slope: float = 0.75
    bsm_layers: str | int = "first_half"
    metric: str = "keys"
    alpha: float = 1.0
    prop_attn: bool = False
    bsm: str = "pitome"
    placement: str = "mid"
    merge: str = "weighted"

    def __post_init__(self) -> None:
        object.__setattr__(self, "ratio", check_float("ratio", self.ratio, low=0.0, high=1.0, low_open=True,
                                                      policy="pitome"))
        object.__setattr__(self, "margin_start", check_float("margin_start", self.margin_start, low=-1.0,
                                                             high=1.0, policy="pitome"))
        object.__setattr__(self, "margin_slope", check_float("margin_slope", self.margin_slope, low=-2.0,
                                                             high=2.0, policy="pitome"))
        object.__setattr__(self, "alpha", check_float("alpha", self.alpha, low=0.0, high=float("inf"),
                                                      low_open=True, policy="pitome"))
        if isinstance(self.bsm_layers, int) and not isinstance(self.bsm_layers, bool):
            check_int("bsm_layers", self.bsm_layers, minimum=0, policy="pitome")
        else:
            check_choice("bsm_layers", self.bsm_layers, ("first_half", "second_half", "all", "none"),
                         policy="pitome")
        check_choice("bsm", self.bsm, ("pitome", "tome"), policy="pitome")
        check_choice("placement", self.placement, ("mid", "post"), policy="pitome")
        check_choice("merge", self.merge, ("weighted", "mean"), policy="pitome")
        check_choice("metric", self.metric, ("keys", "hidden"), policy="pitome")
        check_bool("prop_attn", self.prop_attn, policy="pitome")

    @property
    def signals(self) -> tuple[str, ...]:  # type: ignore[override]
        return (self.metric,)

    def proportional_attention(self) -> bool:
        return self.prop_attn

    def reduction_placement(self) -> str:
        return self.placement

    def token_schedule(self, num_tokens: int, num_layers: int,
                       num_protected: int = 0) -> list[tuple[int, int]]:
        """Attention and MLP token counts per layer: ``floor(T - T*ratio)`` of the ``T`` unprotected
        tokens merged (all ``N`` counted in ToMe-matching layers), clamped to ``T // 2``."""
        return pitome_token_schedule(num_tokens, num_layers, self.ratio, num_protected,
                                     counts_all=lambda layer: self._uses_tome(layer, num_layers),
                                     post=self.placement == "post")

    def _uses_tome(self, layer: int, num_layers: int) -> bool:
        return self.bsm == "tome" and pitome_uses_bsm(layer, num_layers, self.bsm_layers)

    def matching_macs(self, num_tokens: int, num_protected: int, dims: dict[str, int], *, layer: int | None = None,
                      num_layers: int | None = None) -> int:
        """The energy's cosine-similarity matrix over the ``T`` unprotected tokens: ``T² · d_metric`` (the BSM
        variant reuses it for its scores). In a layer that runs ToMe's matching instead (``bsm="tome"``, the
        ``clip_hf`` preset's layers 0-12; known only when ``layer`` and ``num_layers`` are given), ToMe's score
        matrix over all ``N`` tokens: ``ceil(N/2) · floor(N/2) · d_metric``."""
        if layer is not None and num_layers is not None and self._uses_tome(layer, num_layers):
            return bipartite_matching_macs(num_tokens, dims[self.metric])
        unprotected = num_tokens - num_protected
        return unprotected * unprotected * dims[self.metric]

    @classmethod
    def preset(cls, family: str, **overrides: object) -> "PiToMe":
        """The official code's configuration for a model family (merging.md §3.3), e.g.
        ``PiToMe.preset("clip", ratio=0.9)``. Families: ``deit`` (the defaults), ``mae``, ``clip`` (LAVIS
        CLIP, open_clip-style towers), ``blip``, ``blip2``, ``clip_hf`` (the LLaVA-1.5 CLIP tower in HF
        transformers: after the MLP, plain mean, ToMe's matching in layers 0-12). Keyword arguments
        override preset fields."""
        if family not in PRESETS:
            raise ValueError(f"pitome: unknown preset {family!r}; presets: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[family], **overrides})

    def margin(self, layer: int, num_layers: int) -> float:
        return pitome_margin(layer, num_layers, self.margin_start, self.margin_slope)

    def reduce(self, view: LayerView) -> MergePlan | None:
        if self._uses_tome(view.layer, view.num_layers):
            r = pitome_removed_count(view.num_tokens, self.ratio)
            plan = bipartite_soft_matching(view.signal(self.metric), r, view.num_protected) if r > 0 else None
        else:
            r = pitome_removed_count(view.num_tokens - view.num_protected, self.ratio)
            if r <= 0:
                return None
            plan = pitome_matching(
                view.signal(self.metric), r,
                margin=self.margin(view.layer, view.num_layers),
                num_protected=view.num_protected,
                bsm=pitome_uses_bsm(view.layer, view.num_layers, self.bsm_layers),
                alpha=self.alpha,
            )
        if plan is not None and self.merge == "mean":
            plan = with_mean_weights(plan, view.num_tokens, torch.promote_types(view.hidden.dtype, torch.float32))
        return plan


PRESETS: dict[str, dict[str, object]] = {
    "deit": {},
    "mae": {"bsm_layers": "second_half"},
    "clip": {"metric": "hidden", "margin_start": 0.95, "margin_slope": 0.95, "bsm_layers": "none"},
    "blip": {"metric": "hidden", "margin_start": 0.9, "margin_slope": 0.9, "bsm_layers": "none"},
    "blip2": {"margin_start": 0.75, "margin_slope": 0.4, "bsm_layers": "none", "prop_attn": True},
    "clip_hf": {"metric": "hidden", "margin_start": 0.9, "margin_slope": 0.9, "bsm_layers": 13, "bsm": "tome",
                "placement": "post", "merge": "mean"},
}
"""Official per-family settings at hchautran/PiToMe@550b5de (patch/{deit,mae,clip,blip,blip2,clip_hf}.py)."""
