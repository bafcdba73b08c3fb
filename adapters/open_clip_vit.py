"""Adapter for open_clip's ``VisionTransformer`` (the ``.visual`` tower of open_clip CLIP models).

Reduction point: inside every ``ResidualAttentionBlock``, between the attention residual and the MLP
(ToMe's placement): ``x = q_x + ls_1(attention(ln_1(q_x)))``, reduce, ``x = x + ls_2(mlp(ln_2(x)))``.
The block's own sub-modules run unchanged (``ln_1``, its ``attention`` method and ``nn.MultiheadAttention``,
``ln_attn`` where an older open_clip has it, ``ls_1``/``ls_2``, ``ln_2``, ``mlp``). Proportional attention
enters ``nn.MultiheadAttention`` as an additive float ``attn_mask`` ``[B*heads, N, N]`` holding
``log(size)`` over the keys. Keys averaged over heads are computed only when a policy asks, from the k
slice of ``attn.in_proj_weight``/``in_proj_bias`` applied to ``ln_1(x)`` (the keys attention uses).

Both sequence layouts are handled: ``batch_first`` blocks (open_clip >= 2.24) see ``[B, N, C]``; older
towers whose blocks see ``[N, B, C]`` (``attn.batch_first == False``) run attention and MLP in that layout
and are transposed only for the reduction.

Entry points: ``forward`` and ``forward_intermediates`` start a fresh per-call state. ``_global_pool`` is
wrapped: ``pool_type='avg'`` averages the non-CLS tokens size-weighted, and the patch tokens it returns
(``output_tokens=True``) are unmerged to the full patch grid through the assignment (each patch position
gets the value of the merged token containing it). ``forward_intermediates`` returns unmerged intermediates
(the tower's ``transformer.forward_intermediates`` is wrapped). Attention pooling (``attn_pool``, CoCa)
weighs merged tokens by size: its keys get ``log(size)``, so it pools as over the tokens they contain.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vtprune.reduction import unmerge, unmerge_patches
from vtprune.state import Runtime

from .base import Inspection
from .patching import Patch, forward_of
from .reduction_point import (log_size_bias, reduce_at, refuse_gradient_checkpointing, refuse_placement,
                              size_aware_mha_pool)

_BLOCK_PARTS = ("ln_1", "attn", "attention", "ls_1", "ln_2", "mlp", "ls_2")


def _classes() -> tuple[type, type] | None:
    try:
        from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
    except ImportError:  # open_clip is optional for users of other families
        return None
    return VisionTransformer, ResidualAttentionBlock


def prefix_roles(model: nn.Module) -> tuple[str, ...]:
    """open_clip puts its class token first (``class_embedding``); no prefix when there is none."""
    return ("cls",) if getattr(model, "class_embedding", None) is not None else ()


class OpenClipViTAdapter:
    name = "open_clip-vit"
    family = "open_clip VisionTransformer (the .visual tower of open_clip CLIP models)"
    sites = ("vision",)
    signals = ("keys", "hidden")

    def matches(self, model: nn.Module) -> bool:
        classes = _classes()
        return classes is not None and isinstance(model, classes[0])

    def _check(self, model: nn.Module) -> None:
        _, block_class = _classes()
        for index, block in enumerate(model.transformer.resblocks):
            if not isinstance(block, block_class):
                raise ValueError(
                    f"open_clip block {index} is a {type(block).__name__}; the open_clip-vit adapter supports "
                    "ResidualAttentionBlock (nn.MultiheadAttention), not the custom blocks built for qk_norm / "
                    "scaled cosine attention / scale_* options"
                )
            missing = [part for part in _BLOCK_PARTS if not hasattr(block, part)]
            if missing:
                raise ValueError(f"open_clip block {index} lacks {', '.join(missing)}; the open_clip-vit adapter "
                                 f"supports pre-norm ResidualAttentionBlocks with {', '.join(_BLOCK_PARTS)}")
            attn = block.attn
            if not isinstance(attn, nn.MultiheadAttention) or attn.in_proj_weight is None:
                raise ValueError(f"open_clip block {index}: attn must be nn.MultiheadAttention with a packed "
                                 "in_proj_weight (equal q/k/v dimensions)")
        if not hasattr(model, "_global_pool"):
            raise ValueError("this open_clip VisionTransformer has no _global_pool(); vtprune needs "
                             "open_clip_torch >= 2.24")

    def inspect(self, model: nn.Module) -> Inspection:
        self._check(model)
        notes = []
        if getattr(model, "attn_pool", None) is not None:
            notes.append("attention pooling (attn_pool) weighs merged tokens by size (log(size) added to its keys)")
        elif model.pool_type == "avg":
            notes.append("pool_type='avg' is averaged size-weighted")
        notes.append("output_tokens / forward_intermediates return patch tokens unmerged to the full grid")
        if not _batch_first(model):
            notes.append("blocks use the sequence-first [N, B, C] layout")
        return Inspection(
            adapter=self.name, family=self.family, model_class=type(model).__name__,
            sites={"vision": tuple(f"transformer.resblocks.{i}" for i in range(len(model.transformer.resblocks)))},
            signals=self.signals, protected=prefix_roles(model), notes=tuple(notes),
        )

    def patch(self, model: nn.Module, runtime: Runtime) -> Patch:
        self._check(model)
        refuse_placement(runtime.policies["vision"], self.name)
        roles = prefix_roles(model)
        blocks = model.transformer.resblocks
        patch = Patch()
        try:
            for index, block in enumerate(blocks):
                patch.override(block, "forward", _block_forward(block, index, len(blocks), roles, runtime))
            guard = refuse_gradient_checkpointing(model)
            patch.override(model, "forward", runtime.entry(forward_of(model), before=guard))
            patch.override(model, "forward_intermediates", runtime.entry(model.forward_intermediates,
                                                                        record_layers=True, before=guard))
            patch.override(model.transformer, "forward_intermediates",
                           _transformer_intermediates(model, runtime))
            patch.override(model, "_global_pool", _global_pool(model, runtime, len(roles)))
            for name in ("attn_pool", "attn_pool_contrastive"):
                pooler = getattr(model, name, None)
                if pooler is not None and isinstance(getattr(pooler, "attn", None), nn.MultiheadAttention):
                    patch.override(pooler, "forward", size_aware_mha_pool(pooler, pooler.attn, runtime,
                                                                          _pooler_queries, lambda _, out: out))
        except BaseException:
            patch.undo()
            raise
        return patch


def _pooler_queries(pooler: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """open_clip ``AttentionalPooler``'s steps before its attention."""
    return pooler.ln_q(pooler.query).unsqueeze(0).expand(x.shape[0], -1, -1), pooler.ln_k(x)


