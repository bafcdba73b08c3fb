"""The token roles of a language model's sequence and the pure functions llm-site policies rank with."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .reduction import MergePlan
from .view import QKV

#: How positions are given to the layers after a cut inside the language model: renumbered over the kept
#: tokens (``"compact"``) or the original ones (``"keep"``).
POSITION_MODES = ("compact", "keep")


@dataclass
class LLMTokens:
    """Roles of the current sequence's tokens: ``visual [B, n]`` (indices, ascending), ``instruction [B, L]``
    (text after the last visual token up to the end of the prompt), ``last [B]`` (last prompt token),
    ``attended [B, L]`` (not padding). All samples hold the same number of visual tokens."""

    visual: torch.Tensor
    instruction: torch.Tensor
    last: torch.Tensor
    attended: torch.Tensor
    num_visual_original: int

    def gather(self, keep: torch.Tensor) -> "LLMTokens":
        """The roles after keeping the sequence positions ``keep [B, L']`` (sorted)."""
        new_index = torch.full(self.attended.shape, -1, dtype=torch.long, device=keep.device)
        new_index.scatter_(1, keep, torch.arange(keep.shape[1], device=keep.device).expand_as(keep))
        visual = new_index.gather(1, self.visual)
        visual = visual[visual >= 0].view(visual.shape[0], -1)
        return LLMTokens(visual=visual, instruction=self.instruction.gather(1, keep),
                         last=new_index.gather(1, self.last[:, None])[:, 0], attended=self.attended.gather(1, keep),
                         num_visual_original=self.num_visual_original)


def llm_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, placeholder: int) -> LLMTokens | None:
    """The roles of a prefill's tokens, or ``None`` when it holds no visual token. Raises when rows hold
    different numbers of visual tokens (a batch could not stay rectangular)."""
    is_visual = input_ids == placeholder
    counts = is_visual.sum(1)
    if int(counts.max()) == 0:
        return None
    if bool((counts != counts[0]).any()):
        raise ValueError(f"llm-site pruning needs the same number of visual tokens in every row of a batch; got "
                         f"{counts.tolist()} (run rows with different images separately)")
    batch, length = input_ids.shape
    attended = attention_mask.bool() if attention_mask is not None else torch.ones_like(is_visual)
    positions = torch.arange(length, device=input_ids.device).expand(batch, -1)
    visual = positions[is_visual].view(batch, -1)
    last = torch.where(attended, positions, -1).amax(1)
    instruction = (positions > visual[:, -1:]) & attended
    return LLMTokens(visual=visual, instruction=instruction, last=last, attended=attended,
                     num_visual_original=visual.shape[1])


def query_rows(qkv: QKV, queries: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
    """Attention of the query positions ``queries [B, Q]`` over every key ``[B, Q, L]``, averaged over heads,
    causal (a query sees keys up to its own position) and without padding keys, softmax in float32."""
    q = qkv.q.float().gather(2, queries[:, None, :, None].expand(-1, qkv.q.shape[1], -1, qkv.q.shape[-1]))
    scores = (q @ qkv.k.float().transpose(-1, -2)) * qkv.scale  # [B, H, Q, L]
    keys = torch.arange(qkv.k.shape[2], device=queries.device)
    allowed = (keys[None, None, :] <= queries[:, :, None]) & attended[:, None, :]
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return torch.softmax(scores, dim=-1).mean(1)


def keep_visual(tokens: LLMTokens, chosen: torch.Tensor, length: int) -> MergePlan:
    """A plan keeping every non-visual position and the visual tokens ``chosen [B, k]`` (indices into
    ``tokens.visual``), in sequence order."""
    batch = chosen.shape[0]
    drop = torch.zeros(batch, length, dtype=torch.bool, device=chosen.device)
    drop.scatter_(1, tokens.visual, True)
    drop.scatter_(1, tokens.visual.gather(1, chosen), False)
    keep = (~drop).nonzero()[:, 1].view(batch, -1)
    return MergePlan.prune(keep)


def visual_scores(rows: torch.Tensor, tokens: LLMTokens) -> torch.Tensor:
    """Per-position scores ``rows [B, L]`` at the visual tokens ``[B, n]``."""
    return rows.gather(1, tokens.visual)
