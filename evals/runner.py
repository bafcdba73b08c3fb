"""The eval runner: one model, one task, every policy, side by side, in one harness.

For every batch of samples the unpruned model runs first, then each configuration; each configuration's
outputs are scored against the labels and against the unpruned outputs of the same batch (fidelity).
Rows go to ``DIR/results.jsonl`` as batches finish (resumable, see :mod:`.results`); at the end
``DIR/summary.json``, ``DIR/summary.csv``, ``DIR/report.md`` and PNG plots (:mod:`.plots`) are written,
with per configuration the
task's metrics (raw and as % of unpruned), tokens (retained and layer-averaged), FLOPs in both
conventions (``vtprune.flops`` from the trace), latency per batch, and the environment.

Data-parallel: under ``accelerate launch`` or ``torchrun`` each process takes every ``N``-th sample, keeps
its own ``results.rank<i>.jsonl``, and process 0 merges them into ``results.jsonl`` (in sample order)
and writes the summary once.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

import vtprune
from vtprune import flops

from .cost import parse_configuration
from .results import RunDirectory, merge_rows, strict_json, write_atomic
from .tasks import get_task

UNPRUNED = "none (unpruned)"


MINI_DATA = "mini"  # --data mini: the evaluation set shipped with vtprune-mini, written under OUT/mini-data


@dataclass(frozen=True)
class EvalConfig:
    """What a run is. ``model``: ``timm:NAME``, ``open_clip:ARCH/PRETRAINED``, ``hf:PATH_OR_ID`` or ``mini:NAME``;
    ``data``: the task's data path, or ``"mini"`` for the shipped vtprune-mini evaluation set;
    ``weights``: ``"pretrained"`` or ``"random"`` (smoke tests); ``baselines``: add the random and pooling
    baselines at each vision-language policy's budget (:func:`baseline_specs`)."""

    model: str
    task: str
    data: str
    policies: tuple[str, ...] = ()
    out: str = "eval-out"
    limit: int | None = None
    batch_size: int = 16
    device: str = "cpu"
    dtype: str = "float32"
    weights: str = "pretrained"
    seed: int = 0
    baselines: bool = True

    def resolved(self) -> dict[str, Any]:
        """The configuration as saved with the results (policies in their canonical spec form)."""
        data = asdict(self)
        data["policies"] = [canonical(spec) for spec in self.policies]
        data["data"] = self.data if self.data == MINI_DATA else str(Path(self.data).resolve())
        data.pop("out")
        return data


def baseline_specs(model: nn.Module, specs: list[str]) -> list[str]:
    """For a vision-language model, the random and pooling baselines at the budget of every policy that fixes
    the visual tokens its language model receives (``Policy.handed_on``): ``randomkeep:keep=N`` always,
    ``pool2d:keep=N`` when ``N`` tiles the patch grid."""
    import math

    try:
        arch = flops.architecture(model)
    except (TypeError, ValueError):
        return []
    if arch.llm is None or arch.vision is None:
        return []
    tower, extra = arch.vision, []
    rows, cols = tower.grid
    for spec in specs:
        for policy in parse_configuration(spec):
            if policy.name in ("randomkeep", "pool2d"):
                continue
            budget = policy.handed_on(tower.num_patches, tower.num_prefix_tokens, arch.drop_prefix)
            if budget is None:
                continue
            extra.append(f"randomkeep:keep={budget}")
            side = math.isqrt(budget)
            if side * side == budget and rows % side == 0 and cols % side == 0:
                extra.append(f"pool2d:keep={budget}")
    return list(dict.fromkeys(extra))


def canonical(spec: str) -> str:
    return "+".join(map(str, parse_configuration(spec)))


