"""Train a vtprune-mini model: ``python -m vtprune.evals.mini.train {vit,clip,llava} [--data DIR] [--seed 0]``.

Seeded and CPU-friendly (2 cores). Writes ``<name>.safetensors`` (float16; mini-llava: a checkpoint directory
``<name>/``) and ``<name>.json`` (the command, seed, epochs, wall time, machine, per-epoch accuracy) to ``--out``
(default: the package's ``assets/``, where :func:`vtprune.evals.mini.models.load` reads them). mini-vit and
mini-clip are measured on the whole Fashion-MNIST test split (10 000 images) and on the shipped evaluation set
(2 000 of them); mini-llava on the shipped 2 000 (its tower, per item) and on 600 questions about grids of them.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .data import DEFAULT_ROOT, eval_indices, load_split
from .models import MEAN, STD, WEIGHTS, build_mini_vit


def to_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, 28, 28]`` -> normalised float ``[N, 3, 28, 28]`` (the grey channel three times)."""
    x = torch.as_tensor(images).float().div(255).sub(MEAN).div(STD)
    return x[:, None].expand(-1, 3, -1, -1)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 2 pixels (zero padding) and horizontal flips, per image."""
    n = images.shape[0]
    padded = F.pad(images, (2, 2, 2, 2))
    dx = torch.randint(0, 5, (n,), generator=generator)
    dy = torch.randint(0, 5, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(28))[:, :, None].expand(n, 28, 28)
    cols = (dx[:, None] + torch.arange(28))[:, None, :].expand(n, 28, 28)
    shifted = padded[torch.arange(n)[:, None, None], rows, cols]
    flip = torch.rand(n, generator=generator) < 0.5
    shifted[flip] = shifted[flip].flip(-1)
    return shifted


def accuracy(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, batch: int = 500) -> float:
    model.eval()
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(labels), batch):
            logits = model(to_input(images[start:start + batch]))
            correct += int((logits.argmax(-1) == torch.as_tensor(labels[start:start + batch])).sum())
    return correct / len(labels)


def shuffled_batches(count: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """One epoch: a fresh permutation of ``range(count)`` in full batches (the remainder is dropped)."""
    order = torch.randperm(count, generator=generator)
    for start in range(0, count - batch_size + 1, batch_size):
        yield order[start:start + batch_size]


def optimizer_and_schedule(model: torch.nn.Module, no_decay: Callable[[str, torch.nn.Parameter], bool], lr: float,
                           weight_decay: float, warmup_steps: int, total_steps: int) -> tuple[Any, Any]:
    """AdamW (no weight decay on the parameters ``no_decay`` picks), linear warm-up over ``warmup_steps``,
    then cosine decay to 0 at ``total_steps``; step the scheduler once per optimizer step."""
    parameters = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": [p for n, p in parameters if not no_decay(n, p)], "weight_decay": weight_decay},
         {"params": [p for n, p in parameters if no_decay(n, p)], "weight_decay": 0.0}], lr=lr)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def fit(model: torch.nn.Module, optimizer: Any, scheduler: Any, epochs: int, batches: Callable[[], Iterable[Any]],
        loss_of: Callable[[Any], torch.Tensor], evaluate: Callable[[], dict[str, float]],
        max_grad_norm: float | None = None, after_step: Callable[[], None] | None = None) -> list[dict[str, Any]]:
    """The training loop the trainers share: per epoch, one optimizer and scheduler step per batch of
    ``batches()`` on ``loss_of(batch)`` (gradients clipped to ``max_grad_norm`` when given, then
    ``after_step``), then a record of the mean training loss, ``evaluate()`` and the minutes so far,
    printed as a JSON line. Returns the records."""
    history = []
    started = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        losses = []
        for batch in batches():
            loss = loss_of(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            optimizer.step()
            scheduler.step()
            if after_step is not None:
                after_step()
            losses.append(loss.item())
        if not losses:
            raise ValueError("an epoch yielded no batch: the training set (or grids_per_epoch) is smaller than one "
                             "batch; use a smaller batch size or more data")
        record = {"epoch": epoch + 1, "train_loss": sum(losses) / len(losses), **evaluate(),
                  "minutes": (time.perf_counter() - started) / 60}
        history.append(record)
        print(json.dumps(record), flush=True)
    return history


def clip_initialisation(clip_weights: Path) -> dict[str, torch.Tensor]:
    """mini-vit's starting point: mini-clip's image tower, with the zero-shot classifier of the class
    prompts as the head (:func:`vtprune.evals.mini.models.vit_state_from_clip`)."""
    from safetensors.torch import load_file

    from .models import build_mini_clip, vit_state_from_clip

    if not clip_weights.exists():
        raise FileNotFoundError(f"mini-vit is fine-tuned from mini-clip, whose weights {clip_weights} do not exist; "
                                "train them first with `python -m vtprune.evals.mini.train clip`, or pass --init")
    clip = build_mini_clip()
    clip.load_state_dict({key: value.float() for key, value in load_file(clip_weights).items()})
    classifier = zero_shot_classifier(clip)
    return {key: value.clone() for key, value in vit_state_from_clip(clip.visual.state_dict(), classifier).items()}


def train_vit(data: Path, seed: int, epochs: int, batch_size: int = 64, lr: float = 2e-4,
              weight_decay: float = 0.05, warmup_steps: int = 200, label_smoothing: float = 0.0,
              augmentation: bool = False,
              init: Path | None = WEIGHTS / "mini-clip.safetensors") -> tuple[torch.nn.Module, dict]:
    """Fine-tunes mini-clip's image tower (``init``; ``None``: from scratch) as a 10-way classifier, the
    head starting as the zero-shot classifier; cross-entropy, AdamW, linear warm-up then cosine decay,
    optional label smoothing and shift + flip augmentation (off). From scratch, a 6-block tower underfitted
    within the CPU hour (84.8 % test top-1 after 5 epochs with batch 128, smoothing 0.1 and augmentation;
    82.6 % after 3 with batch 64, lr 1e-3 and 500 warm-up steps)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    train, test = load_split("train", data), load_split("test", data)
    held_out = eval_indices(test.labels)
    model = build_mini_vit()
    if init is not None:
        model.load_state_dict(clip_initialisation(init))
    steps_per_epoch = len(train) // batch_size
    no_decay = lambda name, p: p.ndim < 2 or "pos_embed" in name or "cls_token" in name  # noqa: E731
    optimizer, scheduler = optimizer_and_schedule(model, no_decay, lr, weight_decay, warmup_steps,
                                                  steps_per_epoch * epochs)
    images, labels = torch.as_tensor(train.images), torch.as_tensor(train.labels)

    def loss_of(index: torch.Tensor) -> torch.Tensor:
        x = to_input(augment(images[index], generator) if augmentation else images[index])
        return F.cross_entropy(model(x), labels[index], label_smoothing=label_smoothing)

    def evaluate() -> dict[str, float]:
        return {"test_top1": accuracy(model, test.images, test.labels),
                "eval_set_top1": accuracy(model, test.images[held_out], test.labels[held_out])}

    start = evaluate() if init is not None else None
    history = fit(model, optimizer, scheduler, epochs, lambda: shuffled_batches(len(train), batch_size, generator),
                  loss_of, evaluate)
    recipe = {"init": "mini-clip image tower + zero-shot head" if init is not None else "random",
              "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "warmup_steps": warmup_steps,
              "label_smoothing": label_smoothing, "augmentation": augmentation}
    return model.eval(), {"history": history, "recipe": recipe, "before_fine_tuning": start}


