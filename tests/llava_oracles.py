"""Independent re-statements of the official FlowCut (TungChintao/FlowCut a2ecd24, ``flowcut/``) and
VisionZip (dvlab-research/VisionZip 3151f6d, ``visionzip/``) image encoders for LLaVA-1.5, run on a HF
``CLIPVisionModel``'s own weights.

They follow the official code's structure, not vtprune's: eager attention with the full attention matrix
(the official code reads ``attn_weights`` and ``hidden_states[-2]``), FlowCut's pruning *after* each whole
layer with its ``rpl = select_layer - idx - 1`` countdown, VisionZip's boolean masks and one-hot
``bmm``. Both return what the official ``encode_images`` hands to the projector, ``[B, T, C]``, and the
original patch positions kept. Run them in float64: selections are discrete.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def _heads(tensor: torch.Tensor, head_dim: int) -> torch.Tensor:
    return tensor.unflatten(-1, (-1, head_dim)).transpose(1, 2)


def _layer(layer: nn.Module, x: torch.Tensor):
    """One CLIP encoder layer in eager form; returns (output, attention [B,H,N,N], q, k, v per head)."""
    attn = layer.self_attn
    h = layer.layer_norm1(x)
    q, k, v = (_heads(proj(h), attn.head_dim) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    weights = torch.softmax(q * attn.scale @ k.transpose(-1, -2), dim=-1)
    out = attn.out_proj((weights @ v).transpose(1, 2).flatten(2))
    x = x + out
    x = x + layer.mlp(layer.layer_norm2(x))
    return x, weights, q, k, v


def _adaptive_prune_ratio(attn: torch.Tensor, rpl: int, target_num: int) -> int:
    n = attn.shape[-1]
    prob = attn / attn.sum(dim=-1, keepdim=True)
    entropy = -torch.sum(prob * torch.log(prob), dim=-1)
    ratio = entropy / math.log(n)
    r = (n - target_num) / rpl ** 0.5 * (1 - ratio ** 2)
    if r.shape[0] > 1:
        r = r.max(0).values
    return int(r.round())


def flowcut_encode(tower: nn.Module, pixel_values: torch.Tensor, target_num: int):
    """FlowCut's CLIP encoder on LLaVA-1.5 (``image_aspect_ratio='pad'``): ``target = T + 1`` with CLS,
    ``select_layer = len(layers) - 2``; returns (``hidden_states[-2][:, 1:]``, kept patch positions)."""
    layers = tower.encoder.layers
    target, select_layer = target_num + 1, len(layers) - 2
    x = tower.pre_layrnorm(tower.embeddings(pixel_values))
    positions = torch.arange(x.shape[1] - 1).expand(x.shape[0], -1)
    cumulative = None
    states = [x]
    for idx, layer in enumerate(layers):
        rpl = select_layer - idx - 1
        x, weights, _, _, v = _layer(layer, x)
        if x.shape[1] > target:
            cls_attention = weights[:, :, 0, 1:].mean(dim=1)
            semantic = torch.softmax(v[:, :, :1] @ v.transpose(-1, -2), dim=-1).mean(1)[:, 0, 1:]
            value = v.mean(1)[:, 1:]
            score = (cls_attention / cls_attention.sum(-1, keepdim=True)
                     + semantic / semantic.sum(-1, keepdim=True)) * torch.norm(value, p=1, dim=-1)
            cumulative = score.clone() if cumulative is None else 0.5 * cumulative + 0.5 * score
            if not rpl % 2:
                prune_num = _adaptive_prune_ratio(cls_attention, rpl, target - 1) if rpl else x.shape[1]
                target_kept = max(x.shape[1] - prune_num, target)
                keep = torch.topk(cumulative, target_kept - 1, dim=1).indices.sort(dim=1).values
                patches = torch.gather(x[:, 1:], 1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
                cumulative = torch.gather(cumulative, 1, keep)
                positions = torch.gather(positions, 1, keep)
                x = torch.cat([x[:, :1], patches], dim=1)
        states.append(x)
    return states[-2][:, 1:], positions


def visionzip_encode(tower: nn.Module, pixel_values: torch.Tensor, dominant: int, contextual: int):
    """VisionZip's ``encode_images_visionzip`` up to the projector: (tokens ``[B, dominant + contextual, C]``
    = CLS, dominant patches in position order, contextual tokens; dominant patch positions)."""
    layers = tower.encoder.layers
    x = tower.pre_layrnorm(tower.embeddings(pixel_values))
    states, attentions, metric = [x], [], None
    for idx, layer in enumerate(layers):
        x, weights, _, k, _ = _layer(layer, x)
        states.append(x)
        attentions.append(weights)
        if idx == len(layers) - 2:
            metric = k.mean(1)
    hidden, attn = states[-2], attentions[-2]
    batch, length, channels = hidden.shape
    dominant_num = dominant - 1
    top = attn[:, :, 0, 1:].sum(dim=1).topk(dominant_num, dim=1).indices + 1
    all_indices = torch.cat([torch.zeros(batch, 1, dtype=top.dtype), top], dim=1)
    mask = torch.ones(batch, length, dtype=torch.bool).scatter_(1, all_indices, False)
    dominant_tokens = hidden.masked_select(~mask.unsqueeze(-1)).view(batch, dominant_num + 1, channels)
    metric_filtered = metric[mask].view(batch, length - dominant_num - 1, metric.shape[2])
    hidden_filtered = hidden.masked_select(mask.unsqueeze(-1)).view(batch, length - dominant_num - 1, channels)
    metric_normalized = metric_filtered / metric_filtered.norm(dim=-1, keepdim=True)
    step = max(1, metric_normalized.shape[1] // contextual)
    target_indices = torch.arange(0, metric_normalized.shape[1], step)[:contextual]
    target_tokens = metric_normalized[:, target_indices, :]
    others = ~torch.isin(torch.arange(metric_normalized.shape[1]), target_indices)
    similarity = torch.bmm(metric_normalized[:, others, :], target_tokens.transpose(1, 2))
    assign = torch.zeros(batch, int(others.sum()), contextual, dtype=hidden.dtype)
    assign.scatter_(2, similarity.argmax(dim=2).unsqueeze(-1), 1)
    counts = assign.sum(dim=1).clamp(min=1).unsqueeze(-1)
    aggregated = torch.bmm(assign.transpose(1, 2), hidden_filtered[:, others, :]) / counts
    contextual_tokens = hidden_filtered[:, target_indices, :] + aggregated
    return torch.cat([dominant_tokens, contextual_tokens], dim=1), top.sort(dim=1).values - 1


def pitome_clip_hf_encode(tower: nn.Module, pixel_values: torch.Tensor, ratio: float) -> torch.Tensor:
    """The official PiToMe LLaVA patch (``patch/clip_hf.py``) on a HF CLIP tower, up to LLaVA's features:
    after every whole layer, the layer's output is merged with a plain mean (sizes ignored): ToMe's
    bipartite matching with ``r = floor(N - N*ratio)`` over all ``N`` tokens (CLS included in the count)
    in layers ``idx <= 12``, pure PiToMe on the patch tokens with margin ``0.9 - 0.9*idx/L`` after.
    Returns ``hidden_states[-2][:, 1:]`` as the patch records them (the input of the last layer), in the
    patch's token order, and each token's smallest original patch position."""
    from oracles import _combine, _pitome_destinations, _tome_destinations

    layers = tower.encoder.layers
    x = tower.pre_layrnorm(tower.embeddings(pixel_values))
    assignment = torch.arange(x.shape[1]).expand(x.shape[0], -1)
    recorded = []
    for idx, layer in enumerate(layers):
        recorded.append((x, assignment))
        x, *_ = _layer(layer, x)
        if idx <= 12:
            plan = _tome_destinations(x, math.floor(x.shape[1] - x.shape[1] * ratio), True, False)
        else:
            plan = _pitome_destinations(x, ratio, 0.9 - 0.9 * idx / len(layers), bsm=False)
        if plan is not None:
            x, _ = _combine(x, torch.ones(x.shape[:2], dtype=x.dtype), *plan)
            assignment = plan[0].gather(1, assignment)
    features, assignment = recorded[-1]
    smallest = torch.full(features.shape[:2], assignment.shape[1], dtype=torch.long)
    smallest = smallest.scatter_reduce(1, assignment, torch.arange(assignment.shape[1]).expand_as(assignment), "amin")
    return features[:, 1:], smallest[:, 1:] - 1
