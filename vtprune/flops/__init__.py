"""Analytic and measured cost of a forward: multiply-accumulates / FLOPs per layer, with explicit conventions.

Papers on visual-token reduction report costs that cannot be compared as printed: most report
multiply-accumulates (MACs) as "FLOPs", count only the visual tokens, leave out the vision encoder,
the projector, the LM head and the text prompt, and count the prefill only. This module makes each of
these choices a switch, so that a paper's table can be reproduced (the ``paper`` preset) next to an
honest count of everything a forward computes (the ``full`` preset)::

    from vtprune import flops
    flops.estimate("llava-1.5-7b").total                      # 3.817e12 MACs (paper)
    flops.estimate("llava-1.5-7b", schedule="576x2,288x30")   # FastV K=2 R=0.5: 2.007e12 MACs
    flops.estimate("vit-b-16", policy="tome:r=16")            # 8.66e9 MACs, blocks only
    print(flops.estimate("llava-1.5-7b", convention="full"))  # FLOPs, prefill and decode, everything
    flops.measure(model, images)                              # torch's FlopCounterMode, per module

**Counted (analytic).** Per transformer layer with ``n_q`` query tokens, ``n_k`` key tokens, ``n_m``
MLP tokens, width ``d``, ``h`` query heads and ``h_kv`` key/value heads of width ``d_h``, MLP width
``m`` (2 matrices: fc1/fc2; 3: SwiGLU's gate/up/down):

* projections ``n_q·d·h·d_h`` (q) + ``2·n_k·d·h_kv·d_h`` (k, v: grouped-query aware) + ``n_q·h·d_h·d`` (o);
* attention ``2·h·d_h·n_q·n_k`` (scores ``q·kᵀ`` and mixing ``softmax·v``), with ``n_q·n_k`` replaced by
  the unmasked pairs ``n(n+1)/2`` when ``causal_halving`` is on;
* MLP ``matrices·n_m·d·m``.

Plus the patch embedding (``patches·in_chans·p²·d``), a vision head (linear layers on the pooled token;
a latent-query attention pool), the projector's linear layers over the visual tokens, the LM head
(``tokens·d·vocab``), and the method's own matrix products (similarity matrices, scores; the policy's
``matching_macs``). Not counted: LayerNorm/RMSNorm, softmax, activations, residual additions, biases,
RoPE, embedding lookups, pooling averages, sorting and gathers, the merge itself. With 1 MAC = 2 FLOPs.

**Measured.** :func:`measure` runs one forward under ``torch.utils.flop_counter.FlopCounterMode``,
which counts matrix products only (``mm``, ``addmm``, ``bmm``, ``baddbmm``, convolutions and the fused
attention kernels, at 2 FLOPs per MAC) and nothing element-wise, so it leaves out what the analytic
count leaves out. It counts the masked half of causal attention (it sees the kernel's shapes, not the
mask) and whatever else runs in the forward: the policy's matching, a full-sequence LM head when the
model is not asked for the last position only, RoPE's frequency product where a transformers version
computes it with a matmul (5.23 does not).

The configs shipped with vtprune (``flops.configs()``) are small JSON files in ``vtprune/configs``,
built from the published hyperparameters of each model; a timm model name, a timm
``VisionTransformer``, a Hugging Face config (LLaVA, LLaVA-NeXT, CLIP/SigLIP vision, Llama-family
decoders) or a Hugging Face model are accepted too. No weights are ever loaded.

This module imports no host library at import time; timm and transformers are imported only inside
the functions that read their models.
"""
from __future__ import annotations

from .analytic import estimate, vit_macs
from .architectures import (Architecture, LanguageModel, Transformer, UnknownConfigError, VisionTower, architecture,
                            configs, load_config)
from .conventions import PRESETS, Convention, resolve_convention
from .costs import SITE_TITLES, SITES, UNITS, Cost, LayerCost, format_count, table
from .measured import Measured, measure
from .token_counts import trace_schedule

__all__ = [
    "PRESETS", "SITES", "SITE_TITLES", "UNITS", "Architecture", "Convention", "Cost", "LanguageModel", "LayerCost",
    "Measured", "Transformer", "UnknownConfigError", "VisionTower", "architecture", "configs", "estimate",
    "format_count", "load_config", "measure", "resolve_convention", "table", "trace_schedule", "vit_macs",
]
