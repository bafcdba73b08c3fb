"""What a policy answers at a reduction point, and how it is applied to sequence-length tensors.

A :class:`MergePlan` describes one reduction of a batch of sequences ``[B, N, ...]`` to ``[B, N_out, ...]``:
output slot ``j`` of sample ``b`` starts from input token ``keep[b, j]``; every input token
``src[b, i]`` is then merged into output slot ``dst[b, i]``. Input tokens in neither ``keep`` nor ``src``
are dropped (pruning is a plan with no ``src``). Every sample has the same ``N_out``, so batches stay
rectangular.

Merging is size-weighted (ToMe's ``merge_wavg``, Bolya et al. 2023, Sec. 3): with token sizes ``s``,
``x_j <- sum_{i in j} s_i x_i / sum_{i in j} s_i`` and ``s_j <- sum_{i in j} s_i``. A plan may instead
carry explicit per-token ``weights``; then ``x_j <- sum_{i in j} w_i x_i`` with no normalisation (VisionZip's
contextual tokens, ``target + mean(others)``); sizes still add up.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MergePlan:
    """``keep``: ``[B, N_out]`` input index per output slot; ``src``/``dst``: ``[B, R]`` merged tokens;
    ``weights``: optional ``[B, N_in]`` explicit weight of every input token (replaces size weighting)."""

    keep: torch.Tensor
    src: torch.Tensor
    dst: torch.Tensor
    weights: torch.Tensor | None = None

    @property
    def num_out(self) -> int:
        return self.keep.shape[1]

    @staticmethod
    def prune(keep: torch.Tensor) -> "MergePlan":
        empty = keep.new_zeros((keep.shape[0], 0))
        return MergePlan(keep=keep, src=empty, dst=empty)


def _expand(index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return index.unsqueeze(-1).expand(*index.shape, like.shape[-1])


def merge_weighted(x: torch.Tensor, size: torch.Tensor, plan: MergePlan) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply ``plan`` to hidden states ``x [B, N, C]`` with sizes ``size [B, N, 1]`` (size-weighted mean).

    Returns ``(x_out [B, N_out, C], size_out [B, N_out, 1])``. The arithmetic happens in ``size``'s dtype
    (at least float32) and the result is cast back to ``x``'s dtype. Differentiable w.r.t. ``x``.
    Rows are selected and accumulated on the flattened ``[B*N, C]`` view (``index_select`` /
    ``index_add``), which is several times faster on CPU than channel-expanded ``gather``/``scatter``.
    """
    batch, num_in, channels = x.shape
    num_out = plan.num_out
    rows = x.reshape(batch * num_in, channels)
    sizes = size.reshape(batch * num_in, 1)
    keep = (plan.keep + _row_offsets(batch, num_in, plan.keep)).reshape(-1)
    weights = sizes if plan.weights is None else plan.weights.reshape(batch * num_in, 1).to(size.dtype)
    size_out = sizes.index_select(0, keep)
    out = rows.index_select(0, keep).to(size.dtype) * weights.index_select(0, keep)
    if plan.src.shape[1]:
        src = (plan.src + _row_offsets(batch, num_in, plan.src)).reshape(-1)
        dst = (plan.dst + _row_offsets(batch, num_out, plan.dst)).reshape(-1)
        out = out.index_add(0, dst, rows.index_select(0, src).to(size.dtype) * weights.index_select(0, src))
        size_out = size_out.index_add(0, dst, sizes.index_select(0, src))
    out = (out / size_out if plan.weights is None else out).to(x.dtype)
    return out.view(batch, num_out, channels), size_out.view(batch, num_out, 1)


def with_mean_weights(plan: MergePlan, num_in: int, dtype: torch.dtype = torch.float32) -> MergePlan:
    """``plan`` with explicit weights that make every output the plain (unweighted) mean of its group,
    whatever the tokens' sizes (the official PiToMe LLaVA patch's ``merge_mean``)."""
    batch = plan.keep.shape[0]
    count = torch.ones(batch, plan.num_out, dtype=dtype, device=plan.keep.device)
    if plan.src.shape[1]:
        count = count.scatter_add(1, plan.dst, torch.ones(plan.dst.shape, dtype=dtype, device=plan.keep.device))
    slot = output_slot_of_input(plan, num_in)
    weights = (1.0 / count).gather(1, slot.clamp(min=0))
    return MergePlan(keep=plan.keep, src=plan.src, dst=plan.dst, weights=weights)


def _row_offsets(batch: int, length: int, like: torch.Tensor) -> torch.Tensor:
    return (torch.arange(batch, device=like.device) * length).unsqueeze(1)


def output_slot_of_input(plan: MergePlan, num_in: int) -> torch.Tensor:
    """``[B, N_in]`` long: the output slot each input token ends up in, or ``-1`` if it was dropped."""
    batch = plan.keep.shape[0]
    slot = torch.full((batch, num_in), -1, dtype=torch.long, device=plan.keep.device)
    slot.scatter_(1, plan.keep, torch.arange(plan.num_out, device=slot.device).expand(batch, -1))
    if plan.src.shape[1]:
        slot.scatter_(1, plan.src, plan.dst)
    return slot


def update_assignment(assignment: torch.Tensor, plan: MergePlan, num_in: int) -> torch.Tensor:
    """Compose the map original-token -> current-token ``[B, N0]`` with ``plan`` (``-1`` stays dropped)."""
    slot = output_slot_of_input(plan, num_in)
    dropped = assignment < 0
    new = slot.gather(1, assignment.clamp(min=0))
    return new.masked_fill(dropped, -1) if dropped.any() else new


def assignment_to_source(assignment: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """ToMe's dense source matrix ``[B, N, N0]`` (float32 0/1; row ``i`` = originals inside token ``i``)."""
    batch, num_orig = assignment.shape
    source = torch.zeros(batch, num_tokens + 1, num_orig, dtype=torch.float32, device=assignment.device)
    index = torch.where(assignment < 0, torch.full_like(assignment, num_tokens), assignment)
    source.scatter_(1, index.unsqueeze(1), 1.0)
    return source[:, :num_tokens]


def unmerge(x: torch.Tensor, assignment: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """Scatter merged tokens ``[B, N, C]`` back to the original ``N0`` positions through ``assignment``.

    Each original token receives the value of the token that now contains it (dropped ones get
    ``fill``). This is ToMe's ``unmerge`` generalised to any number of merges.
    """
    index = assignment.clamp(min=0)
    out = x.gather(1, _expand(index, x))
    if (assignment < 0).any():
        out = out.masked_fill((assignment < 0).unsqueeze(-1), fill)
    return out


def unmerge_patches(patch_tokens: torch.Tensor, assignment: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """:func:`unmerge` for a sequence whose ``num_prefix`` prefix tokens were split off: ``patch_tokens`` are
    the merged tokens after the prefix, ``assignment`` the full ``[B, N0]`` map (prefix included)."""
    return unmerge(patch_tokens, assignment[:, num_prefix:] - num_prefix)