def _batch_first(model: nn.Module) -> bool:
    return bool(model.transformer.resblocks[0].attn.batch_first) if len(model.transformer.resblocks) else True


def _head_mean_keys(attn: nn.MultiheadAttention, normed: torch.Tensor) -> torch.Tensor:
    """Keys ``[B, N, head_dim]`` averaged over heads, from the k slice of the packed input projection."""
    width = attn.embed_dim
    weight = attn.in_proj_weight[width:2 * width]
    bias = attn.in_proj_bias[width:2 * width] if attn.in_proj_bias is not None else None
    keys = nn.functional.linear(normed, weight, bias)
    batch, tokens, _ = keys.shape
    return keys.view(batch, tokens, attn.num_heads, attn.head_dim).mean(2)


def _block_forward(block: nn.Module, index: int, num_layers: int, roles: tuple[str, ...], runtime: Runtime):
    original = forward_of(block)
    policy = runtime.policies["vision"]
    proportional = policy.proportional_attention()
    batch_first = bool(block.attn.batch_first)
    heads = block.attn.num_heads
    ln_attn = getattr(block, "ln_attn", None)

    def to_bnc(x: torch.Tensor) -> torch.Tensor:
        return x if batch_first else x.transpose(0, 1)

    def forward(q_x: torch.Tensor, k_x: torch.Tensor | None = None, v_x: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        state = runtime.active()
        if state is None:
            return original(q_x, k_x, v_x, attn_mask=attn_mask)
        if k_x is not None or v_x is not None or attn_mask is not None:
            raise ValueError("vtprune: token merging cannot be combined with cross-attention inputs or a "
                             "caller-supplied attn_mask in open_clip blocks (they would not follow the merged "
                             "tokens); remove the policy for such calls")
        x = q_x
        state.start(to_bnc(x))
        mask = None
        if proportional and state.size is not None:
            bias = log_size_bias(state, x.dtype)  # [B, 1, 1, N]
            batch, _, _, tokens = bias.shape
            mask = bias.expand(batch, heads, tokens, tokens).reshape(batch * heads, tokens, tokens)
        normed = block.ln_1(x)
        attended = block.attention(q_x=normed, attn_mask=mask)
        if ln_attn is not None:
            attended = ln_attn(attended)
        x = x + block.ls_1(attended)

        def provide(name: str) -> torch.Tensor:
            if name == "keys":
                return _head_mean_keys(block.attn, to_bnc(normed))
            raise ValueError(f"open_clip-vit offers the signals 'keys' and 'hidden', not {name!r}")

        x = to_bnc(reduce_at(policy, state, to_bnc(x), site="vision", layer=index, num_layers=num_layers,
                             roles=roles, provide=provide))  # to_bnc is its own inverse
        return x + block.ls_2(block.mlp(block.ln_2(x)))

    return forward


def _global_pool(model: nn.Module, runtime: Runtime, num_prefix: int):
    original = model._global_pool

    def global_pool(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        state = runtime.active()
        if (state is None or state.size is None or getattr(model, "attn_pool", None) is not None
                or x.dim() != 3 or state.size.shape[:2] != x.shape[:2]):
            return original(x)
        if model.pool_type == "none":
            return x, x
        tokens = x[:, num_prefix:]
        if model.pool_type == "avg":
            weights = state.size[:, num_prefix:].to(x.dtype)
            pooled = (tokens * weights).sum(dim=1) / weights.sum(dim=1)
        else:  # 'tok'
            pooled = x[:, 0]
        return pooled, unmerge_patches(tokens, state.assignment, num_prefix)  # the full patch grid

    return global_pool


def _transformer_intermediates(model: nn.Module, runtime: Runtime):
    """``transformer.forward_intermediates`` whose intermediates are unmerged to the full token sequence."""
    original = model.transformer.forward_intermediates

    def forward_intermediates(x: torch.Tensor, attn_mask: torch.Tensor | None = None, indices: Any = None,
                              stop_early: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
        state = runtime.active()
        if state is None:
            return original(x, attn_mask=attn_mask, indices=indices, stop_early=stop_early)
        state.record_layers = True
        final, raw = original(x, attn_mask=attn_mask, indices=indices, stop_early=stop_early)
        from open_clip.utils import feature_take_indices

        take, _ = feature_take_indices(len(model.transformer.resblocks), indices)
        layers = sorted(set(int(i) for i in take))[: len(raw)]
        full = []
        for layer, item in zip(layers, raw):  # items are [B, N, C] whatever the block layout
            assignment = state.layer_assignments.get(layer)
            if assignment is not None and item.shape[1] < assignment.shape[1]:
                item = unmerge(item, assignment)  # prefix tokens map to themselves
            full.append(item)
        return final, full

    return forward_intermediates
