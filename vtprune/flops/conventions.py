"""Counting conventions: the ``paper`` and ``full`` presets and their individual switches."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .costs import UNITS


@dataclass(frozen=True)
class Convention:
    """What a count includes. Build one with :func:`resolve_convention` (a preset plus overriding switches).

    unit: ``"MACs"`` or ``"FLOPs"`` (= 2 x MACs).
    prompt_tokens: text tokens in the language model's prefill besides the visual tokens (0: visual only).
    vision: count the vision encoder's blocks; ``None``: only when there is no language model.
    patch_embed, vision_head: the patch embedding; the head of the vision tower (classifier, projection,
        attention pool); both only where the vision encoder is counted.
    projector, llm, lm_head: the projector, the decoder layers, the LM head.
    lm_head_tokens: ``"last"`` (generation asks for the last position's logits only) or ``"all"``
        (a plain forward computes logits at every position).
    overhead: the policy's own matrix products (:meth:`vtprune.Policy.matching_macs`).
    decode: count decode steps (with a KV cache: one new token per step); ``decode_steps`` of them
        are added to the total, and the first step's cost is reported per generated token.
    causal_halving: count only the unmasked half of causal attention (what flash kernels compute).
    mlp_tokens: ``"out"`` counts an MLP at the tokens it really sees (after a merge inside the block);
        ``"in"`` at the tokens entering the block, as PiToMe's own counter does.
    """

    name: str
    unit: str
    prompt_tokens: int = 0
    vision: bool | None = None
    patch_embed: bool = False
    vision_head: bool = False
    projector: bool = False
    llm: bool = True
    lm_head: bool = False
    lm_head_tokens: str = "last"
    overhead: bool = False
    decode: bool = False
    decode_steps: int = 0
    causal_halving: bool = False
    mlp_tokens: str = "out"

    @property
    def factor(self) -> int:
        return 2 if self.unit == "FLOPs" else 1

    def switches(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "name"}

    def describe(self, has_llm: bool = True) -> str:
        """One line: what this convention counts."""
        vision = self.vision if self.vision is not None else not has_llm
        parts = [self.unit + (" (1 MAC = 2 FLOPs)" if self.unit == "FLOPs" else " (multiply-accumulates)")]
        if has_llm:
            parts.append("visual tokens only" if self.prompt_tokens == 0 else
                         f"visual + {self.prompt_tokens} text prompt tokens")
        counted = []
        if vision:
            extras = [name for name, on in (("patch embedding", self.patch_embed), ("head", self.vision_head)) if on]
            counted.append("vision encoder (" + (" + ".join(["blocks"] + extras) if extras else "blocks only") + ")")
        if has_llm:
            head = f"LM head ({'last position' if self.lm_head_tokens == 'last' else 'all positions'})"
            counted += [name for name, on in (("projector", self.projector), ("LLM decoder layers", self.llm),
                                              (head, self.lm_head)) if on]
        if self.overhead:
            counted.append("method overhead")
        parts.append("counts " + ", ".join(counted) if counted else "counts nothing")
        if has_llm:
            parts.append(f"prefill + decode ({self.decode_steps} steps; per-token cost reported)" if self.decode
                         else "prefill only")
            parts.append("causal attention halved" if self.causal_halving else "full attention matrices")
        if self.mlp_tokens == "in":
            parts.append("MLP at the tokens entering each block")
        return "; ".join(parts)


PRESETS: dict[str, Convention] = {
    "paper": Convention(name="paper", unit="MACs"),
    "full": Convention(name="full", unit="FLOPs", prompt_tokens=64, vision=True, patch_embed=True, vision_head=True,
                       projector=True, llm=True, lm_head=True, overhead=True, decode=True),
}
"""``paper``: MACs, the transformer layers only (the language model's decoder layers over the visual
tokens for a VLM, the vision blocks for a vision-only model), prefill only, SwiGLU's 3 matrices: the
convention of FastV, PDrop, TransPrune, ToMe and PiToMe. ``full``: FLOPs of everything a forward
multiplies: vision encoder with patch embedding and head, projector, decoder layers over visual and
64 text prompt tokens (a typical LLaVA-1.5 VQA prompt: the ~35-token system prompt and a short
question; set ``prompt_tokens`` to yours), the LM head at the last position, the method's overhead,
and decode reported per generated token."""


def resolve_convention(name: str | Convention = "paper", **switches: Any) -> Convention:
    """A preset (``"paper"``, ``"full"``) with individual switches overridden.

    The result's name is the preset's when nothing changes, else ``"paper+mlp_tokens=in"`` etc.
    Unknown switches and bad values raise ``ValueError`` naming what is accepted.
    """
    if isinstance(name, Convention):
        base = name
    else:
        key = str(name).strip().lower()
        if key not in PRESETS:
            raise ValueError(f"unknown convention {name!r}; presets: {', '.join(PRESETS)}")
        base = PRESETS[key]
    accepted = [f.name for f in dataclasses.fields(Convention) if f.name != "name"]
    unknown = sorted(set(switches) - set(accepted))
    if unknown:
        raise ValueError(f"unknown switch(es) {unknown}; accepted: {', '.join(accepted)}")
    result = dataclasses.replace(base, **switches)
    _check_convention(result)
    preset = base.name.split("+")[0]
    reference = PRESETS.get(preset, base)  # a Convention passed in may already differ from its preset
    changed = [f"{field}={getattr(result, field)}" for field in accepted
               if getattr(result, field) != getattr(reference, field)]
    if changed:
        result = dataclasses.replace(result, name=preset + "+" + ",".join(changed))
    return result


def _check_convention(conv: Convention) -> None:
    if conv.unit not in UNITS:
        raise ValueError(f"unit must be one of {UNITS}, got {conv.unit!r}")
    for key in ("prompt_tokens", "decode_steps"):
        value = getattr(conv, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{key} must be an integer >= 0, got {value!r}")
    for key in ("patch_embed", "vision_head", "projector", "llm", "lm_head", "overhead", "decode", "causal_halving"):
        if not isinstance(getattr(conv, key), bool):
            raise ValueError(f"{key} must be true or false, got {getattr(conv, key)!r}")
    if conv.vision not in (None, True, False):
        raise ValueError(f"vision must be true, false or None (only without a language model), got {conv.vision!r}")
    if conv.lm_head_tokens not in ("last", "all"):
        raise ValueError(f"lm_head_tokens must be 'last' or 'all', got {conv.lm_head_tokens!r}")
    if conv.mlp_tokens not in ("out", "in"):
        raise ValueError(f"mlp_tokens must be 'out' (tokens the MLP sees) or 'in' (tokens entering the block), "
                         f"got {conv.mlp_tokens!r}")
