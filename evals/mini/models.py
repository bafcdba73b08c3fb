"""The vtprune-mini architectures, built from their configs with the host libraries' own classes, and the
shipped weights loaded into them."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

WEIGHTS = Path(__file__).with_name("assets")
MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST training-split pixel mean and standard deviation (in [0, 1])

# timm VisionTransformer on 28x28 images: patch 2 -> 196 patch tokens + CLS. The layout of timm's CLIP ViTs
# (``vit_*_clip_*``: a LayerNorm before the blocks, LayerNorm eps 1e-5), because mini-vit is fine-tuned from
# mini-clip's image tower (:func:`vit_state_from_clip`), as timm's ``*_clip_*.openai_ft_in1k`` models are from CLIP
MINI_VIT = {"img_size": 28, "patch_size": 2, "in_chans": 3, "num_classes": 10, "embed_dim": 96, "depth": 4,
            "num_heads": 3, "mlp_ratio": 2.0, "pre_norm": True}


def build_mini_vit() -> nn.Module:
    """``mini-vit`` with random weights. Grey images are fed as 3 equal channels, so that the usual
    RGB pipelines (PIL ``convert("RGB")``, timm's eval transform) work unchanged; ``pretrained_cfg`` tells
    timm's ``resolve_data_config`` the input size and normalisation (no resize, no crop)."""
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(**MINI_VIT, norm_layer=nn.LayerNorm)
    model.pretrained_cfg = {"input_size": (3, 28, 28), "mean": (MEAN,) * 3, "std": (STD,) * 3, "crop_pct": 1.0,
                            "interpolation": "bilinear", "num_classes": 10, "architecture": "mini-vit"}
    return model


def vit_state_from_clip(visual: dict[str, torch.Tensor], classifier: torch.Tensor) -> dict[str, torch.Tensor]:
    """A ``mini-vit`` state dict from an open_clip image tower's state dict (``visual``: mini-clip's
    ``model.visual.state_dict()``) and a ``[10, embed]`` zero-shot classifier (the normalised text embeddings
    of the class prompts). The head is ``proj @ classifier.T``: its argmax is the zero-shot prediction (the
    image embedding's norm only scales a row of logits)."""
    state = {"cls_token": visual["class_embedding"][None, None], "pos_embed": visual["positional_embedding"][None],
             "patch_embed.proj.weight": visual["conv1.weight"],
             "norm_pre.weight": visual["ln_pre.weight"], "norm_pre.bias": visual["ln_pre.bias"],
             "norm.weight": visual["ln_post.weight"], "norm.bias": visual["ln_post.bias"],
             "head.weight": (visual["proj"] @ classifier.T).T.contiguous(),
             "head.bias": torch.zeros(classifier.shape[0])}
    names = {"ln_1": "norm1", "ln_2": "norm2", "attn.in_proj_weight": "attn.qkv.weight",
             "attn.in_proj_bias": "attn.qkv.bias", "attn.out_proj": "attn.proj", "mlp.c_fc": "mlp.fc1",
             "mlp.c_proj": "mlp.fc2"}
    for key, value in visual.items():
        if key.startswith("transformer.resblocks."):
            rest = key.removeprefix("transformer.resblocks.")
            for clip_name, timm_name in names.items():
                rest = rest.replace(clip_name, timm_name)
            state[f"blocks.{rest}"] = value
    return state


# open_clip CLIP: a ViT image tower on 28x28 images (patch 2 -> 196 patch tokens + CLS) and a small text
# tower over mini-clip's word vocabulary (evals.mini.text)
MINI_CLIP_VISION = {"image_size": 28, "patch_size": 2, "width": 96, "layers": 4, "head_width": 32, "mlp_ratio": 2.0}
MINI_CLIP_TEXT = {"context_length": 12, "width": 64, "heads": 2, "layers": 2, "mlp_ratio": 2.0}
MINI_CLIP_EMBED = 64


def build_mini_clip() -> nn.Module:
    """``mini-clip`` with random weights: ``open_clip.model.CLIP``; its ``visual.preprocess_cfg`` holds the
    Fashion-MNIST normalisation (open_clip's ``image_transform_v2`` reads it). Text goes through
    :func:`tokenizer`."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    from .text import WordTokenizer

    text = CLIPTextCfg(vocab_size=WordTokenizer().vocab_size, **MINI_CLIP_TEXT)
    model = CLIP(embed_dim=MINI_CLIP_EMBED, vision_cfg=CLIPVisionCfg(**MINI_CLIP_VISION), text_cfg=text)
    model.visual.preprocess_cfg = {"size": 28, "mode": "RGB", "mean": (MEAN,) * 3, "std": (STD,) * 3,
                                   "interpolation": "bilinear", "resize_mode": "shortest", "fill_color": 0}
    return model


def tokenizer(name: str = "mini-clip") -> Any:
    """The tokenizer of a vtprune-mini model with a text side (``mini-clip``)."""
    from .text import WordTokenizer

    if name != "mini-clip":
        raise ValueError(f"{name!r} has no tokenizer; accepted: mini-clip")
    return WordTokenizer(context_length=MINI_CLIP_TEXT["context_length"])


# Hugging Face LLaVA: a CLIP vision tower on 56x56 grids (patch 4 -> 196 patch tokens + CLS; the features of
# its second-to-last layer, as LLaVA-1.5), a 2-layer MLP projector, and a small Llama decoder
MINI_LLAVA_VISION = {"hidden_size": 96, "intermediate_size": 192, "num_hidden_layers": 5, "num_attention_heads": 3,
                     "image_size": 56, "patch_size": 4, "num_channels": 3}
MINI_LLAVA_TEXT = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
                   "num_key_value_heads": 4, "max_position_embeddings": 512}
MINI_LLAVA_WORDS = ("<unk>", "<s>", "</s>", "<pad>", "USER:", "ASSISTANT:", "what", "is", "at", "the", "top", "bottom",
                    "left", "right", "?", "there", "a", "how", "many", "items", "are", "yes", "no", "0", "1", "2", "3",
                    "4", "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                    "ankle", "boot")


def build_mini_llava_processor() -> Any:
    """mini-llava's ``LlavaProcessor``: a word-level tokenizer over :data:`MINI_LLAVA_WORDS` (whitespace
    split; ``<image>`` added as a special token) and a ``CLIPImageProcessor`` for 56x56 grey grids with
    the Fashion-MNIST normalisation."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({word: i for i, word in enumerate(MINI_LLAVA_WORDS)}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", padding_side="left")
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    images = CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56},
                                image_mean=[MEAN] * 3, image_std=[STD] * 3, resample=2)
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=4, image_token="<image>",
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)


