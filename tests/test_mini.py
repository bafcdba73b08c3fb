"""vtprune-mini: the Fashion-MNIST reader, the shipped evaluation set, the shipped models' accuracy, and the
runner on them (`--model mini:NAME --data mini`)."""
import gzip
import json

import numpy as np
import pytest
import torch

from vtprune.evals.mini import CLASS_NAMES, eval_set, load
from vtprune.evals.mini.data import eval_indices, load_split, read_idx
from vtprune.evals.mini.suite import image_folder
from vtprune.evals.mini.train import augment, to_input
from vtprune.evals.runner import EvalConfig, run


def write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(size).to_bytes(4, "big") for size in array.shape)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as stream:
        stream.write(header + array.astype(np.uint8).tobytes())


def test_idx_files_are_read_plain_or_gzipped_and_bad_ones_are_named(tmp_path):
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (30, 28, 28)), np.arange(30) % 10
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels)
    split = load_split("test", tmp_path)
    assert np.array_equal(split.images, images) and np.array_equal(split.labels, labels)
    (tmp_path / "bad").write_bytes(b"\x08\x00\x00\x01" + bytes(8))
    with pytest.raises(ValueError, match="not an unsigned-byte IDX file"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(b"\x00\x00")
    with pytest.raises(ValueError, match="short is not an unsigned-byte IDX file"):
        read_idx(tmp_path / "short")
    whole = (tmp_path / "t10k-labels-idx1-ubyte").read_bytes()
    (tmp_path / "cut").write_bytes(whole[:-5])
    with pytest.raises(ValueError, match=r"cut holds 33 bytes, but its header \(shape \(30,\)\) needs 38"):
        read_idx(tmp_path / "cut")
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte.*apt-get install dataset-fashion-mnist"):
        load_split("train", tmp_path)
    with pytest.raises(ValueError, match="accepted: train, test"):
        load_split("val", tmp_path)


def test_the_shipped_eval_set_is_balanced_and_from_the_test_split():
    from vtprune.evals.mini.data import EVAL_SET

    data = eval_set()
    assert data.images.shape == (2000, 28, 28) and data.images.dtype == np.uint8
    assert np.bincount(data.labels).tolist() == [200] * 10
    with np.load(EVAL_SET) as stored:
        indices = stored["test_indices"]
    assert len(indices) == 2000 and np.all(np.diff(indices) > 0) and indices.max() < 10000  # t10k indices
    # eval_indices draws per_class of each class, sorted, the same for the same seed
    labels = np.arange(10000) % 10
    drawn = eval_indices(labels)
    assert np.array_equal(drawn, eval_indices(labels)) and np.bincount(labels[drawn]).tolist() == [200] * 10
    assert np.all(np.diff(drawn) > 0) and not np.array_equal(drawn, eval_indices(labels, seed=1))


def test_the_ideal_reader_answers_from_quadrant_probabilities():
    """grids.ideal_answer: certain probabilities give every reference answer; uncertain ones give the
    likeliest answer (presence: P(none) = 0.7^4 = 0.24 -> yes; count: Binomial(4, 0.3) peaks at 1;
    at the top right, coat is likeliest at 0.3)."""
    from vtprune.evals.mini.grids import GridQuestion, ideal_answer, questions

    labels = np.arange(200) % 10
    asked = questions(labels, 60, seed=3)
    for question in asked:
        certain = np.eye(10)[labels[list(question.items)]]
        assert ideal_answer(certain, question) == question.answer
    items = (0, 1, 2, 3)
    rare = np.full((4, 10), 0.9 / 9)
    rare[:, 4] = 0.1  # P(none) = 0.9^4 = 0.66
    assert ideal_answer(rare, GridQuestion(items, "is there a coat ?", "no", "presence", 4)) == "no"
    assert ideal_answer(rare, GridQuestion(items, "how many coat items are there ?", "0", "count", 4)) == "0"
    unsure = np.full((4, 10), 0.7 / 9)
    unsure[:, 4] = 0.3
    assert ideal_answer(unsure, GridQuestion(items, "is there a coat ?", "yes", "presence", 4)) == "yes"
    assert ideal_answer(unsure, GridQuestion(items, "how many coat items are there ?", "1", "count", 4)) == "1"
    assert ideal_answer(unsure, GridQuestion(items, "what is at the top right ?", "coat", "position")) == "coat"
    with pytest.raises(ValueError, match="subject"):
        ideal_answer(unsure, GridQuestion(items, "how many coat items are there ?", "1", "count"))


def test_augment_shifts_and_flips_within_bounds():
    generator = torch.Generator().manual_seed(0)
    images = torch.zeros(64, 28, 28, dtype=torch.uint8)
    images[:, 10:18, 4:8] = 255  # a bar left of centre
    out = augment(images, generator)
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert (out.flatten(1).sum(1) == 255 * 32).all()  # a shift of <= 2 px never cuts the bar
    columns = out.amax(dim=1).nonzero()[:, 1]
    assert columns.min() >= 2 and columns.max() <= 25 and (out[:, :, 14:].amax(dim=(1, 2)) > 0).any()  # flipped
    x = to_input(out[:2])
    assert x.shape == (2, 3, 28, 28) and torch.equal(x[:, 0], x[:, 2])


def test_image_folder_holds_the_eval_set_in_label_order(tmp_path):
    folder = image_folder(tmp_path)
    classes = sorted(entry.name for entry in folder.iterdir() if entry.is_dir())
    assert classes[0] == "0_t-shirt" and classes[9] == "9_ankle-boot"
    assert (folder / "classnames.txt").read_text().splitlines() == list(CLASS_NAMES)
    assert sum(len(list((folder / name).glob("*.png"))) for name in classes) == 2000
    from PIL import Image

    data = eval_set()
    first = sorted((folder / classes[data.labels[0]]).glob("*.png"))[0]
    assert np.array_equal(np.asarray(Image.open(first)), data.images[0])
    assert image_folder(tmp_path) == folder  # reused


def test_the_runner_takes_mini_models_and_data(tmp_path):
    summary = run(EvalConfig(model="mini:vit", task="classification", data="mini", weights="random", limit=20,
                             batch_size=10, policies=("tome:r=8",), out=str(tmp_path / "out")), progress=False)
    results = {entry["configuration"]: entry for entry in summary["results"]}
    assert list(results) == ["none (unpruned)", "tome:r=8"]
    assert results["tome:r=8"]["tokens_per_layer"] == [197, 189, 181, 173]  # 4 blocks
    assert summary["config"]["data"] == "mini" and (tmp_path / "out" / "mini-data" / "fashion-mnist-eval").is_dir()
    with pytest.raises(ValueError, match="accepted: mini-vit"):
        load("mini-bert")


def test_mini_clip_and_mini_llava_run_on_their_mini_data(tmp_path):
    out = tmp_path / "clip"
    summary = run(EvalConfig(model="mini:clip", task="retrieval", data="mini", weights="random", limit=12,
                             batch_size=6, policies=("pitome:ratio=0.9",), out=str(out)), progress=False)
    gallery = (out / "mini-data" / "fashion-mnist-retrieval" / "gallery.jsonl").read_text().splitlines()
    captions = [caption for line in gallery for caption in json.loads(line)["captions"]]
    assert len(captions) == len(set(captions)) == 3 * len(gallery)  # every caption has one right image
    assert summary["results"][1]["tokens_per_layer"] == [197, 178, 161, 145]
    out = tmp_path / "llava"
    summary = run(EvalConfig(model="mini:llava", task="vqa", data="mini", weights="random", limit=6, batch_size=3,
                             policies=("visionzip:keep=64",), out=str(out)), progress=False)
    results = {entry["configuration"]: entry for entry in summary["results"]}
    assert results["none (unpruned)"]["tokens_final"] == 196 and results["randomkeep:keep=64"]["tokens_final"] == 64
    lines = [json.loads(line) for line in
             (out / "mini-data" / "fashion-mnist-grids" / "questions.jsonl").read_text().splitlines()]
    assert len(lines) == 600 and [line["category"] for line in lines[:3]] == ["grid position", "grid presence",
                                                                              "grid count"]


def test_the_open_clip_transform_is_the_models_own():
    from PIL import Image

    from vtprune.evals.mini.models import MEAN, STD
    from vtprune.evals.tasks import ZeroShotTask

    model = load("mini-clip", weights="random")
    pixels = ZeroShotTask()._transform(model)(Image.new("RGB", (28, 28), (51, 51, 51)))
    assert pixels.shape == (3, 28, 28)
    assert torch.allclose(pixels, torch.full_like(pixels, (51 / 255 - MEAN) / STD), atol=1e-6)


def test_missing_trained_weights_are_named_with_the_training_command(tmp_path, monkeypatch):
    from vtprune.evals.mini import models

    monkeypatch.setattr(models, "WEIGHTS", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"mini-clip.safetensors.*python -m vtprune.evals.mini.train clip"):
        load("mini-clip")
    with pytest.raises(FileNotFoundError, match=r"\(mini-llava\).*mini.train llava"):
        load("mini-llava")
    assert load("mini-llava", weights="random").config.image_token_id == len(models.MINI_LLAVA_WORDS)


def test_mini_clip_reaches_its_zero_shot_accuracy_and_merging_keeps_most_of_it(tmp_path):
    """Thresholds set from the shipped model's measured values with a margin (docs/mini.md): unpruned
    zero-shot top-1 88.35 % on the shipped set; ToMe r=8 / r=16 keep 100.1 / 99.1 % of it, PiToMe 0.9 / 0.8
    keep 97.8 / 95.6 %."""
    summary = run(EvalConfig(model="mini:clip", task="zeroshot", data="mini", batch_size=250, out=str(tmp_path),
                             policies=("tome:r=8", "tome:r=16", "pitome:ratio=0.9", "pitome:ratio=0.8")),
                  progress=False)
    results = {entry["configuration"]: entry for entry in summary["results"]}
    assert results["none (unpruned)"]["metrics"]["top1"] >= 0.875  # measured 0.8835 (the issue asks for 0.80)
    kept = {label: entry["percent_of_unpruned"]["top1"] for label, entry in results.items()}
    assert kept["tome:r=8"] >= 98 and kept["tome:r=16"] >= 97
    assert kept["pitome:ratio=0.9"] >= 95.5 and kept["pitome:ratio=0.8"] >= 93
    # fewer tokens, less agreement with the unpruned model
    agreement = {label: entry["metrics"]["agreement"] for label, entry in results.items()}
    assert agreement["tome:r=8"] > agreement["tome:r=16"] and agreement["pitome:ratio=0.9"] > agreement[
        "pitome:ratio=0.8"]


def test_mini_clip_retrieves_by_attributes(tmp_path):
    summary = run(EvalConfig(model="mini:clip", task="retrieval", data="mini", batch_size=100, out=str(tmp_path)),
                  progress=False)
    metrics = summary["results"][0]["metrics"]
    # 78 images, 234 captions that differ only in class, brightness and size; chance R@1 is 1/78
    assert metrics["i2t_r1"] >= 0.55 and metrics["t2i_r1"] >= 0.65  # measured 0.6154 and 0.7179


def test_the_training_schedule_and_batches():
    from vtprune.evals.mini.train import optimizer_and_schedule, shuffled_batches

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    optimizer, scheduler = optimizer_and_schedule(model, lambda name, p: p.ndim < 2, lr=1.0, weight_decay=0.1,
                                                  warmup_steps=4, total_steps=12)
    assert [len(group["params"]) for group in optimizer.param_groups] == [1, 3]  # the weight matrix decays
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.1, 0.0]
    rates = []
    for _ in range(12):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0]) and rates[4] == pytest.approx(1.0)
    assert rates[8] == pytest.approx(0.5) and rates[-1] < 0.05 and all(a >= b for a, b in zip(rates[3:], rates[4:]))
    batches = list(shuffled_batches(10, 3, torch.Generator().manual_seed(0)))
    assert [len(batch) for batch in batches] == [3, 3, 3] and len(set(torch.cat(batches).tolist())) == 9


