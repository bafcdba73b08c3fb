"""Adapter for Hugging Face ``transformers`` LLaVA-1.5 (``LlavaForConditionalGeneration``).

Found structurally per instance: ``model.model`` has ``vision_tower`` (a CLIP/SigLIP vision model, as the
``hf-clip-vision`` adapter matches), ``multi_modal_projector``, ``language_model`` and
``get_image_features``; a LLaVA-NeXT model (``image_newline`` / ``pack_image_features``) is not this family.

Sites:

- ``vision``: inside the vision tower's encoder layers up to LLaVA's feature layer
  (``config.vision_feature_layer``, -2: layers 0..22 of 24), between attention and MLP (or after the
  MLP for a ``"post"`` policy); the policy sees the tower's depth as ``num_layers`` and the feature layer
  as ``last_layer``, so FlowCut's final cut lands before the feature layer. Layers after it run unchanged.
- ``projector``: on the feature layer's tokens (CLS included as protected prefix) just before the
  projector, with the feature layer's q/k/v as signals (a vision-site policy combined with such a
  projector policy then stops one layer before the feature layer, so that the feature layer's attention
  and its output are the same tokens). LLaVA's ``"default"`` strategy drops CLS there;
  a policy with ``hands_on_prefix`` (VisionZip) hands it on, as its official code does.

Tokens reach the projector in raster order (merged tokens by their smallest original position); the
trace records the original position of each (``Trace.positions``).

The language model: when fewer visual tokens are handed on than the prompt has placeholders, the
outermost ``forward`` removes the surplus placeholders of each image and shortens ``attention_mask``,
``labels`` and position ids the same way (rows re-padded on the input's padding side, positions
counted over attended tokens as ``generate`` does). The cache that call returns is remembered, and later
calls with it (``generate``'s decode steps, or a hand-written loop) have their ``attention_mask``,
``position_ids`` and ``cache_position``, which count the user's original columns, translated. So
``generate`` runs unchanged and returns the user's ``input_ids`` followed by the new tokens; ``forward``
returns logits over the shortened sequence.
"""
from __future__ import annotations

import inspect
import sys
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vtprune.policy import Policy
from vtprune.reduction import MergePlan
from vtprune.sequence import llm_tokens
from vtprune.state import Runtime, TokenState

from .base import Inspection

from .hf_clip import AttentionTaps, _has_cls, _is_vision_tower, attention_signal, encoder_layer_forward, projections_for
from .hf_llm import LLMSite
from .patching import Patch, forward_of
from .reduction_point import reduce_at, refuse_gradient_checkpointing
from .sequence import ShortenedLayout, positions_from_mask, shorten_layout


def _parts(model: nn.Module) -> nn.Module | None:
    inner = getattr(model, "model", None)
    if inner is None or not all(hasattr(inner, name) for name in ("vision_tower", "multi_modal_projector",
                                                                     "language_model", "get_image_features")):
        return None
    return inner


def _is_anyres(inner: nn.Module) -> bool:
    """LLaVA-NeXT: crops of each image are encoded separately and packed (``pack_image_features``)."""
    return callable(getattr(inner, "pack_image_features", None))


@dataclass(frozen=True)
class ImageTokens:
    """Attached to the image features vtprune computed: placeholder and kept token counts per image, and
    the call's token state (adopted by the forward that consumes the features)."""

    original: tuple[int, ...]
    kept: tuple[int, ...]
    state: TokenState


_TAGS: dict[int, tuple["weakref.ref", ImageTokens]] = {}


def set_tag(image: Any, tag: ImageTokens) -> None:
    """Attach ``tag`` to encoded image features, keyed by their first feature tensor: wrappers such as
    accelerate's device hooks rebuild the output object and its list, but keep the tensors."""
    features = getattr(image, "pooler_output", None)
    if features is None or not len(features):
        return
    first = features[0]
    key = id(first)
    _TAGS[key] = (weakref.ref(first, lambda _ref, key=key: _TAGS.pop(key, None)), tag)


