"""Per-layer schedules as pure functions."""
from __future__ import annotations

from typing import Callable, Sequence


def tome_schedule(num_layers: int, r: int, inflect: float = 0.0,
                  layers: Sequence[int] | None = None) -> list[int]:
    """Tokens to merge in each layer, as ToMe's ``parse_r`` (Bolya et al. 2023, Sec. 4.1 "schedules").

    * ``layers`` given: that explicit per-layer list, zero-padded to ``num_layers`` (extra entries ignored).
    * otherwise ``r`` with inflection ``inflect`` in [-1, 1]: ``lo = int(r * (1 - inflect))``,
      ``hi = 2r - lo``, layer ``i`` gets ``int(lo + i * (hi - lo) / (L - 1))``. ``inflect = 0`` is a
      constant ``r``; ``inflect = -1`` is the paper's decreasing schedule (``2r`` down to ``0``).

    Unlike the official code, a one-layer model does not divide by zero: it gets ``[lo]``.
    """
    if layers is not None:
        values = list(layers)[:num_layers]
        return values + [0] * (num_layers - len(values))
    lo = int(r * (1.0 - inflect))
    hi = 2 * r - lo
    if num_layers == 1:
        return [lo]
    step = (hi - lo) / (num_layers - 1)
    return [int(lo + step * i) for i in range(num_layers)]


def pitome_margin(layer: int, num_layers: int, start: float, slope: float) -> float:
    """PiToMe's margin ``m_l = start - slope * l / L`` (computed in the official code's float order)."""
    return start - slope * (layer / num_layers)


def pitome_uses_bsm(layer: int, num_layers: int, bsm_layers: str | int) -> bool:
    """Whether layer ``layer`` runs a bipartite (BSM) layer (else pure PiToMe), per ``bsm_layers``.

    ``"first_half"`` (official DeiT patch): BSM in layers ``l < ceil(L/2)``, pure after;
    ``"second_half"`` (official MAE patch): pure in layers ``l < ceil(L/2)``, BSM after;
    ``"all"``: BSM everywhere; ``"none"``: pure everywhere; an int ``k``: BSM in layers ``l < k``
    (official LLaVA ``clip_hf`` patch: 13, i.e. ``idx <= 12``).
    """
    if isinstance(bsm_layers, int):
        return layer < bsm_layers
    half = -(-num_layers // 2)
    if bsm_layers == "first_half":
        return layer < half
    if bsm_layers == "second_half":
        return layer >= half
    return bsm_layers == "all"


# --- token schedules: how many tokens each layer sees, without running a model -------------------
#
# A token schedule is one ``(attention_tokens, mlp_tokens)`` pair per layer: the tokens a layer's
# attention runs on (those entering it) and those its MLP runs on (after a merge between attention and
# MLP, ToMe's placement). A layer that reduces nothing has both equal. ``vtprune.flops`` costs these.


def tome_token_schedule(num_tokens: int, merges: Sequence[int], num_protected: int = 0) -> list[tuple[int, int]]:
    """Token counts of ToMe with ``merges[l]`` tokens requested in layer ``l`` (:func:`tome_schedule`).

    Each layer merges ``min(r_l, (N_l - num_protected) // 2)`` tokens between attention and MLP: the
    official cap (a bipartite matching cannot merge more than the smaller set), protected prefix tokens
    excluded as in :func:`vtprune.matching.bipartite_soft_matching`. ViT-B/16 at 224, ``r = 16``:
    197 -> 181 -> ... -> 21 -> 11.
    """
    pairs = []
    for r in merges:
        merged = max(0, min(int(r), (num_tokens - num_protected) // 2))
        pairs.append((num_tokens, num_tokens - merged))
        num_tokens -= merged
    return pairs


def pitome_token_schedule(num_tokens: int, num_layers: int, ratio: float, num_protected: int = 0, *,
                          counts_all: Callable[[int], bool] | None = None, post: bool = False) -> list[tuple[int, int]]:
    """Token counts of PiToMe at keep ratio ``ratio`` (merging.md §3.2).

    Each layer merges ``floor(T - T * ratio)`` of its ``T`` unprotected tokens (this exact rounding,
    :func:`vtprune.matching.pitome_removed_count`), clamped to ``T // 2`` (vtprune's fix of the official
    code's crash below ratio 0.5), between attention and MLP. DeiT (197 tokens, 12 layers) at 0.9:
    197 -> 178 -> ... -> 60. Layers where ``counts_all(layer)`` instead merge ``floor(N - N * ratio)`` of
    all ``N`` tokens, protected ones included in the count (the official LLaVA ``clip_hf`` patch's plain
    bipartite layers); ``post``: the merge comes after the MLP, so a layer's attention and MLP both see
    the tokens entering it.
    """
    from .matching import pitome_removed_count

    pairs = []
    for layer in range(num_layers):
        unprotected = num_tokens - num_protected
        counted = num_tokens if counts_all is not None and counts_all(layer) else unprotected
        merged = max(0, min(pitome_removed_count(counted, ratio), unprotected // 2))
        pairs.append((num_tokens, num_tokens if post else num_tokens - merged))
        num_tokens -= merged
    return pairs


def stage_schedule(num_tokens: int, cuts: dict[int, int], num_layers: int) -> list[int]:
    """Tokens entering each of ``num_layers`` layers when pruning happens between layers.

    ``cuts`` maps a 0-based layer index to the token count from that layer on; e.g. FastV with K=2,
    R=0.5 on 576 visual tokens is ``stage_schedule(576, {2: 288}, 32)`` (layers 0-1 see 576, layers
    2-31 see 288), PDrop is ``stage_schedule(576, {8: 288, 16: 144, 24: 72}, 32)``.
    """
    bad = [layer for layer in cuts if not 0 <= layer < num_layers]
    if bad:
        raise ValueError(f"cut layers {bad} are outside 0..{num_layers - 1}")
    counts, current = [], num_tokens
    for layer in range(num_layers):
        current = cuts.get(layer, current)
        counts.append(current)
    return counts


def parse_schedule(text: str) -> list:
    """Parse a schedule written as text: comma-separated per-layer entries.

    An entry is a token count (``576``), a count repeated over several layers (``576x2``), or an
    ``attention:mlp`` pair for a layer that merges between attention and MLP (``197:181``, also
    repeatable: ``197:197x3``). ``"576x2,288x30"`` is FastV K=2 R=0.5 on LLaVA-1.5.
    """
    entries: list = []
    for item in (part.strip() for part in str(text).split(",")):
        if not item:
            continue
        value, times = item, "1"
        if "x" in item.lower():
            value, _, times = item.lower().partition("x")
        try:
            count = int(times)
            if ":" in value:
                first, _, second = value.partition(":")
                entry: int | tuple[int, int] = (int(first), int(second))
            else:
                entry = int(value)
        except ValueError:
            raise ValueError(f"bad schedule entry {item!r} in {text!r}: expected N, NxK (N tokens for K layers) "
                             "or A:M (attention at A tokens, MLP at M), separated by commas") from None
        if count < 1:
            raise ValueError(f"bad repeat count in schedule entry {item!r}: it must be at least 1")
        entries.extend([entry] * count)
    if not entries:
        raise ValueError(f"empty schedule {text!r}: give one token count per layer, e.g. '576x2,288x30'")
    return entries