def sample_captions(labels: np.ndarray, brightness: np.ndarray, size: np.ndarray,
                    rng: np.random.Generator) -> tuple[list[str], np.ndarray, np.ndarray]:
    """One training caption per image: a random template; no attribute (probability 0.5), brightness only
    (0.2), size only (0.1) or both (0.2). Returns the captions and which attributes each one names."""
    from .text import TEMPLATES, caption

    choice = rng.choice(4, size=len(labels), p=[0.5, 0.2, 0.1, 0.2])
    names_b, names_s = np.isin(choice, (1, 3)), np.isin(choice, (2, 3))
    templates = rng.integers(0, len(TEMPLATES), len(labels))
    texts = [caption(int(label), int(b) if nb else None, int(s) if ns else None, TEMPLATES[t])
             for label, b, s, nb, ns, t in zip(labels, brightness, size, names_b, names_s, templates)]
    return texts, names_b, names_s


def compatible(labels: torch.Tensor, brightness: torch.Tensor, size: torch.Tensor, names_b: torch.Tensor,
               names_s: torch.Tensor) -> torch.Tensor:
    """``M[i, j]``: caption ``j`` is true of image ``i`` (same class, and the attributes it names agree)."""
    same = labels[:, None] == labels[None, :]
    same &= ~names_b[None, :] | (brightness[:, None] == brightness[None, :])
    same &= ~names_s[None, :] | (size[:, None] == size[None, :])
    return same.float()


