"""Per-layer schedules as pure functions."""
from __future__ import annotations

from typing import Sequence


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


def pitome_uses_bsm(layer: int, num_layers: int, bsm_layers: str) -> bool:
    """Whether layer ``layer`` runs BSM-PiToMe (else pure PiToMe), per the variant map ``bsm_layers``.

    ``"first_half"`` (official DeiT patch): BSM in layers ``l < ceil(L/2)``, pure after;
    ``"second_half"`` (official MAE patch): pure in layers ``l < ceil(L/2)``, BSM after;
    ``"all"``: BSM everywhere; ``"none"``: pure everywhere.
    """
    half = -(-num_layers // 2)
    if bsm_layers == "first_half":
        return layer < half
    if bsm_layers == "second_half":
        return layer >= half
    return bsm_layers == "all"
