"""mini-llava's world: 2x2 grids of Fashion-MNIST items (56x56 grey images) and three kinds of question
about them.

- ``position``: "what is at the top left ?" -> the class name of that quadrant's item;
- ``presence``: "is there a coat ?" -> "yes" / "no" (balanced: half the grids hold the class);
- ``count``: "how many coat items are there ?" -> "0" ... "4" (balanced over the five counts).

A position question is about one quadrant, so a policy that keeps tokens by the question (query-aware)
and one that keeps them by the image alone (query-agnostic) behave differently, as on real benchmarks.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .data import CLASS_NAMES

QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
KINDS = ("position", "presence", "count")
COUNT_WORDS = ("0", "1", "2", "3", "4")


@dataclass(frozen=True)
class GridQuestion:
    """One item: the four source-image indices (raster order of the quadrants), the question, its answer,
    its kind, and the class a presence or count question asks about (``subject``)."""

    items: tuple[int, int, int, int]
    question: str
    answer: str
    kind: str
    subject: int | None = None


def compose(images: np.ndarray, items: tuple[int, ...]) -> np.ndarray:
    """The 56x56 grid of four 28x28 images, quadrants in raster order."""
    top = np.concatenate([images[items[0]], images[items[1]]], axis=1)
    bottom = np.concatenate([images[items[2]], images[items[3]]], axis=1)
    return np.concatenate([top, bottom], axis=0)


def _pick(by_class: list[np.ndarray], label: int, rng: np.random.Generator) -> int:
    return int(rng.choice(by_class[label]))


def _labels_with(count: int, label: int, rng: np.random.Generator) -> list[int]:
    """Four quadrant labels holding ``label`` exactly ``count`` times, shuffled."""
    others = [other for other in range(len(CLASS_NAMES)) if other != label]
    labels = [label] * count + list(rng.choice(others, 4 - count))
    rng.shuffle(labels)
    return labels


def make_question(labels_of: np.ndarray, by_class: list[np.ndarray], rng: np.random.Generator,
                  kind: str | None = None) -> GridQuestion:
    """A random grid and question of ``kind`` (random when ``None``) drawn from the images whose labels are
    ``labels_of`` (``by_class[c]``: their indices of class ``c``)."""
    kind = kind or KINDS[int(rng.integers(len(KINDS)))]
    label = None
    if kind == "position":
        labels = list(rng.integers(0, len(CLASS_NAMES), 4))
        quadrant = int(rng.integers(4))
        question, answer = f"what is at the {QUADRANTS[quadrant]} ?", CLASS_NAMES[labels[quadrant]]
    elif kind == "presence":
        label = int(rng.integers(len(CLASS_NAMES)))
        present = bool(rng.integers(2))
        labels = _labels_with(int(rng.integers(1, 5)) if present else 0, label, rng)
        question, answer = f"is there a {CLASS_NAMES[label]} ?", "yes" if present else "no"
    elif kind == "count":
        label, count = int(rng.integers(len(CLASS_NAMES))), int(rng.integers(5))
        labels = _labels_with(count, label, rng)
        question, answer = f"how many {CLASS_NAMES[label]} items are there ?", COUNT_WORDS[count]
    else:
        raise ValueError(f"unknown question kind {kind!r}; accepted: {', '.join(KINDS)}")
    items = tuple(_pick(by_class, int(label), rng) for label in labels)
    return GridQuestion(items=items, question=question, answer=answer, kind=kind, subject=label)


def questions(labels: np.ndarray, count: int, seed: int) -> list[GridQuestion]:
    """``count`` questions over images with ``labels``, the kinds in turn (position, presence, count, ...),
    reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(labels == label) for label in range(len(CLASS_NAMES))]
    return [make_question(labels, by_class, rng, KINDS[index % len(KINDS)]) for index in range(count)]


def related_questions(question: GridQuestion, labels_of: np.ndarray, rng: np.random.Generator) -> list[GridQuestion]:
    """``question`` and six more about its grid (answers read off the grid's labels ``labels_of[items]``):
    the four position questions, and a presence and a count question about ``question``'s subject; after
    a position question, about a class of the grid or (probability 0.5) one not in it, so that yes and no
    stay balanced."""
    labels = [int(labels_of[index]) for index in question.items]
    related = [question, *(GridQuestion(question.items, f"what is at the {QUADRANTS[quadrant]} ?",
                                        CLASS_NAMES[labels[quadrant]], "position") for quadrant in range(4))]
    subject = question.subject
    if subject is None:
        absent = [label for label in range(len(CLASS_NAMES)) if label not in labels]
        subject = int(rng.choice(labels if rng.integers(2) else absent))
    related.append(GridQuestion(question.items, f"is there a {CLASS_NAMES[subject]} ?",
                                "yes" if subject in labels else "no", "presence", subject))
    related.append(GridQuestion(question.items, f"how many {CLASS_NAMES[subject]} items are there ?",
                                COUNT_WORDS[labels.count(subject)], "count", subject))
    return related


def ideal_answer(probabilities: np.ndarray, question: GridQuestion) -> str:
    """The answer that is most likely right given ``probabilities`` ``[4, 10]``, each quadrant's class
    probabilities (say, a classifier's softmax), taken as independent: the likeliest class at the asked
    quadrant; ``yes`` when the chance that at least one quadrant holds the subject is over one half; the
    count with the highest probability under the quadrants' Poisson-binomial distribution. It bounds what a
    decoder reading features with that classifier's knowledge can answer."""
    if question.kind == "position":
        quadrant = next(k for k, name in enumerate(QUADRANTS) if f"the {name} ?" in question.question)
        return CLASS_NAMES[int(np.argmax(probabilities[quadrant]))]
    if question.subject is None:
        raise ValueError(f"a {question.kind} question needs its subject class")
    counts = np.array([1.0])
    for chance in probabilities[:, question.subject]:
        counts = np.concatenate([counts * (1 - chance), [0.0]]) + np.concatenate([[0.0], counts * chance])
    if question.kind == "presence":
        return "yes" if counts[0] < 0.5 else "no"
    return COUNT_WORDS[int(np.argmax(counts))]
