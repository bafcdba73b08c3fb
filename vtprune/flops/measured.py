"""Measured FLOPs: one forward under ``torch.utils.flop_counter.FlopCounterMode``, by module and site."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from .architectures import _is_timm_vit
from .costs import format_count



@dataclass(frozen=True)
class Measured:
    """FLOPs counted by ``torch.utils.flop_counter.FlopCounterMode`` during one forward (whole batch).

    ``by_module``: FLOPs per top-level module (HF models: the base model's children, e.g.
    ``model.vision_tower``, ``model.multi_modal_projector``, ``model.language_model``, and ``lm_head``;
    a wrapper holding everything is opened up). ``by_site``: the same grouped as ``vision``,
    ``projector``, ``llm``, ``lm_head`` where the module names say so (empty if they do not).
    ``by_operator``: FLOPs per aten operator. ``batch_size``: the leading dimension of the first tensor
    input; ``per_sample`` = ``total / batch_size``.
    """

    total: int
    by_module: dict[str, int]
    by_site: dict[str, int]
    by_operator: dict[str, int]
    batch_size: int
    unit: str = "FLOPs"

    @property
    def per_sample(self) -> float:
        return self.total / self.batch_size

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "per_sample": self.per_sample}

    def __str__(self) -> str:
        lines = [f"measured (FlopCounterMode, matrix products only): {format_count(self.total, self.unit)} for a "
                 f"batch of {self.batch_size} ({format_count(self.per_sample, self.unit)} per sample)",
                 "| module | FLOPs |", "|---|---:|"]
        lines += [f"| {name} | {format_count(value, self.unit)} |" for name, value in self.by_module.items()]
        return "\n".join(lines)


_SITE_MODULES = (("vision", ("vision_tower", "vision_model", "visual", "embeddings", "encoder", "head")),
                 ("projector", ("multi_modal_projector", "mm_projector", "projector")),
                 ("llm", ("language_model",)),
                 ("lm_head", ("lm_head",)))


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args: Any, out_shape=None, **kwargs: Any) -> int:
    """FLOPs of ``_scaled_dot_product_flash_attention_for_cpu`` (missing from FlopCounterMode's registry in
    torch <= 2.14): ``q·kᵀ`` and ``softmax·v`` for every query head (grouped-query keys broadcast)."""
    batch, heads, queries, head_dim = query_shape
    keys, value_dim = key_shape[-2], value_shape[-1]
    return 2 * batch * heads * queries * keys * head_dim + 2 * batch * heads * queries * keys * value_dim


def _native_mha_flops(query_shape, key_shape, value_shape, embed_dim: int, num_head: int, *args: Any,
                      out_shape=None, **kwargs: Any) -> int:
    """FLOPs of ``_native_multi_head_attention`` (``nn.MultiheadAttention``'s inference fast path, which
    FlopCounterMode's registry lacks in torch <= 2.14): q projection over the queries, k and v over the
    keys, ``q·kᵀ`` and ``softmax·v``, and the output projection."""
    batch, queries = query_shape[0], query_shape[-2]
    keys = key_shape[-2]
    projections = 2 * batch * (2 * queries + 2 * keys) * embed_dim * embed_dim
    return projections + 2 * 2 * batch * queries * keys * embed_dim


def _first_tensor(value: Any) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        for item in value:
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


def measure(model: Any, inputs: Any, **forward_kwargs: Any) -> Measured:
    """Run ``model`` once under ``FlopCounterMode`` and count its FLOPs per module.

    ``inputs``: a tensor (``model(inputs, **forward_kwargs)``), a tuple or list (``model(*inputs, ...)``)
    or a dict (``model(**inputs, ...)``). The count covers the whole batch (``Measured.per_sample``
    divides by it). FlopCounterMode counts matrix products only (linear layers, convolutions, matmuls,
    fused attention) at 2 FLOPs per multiply-accumulate; norms, softmax, activations and other
    element-wise work are not counted. Causal attention is counted in full (it sees shapes, not masks).
    vtprune adds the formulas of the fused CPU attention kernel and of ``nn.MultiheadAttention``'s
    inference fast path (``_native_multi_head_attention``), which torch's registry lacks.
    No autograd graph is built: the model's parameters stop requiring grad during the call (restored
    afterwards).
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    custom = {}
    cpu_sdpa = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    from torch.utils.flop_counter import flop_registry

    if cpu_sdpa is not None and cpu_sdpa not in flop_registry and cpu_sdpa.default not in flop_registry:
        custom[cpu_sdpa] = _sdpa_cpu_flops
    native_mha = getattr(aten, "_native_multi_head_attention", None)
    if native_mha is not None and native_mha not in flop_registry and native_mha.default not in flop_registry:
        custom[native_mha] = _native_mha_flops
    counter = FlopCounterMode(display=False, custom_mapping=custom)
    # No autograd graph: parameters stop requiring grad for the call. (Not torch.no_grad(): under it,
    # FlopCounterMode's module tracker fails on inputs that are views of parameters, e.g. timm's
    # attention-pool latent.)
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    try:
        for parameter in trainable:
            parameter.requires_grad_(False)
        with counter:
            if isinstance(inputs, Mapping):
                model(**inputs, **forward_kwargs)
            elif isinstance(inputs, (tuple, list)):
                model(*inputs, **forward_kwargs)
            else:
                model(inputs, **forward_kwargs)
    finally:
        for parameter in trainable:
            parameter.requires_grad_(True)
    counts = counter.get_flop_counts()
    root = type(model).__name__
    per_module = {name: sum(ops.values()) for name, ops in counts.items()}
    by_operator = {str(op): value for op, value in counts.get("Global", {}).items()}
    total = counter.get_total_flops()
    by_module = _top_modules(model, root, per_module, total)
    first = _first_tensor(inputs)
    batch = int(first.shape[0]) if first is not None and first.dim() > 0 else 1
    by_site = {"vision": total} if _is_timm_vit(model) else _group_sites(by_module)
    return Measured(total=total, by_module=by_module, by_site=by_site, by_operator=by_operator, batch_size=batch)


