"""Token matching as pure tensor functions: ToMe's bipartite soft matching and PiToMe's energy matching.

Every function takes a metric ``[B, N, d]`` (one row per token of the current sequence, protected
prefix tokens first) and returns a :class:`~vtprune.reduction.MergePlan` or ``None`` (no change).
Matching decisions are made under ``torch.no_grad()``, in at least float32 (the official code uses the
metric's dtype; in bfloat16 that flips many near-ties); applying the plan stays differentiable.

Token order after a merge follows the official implementations exactly, because the next layer's
alternating split depends on it:

* ToMe (facebookresearch/ToMe ``bipartite_soft_matching``): ``[prefix, unmerged A, B]``, the unmerged
  A tokens in index order when the sequence has prefix tokens, else in descending best-score order.
* PiToMe, BSM variant: ``[prefix, unmerged A (descending best-score order), B (energy order)]``.
* PiToMe, pure variant: ``[prefix, protected (descending energy), B (energy order)]``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .reduction import MergePlan


def _arange_like(n: int, ref: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.arange(n, device=ref.device).expand(batch, n)


def cosine_normalize(metric: torch.Tensor) -> torch.Tensor:
    """``metric / ||metric||`` over the last dimension (ToMe divides without an epsilon)."""
    return metric / metric.norm(dim=-1, keepdim=True)


def matching_precision(metric: torch.Tensor) -> torch.Tensor:
    """The metric in at least float32: scores of half-precision metrics (a cosine resolution of ~4e-3
    in bfloat16) flip near-tie decisions far more often. float32/float64 metrics are unchanged."""
    return metric.to(torch.promote_types(metric.dtype, torch.float32))


def bipartite_soft_matching(metric: torch.Tensor, r: int, num_protected: int = 0) -> MergePlan | None:
    """ToMe's bipartite soft matching (Bolya et al., ICLR 2023, Sec. 3.1, "Bipartite Soft Matching").

    Tokens alternate into sets A (even positions) and B (odd positions); each A token draws an edge to
    its most similar B token (cosine similarity of ``metric``); the ``r`` most similar edges are merged.
    The first ``num_protected`` tokens (CLS, distillation, registers) are never merged and never
    receive a merge: their A rows / B columns are set to ``-inf``. ``r`` is silently capped at
    ``(N - num_protected) // 2`` like the official code; ``r <= 0`` returns ``None``.
    """
    batch, num_tokens, _ = metric.shape
    r = min(int(r), (num_tokens - num_protected) // 2)
    if r <= 0:
        return None
    protected_a = (num_protected + 1) // 2
    protected_b = num_protected // 2
    with torch.no_grad():
        metric = cosine_normalize(matching_precision(metric))
        scores = metric[:, ::2] @ metric[:, 1::2].transpose(-1, -2)
        if protected_a:
            scores[:, :protected_a, :] = -math.inf
        if protected_b:
            scores[:, :, :protected_b] = -math.inf
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)
        unmerged = edge_idx[:, r:]
        src = edge_idx[:, :r]
        dst_b = node_idx.gather(1, src)
        if num_protected:
            unmerged = unmerged.sort(dim=-1).values[:, protected_a:]
        num_a, num_b = scores.shape[1], scores.shape[2]
        b_kept = _arange_like(num_b - protected_b, metric, batch) + protected_b
        keep = torch.cat([
            _arange_like(num_protected, metric, batch),
            2 * unmerged,
            2 * b_kept + 1,
        ], dim=1)
        offset = num_protected + (num_a - protected_a - r)
        return MergePlan(keep=keep, src=2 * src, dst=dst_b - protected_b + offset)


def bipartite_matching_macs(num_tokens: int, width: int) -> int:
    """Multiply-accumulates of :func:`bipartite_soft_matching`'s score matrix ``A @ Bᵀ`` over ``num_tokens``
    tokens of ``width``: ``ceil(N/2) · floor(N/2) · width`` (protected tokens are in it, masked afterwards)."""
    return ((num_tokens + 1) // 2) * (num_tokens // 2) * width


def pitome_energy(metric: torch.Tensor, margin: float, alpha: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """PiToMe's energy score (Tran et al., NeurIPS 2024, Sec. 3), as the official code at 550b5de computes it.

    ``E_i = mean_j ELU(cos(v_i, v_j) - margin, alpha)`` over all tokens ``j`` including ``i``.
    Returns ``(energy [B, T], similarity [B, T, T])``.
    """
    normed = F.normalize(metric, p=2, dim=-1)
    similarity = normed @ normed.transpose(-1, -2)
    energy = F.elu(similarity - margin, alpha=alpha).mean(dim=-1)
    return energy, similarity


def pitome_removed_count(num_tokens: int, ratio: float) -> int:
    """Tokens removed by one PiToMe layer: ``floor(T - T * ratio)`` (this exact form; see merging.md §3.2)."""
    if ratio >= 1.0:
        return 0
    return math.floor(num_tokens - num_tokens * ratio)


def pitome_matching(metric: torch.Tensor, r: int, margin: float, num_protected: int = 0,
                    bsm: bool = False, alpha: float = 1.0) -> MergePlan | None:
    """PiToMe's energy-guided matching on the tokens after the ``num_protected`` prefix.

    Tokens are sorted by energy (descending). ``bsm=False`` ("pure PiToMe"): the top ``2r`` are
    mergeable, split alternately into A/B in energy order, and *every* A token merges into its most
    similar B token; the rest are protected. ``bsm=True`` ("BSM-PiToMe"): all tokens are split
    alternately in energy order and ToMe's top-``r`` edge selection is used.

    ``r`` is clamped to ``T // 2`` (the official code crashes above it) and ``r <= 0`` returns ``None``
    (the official code crashes there too); both divergences are documented in docs/policies/pitome.md.
    """
    batch, total, _ = metric.shape
    num_tokens = total - num_protected
    r = min(int(r), num_tokens // 2)
    if r <= 0:
        return None
    with torch.no_grad():
        energy, similarity = pitome_energy(matching_precision(metric[:, num_protected:]), margin, alpha)
        order = torch.argsort(energy, dim=-1, descending=True)
        prefix = _arange_like(num_protected, metric, batch)
        if bsm:
            a_idx, b_idx = order[:, ::2], order[:, 1::2]
        else:
            a_idx, b_idx = order[:, : 2 * r : 2], order[:, 1 : 2 * r : 2]
        scores = similarity.gather(1, a_idx.unsqueeze(-1).expand(-1, -1, num_tokens))
        scores = scores.gather(2, b_idx.unsqueeze(1).expand(-1, a_idx.shape[1], -1))
        node_max, node_idx = scores.max(dim=-1)
        if bsm:
            edge_idx = node_max.argsort(dim=-1, descending=True)
            src_a, unmerged_a = edge_idx[:, :r], edge_idx[:, r:]
            untouched = a_idx.gather(1, unmerged_a)
        else:
            src_a = _arange_like(r, metric, batch)
            untouched = order[:, 2 * r:]
        src = a_idx.gather(1, src_a)
        dst = node_idx.gather(1, src_a) + num_protected + untouched.shape[1]
        keep = torch.cat([prefix, untouched + num_protected, b_idx + num_protected], dim=1)
        return MergePlan(keep=keep, src=src + num_protected, dst=dst)