def test_the_trainers_run_end_to_end_and_save_what_load_reads(tmp_path, monkeypatch, capsys):
    """Each trainer for one short epoch on a tiny Fashion-MNIST-shaped split (random pixels: the loop, the
    evaluation and the saved files are under test, not the accuracy)."""
    from vtprune.evals.mini import models
    from vtprune.evals.mini.train import save, train_clip, train_llava, train_vit

    rng = np.random.default_rng(0)
    write_idx(tmp_path / "train-images-idx3-ubyte", rng.integers(0, 256, (64, 28, 28)))
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.arange(64) % 10)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", rng.integers(0, 256, (2000, 28, 28)))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.arange(2000) % 10)
    out = tmp_path / "weights"
    monkeypatch.setattr(models, "WEIGHTS", out)
    trained = {"mini-clip": train_clip(tmp_path, seed=0, epochs=1, batch_size=32, warmup_steps=2)}
    save(trained["mini-clip"][0], "mini-clip", tmp_path / "clip", {})
    trained["mini-vit"] = train_vit(tmp_path, seed=0, epochs=2, batch_size=32, warmup_steps=2,
                                    init=tmp_path / "clip" / "mini-clip.safetensors")
    trained["mini-llava"] = train_llava(tmp_path, seed=0, epochs=1, grids_per_batch=2, warmup_steps=2,
                                        grids_per_epoch=4, tower_epochs=1, tower_batch_size=4,
                                        tower_augmentation=True, tower_label_smoothing=0.1)
    # what each accuracy is counted over: the 2 000 held-out images, or 600 questions about grids of them
    keys = {"mini-vit": ("eval_set_top1", 2000), "mini-clip": ("eval_set_zero_shot_top1", 2000),
            "mini-llava": ("eval_accuracy", 600)}
    for name, (model, record) in trained.items():
        assert [entry["epoch"] for entry in record["history"]] == list(range(1, len(record["history"]) + 1))
        key, count = keys[name]
        assert counted_over(record["history"][-1][key], count) and record["history"][-1]["train_loss"] > 0
        save(model, name, out, record)
        loaded = load(name)
        for key, value in loaded.state_dict().items():
            assert torch.equal(value, model.state_dict()[key].to(torch.float16).float()), (name, key)
    assert len(trained["mini-vit"][1]["history"]) == 2
    assert counted_over(trained["mini-vit"][1]["before_fine_tuning"]["eval_set_top1"], 2000)
    assert [entry["epoch"] for entry in trained["mini-llava"][1]["tower_history"]] == [1]
    assert counted_over(trained["mini-llava"][1]["tower_history"][0]["eval_item_top1"], 2000)
    assert counted_over(trained["mini-llava"][1]["tower_history"][0]["eval_ideal_reader"], 600)
    assert set(trained["mini-llava"][1]["history"][0]) >= {"eval_position", "eval_presence", "eval_count"}
    recipe = trained["mini-llava"][1]["recipe"]
    assert recipe["tower"]["augmentation"] is True and recipe["tower"]["label_smoothing"] == 0.1
    assert recipe["tower"]["lr"] == 2e-3 and recipe["llava"]["lr"] == 7e-4  # the shipped recipe's defaults
    assert capsys.readouterr().out.count('"epoch"') == 5  # one JSON line per epoch


