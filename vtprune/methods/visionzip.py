"""VisionZip (Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models",
CVPR 2025), checked against the official code (dvlab-research/VisionZip 3151f6d).

At the vision encoder's feature layer, keep the *dominant* tokens the CLS token attends to most and
merge the rest into a few *contextual* tokens by key similarity; the language model gets
``dominant + contextual`` tokens per image. See ``docs/policies/visionzip.md``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..matching import matching_precision
from ..policy import Policy, check_int
from ..reduction import MergePlan
from ..registry import register_policy
from ..view import QKV, LayerView

#: The paper's splits of a total budget (64 = 54 + 10, 128 = 108 + 20, 192 = 162 + 30): 5/32 contextual.
CONTEXTUAL_SHARE = 5 / 32


def split_budget(keep: int) -> tuple[int, int]:
    """``(dominant, contextual)`` for a total of ``keep`` tokens: ``contextual = round(keep · 5/32)``, which
    gives the paper's 54+10, 108+20 and 162+30."""
    contextual = int(round(keep * CONTEXTUAL_SHARE))
    return keep - contextual, contextual


def relay_attention(qkv: QKV, num_protected: int) -> torch.Tensor:
    """Attention the relay pays each patch, summed over heads ``[B, N_patches]`` (official: CLS row of the
    feature layer's attention, ``attn[:, :, 0, 1:].sum(1)``); without a CLS token, the mean query's."""
    q, k = matching_precision(qkv.q), matching_precision(qkv.k)
    query = q[:, :, :1] if num_protected else q.mean(2, keepdim=True)
    return torch.softmax(query @ k.transpose(-1, -2) * qkv.scale, dim=-1).sum(1)[:, 0, num_protected:]


def contextual_plan(keys: torch.Tensor, rest: torch.Tensor, contextual: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Targets and assignment of the contextual merge over the non-dominant tokens ``rest [B, R]`` (input
    indices, ascending). Targets are ``rest[arange(0, R, max(1, R // C))[:C]]`` (uniform stride, as the
    official code); every other token joins the target of highest cosine key similarity.

    Returns ``(targets [B, C], others [B, R - C], assigned [B, R - C])`` where ``assigned`` is the
    target slot (0..C-1) of each other token.
    """
    num_rest = rest.shape[1]
    step = max(1, num_rest // contextual)
    slots = torch.arange(0, num_rest, step, device=rest.device)[:contextual]
    is_target = torch.zeros(num_rest, dtype=torch.bool, device=rest.device)
    is_target[slots] = True
    targets, others = rest[:, slots], rest[:, ~is_target]
    metric = matching_precision(keys)
    metric = metric / metric.norm(dim=-1, keepdim=True)
    gather = lambda index: metric.gather(1, index.unsqueeze(-1).expand(-1, -1, metric.shape[-1]))  # noqa: E731
    similarity = gather(others) @ gather(targets).transpose(1, 2)
    return targets, others, similarity.argmax(dim=-1)


@register_policy
@dataclass(frozen=True)
class VisionZip(Policy):
    """Dominant tokens by CLS attention plus contextual tokens merged by key similarity, at the projector.

    From the feature layer's attention (its CLS row summed over heads) the top ``dominant - 1`` patches are
    kept with the CLS token itself (the official code counts CLS in ``dominant`` and hands its hidden state
    to the projector). The remaining ``R`` patches are split by :func:`contextual_plan` into ``contextual``
    targets and the tokens merged into them; contextual token ``j`` is ``x_target_j + mean(x_i, i -> j)``
    (the official formula: the target is added to, not averaged with, the mean of its assigned tokens; a
    target with nothing assigned is itself). Output order: CLS, dominant patches in raster order,
    contextual tokens in target order. CLS-free encoders (SigLIP): the relay is the mean query and all
    ``dominant`` are patches.

    Args:
        dominant: dominant tokens, CLS included (int >= 1; paper 54 for 64 tokens).
        contextual: contextual tokens (int >= 0; paper 10 for 64 tokens).
        keep: total ``dominant + contextual``; given alone it picks the paper's split (:func:`split_budget`).
    """

    name: ClassVar[str] = "visionzip"
    site: ClassVar[str] = "projector"
    spec_fields: ClassVar[tuple[str, ...]] = ("dominant", "contextual")
    signals: ClassVar[tuple[str, ...]] = ("qkv",)
    hands_on_prefix: ClassVar[bool] = True

    dominant: int | None = None
    contextual: int | None = None
    keep: int | None = None

    def __post_init__(self) -> None:
        dominant, contextual, keep = self.dominant, self.contextual, self.keep
        if keep is not None:
            check_int("keep", keep, minimum=1, policy="visionzip")
            if dominant is None and contextual is None:
                dominant, contextual = split_budget(keep)
        if dominant is None and contextual is None:
            dominant, contextual = 54, 10
        if dominant is None or contextual is None:
            raise ValueError("visionzip: give both dominant and contextual, or keep alone "
                             f"(got dominant={self.dominant!r}, contextual={self.contextual!r}, keep={keep!r})")
        check_int("dominant", dominant, minimum=1, policy="visionzip")
        check_int("contextual", contextual, minimum=0, policy="visionzip")
        if keep is not None and keep != dominant + contextual:
            raise ValueError(f"visionzip: keep={keep} but dominant + contextual = {dominant + contextual}; "
                             "give keep alone or make them agree")
        object.__setattr__(self, "dominant", dominant)
        object.__setattr__(self, "contextual", contextual)
        object.__setattr__(self, "keep", dominant + contextual)

    def handed_on(self, num_patches: int, num_prefix: int, drop_prefix: bool, anyres: bool = False) -> int:
        """``dominant + contextual`` (CLS, when there is one, among the dominant tokens)."""
        return self.dominant + self.contextual

    def reduce(self, view: LayerView) -> MergePlan | None:
        prefix = view.num_protected
        if prefix > 1:
            raise ValueError(f"visionzip expects at most one prefix token (CLS), got {view.prefix_roles}")
        patches = view.num_tokens - prefix
        top = self.dominant - prefix
        if top + self.contextual > patches:
            raise ValueError(f"visionzip: dominant={self.dominant} + contextual={self.contextual} needs more than "
                             f"the {patches} patch tokens of this image (plus {prefix} CLS)")
        qkv = view.qkv
        batch, device = view.hidden.shape[0], view.hidden.device
        dominant = relay_attention(qkv, prefix).topk(top, dim=-1).indices.sort(dim=-1).values + prefix
        head = torch.arange(prefix, device=device).expand(batch, -1)
        if self.contextual == 0:
            return MergePlan.prune(torch.cat([head, dominant], dim=1))
        is_rest = torch.ones(batch, view.num_tokens, dtype=torch.bool, device=device)
        is_rest[:, :prefix] = False
        is_rest.scatter_(1, dominant, False)
        rest = is_rest.nonzero()[:, 1].view(batch, -1)
        targets, others, assigned = contextual_plan(qkv.k.mean(1), rest, self.contextual)
        keep = torch.cat([head, dominant, targets], dim=1)
        first_contextual = prefix + top
        dtype = torch.promote_types(view.hidden.dtype, torch.float32)
        counts = torch.zeros(batch, self.contextual, dtype=dtype, device=device).scatter_add_(
            1, assigned, torch.ones_like(assigned, dtype=dtype)).clamp_min(1)
        weights = torch.ones(batch, view.num_tokens, dtype=dtype, device=device)
        weights.scatter_(1, others, 1.0 / counts.gather(1, assigned))
        return MergePlan(keep=keep, src=others, dst=assigned + first_contextual, weights=weights)