def zero_shot_classifier(model: torch.nn.Module) -> torch.Tensor:
    """``[10, embed]``: mini-clip's normalised text embeddings of the class prompts ``"a photo of a {name}."``
    (:func:`vtprune.evals.mini.text.caption`)."""
    from .data import CLASS_NAMES
    from .models import tokenizer
    from .text import caption

    model.eval()
    with torch.inference_mode():
        return F.normalize(model.encode_text(tokenizer()([caption(i) for i in range(len(CLASS_NAMES))])), dim=-1)


def zero_shot_accuracy(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray) -> float:
    text = zero_shot_classifier(model)
    with torch.inference_mode():
        correct = 0
        for start in range(0, len(labels), 500):
            features = F.normalize(model.encode_image(to_input(images[start:start + 500])), dim=-1)
            correct += int(((features @ text.T).argmax(-1) == torch.as_tensor(labels[start:start + 500])).sum())
    return correct / len(labels)


def retrieval_r1(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Image->text and text->image recall@1 on the attribute gallery (:func:`text.retrieval_gallery`)."""
    from .models import tokenizer
    from .text import retrieval_gallery

    gallery = retrieval_gallery(images, labels)
    captions = [text for _, texts in gallery for text in texts]
    owners = torch.tensor([row for row, (_, texts) in enumerate(gallery) for _ in texts])
    model.eval()
    with torch.inference_mode():
        image = F.normalize(model.encode_image(to_input(images[[index for index, _ in gallery]])), dim=-1)
        text = F.normalize(model.encode_text(tokenizer()(captions)), dim=-1)
    similarity = image @ text.T
    i2t = (owners[similarity.argmax(dim=1)] == torch.arange(len(gallery))).float().mean()
    t2i = (similarity.argmax(dim=0) == owners).float().mean()
    return {"i2t_r1": float(i2t), "t2i_r1": float(t2i)}


def train_clip(data: Path, seed: int, epochs: int, batch_size: int = 128, lr: float = 1e-3,
               weight_decay: float = 0.1, warmup_steps: int = 500,
               augmentation: bool = False) -> tuple[torch.nn.Module, dict]:
    """Contrastive training with the captions of :func:`sample_captions`. Captions repeat within a batch
    (ten classes), so the targets are soft: an image's target is spread over every caption true of it,
    and a caption's over every image it is true of (:func:`compatible`), instead of CLIP's one-hot
    diagonal. AdamW, warm-up then cosine decay; optional shift + flip augmentation (off, as for mini-vit)."""
    from .models import build_mini_clip, tokenizer
    from .text import attributes

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    train, test = load_split("train", data), load_split("test", data)
    held_out = eval_indices(test.labels)
    brightness, size = attributes(train.images)
    model = build_mini_clip()
    tokenize = tokenizer()
    steps_per_epoch = len(train) // batch_size
    no_decay = lambda name, p: p.ndim < 2 or "positional" in name or "class_embedding" in name or "logit_scale" in name  # noqa: E731,E501
    optimizer, scheduler = optimizer_and_schedule(model, no_decay, lr, weight_decay, warmup_steps,
                                                  steps_per_epoch * epochs)
    images = torch.as_tensor(train.images)

    def loss_of(index: torch.Tensor) -> torch.Tensor:
        index = index.numpy()
        texts, names_b, names_s = sample_captions(train.labels[index], brightness[index], size[index], rng)
        targets = compatible(*(torch.as_tensor(a) for a in (train.labels[index], brightness[index], size[index],
                                                            names_b, names_s)))
        pixels = augment(images[index], generator) if augmentation else images[index]
        image_features, text_features, scale = model(to_input(pixels), tokenize(texts))
        logits = scale * image_features @ text_features.T
        return 0.5 * (F.cross_entropy(logits, targets / targets.sum(1, keepdim=True))
                      + F.cross_entropy(logits.T, (targets / targets.sum(0, keepdim=True)).T))

    def clamp_scale() -> None:
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))

    def evaluate() -> dict[str, float]:
        return {"test_zero_shot_top1": zero_shot_accuracy(model, test.images, test.labels),
                "eval_set_zero_shot_top1": zero_shot_accuracy(model, test.images[held_out], test.labels[held_out]),
                **{f"eval_set_{key}": value for key, value in
                   retrieval_r1(model, test.images[held_out], test.labels[held_out]).items()}}

    history = fit(model, optimizer, scheduler, epochs, lambda: shuffled_batches(len(train), batch_size, generator),
                  loss_of, evaluate, after_step=clamp_scale)
    recipe = {"batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "warmup_steps": warmup_steps,
              "augmentation": augmentation}
    return model.eval(), {"history": history, "recipe": recipe}


def llava_batch(processor, images: np.ndarray, items: list, answers: bool = True) -> dict[str, torch.Tensor]:
    """The processor's batch for grid questions (left-padded), with ``labels`` on the answer words and
    ``</s>`` only when ``answers``."""
    from PIL import Image

    from .grids import compose

    prompts = [f"USER: <image>\n{item.question} ASSISTANT:" for item in items]
    if answers:
        prompts = [f"{prompt} {item.answer} </s>" for prompt, item in zip(prompts, items)]
    grids = [Image.fromarray(compose(images, item.items)).convert("RGB") for item in items]
    batch = processor(images=grids, text=prompts, return_tensors="pt", padding=True)
    if answers:
        batch["labels"] = answer_labels(batch["input_ids"], items)
    return dict(batch)


def answer_labels(input_ids: torch.Tensor, items: list, ends: list[int] | None = None) -> torch.Tensor:
    """Next-token targets on each row's answer words and ``</s>``, ``-100`` elsewhere. Prompts end with
    ``" {answer} </s>"``, so those are the row's last real tokens: the last ones of the row when it is
    left-padded (``ends=None``), else the ones before ``ends[row]``."""
    labels = torch.full_like(input_ids, -100)
    for row, item in enumerate(items):
        end = input_ids.shape[1] if ends is None else ends[row]
        start = end - len(item.answer.split()) - 1
        labels[row, start:end] = input_ids[row, start:end]
    return labels


def llava_accuracy(model, processor, images: np.ndarray, items: list, batch_size: int = 50) -> dict[str, float]:
    """Greedy answers (3 new tokens at most) against the references: overall and per question kind."""
    model.eval()
    right: dict[str, list[bool]] = {}
    with torch.inference_mode():
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            batch = {key: value.to(model.device) for key, value in
                     llava_batch(processor, images, chunk, answers=False).items()}
            generated = model.generate(**batch, max_new_tokens=3, do_sample=False)
            texts = processor.batch_decode(generated[:, batch["input_ids"].shape[1]:].cpu(), skip_special_tokens=True)
            for item, text in zip(chunk, texts):
                right.setdefault(item.kind, []).append(text.strip() == item.answer)
    every = [value for values in right.values() for value in values]
    return {"accuracy": sum(every) / len(every), **{kind: sum(v) / len(v) for kind, v in right.items()}}


def grid_pixels(images: np.ndarray, grids: np.ndarray, generator: torch.Generator | None = None) -> torch.Tensor:
    """``[N, 4]`` image indices (quadrants in raster order) -> normalised ``[N, 3, 56, 56]`` grids, as
    mini-llava's processor makes them (56x56 in, no resize). With a ``generator``, each item is first
    shifted and flipped by :func:`augment`, within its quadrant."""
    from .grids import compose

    items = images[np.asarray(grids).reshape(-1)]
    if generator is not None:
        items = augment(torch.as_tensor(items), generator).numpy()
    return to_input(np.stack([compose(items, tuple(range(4 * n, 4 * n + 4))) for n in range(len(grids))]))


def projector_input(tower: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """``[N, 196, width]``: the patch tokens of the hidden state mini-llava hands to its projector
    (``vision_feature_layer=-2``, ``vision_feature_select_strategy="default"``: CLS dropped)."""
    return tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]


def quadrant_logits(tower: torch.nn.Module, head: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """``[N, 4, 10]``: ``head`` on the mean of each quadrant's 7x7 patch tokens in :func:`projector_input`."""
    hidden = projector_input(tower, pixels)
    n, side = hidden.shape[0], int(hidden.shape[1] ** 0.5)
    grid = hidden.reshape(n, 2, side // 2, 2, side // 2, -1)
    return head(grid.mean(dim=(2, 4)).reshape(n, 4, -1))


def pretrain_llava_tower(model: torch.nn.Module, train: Any, test: Any, held_out: np.ndarray, evaluation: list,
                         epochs: int, generator: torch.Generator, batch_size: int = 64, lr: float = 2e-3,
                         weight_decay: float = 0.05, warmup_steps: int = 200, augmentation: bool = False,
                         label_smoothing: float = 0.0) -> list[dict]:
    """Stage 1: mini-llava's CLIP vision tower learns to classify the item in each quadrant of random grids
    of training images (a linear head on each quadrant's mean feature, discarded afterwards), so that the
    features the projector reads are already about the items, as LLaVA's are after CLIP pretraining.
    An epoch is ``len(train) // 4 // batch_size`` batches of ``batch_size`` random grids (each training image
    at most once). Accuracy: per item, on
    grids of the held-out images, and the share of ``evaluation`` (questions on grids of the held-out images)
    that :func:`grids.ideal_answer` gets right from the head's probabilities: what a decoder reading this
    tower could reach. ``augmentation``: each training item shifted and flipped within its quadrant
    (:func:`grid_pixels`). Runs on the device of ``model``."""
    from .grids import ideal_answer

    tower = model.model.vision_tower
    device = next(tower.parameters()).device
    head = torch.nn.Sequential(torch.nn.LayerNorm(tower.config.hidden_size),
                               torch.nn.Linear(tower.config.hidden_size, 10)).to(device)
    both = torch.nn.ModuleDict({"tower": tower, "head": head})
    steps_per_epoch = len(train) // 4 // batch_size
    no_decay = lambda name, p: p.ndim < 2 or "embedding" in name  # noqa: E731
    optimizer, scheduler = optimizer_and_schedule(both, no_decay, lr, weight_decay, warmup_steps,
                                                  steps_per_epoch * epochs)
    labels = torch.as_tensor(train.labels).to(device)
    held_grids = np.arange(len(held_out)).reshape(-1, 4)
    held_images, held_labels = test.images[held_out], torch.as_tensor(test.labels[held_out])

    def loss_of(index: torch.Tensor) -> torch.Tensor:
        grids = index.reshape(-1, 4)
        pixels = grid_pixels(train.images, grids.numpy(), generator if augmentation else None)
        logits = quadrant_logits(tower, head, pixels.to(device))
        return F.cross_entropy(logits.reshape(-1, 10), labels[grids.to(device)].reshape(-1),
                               label_smoothing=label_smoothing)

    def evaluate() -> dict[str, float]:
        tower.eval()
        with torch.inference_mode():
            predicted = quadrant_logits(tower, head, grid_pixels(held_images, held_grids).to(device)).argmax(-1).cpu()
            asked = quadrant_logits(tower, head,
                                    grid_pixels(held_images, np.array([q.items for q in evaluation])).to(device))
        chances = asked.softmax(-1).cpu().numpy()
        ideal = [ideal_answer(p, question) == question.answer for p, question in zip(chances, evaluation)]
        return {"eval_item_top1": float((predicted.reshape(-1) == held_labels[held_grids.reshape(-1)]).float().mean()),
                "eval_ideal_reader": sum(ideal) / len(ideal)}

    return fit(both, optimizer, scheduler, epochs,
               lambda: shuffled_batches(len(train), 4 * batch_size, generator), loss_of, evaluate)


def shared_prefix_forward(model: torch.nn.Module, processor: Any, images: np.ndarray,
                          groups: list[list[Any]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and logits for several questions per grid (``groups``: lists of :class:`GridQuestion` on the same
    grid), computing what the questions share once per grid. mini-llava's prompt
    ``"USER: <image>\\n{question} ASSISTANT: {answer} </s>"`` opens with the same prefix for every question
    about a grid (``USER:`` and the 196 image tokens), and the decoder is causal, so the prefix's keys and
    values do not depend on the question: the frozen tower, the projector and the decoder run once on each
    grid's prefix, the prefix cache is repeated for the grid's questions, and the decoder runs on the
    questions alone (right-padded). Returns the mean next-token loss on the answer words and ``</s>``, as
    LLaVA's own forward computes it, and the logits ``[questions, longest suffix, vocabulary]`` of the
    question tokens (row ``r``'s first ``len(tokens)`` positions are real)."""
    llava, tokenizer, device = model.model, processor.tokenizer, model.device
    with torch.no_grad():
        pixels = grid_pixels(images, np.array([group[0].items for group in groups]))
        hidden = projector_input(llava.vision_tower, pixels.to(device))
    features = llava.multi_modal_projector(hidden)
    user = tokenizer("USER:", add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
    prefix = torch.cat([model.get_input_embeddings()(user).expand(len(groups), -1, -1), features], dim=1)
    cache = llava.language_model(inputs_embeds=prefix, use_cache=True).past_key_values
    cache.reorder_cache(torch.arange(len(groups), device=device).repeat_interleave(
        torch.tensor([len(group) for group in groups], device=device)))
    rows = [item for group in groups for item in group]
    suffix = tokenizer([f"{item.question} ASSISTANT: {item.answer} </s>" for item in rows], add_special_tokens=False,
                       padding=True, padding_side="right", return_tensors="pt")
    ids, mask, length = suffix["input_ids"].to(device), suffix["attention_mask"].to(device), prefix.shape[1]
    out = llava.language_model(input_ids=ids, past_key_values=cache,
                               attention_mask=torch.cat([mask.new_ones(len(rows), length), mask], 1),
                               position_ids=(length + torch.arange(ids.shape[1], device=device)).expand(len(rows), -1))
    logits = model.lm_head(out.last_hidden_state)
    targets = answer_labels(ids, rows, ends=mask.sum(dim=1).tolist())
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets[:, 1:].reshape(-1))
    return loss, logits


def train_llava(data: Path, seed: int, epochs: int, grids_per_batch: int = 6, lr: float = 7e-4,
                weight_decay: float = 0.05, warmup_steps: int = 200, grids_per_epoch: int = 6500,
                tower_epochs: int = 16, tower_batch_size: int = 64, tower_lr: float = 2e-3,
                tower_augmentation: bool = False, tower_label_smoothing: float = 0.0,
                tower: Path | None = None, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """Two stages, as LLaVA's recipe has a pretrained CLIP tower that stays frozen:
    :func:`pretrain_llava_tower` for ``tower_epochs``, then next-token loss on the answers of questions
    about fresh random grids of training images, the tower frozen and the projector and decoder trained.
    Each grid comes with seven questions (:func:`grids.related_questions`: a balanced random question, the
    four position questions and a presence and a count question), all in one batch, so the tower runs once
    per grid, and so does the decoder on what the questions share (:func:`shared_prefix_forward`). AdamW,
    warm-up then cosine decay. Accuracy: 600 single questions on grids of the held-out evaluation images,
    through ``generate``, overall and per kind. ``tower``: a mini-llava checkpoint directory whose vision
    tower replaces stage 1 (``tower_epochs`` is then ignored). ``device``: where both stages run (the data
    pipeline stays on the CPU)."""
    from .grids import make_question, questions, related_questions
    from .models import build_mini_llava, build_mini_llava_processor

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    train, test = load_split("train", data), load_split("test", data)
    held_out = eval_indices(test.labels)
    held_images, held_labels = test.images[held_out], test.labels[held_out]
    evaluation = questions(held_labels, 600, seed=1)
    by_class = [np.flatnonzero(train.labels == label) for label in range(10)]
    model, processor = build_mini_llava().to(device), build_mini_llava_processor()
    if tower is not None:
        from transformers import LlavaForConditionalGeneration

        checkpoint = LlavaForConditionalGeneration.from_pretrained(tower, dtype=torch.float32)
        model.model.vision_tower.load_state_dict(checkpoint.model.vision_tower.state_dict())
        tower_history, tower_epochs = [], 0
    else:
        tower_history = pretrain_llava_tower(model, train, test, held_out, evaluation, tower_epochs, generator,
                                             batch_size=tower_batch_size, lr=tower_lr,
                                             augmentation=tower_augmentation,
                                             label_smoothing=tower_label_smoothing) if tower_epochs else []
    model.model.vision_tower.requires_grad_(False)
    steps_per_epoch = grids_per_epoch // grids_per_batch
    no_decay = lambda name, p: p.ndim < 2 or "norm" in name or "embedding" in name  # noqa: E731
    optimizer, scheduler = optimizer_and_schedule(model, no_decay, lr, weight_decay, warmup_steps,
                                                  steps_per_epoch * epochs)

    def batches() -> Iterator[list]:
        for _ in range(steps_per_epoch):
            yield [related_questions(make_question(train.labels, by_class, rng), train.labels, rng)
                   for _ in range(grids_per_batch)]

    def loss_of(groups: list) -> torch.Tensor:
        model.model.vision_tower.eval()
        return shared_prefix_forward(model, processor, train.images, groups)[0]

    def evaluate() -> dict[str, float]:
        return {f"eval_{key}": value for key, value in
                llava_accuracy(model, processor, held_images, evaluation).items()}

    history = fit(model, optimizer, scheduler, epochs, batches, loss_of, evaluate, max_grad_norm=1.0)
    stage_one = {"epochs": tower_epochs, "batch_size": tower_batch_size, "lr": tower_lr, "weight_decay": 0.05,
                 "warmup_steps": 200, "augmentation": tower_augmentation, "label_smoothing": tower_label_smoothing}
    recipe = {"tower": {"from": str(tower)} if tower is not None else stage_one,
              "llava": {"tower": "frozen", "grids_per_batch": grids_per_batch, "questions_per_grid": 7, "lr": lr,
                        "weight_decay": weight_decay, "warmup_steps": warmup_steps,
                        "grids_per_epoch": grids_per_epoch}}
    return model.eval(), {"tower_history": tower_history, "history": history, "recipe": recipe}


TRAINERS = {"vit": ("mini-vit", train_vit), "clip": ("mini-clip", train_clip), "llava": ("mini-llava", train_llava)}
DEFAULT_EPOCHS = {"vit": 2, "clip": 4, "llava": 7}


def save(model: torch.nn.Module, name: str, out: Path, record: dict) -> None:
    """``<name>.safetensors`` (float16) and ``<name>.json``; a Hugging Face model (mini-llava) is saved as a
    checkpoint directory ``<name>/`` (float16 weights, config, processor) that ``from_pretrained`` reads."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "save_pretrained"):
        from .models import build_mini_llava_processor

        model.to("cpu", torch.float16).save_pretrained(out / name)
        build_mini_llava_processor().save_pretrained(out / name)
        (out / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
        return
    save_file({key: value.detach().to(torch.float16).contiguous() for key, value in model.state_dict().items()},
              out / f"{name}.safetensors")
    (out / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vtprune.evals.mini.train", description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=sorted(TRAINERS))
    parser.add_argument("--data", type=Path, default=DEFAULT_ROOT, help="directory of the Fashion-MNIST IDX files")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"default: {', '.join(f'{model} {count}' for model, count in DEFAULT_EPOCHS.items())}")
    parser.add_argument("--out", type=Path, default=WEIGHTS)
    parser.add_argument("--tower", type=Path, default=None,
                        help="llava only: take the vision tower from this mini-llava checkpoint directory instead of "
                             "training it (stage 1)")
    parser.add_argument("--device", default="cpu",
                        help="llava only: where to train (cpu, cuda, cuda:1, ...); the other models train on the CPU")
    parser.add_argument("--init", default=None,
                        help="vit only: the mini-clip weights to fine-tune (default: OUT/mini-clip.safetensors), or "
                             "'scratch' for random initialisation")
    args = parser.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    name, trainer = TRAINERS[args.model]
    if args.epochs is not None and args.epochs < 1:
        parser.error(f"--epochs must be at least 1, not {args.epochs}")
    epochs = args.epochs if args.epochs is not None else DEFAULT_EPOCHS[args.model]
    started = time.perf_counter()
    if args.init is not None and args.model != "vit":
        parser.error(f"--init applies to vit only, not {args.model}")
    if args.tower is not None and args.model != "llava":
        parser.error(f"--tower applies to llava only, not {args.model}")
    if args.device != "cpu" and args.model != "llava":
        parser.error(f"--device applies to llava only, not {args.model}; vit and clip train on the CPU")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this PyTorch sees no CUDA device (torch.cuda.is_available() is "
                     "False); use --device cpu")
    options: dict[str, Any] = {"tower": args.tower} if args.tower is not None else {}
    if args.model == "llava":
        options["device"] = args.device
    if args.model == "vit":
        options["init"] = None if args.init == "scratch" else Path(args.init or args.out / "mini-clip.safetensors")
    model, record = trainer(args.data, args.seed, epochs, **options)
    record.update(model=name, seed=args.seed, epochs=epochs, command=" ".join(["python -m vtprune.evals.mini.train",
                                                                               *(sys.argv[1:] if argv is None else argv)]),
                  wall_minutes=(time.perf_counter() - started) / 60, torch=torch.__version__,
                  machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
                  + (f", {torch.cuda.get_device_name(args.device)}" if args.device.startswith("cuda") else ""))
    save(model, name, args.out, record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
