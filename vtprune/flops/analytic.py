"""The analytic estimate: MACs / FLOPs per layer and site under a convention."""
from __future__ import annotations

from typing import Any, Sequence

from ..trace import Trace
from .architectures import Transformer, architecture
from .conventions import Convention, resolve_convention
from .costs import SITES, Cost, LayerCost
from .token_counts import (_default_visual_tokens, _policies, _reduces, _schedules, _trace_visual_tokens,
                           projector_tokens as fixed_projector_tokens)


def estimate(config: Any, *, schedule: Any = None, policy: Any = None, convention: str | Convention = "paper",
             visual_tokens: int | None = None, **switches: Any) -> Cost:
    """The analytic cost of one sample's forward under ``convention`` (a preset name or a
    :class:`Convention`) with ``switches`` overriding it (see :class:`Convention`).

    config: a shipped config name (:func:`configs`), a timm model name, a timm ``VisionTransformer``,
        a Hugging Face config or model, or an :class:`Architecture` (see :func:`architecture`).
    schedule: the tokens entering each layer: a list with one entry per layer of the language model
        (visual tokens) or, for a vision-only model, per vision block; an entry is a count or an
        ``(attention_tokens, mlp_tokens)`` pair for a layer that merges between attention and MLP;
        a string (``"576x2,288x30"``, :func:`vtprune.schedules.parse_schedule`); a dict
        ``{"vision": ..., "llm": ...}``; or a :class:`vtprune.Trace` of a real forward.
        Default: no reduction.
    policy: a policy (object, spec string, dict, or a list of them). Where no schedule is given for its
        site, its own rules give the schedule (:meth:`vtprune.Policy.token_schedule`, e.g. ToMe's
        ``r`` per layer with its cap); its matching is the method overhead.
    visual_tokens: visual tokens entering the language model (default: for a VLM's trace, the tokens it
        handed on, ``trace.positions``, which is also what the projector is costed on; else the config's
        nominal count, or what a vision-side schedule leaves at the feature layer).

    Returns a :class:`Cost`: ``.total`` in ``.unit`` (MACs for ``paper``, FLOPs for ``full``).
    """
    arch = architecture(config)
    conv = resolve_convention(convention, **switches)
    policy_list = _policies(policy)
    handed_on = _trace_visual_tokens(schedule, arch) if isinstance(schedule, Trace) and arch.llm else None
    if visual_tokens is None:
        visual_tokens = handed_on
    by_policy_site = {item.site: item for item in policy_list}
    notes: list[str] = []
    sched = _schedules(arch, schedule, policy_list, visual_tokens, notes)
    has_llm = arch.llm is not None
    count_vision = conv.vision if conv.vision is not None else not has_llm
    factor = conv.factor
    parts: dict[str, int] = {}
    layers: list[LayerCost] = []
    by_site: dict[str, int | None] = {site: None for site in SITES}
    overhead_total = 0

    tower = arch.vision
    if tower is not None and count_vision:
        views = _views(arch, schedule)
        blocks = tower.blocks
        dims = {"keys": blocks.head_dim, "hidden": blocks.hidden_size}
        vision_policy = by_policy_site.get("vision")
        block_total = 0
        for index, (attn_tokens, mlp_out) in enumerate(sched["vision"]):
            mlp_tokens = attn_tokens if conv.mlp_tokens == "in" else mlp_out
            overhead = 0
            if conv.overhead and vision_policy is not None and _reduces(sched["vision"], index):
                overhead = vision_policy.matching_macs(attn_tokens, tower.num_prefix_tokens, dims, layer=index,
                                                       num_layers=len(sched["vision"]))
            layer = LayerCost("vision", index, attn_tokens, mlp_out,
                              views * factor * blocks.projection_macs(attn_tokens, attn_tokens),
                              views * factor * blocks.attention_macs(attn_tokens, attn_tokens),
                              views * factor * blocks.mlp_macs(mlp_tokens), views * factor * overhead)
            layers.append(layer)
            block_total += layer.total - layer.overhead
            overhead_total += layer.overhead
        parts["vision.blocks"] = block_total
        vision_total = block_total
        if conv.patch_embed:
            parts["vision.patch_embed"] = views * factor * tower.patch_embed_macs()
            vision_total += parts["vision.patch_embed"]
        if conv.vision_head and (tower.head or tower.attention_pool):
            final_tokens = sched["vision"][-1][1] if sched["vision"] else tower.num_tokens
            parts["vision.head"] = views * factor * tower.head_macs(final_tokens)
            vision_total += parts["vision.head"]
        by_site["vision"] = vision_total
        if views > 1:
            notes.append(f"The vision encoder runs on {views} views per sample (anyres); its cost is summed.")

    decode_total, decode_per_token = 0, None
    if has_llm:
        llm = arch.llm
        assert llm is not None
        if "llm" not in sched:
            visual = _default_visual_tokens(arch, sched, visual_tokens)
            sched["llm"] = [(visual, visual)] * llm.num_layers
        elif visual_tokens is not None and visual_tokens != sched["llm"][0][0]:
            raise ValueError(f"visual_tokens={visual_tokens} contradicts the language-model schedule, whose first "
                             f"layer sees {sched['llm'][0][0]} visual tokens; give one or the other")
        fixed = None if isinstance(schedule, Trace) else fixed_projector_tokens(arch, policy_list)
        if handed_on is not None and isinstance(schedule, Trace) and schedule.positions:
            projector_tokens = _views(arch, schedule) * len(schedule.positions[0])  # per crop, before packing
        elif tower is None:
            projector_tokens = sched["llm"][0][0]
        elif fixed is not None:
            projector_tokens = fixed  # reduced before the projector
        else:
            projector_tokens = arch.views * arch.visual_tokens_per_view(sched.get("vision"))
        if conv.projector and arch.projector:
            by_site["projector"] = parts["projector"] = factor * projector_tokens * sum(
                fan_in * fan_out for fan_in, fan_out in arch.projector)
        prompt = conv.prompt_tokens
        llm_policy = by_policy_site.get("llm")
        dims = {"keys": llm.head_dim, "hidden": llm.hidden_size}
        if conv.llm:
            llm_total = 0
            for index, (attn_visual, mlp_visual) in enumerate(sched["llm"]):
                attn_tokens = attn_visual + prompt
                mlp_tokens = attn_tokens if conv.mlp_tokens == "in" else mlp_visual + prompt
                overhead = 0
                if conv.overhead and llm_policy is not None and _reduces(sched["llm"], index):
                    overhead = llm_policy.matching_macs(attn_visual, 0, dims, layer=index, num_layers=len(sched["llm"]))
                layer = LayerCost("llm", index, attn_tokens, mlp_visual + prompt,
                                  factor * llm.projection_macs(attn_tokens, attn_tokens),
                                  factor * llm.attention_macs(attn_tokens, attn_tokens, conv.causal_halving),
                                  factor * llm.mlp_macs(mlp_tokens), factor * overhead)
                layers.append(layer)
                llm_total += layer.total - layer.overhead
                overhead_total += layer.overhead
            by_site["llm"] = parts["llm.layers"] = llm_total
        final = sched["llm"][-1][1] + prompt
        head_tokens = 1 if conv.lm_head_tokens == "last" else final
        if conv.lm_head:
            by_site["lm_head"] = parts["lm_head"] = factor * head_tokens * llm.hidden_size * llm.vocab_size
        if conv.decode:
            steps = []
            for step in range(max(conv.decode_steps, 1)):
                macs = 0
                if conv.llm:
                    for attn_visual, _ in sched["llm"]:
                        context = attn_visual + prompt + step + 1
                        macs += (llm.projection_macs(1, 1) + llm.attention_macs(1, context, conv.causal_halving)
                                 + llm.mlp_macs(1))
                if conv.lm_head:
                    macs += llm.hidden_size * llm.vocab_size
                steps.append(factor * macs)
            decode_per_token = steps[0]
            decode_total = sum(steps[:conv.decode_steps])
            if prompt == 0:
                notes.append("Decode steps attend to the visual tokens only (prompt_tokens=0).")
    if conv.overhead:
        by_site["overhead"] = overhead_total
        if not policy_list:
            notes.append("No policy given: no method overhead to count.")

    prefill = sum(value for value in by_site.values() if value is not None)
    present = tuple(site for site, here in (("vision", tower is not None), ("projector", bool(arch.projector)),
                                            ("llm", has_llm), ("lm_head", has_llm), ("overhead", True)) if here)
    return Cost(config=arch.name, convention=conv.name, unit=conv.unit, prefill=prefill, by_site=by_site,
                parts=parts, layers=tuple(layers),
                schedule={site: tuple(sched[site]) for site in ("vision", "llm") if site in sched},
                switches=conv.switches(), description=conv.describe(has_llm), decode=decode_total,
                decode_per_token=decode_per_token, visual_tokens=sched["llm"][0][0] if has_llm else None,
                policies=tuple(str(item) for item in policy_list), notes=tuple(notes), present=present)


