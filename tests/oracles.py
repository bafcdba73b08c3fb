"""Independent functional oracles for ToMe and PiToMe over a timm ``VisionTransformer``'s own weights.

Written from the specification in ``shared/research/merging.md`` (sections 2 and 3), *not* from the
official (CC BY-NC) code. They are deliberately plain: explicit-softmax attention, and every merge
expressed as a destination map ``dest[b, i]`` = index of the output token that current token ``i``
flows into, applied as a size-weighted average through a one-hot matrix. That formulation is
different from the official gather/scatter code, so agreement with the golden fixtures in
``tests/fixtures`` is a real cross-check. The oracles are the reference vtprune's hooked policies
are tested against when the official code is not available.

Both return ``dict(logits, pre_logits, features, tokens_per_layer, size, assignment)`` where

* ``features``: output of ``model.norm`` (what ``forward_features`` returns), ``[B, N_final, C]``;
* ``pre_logits`` / ``logits``: ``model.forward_head(features, pre_logits=True / False)``
  (timm's own, unweighted, pooling; the official patches do not size-weight ``global_pool='avg'``);
* ``tokens_per_layer``: sequence length output by every block;
* ``size``: ``[B, N_final]`` number of original tokens in every output token (input dtype);
* ``assignment``: ``[B, N0]`` int64, index of the output token holding each original token
  (``source.argmax(1)`` in the official code), or ``None`` when ``trace_source=False``.

``pitome_forward`` also returns ``flops``: PiToMe's own counter in GFLOPs,
``sum over blocks of (4NC^2 + 2N^2C + 8NC^2) / 1e9`` with N the tokens *entering* the block.

Only plain ViTs are supported (absolute position embedding, optional CLS / distillation token, no
register tokens). Run them in float64 on CPU for exact comparisons: merge decisions are discrete.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["tome_forward", "pitome_forward", "tome_schedule", "pitome_margins"]

RSpec = Union[int, tuple, list]


# --------------------------------------------------------------------------------------------------
# shared ViT plumbing
# --------------------------------------------------------------------------------------------------
def _prefix_flags(model: nn.Module) -> tuple[bool, bool]:
    has_cls = getattr(model, "cls_token", None) is not None
    has_dist = getattr(model, "dist_token", None) is not None
    if getattr(model, "reg_token", None) is not None:
        raise NotImplementedError("register tokens are not handled by the oracles")
    return has_cls, has_dist


def _embed(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Patch embedding, prefix tokens and absolute position embedding (eval mode: no dropout)."""
    x = model.patch_embed(images)
    if x.ndim == 4:  # NHWC output (dynamic_img_size models)
        x = x.flatten(1, 2)
    batch = x.shape[0]
    prefix = []
    if getattr(model, "cls_token", None) is not None:
        prefix.append(model.cls_token.expand(batch, -1, -1))
    if getattr(model, "dist_token", None) is not None:
        prefix.append(model.dist_token.expand(batch, -1, -1))
    pos = model.pos_embed
    if getattr(model, "no_embed_class", False):
        x = torch.cat(prefix + [x + pos], dim=1)
    else:
        x = torch.cat(prefix + [x], dim=1) + pos
    norm_pre = getattr(model, "norm_pre", None)
    return norm_pre(x) if norm_pre is not None else x


