"""Adapter for Hugging Face ``transformers`` LLaVA-1.5 (``LlavaForConditionalGeneration``) and LLaVA-NeXT.

Found structurally per instance: ``model.model`` has ``vision_tower`` (a CLIP/SigLIP vision model, as the
``hf-clip-vision`` adapter matches), ``multi_modal_projector``, ``language_model`` and
``get_image_features``. LLaVA-NeXT (``LlavaNextForConditionalGeneration``) matches too and is recognised by its
``pack_image_features``: each crop is reduced on its own and the reduced crops are packed (docs/llava.md).

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
returns logits over the shortened sequence (``llava_prompt.py``). LLaVA-NeXT's reduced crops are packed by
``anyres.py``; the ``llm`` site (between decoder layers) is ``hf_llm.py``.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from vtprune.policy import Policy
from vtprune.reduction import MergePlan
from vtprune.state import Runtime, TokenState

from .anyres import pack_reduced
from .base import Inspection
from .hf_clip import AttentionTaps, _has_cls, _is_vision_tower, attention_signal, encoder_layer_forward, projections_for
from .hf_llm import LLMSite
from .llava_prompt import check_feature_layer, expand_tagged, language_forward, tag_image_features
from .patching import Patch, forward_of
from .reduction_point import reduce_at, refuse_gradient_checkpointing, refuse_unsupported_attention


def _parts(model: nn.Module) -> nn.Module | None:
    inner = getattr(model, "model", None)
    if inner is None or not all(hasattr(inner, name) for name in ("vision_tower", "multi_modal_projector",
                                                                     "language_model", "get_image_features")):
        return None
    return inner


def _is_anyres(inner: nn.Module) -> bool:
    """LLaVA-NeXT: crops of each image are encoded separately and packed (``pack_image_features``)."""
    return callable(getattr(inner, "pack_image_features", None))


_PARTS = ("vision_tower", "multi_modal_projector", "language_model")


def _parts_on_itself(model: nn.Module) -> bool:
    return _parts(model) is None and all(hasattr(model, name) for name in _PARTS)


def _old_layout(model: nn.Module) -> bool:
    """transformers < 4.52 kept the parts on the generation model itself (no ``model.model``), its language
    model a ``*ForCausalLM`` with the LM head."""
    return _parts_on_itself(model) and hasattr(model.language_model, "lm_head")


def _inner_model(model: nn.Module) -> bool:
    """transformers 5's inner ``LlavaModel`` / ``LlavaNextModel`` (``generation_model.model``): the parts on
    itself, a language model without the LM head."""
    return _parts_on_itself(model) and not hasattr(model.language_model, "lm_head")


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
        return _parts(model) is not None or (_parts_on_itself(model) and hasattr(model, "config"))

    def _check(self, model: nn.Module) -> tuple[nn.Module, nn.ModuleList, int]:
        if _inner_model(model):
            raise TypeError(f"{type(model).__name__} is the inner model of a LLaVA generation model; apply vtprune to "
                            "the generation model that holds it (LlavaForConditionalGeneration or "
                            "LlavaNextForConditionalGeneration, whose .model this is), so that generate() and the "
                            "language model's layers are patched together")
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
        # every layer up to the feature layer attends with log(size) once the vision policy merged, also the
        # feature layer when a projector policy makes the vision policy stop before it
        proportional = vision is not None and vision.proportional_attention()
        if proportional:
            refuse_unsupported_attention(tower.config, "the vision tower",
                                         f"{vision}'s proportional attention (log(size) added to the keys)")
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
                    anyres=_is_anyres(inner), last_layer=vision_last, proportional=proportional))
            patch.override(inner.multi_modal_projector, "forward", _projector_forward(
                inner.multi_modal_projector, runtime, policy=projector, roles=roles, grid=grid,
                anyres=_is_anyres(inner)))
            if _is_anyres(inner):
                # with an llm-site policy, that policy makes the cut to the final count (FlowCut's stage 2)
                budgeted = vision if runtime.policies.get("llm") is None else None
                patch.override(inner, "pack_image_features", pack_reduced(inner, runtime, grid, len(roles),
                                                                           budgeted))
            llm = runtime.policies.get("llm")
            site = None
            if llm is not None:
                site = LLMSite(inner.language_model, runtime, llm, getattr(llm, "position_mode", "compact"))
                site.patch(patch)
            config_layer = model.config.vision_feature_layer
            patch.override(inner, "get_image_features", runtime.entry(
                _checked_feature_layer(inner.get_image_features, config_layer), post=tag_image_features))
            patch.override(model, "forward", runtime.entry(
                language_forward(model, inner, runtime, config_layer, site),
                before=refuse_gradient_checkpointing(model)))
            if callable(getattr(model, "_expand_multimodal_outputs", None)):
                patch.override(model, "_expand_multimodal_outputs",
                               expand_tagged(model._expand_multimodal_outputs, model.config.image_token_id))
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
        check_feature_layer(signature.bind_partial(*args, **kwargs).arguments.get("vision_feature_layer"),
                            config_layer)
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


def _projector_forward(module: nn.Module, runtime: Runtime, *, policy: Policy | None,
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
