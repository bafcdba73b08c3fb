"""LLaVA's prompt side: encoded images tagged with their token counts, the outermost ``forward`` that
shortens the prompt to the visual tokens kept (and runs the llm site's bookkeeping), and the translation of
the decode steps that continue a shortened prompt's cache."""
from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vtprune.sequence import llm_tokens
from vtprune.state import Runtime, TokenState

from .hf_llm import LLMSite
from .patching import forward_of
from .sequence import CacheLayouts, ShortenedLayout, positions_from_mask, shorten_layout


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



def tag_image_features(output: Any, state: TokenState) -> Any:
    """``post`` of ``get_image_features`` called on its own (``generate`` encodes images before prefill)."""
    counts = state.scratch.get("image_tokens")
    if counts is not None and output is not None and not isinstance(output, tuple):
        set_tag(output, ImageTokens(original=counts[0], kept=counts[1], state=state))
    return output


def expand_tagged(original, placeholder: int):
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


def check_feature_layer(layer: Any, config_layer: int) -> None:
    """A call-time ``vision_feature_layer`` must be the config's, which the patch was built for."""
    if layer is not None and layer != config_layer:
        raise ValueError(f"vtprune patched this LLaVA for vision_feature_layer={config_layer} (its config); "
                         f"got vision_feature_layer={layer!r} at call time")


def language_forward(model: nn.Module, inner: nn.Module, runtime: Runtime, config_layer: int,
                      site: "LLMSite | None" = None):
    """The outermost forward: encode images with the policies, shorten the prompt to the visual tokens kept,
    run the language model (with the llm site's bookkeeping), and translate the decode steps that follow."""
    original = _with_llm_site(forward_of(model), model, runtime, site)
    signature = inspect.signature(original)
    layouts = CacheLayouts()
    placeholder = model.config.image_token_id
    pad_id = getattr(model.config.text_config, "pad_token_id", None) or 0

    def forward(*args: Any, **kwargs: Any) -> Any:
        named = _named_arguments(signature, args, kwargs)
        check_feature_layer(named.get("vision_feature_layer"), config_layer)
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
        layout = layouts.get(cache)
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


def _prefill(original, named: dict, counts, placeholder: int, pad_id: int, layouts: CacheLayouts) -> Any:
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
    layouts.remember(getattr(output, "past_key_values", None), layout)
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
