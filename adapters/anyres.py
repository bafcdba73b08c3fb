"""LLaVA-NeXT (anyres): packing crops that vtprune reduced, the way the official FlowCut and VisionZip pack."""
from __future__ import annotations

import sys

import torch
from torch import nn

from vtprune.policy import Policy
from vtprune.state import Runtime


def pack_reduced(inner: nn.Module, runtime: Runtime, grid: tuple[int, int], num_prefix: int,
                  vision: Policy | None = None):
    """LLaVA-NeXT's ``pack_image_features`` for reduced crops.

    Unreduced crops go through the host's own packing. Reduced ones, per image: the base crop's tokens as
    handed on; then the tiles' patch tokens that survive the host's unpadding, in raster order over the
    whole tile grid (a merged token at its first patch); then the tiles' prefix tokens (CLS) if handed
    on, in tile order; no ``image_newline`` tokens when there are tiles (the official FlowCut and VisionZip
    packing). A single-crop image keeps its newline, as unpruned. Also records the placeholder counts per
    image (the host's packed length) and the packed length for the prompt shortening.

    A vision policy with a per-image budget (:meth:`vtprune.Policy.image_budget`, FlowCut's ``keep``) that
    left more tokens than that after packing gets the budget enforced here: the packed tokens of highest
    score (the policy's per-token scores in ``state.memory``) are kept, in packing order.
    """
    original = inner.pack_image_features
    host = sys.modules[type(inner).__module__]
    rows, cols = grid

    def pack(image_features, image_sizes, vision_feature_select_strategy, image_newline=None):
        state = runtime.active()
        if state is None or not state.scratch.get("reduced"):
            return original(image_features, image_sizes, vision_feature_select_strategy, image_newline=image_newline)
        unreduced = state.scratch["image_tokens"][0][0]
        dummy = [torch.zeros(item.shape[0], unreduced, 1) for item in image_features]
        _, host_lens = original(dummy, image_sizes, vision_feature_select_strategy,
                                image_newline=None if image_newline is None else torch.zeros(1))
        positions = state.positions
        budget = vision.image_budget() if vision is not None else None
        scores = state.memory.get("vision", {}).get("score") if budget is not None else None
        packed, start = [], 0
        for index, crops in enumerate(image_features):
            where = positions[start:start + crops.shape[0]] if positions is not None else None
            crop_scores = scores[start:start + crops.shape[0]] if scores is not None else None
            start += crops.shape[0]
            if crops.shape[0] == 1:
                tokens = crops[0]
                if image_newline is not None:
                    tokens = torch.cat([tokens, image_newline[None].to(tokens)], dim=0)
                packed.append(tokens)
                continue
            tiles_high, tiles_wide = host.get_anyres_image_grid_shape(
                image_sizes[index], inner.config.image_grid_pinpoints, inner.config.vision_config.image_size)
            width = tiles_wide * cols
            layout = torch.arange(tiles_high * rows * width, device=crops.device).view(1, tiles_high * rows, width)
            surviving = host.unpad_image(layout, image_sizes[index]).flatten()
            keep_cell = torch.zeros(tiles_high * rows * width, dtype=torch.bool, device=crops.device)
            keep_cell[surviving] = True
            tiles, tile_positions = crops[1:], where[1:].to(crops.device)
            tile = torch.arange(tiles.shape[0], device=crops.device).unsqueeze(1).expand_as(tile_positions)
            patch = tile_positions.clamp(min=0)
            cell = ((tile // tiles_wide) * rows + patch // cols) * width + (tile % tiles_wide) * cols + patch % cols
            is_patch = tile_positions >= 0
            chosen = is_patch & keep_cell[cell]
            order = cell[chosen].argsort(stable=True)
            parts = [crops[0], tiles[chosen][order], tiles[~is_patch]]
            tokens = torch.cat(parts, dim=0)
            if crop_scores is not None and crop_scores.shape == crops.shape[:2] and tokens.shape[0] > budget:
                token_scores = torch.cat([crop_scores[0], crop_scores[1:][chosen][order],
                                          crop_scores[1:][~is_patch]])
                tokens = tokens[token_scores.topk(budget).indices.sort().values]
            packed.append(tokens)
        lens = [item.shape[0] for item in packed]
        state.scratch["image_tokens"] = (tuple(int(n) for n in host_lens), tuple(lens))
        state.visual_tokens = tuple(lens)
        return packed, torch.tensor(lens, dtype=torch.long, device=image_features[0].device)

    pack.__wrapped__ = original  # type: ignore[attr-defined]
    return pack
