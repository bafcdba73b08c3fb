"""Text for mini-clip: a word-level tokenizer over a closed vocabulary, the pixel attributes captions
describe, and the captions themselves.

Captions name the class and, for retrieval, two attributes read off the pixels: how bright the item is
(``dark`` / ``mid-toned`` / ``pale``: the mean of its pixels above :data:`INK`, split at the training split's
tertiles) and how much of the frame it covers (``small`` / ``mid-sized`` / ``large``: its share of pixels
above :data:`INK`, split the same way). The (class, brightness, size) combinations present in a set of images
(at most ninety; 78 in the shipped evaluation set), each with its own captions, make a retrieval gallery
where every caption has exactly one right image.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from .data import CLASS_NAMES

INK = 16  # pixel value above which a pixel belongs to the item
BRIGHTNESS = ("dark", "mid-toned", "pale")
SIZE = ("small", "mid-sized", "large")
# tertiles of the two measures over the 60 000 training images (evals.mini.text.attribute_measures)
BRIGHTNESS_EDGES = (140.72, 181.58)
SIZE_EDGES = (0.3737, 0.5497)

TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a photo of the {}.", "a {}.",
             "a black and white photo of a {}.", "a product photo of a {}.")
ZERO_SHOT_TEMPLATE = "a photo of a {}."  # the zeroshot task's prompt

SPECIALS = ("<pad>", "<unk>", "<sot>")
WORDS = sorted({word for text in (*TEMPLATES, *CLASS_NAMES, *BRIGHTNESS, *SIZE)
                for word in re.findall(r"[a-z-]+", text.replace("{}", " "))} | {"an", "the"})
VOCABULARY = (*SPECIALS, *WORDS, "<eot>")  # <eot> has the largest id: open_clip pools the text at argmax(id)


@dataclass(frozen=True)
class WordTokenizer:
    """Lower-cases, keeps words of letters and hyphens, maps them to :data:`VOCABULARY` ids (``<unk>`` for
    others), wraps them in ``<sot> ... <eot>`` and pads with ``<pad>`` (id 0) to ``context_length``; a
    longer text is cut, keeping ``<eot>`` last. Callable like open_clip's tokenizers: ``tokenizer(texts)``
    -> LongTensor ``[N, context_length]``."""

    context_length: int = 12

    @property
    def vocab_size(self) -> int:
        return len(VOCABULARY)

    def encode(self, text: str) -> list[int]:
        index = {word: i for i, word in enumerate(VOCABULARY)}
        words = re.findall(r"[a-z-]+", text.lower())
        ids = [index["<sot>"], *(index.get(word, index["<unk>"]) for word in words)]
        return ids[:self.context_length - 1] + [index["<eot>"]]

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = self.encode(text)
            out[row, :len(ids)] = torch.tensor(ids)
        return out


def attribute_measures(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per image ``[N, 28, 28]`` uint8: the mean value of its item pixels and their share of the frame."""
    ink = images > INK
    count = ink.sum(axis=(1, 2))
    brightness = np.where(count > 0, (images * ink).sum(axis=(1, 2)) / np.maximum(count, 1), 0.0)
    return brightness, count / (images.shape[1] * images.shape[2])


def attributes(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Brightness and size classes (0, 1, 2 into :data:`BRIGHTNESS` / :data:`SIZE`) of each image."""
    brightness, size = attribute_measures(images)
    return np.digitize(brightness, BRIGHTNESS_EDGES), np.digitize(size, SIZE_EDGES)


def caption(label: int, brightness: int | None = None, size: int | None = None,
            template: str = ZERO_SHOT_TEMPLATE) -> str:
    """``template`` filled with the class name, preceded by the attributes given
    (``"a photo of a dark large coat."``)."""
    words = [BRIGHTNESS[brightness]] if brightness is not None else []
    words += [SIZE[size]] if size is not None else []
    return template.format(" ".join([*words, CLASS_NAMES[label]]))


GALLERY_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.")


def retrieval_gallery(images: np.ndarray, labels: np.ndarray) -> list[tuple[int, tuple[str, ...]]]:
    """The retrieval gallery of a set of images: for every (class, brightness, size) combination present,
    its first image (index into ``images``) with that combination's captions under
    :data:`GALLERY_TEMPLATES`, in class, brightness, size order. Captions differ between images, so each
    caption has exactly one right image."""
    brightness, size = attributes(images)
    gallery = []
    for label in range(len(CLASS_NAMES)):
        for b in range(len(BRIGHTNESS)):
            for s in range(len(SIZE)):
                found = np.flatnonzero((labels == label) & (brightness == b) & (size == s))
                if len(found):
                    gallery.append((int(found[0]), tuple(caption(label, b, s, t) for t in GALLERY_TEMPLATES)))
    return gallery
