"""``vtprune prepare``: the JSONL a task reads, from a benchmark's public files (see :mod:`.benchmarks`).

    vtprune prepare pope --questions llava_pope_test.jsonl --answers pope/coco --images val2014 --out pope.jsonl
    vtprune prepare coco-karpathy --answers dataset_coco.json --images /data/coco --out coco_test.jsonl
    vtprune prepare imagenet-classnames --images /data/imagenet/val --out /data/imagenet/val/classnames.txt
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Callable

HELP = "convert a benchmark's files (LLaVA eval JSONLs + answers, Karpathy splits) into the JSONL a task reads"

# benchmark -> (task, what --questions is, what --answers is); None: the flag is not used
BENCHMARKS: dict[str, tuple[str, str | None, str | None]] = {
    "gqa": ("vqa", "llava_gqa_testdev_balanced.jsonl", "testdev_balanced_questions.json"),
    "pope": ("vqa", "llava_pope_test.jsonl", "coco_pope_<split>.json files or their folder"),
    "textvqa": ("vqa", "llava_textvqa_val_v051_ocr.jsonl", "TextVQA_0.5.1_val.json"),
    "mme": ("vqa", "llava_mme.jsonl", "the MME_Benchmark_release_version folder"),
    "scienceqa": ("vqa", "llava_test_CQM-A.json", "problems.json"),
    "coco-karpathy": ("retrieval", None, "dataset_coco.json"),
    "flickr30k-karpathy": ("retrieval", None, "dataset_flickr30k.json"),
    "imagenet-classnames": ("zeroshot", None, None),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    lines = [f"{name} ({task}): --questions {q or '-'}, --answers {a or '-'}" for name, (task, q, a) in
             BENCHMARKS.items()]
    parser.add_argument("benchmark", choices=sorted(BENCHMARKS), metavar="BENCHMARK", help="; ".join(lines))
    parser.add_argument("--questions", help="LLaVA's question file of the benchmark")
    parser.add_argument("--answers", "--annotations", dest="answers", nargs="+",
                        help="the benchmark's answer/annotation file (POPE: its files or their folder; MME: the "
                             "MME_Benchmark_release_version folder; Karpathy: dataset_coco.json / dataset_flickr30k.json)")
    parser.add_argument("--images", required=True,
                        help="the image folder (as LLaVA's --image-folder; Karpathy COCO: the folder holding val2014/; "
                             "imagenet-classnames: the ImageNet val folder)")
    parser.add_argument("--out", required=True, help="the JSONL file to write (imagenet-classnames: classnames.txt)")
    parser.add_argument("--split", default="test", help="Karpathy split (default test)")
    parser.add_argument("--captions-per-image", type=int, default=5,
                        help="Karpathy: the first N captions of each image (default 5; 0: all)")


def convert(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The items of ``args.benchmark`` (image paths still relative to ``--images``)."""
    from . import benchmarks

    _, questions, answers = BENCHMARKS[args.benchmark]
    missing = [flag for flag, needed in (("--questions", questions), ("--answers", answers))
               if needed and not getattr(args, flag[2:])]
    if missing:
        raise ValueError(f"{args.benchmark} needs " + " and ".join(
            f"{flag} ({questions if flag == '--questions' else answers})" for flag in missing))
    if answers and args.benchmark != "pope" and len(args.answers) != 1:
        raise ValueError(f"{args.benchmark} takes one --answers path ({answers}), got {len(args.answers)}")
    single = Path(args.answers[0]) if args.answers else None
    converters: dict[str, Callable[[], list[dict[str, Any]]]] = {
        "gqa": lambda: benchmarks.gqa(Path(args.questions), single),
        "pope": lambda: benchmarks.pope(Path(args.questions), [Path(path) for path in args.answers]),
        "textvqa": lambda: benchmarks.textvqa(Path(args.questions), single),
        "mme": lambda: benchmarks.mme(Path(args.questions), single),
        "scienceqa": lambda: benchmarks.scienceqa(Path(args.questions), single),
        "coco-karpathy": lambda: benchmarks.karpathy(single, args.split, args.captions_per_image, "coco"),
        "flickr30k-karpathy": lambda: benchmarks.karpathy(single, args.split, args.captions_per_image, "flickr30k"),
    }
    return converters[args.benchmark]()


def run_from_args(args: argparse.Namespace) -> int:
    from . import benchmarks

    try:
        if args.benchmark == "imagenet-classnames":
            names = benchmarks.imagenet_classnames(Path(args.images))
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text("\n".join(names) + "\n")
            print(f"wrote {len(names)} class names to {out}")
            return 0
        items, missing = benchmarks.place_images(convert(args), Path(args.images), Path(args.out))
        count = benchmarks.write_jsonl(items, Path(args.out))
    except (ValueError, FileNotFoundError) as error:
        print(f"vtprune prepare: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    task = BENCHMARKS[args.benchmark][0]
    categories = Counter(item["category"] for item in items if "category" in item)
    detail = f" ({', '.join(f'{name} {n}' for name, n in sorted(categories.items()))})" if categories else ""
    print(f"wrote {count} items{detail} to {args.out} for --task {task}"
          + (f"; {missing} of the images missing under {args.images} (each an error in the run)" if missing else ""))
    return 0