def load_model(spec: str, weights: str, device: str, dtype: torch.dtype, seed: int,
               hf_auto: str = "AutoModelForImageTextToText") -> nn.Module:
    """A model from ``library:name`` (``timm:vit_base_patch16_224``, ``open_clip:ViT-B-32/openai``,
    ``hf:llava-hf/llava-1.5-7b-hf``, ``mini:vit`` for the shipped vtprune-mini models); ``hf_auto`` names the
    transformers auto class for ``hf:`` specs."""
    library, _, name = spec.partition(":")
    if weights not in ("pretrained", "random"):
        raise ValueError(f"--weights must be 'pretrained' or 'random', got {weights!r}")
    if library == "timm" and name:
        import timm

        if not timm.is_model(name):
            raise ValueError(f"unknown timm model {name!r}")
        torch.manual_seed(seed)
        model = timm.create_model(name, pretrained=weights == "pretrained")
        return model.to(device=device, dtype=dtype).eval()
    if library == "open_clip" and name:
        import open_clip

        architecture, _, tag = name.partition("/")
        if architecture not in open_clip.list_models():
            raise ValueError(f"unknown open_clip architecture {architecture!r} (open_clip.list_models())")
        if weights == "pretrained" and not tag:
            raise ValueError(f"open_clip:{name}: name the pretrained weights, e.g. open_clip:{architecture}/openai "
                             "(open_clip.list_pretrained()), or pass --weights random")
        torch.manual_seed(seed)
        model = open_clip.create_model(architecture, pretrained=tag if weights == "pretrained" else None)
        return model.to(device=device, dtype=dtype).eval()
    if library == "hf" and name:
        import transformers
        from transformers import AutoConfig

        auto = getattr(transformers, hf_auto)
        if weights == "random":
            torch.manual_seed(seed)
            model = auto.from_config(AutoConfig.from_pretrained(name))
        else:
            model = auto.from_pretrained(name)
        return model.to(device=device, dtype=dtype).eval()
    if library == "mini" and name:
        from .mini import load

        torch.manual_seed(seed)
        model = load(name if name.startswith("mini-") else f"mini-{name}",
                     weights="trained" if weights == "pretrained" else "random")
        return model.to(device=device, dtype=dtype).eval()
    raise ValueError(f"model spec {spec!r}: expected timm:NAME, open_clip:ARCH/PRETRAINED, hf:PATH_OR_ID or "
                     "mini:NAME (vit)")


@dataclass
class Timing:
    seconds: list[float] = field(default_factory=list)
    images: int = 0


def _timed(call: Callable[[], torch.Tensor], device: str) -> tuple[torch.Tensor, float]:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    output = call()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return output, time.perf_counter() - start


