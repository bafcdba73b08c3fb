"""FlowCut, vision stage (Tong et al., "FlowCut: Rethinking Redundancy via Information Flow for Efficient
Vision-Language Models", NeurIPS 2025, arXiv 2505.19536), checked against the official code (a2ecd24).

Inside the vision encoder, every layer scores each patch token by how much information flows through it
from the relay token (CLS) and accumulates the score; every ``interval`` layers it drops tokens, as many
as the entropy of the relay's attention allows, and at the second-to-last layer it cuts to exactly
``keep``. See ``docs/policies/flowcut.md``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..matching import matching_precision
from ..policy import Policy, check_choice, check_float, check_int
from ..reduction import MergePlan
from ..registry import register_policy
from ..sequence import POSITION_MODES, keep_visual
from ..view import QKV, LayerView


def relay_scores(qkv: QKV, num_protected: int, relay: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(relay_attention, score)`` over the patch tokens ``[B, N_patches]`` of one layer.

    ``relay="cls"`` (paper Sec. 3.1-3.2, official ``compute_score``): ``A = mean_h softmax(q_cls kᵀ · scale)``
    and ``S_sem = mean_h softmax(v_cls vᵀ)`` (no scaling, as the official code), both over all tokens and
    then sliced to the patches; ``score = (A / ΣA + S_sem / ΣS_sem) · ‖mean_h v‖₁``.
    ``relay="mean"`` (CLS-free encoders, official Qwen2-VL code): the relay query is the mean query over
    the tokens, ``A = mean_h softmax(q̄ kᵀ · scale)`` and ``score = A · ‖mean_h v‖₁`` (no semantic term).
    Computed in at least float32.
    """
    q, k, v = (matching_precision(tensor) for tensor in (qkv.q, qkv.k, qkv.v))
    density = v.mean(1)[:, num_protected:].abs().sum(-1)  # information density, L1 of the head-mean value
    if relay == "cls":
        attention = torch.softmax(q[:, :, :1] @ k.transpose(-1, -2) * qkv.scale, dim=-1).mean(1)[:, 0]
        semantic = torch.softmax(v[:, :, :1] @ v.transpose(-1, -2), dim=-1).mean(1)[:, 0]
        attention, semantic = attention[:, num_protected:], semantic[:, num_protected:]
        score = (attention / attention.sum(-1, keepdim=True) + semantic / semantic.sum(-1, keepdim=True)) * density
        return attention, score
    query = q.mean(2, keepdim=True)
    attention = torch.softmax(query @ k.transpose(-1, -2) * qkv.scale, dim=-1).mean(1)[:, 0, num_protected:]
    return attention, attention * density


def adaptive_prune_count(attention: torch.Tensor, remaining_layers: int, target: int) -> int:
    """Tokens to drop now (paper Sec. 3.1; official ``adaptive_prune_ratio``):
    ``round((N - T) / sqrt(L_rem) · (1 - (H / log N)²))`` with ``H`` the entropy of the relay attention
    renormalised over the ``N`` patches; the maximum over the batch before rounding (so batches stay
    rectangular), rounded half to even like ``torch.round``.
    """
    num = attention.shape[-1]
    prob = attention / attention.sum(-1, keepdim=True)
    entropy = -(prob * prob.clamp_min(torch.finfo(prob.dtype).tiny).log()).sum(-1)
    ratio = entropy / math.log(num) if num > 1 else torch.zeros_like(entropy)
    count = (num - target) / math.sqrt(remaining_layers) * (1 - ratio ** 2)
    return int(count.max().double().round().item())


