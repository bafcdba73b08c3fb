"""Eval tasks: a registry by name. A task lists its samples, turns a batch of them into model inputs,
scores one output against its label and against the unpruned model's output (fidelity), and summarises.

Shipped: ``classification`` (timm models on an ImageNet-style folder: top-1 / top-5, agreement with the
unpruned model's top-1, KL(unpruned || pruned) of the class distributions) and ``zeroshot`` (the same
for open_clip models, CLIP zero-shot from the folder names).
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
    id: str
    path: Path
    label: int


class Task(Protocol):
    name: str
    families: tuple[str, ...]

    def samples(self, data: Path) -> list[Sample]: ...

    def inputs(self, model: Any, samples: list[Sample]) -> tuple[torch.Tensor, list[str | None]]: ...

    def score(self, output: torch.Tensor, reference: torch.Tensor, sample: Sample) -> dict[str, Any]: ...

    def summarise(self, rows: list[dict[str, Any]]) -> dict[str, float]: ...


class ClassificationTask:
    """Top-1 / top-5 accuracy of a timm classifier on an ImageNet-style folder (``DATA/<class>/<image>``,
    classes in sorted order as torchvision's ``ImageFolder`` numbers them). Images go through the model's
    own eval transform (``timm.data.resolve_data_config`` + ``create_transform``)."""

    name = "classification"
    families = ("timm-vit",)
    metrics = ("top1", "top5", "agreement", "kl")

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
    """CLIP zero-shot classification (open_clip models) on an ImageNet-style folder: the class names are the
    sub-folder names (``_`` read as a space), each turned into the prompt ``"a photo of a {name}."``; the
    class scores are ``logit_scale · cos(image, prompt)`` (CLIP's). Policies apply to the image tower
    (``model.visual``); the text tower is unchanged and its embeddings are computed once per run."""

    name = "zeroshot"
    families = ("open_clip-vit",)
    template = "a photo of a {}."

    def __init__(self) -> None:
        super().__init__()
        self._classes: "weakref.WeakKeyDictionary[Any, torch.Tensor]" = weakref.WeakKeyDictionary()

    def _transform(self, model: Any) -> Callable:
        if model not in self._transforms:
            import open_clip

            self._transforms[model] = open_clip.image_transform(model.visual.image_size, is_train=False)
        return self._transforms[model]

    def target(self, model: Any) -> Any:
        return model.visual

    def prepare(self, model: Any, data: Path, spec: str) -> None:
        import open_clip

        names = [entry.name.replace("_", " ") for entry in sorted(data.iterdir()) if entry.is_dir()]
        tokenizer = open_clip.get_tokenizer(spec.partition(":")[2].partition("/")[0])
        device = next(model.parameters()).device
        with torch.inference_mode():
            text = model.encode_text(tokenizer([self.template.format(name) for name in names]).to(device))
        self._classes[model] = torch.nn.functional.normalize(text.float(), dim=-1)

    def forward(self, model: Any, images: torch.Tensor) -> torch.Tensor:
        features = torch.nn.functional.normalize(model.encode_image(images).float(), dim=-1)
        return model.logit_scale.exp().float() * features @ self._classes[model].T


TASKS: dict[str, Task] = {"classification": ClassificationTask(), "zeroshot": ZeroShotTask()}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]
