"""Adapter for Hugging Face ``transformers`` CLIP and SigLIP vision towers.

Matches, structurally per instance, a ``CLIPVisionModel`` / ``SiglipVisionModel`` (in transformers 5.x
``CLIPModel.vision_model`` *is* a ``CLIPVisionModel``; older releases' ``CLIPVisionTransformer`` /
``SiglipVisionTransformer`` match too): a module with ``embeddings``, ``post_layernorm`` and
``encoder.layers``, a ``ModuleList`` of ``CLIPEncoderLayer`` / ``SiglipEncoderLayer``. A ``CLIPModel`` /
``SiglipModel`` (any module whose ``vision_model`` is such a tower) is matched only to raise a clear
``TypeError`` from :func:`vtprune.apply` / :func:`vtprune.inspect` telling the user to pass
``model.vision_model`` (patching the tower patches every caller, ``get_image_features`` included).

Reduction point: inside every encoder layer, between the attention residual and the MLP (ToMe's
placement). The layer's own ``layer_norm1``, ``self_attn`` (with the model's attention implementation,
sdpa or eager), ``layer_norm2`` and ``mlp`` run unchanged. Keys (``"keys"``, averaged over heads) and
per-head queries/keys/values (``"qkv"``) are read at ``self_attn.q_proj/k_proj/v_proj`` (their forwards are
wrapped per instance: no extra compute; no attention weights are materialised). Proportional attention
enters as the additive float ``attention_mask`` ``log(size)`` of shape ``[B, 1, 1, N]``.

Outputs: ``last_hidden_state`` is the merged sequence (CLS first for CLIP). CLIP's ``pooler_output``
(``post_layernorm`` of CLS) is unaffected in kind since CLS is protected. SigLIP's attention-pool
``head`` weighs merged tokens by size (``log(size)`` added to its keys, so it pools as over the tokens
they contain). With ``output_hidden_states=True`` every hidden state
is unmerged back to the full ``N0`` tokens through the per-layer source map (each original token gets
the value of the token containing it), so consumers that index hidden states (LLaVA's ``[-2]``) keep
their token count; attentions (``output_attentions``, eager) stay merged-size.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from vtprune.policy import Policy
from vtprune.reduction import unmerge
from vtprune.state import Runtime, TokenState
from vtprune.view import QKV

from .base import Inspection
from .patching import Patch, forward_of
from .reduction_point import (CapturedOutput, log_size_bias, reduce_at, refuse_gradient_checkpointing,
                              refuse_unsupported_attention, size_aware_mha_pool)

_LAYER_CLASSES = ("CLIPEncoderLayer", "SiglipEncoderLayer")
_LAYER_PARTS = ("layer_norm1", "self_attn", "layer_norm2", "mlp")
_WRAPPER_CLASSES = ("CLIPModel", "SiglipModel", "Siglip2Model", "CLIPVisionModelWithProjection",
                    "CLIPForImageClassification", "SiglipForImageClassification")


def _layers(model: nn.Module) -> nn.ModuleList | None:
    encoder = getattr(model, "encoder", None)
    layers = getattr(encoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        return None
    if not all(type(layer).__name__ in _LAYER_CLASSES for layer in layers):
        return None
    return layers


def _is_vision_tower(model: nn.Module) -> bool:
    return (_layers(model) is not None and hasattr(model, "embeddings") and hasattr(model, "post_layernorm")
            and hasattr(getattr(model, "embeddings"), "patch_embedding"))


def _has_cls(model: nn.Module) -> bool:
    return getattr(model.embeddings, "class_embedding", None) is not None


class HFVisionAdapter:
    name = "hf-clip-vision"
    family = "transformers CLIPVisionModel / SiglipVisionModel (pass CLIPModel.vision_model)"
    sites = ("vision",)
    signals = ("keys", "qkv", "hidden")

    def matches(self, model: nn.Module) -> bool:
        return _is_vision_tower(model) or self.wrapper_hint(model) is not None

    def wrapper_hint(self, model: nn.Module) -> str | None:
        """For a CLIPModel-like wrapper, the message telling the user which sub-module to pass."""
        tower = getattr(model, "vision_model", None)
        if isinstance(tower, nn.Module) and _is_vision_tower(tower):
            return (f"{type(model).__name__} holds both towers; vtprune patches the vision tower only: pass "
                    f"model.vision_model (a {type(tower).__name__}), e.g. vtprune.apply(model.vision_model, ...); "
                    "get_image_features and forward then use the patched tower")
        return None

    def _check(self, model: nn.Module) -> nn.ModuleList:
        hint = None if _is_vision_tower(model) else self.wrapper_hint(model)
        if hint is not None:
            raise TypeError(f"vtprune: {hint}")
        layers = _layers(model)
        if layers is None:
            raise ValueError(f"{type(model).__name__} has no encoder.layers of CLIPEncoderLayer/SiglipEncoderLayer")
        for index, layer in enumerate(layers):
            missing = [part for part in _LAYER_PARTS if not hasattr(layer, part)]
            if not missing and not hasattr(layer.self_attn, "k_proj"):
                missing.append("self_attn.k_proj")
            if missing:
                raise ValueError(f"encoder layer {index} ({type(layer).__name__}) lacks {', '.join(missing)}; "
                                 "the hf-clip-vision adapter supports pre-norm CLIP/SigLIP encoder layers")
        return layers

    def inspect(self, model: nn.Module) -> Inspection:
        layers = self._check(model)
        notes = ["last_hidden_state is the merged sequence; output_hidden_states are unmerged to all tokens"]
        if getattr(model, "head", None) is not None and getattr(model, "use_head", True):
            notes.append("the attention-pooling head weighs merged tokens by size (log(size) added to its keys)")
        if not _has_cls(model):
            notes.append("no CLS token: every token may be merged")
        return Inspection(
            adapter=self.name, family=self.family, model_class=type(model).__name__,
            sites={"vision": tuple(f"encoder.layers.{i}" for i in range(len(layers)))},
            signals=self.signals, protected=("cls",) if _has_cls(model) else (), notes=tuple(notes),
        )

    def patch(self, model: nn.Module, runtime: Runtime) -> Patch:
        layers = self._check(model)
        policy = runtime.policies["vision"]
        if policy.proportional_attention():
            refuse_unsupported_attention(model.config, f"{type(model).__name__}",
                                         f"{policy}'s proportional attention (log(size) added to the keys)")
        roles = ("cls",) if _has_cls(model) else ()
        patch = Patch()
        try:
            needs = projections_for(policy.signals)
            for index, layer in enumerate(layers):
                taps = AttentionTaps(layer.self_attn, needs) if needs else None
                if taps is not None:
                    taps.install(patch, runtime)
                patch.override(layer, "forward", encoder_layer_forward(
                    layer, index, runtime, policy=policy, num_layers=len(layers), roles=roles, taps=taps))
            head = getattr(model, "head", None)
            if head is not None and isinstance(getattr(head, "attention", None), nn.MultiheadAttention):
                patch.override(head, "forward", size_aware_mha_pool(head, head.attention, runtime,
                                                                    _siglip_head_queries, _siglip_head_output))
            patch.override(model, "forward", runtime.entry(forward_of(model), record_layers=True,
                                                           before=refuse_gradient_checkpointing(model),
                                                           post=_unmerge_hidden_states(len(layers))))
        except BaseException:
            patch.undo()
            raise
        return patch


class AttentionTaps:
    """Captures the outputs of an attention module's ``q_proj`` / ``k_proj`` / ``v_proj`` during the active call
    (their forwards are wrapped per instance: the layer's own projections, no extra compute)."""

    def __init__(self, attn: nn.Module, needs: frozenset[str]):
        self.attn = attn
        self.slots = {name: CapturedOutput(f"self_attn.{name}_proj output") for name in sorted(needs)}

    def install(self, patch: Patch, runtime: Runtime) -> None:
        for name, slot in self.slots.items():
            projection = getattr(self.attn, f"{name}_proj")
            patch.override(projection, "forward", slot.wrap(projection, runtime))

    def take(self) -> dict[str, torch.Tensor]:
        return {name: slot.take() for name, slot in self.slots.items()}


def projections_for(signals: tuple[str, ...]) -> frozenset[str]:
    """Which of q/k/v a set of signals needs."""
    needs = set()
    if "keys" in signals:
        needs.add("k")
    if "qkv" in signals:
        needs.update("qkv")
    return frozenset(needs)


def attention_signal(name: str, taken: dict[str, torch.Tensor], attn: nn.Module) -> Any:
    """``"keys"`` (mean over heads, ``[B, N, head_dim]``) or ``"qkv"`` (:class:`~vtprune.view.QKV`) from the
    captured projections of one layer."""
    head_dim = attn.head_dim

    def heads(tensor: torch.Tensor) -> torch.Tensor:  # [B, N, C] -> [B, H, N, head_dim]
        return tensor.unflatten(-1, (-1, head_dim)).transpose(1, 2)

    if name == "keys":
        return taken["k"].unflatten(-1, (-1, head_dim)).mean(-2)
    if name == "qkv":
        return QKV(q=heads(taken["q"]), k=heads(taken["k"]), v=heads(taken["v"]), scale=float(attn.scale))
    raise ValueError(f"CLIP/SigLIP encoder layers offer the signals 'keys', 'qkv' and 'hidden', not {name!r}")


def encoder_layer_forward(layer: nn.Module, index: int, runtime: Runtime, *, policy: Policy | None, num_layers: int,
                          roles: tuple[str, ...], taps: AttentionTaps | None,
                          on_output: Callable[[TokenState, torch.Tensor, dict], None] | None = None,
                          anyres: bool = False, last_layer: int | None = None, proportional: bool | None = None):
    """A CLIP/SigLIP encoder layer's forward with a reduction point between attention and MLP (or after the
    MLP for a policy whose ``reduction_placement()`` is ``"post"``).

    ``policy`` (``None``: no reduction in this layer) is asked with ``num_layers`` (the tower's depth) and
    ``last_layer`` (the last layer whose output is used, LLaVA's feature layer; default the last). ``taps`` captures the projections the signals need; ``on_output(state, output, taken)`` sees
    the layer's output and captured projections (LLaVA's feature layer). ``anyres``: the sequences are
    crops of LLaVA-NeXT images (:attr:`~vtprune.view.LayerView.anyres`). ``proportional``: whether attention
    adds ``log(size)`` to its keys (default: ``policy``'s choice); a layer that does not reduce still needs it
    after earlier layers merged (LLaVA's feature layer when a projector policy reads its attention).
    """
    original = forward_of(layer)
    if proportional is None:
        proportional = policy is not None and policy.proportional_attention()
    post = policy is not None and policy.reduction_placement() == "post"

    def forward(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *args: Any,
                **kwargs: Any) -> torch.Tensor:
        state = runtime.active()
        if state is None:
            return original(hidden_states, attention_mask, *args, **kwargs)
        if attention_mask is not None or args:
            raise ValueError("vtprune: token reduction cannot be combined with an attention_mask in CLIP/SigLIP "
                             "encoder layers (the mask would not follow the reduced tokens)")
        x = hidden_states
        state.start(x)
        mask = log_size_bias(state, x.dtype) if proportional else None
        attended, _ = layer.self_attn(hidden_states=layer.layer_norm1(x), attention_mask=mask, **kwargs)
        taken = taps.take() if taps is not None else {}
        x = x + attended

        def reduce(x: torch.Tensor, where: str) -> torch.Tensor:
            return reduce_at(policy, state, x, site="vision", layer=index, num_layers=num_layers, roles=roles,
                             provide=lambda name: attention_signal(name, taken, layer.self_attn), anyres=anyres,
                             last_layer=last_layer, where=where)

        if policy is not None and not post:
            x = reduce(x, "mid")
        x = x + layer.mlp(layer.layer_norm2(x))
        if policy is not None and post:
            x = reduce(x, "post")
        if on_output is not None:
            on_output(state, x, taken)
        return x

    return forward


def _siglip_head_queries(head: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return head.probe.repeat(x.shape[0], 1, 1), x


def _siglip_head_output(head: nn.Module, attended: torch.Tensor) -> torch.Tensor:
    """SiglipMultiheadAttentionPoolingHead's steps after its attention (transformers 5.x)."""
    return (attended + head.mlp(head.layernorm(attended)))[:, 0]


def _unmerge_hidden_states(num_layers: int):
    """``post`` for the entry point: every per-layer hidden state back to all ``N0`` tokens.

    HF records the embeddings (index 0) and each layer's output (index ``i + 1``), so hidden state
    ``i + 1`` is unmerged with the source map recorded after layer ``i``.
    """

    def unmerge_all(states: Any, state) -> Any:
        if not isinstance(states, tuple) or len(states) != num_layers + 1:
            return states  # a selection of indices, or not hidden states at all: left as recorded
        if not all(isinstance(item, torch.Tensor) and item.dim() == 3 for item in states):
            return states
        out = [states[0]]
        for layer, tokens in enumerate(states[1:]):
            assignment = state.layer_assignments.get(layer)
            if assignment is not None and tokens.shape[1] != assignment.shape[1]:
                tokens = unmerge(tokens, assignment)
            out.append(tokens)
        return tuple(out)

    def post(output: Any, state) -> Any:
        if state.assignment is None or not state.layer_assignments:
            return output
        if isinstance(output, tuple) and not hasattr(output, "keys"):  # return_dict=False
            return tuple(unmerge_all(item, state) for item in output)
        hidden = getattr(output, "hidden_states", None)
        if hidden is not None:
            output["hidden_states"] = unmerge_all(hidden, state)
        return output

    return post