@register_policy
@dataclass(frozen=True)
class FlowCut(Policy):
    """Prune patch tokens inside the vision encoder by cumulative information-flow importance.

    At every layer while more than ``keep`` patches remain: ``S_cum <- history · S_cum + (1 - history) · S``
    with ``S`` from :func:`relay_scores` (the first layer starts ``S_cum = S``). With ``F`` the last layer
    whose output is used (``LayerView.final_layer``: LLaVA's feature layer, else the last layer) and
    ``L_rem = F - 1 - layer``: when
    ``L_rem`` is a multiple of ``interval`` it keeps the ``max(N - P, keep)`` patches of highest ``S_cum``
    (``P`` from :func:`adaptive_prune_count`; at ``L_rem = 0`` exactly ``keep``), in raster order. On
    LLaVA-1.5 (24 layers, feature layer -2) that is layers 1, 3, ..., 19 and the forced cut at layer 21,
    as the official code. The relay is the CLS token, or the mean query for CLS-free encoders (SigLIP).
    Protected prefix tokens (CLS) are kept and not counted in ``keep``.

    Args:
        keep: patch tokens left after the final cut (int >= 1).
        interval: prune every ``interval`` layers (int >= 1; paper: 2).
        history: weight of the accumulated score in the update, in [0, 1) (paper: 0.5).
    """

    name: ClassVar[str] = "flowcut"
    site: ClassVar[str] = "vision"
    spec_fields: ClassVar[tuple[str, ...]] = ("keep",)
    signals: ClassVar[tuple[str, ...]] = ("qkv",)

    keep: int = 64
    interval: int = 2
    history: float = 0.5

    def __post_init__(self) -> None:
        check_int("keep", self.keep, minimum=1, policy="flowcut")
        check_int("interval", self.interval, minimum=1, policy="flowcut")
        object.__setattr__(self, "history",
                           check_float("history", self.history, low=0.0, high=1.0, high_open=True, policy="flowcut"))

    def matching_macs(self, num_tokens: int, num_protected: int, dims: dict[str, int], *, layer: int | None = None,
                      num_layers: int | None = None) -> int:
        """The relay's products over all ``N`` tokens, every head together: ``q_cls·Kᵀ`` and ``v_cls·Vᵀ``
        (``2 · N · d_hidden``) with a CLS relay, ``q̄·Kᵀ`` (``N · d_hidden``) without one (:func:`relay_scores`).
        FlowCut scores every layer until the final cut; the analytic count books this at the layers that
        prune."""
        return (2 if num_protected else 1) * num_tokens * dims["hidden"]

    def handed_on(self, num_patches: int, num_prefix: int, drop_prefix: bool, anyres: bool = False) -> int:
        """:meth:`target` patches (the prefix is kept inside the tower and dropped by the host if it drops it)."""
        return min(self.target(anyres), num_patches) + (0 if drop_prefix else num_prefix)

    def image_budget(self) -> int:
        """``keep`` tokens per LLaVA-NeXT image when FlowCut runs alone: vtprune then cuts the packed stage-1
        tokens to ``keep`` by the encoder's cumulative scores. The official second cut (to ``keep``, after
        decoder layer 1, by the last prompt token) is :class:`FlowCutLLM` at the ``llm`` site; composed with
        it, the adapter leaves the per-image cut to it."""
        return self.keep

    def target(self, anyres: bool) -> int:
        """Patches kept per sequence: ``keep``, or ``keep // 2`` per crop of an anyres image (LLaVA-NeXT; the
        official stage-1 budget ``int(T / 2)``)."""
        return max(self.keep // 2, 1) if anyres else self.keep

    def reduce(self, view: LayerView) -> MergePlan | None:
        patches = view.num_tokens - view.num_protected
        remaining = view.final_layer - 1 - view.layer
        target = self.target(view.anyres)
        if patches <= target or remaining < 0:
            return None
        relay = "cls" if view.has_class_token else "mean"
        attention, score = relay_scores(view.qkv, view.num_protected, relay)
        previous = view.memory.get("score")
        cumulative = score if previous is None else self.history * previous + (1 - self.history) * score
        view.memory["score"] = cumulative
        if remaining % self.interval:
            return None
        drop = adaptive_prune_count(attention, remaining, target) if remaining else patches
        kept = max(patches - drop, target)
        if kept >= patches:
            return None
        order = cumulative.topk(kept, dim=-1).indices.sort(dim=-1).values
        view.memory["score"] = cumulative.gather(1, order)
        prefix = torch.arange(view.num_protected, device=order.device).expand(order.shape[0], -1)
        return MergePlan.prune(torch.cat([prefix, order + view.num_protected], dim=1))


def llm_stage_scores(qkv: QKV, tokens) -> torch.Tensor:
    """FlowCut's language-model score (official ``LlamaSdpaAttention_forward``), ``[B, n_visual]``: with the
    last prompt token's query and value against the visual keys and values (RoPE applied),
    ``relation = mean_h softmax(q_last·K_visᵀ / √d)``, ``semantic = mean_h softmax(v_last·V_visᵀ / √d)``
    (both over the visual tokens only), ``score = (relation/Σ + semantic/Σ) · ‖mean_h V_vis‖₁``."""
    q, k, v = (matching_precision(tensor) for tensor in (qkv.q, qkv.k, qkv.v))
    heads, dim = q.shape[1], q.shape[-1]
    pick = lambda t, index: t.gather(2, index[:, None, :, None].expand(-1, heads, -1, dim))  # noqa: E731
    last = tokens.last[:, None]
    k_vis, v_vis = pick(k, tokens.visual), pick(v, tokens.visual)
    relation = torch.softmax(pick(q, last) @ k_vis.transpose(-1, -2) / math.sqrt(dim), dim=-1).mean(1)[:, 0]
    semantic = torch.softmax(pick(v, last) @ v_vis.transpose(-1, -2) / math.sqrt(dim), dim=-1).mean(1)[:, 0]
    density = v_vis.mean(1).abs().sum(-1)
    return (relation / relation.sum(-1, keepdim=True) + semantic / semantic.sum(-1, keepdim=True)) * density


@register_policy
@dataclass(frozen=True)
class FlowCutLLM(Policy):
    """FlowCut's second stage (LLaVA-NeXT and Qwen2-VL in the official code): after decoder layer ``layer``
    (0-based; official 1), keep the ``keep`` visual tokens of highest :func:`llm_stage_scores`, in order.
    Compose it with the vision stage: ``[FlowCut(keep=160), FlowCutLLM(keep=160)]``; with it, the vision
    stage leaves its per-crop ``keep // 2`` to this cut (no per-image cut at packing).

    Args:
        keep: visual tokens kept (int >= 1).
        layer: the decoder layer after which the cut happens (int >= 0; official 1).
        position_mode: ``"compact"`` (renumbered, the official LLaVA code; default) or ``"keep"`` (original
            positions, the official Qwen2-VL code).
    """

    name: ClassVar[str] = "flowcut_llm"
    site: ClassVar[str] = "llm"
    spec_fields: ClassVar[tuple[str, ...]] = ("keep",)
    signals: ClassVar[tuple[str, ...]] = ("attention", "tokens")

    keep: int = 64
    layer: int = 1
    position_mode: str = "compact"

    def __post_init__(self) -> None:
        check_int("keep", self.keep, minimum=1, policy="flowcut_llm")
        check_int("layer", self.layer, minimum=0, policy="flowcut_llm")
        check_choice("position_mode", self.position_mode, POSITION_MODES, policy="flowcut_llm")

    def token_schedule(self, num_tokens: int, num_layers: int, num_protected: int = 0) -> list[tuple[int, int]]:
        """Visual tokens per decoder layer: ``N`` up to layer ``layer`` (the cut comes after it), then
        ``min(keep, N)``."""
        kept = min(self.keep, num_tokens)
        return [(num_tokens, num_tokens) if layer <= self.layer else (kept, kept) for layer in range(num_layers)]

    def reduce(self, view: LayerView) -> MergePlan | None:
        tokens = view.signal("tokens")
        if view.layer != self.layer or tokens.visual.shape[1] <= self.keep:
            return None
        scores = llm_stage_scores(view.signal("attention"), tokens)
        return keep_visual(tokens, scores.topk(self.keep, dim=-1).indices, view.num_tokens)
