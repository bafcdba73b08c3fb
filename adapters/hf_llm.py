"""Sequence surgery between the decoder layers of a Hugging Face language model (the ``llm`` site).

Used by the ``hf-llava`` adapter for the Llama / Mistral / Qwen2 decoders inside LLaVA and LLaVA-NeXT.
Every decoder layer's ``forward`` is wrapped per instance. During a prefill that holds visual tokens, the
policy is asked after each layer (``reduced="post"``); when it drops visual tokens, the layers after it
get everything that depends on the sequence rebuilt from the prefill's originals for the kept columns:
the 4-D attention mask (rows and columns), the position ids and RoPE's ``(cos, sin)`` — renumbered over the
attended kept tokens (``position_mode="compact"``, like the official LLaVA codes) or gathered
(``"keep"``, the original positions). Layers before a cut keep their full KV cache, later ones a shorter
one (``DynamicCache`` holds ragged layers). The cache is remembered (weakly) with each layer's kept
columns, so every later call continuing it (decode steps) gets, at the layers after a cut, the mask
columns of the tokens that layer still holds and positions shifted by the tokens dropped before it.

Signals (computed only when a policy asks, never by re-running a layer, never with ``output_attentions``):
``"attention"``: this layer's own queries, keys and values, RoPE applied (keys/values repeated to the
query heads); ``"next_attention"``: the next layer's ``input_layernorm`` + ``q_proj``/``k_proj`` + RoPE on
this layer's output (what PDrop and TransPrune's IGA read); ``"transitions"``: the attention and MLP
inputs (after their norms) and outputs of this layer (TransPrune's TTV).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from vtprune.policy import Policy
from vtprune.sequence import POSITION_MODES, LLMTokens
from vtprune.state import Runtime, TokenState
from vtprune.view import QKV, LayerView

from .patching import Patch, forward_of
from .reduction_point import CapturedOutput, refuse_unsupported_attention
from .sequence import CacheLayouts, gather_columns



@dataclass
class Surgery:
    """One prefill's state at the ``llm`` site: the original mask/positions/RoPE of the full sequence (taken
    from the first layer's arguments), the original column of each current position, the rebuilt arguments
    for the current columns, and what every layer saw (for the decode layout)."""

    tokens: LLMTokens
    length: int
    columns: torch.Tensor
    attended: torch.Tensor  # [B, L0] the prompt's attended (non-padding) columns
    dropped: torch.Tensor  # [B, L0] attended original columns dropped so far
    removed: torch.Tensor  # [B] how many: the shift of compact positions after the last cut
    original: dict[str, Any] = field(default_factory=dict)
    rebuilt: dict[str, Any] | None = None
    layer_columns: dict[int, torch.Tensor] = field(default_factory=dict)
    layer_removed: dict[int, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def start(cls, tokens: LLMTokens) -> "Surgery":
        batch, length = tokens.attended.shape
        device = tokens.attended.device
        return cls(tokens=tokens, length=length, columns=torch.arange(length, device=device).expand(batch, -1),
                   attended=tokens.attended, dropped=torch.zeros(batch, length, dtype=torch.bool, device=device),
                   removed=torch.zeros(batch, dtype=torch.long, device=device))

    @property
    def cut(self) -> bool:
        return self.columns.shape[1] < self.length

    def cut_to(self, keep: torch.Tensor) -> None:
        """Keep the current positions ``keep [B, L']`` (sorted)."""
        columns = self.columns.gather(1, keep)
        still = torch.zeros_like(self.dropped).scatter_(1, columns, True)
        self.dropped = self.attended & ~still
        self.removed = self.dropped.sum(1)
        self.columns = columns
        self.tokens = self.tokens.gather(keep)
        self.rebuilt = None


def _gather_mask(mask: torch.Tensor, columns: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """A ``[B|1, H|1, Q, K]`` mask at the key ``columns [B, K']`` (and query ``rows [B, Q']``)."""
    batch = columns.shape[0]
    mask = mask.expand(batch, *mask.shape[1:])
    heads, queries = mask.shape[1], mask.shape[2]
    if rows is not None:
        mask = mask.gather(2, rows[:, None, :, None].expand(-1, heads, -1, mask.shape[3]))
        queries = rows.shape[1]
    return mask.gather(3, columns[:, None, None, :].expand(-1, heads, queries, -1))


@dataclass(frozen=True)
class DecodeLayout:
    """What a pruned prefill left in each layer's cache: ``columns[j] [B, L_j]`` (original prefill columns)
    and ``removed[j] [B]`` (attended tokens dropped before layer ``j``), for the layers after a cut."""

    length: int
    columns: dict[int, torch.Tensor]
    removed: dict[int, torch.Tensor]


def _on_device(kwargs: dict, device: torch.device) -> dict:
    """``kwargs`` with every tensor (and tuple of tensors, RoPE's ``(cos, sin)``) on ``device``; ``.to`` is a
    no-op for tensors already there."""
    def move(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.to(device)
        if isinstance(value, tuple) and all(isinstance(item, torch.Tensor) for item in value):
            return tuple(item.to(device) for item in value)
        return value

    return {key: move(value) for key, value in kwargs.items()}


class LLMSite:
    """Patches the decoder layers of ``language_model`` for one runtime (see the module docstring)."""

    def __init__(self, language_model: nn.Module, runtime: Runtime, policy: Policy, position_mode: str):
        if position_mode not in POSITION_MODES:
            raise ValueError(f"position_mode must be one of {POSITION_MODES}, got {position_mode!r}")
        refuse_unsupported_attention(getattr(language_model, "config", None), "the language model",
                                     f"the llm site ({policy}: its attention mask cut to the kept tokens)")
        layers = getattr(language_model, "layers", None)
        if not isinstance(layers, nn.ModuleList) or not len(layers):
            raise ValueError(f"{type(language_model).__name__} has no decoder `layers`; the llm site supports "
                             "Llama-style decoders (Llama, Mistral, Qwen2)")
        for index, layer in enumerate(layers):
            missing = [name for name in ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
                       if not hasattr(layer, name)]
            if not missing:
                missing = [f"self_attn.{name}" for name in ("q_proj", "k_proj", "v_proj")
                           if not hasattr(layer.self_attn, name)]
            if missing:
                raise ValueError(f"decoder layer {index} ({type(layer).__name__}) lacks {', '.join(missing)}; the "
                                 "llm site supports Llama-style decoder layers")
        if not hasattr(language_model, "rotary_emb"):
            raise ValueError(f"{type(language_model).__name__} has no rotary_emb; the llm site needs RoPE decoders")
        self.model = language_model
        self.layers = layers
        self.runtime = runtime
        self.policy = policy
        self.mode = position_mode
        self.layouts = CacheLayouts()
        host = sys.modules[type(layers[0].self_attn).__module__]
        self.apply_rope: Callable = host.apply_rotary_pos_emb

    # --- patching --------------------------------------------------------------------------------
    def patch(self, patch: Patch) -> None:
        signals = set(self.policy.signals)
        for index, layer in enumerate(self.layers):
            taps = None
            if "attention" in signals:
                taps = {name: CapturedOutput(f"self_attn.{name}_proj output") for name in ("q", "k", "v")}
                for name, slot in taps.items():
                    projection = getattr(layer.self_attn, f"{name}_proj")
                    patch.override(projection, "forward", slot.wrap(projection, self.runtime))
            transitions = "transitions" in signals
            if transitions:
                patch.override(layer.self_attn, "forward", self._recording(layer.self_attn, "attn"))
                patch.override(layer.mlp, "forward", self._recording(layer.mlp, "mlp"))
            patch.override(layer, "forward", self._layer_forward(layer, index, taps, transitions))

    def _recording(self, module: nn.Module, name: str) -> Callable[..., Any]:
        """A forward that keeps its (normed) input and output in the active call's state, for one layer."""
        original = forward_of(module)

        def forward(*args: Any, **kwargs: Any) -> Any:
            output = original(*args, **kwargs)
            state = self.runtime.active()
            if state is not None and state.scratch.get("llm") is not None:
                inputs = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
                state.scratch.setdefault("transitions", {})[name] = (
                    inputs, output[0] if isinstance(output, tuple) else output)
            return output

        return forward

    # --- per call ----------------------------------------------------------------------------------
    def begin(self, state: TokenState, tokens: LLMTokens | None) -> None:
        """Called by the adapter before a prefill; ``tokens=None``: nothing to prune in this call."""
        state.scratch["llm"] = Surgery.start(tokens) if tokens is not None else None

    def finish(self, state: TokenState, cache: Any) -> None:
        """Called after the prefill: remember the cache's layout for later calls continuing it."""
        surgery = state.scratch.get("llm")
        if surgery is None or not surgery.layer_columns:
            return
        self.layouts.remember(cache, DecodeLayout(length=surgery.length, columns=dict(surgery.layer_columns),
                                                  removed=dict(surgery.layer_removed)))

    def _layer_forward(self, layer: nn.Module, index: int, taps: dict | None, transitions: bool):
        original = forward_of(layer)

        def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            state = self.runtime.active()
            if state is None or args:
                return original(hidden_states, *args, **kwargs)
            surgery = state.scratch.get("llm")
            if surgery is not None and hidden_states.shape[1] == surgery.columns.shape[1]:
                return self._prefill_layer(original, layer, index, state, surgery, hidden_states, kwargs, taps)
            layout = self.layouts.get(kwargs.get("past_key_values"))
            if layout is not None and index in layout.columns:
                # layers of one stage share their columns: rebuild once per stage and call
                rebuilt = state.scratch.setdefault("decode_rebuilt", {})
                key = id(layout.columns[index])
                if key not in rebuilt:
                    rebuilt[key] = self._decode_kwargs(layout, index, hidden_states, kwargs)
                kwargs = {**kwargs, **rebuilt[key]}
            return original(hidden_states, **kwargs)

        return forward

    def _prefill_layer(self, original, layer, index, state, surgery: Surgery, hidden, kwargs, taps):
        if not surgery.original:
            surgery.original = {"mask": kwargs.get("attention_mask"), "position_ids": kwargs.get("position_ids"),
                                "position_embeddings": kwargs.get("position_embeddings")}
        if surgery.cut:
            kwargs = self._prefill_kwargs(surgery, hidden, kwargs)
            surgery.layer_columns[index] = surgery.columns
            surgery.layer_removed[index] = surgery.removed
        output = original(hidden, **kwargs)
        try:
            return self._reduce_after(layer, index, state, surgery, output, kwargs, taps)
        finally:
            state.scratch.pop("transitions", None)  # this layer's module inputs/outputs: not kept past it

    def _reduce_after(self, layer, index, state, surgery: Surgery, output, kwargs, taps):
        taken = {name: slot.take() for name, slot in taps.items()} if taps is not None else {}
        if surgery.tokens.visual.shape[1] == 0:
            return output

        def provide(name: str) -> Any:
            if name == "attention":
                return self._own_attention(layer, taken, kwargs["position_embeddings"])
            if name == "next_attention":
                if index + 1 >= len(self.layers):
                    raise ValueError("next_attention is not available after the last decoder layer")
                return self._next_attention(self.layers[index + 1], output, kwargs["position_embeddings"])
            if name == "transitions":
                return dict(state.scratch.get("transitions", {}))
            if name == "tokens":
                return surgery.tokens
            raise ValueError(f"the llm site offers the signals 'attention', 'next_attention', 'transitions', "
                             f"'tokens' and 'hidden', not {name!r}")

        view = LayerView(site="llm", layer=index, num_layers=len(self.layers), hidden=output, num_protected=0,
                         prefix_roles=(), size=None, _provider=provide, memory=state.memory.setdefault("llm", {}))
        plan = self.policy.reduce(view)
        visual_in = surgery.tokens.visual.shape[1]
        if plan is None:
            state.record("llm", index, visual_in, visual_in, "none")
            return output
        keep = plan.keep
        surgery.cut_to(keep)
        state.record("llm", index, visual_in, surgery.tokens.visual.shape[1], "post")
        return output.gather(1, keep[..., None].expand(-1, -1, output.shape[-1]))

    def _positions(self, surgery: Surgery, columns: torch.Tensor) -> torch.Tensor:
        positions = surgery.original["position_ids"]
        if positions is None:
            positions = torch.arange(surgery.length, device=columns.device)[None]
        gathered = positions.expand(columns.shape[0], -1).gather(1, columns)
        if self.mode == "keep":
            return gathered
        shift = surgery.dropped.long().cumsum(1).gather(1, columns)
        return gathered - shift

    def _prefill_kwargs(self, surgery: Surgery, hidden: torch.Tensor, kwargs: dict) -> dict:
        """The layer's mask, position ids and RoPE for the kept columns (rebuilt once per cut, then reused), on
        the layer's device (accelerate may place later layers on another GPU)."""
        if surgery.rebuilt is None:
            surgery.rebuilt = self._rebuild(surgery, hidden)
        return {**kwargs, **_on_device(surgery.rebuilt, hidden.device)}

    def _rebuild(self, surgery: Surgery, hidden: torch.Tensor) -> dict:
        kwargs = {}
        columns = surgery.columns
        mask = surgery.original["mask"]
        if isinstance(mask, torch.Tensor):
            kwargs["attention_mask"] = _gather_mask(mask, columns, columns)
        positions = self._positions(surgery, columns)
        kwargs["position_ids"] = positions
        embeddings = surgery.original["position_embeddings"]
        if embeddings is not None:
            if self.mode == "keep":
                kwargs["position_embeddings"] = tuple(gather_columns(item, columns) for item in embeddings)
            else:
                kwargs["position_embeddings"] = self.model.rotary_emb(hidden, position_ids=positions.to(hidden.device))
        return kwargs

    def _decode_kwargs(self, layout: DecodeLayout, index: int, hidden: torch.Tensor, kwargs: dict) -> dict:
        """A decode step's mask, position ids and RoPE at a layer after a cut (only the changed entries)."""
        given = kwargs
        kwargs = {}
        columns = layout.columns[index].to(hidden.device)
        mask = given.get("attention_mask")
        if isinstance(mask, torch.Tensor):
            mask = mask.expand(columns.shape[0], *mask.shape[1:])
            head = _gather_mask(mask[..., :layout.length], columns, None)
            kwargs["attention_mask"] = torch.cat([head, mask[..., layout.length:]], dim=-1)
        if self.mode == "compact":
            positions = given.get("position_ids")
            if positions is not None:
                positions = positions.expand(columns.shape[0], -1) - layout.removed[index][:, None].to(positions.device)
                kwargs["position_ids"] = positions
                kwargs["position_embeddings"] = self.model.rotary_emb(hidden, position_ids=positions)
        return _on_device(kwargs, hidden.device)

    # --- signals -------------------------------------------------------------------------------------
    def _repeat(self, tensor: torch.Tensor, heads: int) -> torch.Tensor:
        return tensor.repeat_interleave(heads // tensor.shape[1], dim=1) if tensor.shape[1] != heads else tensor

    def _own_attention(self, layer: nn.Module, taken: dict, embeddings) -> QKV:
        attn = layer.self_attn
        shape = lambda x: x.unflatten(-1, (-1, attn.head_dim)).transpose(1, 2)  # noqa: E731
        q, k, v = shape(taken["q"]), shape(taken["k"]), shape(taken["v"])
        cos, sin = embeddings
        q, k = self.apply_rope(q, k, cos, sin)
        return QKV(q=q, k=self._repeat(k, q.shape[1]), v=self._repeat(v, q.shape[1]), scale=float(attn.scaling))

    def _next_attention(self, layer: nn.Module, hidden: torch.Tensor, embeddings) -> QKV:
        attn = layer.self_attn
        normed = layer.input_layernorm(hidden)
        shape = lambda x: x.unflatten(-1, (-1, attn.head_dim)).transpose(1, 2)  # noqa: E731
        q, k = shape(attn.q_proj(normed)), shape(attn.k_proj(normed))
        cos, sin = embeddings
        q, k = self.apply_rope(q, k, cos, sin)
        k = self._repeat(k, q.shape[1])
        return QKV(q=q, k=k, v=k.new_zeros(0), scale=float(attn.scaling))
