"""Per-call token state and the per-handle runtime that creates it at every entry point.

A :class:`TokenState` lives for exactly one call of a patched entry point (``forward``,
``forward_features``, ``forward_intermediates``, ...). Nested entry points (``forward`` calling
``forward_features``) share the outer call's state. The active state is thread-local, so concurrent
callers in threads do not see each other's tokens.
"""
from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .policy import Policy
from .reduction import MergePlan, assignment_to_source, merge_weighted, update_assignment
from .trace import LayerTokens, Trace


@dataclass
class TokenState:
    """Everything that changes during one forward.

    ``size``: ``[B, N, 1]`` original tokens inside each current token (``None`` until the first merge).
    ``assignment``: ``[B, N0]`` long, the current index of the token containing each original token
    (``-1`` = dropped); together with ``num_original`` it is ToMe's source map in compact form.
    """

    record_layers: bool = False
    size: torch.Tensor | None = None
    assignment: torch.Tensor | None = None
    num_original: int = 0
    batch_size: int = 0
    records: dict[str, list[LayerTokens]] = field(default_factory=dict)
    layer_assignments: dict[int, torch.Tensor] = field(default_factory=dict)
    memory: dict[str, dict] = field(default_factory=dict)  # per-site policy memory (LayerView.memory)
    scratch: dict[str, Any] = field(default_factory=dict)  # adapter-private values of this call
    positions: torch.Tensor | None = None  # [B, n] original positions of the tokens handed on (VLMs)
    visual_tokens: tuple[int, ...] | None = None  # per image, the visual tokens the language model receives

    def start(self, hidden: torch.Tensor) -> None:
        """Initialise from the first sequence a reduction site sees (idempotent)."""
        if self.assignment is None:
            self.batch_size, self.num_original = hidden.shape[0], hidden.shape[1]
            self.assignment = torch.arange(self.num_original, device=hidden.device).repeat(self.batch_size, 1)

    def size_dtype(self, hidden: torch.Tensor) -> torch.dtype:
        return torch.promote_types(hidden.dtype, torch.float32)

    def apply(self, hidden: torch.Tensor, plan: MergePlan | None) -> torch.Tensor:
        """Apply ``plan`` to ``hidden``, the sizes and the source map; returns the reduced hidden states."""
        if plan is None:
            return hidden
        num_in = hidden.shape[1]
        if self.size is None:
            self.size = torch.ones(hidden.shape[0], num_in, 1, dtype=self.size_dtype(hidden), device=hidden.device)
        hidden, self.size = merge_weighted(hidden, self.size, plan)
        self.assignment = update_assignment(self.assignment, plan, num_in)
        return hidden

    def record(self, site: str, layer: int, tokens_in: int, tokens_out: int, reduced: str) -> None:
        self.records.setdefault(site, []).append(LayerTokens(layer, tokens_in, tokens_out, reduced))
        if self.record_layers and self.assignment is not None:
            self.layer_assignments[layer] = self.assignment

    def trace(self) -> Trace:
        positions = None if self.positions is None else tuple(tuple(row) for row in self.positions.tolist())
        return Trace(batch_size=self.batch_size,
                     sites={site: tuple(layers) for site, layers in self.records.items()}, positions=positions,
                     visual_tokens=self.visual_tokens)

    def adopt(self, other: "TokenState") -> None:
        """Take over the token bookkeeping of an earlier call (a VLM's image encoding run by ``generate``
        before the prefill forward), so that the prefill's trace shows it."""
        for name in ("size", "assignment", "num_original", "batch_size", "positions", "visual_tokens"):
            setattr(self, name, getattr(other, name))
        self.records = {site: list(layers) for site, layers in other.records.items()}

    def source(self) -> torch.Tensor | None:
        """Dense ``[B, N, N0]`` source matrix (ToMe's ``trace_source``) of the current sequence."""
        if self.assignment is None:
            return None
        num_tokens = self.size.shape[1] if self.size is not None else self.num_original
        return assignment_to_source(self.assignment, num_tokens)


class Runtime:
    """Per-handle bookkeeping shared by an adapter's patched functions.

    Holds the policies by site, the thread-local active state, the last finished state (for
    ``Handle.trace`` / ``Handle.source``) and, per thread, the sizes of the last ``forward_features``
    output (so a later ``forward_head`` in the same thread can pool size-weighted).
    """

    def __init__(self, policies: dict[str, Policy]):
        self.policies = policies
        self._local = threading.local()
        self.last_state: TokenState | None = None

    # --- the active state ----------------------------------------------------------------------
    def active(self) -> TokenState | None:
        return getattr(self._local, "state", None)

    def entry(self, function: Callable[..., Any], *, record_layers: bool = False,
              post: Callable[[Any, TokenState], Any] | None = None,
              before: Callable[[], None] | None = None) -> Callable[..., Any]:
        """Wrap an entry point so that each outermost call gets a fresh :class:`TokenState`.

        ``before`` runs first on every outermost call (an adapter's check that may raise)."""

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if self.active() is not None:
                return function(*args, **kwargs)
            if before is not None:
                before()
            state = TokenState(record_layers=record_layers)
            self._local.state = state
            try:
                output = function(*args, **kwargs)
                if post is not None:
                    output = post(output, state)
            finally:
                self._local.state = None
                if state.assignment is not None or state.records:
                    self.last_state = state
            self.remember_features(output, state)
            return output

        wrapped.__wrapped__ = function  # type: ignore[attr-defined]
        return wrapped

    # --- sizes for pooling outside the call that produced the tokens ----------------------------
    def remember_features(self, output: Any, state: TokenState) -> None:
        """Remember the final token tensor an entry point returned (a tensor, or the first element of a
        tuple such as ``forward_intermediates``'s ``(final, intermediates)``, or its dict)."""
        if isinstance(output, (tuple, list)) and output:
            output = output[0]
        elif isinstance(output, dict):
            output = output.get("image_features")
        if isinstance(output, torch.Tensor) and output.dim() == 3 and state.size is not None:
            self._local.features = (weakref.ref(output), state)

    def sizes_for(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """Sizes ``[B, N, 1]`` of a token tensor that is about to be pooled.

        Inside an entry point: the active call's sizes. Outside (``forward_head`` after
        ``forward_features``): the sizes of the tensor the last entry point in this thread returned, if
        ``tokens`` is that very tensor. ``None`` when the tokens were never merged. Raises :class:`ValueError` for
        merged tokens that are not that tensor (their sizes are unknown; pool with ``handle.size``).
        """
        state = self.active()
        if state is not None:
            if state.size is not None and state.size.shape[:2] == tokens.shape[:2]:
                return state.size
            return None
        features = getattr(self._local, "features", None)
        if features is None:
            return None
        ref, remembered = features
        if ref() is tokens:
            return remembered.size
        if tokens.shape[1] < remembered.num_original:
            raise ValueError(
                f"forward_head got {tokens.shape[1]} merged tokens that are not the tensor the last "
                "forward_features/forward_intermediates call returned, so their sizes are unknown; pass that "
                "tensor itself, or pool size-weighted yourself with handle.size"
            )
        return None