def test_grid_pixels_compose_the_quadrants_and_augment_each_item_within_its_own():
    from vtprune.evals.mini.grids import compose
    from vtprune.evals.mini.train import grid_pixels

    shipped = eval_set()
    grids = np.array([[0, 1, 2, 3], [10, 400, 800, 1999]])
    plain = grid_pixels(shipped.images, grids)
    assert plain.shape == (2, 3, 56, 56)
    assert torch.equal(plain, to_input(np.stack([compose(shipped.images, tuple(row)) for row in grids])))
    augmented = grid_pixels(shipped.images, grids, torch.Generator().manual_seed(3))
    items = augment(torch.as_tensor(shipped.images[grids.reshape(-1)]), torch.Generator().manual_seed(3)).numpy()
    expected = np.stack([compose(items, (4 * n, 4 * n + 1, 4 * n + 2, 4 * n + 3)) for n in range(2)])
    assert torch.equal(augmented, to_input(expected)) and not torch.equal(augmented, plain)


def counted_over(share: float, count: int) -> bool:
    """``share`` is a fraction right out of ``count`` (a float32 mean is within 1e-3 of one)."""
    return 0 <= share <= 1 and abs(share * count - round(share * count)) < 1e-3


def test_the_training_command_records_what_it_ran(tmp_path, monkeypatch):
    from vtprune.evals.mini import train
    from vtprune.evals.mini.models import build_mini_vit

    calls = []

    def tiny_trainer(data, seed, epochs, **options):
        calls.append((data, seed, epochs, options))
        return build_mini_vit(), {"history": []}

    monkeypatch.setitem(train.TRAINERS, "vit", ("mini-vit", tiny_trainer))
    argv = ["vit", "--seed", "3", "--epochs", "5", "--data", str(tmp_path), "--out", str(tmp_path), "--init", "scratch"]
    assert train.main(argv) == 0
    assert calls == [(tmp_path, 3, 5, {"init": None})]
    record = json.loads((tmp_path / "mini-vit.json").read_text())
    assert record["command"] == "python -m vtprune.evals.mini.train " + " ".join(argv)
    assert record["seed"] == 3 and record["epochs"] == 5 and (tmp_path / "mini-vit.safetensors").exists()


