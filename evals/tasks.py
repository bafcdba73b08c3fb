"""Eval tasks: a registry by name. A task lists its samples, turns a batch of them into model inputs,
scores one output against its label and against the unpruned model's output (fidelity), and summarises.

Shipped: ``classification`` (timm models on an ImageNet-style folder: top-1 / top-5, agreement with the
unpruned model's top-1, KL(unpruned || pruned) of the class distributions), ``zeroshot`` (the same for
CLIP models, zero-shot from the class names), ``retrieval`` (CLIP image-text recall@k) and ``vqa``
(LLaVA-family models: VQA accuracy, POPE F1, multiple choice, MME). :mod:`.benchmarks` converts the
public benchmark files into the JSONL these tasks read.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


@dataclass(frozen=True)
class Sample:
    """One image: ``id`` (its path relative to the data), ``label`` (class index, or the image's index),
    ``texts`` (its captions, for retrieval). ``path`` is ``None`` for a text-only VQA item."""

    id: str
    path: Path | None
    label: int
    texts: tuple[str, ...] = ()


def jsonl_items(data: Path, task: str, shape: str, build: Callable[[dict[str, Any]], Any]) -> list[Any]:
    """``build(item)`` for every JSON object of the JSONL file ``data``; a missing file, a bad line or an item
    ``build`` rejects (``KeyError``/``TypeError``/``ValueError``) raises naming the file, the line and ``shape``."""
    import json

    if not data.is_file():
        raise FileNotFoundError(f"{task} data {data} is not a file; expected a JSONL file with one {shape} object "
                                "per line")
    built = []
    for number, line in enumerate(data.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            built.append(build(json.loads(line)))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{data}:{number + 1}: expected {shape}, got {line[:80]!r} ({error})") from None
    return built


class Task(Protocol):
    """What the runner needs from a task. ``columns``: ``(metric, title, scale, digits)`` for the report, the
    first one the headline; ``relative``: metrics also given as % of unpruned; ``report_note``: what the
    columns mean; ``hf_auto``: the transformers auto class for ``hf:`` model specs."""

    name: str
    families: tuple[str, ...]
    columns: tuple[tuple[str, str, float, int], ...]
    relative: tuple[str, ...]
    report_note: str

    def samples(self, data: Path) -> list[Sample]: ...

    def prepare(self, model: Any, data: Path, spec: str) -> None: ...

    def target(self, model: Any) -> Any: ...

    def inputs(self, model: Any, samples: list[Sample]) -> tuple[Any, list[str | None]]: ...

    def forward(self, model: Any, inputs: Any) -> Any: ...

    def score(self, output: Any, reference: Any, sample: Sample) -> dict[str, Any]: ...

    def summarise(self, rows: list[dict[str, Any]]) -> dict[str, float]: ...


class ClassificationTask:
    """Top-1 / top-5 accuracy of a timm classifier on an ImageNet-style folder (``DATA/<class>/<image>``,
    classes in sorted order as torchvision's ``ImageFolder`` numbers them). Images go through the model's
    own eval transform (``timm.data.resolve_data_config`` + ``create_transform``)."""

    name = "classification"
    families = ("timm-vit",)
    metrics = ("top1", "top5", "agreement", "kl")
    columns = (("top1", "top-1 %", 100, 2), ("top5", "top-5 %", 100, 2), ("agreement", "agreement %", 100, 2),
               ("kl", "KL", 1, 4))
    relative = ("top1", "top5")
    report_note = ("top-1/top-5: accuracy over the readable samples; % of unpruned: over the unpruned model's in "
                   "this run; agreement: share of samples whose top-1 equals the unpruned model's; KL: mean "
                   "KL(unpruned || configuration) of the class distributions.")

    def samples(self, data: Path) -> list[Sample]:
        if not data.is_dir():
            raise FileNotFoundError(f"classification data {data} is not a directory; expected an ImageNet-style "
                                    "folder with one sub-folder of images per class")
        classes = sorted(entry.name for entry in data.iterdir() if entry.is_dir())
        if not classes:
            raise FileNotFoundError(f"classification data {data} has no class sub-folders")
        samples = []
        for label, name in enumerate(classes):
            for path in sorted((data / name).iterdir()):
                if path.suffix.lower() in IMAGE_SUFFIXES:
                    samples.append(Sample(id=f"{name}/{path.name}", path=path, label=label))
        return samples

    def __init__(self) -> None:
        self._transforms: "weakref.WeakKeyDictionary[Any, Callable]" = weakref.WeakKeyDictionary()

    def _transform(self, model: Any) -> Callable:
        if model not in self._transforms:
            from timm.data import create_transform, resolve_data_config

            self._transforms[model] = create_transform(**resolve_data_config({}, model=model))
        return self._transforms[model]

    def inputs(self, model: Any, samples: list[Sample]) -> tuple[torch.Tensor | None, list[str | None]]:
        """The batch tensor of the readable images, and per sample ``None`` or the error that made it unreadable."""
        from PIL import Image

        transform = self._transform(model)
        tensors, errors = [], []
        for sample in samples:
            try:
                with Image.open(sample.path) as image:
                    tensors.append(transform(image.convert("RGB")))
                errors.append(None)
            except Exception as error:  # corrupt or missing image: recorded, the run goes on
                errors.append(f"{type(error).__name__}: {error}")
        return (torch.stack(tensors) if tensors else None), errors

    def target(self, model: Any) -> Any:
        """The module policies are applied to."""
        return model

    def forward(self, model: Any, images: torch.Tensor) -> torch.Tensor:
        """Class scores ``[B, classes]`` for a batch."""
        return model(images)

    def prepare(self, model: Any, data: Path, spec: str) -> None:
        """Per-run preparation before the first batch (nothing for a classifier); ``spec`` is the model spec."""

    def score(self, output: torch.Tensor, reference: torch.Tensor, sample: Sample) -> dict[str, Any]:
        output, reference = output.float(), reference.float()
        top5 = output.topk(min(5, output.shape[-1])).indices.tolist()
        log_p, log_q = reference.double().log_softmax(-1), output.double().log_softmax(-1)
        return {"prediction": top5[0], "top5": top5, "top1": float(top5[0] == sample.label),
                "top5_hit": float(sample.label in top5), "agreement": float(top5[0] == int(reference.argmax())),
                "kl": float((log_p.exp() * (log_p - log_q)).sum())}

    def summarise(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        scored = [row for row in rows if row.get("error") is None]
        if not scored:
            return {name: float("nan") for name in self.metrics}
        mean = lambda key: sum(row[key] for row in scored) / len(scored)  # noqa: E731
        return {"top1": mean("top1"), "top5": mean("top5_hit"), "agreement": mean("agreement"), "kl": mean("kl")}


class ZeroShotTask(ClassificationTask):
    """CLIP zero-shot classification (open_clip models, or Hugging Face CLIP/SigLIP checkpoints: ``hf:PATH``)
    on an ImageNet-style folder: the class names are the lines of ``DATA/classnames.txt`` when it exists
    (one per class sub-folder, in sorted sub-folder order; ``vtprune prepare imagenet-classnames`` writes
    CLIP's ImageNet names), else the sub-folder names (``_`` read as a space); each is turned into the
    single prompt ``"a photo of a {name}."``; the
    class scores are ``logit_scale · cos(image, prompt)`` (CLIP's). Policies apply to the image tower
    (``model.visual``; ``model.vision_model`` for Hugging Face); the text tower is unchanged and its
    embeddings are computed once per run."""

    name = "zeroshot"
    families = ("open_clip-vit", "hf-clip-vision")
    template = "a photo of a {}."

    hf_auto = "AutoModel"

    def __init__(self) -> None:
        super().__init__()
        self._classes: "weakref.WeakKeyDictionary[Any, torch.Tensor]" = weakref.WeakKeyDictionary()
        self._hf_image_processors: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()

    @staticmethod
    def _is_hf(model: Any) -> bool:
        return hasattr(model, "get_image_features") and hasattr(model, "vision_model")

    def _transform(self, model: Any) -> Callable:
        if model not in self._transforms:
            if self._is_hf(model):
                processor = self._hf_image_processors[model]
                self._transforms[model] = lambda image: processor(images=image, return_tensors="pt")["pixel_values"][0]
            else:
                from open_clip.model import get_model_preprocess_cfg
                from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict

                # the model's own size, mean/std, interpolation and resize mode (as open_clip's factory sets them)
                config = PreprocessCfg(**merge_preprocess_dict(PreprocessCfg(size=model.visual.image_size),
                                                               get_model_preprocess_cfg(model)))
                self._transforms[model] = image_transform_v2(config, is_train=False)
        return self._transforms[model]

    def target(self, model: Any) -> Any:
        """The image tower: open_clip's ``visual``, or a Hugging Face CLIP/SigLIP model's ``vision_model``."""
        return model.vision_model if self._is_hf(model) else model.visual

    def _encode_texts(self, model: Any, spec: str) -> Callable[[list[str]], torch.Tensor]:
        device = next(model.parameters()).device
        if self._is_hf(model):
            from transformers import AutoImageProcessor, AutoTokenizer

            path = spec.partition(":")[2]
            tokenizer = AutoTokenizer.from_pretrained(path)
            self._hf_image_processors[model] = AutoImageProcessor.from_pretrained(path)

            # the text tower's own context: SigLIP pools its last position and was trained on max_length
            # padding (64); CLIP (77) pools its end token, so padding further changes nothing there
            context = model.config.text_config.max_position_embeddings

            def encode(texts: list[str]) -> torch.Tensor:
                tokens = tokenizer(texts, padding="max_length", truncation=True, max_length=context,
                                   return_tensors="pt").to(device)
                output = model.get_text_features(**tokens)
                return getattr(output, "pooler_output", output)

            return encode
        library, _, name = spec.partition(":")
        if library == "mini":
            from .mini.models import tokenizer

            tokenizer = tokenizer(name if name.startswith("mini-") else f"mini-{name}")
        else:
            import open_clip

            tokenizer = open_clip.get_tokenizer(name.partition("/")[0])
        return lambda texts: model.encode_text(tokenizer(texts).to(device))

    def _encode_images(self, model: Any, images: torch.Tensor) -> torch.Tensor:
        if self._is_hf(model):
            output = model.get_image_features(pixel_values=images)
            return getattr(output, "pooler_output", output)
        return model.encode_image(images)

    @staticmethod
    def class_names(data: Path) -> list[str]:
        """The class names, in label order: ``DATA/classnames.txt`` (one line per class sub-folder) or the
        sub-folder names with ``_`` read as a space."""
        folders = [entry.name for entry in sorted(data.iterdir()) if entry.is_dir()]
        listed = data / "classnames.txt"
        if not listed.is_file():
            return [name.replace("_", " ") for name in folders]
        names = [line.strip() for line in listed.read_text().splitlines() if line.strip()]
        if len(names) != len(folders):
            raise ValueError(f"{listed} lists {len(names)} class names but {data} has {len(folders)} class "
                             "sub-folders; expected one name per sub-folder, in sorted sub-folder order")
        return names

    def prepare(self, model: Any, data: Path, spec: str) -> None:
        names = self.class_names(data)
        encode = self._encode_texts(model, spec)
        with torch.inference_mode():
            text = encode([self.template.format(name) for name in names])
        self._classes[model] = torch.nn.functional.normalize(text.float(), dim=-1)

    def forward(self, model: Any, images: torch.Tensor) -> torch.Tensor:
        features = torch.nn.functional.normalize(self._encode_images(model, images).float(), dim=-1)
        return model.logit_scale.exp().float() * features @ self._classes[model].T


class RetrievalTask(ZeroShotTask):
    """CLIP image-text retrieval (open_clip models) from a JSONL file, one image per line:
    ``{"image": "path relative to the file", "captions": ["...", ...]}`` (Flickr30k / COCO Karpathy-style
    test splits). Image→text R@k: an image is right when one of its own captions is among the ``k``
    captions closest to it; text→image R@k: a caption is right when its image is among the ``k`` closest
    images (cosine of the normalised embeddings). Policies apply to ``model.visual``; the captions are
    embedded once. Fidelity: mean cosine between each image's pruned and unpruned embedding. Images that
    cannot be read are left out of both directions (their captions too), and counted as errors."""

    name = "retrieval"
    metrics = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "fidelity")
    columns = (("i2t_r1", "I→T R@1 %", 100, 2), ("i2t_r5", "I→T R@5 %", 100, 2), ("i2t_r10", "I→T R@10 %", 100, 2),
               ("t2i_r1", "T→I R@1 %", 100, 2), ("t2i_r5", "T→I R@5 %", 100, 2), ("t2i_r10", "T→I R@10 %", 100, 2),
               ("fidelity", "cos to unpruned", 1, 4))
    relative = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")
    report_note = ("R@k: image→text, an image is right when one of its captions is among the k closest; "
                   "text→image, a caption is right when its image is among the k closest; % of unpruned: of the "
                   "unpruned model's I→T R@1 in this run; cos to unpruned: mean cosine between each image's pruned "
                   "and unpruned embedding.")

    def samples(self, data: Path) -> list[Sample]:
        def build(item: dict[str, Any]) -> tuple[str, tuple[str, ...]]:
            captions = item.get("captions", item.get("caption"))
            return item["image"], ((captions,) if isinstance(captions, str) else tuple(captions))

        items = jsonl_items(data, "retrieval", '{"image": ..., "captions": [...]}', build)
        seen: set[str] = set()
        for image, _ in items:
            if image in seen:
                raise ValueError(f"{data}: image {image!r} is on more than one line; give each image one line "
                                 'with all its captions: {"image": ..., "captions": [...]}')
            seen.add(image)
        return [Sample(id=image, path=data.parent / image, label=index, texts=captions)
                for index, (image, captions) in enumerate(items)]

    def prepare(self, model: Any, data: Path, spec: str) -> None:
        samples = self.samples(data)
        captions = [text for sample in samples for text in sample.texts]
        owners = torch.tensor([sample.label for sample in samples for _ in sample.texts])
        encode = self._encode_texts(model, spec)
        with torch.inference_mode():
            text = encode(captions)
        self._current = (torch.nn.functional.normalize(text.float(), dim=-1).cpu(), owners)

    def forward(self, model: Any, images: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(self._encode_images(model, images).float(), dim=-1)

    def score(self, output: torch.Tensor, reference: torch.Tensor, sample: Sample) -> dict[str, Any]:
        output, reference = output.float(), reference.float()
        return {"embedding": [round(value, 7) for value in output.tolist()],
                "fidelity": float(torch.nn.functional.cosine_similarity(output, reference, dim=0))}

    def summarise(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        scored = sorted((row for row in rows if row.get("error") is None), key=lambda row: row["label"])
        if not scored:
            return {name: float("nan") for name in self.metrics}
        text, owners = self._current
        images = torch.tensor([row["embedding"] for row in scored])
        present = torch.tensor([row["label"] for row in scored])
        keep = torch.isin(owners, present)
        text, owners = text[keep], owners[keep]
        similarity = images @ text.T  # [images, captions]
        owner_slot = (owners[:, None] == present[None, :]).float().argmax(1)  # caption -> its image's row
        own = owner_slot[None, :] == torch.arange(len(present))[:, None]  # [images, captions]
        best_own = similarity.masked_fill(~own, float("-inf")).amax(1)
        # ties count against the model: another image's caption scoring exactly as high (a duplicate
        # caption) ranks ahead, and so does another image scoring exactly as high for a caption
        image_rank = ((similarity >= best_own[:, None]) & ~own).sum(1)
        caption_scores = similarity.T  # [captions, images]
        own_score = caption_scores.gather(1, owner_slot[:, None])
        caption_rank = (caption_scores >= own_score).sum(1) - 1
        metrics = {}
        for k in (1, 5, 10):
            metrics[f"i2t_r{k}"] = float((image_rank < k).float().mean())
            metrics[f"t2i_r{k}"] = float((caption_rank < k).float().mean())
        metrics["fidelity"] = sum(row["fidelity"] for row in scored) / len(scored)
        return metrics


_ARTICLES = {"a", "an", "the"}


def normalise_answer(text: str) -> str:
    """Lower case, punctuation and articles dropped, whitespace collapsed (the VQA evaluation's spirit)."""
    import re

    text = re.sub(r"[^\w\s]", " ", text.lower())
    return " ".join(word for word in text.split() if word not in _ARTICLES)


def yes_no(text: str) -> str:
    """POPE's reading of an answer: ``"no"`` if its first sentence has the word "no" or "not", else ``"yes"``."""
    first = normalise_answer(text.split(".")[0]).split()
    return "no" if ("no" in first or "not" in first) else "yes"


def mme_label(text: str) -> str:
    """MME's reading of an answer (official ``calculation.py``): the lower-cased answer if it is ``"yes"`` or
    ``"no"``, else ``"yes"`` or ``"no"`` if its first four characters contain it (``"yes"`` checked first),
    else ``"other"`` (always wrong)."""
    text = text.strip().lower()
    if text in ("yes", "no"):
        return text
    return "yes" if "yes" in text[:4] else "no" if "no" in text[:4] else "other"


def choice_letter(text: str, count: int) -> str:
    """The option letter of a multiple-choice answer, read as LLaVA's ``eval_science_qa.py`` reads it: the whole
    answer when it is one of the first ``count`` letters, the first character when the answer starts with
    ``"X. "``, the letter of a single ``"The answer is X."``; ``""`` (wrong) otherwise."""
    import re

    text, letters = text.strip(), "ABCDEFGHIJ"[:count]
    if len(text) == 1 and text in letters:
        return text
    if len(text) >= 3 and text[0] in letters and text[1:3] == ". ":
        return text[0]
    found = re.findall(r"The answer is ([A-Z])\.", text)
    return found[0] if len(found) == 1 and found[0] in letters else ""


def vqa_accuracy(answer: str, references: list[str]) -> float:
    """VQA accuracy of a normalised answer against normalised references (VQAv2's and TextVQA's official
    evaluators): the mean over the leave-one-out subsets of the references of ``min(#matching / 3, 1)``; for
    10 references, ``min(m / 3, 1)`` averaged over the 10 subsets of 9. With one reference, ``min(m / 3, 1)``."""
    matching = sum(answer == item for item in references)
    if len(references) < 2:
        return min(matching / 3, 1.0)
    total = len(references)
    return ((total - matching) * min(matching / 3, 1.0) + matching * min((matching - 1) / 3, 1.0)) / total


@dataclass(frozen=True)
class Question:
    """One VQA item: the question, the reference answers, optional choices, optional category (MME's subtask
    names make MME scores, POPE's split names POPE's per-split F1)."""

    question: str
    answers: tuple[str, ...]
    choices: tuple[str, ...] = ()
    category: str | None = None


MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
                  "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
POPE_SPLITS = ("adversarial", "popular", "random")


def mme_scores(rows: list[dict[str, Any]]) -> dict[str, float]:
    """MME (Fu et al. 2023; official ``calculation.py``): per subtask ``100 · (acc + acc+)`` with ``acc`` the
    share of questions answered right (the answer read by :func:`mme_label`) and ``acc+`` the share of images
    whose questions are all right; perception = the sum over its 10 subtasks (max 2000), cognition over its
    4 (max 800); ``nan`` when the rows hold none of them."""
    by_category: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row.get("category") in MME_PERCEPTION + MME_COGNITION:
            by_category.setdefault(row["category"], []).append(row)
    scores = {}
    for category, items in by_category.items():
        accuracy = sum(row["mme_correct"] for row in items) / len(items)
        images: dict[str, list[float]] = {}
        for row in items:
            images.setdefault(row["image"], []).append(row["mme_correct"])
        accuracy_plus = sum(all(values) for values in images.values()) / len(images)
        scores[category] = 100 * (accuracy + accuracy_plus)
    total = lambda names: (sum(scores[name] for name in names if name in scores)  # noqa: E731
                           if any(name in scores for name in names) else float("nan"))
    return {"mme_perception": total(MME_PERCEPTION), "mme_cognition": total(MME_COGNITION)}


def yes_no_scores(pairs: list[tuple[str, str]]) -> dict[str, float]:
    """POPE's scores (``eval_pope.py``) of ``(prediction, reference)`` yes/no pairs, "yes" the positive class:
    precision, recall, F1 = 2TP / (2TP + FP + FN) and accuracy; ``nan`` where a denominator is zero (F1 is 0,
    not ``nan``, for a model that never answers "yes" where the split has positives)."""
    nan = float("nan")
    tp = sum(p == "yes" and r == "yes" for p, r in pairs)
    fp = sum(p == "yes" and r == "no" for p, r in pairs)
    fn = sum(p == "no" and r == "yes" for p, r in pairs)
    precision = tp / (tp + fp) if tp + fp else nan
    recall = tp / (tp + fn) if tp + fn else nan
    f1 = 2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else nan
    accuracy = sum(p == r for p, r in pairs) / len(pairs) if pairs else nan
    return {"precision": precision, "recall": recall, "f1": f1, "accuracy": accuracy}


def pope_scores(rows: list[dict[str, Any]]) -> dict[str, float]:
    """POPE as papers report it: F1 of each split (rows whose ``category`` is ``adversarial``, ``popular`` or
    ``random``; :func:`yes_no_scores`) as ``pope_f1_<split>``, and ``pope_f1`` their mean over the splits
    present (the "POPE" column of FlowCut, TransPrune, VisionZip and LLaVA-1.5); ``nan`` without them."""
    nan = float("nan")
    scores = {}
    for split in POPE_SPLITS:
        pairs = [(row["yesno_prediction"], row["yesno_reference"]) for row in rows
                 if row.get("category") == split and "yesno_prediction" in row]
        scores[f"pope_f1_{split}"] = yes_no_scores(pairs)["f1"] if pairs else nan
    present = [scores[f"pope_f1_{split}"] for split in POPE_SPLITS
               if any(row.get("category") == split for row in rows)]
    return {"pope_f1": sum(present) / len(present) if present else nan, **scores}


class VQATask:
    """Visual question answering for LLaVA-family models (``hf:PATH``) from a LLaVA-style JSONL file, one
    item per line: ``{"image": "path relative to the file, or absolute", "question": "...", "answers": [...]}``
    (``"text"`` for the question and ``"answer"`` for a single answer are accepted; no ``"image"`` (or
    ``null``) makes a text-only item, as ScienceQA's; ``"choices"`` makes it multiple choice, prompted as
    ``question\\nA. choice\\nB. choice\\nAnswer with the option's letter from the given choices directly.``;
    ``"category"``: a POPE split or an MME subtask makes their scores; ``"question_id"``: the sample id).
    :mod:`.benchmarks` (``vtprune prepare``) writes this form from LLaVA's eval files. Greedy generation
    of ``max_new_tokens`` with the model's chat template (or ``"USER: <image>\\n{question} ASSISTANT:"``), left
    padding; rows with and without an image are generated separately.

    Metrics: ``exact`` (normalised prediction equals a normalised reference), ``vqa`` (:func:`vqa_accuracy`),
    ``yesno_*`` precision, recall, F1 and accuracy over all the items whose references are yes/no (a "no" or
    "not" in the first sentence reads as no; :func:`yes_no_scores`), ``pope_f1`` and ``pope_f1_<split>``
    (:func:`pope_scores`), ``choice`` accuracy over multiple-choice items (letter read by :func:`choice_letter`)
    and ``choice_img`` over those with an image (ScienceQA's IMG), MME perception and cognition scores for
    items whose ``"category"`` is an MME subtask (:func:`mme_scores`; both reported separately, as papers mix
    them), and ``agreement`` with the unpruned model's answer."""

    name = "vqa"
    families = ("hf-llava",)
    hf_auto = "AutoModelForImageTextToText"
    max_new_tokens = 16
    metrics = ("exact", "vqa", "yesno_f1", "yesno_accuracy", "yesno_precision", "yesno_recall", "pope_f1",
               *(f"pope_f1_{split}" for split in POPE_SPLITS), "choice", "choice_img", "mme_perception",
               "mme_cognition", "agreement")
    columns = (("exact", "exact %", 100, 2), ("vqa", "VQA acc %", 100, 2), ("yesno_f1", "yes/no F1 %", 100, 2),
               ("pope_f1", "POPE F1 %", 100, 2), ("choice", "choice %", 100, 2), ("choice_img", "choice IMG %", 100, 2),
               ("mme_perception", "MME P", 1, 1), ("mme_cognition", "MME C", 1, 1), ("agreement", "agreement %", 100, 2))
    relative = ("exact", "vqa", "yesno_f1", "pope_f1", "choice", "choice_img", "mme_perception", "mme_cognition")
    report_note = ("exact: normalised answer equals a reference; VQA acc: min(#references matching / 3, 1) averaged "
                   "over the leave-one-out subsets of the references (VQAv2/TextVQA); yes/no F1: over all yes/no "
                   "items (a 'no'/'not' in the first sentence reads as no); POPE F1: the F1 of each POPE split "
                   "(adversarial, popular, random), averaged over the splits present; choice: multiple-choice "
                   "accuracy by letter, choice IMG: over the items with an image (ScienceQA IMG); MME P / C: "
                   "perception (max 2000) and cognition (max 800) scores, 100·(acc + acc+) summed over subtasks; "
                   "agreement: the answer equals the unpruned model's.")

    def __init__(self) -> None:
        self._processors: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()
        self._questions: dict[str, Question] = {}

    def samples(self, data: Path) -> list[Sample]:
        def build(item: dict[str, Any]) -> tuple[dict[str, Any], Question]:
            answers = item.get("answers", item.get("answer"))
            answers = (answers,) if isinstance(answers, str) else tuple(answers)
            question = Question(item.get("question", item.get("text")), tuple(map(str, answers)),
                                tuple(item.get("choices", ())), item.get("category"))
            if not question.question or not question.answers:
                raise KeyError("question/answers")
            if item.get("image") is not None and not isinstance(item["image"], str):
                raise TypeError("image must be a path or null")
            return item, question

        items = jsonl_items(data, "vqa", '{"image": ..., "question": ..., "answers": [...]}', build)
        samples, seen = [], set()
        for index, (item, question) in enumerate(items):
            image = item.get("image")
            sample_id = str(item.get("question_id", f"{index}:{image}"))
            if sample_id in seen:
                raise ValueError(f"{data}: question_id {sample_id!r} appears more than once; expected one line "
                                 "per question with a unique question_id")
            seen.add(sample_id)
            self._questions[sample_id] = question
            samples.append(Sample(id=sample_id, path=data.parent / image if image else None, label=index))
        return samples

    def prepare(self, model: Any, data: Path, spec: str) -> None:
        from transformers import AutoProcessor

        library, _, name = spec.partition(":")
        if library == "mini":
            from .mini.models import build_mini_llava_processor

            processor = build_mini_llava_processor()
        else:
            processor = AutoProcessor.from_pretrained(name)
        processor.tokenizer.padding_side = "left"
        self._processors[model] = processor

    def target(self, model: Any) -> Any:
        return model

    def _prompt(self, processor: Any, question: Question, image: bool) -> str:
        text = question.question
        if question.choices:
            letters = "ABCDEFGHIJ"
            text += "\n" + "\n".join(f"{letters[i]}. {choice}" for i, choice in enumerate(question.choices))
            text += "\nAnswer with the option's letter from the given choices directly."
        if getattr(processor, "chat_template", None):
            content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]
            return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        return f"USER: <image>\n{text} ASSISTANT:" if image else f"USER: {text} ASSISTANT:"

    def inputs(self, model: Any, samples: list[Sample]) -> tuple[Any, list[str | None]]:
        from PIL import Image

        processor = self._processors[model]
        images, prompts, errors = [], [], []
        for sample in samples:
            try:
                if sample.path is not None:
                    with Image.open(sample.path) as image:
                        images.append(image.convert("RGB"))
                prompts.append(self._prompt(processor, self._questions[sample.id], sample.path is not None))
                errors.append(None)
            except Exception as error:
                errors.append(f"{type(error).__name__}: {error}")
        if not prompts:
            return None, errors
        return processor(images=images or None, text=prompts, return_tensors="pt", padding=True), errors

    @staticmethod
    def _image_token(model: Any) -> int | None:
        config = model.config
        token = getattr(config, "image_token_id", None)
        return token if token is not None else getattr(config, "image_token_index", None)

    def forward(self, model: Any, inputs: Any) -> list[str]:
        """Greedy answers, one per row. A batch mixing rows with and without an image runs as two generate
        calls (text-only rows first), so LLM-site policies see the same visual token count in every row and the
        policy's trace is that of the image rows."""
        processor = self._processors[model]
        token = self._image_token(model)
        with_image = (inputs["input_ids"] == token).any(1) if token is not None else None
        if with_image is None or bool(with_image.all()) or not bool(with_image.any()):
            groups = [(torch.arange(len(inputs["input_ids"])), dict(inputs))]
        else:
            rows = [key for key in ("input_ids", "attention_mask", "token_type_ids") if key in inputs]
            text_rows = (~with_image).nonzero().flatten()
            image_rows = with_image.nonzero().flatten()
            groups = [(text_rows, {key: inputs[key][text_rows] for key in rows}),
                      (image_rows, {**inputs, **{key: inputs[key][image_rows] for key in rows}})]
        answers: list[str] = [""] * len(inputs["input_ids"])
        for indices, batch in groups:
            generated = model.generate(**batch, max_new_tokens=self.max_new_tokens, do_sample=False)
            decoded = processor.batch_decode(generated[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
            for index, text in zip(indices.tolist(), decoded):
                answers[index] = text
        return answers

    def score(self, output: str, reference: str, sample: Sample) -> dict[str, Any]:
        question = self._questions[sample.id]
        answer = normalise_answer(output)
        references = [normalise_answer(item) for item in question.answers]
        row: dict[str, Any] = {"answer": output.strip(), "exact": float(answer in references),
                               "vqa": vqa_accuracy(answer, references),
                               "agreement": float(answer == normalise_answer(reference))}
        if set(references) <= {"yes", "no"}:
            row["yesno_prediction"], row["yesno_reference"] = yes_no(output), references[0]
        if question.choices:
            letter = choice_letter(output, len(question.choices))
            row["choice"] = float(letter != "" and letter == question.answers[0].strip().upper()[:1])
            row["has_image"] = sample.path is not None
        if question.category is not None:
            row.update(category=question.category, image=sample.path.name if sample.path is not None else None,
                       mme_correct=float(mme_label(output) == references[0]))
        return row

    def summarise(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        scored = [row for row in rows if row.get("error") is None]
        nan = float("nan")
        mean = lambda key, items: (sum(row[key] for row in items) / len(items)) if items else nan  # noqa: E731
        choices = [row for row in scored if "choice" in row]
        metrics = {"exact": mean("exact", scored), "vqa": mean("vqa", scored), "agreement": mean("agreement", scored),
                   "choice": mean("choice", choices),
                   "choice_img": mean("choice", [row for row in choices if row.get("has_image")])}
        pairs = [(row["yesno_prediction"], row["yesno_reference"]) for row in scored if "yesno_prediction" in row]
        metrics.update({f"yesno_{name}": value for name, value in yes_no_scores(pairs).items()})
        metrics.update(pope_scores(scored))
        metrics.update(mme_scores(scored))
        return {name: metrics[name] for name in self.metrics}


TASKS: dict[str, Task] = {"classification": ClassificationTask(), "zeroshot": ZeroShotTask(),
                          "retrieval": RetrievalTask(), "vqa": VQATask()}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]
