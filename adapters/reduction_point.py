"""What every adapter does at a reduction point, whatever the host family.

An adapter runs its layer's own sub-modules and calls :func:`reduce_at` where the policy may shorten the
sequence; :func:`log_size_bias` gives proportional attention's additive mask.
"""
from __future__ import annotations

import threading
from typing import Any, Callable

import torch
from torch import nn

from vtprune.policy import Policy
from vtprune.state import Runtime, TokenState
from vtprune.view import LayerView

from .patching import forward_of


def log_size_bias(state: TokenState, dtype: torch.dtype) -> torch.Tensor | None:
    """``log(size)`` over the keys as an additive attention mask ``[B, 1, 1, N]`` (ToMe's proportional
    attention, Bolya et al. 2023, Eq. 1), or ``None`` before the first merge."""
    if state.size is None:
        return None
    return state.size.log().to(dtype).transpose(1, 2).unsqueeze(1)


def reduce_at(policy: Policy, state: TokenState, hidden: torch.Tensor, *, site: str, layer: int, num_layers: int,
              roles: tuple[str, ...], provide: Callable[[str], Any], grid: tuple[int, int] | None = None,
              where: str = "mid", anyres: bool = False, last_layer: int | None = None) -> torch.Tensor:
    """Ask ``policy`` for a plan at this point, apply it to ``hidden`` and the state, and record the layer
    in the trace. ``where="mid"``: between attention and MLP (attention saw the tokens entering, the rest
    of the layer the tokens left); ``"post"``: after the whole layer; ``"pre"``: before a module (the
    projector) that sees only the tokens left.

    The first ``len(roles)`` tokens are the protected prefix. Returns the reduced ``hidden``.
    """
    view = LayerView(site=site, layer=layer, num_layers=num_layers, hidden=hidden, num_protected=len(roles),
                     prefix_roles=roles, size=state.size, _provider=provide, memory=state.memory.setdefault(site, {}),
                     grid=grid, anyres=anyres, last_layer=last_layer)
    plan = policy.reduce(view)
    reduced = state.apply(hidden, plan)
    if plan is not None and reduced.shape[1] < len(roles):
        raise RuntimeError(f"policy {policy} dropped protected prefix tokens at {site} layer {layer}")
    state.record(site, layer, hidden.shape[1], reduced.shape[1], where if plan is not None else "none")
    return reduced


class CapturedOutput:
    """A per-thread slot for a sub-module's output during the active call (e.g. the keys at ``k_proj``).

    :meth:`wrap` returns a replacement ``forward`` for the sub-module (install it with
    ``Patch.override``) that stores the output while a vtprune call is active; :meth:`take` returns it
    once and clears the slot.
    """

    def __init__(self, what: str) -> None:
        self.what = what
        self._local = threading.local()

    def wrap(self, module: nn.Module, runtime: Runtime) -> Callable[..., Any]:
        original = forward_of(module)

        def forward(*args: Any, **kwargs: Any) -> Any:
            output = original(*args, **kwargs)
            if runtime.active() is not None:
                self._local.value = output
            return output

        return forward

    def take(self) -> torch.Tensor:
        value = getattr(self._local, "value", None)
        self._local.value = None
        if value is None:
            raise RuntimeError(f"{self.what} was not captured for this layer")
        return value


