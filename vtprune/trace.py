"""The token trace of one forward: how many tokens each layer saw, per site (and per sample if they differ)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class LayerTokens:
    """Token counts of one layer. ``tokens_in`` enter the layer; ``tokens_out`` leave it.

    ``reduced``: where the reduction happened inside the layer (``"mid"`` = between attention and
    MLP, so attention ran on ``tokens_in`` and the MLP on ``tokens_out``; ``"post"`` = after the MLP, so
    the whole layer ran on ``tokens_in``; ``"pre"`` = before the module,
    which ran on ``tokens_out`` only (the projector site); ``"none"`` = no reduction).
    ``per_sample_out`` is set only when samples of the batch differ.
    """

    layer: int
    tokens_in: int
    tokens_out: int
    reduced: str = "none"
    per_sample_out: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Trace:
    """Token counts of the last forward. ``sites`` maps a site name to its layers in execution order.

    ``positions`` (vision-language models): for each image, the original raster position in the patch
    grid of every visual token handed to the language model, in the order they are handed on (for a
    merged token, its smallest original position; a protected prefix token such as CLS is position
    ``-1``); ``None`` for vision-only models. On LLaVA-NeXT one row per crop (each image's base crop
    first, then its tiles). ``visual_tokens``: per image, the visual tokens the language model received
    (on LLaVA-NeXT after packing the crops).
    """

    batch_size: int
    sites: dict[str, tuple[LayerTokens, ...]] = field(default_factory=dict)
    positions: tuple[tuple[int, ...], ...] | None = None
    visual_tokens: tuple[int, ...] | None = None

    def layers(self, site: str = "vision") -> tuple[LayerTokens, ...]:
        if site not in self.sites:
            raise KeyError(f"no trace for site {site!r}; traced sites: {sorted(self.sites)}")
        return self.sites[site]

    def tokens(self, site: str = "vision") -> list[int]:
        """Tokens leaving each layer of ``site``."""
        return [layer.tokens_out for layer in self.layers(site)]

    def tokens_in(self, site: str = "vision") -> list[int]:
        """Tokens entering each layer of ``site``."""
        return [layer.tokens_in for layer in self.layers(site)]

    def final_tokens(self, site: str = "vision") -> int:
        return self.layers(site)[-1].tokens_out

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"batch_size": self.batch_size,
                               "sites": {site: [asdict(layer) for layer in layers]
                                         for site, layers in self.sites.items()}}
        if self.positions is not None:
            out["positions"] = [list(row) for row in self.positions]
        if self.visual_tokens is not None:
            out["visual_tokens"] = list(self.visual_tokens)
        return out

    def __str__(self) -> str:
        lines = [f"Trace(batch_size={self.batch_size})"]
        for site, layers in self.sites.items():
            counts = " ".join(f"{layer.tokens_in}->{layer.tokens_out}" if layer.tokens_in != layer.tokens_out
                              else str(layer.tokens_out) for layer in layers)
            lines.append(f"  {site}: {counts}")
        return "\n".join(lines)