def get_tag(image: Any) -> ImageTokens | None:
    features = getattr(image, "pooler_output", None)
    if features is None or not len(features):
        return None
    entry = _TAGS.get(id(features[0]))
    return entry[1] if entry is not None and entry[0]() is features[0] else None


_PARTS = ("vision_tower", "multi_modal_projector", "language_model")


def _old_layout(model: nn.Module) -> bool:
    """transformers < 4.52 kept the parts on the generation model itself (no ``model.model``)."""
    return _parts(model) is None and all(hasattr(model, name) for name in _PARTS)


def _transformers_version() -> str:
    try:
        import transformers
        return transformers.__version__
    except ImportError:  # pragma: no cover - the model itself comes from transformers
        return "unknown"


class HFLlavaAdapter:
    name = "hf-llava"
    family = ("transformers LlavaForConditionalGeneration (LLaVA-1.5) and LlavaNextForConditionalGeneration "
              "(LLaVA-NeXT); CLIP or SigLIP vision tower")
    sites = ("vision", "projector", "llm")
    signals = ("keys", "qkv", "hidden", "attention", "next_attention", "transitions", "tokens")

    def matches(self, model: nn.Module) -> bool:
        return _parts(model) is not None or (_old_layout(model) and hasattr(model, "config"))

    def _check(self, model: nn.Module) -> tuple[nn.Module, nn.ModuleList, int]:
        if _old_layout(model):
            raise TypeError(f"{type(model).__name__} keeps vision_tower / multi_modal_projector / language_model on "
                            "itself, the layout of transformers < 4.52; vtprune's LLaVA adapter supports the layout "
                            f"of transformers 5 (model.model.vision_tower, ...). Installed: transformers "
                            f"{_transformers_version()}; upgrade with pip install -U 'transformers>=5'")
        inner = _parts(model)
        if "mm_encoder_outputs" not in inspect.signature(type(inner).forward).parameters:
            raise TypeError(f"{type(inner).__name__}.forward has no mm_encoder_outputs argument; vtprune's LLaVA "
                            "adapter needs transformers 5 (generate encodes images before the prefill). Installed: "
                            f"transformers {_transformers_version()}")
        tower = inner.vision_tower
        if not _is_vision_tower(tower):
            raise ValueError(f"the LLaVA vision tower is a {type(tower).__name__}; vtprune supports CLIP/SigLIP "
                             "vision models (embeddings, encoder.layers, post_layernorm)")
        layer_index = model.config.vision_feature_layer
        if not isinstance(layer_index, int):
            raise ValueError(f"vision_feature_layer={layer_index!r}: vtprune supports a single feature layer (an int), "
                             "since tokens reduced in one layer would not line up with another's")
        layers = tower.encoder.layers
        depth = layer_index % (len(layers) + 1)
        if depth == 0:
            raise ValueError("vision_feature_layer selects the embeddings; there is no encoder layer to reduce in")
        return inner, layers, depth

    def inspect(self, model: nn.Module) -> Inspection:
        inner, layers, depth = self._check(model)
        notes = [f"feature layer {model.config.vision_feature_layer}: vision-site policies act over layers 0..{depth - 1}",
                 f"select strategy {model.config.vision_feature_select_strategy!r}",
                 "generate runs unchanged; forward returns logits over the shortened sequence"]
        if _is_anyres(inner):
            notes.append("LLaVA-NeXT: every crop is reduced on its own; reduced crops are packed in raster order "
                         "over the unpadded crop grid, without image_newline tokens (as FlowCut and VisionZip)")
        return Inspection(
            adapter=self.name, family=self.family, model_class=type(model).__name__,
            sites={"vision": tuple(f"model.vision_tower.encoder.layers.{i}" for i in range(depth)),
                   "projector": ("model.multi_modal_projector",)},
            signals=self.signals, protected=("cls",) if _has_cls(inner.vision_tower) else (), notes=tuple(notes))

    def patch(self, model: nn.Module, runtime: Runtime) -> Patch:
        inner, layers, depth = self._check(model)
        vision, projector = runtime.policies.get("vision"), runtime.policies.get("projector")
        tower = inner.vision_tower
        roles = ("cls",) if _has_cls(tower) else ()
        grid = (tower.config.image_size // tower.config.patch_size,) * 2
        patch = Patch()
        try:
            vision_needs = projections_for(vision.signals) if vision is not None else frozenset()
            projector_needs = projections_for(projector.signals) if projector is not None else frozenset()
            # A projector policy reading the feature layer's attention needs it to see the tokens that layer
            # outputs: the vision policy then stops one layer before the feature layer.
            vision_last = depth - 2 if projector_needs else depth - 1
            for index in range(depth):
                layer = layers[index]
                feature_layer = index == depth - 1
                reduces = vision is not None and index <= vision_last
                needs = (vision_needs if reduces else frozenset()) | (projector_needs if feature_layer else frozenset())
                taps = AttentionTaps(layer.self_attn, needs) if needs else None
                if taps is not None:
                    taps.install(patch, runtime)
                patch.override(layer, "forward", encoder_layer_forward(
                    layer, index, runtime, policy=vision if reduces else None, num_layers=len(layers), roles=roles,
                    taps=taps, on_output=_remember_feature_layer(layer) if feature_layer else None,
                    anyres=_is_anyres(inner), last_layer=vision_last))
            patch.override(inner.multi_modal_projector, "forward", _projector_forward(
                inner.multi_modal_projector, runtime, vision=vision, policy=projector, roles=roles, grid=grid,
                anyres=_is_anyres(inner)))
            if _is_anyres(inner):
                # with an llm-site policy, that policy makes the cut to the final count (FlowCut's stage 2)
                budgeted = vision if runtime.policies.get("llm") is None else None
                patch.override(inner, "pack_image_features", _pack_reduced(inner, runtime, grid, len(roles),
                                                                           budgeted))
            llm = runtime.policies.get("llm")
            site = None
            if llm is not None:
                site = LLMSite(inner.language_model, runtime, llm, getattr(llm, "position_mode", "compact"))
                site.patch(patch)
            config_layer = model.config.vision_feature_layer
            patch.override(inner, "get_image_features", runtime.entry(
                _checked_feature_layer(inner.get_image_features, config_layer), post=_tag_image_features))
            patch.override(model, "forward", runtime.entry(
                _language_forward(model, inner, runtime, config_layer, site),
                before=refuse_gradient_checkpointing(model)))
            if callable(getattr(model, "_expand_multimodal_outputs", None)):
                patch.override(model, "_expand_multimodal_outputs",
                               _expand_tagged(model._expand_multimodal_outputs, model.config.image_token_id))
        except BaseException:
            patch.undo()
            raise
        return patch


def _remember_feature_layer(layer: nn.Module):
    def on_output(state: TokenState, output: torch.Tensor, taken: dict) -> None:
        state.scratch["feature"] = (output, taken, layer.self_attn)
    return on_output


def _checked_feature_layer(function, config_layer: int):
    signature = inspect.signature(function)

    def call(*args: Any, **kwargs: Any) -> Any:
        layer = signature.bind_partial(*args, **kwargs).arguments.get("vision_feature_layer")
        if layer is not None and layer != config_layer:
            raise ValueError(f"vtprune patched this LLaVA for vision_feature_layer={config_layer} (its config); "
                             f"got vision_feature_layer={layer!r} at call time")
        return function(*args, **kwargs)

    call.__wrapped__ = function  # type: ignore[attr-defined]
    return call


def original_positions(state: TokenState, num_tokens: int, num_prefix: int) -> torch.Tensor:
    """``[B, N]`` the smallest original position inside each current token, counted from the first patch
    (a protected prefix token gets a negative position)."""
    assignment = state.assignment
    batch, num_original = assignment.shape
    index = torch.where(assignment < 0, torch.full_like(assignment, num_tokens), assignment)
    source = torch.arange(num_original, device=assignment.device).expand(batch, -1)
    smallest = torch.full((batch, num_tokens + 1), num_original, dtype=torch.long, device=assignment.device)
    smallest = smallest.scatter_reduce(1, index, source, reduce="amin")[:, :num_tokens]
    return smallest - num_prefix


def _projector_forward(module: nn.Module, runtime: Runtime, *, vision: Policy | None, policy: Policy | None,
                       roles: tuple[str, ...], grid: tuple[int, int], anyres: bool = False):
    """The projector's forward: reorder vision-site output to raster order, run the projector-site policy on
    the feature layer's tokens, hand the result (CLS dropped unless the host or the policy keeps it) to the
    projector, and note the counts per image for the language-model side."""
    original = forward_of(module)
    num_prefix = len(roles)

    def forward(features: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        state = runtime.active()
        if state is None:
            return original(features, *args, **kwargs)
        remembered = state.scratch.pop("feature", None)
        if remembered is None:
            raise RuntimeError("vtprune: the LLaVA projector ran without the vision tower's feature layer in the same "
                               "call; call the model (or get_image_features) rather than the projector alone")
        tokens, taken, attn = remembered
        if features.shape[-1] != tokens.shape[-1] or tokens.shape[1] - features.shape[1] not in (0, num_prefix):
            raise ValueError(f"the projector got features {tuple(features.shape)} that are not the feature layer's "
                             f"tokens {tuple(tokens.shape)} (with or without CLS)")
        host_keeps_prefix = tokens.shape[1] == features.shape[1]
        state.start(tokens)
        count = state.num_original - (0 if host_keeps_prefix else num_prefix)  # the host's placeholders per image
        if state.size is not None:  # merged or pruned in the vision tower: hand on in raster order
            positions = original_positions(state, tokens.shape[1], num_prefix)
            order = positions.argsort(dim=1, stable=True)
            if not bool((order == torch.arange(order.shape[1], device=order.device)).all()):
                tokens = state.apply(tokens, MergePlan.prune(order))
        if policy is not None:
            untouched = state.size is None and tokens.shape[1] - num_prefix == grid[0] * grid[1]
            tokens = reduce_at(policy, state, tokens, site="projector", layer=0, num_layers=1, roles=roles,
                               provide=lambda name: attention_signal(name, taken, attn),
                               grid=grid if untouched else None, where="pre", anyres=anyres)
        hand_prefix = host_keeps_prefix or getattr(policy, "hands_on_prefix", False)
        handed = tokens if hand_prefix else tokens[:, num_prefix:]
        if state.assignment is not None:
            positions = original_positions(state, tokens.shape[1], num_prefix)
            state.positions = positions if hand_prefix else positions[:, num_prefix:]
        state.scratch["image_tokens"] = ((count,) * features.shape[0], (handed.shape[1],) * features.shape[0])
        state.scratch["reduced"] = handed.shape[1] != count
        state.visual_tokens = (handed.shape[1],) * features.shape[0]
        return original(handed, *args, **kwargs)

    return forward


def _pack_reduced(inner: nn.Module, runtime: Runtime, grid: tuple[int, int], num_prefix: int,
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


def _tag_image_features(output: Any, state: TokenState) -> Any:
    """``post`` of ``get_image_features`` called on its own (``generate`` encodes images before prefill)."""
    counts = state.scratch.get("image_tokens")
    if counts is not None and output is not None and not isinstance(output, tuple):
        set_tag(output, ImageTokens(original=counts[0], kept=counts[1], state=state))
    return output


def _expand_tagged(original, placeholder: int):
    """``generate``'s expansion of encoded images for ``num_beams`` / ``num_return_sequences`` groups images
    per prompt by matching placeholder counts to feature lengths, which pruned features no longer match;
    for features vtprune encoded, group them by their original counts instead."""
    signature = inspect.signature(original)

    def expand(*args: Any, **kwargs: Any) -> Any:
        named = _named_arguments(signature, args, kwargs)
        encoded, input_ids, times = named.get("mm_encoder_output"), named.get("input_ids"), named.get("expand_size", 1)
        image = encoded.get("image") if isinstance(encoded, dict) else None
        tag = get_tag(image)
        if tag is None or input_ids is None or times == 1 or tag.original == tag.kept:
            return original(*args, **kwargs)
        order, start = [], 0
        for count in (input_ids == placeholder).sum(-1).tolist():
            end, total = start, 0
            while total < count and end < len(tag.original):
                total += tag.original[end]
                end += 1
            order.extend(list(range(start, end)) * times)
            start = end
        features = image.pooler_output
        expanded = [features[i] for i in order]
        image.pooler_output = torch.stack(expanded) if isinstance(features, torch.Tensor) else expanded
        set_tag(image, ImageTokens(original=tuple(tag.original[i] for i in order),
                                                   kept=tuple(tag.kept[i] for i in order), state=tag.state))
        return encoded

    expand.__wrapped__ = original  # type: ignore[attr-defined]
    return expand


def _language_forward(model: nn.Module, inner: nn.Module, runtime: Runtime, config_layer: int,
                      site: "LLMSite | None" = None):
    """The outermost forward: encode images with the policies, shorten the prompt to the visual tokens kept,
    run the language model (with the llm site's bookkeeping), and translate the decode steps that follow."""
    original = _with_llm_site(forward_of(model), model, runtime, site)
    signature = inspect.signature(original)
    layouts: "weakref.WeakKeyDictionary[Any, ShortenedLayout]" = weakref.WeakKeyDictionary()
    placeholder = model.config.image_token_id
    pad_id = getattr(model.config.text_config, "pad_token_id", None) or 0

    def forward(*args: Any, **kwargs: Any) -> Any:
        named = _named_arguments(signature, args, kwargs)
        layer = named.get("vision_feature_layer")
        if layer is not None and layer != config_layer:
            raise ValueError(f"vtprune patched this LLaVA for vision_feature_layer={config_layer} (its config); "
                             f"got vision_feature_layer={layer!r} at call time")
        state = runtime.active()
        encoded = named.get("mm_encoder_outputs") or {}
        counts = None
        if named.get("pixel_values") is not None and encoded.get("image") is None:
            extra = {"image_sizes": named["image_sizes"]} if named.get("image_sizes") is not None else {}
            image = inner.get_image_features(pixel_values=named["pixel_values"],
                                             vision_feature_layer=named.get("vision_feature_layer"),
                                             vision_feature_select_strategy=named.get("vision_feature_select_strategy"),
                                             return_dict=True, **extra)
            named["mm_encoder_outputs"] = {**encoded, "image": image}
            named["pixel_values"] = None
            counts = state.scratch.get("image_tokens")
        elif encoded.get("image") is not None:
            counts = _counts_of(encoded["image"], named.get("input_ids"), placeholder, state)
        cache = named.get("past_key_values")
        if counts is not None and counts[0] != counts[1]:
            return _prefill(original, named, counts, placeholder, pad_id, layouts)
        layout = _layout_of(layouts, cache)
        if layout is not None:
            _translate_decode(named, layout)
        return original(**named)

    forward.__wrapped__ = original  # type: ignore[attr-defined]
    return forward


def _with_llm_site(original, model: nn.Module, runtime: Runtime, site: "LLMSite | None"):
    """``original`` (the model's forward, called with keyword arguments) with the llm site's prefill
    bookkeeping around it: token roles before, the cache layout after, and the loss on the kept labels."""
    if site is None:
        return original
    placeholder = model.config.image_token_id

    def call(**named: Any) -> Any:
        state = runtime.active()
        cache = named.get("past_key_values")
        prefill = cache is None or not hasattr(cache, "get_seq_length") or cache.get_seq_length() == 0
        input_ids = named.get("input_ids")
        tokens = llm_tokens(input_ids, named.get("attention_mask"), placeholder) \
            if prefill and input_ids is not None and input_ids.shape[1] > 1 else None
        site.begin(state, tokens)
        labels = named.pop("labels", None) if tokens is not None else None
        output = original(**named)
        site.finish(state, getattr(output, "past_key_values", None))
        surgery = state.scratch.get("llm")
        if labels is not None:
            if surgery is not None and surgery.cut:
                labels = labels.gather(1, surgery.columns)
            output["loss"] = model.loss_function(logits=output.logits, labels=labels,
                                                 vocab_size=model.config.text_config.vocab_size)
        return output

    call.__wrapped__ = original  # type: ignore[attr-defined]
    return call


def _counts_of(image: Any, input_ids: torch.Tensor | None, placeholder: int,
               state: TokenState) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    tag = get_tag(image)
    if tag is not None:
        state.adopt(tag.state)
        return tag.original, tag.kept
    features = getattr(image, "pooler_output", None)
    if features is None or input_ids is None:
        return None
    kept = tuple(item.shape[0] for item in features)  # e.g. features expanded for num_return_sequences
    total = int((input_ids == placeholder).sum())
    if total == sum(kept) or not kept or total % len(kept):
        return None
    return (total // len(kept),) * len(kept), kept


def _layout_of(layouts: "weakref.WeakKeyDictionary", cache: Any) -> ShortenedLayout | None:
    if cache is None:
        return None
    try:
        return layouts.get(cache)
    except TypeError:  # not weak-referenceable: never registered
        return None


def _prefill(original, named: dict, counts, placeholder: int, pad_id: int, layouts) -> Any:
    input_ids = named.get("input_ids")
    if input_ids is None:
        raise ValueError("vtprune: with pruned visual tokens pass input_ids (not inputs_embeds), so the image "
                         "placeholders can be shortened to the tokens kept")
    cache = named.get("past_key_values")
    if cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0:
        raise NotImplementedError("vtprune: images in a call that continues a non-empty KV cache are not supported; "
                                  "start a new conversation (empty cache) with the image")
    mask = named.get("attention_mask")
    layout = shorten_layout(input_ids, placeholder, list(counts[0]), list(counts[1]), mask)
    named["input_ids"] = layout.take(input_ids, pad_id)
    if mask is not None or bool((layout.columns < 0).any()):
        mask = mask if mask is not None else torch.ones_like(input_ids)
        named["attention_mask"] = layout.take(mask, 0)
    if named.get("labels") is not None:
        named["labels"] = layout.take(named["labels"], -100)
    if named.get("position_ids") is not None or bool((layout.columns < 0).any()):
        short_mask = named.get("attention_mask")
        named["position_ids"] = positions_from_mask(short_mask) if short_mask is not None else None
    if named.get("cache_position") is not None:
        named["cache_position"] = torch.arange(layout.length, device=input_ids.device)
    output = original(**named)
    returned = getattr(output, "past_key_values", None)
    if returned is not None:
        try:
            layouts[returned] = layout
        except TypeError:
            pass
    return output


def _translate_decode(named: dict, layout: ShortenedLayout) -> None:
    """A call continuing a shortened cache: its inputs count the original columns; shift them."""
    mask = named.get("attention_mask")
    if mask is not None and mask.shape[1] >= layout.original_length:
        named["attention_mask"] = layout.mask_for_decode(mask)
    if named.get("position_ids") is not None:
        named["position_ids"] = named["position_ids"] - layout.removed.unsqueeze(1)
    if named.get("cache_position") is not None:
        named["cache_position"] = named["cache_position"] - (layout.original_length - layout.length)


def _named_arguments(signature: inspect.Signature, args: tuple, kwargs: dict) -> dict:
    bound = signature.bind(*args, **kwargs)
    named = {}
    for name, value in bound.arguments.items():
        if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        else:
            named[name] = value
    return named
