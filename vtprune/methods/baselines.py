"""The baselines every pruning paper is compared against (landscape survey Sec. 1): a seeded random subset
and 2-D average pooling of the patch grid, both at the projector site."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..policy import Policy, check_int
from ..reduction import MergePlan
from ..registry import register_policy
from ..view import LayerView


def _prefix(view: LayerView) -> torch.Tensor:
    return torch.arange(view.num_protected, device=view.hidden.device).expand(view.hidden.shape[0], -1)


@register_policy
@dataclass(frozen=True)
class RandomKeep(Policy):
    """Keep ``keep`` patch tokens chosen uniformly at random, in raster order.

    The subset depends only on ``seed`` and the number of patches: every image of every batch gets the
    same positions, so results do not depend on batch composition and runs repeat exactly. Draw several
    seeds to average over subsets. Protected prefix tokens (CLS) are handled as the host does (LLaVA
    drops CLS before its projector).
    """

    name: ClassVar[str] = "randomkeep"
    site: ClassVar[str] = "projector"
    spec_fields: ClassVar[tuple[str, ...]] = ("keep",)

    keep: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("keep", self.keep, minimum=1, policy="randomkeep")
        check_int("seed", self.seed, minimum=0, policy="randomkeep")

    def handed_on(self, num_patches: int, num_prefix: int, drop_prefix: bool, anyres: bool = False) -> int:
        return min(self.keep, num_patches) + (0 if drop_prefix else num_prefix)

    def positions(self, num_patches: int) -> torch.Tensor:
        """The kept patch positions (sorted) for ``num_patches`` patches."""
        generator = torch.Generator().manual_seed(self.seed)
        return torch.randperm(num_patches, generator=generator)[:self.keep].sort().values

    def reduce(self, view: LayerView) -> MergePlan | None:
        patches = view.num_tokens - view.num_protected
        if self.keep >= patches:
            return None
        chosen = self.positions(patches).to(view.hidden.device) + view.num_protected
        return MergePlan.prune(torch.cat([_prefix(view), chosen.expand(view.hidden.shape[0], -1)], dim=1))


def pool_plan(grid: tuple[int, int], side: tuple[int, int], num_protected: int, batch: int,
              device: torch.device) -> MergePlan:
    """Average pooling of a ``grid`` of patch tokens (raster order, after ``num_protected`` prefix tokens)
    into ``side`` bins, as a merge plan: each output token is the mean of one ``kh x kw`` window; outputs
    in raster order of the windows."""
    rows, cols = grid
    out_rows, out_cols = side
    kh, kw = rows // out_rows, cols // out_cols
    r = torch.arange(rows, device=device).unsqueeze(1)
    c = torch.arange(cols, device=device).unsqueeze(0)
    window = ((r // kh) * out_cols + (c // kw)).reshape(-1)  # output slot of every patch
    position = torch.arange(rows * cols, device=device)
    first = ((r % kh == 0) & (c % kw == 0)).reshape(-1)
    keep = position[first]  # the top-left patch of each window, already in window raster order
    src, dst = position[~first], window[~first]
    head = torch.arange(num_protected, device=device)
    keep = torch.cat([head, keep + num_protected])
    expand = lambda index: index.expand(batch, -1)  # noqa: E731
    return MergePlan(keep=expand(keep), src=expand(src + num_protected), dst=expand(dst + num_protected))


@register_policy
@dataclass(frozen=True)
class Pool2d(Policy):
    """2-D average pooling of the patch grid to ``keep`` tokens (a ``sqrt(keep) x sqrt(keep)`` grid).

    The grid side must be divisible by ``sqrt(keep)``: on LLaVA-1.5's 24x24 grid, ``keep=144`` is 2x2
    pooling and ``keep=64`` 3x3. Needs the full, unreduced grid (do not combine with a vision-site policy).
    Pooling happens on the vision features before the projector.
    """

    name: ClassVar[str] = "pool2d"
    site: ClassVar[str] = "projector"
    spec_fields: ClassVar[tuple[str, ...]] = ("keep",)

    keep: int = 64

    def __post_init__(self) -> None:
        check_int("keep", self.keep, minimum=1, policy="pool2d")
        if math.isqrt(self.keep) ** 2 != self.keep:
            raise ValueError(f"pool2d: keep must be a square number (the pooled grid is sqrt(keep) x sqrt(keep)), "
                             f"got {self.keep}")

    def handed_on(self, num_patches: int, num_prefix: int, drop_prefix: bool, anyres: bool = False) -> int:
        return min(self.keep, num_patches) + (0 if drop_prefix else num_prefix)

    def reduce(self, view: LayerView) -> MergePlan | None:
        if view.grid is None:
            raise ValueError("pool2d needs the full patch grid, but the tokens reaching the projector were already "
                             "reduced (or the model has no square patch grid); do not combine it with a vision-site "
                             "policy")
        rows, cols = view.grid
        side = math.isqrt(self.keep)
        if rows % side or cols % side:
            accepted = sorted(d * d for d in range(1, min(rows, cols) + 1) if rows % d == 0 and cols % d == 0)
            raise ValueError(f"pool2d: keep={self.keep} does not tile the {rows}x{cols} patch grid; "
                             f"accepted keep values for this grid: {accepted}")
        if side == rows and side == cols:
            return None
        return pool_plan((rows, cols), (side, side), view.num_protected, view.hidden.shape[0], view.hidden.device)