def test_an_epoch_without_batches_is_an_error():
    from vtprune.evals.mini.train import fit, optimizer_and_schedule

    model = torch.nn.Linear(2, 2)
    optimizer, scheduler = optimizer_and_schedule(model, lambda name, p: False, 1e-3, 0.0, 1, 2)
    with pytest.raises(ValueError, match="an epoch yielded no batch"):
        fit(model, optimizer, scheduler, 1, lambda: iter(()), lambda batch: model(batch).sum(), dict)


def test_the_training_command_names_what_it_cannot_do(monkeypatch, capsys):
    from vtprune.evals.mini.train import main

    with pytest.raises(SystemExit):
        main(["vit", "--device", "cuda"])
    assert "--device applies to llava only, not vit" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        main(["llava", "--device", "cuda:1"])
    assert "--device cuda:1: this PyTorch sees no CUDA device" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["clip", "--tower", "somewhere"])
    assert "--tower applies to llava only, not clip" in capsys.readouterr().err
    for epochs in ("0", "-2"):
        with pytest.raises(SystemExit):
            main(["vit", "--epochs", epochs])
        assert f"--epochs must be at least 1, not {epochs}" in capsys.readouterr().err


def test_mini_vit_starts_as_mini_clips_zero_shot_classifier():
    """vit_state_from_clip: the timm model's logits are the CLIP image embedding (before normalisation)
    times the class-prompt embeddings, so its predictions are mini-clip's zero-shot predictions."""
    from vtprune.evals.mini.models import WEIGHTS, build_mini_vit, tokenizer
    from vtprune.evals.mini.text import caption
    from vtprune.evals.mini.train import clip_initialisation, zero_shot_accuracy, zero_shot_classifier

    clip, vit = load("mini-clip"), build_mini_vit().eval()
    vit.load_state_dict(clip_initialisation(WEIGHTS / "mini-clip.safetensors"))
    shipped = eval_set()
    pixels = to_input(shipped.images[:300])
    with torch.inference_mode():
        prompts = tokenizer()([caption(i) for i in range(10)])
        classifier = torch.nn.functional.normalize(clip.encode_text(prompts), dim=-1)
        assert torch.equal(zero_shot_classifier(clip), classifier)
        assert torch.allclose(vit(pixels), clip.encode_image(pixels) @ classifier.T, atol=1e-4)
        predicted = vit(to_input(shipped.images)).argmax(-1).numpy()
    assert (predicted == shipped.labels).mean() == pytest.approx(zero_shot_accuracy(clip, shipped.images,
                                                                                     shipped.labels))