def vit_macs(block_tokens: Sequence[tuple[int, int]], *, dim: int, mlp_ratio: float, num_patches: int = 0,
             patch_dim: int = 0, num_classes: int = 0) -> dict[str, int]:
    """Multiply-accumulates (MACs) per image of a plain ViT forward, from the tokens each block processes
    (the speed benchmark's count, ``vtprune.evals.bench.vit_macs``; for anything else use :func:`estimate`).

    ``block_tokens``: one ``(attention_tokens, mlp_tokens)`` pair per block. For ToMe-style merging
    between attention and MLP these are the tokens entering and leaving the block (``LayerTokens``
    ``tokens_in`` / ``tokens_out`` with ``reduced="mid"``); an unreduced block has both equal.

    Per block, with ``N_in`` attention tokens, ``N_out`` MLP tokens and width ``C``:

    * ``4·N_in·C²``: the q, k, v and output projections;
    * ``2·N_in²·C``: the attention scores ``q·kᵀ`` and the mixing ``softmax(·)·v``;
    * ``2·mlp_ratio·N_out·C²``: the two MLP linears.

    Constant terms: patch embedding ``num_patches·patch_dim·C`` (``patch_dim = in_chans·p²``) and the
    head ``C·num_classes``. LayerNorm, softmax, GELU, biases, pooling and the merging itself are not
    counted. Unit: MACs (one multiply-accumulate = 2 FLOPs); this is the convention of the ToMe and
    PiToMe papers' "GFLOPs". ViT-B/16 at 224 (197 tokens, C=768, 12 blocks, mlp_ratio 4): blocks
    17.45 G unmerged and 8.66 G with ToMe r=16; 17.56 G total unmerged with embedding and head.

    Returns ``{"blocks", "patch_embed", "head", "total"}`` in MACs per image.
    """
    hidden = round(mlp_ratio * dim)
    blocks = Transformer(num_layers=len(block_tokens), hidden_size=dim, num_heads=1, intermediate_size=hidden)
    total_blocks = 0
    for attention_tokens, mlp_tokens in block_tokens:
        total_blocks += (blocks.projection_macs(attention_tokens, attention_tokens)
                         + blocks.attention_macs(attention_tokens, attention_tokens) + blocks.mlp_macs(mlp_tokens))
    patch_embed = num_patches * patch_dim * dim
    head = dim * num_classes
    return {"blocks": total_blocks, "patch_embed": patch_embed, "head": head,
            "total": total_blocks + patch_embed + head}


def _views(arch: Any, schedule: Any) -> int:
    """Views (crops) per image the vision tower encodes: a LLaVA-NeXT trace's own count (one ``positions`` row
    per crop, ``visual_tokens`` one entry per image: fewer crops for a small or square image), else the
    config's."""
    if isinstance(schedule, Trace) and arch.views > 1 and schedule.positions and schedule.visual_tokens:
        crops, images = len(schedule.positions), len(schedule.visual_tokens)
        if crops % images == 0:
            return crops // images
    return arch.views