def _maybe(module: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    sub = getattr(module, name, None)
    return sub(x) if sub is not None else x


def _self_attention(block: nn.Module, x: torch.Tensor, log_size: Optional[torch.Tensor]):
    """Multi-head self-attention of ``block`` on ``x``; returns (output, head-mean keys).

    ``log_size`` (``[B, N]``) is added to the logits of every key column (proportional attention).
    The metric is the raw key projection averaged over heads (before any ``k_norm``).
    """
    attn = block.attn
    batch, tokens, _ = x.shape
    heads = attn.num_heads
    qkv = attn.qkv(x).reshape(batch, tokens, 3, heads, -1)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # [B, H, N, d]
    metric = k.mean(dim=1)
    q, k = _maybe(attn, "q_norm", q), _maybe(attn, "k_norm", k)
    scale = getattr(attn, "scale", q.shape[-1] ** -0.5)
    logits = torch.einsum("bhnd,bhmd->bhnm", q, k) * scale
    if log_size is not None:
        logits = logits + log_size[:, None, None, :]
    weights = torch.softmax(logits, dim=-1)
    out = torch.einsum("bhnm,bhmd->bnhd", weights, v).reshape(batch, tokens, -1)
    out = _maybe(attn, "norm", out)
    return attn.proj(out), metric


def _combine(x: torch.Tensor, size: torch.Tensor, dest: torch.Tensor, n_out: int):
    """Size-weighted merge: output j = sum_{dest[i]=j} size_i x_i / sum_{dest[i]=j} size_i."""
    routing = F.one_hot(dest, n_out).to(x.dtype).transpose(1, 2)  # [B, n_out, N_in]
    new_size = torch.bmm(routing, size[..., None])
    new_x = torch.bmm(routing, x * size[..., None]) / new_size
    return new_x, new_size[..., 0]


def _merging_block(block: nn.Module, x: torch.Tensor, size: torch.Tensor, assignment: torch.Tensor,
                   log_size: Optional[torch.Tensor], destinations):
    """One block with a merge between attention and MLP; ``destinations(metric)`` gives (dest, n_out) or None."""
    h, metric = _self_attention(block, block.norm1(x), log_size)
    x = x + _maybe(block, "ls1", h)
    plan = destinations(metric)
    if plan is not None:
        dest, n_out = plan
        x, size = _combine(x, size, dest, n_out)
        assignment = dest.gather(1, assignment)
    x = x + _maybe(block, "ls2", block.mlp(block.norm2(x)))
    return x, size, assignment


def _finish(model, x, size, assignment, tokens):
    features = model.norm(x)
    return {
        "logits": model.forward_head(features),
        "pre_logits": model.forward_head(features, pre_logits=True),
        "features": features,
        "tokens_per_layer": tokens,
        "size": size,
        "assignment": assignment,
    }


# --------------------------------------------------------------------------------------------------
# ToMe
# --------------------------------------------------------------------------------------------------
def tome_schedule(num_layers: int, r: RSpec) -> list[int]:
    """Per-layer r: constant int; ``(r, inflect)`` linear ramp; list zero-padded / truncated (notes 2.5)."""
    if isinstance(r, list):
        return (list(r) + [0] * num_layers)[:num_layers]
    inflect = 0.0
    if isinstance(r, tuple):
        r, inflect = r
    lo = int(r * (1.0 - inflect))
    hi = 2 * r - lo
    slope = (hi - lo) / (num_layers - 1)
    return [int(lo + slope * layer) for layer in range(num_layers)]


def _tome_destinations(metric: torch.Tensor, r: int, has_cls: bool, has_dist: bool):
    """Bipartite soft matching (notes 2.3) as a destination map; ``None`` when nothing is merged."""
    batch, tokens, _ = metric.shape
    r = min(r, (tokens - int(has_cls) - int(has_dist)) // 2)
    if r <= 0:
        return None
    unit = metric / metric.norm(dim=-1, keepdim=True)
    even = torch.arange(0, tokens, 2)  # set A (sources), alternate on the current order
    odd = torch.arange(1, tokens, 2)  # set B (destinations)
    sim = unit[:, even] @ unit[:, odd].transpose(1, 2)
    if has_cls:  # CLS is A[0]: never a source
        sim[:, 0, :] = -math.inf
    if has_dist:  # dist is B[0]: never a destination
        sim[:, :, 0] = -math.inf
    best, partner = sim.max(dim=-1)
    ranked = torch.argsort(best, dim=-1, descending=True)
    merged, kept = ranked[:, :r], ranked[:, r:]
    if has_cls:  # restore index order so that CLS stays first
        kept = kept.sort(dim=-1).values
    n_kept, n_b = kept.shape[1], odd.numel()
    slot_kept = torch.arange(n_kept)
    slot_b = n_kept + torch.arange(n_b)
    if has_dist:  # layout [kept0 (CLS), B0 (dist), kept1.., B1..]
        slot_kept = torch.where(slot_kept == 0, 0, slot_kept + 1)
        slot_b = torch.where(torch.arange(n_b) == 0, 1, slot_b)
    dest_a = torch.empty(batch, even.numel(), dtype=torch.long)
    dest_a.scatter_(1, kept, slot_kept.expand(batch, -1))
    dest_a.scatter_(1, merged, slot_b[partner.gather(1, merged)])
    dest = torch.empty(batch, tokens, dtype=torch.long)
    dest[:, even] = dest_a
    dest[:, odd] = slot_b.expand(batch, -1)
    return dest, n_kept + n_b


@torch.no_grad()
def tome_forward(model: nn.Module, images: torch.Tensor, r: RSpec, prop_attn: bool = True,
                 trace_source: bool = True) -> dict:
    """ToMe (official timm-patch semantics) on ``model``'s weights: merge between attention and MLP."""
    has_cls, has_dist = _prefix_flags(model)
    x = _embed(model, images)
    batch, n0, _ = x.shape
    size = torch.ones(batch, n0, dtype=x.dtype)
    assignment = torch.arange(n0).expand(batch, n0).clone()
    schedule = tome_schedule(len(model.blocks), r)
    tokens = []
    for block, r_layer in zip(model.blocks, schedule):
        x, size, assignment = _merging_block(
            block, x, size, assignment, size.log() if prop_attn else None,
            lambda metric: _tome_destinations(metric, r_layer, has_cls, has_dist) if r_layer > 0 else None)
        tokens.append(x.shape[1])
    return _finish(model, x, size, assignment if trace_source else None, tokens)


# --------------------------------------------------------------------------------------------------
# PiToMe (deit patch at hchautran/PiToMe@550b5de)
# --------------------------------------------------------------------------------------------------
def pitome_margins(num_layers: int, a: float = 0.75, b: float = 0.75) -> list[float]:
    """Margin m_l = a - b * l / L (DeiT: a = b = 0.75)."""
    return [a - b * (layer / num_layers) for layer in range(num_layers)]


def _pitome_destinations(metric: torch.Tensor, ratio: float, margin: float, bsm: bool):
    """Energy-ordered merge over the non-CLS tokens (notes 3.1); CLS (index 0) is left in place."""
    patches = metric[:, 1:]
    batch, count, _ = patches.shape
    r = math.floor(count - count * ratio)
    if r <= 0:  # the official code crashes (pure) or only reorders (BSM) here; treated as identity
        return None
    if 2 * r > count:
        raise ValueError(f"ratio {ratio} removes {r} of {count} tokens (> 50%): outside PiToMe's domain")
    unit = F.normalize(patches, p=2, dim=-1)
    sim = unit @ unit.transpose(1, 2)
    energy = F.elu(sim - margin, alpha=1.0).mean(dim=-1)  # mean over all tokens, self included
    by_energy = torch.argsort(energy, dim=-1, descending=True)

    def pair_scores(rows, cols):
        return torch.gather(torch.gather(sim, 1, rows[..., None].expand(-1, -1, count)), 2,
                            cols[:, None, :].expand(-1, rows.shape[1], -1))

    dest = torch.empty(batch, count, dtype=torch.long)
    if bsm:  # BSM-PiToMe: alternate split of ALL tokens in energy order, ToMe top-r edges
        set_a, set_b = by_energy[:, 0::2], by_energy[:, 1::2]
        best, partner = pair_scores(set_a, set_b).max(dim=-1)
        ranked = torch.argsort(best, dim=-1, descending=True)
        merged, kept = ranked[:, :r], ranked[:, r:]  # kept stays in descending-score order
        n_first = kept.shape[1]
        dest.scatter_(1, set_a.gather(1, kept), 1 + torch.arange(n_first).expand(batch, -1))
        slot_b = 1 + n_first + torch.arange(set_b.shape[1]).expand(batch, -1)
        dest.scatter_(1, set_b, slot_b)
        dest.scatter_(1, set_a.gather(1, merged), slot_b.gather(1, partner.gather(1, merged)))
    else:  # pure PiToMe: top-2r energy tokens mergeable, every A merged into its best B
        mergeable, protected = by_energy[:, : 2 * r], by_energy[:, 2 * r:]
        set_a, set_b = mergeable[:, 0::2], mergeable[:, 1::2]
        partner = pair_scores(set_a, set_b).argmax(dim=-1)
        n_first = protected.shape[1]
        dest.scatter_(1, protected, 1 + torch.arange(n_first).expand(batch, -1))
        slot_b = 1 + n_first + torch.arange(r).expand(batch, -1)
        dest.scatter_(1, set_b, slot_b)
        dest.scatter_(1, set_a, slot_b.gather(1, partner))
    dest = torch.cat([torch.zeros(batch, 1, dtype=torch.long), dest], dim=1)
    return dest, 1 + count - r


@torch.no_grad()
def pitome_forward(model: nn.Module, images: torch.Tensor, ratio: float, *,
                   bsm_layers: Optional[Sequence[bool]] = None,
                   margins: Optional[Sequence[float]] = None) -> dict:
    """PiToMe (official ``pitome.patch.deit`` semantics): per-layer keep fraction ``ratio``.

    ``bsm_layers`` (default: the first ceil(L/2) layers) selects BSM-PiToMe per layer, the others use
    pure PiToMe; ``margins`` defaults to ``pitome_margins(L)``. No proportional attention.
    """
    has_cls, has_dist = _prefix_flags(model)
    if not has_cls or has_dist:
        raise NotImplementedError("the PiToMe oracle covers CLS-only ViTs (as the official deit patch)")
    num_layers = len(model.blocks)
    if bsm_layers is None:
        n_bsm = math.ceil(num_layers * 0.5)
        bsm_layers = [layer < n_bsm for layer in range(num_layers)]
    if margins is None:
        margins = pitome_margins(num_layers)
    x = _embed(model, images)
    batch, n0, dim = x.shape
    size = torch.ones(batch, n0, dtype=x.dtype)
    assignment = torch.arange(n0).expand(batch, n0).clone()
    tokens, flops = [], 0
    for block, bsm, margin in zip(model.blocks, bsm_layers, margins):
        n = x.shape[1]
        flops += 4 * n * dim * dim + 2 * n * n * dim + 8 * n * dim * dim
        x, size, assignment = _merging_block(
            block, x, size, assignment, None,
            lambda metric: _pitome_destinations(metric, ratio, margin, bsm) if ratio < 1.0 else None)
        tokens.append(x.shape[1])
    out = _finish(model, x, size, assignment, tokens)
    out["flops"] = flops / 1e9
    return out