def test_seven_questions_per_grid_share_one_prefix_pass_and_match_llavas_own_forward():
    """shared_prefix_forward gives the loss and logits of LlavaForConditionalGeneration's own forward on the
    processor's batch (the tower and the prefix once per grid instead of once per question), and its
    gradients reach the projector through the shared prefix cache."""
    from vtprune.evals.mini.grids import QUADRANTS, make_question, related_questions
    from vtprune.evals.mini.models import build_mini_llava_processor
    from vtprune.evals.mini.train import llava_batch, shared_prefix_forward

    shipped = eval_set()
    rng = np.random.default_rng(0)
    by_class = [np.flatnonzero(shipped.labels == label) for label in range(10)]
    groups = [related_questions(make_question(shipped.labels, by_class, rng), shipped.labels, rng) for _ in range(3)]
    for group in groups:
        labels = [CLASS_NAMES[shipped.labels[index]] for index in group[0].items]
        assert len(group) == 7 and len({item.items for item in group}) == 1
        assert [item.answer for item in group[1:5]] == labels
        assert [item.question for item in group[1:5]] == [f"what is at the {q} ?" for q in QUADRANTS]
        present = group[5].question.removeprefix("is there a ").removesuffix(" ?")
        assert group[5].answer == ("yes" if present in labels else "no")
        counted = group[6].question.removeprefix("how many ").removesuffix(" items are there ?")
        assert group[6].answer == str(labels.count(counted))
    torch.manual_seed(0)
    model, processor = load("mini-llava", weights="random"), build_mini_llava_processor()
    rows = [item for group in groups for item in group]
    loss, logits = shared_prefix_forward(model, processor, shipped.images, groups)
    with torch.no_grad():
        own = model(**llava_batch(processor, shipped.images, rows))
    for row, item in enumerate(rows):
        length = len(f"{item.question} ASSISTANT: {item.answer} </s>".split())
        assert torch.allclose(logits[row, :length], own.logits[row, -length:], atol=1e-5)
    assert loss.item() == pytest.approx(own.loss.item(), rel=1e-5)
    loss.backward()
    projector = model.model.multi_modal_projector.linear_1.weight
    assert projector.grad is not None and projector.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.model.vision_tower.parameters())