def build_mini_llava() -> nn.Module:
    """``mini-llava`` with random weights: a ``LlavaForConditionalGeneration``."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vocabulary = len(MINI_LLAVA_WORDS) + 1  # + <image>
    text = LlamaConfig(vocab_size=vocabulary, bos_token_id=1, eos_token_id=2, pad_token_id=3, **MINI_LLAVA_TEXT)
    config = LlavaConfig(vision_config=CLIPVisionConfig(**MINI_LLAVA_VISION), text_config=text,
                         image_token_id=vocabulary - 1, vision_feature_layer=-2,
                         vision_feature_select_strategy="default", projector_hidden_act="gelu")
    return LlavaForConditionalGeneration(config)


BUILDERS = {"mini-vit": build_mini_vit, "mini-clip": build_mini_clip, "mini-llava": build_mini_llava}


def load(name: str, weights: str = "trained") -> Any:
    """A vtprune-mini model in eval mode, in float32: ``"mini-vit"`` (a timm ``VisionTransformer``),
    ``"mini-clip"`` (an open_clip ``CLIP``; its text goes through :func:`tokenizer`) or ``"mini-llava"`` (a
    ``LlavaForConditionalGeneration`` from the checkpoint directory ``assets/mini-llava``, which also holds
    its processor: :func:`build_mini_llava_processor`). ``weights="random"`` skips the shipped weights."""
    from safetensors.torch import load_file

    if name not in BUILDERS:
        raise ValueError(f"unknown vtprune-mini model {name!r}; accepted: {', '.join(BUILDERS)}")
    if weights not in ("trained", "random"):
        raise ValueError(f"weights={weights!r}; accepted: trained, random")
    shipped = WEIGHTS / (name if name == "mini-llava" else f"{name}.safetensors")
    if weights == "trained" and not shipped.exists():
        raise FileNotFoundError(f"{name}'s trained weights ({shipped.name}) are not in this installation; train them "
                                f"with `python -m vtprune.evals.mini.train {name.removeprefix('mini-')}`, or pass "
                                "weights='random' (--weights random)")
    if name == "mini-llava" and weights == "trained":
        from transformers import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration.from_pretrained(WEIGHTS / name, dtype=torch.float32).eval()
    model = BUILDERS[name]()
    if weights == "trained":
        state = load_file(shipped)
        model.load_state_dict({key: value.to(torch.float32) for key, value in state.items()})
    return model.eval()
