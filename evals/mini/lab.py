"""The vtprune-mini laboratory: what ``vtprune eval`` runs when it is given no model, task or data.

Three shipped models on the shipped Fashion-MNIST evaluation set, every policy that applies to each at three
budgets plus the unpruned model, through the ordinary runner (:func:`vtprune.evals.runner.run`), one run
directory per model and task, and one combined report (``report.md``, ``lab.json``, ``lab.png``).

- ``mini-vit`` (timm) classification and ``mini-clip`` (open_clip) zero-shot: ToMe and PiToMe, the policies
  that merge inside a timm or open_clip tower.
- ``mini-llava`` (Hugging Face LLaVA) grid questions: every policy at 98, 49 and 25 of the 196 visual
  tokens (50 %, 25 %, 12.8 %): in the vision tower (ToMe, PiToMe, FlowCut), at the projector (VisionZip,
  RandomKeep, Pool2d) and inside the 4-layer language model (FastV, PDrop, TransPrune). Pool2d runs at 49
  only, the one budget among them whose square tiles the 14 x 14 patch grid.

The default run is sized to finish within minutes on a 2-core CPU: mini-vit and mini-clip run all 2 000
images, mini-llava the first 150 of its 600 questions (``--full`` runs all 600).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..results import strict_json

LAB_NOTE = ("This is vtprune-mini: a small laboratory of three small models (0.3 to 1.1 M parameters) "
            "trained on Fashion-MNIST and shipped with vtprune, so that every policy can be run and compared "
            "offline in minutes. Differences between policies here are real and measured, but the models, "
            "images and questions are tiny: the numbers say how the policies behave on these models, not how "
            "they rank on ImageNet, COCO or the LLaVA benchmarks. For those, run `vtprune eval` on real "
            "checkpoints and data (docs/eval.md).")


@dataclass(frozen=True)
class LabRun:
    """One runner call of the laboratory: a model, a task, the policy specs; ``limit``: the first samples
    only in the default run (``None``: all), ``metric``: the column the combined report shows."""

    model: str
    task: str
    policies: tuple[str, ...]
    metric: str
    limit: int | None
    batch_size: int

    @property
    def name(self) -> str:
        return f"{self.model.removeprefix('mini:')}-{self.task}"


# 4-block towers of 197 tokens: about 165 / 133 / 101 tokens leave the last block
TOWER_POLICIES = ("tome:r=8", "tome:r=16", "tome:r=24", "pitome:ratio=0.95", "pitome:ratio=0.9", "pitome:ratio=0.85")
LLAVA_BUDGETS = (98, 49, 25)
LLAVA_POLICIES = (
    # in the vision tower: ToMe r and PiToMe ratio chosen so that about 98 / 49 / 25 patches reach the projector
    # (ToMe merges at most half of a block's tokens, so 25 needs a decreasing schedule)
    "tome:r=25", "tome:r=37", "tome:r=[64,48,36,24]", "pitome:ratio=0.84", "pitome:ratio=0.71", "pitome:ratio=0.6",
    *(f"flowcut:keep={keep}" for keep in LLAVA_BUDGETS),
    *(f"visionzip:keep={keep}" for keep in LLAVA_BUDGETS),
    *(f"randomkeep:keep={keep}" for keep in LLAVA_BUDGETS),
    "pool2d:keep=49",
    # inside the 4-layer decoder, 98 / 49 / 25 visual tokens after the last cut: after layer 1 (FastV), or
    # after layers 1, 2 and 3 (PDrop, TransPrune); the first layers still see all 196, so their mean per layer
    # is higher than the budget (the report shows it)
    *(f"fastv:k=1,r={r}" for r in (0.5, 0.75, 0.875)),
    *(f"pdrop:layers=(1,2,3),lam={lam}" for lam in (0.8, 0.63, 0.5)),
    *(f"transprune:layers=(1,2,3),ratios={ratios},accumulate=(1,2,3)"
      for ratios in ("(0.75,0.5,0.5)", "(0.5,0.25,0.25)", "(0.25,0.125,0.125)")),
)


def suite(full: bool = False) -> tuple[LabRun, ...]:
    """The laboratory's runs: the default (mini-llava on its first 150 questions, sized for minutes on 2 CPU
    cores) or ``full`` (all 600); mini-vit and mini-clip run all 2 000 images in both."""
    return (LabRun("mini:vit", "classification", TOWER_POLICIES, "top1", None, 250),
            LabRun("mini:clip", "zeroshot", TOWER_POLICIES, "top1", None, 250),
            LabRun("mini:llava", "vqa", LLAVA_POLICIES, "exact", None if full else 150, 50))


def run_lab(out: Path | str, full: bool = False, weights: str = "pretrained", device: str = "cpu",
            progress: bool = True, runs: tuple[LabRun, ...] | None = None) -> dict[str, Any]:
    """Run (or resume) the laboratory into ``out``: ``out/<model>-<task>/`` per run (the runner's outputs),
    then ``out/report.md``, ``out/lab.json`` and ``out/lab.png``. Returns the combined record."""
    from ..runner import EvalConfig, run

    out = Path(out)
    record: dict[str, Any] = {"note": LAB_NOTE, "full": full, "runs": []}
    for lab_run in runs or suite(full):
        started = time.perf_counter()
        summary = run(EvalConfig(model=lab_run.model, task=lab_run.task, data="mini", policies=lab_run.policies,
                                 out=str(out / lab_run.name), limit=lab_run.limit, batch_size=lab_run.batch_size,
                                 device=device, weights=weights, baselines=False), progress=progress)
        by_kind = _by_kind(out / lab_run.name, lab_run.limit) if lab_run.task == "vqa" else None
        record["runs"].append({"name": lab_run.name, "model": lab_run.model, "task": lab_run.task,
                               "metric": lab_run.metric, "limit": lab_run.limit,
                               "seconds": time.perf_counter() - started, "by_kind": by_kind, "summary": summary})
    (out / "lab.json").write_text(json.dumps(strict_json(record), indent=2, sort_keys=True) + "\n")
    (out / "report.md").write_text(format_lab_report(record))
    write_lab_plot(out / "lab.png", record)
    return record


def _by_kind(directory: Path, limit: int | None) -> dict[str, dict[str, float]]:
    """Exact-match accuracy per configuration and question kind, from the run's ``results.jsonl`` (the
    first ``limit`` questions: the mini questions' ids are their indices; an earlier, longer run in the same
    directory leaves more rows there)."""
    totals: dict[str, dict[str, list[float]]] = {}
    for line in (directory / "results.jsonl").read_text().splitlines():
        row = json.loads(line)
        if limit is not None and int(row["sample"]) >= limit:
            continue
        if row.get("error") is None and row.get("category"):
            kind = row["category"].removeprefix("grid ")
            totals.setdefault(row["configuration"], {}).setdefault(kind, []).append(row["exact"])
    return {label: {kind: sum(values) / len(values) for kind, values in kinds.items()}
            for label, kinds in totals.items()}


def _tokens(entry: dict[str, Any]) -> str:
    if entry.get("tokens_final") is None:
        return "-"
    return f"{entry['tokens_final']} ({entry['tokens_layer_mean']:.1f})"


def format_lab_report(record: dict[str, Any]) -> str:
    """The combined Markdown report: the laboratory note, then per run one row per configuration with the
    run's metric, its % of unpruned, the tokens, FLOPs and latency (and, for grid questions, accuracy per
    question kind)."""
    lines = ["# vtprune eval: the vtprune-mini laboratory", "", f"> {record['note']}", ""]
    if not record["full"]:
        lines += ["Default run: mini-llava answers the first 150 of its 600 questions (mini-vit and mini-clip run "
                  "all their images; the number of samples is in each table); `vtprune eval --full` runs all "
                  "600.", ""]
    for lab_run in record["runs"]:
        summary, metric = lab_run["summary"], lab_run["metric"]
        environment = summary["environment"]
        kinds = sorted({kind for values in (lab_run["by_kind"] or {}).values() for kind in values})
        lines += [f"## {lab_run['model']} · {lab_run['task']}", "",
                  f"{summary['results'][0]['samples']} samples, {environment['dtype']} on {environment['device']} "
                  f"({environment['cpu']}), batch {environment['batch_size']}, {lab_run['seconds']:.0f} s. "
                  f"Per-configuration outputs and plots: `{lab_run['name']}/`.", "",
                  f"| configuration | {metric} % | % of unpruned | " + "".join(f"{kind} % | " for kind in kinds)
                  + "agreement % | final tokens (per layer) | GFLOPs [full] | ms/sample |",
                  "|---|" + "---:|" * (6 + len(kinds))]
        for entry in summary["results"]:
            value, kept = entry["metrics"].get(metric), entry["percent_of_unpruned"].get(metric)
            by_kind = (lab_run["by_kind"] or {}).get(entry["configuration"], {})
            costs, latency = entry.get("flops") or {}, entry.get("latency_s_per_image")
            cells = [entry["configuration"], f"{100 * value:.1f}", f"{kept:.1f}" if kept is not None else "-",
                     *(f"{100 * by_kind[kind]:.1f}" if kind in by_kind else "-" for kind in kinds),
                     f"{100 * entry['metrics']['agreement']:.1f}", _tokens(entry),
                     f"{costs['full']['total'] / 1e9:.3f}" if costs else "-",
                     f"{1000 * latency:.2f}" if latency else "-"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["Final tokens: the tokens after the last reduction (for mini-llava, the visual tokens its language "
              "model keeps), with their mean over the layers in brackets; GFLOPs per sample in vtprune.flops' "
              "full convention (for mini-llava, the prefill); latency: wall clock per sample in this run.", ""]
    return "\n".join(lines)


def write_lab_plot(path: Path, record: dict[str, Any]) -> Path:
    """One panel per run: the metric against FLOPs per sample, one marker per configuration, colour by
    policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = record["runs"]
    figure, axes = plt.subplots(1, len(runs), figsize=(5.2 * len(runs), 4.4), dpi=120, squeeze=False)
    for axis, lab_run in zip(axes[0], runs):
        metric = lab_run["metric"]
        by_policy: dict[str, list[tuple[float, float]]] = {}
        for entry in lab_run["summary"]["results"]:
            if not entry.get("flops"):
                continue
            policy = entry["configuration"].split(":")[0].split(" ")[0]
            by_policy.setdefault(policy, []).append((entry["flops"]["full"]["total"] / 1e9,
                                                     100 * entry["metrics"][metric]))
        for policy, points in by_policy.items():
            points.sort()
            marker = "*" if policy == "none" else "o"
            axis.plot([p[0] for p in points], [p[1] for p in points], marker=marker, markersize=9 if marker == "*"
                      else 5, linewidth=1, label="unpruned" if policy == "none" else policy)
        axis.set_title(f"{lab_run['model']} · {lab_run['task']}", fontsize=10)
        axis.set_xlabel("GFLOPs per sample [full]")
        axis.set_ylabel(f"{metric} (%)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def write_results_page(out: Path | str, docs: Path | str) -> Path:
    """``docs/results.md`` from a finished laboratory run in ``out`` (its ``lab.json``): the combined report with
    the plots, which are copied to ``docs/img/results/``. Regenerate with
    ``python -m vtprune.evals.mini.lab --docs docs``."""
    import shutil

    out, docs = Path(out), Path(docs)
    record = json.loads((out / "lab.json").read_text())
    images = docs / "img" / "results"
    images.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(out / "lab.png", images / "lab.png")
    report = format_lab_report(record).split("\n", 1)[1]  # the page has its own title
    plots = []
    for lab_run in record["runs"]:
        for plot in ("accuracy_vs_flops.png", "tokens_per_layer.png"):
            if (out / lab_run["name"] / plot).exists():
                shutil.copyfile(out / lab_run["name"] / plot, images / f"{lab_run['name']}-{plot}")
                title = f"{lab_run['name']}: {plot[:-4].replace('_', ' ')}"
                plots.append(f"![{title}](img/results/{lab_run['name']}-{plot})")
    environment = record["runs"][0]["summary"]["environment"]
    seconds = sum(lab_run["seconds"] for lab_run in record["runs"])
    page = ["# Results: the default `vtprune eval`", "",
            f"Generated by `python -m vtprune.evals.mini.lab --docs docs`, which runs `vtprune eval` with no "
            f"arguments (the [vtprune-mini](mini.md) laboratory{', full' if record['full'] else ''}) and writes "
            f"this page. This run: {seconds / 60:.1f} min on {environment['device']} ({environment['cpu']}), "
            f"torch {environment['torch']}, vtprune {environment['vtprune']}.", "",
            "![accuracy against FLOPs, one panel per model](img/results/lab.png)", "",
            report.lstrip("\n").replace("(docs/eval.md)", "([the eval guide](eval.md))"), "## Plots per run", "",
            *[f"{plot}\n" for plot in plots]]
    path = docs / "results.md"
    path.write_text("\n".join(page).rstrip("\n") + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m vtprune.evals.mini.lab",
                                     description="run the vtprune-mini laboratory (vtprune eval with no model) and "
                                                 "write the docs' results page")
    parser.add_argument("--out", type=Path, default=Path("vtprune-mini-eval"))
    parser.add_argument("--docs", type=Path, required=True, help="the docs directory (writes results.md, img/results/)")
    parser.add_argument("--full", action="store_true")
    args = parser.parse_args(argv)
    run_lab(args.out, full=args.full)
    print(write_results_page(args.out, args.docs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
