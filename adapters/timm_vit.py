"""Adapter for timm's ``VisionTransformer`` family (ViT, DeiT incl. distilled, DeiT-III, registers, CLIP).

Reduction point: inside every ``Block``, between the attention residual and the MLP (ToMe's placement).
The block's own sub-modules run unchanged (LayerScale, q/k-norm, attention norm/gate, drop-path), and
attention keeps timm's fused SDPA; proportional attention enters as an additive float ``attn_mask``
``log(size)`` over the keys. Keys averaged over heads are read at ``attn.k_norm`` (its forward is
wrapped per instance), i.e. the keys exactly as attention uses them, after q/k-norm.

Entry points that start a fresh per-call state: ``forward``, ``forward_features``,
``forward_intermediates`` (and ``get_intermediate_layers``, which calls it). ``pool`` is wrapped so
that ``global_pool='avg'``/``'avgmax'`` average size-weighted and attention pooling (``'map'``) adds
``log(size)`` to its keys, also when ``forward_head`` is called after ``forward_features``. ``forward_intermediates`` returns every intermediate unmerged to the full
patch grid through the source map, so dense consumers keep working.
"""
from __future__ import annotations

import inspect as pyinspect
from typing import Any

import torch
from torch import nn

from vtprune.reduction import unmerge_patches
from vtprune.state import Runtime

from .base import Inspection
from .patching import Patch, forward_of
from .reduction_point import (CapturedOutput, key_log_sizes, log_size_bias, reduce_at,
                              refuse_gradient_checkpointing, refuse_placement)

_BLOCK_PARTS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")
_ATTN_PARTS = ("qkv", "k_norm", "num_heads")


def _vit_class() -> type | None:
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:  # pragma: no cover - timm is a dependency
        return None
    return VisionTransformer


def prefix_roles(model: nn.Module) -> tuple[str, ...]:
    """Roles of the prefix tokens, in sequence order (timm: CLS, then distillation or registers)."""
    roles: list[str] = []
    if getattr(model, "cls_token", None) is not None:
        roles.append("cls")
    if getattr(model, "dist_token", None) is not None:
        roles.append("dist")
    roles += ["register"] * int(getattr(model, "num_reg_tokens", 0) or 0)
    if len(roles) != model.num_prefix_tokens:
        raise ValueError(f"{type(model).__name__} has num_prefix_tokens={model.num_prefix_tokens} but vtprune "
                         f"found the prefix tokens {roles}; this layout is not supported")
    return tuple(roles)


class TimmViTAdapter:
    name = "timm-vit"
    family = "timm VisionTransformer (ViT, DeiT, DeiT-III, registers, vit_*_clip_*)"
    sites = ("vision",)
    signals = ("keys", "hidden")

    def matches(self, model: nn.Module) -> bool:
        vit = _vit_class()
        return vit is not None and isinstance(model, vit)

    def _check(self, model: nn.Module) -> None:
        from timm.layers import Attention, AttentionPoolLatent

        pool = getattr(model, "attn_pool", None)
        if pool is not None and not isinstance(pool, AttentionPoolLatent):
            raise ValueError(
                f"this ViT pools with {type(pool).__name__} (global_pool={getattr(model, 'global_pool', None)!r}), "
                "which cannot weigh merged tokens by their size; the timm-vit adapter supports global_pool "
                "'token', 'avg', 'avgmax', 'max', 'map' and ''")
        for index, block in enumerate(model.blocks):
            if hasattr(block, "attn") and not isinstance(block.attn, Attention):
                raise ValueError(
                    f"timm block {index} uses {type(block.attn).__name__}; the timm-vit adapter supports "
                    "timm.layers.Attention (whose keys it reads after k_norm)"
                )
            missing = [part for part in _BLOCK_PARTS if not hasattr(block, part)]
            missing += [f"attn.{part}" for part in _ATTN_PARTS if not hasattr(getattr(block, "attn", None), part)]
            if missing:
                raise ValueError(
                    f"timm block {index} ({type(block).__name__}) lacks {', '.join(missing)}; the timm-vit adapter "
                    "supports pre-norm blocks (timm.models.vision_transformer.Block and look-alikes with norm1, "
                    "attn(qkv, k_norm), ls1, drop_path1, norm2, mlp, ls2, drop_path2)"
                )
        if not hasattr(model, "pool"):
            raise ValueError("this timm VisionTransformer has no pool() method; vtprune needs timm >= 1.0.20")

    def inspect(self, model: nn.Module) -> Inspection:
        self._check(model)
        notes = []
        if getattr(model, "attn_pool", None) is not None:
            notes.append("attention pooling ('map') weighs merged tokens by size (log(size) added to its keys)")
        if model.global_pool in ("avg", "avgmax"):
            notes.append(f"global_pool={model.global_pool!r} is averaged size-weighted")
        return Inspection(
            adapter=self.name, family=self.family, model_class=type(model).__name__,
            sites={"vision": tuple(f"blocks.{i}" for i in range(len(model.blocks)))},
            signals=self.signals, protected=prefix_roles(model), notes=tuple(notes),
        )

    def patch(self, model: nn.Module, runtime: Runtime) -> Patch:
        self._check(model)
        policy = runtime.policies["vision"]
        refuse_placement(policy, self.name)
        roles = prefix_roles(model)
        patch = Patch()
        try:
            keys_slot = CapturedOutput("the keys (attn.k_norm output)")
            if "keys" in policy.signals:
                for block in model.blocks:
                    patch.override(block.attn.k_norm, "forward", keys_slot.wrap(block.attn.k_norm, runtime))
            for index, block in enumerate(model.blocks):
                patch.override(block, "forward",
                               _block_forward(block, index, len(model.blocks), roles, runtime, keys_slot))
            guard = refuse_gradient_checkpointing(model)
            patch.override(model, "forward", runtime.entry(forward_of(model), before=guard))
            patch.override(model, "forward_features", runtime.entry(model.forward_features, before=guard))
            patch.override(model, "forward_intermediates", runtime.entry(
                _intermediates_forward(model, runtime), record_layers=True, before=guard))
            patch.override(model, "pool", _pool(model, runtime))
        except BaseException:
            patch.undo()
            raise
        return patch