def run(config: EvalConfig, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the evaluation; returns the summary (also written to ``config.out``)."""
    task = get_task(config.task)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[config.dtype]
    if config.data == MINI_DATA:
        from .mini.suite import materialise

        data = materialise(task.name, Path(config.out) / "mini-data")
    else:
        data = Path(config.data)
    samples = task.samples(data)
    if config.limit is not None:
        samples = samples[:config.limit]
    specs = [spec for spec in config.policies if spec.strip().lower() not in ("none", "unpruned")]
    rank, world, barrier = _processes()
    saved = config.resolved()  # as asked: the same in every process, so that each resumes the shared run
    config = dataclasses.replace(config, device=process_device(config.device, rank, world))
    model = load_model(config.model, config.weights, config.device, dtype, config.seed,
                       getattr(task, "hf_auto", "AutoModelForImageTextToText"))
    if config.baselines:
        specs += [spec for spec in baseline_specs(model, specs) if canonical(spec) not in map(canonical, specs)]
    configured = {canonical(spec): parse_configuration(spec) for spec in specs}  # parsed once, applied per batch
    labels = [UNPRUNED, *configured]
    order = {(label, sample.id): index for index, (label, sample) in
             enumerate((label, sample) for label in labels for sample in samples)}
    samples = samples[rank::world]
    rows_name = "results.jsonl" if world == 1 else f"results.rank{rank}.jsonl"
    directory = RunDirectory(config.out, saved, rows_name=rows_name, write_config=rank == 0)
    task.prepare(model, data, config.model)
    target = task.target(model)
    traces: dict[str, Any] = {}
    timings = {label: Timing() for label in labels}
    batches = [samples[i:i + config.batch_size] for i in range(0, len(samples), config.batch_size)]
    bar = _progress(len(batches), progress)
    warmed_up = False
    with torch.inference_mode():
        for batch in batches:
            missing = [label for label in labels if any((label, s.id) not in directory.done for s in batch)]
            if not missing:
                bar.update(1)
                continue
            images, errors = task.inputs(model, batch)
            if isinstance(images, torch.Tensor):
                images = images.to(device=config.device, dtype=dtype)
            elif images is not None:  # a processor's batch (input ids, pixel values, ...)
                images = {key: (value.to(config.device, dtype=dtype) if value.is_floating_point()
                                else value.to(config.device)) for key, value in images.items()}
            if images is not None and not warmed_up:  # untimed: the first call pays for lazy initialisation
                task.forward(model, images)
                warmed_up = True
            reference, seconds = (_timed(lambda: task.forward(model, images), config.device) if images is not None
                                  else (None, 0.0))
            read = sum(error is None for error in errors)  # the samples the forward ran on
            if UNPRUNED in missing and images is not None:
                timings[UNPRUNED].seconds.append(seconds)
                timings[UNPRUNED].images += read
            outputs = {UNPRUNED: reference}
            for label in labels[1:]:
                if label not in missing or images is None:
                    continue
                handle = vtprune.apply(target, configured[label])
                try:
                    outputs[label], seconds = _timed(lambda: task.forward(model, images), config.device)
                    if handle.trace is not None:  # None after a batch of text-only items
                        traces[label] = handle.trace
                finally:
                    handle.remove()
                timings[label].seconds.append(seconds)
                timings[label].images += read
            rows = []
            for label in missing:
                readable = 0
                for sample, error in zip(batch, errors):
                    if (label, sample.id) in directory.done:
                        readable += error is None
                        continue
                    row: dict[str, Any] = {"configuration": label, "sample": sample.id, "label": sample.label,
                                           "error": error}
                    if error is None:
                        row.update(task.score(outputs[label][readable], reference[readable], sample))
                        readable += 1
                    rows.append(row)
            directory.append(rows)
            bar.update(1)
    bar.close()
    if world > 1:
        barrier()
        if rank != 0:
            barrier()
            return json.loads((directory.path / "summary.json").read_text())
    # results.jsonl in configuration-then-sample order, whatever order batches and processes produced
    merged = merge_rows(directory.path, [f"results.rank{r}.jsonl" for r in range(world)] if world > 1 else [],
                        order)
    directory.rows = [row for row in merged if (row["configuration"], row["sample"]) in order]  # this run's samples
    previous = _previous_results(directory.path)
    summary = summarise(config, saved, task, target, directory, labels, traces, timings, configured)
    _carry_over(summary, previous, timings, traces)
    summary["processes"] = world
    write_outputs(directory.path, summary, task)
    if world > 1:
        barrier()
    return summary


def process_device(device: str, rank: int, world: int) -> str:
    """The device one process of ``world`` runs on: ``"cuda"`` with several processes is one GPU per process,
    ``cuda:<LOCAL_RANK>`` (``cuda:<rank>`` without that variable); any other device is used as given."""
    import os

    if world > 1 and device == "cuda":
        return f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
    return device


def _processes() -> tuple[int, int, Callable[[], None]]:
    """``(rank, world size, barrier)`` under ``accelerate launch`` or ``torchrun`` (their ``WORLD_SIZE`` /
    ``RANK`` environment, a gloo or NCCL process group); ``(0, 1, no-op)`` otherwise."""
    import os

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, lambda: None
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size(), dist.barrier


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="vtprune eval", unit="batch", disable=not enabled, dynamic_ncols=True)


def _environment(config: EvalConfig, model: nn.Module) -> dict[str, Any]:
    import timm
    import transformers

    import open_clip

    backends = sorted({"sdpa" if getattr(block.attn, "fused_attn", False) else "eager"
                       for block in getattr(model, "blocks", [])})
    if not backends and hasattr(getattr(model, "transformer", None), "resblocks"):
        backends = ["nn.MultiheadAttention"]
    return {"torch": torch.__version__, "timm": timm.__version__, "transformers": transformers.__version__,
            "open_clip": open_clip.__version__,
            "vtprune": vtprune.__version__, "python": platform.python_version(), "device": config.device,
            "dtype": config.dtype, "batch_size": config.batch_size, "attention_backend": "+".join(backends or ["n/a"]),
            "cpu": platform.processor() or platform.machine()}


def summarise(config, saved: dict[str, Any], task, model, directory: RunDirectory, labels, traces, timings,
              configured) -> dict[str, Any]:
    """Per configuration: metrics (raw and % of unpruned), errors, tokens, FLOPs, latency; ``saved``: the
    configuration as asked (``config`` is this process's, its device possibly one GPU of several)."""
    rows_by_label: dict[str, list[dict[str, Any]]] = {label: [] for label in labels}
    wanted = {label for label in labels}
    for row in directory.rows:
        if row["configuration"] in wanted:
            rows_by_label[row["configuration"]].append(row)
    entries = []
    base_metrics = task.summarise(rows_by_label[UNPRUNED])
    for label in labels:
        rows = rows_by_label[label]
        metrics = task.summarise(rows)
        relative = {name: (100 * value / base_metrics[name] if base_metrics.get(name) else None)
                    for name, value in metrics.items() if name in task.relative}
        entry: dict[str, Any] = {"configuration": label, "samples": len(rows),
                                 "errors": sum(row.get("error") is not None for row in rows),
                                 "metrics": metrics, "percent_of_unpruned": relative}
        entry.update(_cost(model, label, traces.get(label), configured.get(label)))
        timing = timings[label]
        entry["latency_s_per_batch"] = statistics.median(timing.seconds) if timing.seconds else None
        entry["latency_s_per_image"] = (sum(timing.seconds) / timing.images) if timing.images else None
        entries.append(entry)
    return {"config": saved, "environment": _environment(config, model), "task": task.name,
            "results": entries}


_LATENCY_KEYS = ("latency_s_per_batch", "latency_s_per_image")
_COST_KEYS = ("flops", "flops_error", "tokens_site", "tokens_per_layer", "tokens_final", "tokens_layer_mean",
              "measured_on")


def _previous_results(path: Path) -> dict[str, dict[str, Any]]:
    """The entries of the summary an earlier invocation wrote in this run directory, by configuration."""
    try:
        return {entry["configuration"]: entry for entry in json.loads((path / "summary.json").read_text())["results"]}
    except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
        return {}


def _carry_over(summary: dict[str, Any], previous: dict[str, dict[str, Any]], timings: dict, traces: dict) -> None:
    """A configuration that ran no batch in this invocation (a finished run rerun, or resumed with a smaller
    ``--limit``) keeps the latency and the trace-measured cost of the earlier summary instead of losing them."""
    for entry in summary["results"]:
        label, before = entry["configuration"], previous.get(entry["configuration"])
        if before is None:
            continue
        if not timings[label].seconds:
            entry.update({key: before.get(key) for key in _LATENCY_KEYS})
        if label not in traces and before.get("measured_on") == "trace of the last batch":
            entry.update({key: before[key] for key in _COST_KEYS if key in before})


def _cost(model: nn.Module, label: str, trace: Any, policies: Any) -> dict[str, Any]:
    schedule = trace if trace is not None else None
    try:
        costs = {name: flops.estimate(model, schedule=schedule, policy=policies, convention=name)
                 for name in ("paper", "full")}
    except (ValueError, TypeError, NotImplementedError) as error:
        return {"flops": None, "flops_error": str(error)}
    paper = costs["paper"]
    site = "llm" if "llm" in paper.schedule else "vision"  # a VLM: the visual tokens its language model sees
    pairs = paper.schedule.get(site, ())
    tokens = [pair[0] for pair in pairs]
    return {"flops": {name: {"total": cost.total, "unit": cost.unit} for name, cost in costs.items()},
            "tokens_site": site,
            "tokens_per_layer": tokens,
            "tokens_final": pairs[-1][1] if tokens else None,
            "tokens_layer_mean": (sum(tokens) / len(tokens)) if tokens else None,
            "measured_on": ("trace of the last batch" if trace is not None
                            else "config (unpruned)" if policies is None else "policy's own rules")}


def write_outputs(path: Path, summary: dict[str, Any], task: Any) -> None:
    write_atomic(path / "summary.json", json.dumps(strict_json(summary), indent=2, sort_keys=True) + "\n")
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    metric_names = list(summary["results"][0]["metrics"]) if summary["results"] else []
    writer.writerow(["configuration", "samples", "errors", *metric_names, "tokens_final", "tokens_layer_mean",
                     "flops_paper", "flops_full", "latency_s_per_image"])
    for entry in summary["results"]:
        costs = entry.get("flops") or {}
        writer.writerow([entry["configuration"], entry["samples"], entry["errors"],
                         *[entry["metrics"][name] for name in metric_names], entry.get("tokens_final"),
                         entry.get("tokens_layer_mean"), costs.get("paper", {}).get("total"),
                         costs.get("full", {}).get("total"), entry.get("latency_s_per_image")])
    write_atomic(path / "summary.csv", buffer.getvalue())
    write_atomic(path / "report.md", format_report(summary, task))
    from .plots import write_plots

    write_plots(path, summary, task.columns[0][0], task.columns[0][1].removesuffix(" %"))


def _number(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def format_report(summary: dict[str, Any], task: Any = None) -> str:
    """The Markdown report: the task's metric columns (``task.columns``: key, title, scale, digits), the
    primary metric as % of unpruned, tokens, FLOPs and latency."""
    from .tasks import get_task

    task = task or get_task(summary["task"])
    config, environment = summary["config"], summary["environment"]
    columns = task.columns
    primary_title = columns[0][1]
    lines = [f"# vtprune eval: {config['task']} on {config['model']} ({config['weights']} weights)", "",
             f"Data: `{config['data']}`; limit {config['limit']}; batch {environment['batch_size']}; "
             f"{environment['dtype']} on {environment['device']} ({environment['cpu']}); attention "
             f"{environment['attention_backend']}; torch {environment['torch']}, timm {environment['timm']}, "
             f"open_clip {environment.get('open_clip')}, transformers {environment['transformers']}, "
             f"vtprune {environment['vtprune']}.", "",
             "| configuration | samples | errors | " + " | ".join(title for _, title, _, _ in columns)
             + f" | {primary_title} as % of unpruned | final tokens | tokens/layer | GMACs/img [paper] | "
             "GFLOPs/img [full] | ms/img |",
             "|---|" + "---:|" * (len(columns) + 9)]
    for entry in summary["results"]:
        metrics, costs = entry["metrics"], entry.get("flops") or {}
        per_image = entry.get("latency_s_per_image")
        values = [_number(scale * metrics[key] if metrics.get(key) == metrics.get(key) and key in metrics
                          else None, digits) for key, _, scale, digits in columns]
        lines.append("| " + " | ".join([
            entry["configuration"], str(entry["samples"]), str(entry["errors"]), *values,
            _number(entry["percent_of_unpruned"].get(columns[0][0])), str(entry.get("tokens_final", "-")),
            _number(entry.get("tokens_layer_mean"), 1),
            _number(costs["paper"]["total"] / 1e9 if costs else None),
            _number(costs["full"]["total"] / 1e9 if costs else None),
            _number(1000 * per_image if per_image else None, 1)]) + " |")
    lines += ["", task.report_note + " Tokens and FLOPs per image from vtprune.flops with the trace of the last "
              "batch (paper: MACs of the blocks; full: FLOPs of everything). Latency: wall clock per image, "
              "batches of the same run, unpruned first, after one untimed warm-up call of the unpruned model."]
    return "\n".join(lines) + "\n"
