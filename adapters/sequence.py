"""Shortening a language model's input when its visual placeholder tokens outnumber the visual tokens kept.

A VLM prompt holds one placeholder token per visual token (LLaVA-1.5: 576 per image). When a policy hands
on fewer tokens, every sequence-length input is shortened the same way: the first ``kept`` placeholders
of each image stay, the rest of its run is removed, rows that end up shorter than the longest are
padded again on the side the input was padded on, and columns that are padding in every row are dropped. The result is a column map that later decode steps
(which still count the original columns) are translated through.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class ShortenedLayout:
    """``columns [B, L_short]``: the original column of every shortened column (``-1`` = new padding);
    ``original_length``: ``L``; ``removed [B]``: attended (non-padding) columns removed per row."""

    columns: torch.Tensor
    original_length: int
    removed: torch.Tensor

    @property
    def length(self) -> int:
        return self.columns.shape[1]

    def take(self, values: torch.Tensor, fill: int | float) -> torch.Tensor:
        """``values [B, L, ...]`` (or ``[B, L]``) at the kept columns, ``fill`` at new padding."""
        out = gather_columns(values, self.columns.clamp(min=0))
        pad = self.columns < 0
        if pad.any():
            out = out.masked_fill(pad.view(*pad.shape, *(1,) * (values.dim() - 2)), fill)
        return out

    def mask_for_decode(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """A decode step's mask over ``L + t`` original columns -> over ``L_short + t`` columns."""
        head = self.take(attention_mask[:, :self.original_length], 0)
        return torch.cat([head, attention_mask[:, self.original_length:]], dim=1)


def gather_columns(values: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """``values [B|1, L, ...]`` at ``columns [B, L']`` along the sequence, per row (a batch of 1 is broadcast)."""
    values = values.expand(columns.shape[0], *values.shape[1:])
    index = columns.view(*columns.shape, *(1,) * (values.dim() - 2)).expand(-1, -1, *values.shape[2:])
    return values.gather(1, index)


def padding_side(attention_mask: torch.Tensor | None) -> str:
    """``"left"`` if some row of the mask starts with padding, else ``"right"``."""
    if attention_mask is not None and bool((attention_mask[:, 0] == 0).any()):
        return "left"
    return "right"


def shorten_layout(input_ids: torch.Tensor, placeholder_id: int, original_counts: list[int], kept_counts: list[int],
                   attention_mask: torch.Tensor | None) -> ShortenedLayout:
    """The column map that keeps, for image ``i`` (images numbered in batch order, as the host scatters
    them), the first ``kept_counts[i]`` of its ``original_counts[i]`` consecutive placeholder tokens.

    Raises :class:`ValueError` when the placeholders do not add up to the images' token counts.
    """
    batch, length = input_ids.shape
    rows, removed, image = [], [], 0
    for row in range(batch):
        placeholders = (input_ids[row] == placeholder_id).nonzero().flatten().tolist()
        dropped: list[int] = []
        start = 0
        while start < len(placeholders):
            if image >= len(original_counts):
                raise ValueError(f"input_ids hold more image placeholder tokens (id {placeholder_id}) than the "
                                 f"{len(original_counts)} images given produce")
            run = placeholders[start:start + original_counts[image]]
            if len(run) < original_counts[image]:
                raise ValueError(f"row {row} of input_ids ends an image with {len(run)} placeholder tokens; the image "
                                 f"produces {original_counts[image]} (did the processor use another image size?)")
            dropped.extend(run[kept_counts[image]:])
            start += original_counts[image]
            image += 1
        keep = torch.ones(length, dtype=torch.bool)
        keep[dropped] = False
        rows.append(keep.nonzero().flatten())
        removed.append(len(dropped))
    if image != len(original_counts):
        raise ValueError(f"{len(original_counts)} images were given but input_ids hold placeholders for {image}")
    short = max(len(kept) for kept in rows)
    columns = torch.full((batch, short), -1, dtype=torch.long)
    left = padding_side(attention_mask) == "left"
    for row, kept in enumerate(rows):
        if left:
            columns[row, short - len(kept):] = kept
        else:
            columns[row, :len(kept)] = kept
    if attention_mask is not None:  # padding columns that are padding in every row are not needed any more
        padding = (columns < 0) | (attention_mask.cpu().gather(1, columns.clamp(min=0)) == 0)
        used = (~padding).any(0).nonzero().flatten()
        columns = columns[:, int(used[0]):int(used[-1]) + 1] if len(used) else columns
    device = input_ids.device
    return ShortenedLayout(columns=columns.to(device), original_length=length,
                           removed=torch.tensor(removed, dtype=torch.long, device=device))


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids counted over attended columns (``generate``'s rule): ``cumsum(mask) - 1``, 1 at padding."""
    mask = attention_mask.long()
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


class CacheLayouts:
    """What a pruned prefill left in a KV cache, remembered per cache object (weakly: it goes with the cache)
    so that the calls continuing that cache can be translated. A cache that cannot be weakly referenced is
    not remembered."""

    def __init__(self) -> None:
        self._layouts: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()

    def remember(self, cache: Any, layout: Any) -> None:
        if cache is not None:
            try:
                self._layouts[cache] = layout
            except TypeError:
                pass

    def get(self, cache: Any) -> Any:
        if cache is None:
            return None
        try:
            return self._layouts.get(cache)
        except TypeError:
            return None