def _block_forward(block: nn.Module, index: int, num_layers: int, roles: tuple[str, ...],
                   runtime: Runtime, keys_slot: CapturedOutput):
    original = forward_of(block)
    policy = runtime.policies["vision"]
    proportional = policy.proportional_attention()

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        state = runtime.active()
        if state is None:
            return original(x, *args, **kwargs)
        bound = _block_arguments(args, kwargs)
        attn_mask, is_causal = bound.get("attn_mask"), bound.get("is_causal", False)
        if attn_mask is not None or is_causal:
            raise ValueError("vtprune: token merging cannot be combined with a caller-supplied attn_mask or "
                             "is_causal=True in timm blocks (the mask would not follow the merged tokens); "
                             "remove the policy for masked inputs")
        state.start(x)
        mask = log_size_bias(state, x.dtype) if proportional else None
        x = x + block.drop_path1(block.ls1(block.attn(block.norm1(x), attn_mask=mask)))

        def provide(name: str) -> torch.Tensor:
            if name == "keys":
                return keys_slot.take().mean(1)
            raise ValueError(f"timm-vit offers the signals 'keys' and 'hidden', not {name!r}")

        x = reduce_at(policy, state, x, site="vision", layer=index, num_layers=num_layers, roles=roles,
                      provide=provide)
        return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))

    return forward


def _block_arguments(args: tuple, kwargs: dict) -> dict:
    """``Block.forward(x, attn_mask=None, is_causal=False)`` arguments after ``x`` (timm >= 1.0.20)."""
    names = ("attn_mask", "is_causal")
    if len(args) > len(names):
        raise TypeError(f"timm Block.forward takes at most {len(names) + 1} positional arguments")
    return {**dict(zip(names, args)), **kwargs}


def _pool(model: nn.Module, runtime: Runtime):
    original = model.pool

    def pool(x: torch.Tensor, pool_type: str | None = None) -> torch.Tensor:
        kind = model.global_pool if pool_type is None else pool_type
        if getattr(model, "attn_pool", None) is not None and x.dim() == 3:
            size = runtime.sizes_for(x)
            if size is None:
                return original(x, pool_type=pool_type)
            start = 0 if getattr(model, "pool_include_prefix", False) else model.num_prefix_tokens
            return model.attn_pool(x[:, start:], attn_mask=key_log_sizes(size[:, start:], x.dtype))
        if getattr(model, "attn_pool", None) is not None or kind not in ("avg", "avgmax") or x.dim() != 3:
            return original(x, pool_type=pool_type)
        size = runtime.sizes_for(x)
        if size is None:
            return original(x, pool_type=pool_type)
        start = 0 if getattr(model, "pool_include_prefix", False) else model.num_prefix_tokens
        tokens, weights = x[:, start:], size[:, start:].to(x.dtype)
        mean = (tokens * weights).sum(dim=1) / weights.sum(dim=1)
        return mean if kind == "avg" else 0.5 * (tokens.amax(dim=1) + mean)

    return pool


def _intermediates_forward(model: nn.Module, runtime: Runtime):
    """``forward_intermediates`` whose intermediates are unmerged to the full token grid."""
    from timm.models._features import feature_take_indices

    original = model.forward_intermediates
    signature = pyinspect.signature(original)

    def forward_intermediates(*args: Any, **kwargs: Any) -> Any:
        state = runtime.active()
        if state is not None:
            state.record_layers = True  # also when called from inside another entry point
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        params = dict(bound.arguments)
        images = params["x"]
        output_fmt = params.get("output_fmt", "NCHW")
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        want_prefix = params.get("return_prefix_tokens", False)
        intermediates_only = params.get("intermediates_only", False)
        output_dict = params.get("output_dict", False)
        inner = dict(params, output_fmt="NLC", return_prefix_tokens=True, intermediates_only=False)
        if "output_dict" in inner:
            inner["output_dict"] = False
        final, raw = original(**inner)
        take, _ = feature_take_indices(len(model.blocks), params.get("indices"))
        layers = sorted(set(take))[: len(raw)]
        prefix_count = model.num_prefix_tokens
        spatial, prefixes = [], []
        for layer, item in zip(layers, raw):
            tokens, prefix = item if prefix_count else (item, None)
            full = tokens
            if state is not None and layer in state.layer_assignments:
                full = unmerge_patches(tokens, state.layer_assignments[layer], prefix_count)
            spatial.append(full)
            prefixes.append(prefix)
        if output_fmt == "NCHW":
            batch, _, height, width = images.shape
            grid_h, grid_w = model.patch_embed.dynamic_feat_size((height, width))
            spatial = [y.reshape(batch, grid_h, grid_w, -1).permute(0, 3, 1, 2).contiguous() for y in spatial]
        if output_dict:
            result: dict[str, Any] = {"image_intermediates": spatial}
            if prefix_count and want_prefix:
                result["image_intermediates_prefix"] = prefixes
            if not intermediates_only:
                result["image_features"] = final
            return result
        if prefix_count and want_prefix:
            spatial = list(zip(spatial, prefixes))
        if intermediates_only:
            return spatial
        return final, spatial

    return forward_intermediates