def refuse_gradient_checkpointing(model: nn.Module) -> Callable[[], None]:
    """A ``Runtime.entry(before=...)`` check: gradient checkpointing re-runs layers during backward,
    after the call's token state is gone, so the recomputed layers would not merge like the forward did.
    Raises a clear error instead of torch's ``CheckpointError`` whenever gradients are recorded and a layer
    stack would checkpoint: timm and open_clip checkpoint in eval mode too (``grad_checkpointing``),
    transformers only in training mode (``gradient_checkpointing`` and ``module.training``)."""

    def check() -> None:
        if not torch.is_grad_enabled():
            return
        for module in model.modules():
            if getattr(module, "grad_checkpointing", False) is True or \
                    (getattr(module, "gradient_checkpointing", False) is True and module.training):
                raise ValueError(
                    "vtprune: gradient checkpointing is on while gradients are recorded; recomputed layers would "
                    "not merge like the forward did. Turn it off (timm/open_clip: model.set_grad_checkpointing("
                    "False), which they apply in eval mode too; transformers: model.activation_checkpointing_"
                    "disable() or gradient_checkpointing_disable()) or run under torch.no_grad() / "
                    "torch.inference_mode()")

    return check


SUPPORTED_ATTENTION = ("eager", "sdpa")


def refuse_unsupported_attention(config: object, part: str, why: str) -> None:
    """Refuse a transformers model whose attention kernel cannot take what vtprune hands it (an additive
    float mask over the kept tokens): anything but ``eager`` and ``sdpa`` (FlashAttention reads a mask as
    0/1 padding, flex attention wants a BlockMask)."""
    implementation = getattr(config, "_attn_implementation", None) or "eager"
    if implementation not in SUPPORTED_ATTENTION:
        raise ValueError(
            f"vtprune: {part} uses attn_implementation={implementation!r}, but {why} needs one of "
            f"{', '.join(map(repr, SUPPORTED_ATTENTION))}; load the model with attn_implementation='sdpa' "
            "(or call model.set_attn_implementation('sdpa'))")


def refuse_placement(policy: Policy | None, adapter: str, offered: tuple[str, ...] = ("mid",)) -> None:
    """Raise a clear error at ``apply`` for a policy whose reduction placement the adapter does not offer."""
    if policy is not None and policy.reduction_placement() not in offered:
        raise ValueError(f"policy {policy} reduces at placement {policy.reduction_placement()!r}, but adapter "
                         f"{adapter!r} offers {', '.join(map(repr, offered))} (placement 'post' needs the hf-clip-vision "
                         "or hf-llava adapter)")


def key_log_sizes(size: torch.Tensor, dtype: torch.dtype, heads: int | None = None) -> torch.Tensor:
    """``log(size)`` of ``size [B, N, 1]`` as an additive attention mask over the keys: ``[B, 1, 1, N]``
    for ``scaled_dot_product_attention``, or ``[B * heads, 1, N]`` for ``nn.MultiheadAttention`` with one
    query (a pooling latent). Attention then counts a merged token as many times as it has patches."""
    bias = size.log().to(dtype).transpose(1, 2)  # [B, 1, N]
    if heads is None:
        return bias.unsqueeze(1)
    return bias.repeat_interleave(heads, dim=0)


def size_aware_mha_pool(pooler: nn.Module, attention: nn.MultiheadAttention, runtime: Runtime,
                        before: Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                        after: Callable[[nn.Module, torch.Tensor], torch.Tensor]) -> Callable[..., Any]:
    """A replacement ``forward`` for an attention-pooling module built on a batch-first
    ``nn.MultiheadAttention`` with learned queries: with merged tokens of known sizes, the keys get
    ``log(size)`` (proportional attention, Bolya et al. 2023, Eq. 1), so pooling over merged tokens equals
    pooling over the tokens they contain. ``before(pooler, x)`` gives ``(queries, keys_values)``,
    ``after(pooler, attended)`` the pooled output (the host's own steps around its attention)."""
    original = forward_of(pooler)

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        size = runtime.sizes_for(x) if x.dim() == 3 and not args and not kwargs else None
        if size is None:
            return original(x, *args, **kwargs)
        queries, tokens = before(pooler, x)
        mask = key_log_sizes(size, tokens.dtype, attention.num_heads).expand(-1, queries.shape[1], -1)
        attended = attention(queries, tokens, tokens, attn_mask=mask, need_weights=False)[0]
        return after(pooler, attended)

    return forward
