"""Tokens per layer and site: from a list, a string, a recorded trace, or a policy's own rules."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from ..policy import Policy
from ..schedules import parse_schedule
from ..trace import Trace
from .architectures import Architecture


def trace_schedule(trace: Trace, site: str = "vision") -> list[tuple[int, int]]:
    """``(attention_tokens, mlp_tokens)`` per layer from a recorded :class:`vtprune.Trace`.

    A layer that merged between attention and MLP (``reduced="mid"``) gives ``(tokens_in, tokens_out)``;
    a layer that reduced nothing, or only after its MLP (``"post"``), gives ``(tokens_in, tokens_in)``. Samples of a batch run at the same
    (padded) count, which is what is costed.
    """
    pairs = []
    for layer in trace.layers(site):
        if layer.reduced == "mid":
            pairs.append((layer.tokens_in, layer.tokens_out))
        elif layer.reduced == "post" or (layer.reduced == "none" and layer.tokens_in == layer.tokens_out):
            pairs.append((layer.tokens_in, layer.tokens_in))
        else:
            raise ValueError(f"vtprune.flops knows reductions 'mid' (between attention and MLP), 'post' and 'none'; "
                             f"{site} layer {layer.layer} has reduced={layer.reduced!r} "
                             f"({layer.tokens_in}->{layer.tokens_out})")
    return pairs


def _as_pairs(schedule: Any, num_layers: int, site: str) -> list[tuple[int, int]]:
    if isinstance(schedule, str):
        schedule = parse_schedule(schedule)
    entries = list(schedule)
    if len(entries) != num_layers:
        hint = ("e.g. vtprune.schedules.stage_schedule(576, {2: 288}, 32), or '576x2,288x30'" if site == "llm"
                else "one count or (attention, mlp) pair per block")
        raise ValueError(f"the {site} schedule has {len(entries)} entries but the {site} has {num_layers} layers; "
                         f"give the tokens entering each layer ({hint})")
    pairs = []
    for index, entry in enumerate(entries):
        if isinstance(entry, (tuple, list)) and len(entry) == 2:
            pair = (entry[0], entry[1])
        else:
            pair = (entry, entry)
        if any(isinstance(value, bool) or not isinstance(value, int) or value < 0 for value in pair):
            raise ValueError(f"{site} schedule entry {index} must be a token count or an (attention, mlp) pair of "
                             f"non-negative integers, got {entry!r}")
        if pair[1] > pair[0]:
            raise ValueError(f"{site} schedule entry {index}: the MLP cannot see more tokens than the attention "
                             f"({pair[0]} -> {pair[1]})")
        pairs.append(pair)
    return pairs


def _reduces(pairs: Sequence[tuple[int, int]], index: int) -> bool:
    """Whether layer ``index`` reduces tokens: inside it (MLP < attention) or before the next layer."""
    attention, mlp = pairs[index]
    return mlp < attention or (index + 1 < len(pairs) and pairs[index + 1][0] < mlp)


def _policies(policy: Any) -> list[Policy]:
    if policy is None:
        return []
    from ..registry import make_policies

    return make_policies(policy)


def _handed_per_view(arch: Architecture, policy: Policy) -> int | None:
    """Visual tokens per view (crop) a vision- or projector-site policy hands on, if it fixes that count."""
    if arch.vision is None or arch.llm is None or policy.site not in ("vision", "projector"):
        return None
    tower = arch.vision
    return policy.handed_on(tower.num_patches, tower.num_prefix_tokens, arch.drop_prefix, anyres=arch.views > 1)


def _handed_on(arch: Architecture, policy: Policy, budgeted: bool = True) -> int | None:
    """Visual tokens per sample the policy hands a VLM's language model, if it fixes that count. ``budgeted``:
    LLaVA-NeXT's per-image cut after packing (:meth:`Policy.image_budget`) applies, as the adapter makes it
    when no ``llm``-site policy makes the final cut instead."""
    per_view = _handed_per_view(arch, policy)
    if per_view is None:
        return None
    budget = policy.image_budget() if arch.views > 1 and budgeted else None
    return arch.views * per_view if budget is None else min(arch.views * per_view, budget)


def _in_site_order(policies: list[Policy]) -> list[Policy]:
    """The policies in the order their reductions happen: vision, projector, llm (others last)."""
    order = ("vision", "projector", "llm")
    return sorted(policies, key=lambda item: order.index(item.site) if item.site in order else len(order))


def projector_tokens(arch: Architecture, policies: list[Policy]) -> int | None:
    """Tokens the projector runs on (all views, before packing) when a policy fixes them, else ``None``: the
    count of the last such policy before the projector."""
    counts = [count for count in (_handed_per_view(arch, policy) for policy in _in_site_order(policies))
              if count is not None]
    return arch.views * counts[-1] if counts else None


def _schedules(arch: Architecture, schedule: Any, policies: list[Policy],
               visual_tokens: int | None = None, notes: list[str] | None = None) -> dict[str, list[tuple[int, int]]]:
    layers = {"vision": arch.vision.blocks.num_layers if arch.vision else 0,
              "llm": arch.llm.num_layers if arch.llm else 0}
    given: dict[str, Any] = {}
    if isinstance(schedule, Trace):
        for site in schedule.sites:
            if site == "projector":
                continue  # what it hands on is in trace.positions (see _trace_visual_tokens)
            pairs = trace_schedule(schedule, site)
            if site == "vision" and 0 < len(pairs) < layers["vision"]:
                # a VLM's trace stops at the feature layer; the layers after it run on what is left
                pairs = pairs + [(pairs[-1][1], pairs[-1][1])] * (layers["vision"] - len(pairs))
            given[site] = pairs
    elif isinstance(schedule, Mapping):
        given = dict(schedule)
    elif schedule is not None:
        given[arch.primary_site] = schedule
    result: dict[str, list[tuple[int, int]]] = {}
    composed_llm = any(policy.site == "llm" for policy in policies)
    fixed: int | None = None  # visual tokens a vision- or projector-site policy hands the language model
    for site, value in given.items():
        if site not in ("vision", "llm"):
            raise ValueError(f"schedules are given for the sites 'vision' and 'llm', not {site!r}")
        if not layers[site]:
            raise ValueError(f"a {site} schedule was given but {arch.name} has no "
                             f"{'vision tower' if site == 'vision' else 'language model'}")
        result[site] = _as_pairs(value, layers[site], site)
    for policy in _in_site_order(policies):
        site = policy.site
        if site == "projector" and (visual_tokens is not None or "llm" in result):
            continue  # the visual tokens it keeps are given
        handed = _handed_on(arch, policy, budgeted=not composed_llm)
        if site == "projector" and handed is not None:
            fixed = handed
            continue
        if site == "vision" and handed is not None and layers["llm"] and site not in result and \
                type(policy).token_schedule is Policy.token_schedule:
            # counts inside the tower depend on the input: the tower is costed unreduced (an upper bound)
            if notes is not None:
                notes.append(f"{policy}: its per-layer counts inside the vision tower depend on the input; the "
                             "tower is costed without them (an upper bound). Cost a trace for the exact count: "
                             "estimate(model, schedule=handle.trace, policy=policy).")
            if visual_tokens is None:
                fixed = handed
            continue
        if site == "projector" and not layers["llm"]:
            raise ValueError(f"policy {policy} acts at site 'projector', which {arch.name} does not have (it has no "
                             "language model)")
        if site == "projector":
            raise ValueError(f"policy {policy}: costing projector-site policies needs the visual tokens they keep; "
                             "pass schedule={'llm': [...]} with the counts the language model sees")
        if site not in layers or not layers[site]:
            raise ValueError(f"policy {policy} acts at site {site!r}, which {arch.name} does not have")
        if site in result:
            continue  # the given schedule (e.g. a trace) wins; the policy only adds its overhead
        if site == "vision":
            tower = arch.vision
            pairs = policy.token_schedule(tower.num_tokens, tower.blocks.num_layers, tower.num_prefix_tokens)
            result[site] = _up_to_feature_layer(arch, pairs, policies) if layers["llm"] else pairs
        else:
            entering = fixed if fixed is not None else _default_visual_tokens(arch, result, visual_tokens)
            result[site] = policy.token_schedule(entering, layers["llm"], 0)
    if fixed is not None and "llm" not in result:
        result["llm"] = [(fixed, fixed)] * layers["llm"]
    if arch.vision and "vision" not in result:
        result["vision"] = [(arch.vision.num_tokens, arch.vision.num_tokens)] * layers["vision"]
    return result


def _up_to_feature_layer(arch: Architecture, pairs: list[tuple[int, int]],
                         policies: list[Policy]) -> list[tuple[int, int]]:
    """A VLM's vision policy reduces only in the layers up to the feature layer (one fewer when a projector
    policy reads the feature layer's attention), as the LLaVA adapter applies it; the layers after run on
    what is left."""
    index = arch.feature_index(len(pairs))
    reading = any(policy.site == "projector" and {"qkv", "keys", "attention"} & set(policy.signals)
                  for policy in policies)
    depth = index - 1 if reading else index
    if not 0 < depth < len(pairs):
        return pairs
    left = pairs[depth - 1][1]
    return pairs[:depth] + [(left, left)] * (len(pairs) - depth)


def _trace_visual_tokens(trace: Trace, arch: Architecture) -> int | None:
    """Visual tokens a VLM's trace says were handed to the language model (the first image's)."""
    if trace.visual_tokens:
        return trace.visual_tokens[0]
    if not trace.positions:
        return None
    return arch.views * len(trace.positions[0])


def _default_visual_tokens(arch: Architecture, result: Mapping[str, list[tuple[int, int]]],
                           visual_tokens: int | None = None) -> int:
    """``visual_tokens`` if given; else the config's nominal count, unless a vision-side schedule reduced
    the tokens: then what is left at the feature layer, for every view."""
    if visual_tokens is not None:
        if isinstance(visual_tokens, bool) or not isinstance(visual_tokens, int) or visual_tokens < 0:
            raise ValueError(f"visual_tokens must be an integer >= 0, got {visual_tokens!r}")
        return visual_tokens
    vision = result.get("vision")
    reduced = arch.vision is not None and vision is not None and any(
        pair != (arch.vision.num_tokens, arch.vision.num_tokens) for pair in vision)
    if reduced:
        return arch.views * arch.visual_tokens_per_view(vision)
    if arch.visual_tokens is not None:
        return arch.visual_tokens
    if arch.vision is not None:
        return arch.views * arch.visual_tokens_per_view()
    raise ValueError(f"{arch.name} has no vision tower and no nominal visual token count: pass visual_tokens= "
                     "or a schedule for the language model")