def _top_modules(model: Any, root: str, per_module: Mapping[str, int], total: int) -> dict[str, int]:
    """FLOPs of the root's children; an HF base-model wrapper (``model``) and a child holding all the
    FLOPs are opened up."""
    base = getattr(model, "base_model", None)
    base_prefix = getattr(model, "base_model_prefix", None)
    children = [name for name, _ in model.named_children()]
    if base is not None and base is not model and base_prefix in children:
        names = [f"{base_prefix}.{name}" for name, _ in base.named_children()]
        names += [name for name in children if name != base_prefix]
    else:
        names = children
    while True:
        with_flops = [name for name in names if per_module.get(f"{root}.{name}", 0)]
        if len(with_flops) == 1 and per_module.get(f"{root}.{with_flops[0]}", 0) == total:
            module = model.get_submodule(with_flops[0])
            grandchildren = [f"{with_flops[0]}.{name}" for name, _ in module.named_children()]
            if grandchildren:
                names = grandchildren
                continue
        break
    found = {name: per_module.get(f"{root}.{name}", 0) for name in names if per_module.get(f"{root}.{name}", 0)}
    rest = total - sum(found.values())
    if rest:
        found["(root)"] = rest
    return found


def _group_sites(by_module: Mapping[str, int]) -> dict[str, int]:
    """Group module FLOPs by site from the module names (the first name component that says); ``{}`` if
    any module cannot be placed."""
    sites: dict[str, int] = {}
    for name, value in by_module.items():
        site = next((site for part in name.split(".") for site, names in _SITE_MODULES if part in names), None)
        if site is None:
            return {}
        sites[site] = sites.get(site, 0) + value
    return sites
