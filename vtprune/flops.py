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

import dataclasses
import json
from dataclasses import dataclass
from importlib import resources
from typing import Any, Iterable, Mapping, Sequence

from .policy import Policy
from .schedules import parse_schedule
from .trace import Trace

UNITS = ("MACs", "FLOPs")
SITES = ("vision", "projector", "llm", "lm_head", "overhead")
SITE_TITLES = {"vision": "vision encoder", "projector": "projector", "llm": "language model",
               "lm_head": "LM head", "overhead": "method overhead"}


class UnknownConfigError(ValueError):
    """``estimate`` got a config name that is neither shipped nor a timm model."""


# --- architectures ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Transformer:
    """The dimensions of a stack of identical pre-norm transformer layers.

    ``num_kv_heads`` defaults to ``num_heads`` (multi-head attention), ``head_dim`` to
    ``hidden_size // num_heads``. ``mlp_matrices``: 2 (fc1, fc2) or 3 (SwiGLU: gate, up, down), each
    ``hidden_size x intermediate_size``.
    """

    num_layers: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    mlp_matrices: int = 2
    num_kv_heads: int | None = None
    head_dim: int | None = None

    def __post_init__(self) -> None:
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        for name in ("num_layers", "hidden_size", "num_heads", "intermediate_size", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{type(self).__name__}.{name} must be a non-negative integer, got {value!r}")
        if self.mlp_matrices not in (2, 3):
            raise ValueError(f"mlp_matrices must be 2 (fc1/fc2) or 3 (SwiGLU), got {self.mlp_matrices!r}")

    @property
    def attention_width(self) -> int:
        return self.num_heads * self.head_dim  # type: ignore[operator]

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * self.head_dim  # type: ignore[operator]

    def projection_macs(self, queries: int, keys: int) -> int:
        """q and o projections at ``queries`` tokens; k and v at ``keys`` (new) tokens."""
        d = self.hidden_size
        return 2 * queries * d * self.attention_width + 2 * keys * d * self.kv_width

    def attention_macs(self, queries: int, keys: int, causal: bool = False) -> int:
        """``q·kᵀ`` and ``softmax·v`` over every query-key pair (over the unmasked ones when ``causal``;
        the queries are the last ``queries`` of the ``keys`` positions)."""
        if causal:
            pairs = queries * (keys - queries) + queries * (queries + 1) // 2
        else:
            pairs = queries * keys
        return 2 * pairs * self.attention_width

    def mlp_macs(self, tokens: int) -> int:
        return self.mlp_matrices * tokens * self.hidden_size * self.intermediate_size


@dataclass(frozen=True)
class LanguageModel(Transformer):
    """A decoder-only language model: a :class:`Transformer` and its vocabulary (for the LM head)."""

    vocab_size: int = 0


@dataclass(frozen=True)
class VisionTower:
    """A ViT: patch embedding, ``blocks``, and an optional head on the pooled token.

    ``head``: ``(in, out)`` linear layers applied to one pooled token per image (a classifier, CLIP's
    projection). ``attention_pool``: a latent-query attention pool (SigLIP's MAP head, timm
    ``global_pool='map'``) given as a one-layer :class:`Transformer`: its k/v projections run over all
    tokens, its query, output projection and MLP over the one latent.
    """

    blocks: Transformer
    image_size: int | tuple[int, int]
    patch_size: int | tuple[int, int]
    in_chans: int = 3
    num_prefix_tokens: int = 1
    head: tuple[tuple[int, int], ...] = ()
    attention_pool: Transformer | None = None

    @property
    def grid(self) -> tuple[int, int]:
        image = _pair(self.image_size)
        patch = _pair(self.patch_size)
        return image[0] // patch[0], image[1] // patch[1]

    @property
    def num_patches(self) -> int:
        rows, cols = self.grid
        return rows * cols

    @property
    def num_tokens(self) -> int:
        return self.num_patches + self.num_prefix_tokens

    def patch_embed_macs(self) -> int:
        patch = _pair(self.patch_size)
        return self.num_patches * self.in_chans * patch[0] * patch[1] * self.blocks.hidden_size

    def head_macs(self, tokens: int) -> int:
        """The head on the final ``tokens`` tokens of one image."""
        macs = sum(fan_in * fan_out for fan_in, fan_out in self.head)
        pool = self.attention_pool
        if pool is not None:
            macs += pool.projection_macs(1, tokens) + pool.attention_macs(1, tokens) + pool.mlp_macs(1)
        return macs


@dataclass(frozen=True)
class Architecture:
    """What :func:`estimate` costs: a vision tower, a projector and a language model (any may be absent).

    ``views``: images the vision tower encodes per sample (LLaVA-NeXT's anyres: the base image and its
    tiles). ``feature_layer``: the index into the tower's ``hidden_states`` that goes to the projector
    (0 = embeddings, k = output of layer k - 1; LLaVA: -2, the second to last layer's output; all
    layers still run and are counted). ``drop_prefix``: the projector gets the patch tokens only
    (LLaVA's ``"default"`` feature strategy drops CLS). ``visual_tokens``: visual tokens entering the
    language model when no schedule says otherwise (LLaVA-NeXT: the nominal 2880).
    """

    name: str
    title: str = ""
    vision: VisionTower | None = None
    projector: tuple[tuple[int, int], ...] = ()
    llm: LanguageModel | None = None
    views: int = 1
    feature_layer: int = -1
    drop_prefix: bool = True
    visual_tokens: int | None = None
    sources: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.vision is None and self.llm is None:
            raise ValueError(f"architecture {self.name!r} has neither a vision tower nor a language model")

    @property
    def primary_site(self) -> str:
        """The site a plain list schedule refers to: the language model if there is one."""
        return "llm" if self.llm is not None else "vision"

    def visual_tokens_per_view(self, vision_pairs: Sequence[tuple[int, int]] | None = None) -> int:
        """Tokens leaving the feature layer of one view, minus the prefix when it is dropped."""
        vision = self.vision
        if vision is None:
            raise ValueError(f"{self.name} has no vision tower")
        tokens = vision.num_tokens
        if vision_pairs:
            # hidden_states[k]: 0 = the embeddings, k = the output of layer k - 1; negative k from the end
            index = self.feature_layer if self.feature_layer >= 0 else len(vision_pairs) + 1 + self.feature_layer
            if not 0 <= index <= len(vision_pairs):
                raise ValueError(f"feature_layer {self.feature_layer} is outside a {len(vision_pairs)}-layer tower")
            if index > 0:
                tokens = vision_pairs[index - 1][1]
        return tokens - (vision.num_prefix_tokens if self.drop_prefix else 0)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Architecture":
        """From the JSON layout of ``vtprune/configs/*.json``."""
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown keys {unknown} in config {data.get('name')!r}; known: {sorted(known)}")
        vision = data.get("vision")
        if vision is not None:
            vision = dict(vision)
            tower_keys = ("image_size", "patch_size", "in_chans", "num_prefix_tokens", "head", "attention_pool")
            tower = {key: vision.pop(key) for key in tower_keys if key in vision}
            tower["head"] = tuple(tuple(layer) for layer in tower.get("head", ()))
            if tower.get("attention_pool") is not None:
                tower["attention_pool"] = Transformer(**tower["attention_pool"])
            data["vision"] = VisionTower(blocks=Transformer(**vision), **tower)
        if data.get("llm") is not None:
            data["llm"] = LanguageModel(**data["llm"])
        data["projector"] = tuple(tuple(layer) for layer in data.get("projector", ()))
        data["sources"] = tuple(data.get("sources", ()))
        return cls(**data)


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    first, second = value
    return int(first), int(second)


# --- shipped configs --------------------------------------------------------------------------------

def _normalise_name(name: str) -> str:
    return name.strip().lower().replace("_", "-").replace("/", "-").replace(" ", "-")


def configs() -> dict[str, str]:
    """The shipped configs, ``{name: title}``, sorted by name."""
    folder = resources.files("vtprune") / "configs"
    found = {}
    for entry in folder.iterdir():
        if entry.name.endswith(".json"):
            data = json.loads(entry.read_text(encoding="utf-8"))
            found[data["name"]] = data.get("title", "")
    return dict(sorted(found.items()))


def load_config(name: str) -> Architecture:
    """A shipped config by name (``"llava-1.5-7b"``; case, ``_`` and ``/`` are forgiven: ``"ViT-B/16"``)."""
    key = _normalise_name(name)
    entry = resources.files("vtprune") / "configs" / f"{key}.json"
    if not entry.is_file():
        raise UnknownConfigError(f"no shipped config named {name!r}; shipped: {', '.join(configs())}")
    return Architecture.from_dict(json.loads(entry.read_text(encoding="utf-8")))


def architecture(config: Any) -> Architecture:
    """Turn what :func:`estimate` accepts into an :class:`Architecture`.

    ``config``: an :class:`Architecture`; a shipped config name; a timm model name (built with
    ``pretrained=False`` on the meta device: no weights, no memory); a timm ``VisionTransformer``; an
    open_clip ``VisionTransformer`` (``clip.visual``); a Hugging Face config (``LlavaConfig``, ``LlavaNextConfig``, ``CLIPVisionConfig``,
    ``SiglipVisionConfig``, a Llama-family text config); or a Hugging Face model (its ``config``).
    """
    if isinstance(config, Architecture):
        return config
    if isinstance(config, str):
        try:
            return load_config(config)
        except UnknownConfigError:
            pass
        return _from_timm_name(config)
    if _is_timm_vit(config):
        return Architecture(name=type(config).__name__, title=f"timm {type(config).__name__} instance",
                            vision=_vision_from_timm(config))
    if _is_open_clip_vit(config):
        return Architecture(name=type(config).__name__, title=f"open_clip {type(config).__name__} instance",
                            vision=_vision_from_open_clip(config))
    hf_config = getattr(config, "config", None)
    if hf_config is not None and hasattr(hf_config, "model_type"):
        return _from_hf_config(hf_config)
    if hasattr(config, "model_type"):
        return _from_hf_config(config)
    raise TypeError(f"cannot read an architecture from {type(config).__name__}; pass a shipped config name "
                    f"({', '.join(configs())}), a timm model name, a timm or open_clip VisionTransformer, or a "
                    "Hugging Face config or model")


def _from_timm_name(name: str) -> Architecture:
    import timm
    import torch

    if not timm.is_model(name):
        raise UnknownConfigError(
            f"unknown config {name!r}: not a shipped config ({', '.join(configs())}) and not a timm model name "
            "(see timm.list_models('vit_*'))")
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    if not _is_timm_vit(model):
        raise ValueError(f"timm model {name!r} is a {type(model).__name__}; vtprune.flops reads timm "
                         "VisionTransformer-style models (patch_embed, blocks with attn.qkv and an MLP)")
    return Architecture(name=name, title=f"timm {name} (architecture read on the meta device)",
                        vision=_vision_from_timm(model))


def _is_timm_vit(model: Any) -> bool:
    return all(hasattr(model, attribute) for attribute in ("patch_embed", "blocks", "embed_dim", "num_prefix_tokens"))


def _linears(module: Any) -> list[Any]:
    from torch import nn

    return [child for child in module.modules() if isinstance(child, nn.Linear)]


def _vision_from_timm(model: Any) -> VisionTower:
    block = model.blocks[0]
    attn, mlp = block.attn, block.mlp
    qkv, proj = getattr(attn, "qkv", None), getattr(attn, "proj", None)
    if qkv is None or proj is None:
        raise ValueError(f"vtprune.flops reads timm attention with qkv and proj linears; "
                         f"{type(attn).__name__} has none")
    dim = model.embed_dim
    num_heads = attn.num_heads
    head_dim = qkv.out_features // (3 * num_heads)
    linears = _linears(mlp)
    mlp_macs = sum(layer.in_features * layer.out_features for layer in linears)
    fc2 = getattr(mlp, "fc2", None)
    hidden = fc2.in_features if fc2 is not None else max(layer.out_features for layer in linears)
    matrices = round(mlp_macs / (dim * hidden))
    if matrices not in (2, 3) or matrices * dim * hidden != mlp_macs:
        raise ValueError(f"unsupported timm MLP layout {type(mlp).__name__} (linears "
                         f"{[(layer.in_features, layer.out_features) for layer in linears]})")
    blocks = Transformer(num_layers=len(model.blocks), hidden_size=dim, num_heads=num_heads,
                         intermediate_size=hidden, mlp_matrices=matrices, head_dim=head_dim)
    conv = model.patch_embed.proj
    head = []  # every linear outside the blocks, patch embedding and attention pool: pre-logits, head(s)
    for name, part in model.named_children():
        if name not in ("blocks", "patch_embed", "attn_pool"):
            head += [(layer.in_features, layer.out_features) for layer in _linears(part)]
    pool = None
    attn_pool = getattr(model, "attn_pool", None)
    if attn_pool is not None:
        if getattr(attn_pool, "latent_len", 1) != 1:
            raise ValueError(f"vtprune.flops costs attention pools with one latent query, not {attn_pool.latent_len}")
        pool_linears = _linears(attn_pool.mlp)
        pool = Transformer(num_layers=1, hidden_size=attn_pool.q.in_features, num_heads=attn_pool.num_heads,
                           intermediate_size=pool_linears[0].out_features, mlp_matrices=len(pool_linears),
                           head_dim=attn_pool.head_dim)
    return VisionTower(blocks=blocks, image_size=tuple(model.patch_embed.img_size),
                       patch_size=tuple(conv.kernel_size), in_chans=conv.in_channels,
                       num_prefix_tokens=model.num_prefix_tokens, head=tuple(head), attention_pool=pool)


def _is_open_clip_vit(model: Any) -> bool:
    transformer = getattr(model, "transformer", None)
    return hasattr(model, "conv1") and hasattr(model, "class_embedding") and hasattr(transformer, "resblocks")


def _vision_from_open_clip(model: Any) -> VisionTower:
    """An open_clip ``VisionTransformer`` (``clip.visual``): patch convolution, CLS, ``ResidualAttentionBlock``
    layers (``nn.MultiheadAttention``, ``c_fc``/``c_proj`` MLP) and the output projection ``proj``."""
    if getattr(model, "attn_pool", None) is not None:
        raise ValueError("vtprune.flops does not cost open_clip attentional poolers (CoCa); the plain CLS/average "
                         "towers are supported")
    blocks = model.transformer.resblocks
    attn, mlp = blocks[0].attn, blocks[0].mlp
    width = attn.embed_dim
    tower = Transformer(num_layers=len(blocks), hidden_size=width, num_heads=attn.num_heads,
                        intermediate_size=mlp.c_fc.out_features)
    conv = model.conv1
    proj = getattr(model, "proj", None)
    head = ((proj.shape[0], proj.shape[1]),) if proj is not None else ()
    return VisionTower(blocks=tower, image_size=tuple(model.image_size), patch_size=tuple(conv.kernel_size),
                       in_chans=conv.in_channels, num_prefix_tokens=1, head=head)


_TWO_MATRIX_MLPS = {"gpt2", "gpt_neox", "opt", "phi", "bloom", "falcon", "gptj", "starcoder2"}


def _llm_from_hf(config: Any) -> LanguageModel:
    heads = config.num_attention_heads
    return LanguageModel(
        num_layers=config.num_hidden_layers, hidden_size=config.hidden_size, num_heads=heads,
        intermediate_size=config.intermediate_size,
        mlp_matrices=2 if config.model_type in _TWO_MATRIX_MLPS else 3,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        vocab_size=config.vocab_size)


def _vision_from_hf(config: Any) -> VisionTower:
    model_type = config.model_type
    if model_type not in ("clip_vision_model", "siglip_vision_model"):
        raise ValueError(f"vtprune.flops reads CLIP and SigLIP vision configs, not {model_type!r}")
    blocks = Transformer(num_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
                         num_heads=config.num_attention_heads, intermediate_size=config.intermediate_size)
    siglip = model_type == "siglip_vision_model"
    pool = None
    if siglip and getattr(config, "vision_use_head", True):
        pool = dataclasses.replace(blocks, num_layers=1)
    return VisionTower(blocks=blocks, image_size=config.image_size, patch_size=config.patch_size,
                       in_chans=config.num_channels, num_prefix_tokens=0 if siglip else 1, attention_pool=pool)


def _from_hf_config(config: Any) -> Architecture:
    model_type = config.model_type
    name = getattr(config, "_name_or_path", "") or model_type
    if model_type in ("llava", "llava_next"):
        vision = _vision_from_hf(config.vision_config)
        llm = _llm_from_hf(config.text_config)
        layers = config.vision_feature_layer
        layers = [layers] if isinstance(layers, int) else list(layers)  # several: concatenated features
        fan_in = vision.blocks.hidden_size * len(layers)
        projector = ((fan_in, llm.hidden_size), (llm.hidden_size, llm.hidden_size))
        drop = config.vision_feature_select_strategy == "default"
        views = 1
        if model_type == "llava_next":
            size = _pair(config.vision_config.image_size)
            views = 1 + max((h // size[0]) * (w // size[1]) for h, w in config.image_grid_pinpoints)
        per_view = vision.num_patches + (0 if drop else vision.num_prefix_tokens)
        return Architecture(name=name, title=f"Hugging Face {type(config).__name__}", vision=vision,
                            projector=projector, llm=llm, views=views, feature_layer=layers[-1], drop_prefix=drop,
                            visual_tokens=views * per_view)
    if model_type in ("clip_vision_model", "siglip_vision_model"):
        return Architecture(name=name, title=f"Hugging Face {type(config).__name__}", vision=_vision_from_hf(config))
    if model_type in ("clip", "siglip"):  # a dual encoder: its image tower
        return Architecture(name=name, title=f"the vision tower of Hugging Face {type(config).__name__}",
                            vision=_vision_from_hf(config.vision_config))
    if hasattr(config, "num_hidden_layers") and hasattr(config, "intermediate_size") and hasattr(config, "vocab_size"):
        return Architecture(name=name, title=f"Hugging Face {type(config).__name__}", llm=_llm_from_hf(config))
    raise ValueError(f"vtprune.flops reads LLaVA, LLaVA-NeXT, CLIP/SigLIP vision and decoder-only text configs, "
                     f"not {type(config).__name__} ({model_type!r})")


# --- conventions ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Convention:
    """What a count includes. Build one with :func:`resolve_convention` (a preset plus overriding switches).

    unit: ``"MACs"`` or ``"FLOPs"`` (= 2 x MACs).
    prompt_tokens: text tokens in the language model's prefill besides the visual tokens (0: visual only).
    vision: count the vision encoder's blocks; ``None``: only when there is no language model.
    patch_embed, vision_head: the patch embedding; the head of the vision tower (classifier, projection,
        attention pool); both only where the vision encoder is counted.
    projector, llm, lm_head: the projector, the decoder layers, the LM head.
    lm_head_tokens: ``"last"`` (generation asks for the last position's logits only) or ``"all"``
        (a plain forward computes logits at every position).
    overhead: the policy's own matrix products (:meth:`vtprune.Policy.matching_macs`).
    decode: count decode steps (with a KV cache: one new token per step); ``decode_steps`` of them
        are added to the total, and the first step's cost is reported per generated token.
    causal_halving: count only the unmasked half of causal attention (what flash kernels compute).
    mlp_tokens: ``"out"`` counts an MLP at the tokens it really sees (after a merge inside the block);
        ``"in"`` at the tokens entering the block, as PiToMe's own counter does.
    """

    name: str
    unit: str
    prompt_tokens: int = 0
    vision: bool | None = None
    patch_embed: bool = False
    vision_head: bool = False
    projector: bool = False
    llm: bool = True
    lm_head: bool = False
    lm_head_tokens: str = "last"
    overhead: bool = False
    decode: bool = False
    decode_steps: int = 0
    causal_halving: bool = False
    mlp_tokens: str = "out"

    @property
    def factor(self) -> int:
        return 2 if self.unit == "FLOPs" else 1

    def switches(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "name"}

    def describe(self, has_llm: bool = True) -> str:
        """One line: what this convention counts."""
        vision = self.vision if self.vision is not None else not has_llm
        parts = [self.unit + (" (1 MAC = 2 FLOPs)" if self.unit == "FLOPs" else " (multiply-accumulates)")]
        if has_llm:
            parts.append("visual tokens only" if self.prompt_tokens == 0 else
                         f"visual + {self.prompt_tokens} text prompt tokens")
        counted = []
        if vision:
            extras = [name for name, on in (("patch embedding", self.patch_embed), ("head", self.vision_head)) if on]
            counted.append("vision encoder (" + (" + ".join(["blocks"] + extras) if extras else "blocks only") + ")")
        if has_llm:
            head = f"LM head ({'last position' if self.lm_head_tokens == 'last' else 'all positions'})"
            counted += [name for name, on in (("projector", self.projector), ("LLM decoder layers", self.llm),
                                              (head, self.lm_head)) if on]
        if self.overhead:
            counted.append("method overhead")
        parts.append("counts " + ", ".join(counted) if counted else "counts nothing")
        if has_llm:
            parts.append(f"prefill + decode ({self.decode_steps} steps; per-token cost reported)" if self.decode
                         else "prefill only")
            parts.append("causal attention halved" if self.causal_halving else "full attention matrices")
        if self.mlp_tokens == "in":
            parts.append("MLP at the tokens entering each block")
        return "; ".join(parts)


PRESETS: dict[str, Convention] = {
    "paper": Convention(name="paper", unit="MACs"),
    "full": Convention(name="full", unit="FLOPs", prompt_tokens=64, vision=True, patch_embed=True, vision_head=True,
                       projector=True, llm=True, lm_head=True, overhead=True, decode=True),
}
"""``paper``: MACs, the transformer layers only (the language model's decoder layers over the visual
tokens for a VLM, the vision blocks for a vision-only model), prefill only, SwiGLU's 3 matrices: the
convention of FastV, PDrop, TransPrune, ToMe and PiToMe. ``full``: FLOPs of everything a forward
multiplies: vision encoder with patch embedding and head, projector, decoder layers over visual and
64 text prompt tokens (a typical LLaVA-1.5 VQA prompt: the ~35-token system prompt and a short
question; set ``prompt_tokens`` to yours), the LM head at the last position, the method's overhead,
and decode reported per generated token."""


def resolve_convention(name: str | Convention = "paper", **switches: Any) -> Convention:
    """A preset (``"paper"``, ``"full"``) with individual switches overridden.

    The result's name is the preset's when nothing changes, else ``"paper+mlp_tokens=in"`` etc.
    Unknown switches and bad values raise ``ValueError`` naming what is accepted.
    """
    if isinstance(name, Convention):
        base = name
    else:
        key = str(name).strip().lower()
        if key not in PRESETS:
            raise ValueError(f"unknown convention {name!r}; presets: {', '.join(PRESETS)}")
        base = PRESETS[key]
    accepted = [f.name for f in dataclasses.fields(Convention) if f.name != "name"]
    unknown = sorted(set(switches) - set(accepted))
    if unknown:
        raise ValueError(f"unknown switch(es) {unknown}; accepted: {', '.join(accepted)}")
    result = dataclasses.replace(base, **switches)
    _check_convention(result)
    changed = [f"{key}={value}" for key, value in switches.items() if getattr(base, key) != value]
    if changed:
        result = dataclasses.replace(result, name=base.name.split("+")[0] + "+" + ",".join(changed))
    return result


def _check_convention(conv: Convention) -> None:
    if conv.unit not in UNITS:
        raise ValueError(f"unit must be one of {UNITS}, got {conv.unit!r}")
    for key in ("prompt_tokens", "decode_steps"):
        value = getattr(conv, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{key} must be an integer >= 0, got {value!r}")
    for key in ("patch_embed", "vision_head", "projector", "llm", "lm_head", "overhead", "decode", "causal_halving"):
        if not isinstance(getattr(conv, key), bool):
            raise ValueError(f"{key} must be true or false, got {getattr(conv, key)!r}")
    if conv.vision not in (None, True, False):
        raise ValueError(f"vision must be true, false or None (only without a language model), got {conv.vision!r}")
    if conv.lm_head_tokens not in ("last", "all"):
        raise ValueError(f"lm_head_tokens must be 'last' or 'all', got {conv.lm_head_tokens!r}")
    if conv.mlp_tokens not in ("out", "in"):
        raise ValueError(f"mlp_tokens must be 'out' (tokens the MLP sees) or 'in' (tokens entering the block), "
                         f"got {conv.mlp_tokens!r}")


# --- the cost object -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LayerCost:
    """One transformer layer of the prefill, in the convention's unit (per sample; summed over views).

    ``tokens_in``: tokens the attention ran on; ``tokens_out``: tokens the MLP ran on (both include the
    text prompt tokens where the convention counts them). ``overhead``: the policy's matching.
    """

    site: str
    layer: int
    tokens_in: int
    tokens_out: int
    projections: int
    attention: int
    mlp: int
    overhead: int = 0

    @property
    def total(self) -> int:
        return self.projections + self.attention + self.mlp + self.overhead


@dataclass(frozen=True)
class Cost:
    """The analytic cost of one forward of one sample (one image, or one image + prompt for a VLM).

    ``total``: prefill plus ``decode``, in ``unit`` (``"MACs"`` or ``"FLOPs"``) under ``convention``
    (``switches`` spells it out). ``by_site``: the prefill per site (``vision``, ``projector``,
    ``llm``, ``lm_head``, ``overhead``; ``None`` where the convention does not count the site);
    ``parts``: finer (``vision.patch_embed``, ``vision.blocks``, ``vision.head``, ...); ``layers``: per
    transformer layer; ``decode``: the decode steps' total and ``decode_per_token`` the first step's
    cost (``None`` when decode is not counted); ``schedule``: tokens per layer and site as
    ``(attention, mlp)`` pairs (visual tokens for the language model); ``visual_tokens``: visual tokens
    entering the language model; ``policies``: their spec strings; ``notes``: caveats of this count;
    ``present``: the sites the model has (a table shows the others as absent rather than not counted).
    """

    config: str
    convention: str
    unit: str
    prefill: int
    by_site: dict[str, int | None]
    parts: dict[str, int]
    layers: tuple[LayerCost, ...]
    schedule: dict[str, tuple[tuple[int, int], ...]]
    switches: dict[str, Any]
    description: str
    decode: int = 0
    decode_per_token: int | None = None
    visual_tokens: int | None = None
    policies: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    present: tuple[str, ...] = SITES

    @property
    def total(self) -> int:
        return self.prefill + self.decode

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["total"] = self.total
        data["schedule"] = {site: [list(pair) for pair in pairs] for site, pairs in self.schedule.items()}
        data["layers"] = [{**dataclasses.asdict(layer), "total": layer.total} for layer in self.layers]
        data["policies"] = list(self.policies)
        data["notes"] = list(self.notes)
        return data

    def format(self, value: int | None) -> str:
        """``value`` in this cost's unit, scaled: ``"3.817 TMACs"``."""
        return format_count(value, self.unit)

    def table(self, per_layer: bool = False) -> str:
        """A Markdown table of this cost (see :func:`table`)."""
        return table(self, per_layer=per_layer)

    def __str__(self) -> str:
        return (f"{self.config}: {self.format(self.total)} [{self.convention}: {self.description}]\n"
                + self.table())


def format_count(value: int | float | None, unit: str) -> str:
    """``3.817e12, "MACs"`` -> ``"3.817 TMACs"`` (4 significant digits, trailing zeros kept: ``"5.800"``)."""
    if value is None:
        return "not counted"
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:#.4g}".rstrip(".") + f" {prefix}{unit}"
    if value == int(value):
        return f"{int(value)} {unit}"
    return f"{value:#.4g}".rstrip(".") + f" {unit}"


def table(*costs: Cost, per_layer: bool = False) -> str:
    """A Markdown table with one column per cost (e.g. the same model under ``paper`` and ``full``).

    Every cell carries its unit; the header names each column's convention, and a line under the
    table says what each convention counts. ``per_layer`` adds one row per layer.
    """
    if not costs:
        raise ValueError("table() needs at least one Cost")
    header = "| part | " + " | ".join(f"{cost.config} [{cost.convention}]" for cost in costs) + " |"
    lines = [header, "|---|" + "---:|" * len(costs)]

    def row(label: str, values: Iterable[str]) -> None:
        lines.append(f"| {label} | " + " | ".join(values) + " |")

    first = costs[0]
    for site in SITES:
        label = SITE_TITLES[site]
        if site == "llm" and any(cost.schedule.get("llm") for cost in costs):
            label += f" ({len(first.schedule.get('llm', ()))} layers)"
        if site == "vision" and any(cost.schedule.get("vision") for cost in costs):
            label += f" ({len(first.schedule.get('vision', ()))} blocks)"
        if not any(site in cost.present for cost in costs):
            continue
        row(label, (cost.format(cost.by_site.get(site)) for cost in costs))
    has_decode = any(cost.decode_per_token is not None for cost in costs)
    if has_decode:
        row("**prefill**", (f"**{cost.format(cost.prefill)}**" for cost in costs))
        row("decode, per generated token", (cost.format(cost.decode_per_token) for cost in costs))
        row("decode, all steps", (f"{cost.format(cost.decode)} ({cost.switches['decode_steps']} steps)"
                                  if cost.decode_per_token is not None else "not counted" for cost in costs))
    row("**total**", (f"**{cost.format(cost.total)}**" for cost in costs))
    if per_layer:
        for site in ("vision", "llm"):
            count = max(len([layer for layer in cost.layers if layer.site == site]) for cost in costs)
            for index in range(count):
                values = []
                for cost in costs:
                    match = [layer for layer in cost.layers if layer.site == site and layer.layer == index]
                    values.append(f"{cost.format(match[0].total)} ({match[0].tokens_in}->{match[0].tokens_out} "
                                  "tokens)" if match else "not counted")
                row(f"{site} layer {index}", values)
    lines.append("")
    for cost in costs:
        lines.append(f"- {cost.config} [{cost.convention}]: {cost.description}.")
        lines.extend(f"  {note}" for note in cost.notes)
    return "\n".join(lines)


# --- schedules ------------------------------------------------------------------------------------------

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
    from .registry import make_policies

    return make_policies(policy)


def _handed_on(arch: Architecture, policy: Policy) -> int | None:
    """Visual tokens per sample the policy hands a VLM's language model, if it fixes that count."""
    if arch.vision is None or arch.llm is None:
        return None
    tower = arch.vision
    per_view = policy.handed_on(tower.num_patches, tower.num_prefix_tokens, arch.drop_prefix, anyres=arch.views > 1)
    return None if per_view is None else arch.views * per_view


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
    for site, value in given.items():
        if site not in ("vision", "llm"):
            raise ValueError(f"schedules are given for the sites 'vision' and 'llm', not {site!r}")
        if not layers[site]:
            raise ValueError(f"a {site} schedule was given but {arch.name} has no "
                             f"{'vision tower' if site == 'vision' else 'language model'}")
        result[site] = _as_pairs(value, layers[site], site)
    for policy in sorted(policies, key=lambda item: ("vision", "projector", "llm").index(item.site)
                         if item.site in ("vision", "projector", "llm") else 3):
        site = policy.site
        if site == "projector" and (visual_tokens is not None or "llm" in result):
            continue  # the visual tokens it keeps are given
        handed = _handed_on(arch, policy)
        if site == "projector" and handed is not None:
            result["llm"] = [(handed, handed)] * layers["llm"]
            continue
        if site == "vision" and handed is not None and layers["llm"] and site not in result and \
                type(policy).token_schedule is Policy.token_schedule:
            # counts inside the tower depend on the input: the tower is costed unreduced (an upper bound)
            if notes is not None:
                notes.append(f"{policy}: its per-layer counts inside the vision tower depend on the input; the "
                             "tower is costed without them (an upper bound). Cost a trace for the exact count: "
                             "estimate(model, schedule=handle.trace, policy=policy).")
            if "llm" not in result and visual_tokens is None:
                result["llm"] = [(handed, handed)] * layers["llm"]
            continue
        if site == "projector":
            raise ValueError(f"policy {policy}: costing projector-site policies needs the visual tokens they keep; "
                             "pass schedule={'llm': [...]} with the counts the language model sees")
        if site not in layers or not layers[site]:
            raise ValueError(f"policy {policy} acts at site {site!r}, which {arch.name} does not have")
        if site in result:
            continue  # the given schedule (e.g. a trace) wins; the policy only adds its overhead
        if site == "vision":
            tower = arch.vision
            result[site] = policy.token_schedule(tower.num_tokens, tower.blocks.num_layers, tower.num_prefix_tokens)
        else:
            result[site] = policy.token_schedule(_default_visual_tokens(arch, result, visual_tokens), layers["llm"], 0)
    if arch.vision and "vision" not in result:
        result["vision"] = [(arch.vision.num_tokens, arch.vision.num_tokens)] * layers["vision"]
    return result


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


# --- the estimate ----------------------------------------------------------------------------------------

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
        views = arch.views
        blocks = tower.blocks
        dims = {"keys": blocks.head_dim, "hidden": blocks.hidden_size}
        vision_policy = by_policy_site.get("vision")
        block_total = 0
        for index, (attn_tokens, mlp_out) in enumerate(sched["vision"]):
            mlp_tokens = attn_tokens if conv.mlp_tokens == "in" else mlp_out
            overhead = 0
            if conv.overhead and vision_policy is not None and _reduces(sched["vision"], index):
                overhead = vision_policy.matching_macs(attn_tokens, tower.num_prefix_tokens, dims)
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
        if handed_on is not None and isinstance(schedule, Trace) and schedule.positions:
            projector_tokens = arch.views * len(schedule.positions[0])  # per crop, before any packing
        elif tower is None:
            projector_tokens = sched["llm"][0][0]
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
                    overhead = llm_policy.matching_macs(attn_visual, 0, dims)
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


# --- measured ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Measured:
    """FLOPs counted by ``torch.utils.flop_counter.FlopCounterMode`` during one forward (whole batch).

    ``by_module``: FLOPs per top-level module (HF models: the base model's children, e.g.
    ``model.vision_tower``, ``model.multi_modal_projector``, ``model.language_model``, and ``lm_head``;
    a wrapper holding everything is opened up). ``by_site``: the same grouped as ``vision``,
    ``projector``, ``llm``, ``lm_head`` where the module names say so (empty if they do not).
    ``by_operator``: FLOPs per aten operator. ``batch_size``: the leading dimension of the first tensor
    input; ``per_sample`` = ``total / batch_size``.
    """

    total: int
    by_module: dict[str, int]
    by_site: dict[str, int]
    by_operator: dict[str, int]
    batch_size: int
    unit: str = "FLOPs"

    @property
    def per_sample(self) -> float:
        return self.total / self.batch_size

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "per_sample": self.per_sample}

    def __str__(self) -> str:
        lines = [f"measured (FlopCounterMode, matrix products only): {format_count(self.total, self.unit)} for a "
                 f"batch of {self.batch_size} ({format_count(self.per_sample, self.unit)} per sample)",
                 "| module | FLOPs |", "|---|---:|"]
        lines += [f"| {name} | {format_count(value, self.unit)} |" for name, value in self.by_module.items()]
        return "\n".join(lines)


_SITE_MODULES = (("vision", ("vision_tower", "vision_model", "visual", "embeddings", "encoder", "head")),
                 ("projector", ("multi_modal_projector", "mm_projector", "projector")),
                 ("llm", ("language_model",)),
                 ("lm_head", ("lm_head",)))


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args: Any, out_shape=None, **kwargs: Any) -> int:
    """FLOPs of ``_scaled_dot_product_flash_attention_for_cpu`` (missing from FlopCounterMode's registry in
    torch <= 2.14): ``q·kᵀ`` and ``softmax·v`` for every query head (grouped-query keys broadcast)."""
    batch, heads, queries, head_dim = query_shape
    keys, value_dim = key_shape[-2], value_shape[-1]
    return 2 * batch * heads * queries * keys * head_dim + 2 * batch * heads * queries * keys * value_dim


def _native_mha_flops(query_shape, key_shape, value_shape, embed_dim: int, num_head: int, *args: Any,
                      out_shape=None, **kwargs: Any) -> int:
    """FLOPs of ``_native_multi_head_attention`` (``nn.MultiheadAttention``'s inference fast path, which
    FlopCounterMode's registry lacks in torch <= 2.14): q projection over the queries, k and v over the
    keys, ``q·kᵀ`` and ``softmax·v``, and the output projection."""
    batch, queries = query_shape[0], query_shape[-2]
    keys = key_shape[-2]
    projections = 2 * batch * (2 * queries + 2 * keys) * embed_dim * embed_dim
    return projections + 2 * 2 * batch * queries * keys * embed_dim


def _first_tensor(value: Any) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        for item in value:
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


def measure(model: Any, inputs: Any, **forward_kwargs: Any) -> Measured:
    """Run ``model`` once under ``FlopCounterMode`` and count its FLOPs per module.

    ``inputs``: a tensor (``model(inputs, **forward_kwargs)``), a tuple or list (``model(*inputs, ...)``)
    or a dict (``model(**inputs, ...)``). The count covers the whole batch (``Measured.per_sample``
    divides by it). FlopCounterMode counts matrix products only (linear layers, convolutions, matmuls,
    fused attention) at 2 FLOPs per multiply-accumulate; norms, softmax, activations and other
    element-wise work are not counted. Causal attention is counted in full (it sees shapes, not masks).
    vtprune adds the formulas of the fused CPU attention kernel and of ``nn.MultiheadAttention``'s
    inference fast path (``_native_multi_head_attention``), which torch's registry lacks.
    No autograd graph is built: the model's parameters stop requiring grad during the call (restored
    afterwards).
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    custom = {}
    cpu_sdpa = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    from torch.utils.flop_counter import flop_registry

    if cpu_sdpa is not None and cpu_sdpa not in flop_registry and cpu_sdpa.default not in flop_registry:
        custom[cpu_sdpa] = _sdpa_cpu_flops
    native_mha = getattr(aten, "_native_multi_head_attention", None)
    if native_mha is not None and native_mha not in flop_registry and native_mha.default not in flop_registry:
        custom[native_mha] = _native_mha_flops
    counter = FlopCounterMode(display=False, custom_mapping=custom)
    # No autograd graph: parameters stop requiring grad for the call. (Not torch.no_grad(): under it,
    # FlopCounterMode's module tracker fails on inputs that are views of parameters, e.g. timm's
    # attention-pool latent.)
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    try:
        for parameter in trainable:
            parameter.requires_grad_(False)
        with counter:
            if isinstance(inputs, Mapping):
                model(**inputs, **forward_kwargs)
            elif isinstance(inputs, (tuple, list)):
                model(*inputs, **forward_kwargs)
            else:
                model(inputs, **forward_kwargs)
    finally:
        for parameter in trainable:
            parameter.requires_grad_(True)
    counts = counter.get_flop_counts()
    root = type(model).__name__
    per_module = {name: sum(ops.values()) for name, ops in counts.items()}
    by_operator = {str(op): value for op, value in counts.get("Global", {}).items()}
    total = counter.get_total_flops()
    by_module = _top_modules(model, root, per_module, total)
    first = _first_tensor(inputs)
    batch = int(first.shape[0]) if first is not None and first.dim() > 0 else 1
    by_site = {"vision": total} if _is_timm_vit(model) else _group_sites(by_module)
    return Measured(total=total, by_module=by_module, by_site=by_site, by_operator=by_operator, batch_size=batch)


def _top_modules(model: Any, root: str, per_module: Mapping[str, int], total: int) -> dict[str, int]:
    """FLOPs of the root's children; an HF base-model wrapper (``model``) and a child holding all the
    FLOPs are opened up."""
    base = getattr(model, "base_model", None)
    base_prefix = getattr(model, "base_model_prefix", None)
    children = [name for name, _ in model.named_children()]
    if base is not None and base is not model and base_prefix in children:
        names = [f"{base_prefix}.{name}" for name, _ in base.named_children()]
        names += [name for name in children if name != base_prefix]
    else:
        names = children
    while True:
        with_flops = [name for name in names if per_module.get(f"{root}.{name}", 0)]
        if len(with_flops) == 1 and per_module.get(f"{root}.{with_flops[0]}", 0) == total:
            module = model.get_submodule(with_flops[0])
            grandchildren = [f"{with_flops[0]}.{name}" for name, _ in module.named_children()]
            if grandchildren:
                names = grandchildren
                continue
        break
    found = {name: per_module.get(f"{root}.{name}", 0) for name in names if per_module.get(f"{root}.{name}", 0)}
    rest = total - sum(found.values())
    if rest:
        found["(root)"] = rest
    return found


def _group_sites(by_module: Mapping[str, int]) -> dict[str, int]:
    """Group module FLOPs by site from the module names (the first name component that says); ``{}`` if
    any module cannot be placed."""
    sites: dict[str, int] = {}
    for name, value in by_module.items():
        site = next((site for part in name.split(".") for site, names in _SITE_MODULES if part in names), None)
        if site is None:
            return {}
        sites[site] = sites.get(site, 0) + value
    return sites
