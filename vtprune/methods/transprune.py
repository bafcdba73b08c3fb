"""TransPrune (Li, Duan et al., "TransPrune: Token Transition Pruning for Efficient Large Vision-Language
Models", CVPR 2026, arXiv 2507.20630), checked against the official code (liaolea/TransPrune c9e8284) as
restated in the design research (pruning.md §3)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..policy import Policy, check_choice, check_float, check_int
from ..reduction import MergePlan
from ..registry import register_policy
from ..sequence import POSITION_MODES, LLMTokens, keep_visual, query_rows
from ..view import LayerView



def transition_variation(inputs: torch.Tensor, outputs: torch.Tensor, attended: torch.Tensor,
                         direction: str = "signed") -> torch.Tensor:
    """Token Transition Variation of one sub-module (paper Eqs. 1-2), ``[B, L]``:
    ``softmax_tokens(1 - cos(out, in)) · ‖out‖ / ‖in‖`` with ``in`` the module's (normed) input and ``out``
    its output before the residual. ``direction="signed"`` uses ``1 - cos`` (the official code),
    ``"abs"`` the paper's ``1 - |cos|``. The softmax runs over each sample's attended tokens (the official
    code's also spans the batch, which makes a sample's ranks depend on its batch-mates)."""
    inputs, outputs = inputs.float(), outputs.float()
    cosine = torch.nn.functional.cosine_similarity(outputs, inputs, dim=-1)
    change = 1 - (cosine.abs() if direction == "abs" else cosine)
    weights = torch.softmax(change.masked_fill(~attended, float("-inf")), dim=-1)
    return weights * outputs.norm(dim=-1) / inputs.norm(dim=-1)


def instruction_attention(qkv, tokens: LLMTokens) -> torch.Tensor:
    """Instruction-Guided Attention (paper Eq. 5), ``[B, n_visual]``: the attention of every instruction token
    (causal, float32 softmax over all keys) averaged over heads, at the visual keys, averaged over the
    instruction tokens."""
    batch, length = tokens.attended.shape
    positions = torch.arange(length, device=tokens.attended.device).expand(batch, -1)
    count = tokens.instruction.sum(1)
    if int(count.min()) == 0:
        raise ValueError("transprune: a prompt has no instruction tokens after the image; IGA needs the text that "
                         "follows the image (use components='ttv')")
    width = int(count.max())
    # instruction positions, padded with the last one (its weight is zeroed below)
    order = torch.where(tokens.instruction, positions, length).sort(dim=1).values[:, :width]
    valid = order < length
    queries = torch.where(valid, order, tokens.last[:, None])
    rows = query_rows(qkv, queries, tokens.attended).gather(2, tokens.visual[:, None, :].expand(-1, width, -1))
    return (rows * valid[..., None]).sum(1) / count[:, None]


@register_policy
@dataclass(frozen=True)
class TransPrune(Policy):
    """Prune visual tokens inside the language model by how much each token is transformed (TTV) and how much
    the instruction attends to it (IGA).

    TTV of a layer = TTV(attention) + TTV(MLP) (:func:`transition_variation`), accumulated over the
    ``accumulate`` layers up to the cut (Eq. 4). At a cut after layer ``p`` (counted from 1; 0-based
    ``p - 1``) the score is ``α·TTV/ΣTTV + (1-α)·IGA/ΣIGA`` over the visual tokens (Eq. 6; the official
    code's sum-normalised halves for α = 0.5), IGA from layer ``p + 1``'s projections (0-based ``p``,
    :func:`instruction_attention`); the ``floor(N0·ratio)`` best of the initial ``N0`` visual tokens are
    kept. Defaults are the repo's ("High"): cuts after layers 7 / 9 / 12 to 0.875 / 0.625 / 0.125, i.e.
    576 -> 504 -> 360 -> 72 on LLaVA-1.5. :meth:`low` is the "Low" setting, inferred from the paper's
    TFLOPs (the supplement that lists it was not available).

    Args:
        layers: cut after these decoder layers, counted from 1, increasing.
        ratios: kept fraction of the *initial* visual tokens after each cut, in (0, 1], non-increasing.
        accumulate: layers (counted from 1) whose TTV is accumulated (paper: 7..12).
        alpha: weight of TTV against IGA, in [0, 1] (paper: 0.5).
        direction: ``"signed"`` (``1 - cos``, the official code) or ``"abs"`` (``1 - |cos|``, the paper).
        components: ``"both"``, ``"ttv"`` or ``"iga"`` (the paper's ablations).
        position_mode: ``"compact"`` (renumbered, the official code; default) or ``"keep"``.
    """

    name: ClassVar[str] = "transprune"
    site: ClassVar[str] = "llm"
    spec_fields: ClassVar[tuple[str, ...]] = ("layers", "ratios")

    layers: tuple = (7, 9, 12)
    ratios: tuple = (0.875, 0.625, 0.125)
    accumulate: tuple = (7, 8, 9, 10, 11, 12)
    alpha: float = 0.5
    direction: str = "signed"
    components: str = "both"
    position_mode: str = "compact"

    def __post_init__(self) -> None:
        for name in ("layers", "ratios", "accumulate"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or not value:
                raise ValueError(f"transprune: {name} must be a non-empty list, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        for layer in self.layers + self.accumulate:
            check_int("layers/accumulate entries", layer, minimum=1, policy="transprune")
        if list(self.layers) != sorted(set(self.layers)):
            raise ValueError(f"transprune: layers must be strictly increasing, got {list(self.layers)}")
        if len(self.ratios) != len(self.layers):
            raise ValueError(f"transprune: one ratio per layer; got {len(self.layers)} layers and "
                             f"{len(self.ratios)} ratios")
        ratios = tuple(check_float("ratios entries", value, low=0.0, high=1.0, low_open=True, policy="transprune")
                       for value in self.ratios)
        if list(ratios) != sorted(ratios, reverse=True):
            raise ValueError(f"transprune: ratios must not increase, got {list(ratios)}")
        object.__setattr__(self, "ratios", ratios)
        object.__setattr__(self, "alpha", check_float("alpha", self.alpha, low=0.0, high=1.0, policy="transprune"))
        check_choice("direction", self.direction, ("signed", "abs"), policy="transprune")
        check_choice("components", self.components, ("both", "ttv", "iga"), policy="transprune")
        check_choice("position_mode", self.position_mode, POSITION_MODES, policy="transprune")

    @classmethod
    def low(cls, **overrides: object) -> "TransPrune":
        """TransPrune-Low: 0.625 / 0.1875 / 0.0625 after layers 7 / 9 / 12 (360 -> 108 -> 36 on LLaVA-1.5);
        inferred: it reproduces the paper's 1.19 / 6.41 TFLOPs on LLaVA-1.5 / LLaVA-NeXT."""
        return cls(**{"ratios": (0.625, 0.1875, 0.0625), **overrides})

    @property
    def signals(self) -> tuple[str, ...]:  # type: ignore[override]
        wanted = {"both": ("transitions", "next_attention"), "ttv": ("transitions",), "iga": ("next_attention",)}
        return wanted[self.components] + ("tokens",)

    def token_schedule(self, num_tokens: int, num_layers: int, num_protected: int = 0) -> list[tuple[int, int]]:
        """Visual tokens per decoder layer: ``N0`` up to layer ``layers[0]`` (from 1), then ``floor(N0·ratio)``."""
        counts = []
        for layer in range(num_layers):
            done = [ratio for cut, ratio in zip(self.layers, self.ratios) if layer >= cut]
            kept = int(num_tokens * done[-1]) if done else num_tokens
            counts.append((kept, kept))
        return counts

    def reduce(self, view: LayerView) -> MergePlan | None:
        rank = view.layer + 1  # the paper counts layers from 1
        tokens = view.signal("tokens")
        memory = view.memory
        if self.components != "iga" and rank in self.accumulate:
            moved = view.signal("transitions")
            ttv = sum(transition_variation(*moved[part], tokens.attended, self.direction) for part in ("attn", "mlp"))
            ttv = ttv.gather(1, tokens.visual)
            memory["ttv"] = ttv if "ttv" not in memory else memory["ttv"] + ttv
        if rank not in self.layers or rank >= view.num_layers:
            return None
        score = torch.zeros(tokens.visual.shape, device=tokens.visual.device)
        if self.components != "iga":
            ttv = memory.get("ttv", torch.zeros_like(score))
            score = score + self.alpha * ttv / ttv.sum(1, keepdim=True).clamp_min(1e-30)
        if self.components != "ttv":
            iga = instruction_attention(view.signal("next_attention"), tokens)
            score = score + (1 - self.alpha if self.components == "both" else 1.0) * iga / iga.sum(1, keepdim=True)
        kept = int(tokens.num_visual_original * self.ratios[self.layers.index(rank)])
        chosen = score.topk(min(kept, score.shape[1]), dim=-1).indices.sort(dim=-1).values
        if "ttv" in memory:
            memory["ttv"] = memory["ttv"].gather(1, chosen)
        return keep_visual(tokens, chosen, view.num_tokens)
