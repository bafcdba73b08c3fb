"""What is costed: transformer dimensions, vision towers, VLM architectures; shipped configs and readers of
timm, open_clip and Hugging Face models (no weights are loaded)."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from importlib import resources
from typing import Any, Mapping, Sequence



class UnknownConfigError(ValueError):
    """``estimate`` got a config name that is neither shipped nor a timm model."""


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

    def feature_index(self, num_layers: int) -> int:
        """``feature_layer`` as an index into ``hidden_states`` of a ``num_layers``-layer tower: 0 = the
        embeddings, k = the output of layer k - 1 (so layers 0..k-1 feed the projector)."""
        return self.feature_layer if self.feature_layer >= 0 else num_layers + 1 + self.feature_layer

    def visual_tokens_per_view(self, vision_pairs: Sequence[tuple[int, int]] | None = None) -> int:
        """Tokens leaving the feature layer of one view, minus the prefix when it is dropped."""
        vision = self.vision
        if vision is None:
            raise ValueError(f"{self.name} has no vision tower")
        tokens = vision.num_tokens
        if vision_pairs:
            index = self.feature_index(len(vision_pairs))
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
    from torch import nn

    block = model.blocks[0]
    attn, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
    if attn is None or mlp is None:
        raise ValueError(f"vtprune.flops reads timm blocks with one attn and one mlp; {type(block).__name__} "
                         "has other parts (parallel or class-attention blocks are not supported)")
    from timm.layers import Attention

    if not isinstance(attn, Attention) or getattr(model, "blocks_token_only", None) is not None:
        raise ValueError(f"vtprune.flops reads timm ViT blocks with timm.layers.Attention; {type(model).__name__} "
                         f"uses {type(attn).__name__}{' and class-attention blocks' if hasattr(model, 'blocks_token_only') else ''}")
    conv = getattr(model.patch_embed, "proj", None)
    if getattr(model.patch_embed, "backbone", None) is not None or not isinstance(conv, nn.Conv2d):
        raise ValueError(f"vtprune.flops reads timm patch embeddings that are one Conv2d over the pixels; "
                         f"{type(model.patch_embed).__name__} is not (a hybrid CNN backbone or a conv stem)")
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
