"""Speed benchmark: measured throughput of vision-site policies on a timm ViT vs the FLOPs prediction.

``python -m vtprune.evals.bench`` / ``vtprune bench`` builds a timm model by name with random weights
(``pretrained=False``: never downloads), runs it in eval mode under ``torch.inference_mode()`` on CPU,
and reports for the unpatched model and every policy:

* images/s: ``batch / median`` of ``--runs`` timed forwards (``time.perf_counter``) after ``--warmup``
  untimed ones (the first forward, which records the token counts, is never timed). Rows are timed in
  interleaved rounds (one forward of every row per round), so slow drift of the machine affects all
  rows alike;
* measured speed-up: unpatched median / policy median;
* predicted speed-up: unpatched MACs / policy MACs, from the policy's token trace and
  :func:`vit_macs` (attention at the tokens entering a block, MLP at the tokens leaving it);
* measured / predicted;
* CPU-time speed-up: the same ratio with process CPU time, and the CPU utilisation of the timed runs
  (process CPU time / (wall time x threads)): well below 1 means other processes took the cores and
  the wall times are not to be trusted.

Pruning overhead (``--overhead-runs``): the policy is wrapped so that every ``reduce`` call (the
matching, including reading the keys signal) is timed *in situ* during a real patched forward, and
forward hooks time every block in the same forward. The plans and their inputs of the last forward are
kept, and ``TokenState.apply`` (the size-weighted merge and the source-map update) is replayed on
exactly those inputs and timed. Overhead = matching + merge; it is reported as a share of the blocks'
time (sum over blocks, and the worst block).

``--report cost`` prints the cost report of :mod:`vtprune.evals.cost` instead: tokens, FLOPs in the
``paper`` and ``full`` conventions, latency per phase, peak memory and KV-cache bytes of every
configuration, each with its ratio to the unpruned run (``--device cuda`` times it on a GPU).

``--official-tome PATH`` also times facebookresearch/ToMe (imported from that local checkout at run
time; its code is CC BY-NC and is never copied here) with ``tome.patch.timm(copy); copy.r = R``. That
patch replaces timm's fused SDPA attention by explicit ``softmax(q kᵀ) v``, so the unpatched model with
``fused_attn=False`` is timed too, as the official patch's own-kernel baseline.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

import vtprune
from vtprune.flops import vit_macs  # the analytic count (re-exported here: vtprune.evals.bench.vit_macs)
from vtprune.policy import Policy
from vtprune.state import TokenState

HELP = ("time policies on a timm ViT: images/s, measured vs FLOPs-predicted speed-up, pruning overhead; "
        "--report cost: tokens, FLOPs, latency and memory vs unpruned")
DEFAULT_POLICIES = ("none", "tome:r=16", "pitome:ratio=0.9")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --- the analytic count ------------------------------------------------------------------------

def block_tokens_from_trace(layers: Sequence[Any]) -> list[tuple[int, int]]:
    """``(attention_tokens, mlp_tokens)`` per block from ``LayerTokens`` (``reduced`` ``"mid"`` or ``"none"``)."""
    pairs = []
    for layer in layers:
        if layer.reduced == "mid" or (layer.reduced == "none" and layer.tokens_in == layer.tokens_out):
            pairs.append((layer.tokens_in, layer.tokens_out))
        else:
            raise ValueError(f"vit_macs knows reductions 'mid' (between attention and MLP) and 'none'; layer "
                             f"{layer.layer} has reduced={layer.reduced!r} ({layer.tokens_in}->{layer.tokens_out})")
    return pairs


@dataclass(frozen=True)
class ViTGeometry:
    """What :func:`vit_macs` needs from a timm ``VisionTransformer``."""

    dim: int
    mlp_ratio: float
    patch_dim: int
    num_prefix_tokens: int
    num_classes: int

    @classmethod
    def of(cls, model: nn.Module) -> "ViTGeometry":
        block = model.blocks[0]
        fc1 = getattr(block.mlp, "fc1", None)
        if not isinstance(fc1, nn.Linear):
            raise ValueError(f"the benchmark's MAC count needs a timm Mlp with fc1 (got {type(block.mlp).__name__})")
        proj = model.patch_embed.proj
        head = getattr(model, "head", None)
        return cls(dim=model.embed_dim, mlp_ratio=fc1.out_features / model.embed_dim,
                   patch_dim=int(proj.weight[0].numel()), num_prefix_tokens=model.num_prefix_tokens,
                   num_classes=head.out_features if isinstance(head, nn.Linear) else 0)

    def macs(self, block_tokens: Sequence[tuple[int, int]]) -> dict[str, int]:
        num_patches = block_tokens[0][0] - self.num_prefix_tokens if block_tokens else 0
        return vit_macs(block_tokens, dim=self.dim, mlp_ratio=self.mlp_ratio, num_patches=num_patches,
                        patch_dim=self.patch_dim, num_classes=self.num_classes)


# --- machine -------------------------------------------------------------------------------------

def machine_info() -> dict[str, Any]:
    """CPU model (``/proc/cpuinfo``), logical cores, usable cores, torch threads, library versions, and the
    load average (other processes competing for the cores make the timings unreliable)."""
    import timm

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = [round(value, 2) for value in os.getloadavg()] if hasattr(os, "getloadavg") else None
    return {"load_average_1_5_15min": load, "cpu": cpu, "logical_cores": os.cpu_count(), "usable_cores": usable,
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "timm": timm.__version__,
            "vtprune": vtprune.__version__, "python": platform.python_version(), "platform": platform.platform()}


# --- rows ----------------------------------------------------------------------------------------

@dataclass
class Row:
    """One timed configuration of the model."""

    label: str
    kind: str  # "unpatched", "vtprune", "official", "reference"
    model: nn.Module
    policy: Policy | None = None
    handle: Any = None
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)
    block_tokens: list[tuple[int, int]] = field(default_factory=list)
    output: torch.Tensor | None = None


def _count_block_tokens(model: nn.Module) -> tuple[list[tuple[int, int]], Callable[[], None]]:
    """Forward hooks recording each block's input and output length (for rows without a vtprune trace)."""
    counts: list[tuple[int, int]] = []
    handles = [block.register_forward_hook(lambda module, args, out: counts.append((args[0].shape[1], out.shape[1])))
               for block in model.blocks]
    return counts, lambda: [handle.remove() for handle in handles]


def _import_official_tome(path: str):
    root = Path(path).expanduser().resolve()
    if not (root / "tome" / "patch" / "timm.py").is_file():
        raise SystemExit(f"--official-tome {path}: expected a checkout of facebookresearch/ToMe containing "
                         "tome/patch/timm.py (e.g. git clone https://github.com/facebookresearch/ToMe)")
    sys.path.insert(0, str(root))
    try:
        tome = importlib.import_module("tome")
    finally:
        sys.path.remove(str(root))
    if not Path(tome.__file__).resolve().is_relative_to(root):
        raise SystemExit(f"--official-tome {path}: 'import tome' found {tome.__file__} instead; "
                         "uninstall that package or run from another environment")
    return tome


def build_rows(model: nn.Module, specs: Sequence[str], official: Any = None, official_r: int = 16) -> list[Row]:
    """The unpatched row first (always), one row per policy spec, then the official ToMe rows."""
    rows = [Row("none (unpatched)", "unpatched", model)]
    for spec in specs:
        if spec.strip().lower() in ("none", "unpatched"):
            continue
        policy = vtprune.make_policy(spec)
        patched = copy.deepcopy(model)
        rows.append(Row(f"vtprune {policy}", "vtprune", patched, policy, vtprune.apply(patched, policy)))
    if official is not None:
        eager = copy.deepcopy(model)
        for module in eager.modules():
            if hasattr(module, "fused_attn"):
                module.fused_attn = False
        rows.append(Row("none, eager attention", "reference", eager))
        theirs = copy.deepcopy(model)
        official.patch.timm(theirs)
        theirs.r = official_r
        rows.append(Row(f"official ToMe r={official_r}", "official", theirs))
    return rows


def time_rows(rows: Sequence[Row], images: torch.Tensor, warmup: int, runs: int,
              progress: Callable[[str], None] = lambda message: None) -> float:
    """``warmup`` untimed then ``runs`` timed forwards per row, in interleaved rounds.

    Returns the CPU utilisation of the timed rounds: process CPU time / (wall time x torch threads).
    Well below 1 means the threads waited (other processes on the cores, or serial Python work).
    """
    with torch.inference_mode():
        for row in rows:
            counts, remove = _count_block_tokens(row.model)
            start = time.perf_counter()
            row.output = row.model(images)
            remove()
            row.block_tokens = (block_tokens_from_trace(row.handle.trace.layers("vision"))
                                if row.handle is not None else counts)
            progress(f"first forward {row.label}: {time.perf_counter() - start:.2f} s")
            for _ in range(warmup - 1):
                row.model(images)
        wall, cpu = time.perf_counter(), time.process_time()
        for round_index in range(runs):
            for row in rows:
                start, cpu_start = time.perf_counter(), time.process_time()
                row.output = row.model(images)
                row.times.append(time.perf_counter() - start)
                row.cpu_times.append(time.process_time() - cpu_start)
            progress(f"round {round_index + 1}/{runs}: " + ", ".join(f"{row.label} {row.times[-1]:.2f} s"
                                                                   for row in rows))
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return cpu / (wall * torch.get_num_threads())


# --- overhead ------------------------------------------------------------------------------------

def _now() -> tuple[float, float]:
    """(wall, process CPU) clocks."""
    return time.perf_counter(), time.process_time()


def _since(start: tuple[float, float]) -> tuple[float, float]:
    wall, cpu = _now()
    return wall - start[0], cpu - start[1]


class _TimedPolicy(Policy):
    """Delegates to ``inner`` and records, per reduction point, the time of ``reduce`` and its inputs."""

    def __init__(self, inner: Policy):
        self.inner = inner
        self.name = inner.name
        self.site = inner.site
        self.signals = tuple(inner.signals)
        self.records: list[tuple[int, tuple[float, float], torch.Tensor, Any]] = []

    def proportional_attention(self) -> bool:
        return self.inner.proportional_attention()

    def reduce(self, view):
        start = _now()
        plan = self.inner.reduce(view)
        self.records.append((view.layer, _since(start), view.hidden, plan))
        return plan

    def __str__(self) -> str:
        return f"timed {self.inner}"


def measure_overhead(model: nn.Module, policy: Policy, images: torch.Tensor, runs: int,
                     replays: int = 3) -> dict[str, Any]:
    """Matching + merge time of ``policy`` per block vs the block's time (see the module docstring).

    Per block: ``block`` (in situ, forward hooks), ``match`` (in situ, ``policy.reduce`` including its
    signals), ``merge`` (``TokenState.apply`` replayed ``replays`` times on the last forward's inputs and
    plans); each in milliseconds of wall time (``*_ms``) and of process CPU time (``*_cpu_ms``), medians
    over runs (replays for the merge).
    """
    timed = _TimedPolicy(policy)
    num_blocks = len(model.blocks)
    samples: dict[str, list[list[tuple[float, float]]]] = {
        part: [[] for _ in range(num_blocks)] for part in ("block", "match", "merge")}
    starts: list[tuple[float, float]] = [(0.0, 0.0)] * num_blocks
    hooks = []
    for index, block in enumerate(model.blocks):
        hooks.append(block.register_forward_pre_hook(
            lambda module, args, i=index: starts.__setitem__(i, _now())))
        hooks.append(block.register_forward_hook(
            lambda module, args, out, i=index: samples["block"][i].append(_since(starts[i]))))
    forward_times = []
    try:
        with vtprune.applied(model, timed) as handle, torch.inference_mode():
            for _ in range(runs):
                timed.records.clear()
                start = time.perf_counter()
                model(images)
                forward_times.append(time.perf_counter() - start)
                for layer, seconds, _, _ in timed.records:
                    samples["match"][layer].append(seconds)
            trace = handle.trace.layers("vision")
            records = list(timed.records)
            for _ in range(replays):
                state = TokenState()
                state.start(records[0][2])
                for layer, _, hidden, plan in records:
                    start_merge = _now()
                    state.apply(hidden, plan)
                    samples["merge"][layer].append(_since(start_merge))
    finally:
        for hook in hooks:
            hook.remove()

    def median_ms(part: str, layer: int, clock: int) -> float:
        values = [sample[clock] for sample in samples[part][layer]]
        return 1e3 * statistics.median(values) if values else 0.0

    layers = []
    for index in range(num_blocks):
        entry: dict[str, Any] = {"layer": index, "tokens_in": trace[index].tokens_in,
                                 "tokens_out": trace[index].tokens_out}
        for clock, suffix in ((0, "ms"), (1, "cpu_ms")):
            for part in ("block", "match", "merge"):
                entry[f"{part}_{suffix}"] = median_ms(part, index, clock)
        entry["fraction"] = (entry["match_ms"] + entry["merge_ms"]) / entry["block_ms"]
        entry["cpu_fraction"] = (entry["match_cpu_ms"] + entry["merge_cpu_ms"]) / max(entry["block_cpu_ms"], 1e-9)
        layers.append(entry)

    def total(key: str) -> float:
        return sum(layer[key] for layer in layers)

    return {
        "policy": str(policy), "runs": runs, "replays": replays,
        "forward_s": statistics.median(forward_times),
        "block_ms_mean": total("block_ms") / num_blocks, "match_ms_mean": total("match_ms") / num_blocks,
        "merge_ms_mean": total("merge_ms") / num_blocks,
        "fraction": (total("match_ms") + total("merge_ms")) / total("block_ms"),
        "max_layer_fraction": max(layer["fraction"] for layer in layers),
        "cpu_fraction": (total("match_cpu_ms") + total("merge_cpu_ms")) / max(total("block_cpu_ms"), 1e-9),
        "layers": layers,
    }


# --- the benchmark -------------------------------------------------------------------------------

METHOD = ("images/s = batch / median of the timed forwards (rows interleaved per round). CPU-time speed-up: the "
          "same ratio with process CPU time (time.process_time) per forward; with one thread it is insensitive to "
          "other processes sharing the cores, with several it also counts OpenMP spin-waiting. Predicted speed-up = "
          "MACs(unpatched) / MACs(policy) from the token trace (attention at tokens entering a block, MLP at "
          "tokens leaving it, plus patch embedding and head). Overhead: policy.reduce (matching incl. its "
          "signals) timed in situ in a patched forward, TokenState.apply (merge + source map) replayed on that "
          "forward's inputs and plans, both divided by the blocks' in-situ time (forward hooks).")


def run(model_name: str = "vit_base_patch16_224", batch_size: int = 32, runs: int = 5, warmup: int = 1,
        threads: int | None = None, dtype: str = "float32", policies: Sequence[str] = DEFAULT_POLICIES,
        img_size: int | None = None, overhead_runs: int = 2, official_tome: str | None = None,
        official_r: int = 16, seed: int = 0, verbose: bool = True) -> dict[str, Any]:
    """Run the benchmark and return its results as a JSON-ready dict (see :func:`format_report`)."""
    if runs < 1 or warmup < 0 or batch_size < 1:
        raise ValueError(f"need runs >= 1, warmup >= 0, batch size >= 1; got {runs}, {warmup}, {batch_size}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    import timm

    progress = (lambda message: print(f"[bench] {message}", file=sys.stderr, flush=True)) if verbose else (
        lambda message: None)
    if threads:
        torch.set_num_threads(threads)
    official = _import_official_tome(official_tome) if official_tome else None
    machine_before = machine_info()
    torch.manual_seed(seed)
    kwargs = {"img_size": img_size} if img_size else {}
    model = timm.create_model(model_name, pretrained=False, **kwargs).eval().to(DTYPES[dtype])
    geometry = ViTGeometry.of(model)
    height, width = model.patch_embed.img_size
    images = torch.randn(batch_size, 3, height, width, generator=torch.Generator().manual_seed(seed + 1))
    images = images.to(DTYPES[dtype])
    rows = build_rows(model, policies, official, official_r)
    utilisation = time_rows(rows, images, warmup, runs, progress)

    base = rows[0]
    base_median = statistics.median(base.times)
    base_cpu = statistics.median(base.cpu_times)
    base_macs = geometry.macs(base.block_tokens)
    results = []
    for row in rows:
        median = statistics.median(row.times)
        macs = geometry.macs(row.block_tokens)
        measured = base_median / median
        predicted = base_macs["total"] / macs["total"]
        results.append({
            "label": row.label, "kind": row.kind, "policy": row.policy.to_dict() if row.policy else None,
            "times_s": row.times, "median_s": median, "images_per_s": batch_size / median,
            "cpu_times_s": row.cpu_times, "cpu_speedup": base_cpu / statistics.median(row.cpu_times),
            "speedup": measured, "predicted_speedup": predicted, "measured_over_predicted": measured / predicted,
            "final_tokens": row.block_tokens[-1][1] if row.block_tokens else None,
            "block_tokens": row.block_tokens, "macs": macs,
        })
    comparisons = _official_comparisons(rows, results, official_r)

    overhead = []
    if overhead_runs > 0:
        for row in rows:
            if row.kind == "vtprune":
                row.handle.remove()
                progress(f"overhead {row.label} ({overhead_runs} instrumented forwards)")
                overhead.append(measure_overhead(row.model, row.policy, images, overhead_runs))
    machine = machine_info()
    machine["load_average_at_start"] = machine_before["load_average_1_5_15min"]
    machine["cpu_utilisation_timed"] = round(utilisation, 3)
    return {
        "machine": machine,
        "config": {"model": model_name, "img_size": [height, width], "batch_size": batch_size, "runs": runs,
                   "warmup": warmup, "dtype": dtype, "policies": list(policies), "overhead_runs": overhead_runs,
                   "official_tome": official_tome, "official_r": official_r if official else None, "seed": seed,
                   "weights": "random (pretrained=False)"},
        "method": METHOD,
        "rows": results,
        "official_comparison": comparisons,
        "overhead": overhead,
    }


def _official_comparisons(rows: Sequence[Row], results: Sequence[dict], official_r: int) -> dict[str, Any] | None:
    by_kind = {row.kind: (row, result) for row, result in zip(rows, results) if row.kind in ("official", "reference")}
    if "official" not in by_kind:
        return None
    official_row, official_result = by_kind["official"]
    _, eager_result = by_kind["reference"]
    comparison: dict[str, Any] = {
        "official_speedup_vs_eager_unpatched": eager_result["median_s"] / official_result["median_s"]}
    target = vtprune.ToMe(r=official_r)
    for row, result in zip(rows, results):
        if row.kind == "vtprune" and row.policy == target:
            comparison["vtprune_label"] = row.label
            comparison["vtprune_over_official_images_per_s"] = (result["images_per_s"]
                                                                / official_result["images_per_s"])
            comparison["same_tokens"] = row.block_tokens == official_row.block_tokens
            comparison["max_abs_logit_diff"] = (row.output.float() - official_row.output.float()).abs().max().item()
    return comparison


# --- report --------------------------------------------------------------------------------------

def format_report(results: dict[str, Any]) -> str:
    """The machine, the configuration, the throughput table and the overhead table, as Markdown."""
    machine, config = results["machine"], results["config"]
    lines = [
        f"Machine: {machine['cpu']}, {machine['logical_cores']} logical cores ({machine['usable_cores']} usable), "
        f"torch threads {machine['torch_threads']}; torch {machine['torch']}, timm {machine['timm']}, "
        f"vtprune {machine['vtprune']}, Python {machine['python']}",
        f"Load average (1/5/15 min) at start {machine.get('load_average_at_start')}, at end "
        f"{machine.get('load_average_1_5_15min')}; CPU utilisation of the timed runs (process CPU time / "
        f"(wall x threads)) {machine.get('cpu_utilisation_timed')}",
        f"Model: {config['model']} at {config['img_size'][0]}x{config['img_size'][1]}, {config['weights']}, "
        f"{config['dtype']}, batch {config['batch_size']}, warmup {config['warmup']}, {config['runs']} timed runs, "
        "eval mode, torch.inference_mode()",
        "",
        "| configuration | final tokens | GMACs/img | s/batch median (min-max) | images/s | measured speed-up "
        "| predicted speed-up | measured / predicted | CPU-time speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results["rows"]:
        lines.append(
            f"| {row['label']} | {row['final_tokens']} | {row['macs']['total'] / 1e9:.2f} | "
            f"{row['median_s']:.3f} ({min(row['times_s']):.3f}-{max(row['times_s']):.3f}) | "
            f"{row['images_per_s']:.2f} | {row['speedup']:.2f}x | {row['predicted_speedup']:.2f}x | "
            f"{row['measured_over_predicted']:.2f} | {row['cpu_speedup']:.2f}x |")
    comparison = results.get("official_comparison")
    if comparison:
        lines += ["", f"Official ToMe vs the unpatched model with the same eager attention kernel: "
                      f"{comparison['official_speedup_vs_eager_unpatched']:.2f}x."]
        if "vtprune_label" in comparison:
            lines.append(f"{comparison['vtprune_label']} vs official ToMe: "
                         f"{comparison['vtprune_over_official_images_per_s']:.2f}x the images/s; same token "
                         f"counts per block: {comparison['same_tokens']}; max |logit difference| "
                         f"{comparison['max_abs_logit_diff']:.2e}.")
    if results["overhead"]:
        lines += ["", "Pruning overhead (matching + merge) per block:", "",
                  "| policy | block ms (mean) | matching ms | merge ms | overhead / block time | worst block "
                  "| overhead / block, CPU time |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for item in results["overhead"]:
            worst = max(item["layers"], key=lambda layer: layer["fraction"])
            lines.append(f"| {item['policy']} | {item['block_ms_mean']:.1f} | {item['match_ms_mean']:.2f} | "
                         f"{item['merge_ms_mean']:.2f} | {100 * item['fraction']:.2f}% | "
                         f"{100 * worst['fraction']:.2f}% (block {worst['layer']}, {worst['tokens_in']} tokens) | "
                         f"{100 * item['cpu_fraction']:.2f}% |")
    lines += ["", f"Method: {results['method']} MACs: multiply-accumulates per image (1 MAC = 2 FLOPs)."]
    return "\n".join(lines)


# --- command line --------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's options (shared by ``vtprune bench`` and ``python -m vtprune.evals.bench``)."""
    parser.add_argument("--model", default="vit_base_patch16_224",
                        help="timm model name (random weights); with --report cost also a random-weight LLaVA: "
                             "llava-mid, llava-mid32, llava-tiny, llava-1.5-7b (the architecture; use a GPU)")
    parser.add_argument("--prompt-tokens", type=int, default=48,
                        help="LLaVA models: text tokens around the image in the prompt (default 48)")
    parser.add_argument("--img-size", type=int, default=None, help="input resolution (default: the model's)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--runs", type=int, default=5, help="timed forwards per configuration (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed forwards per configuration first (at least one always runs: "
                             "the first forward, which records the token counts, is never timed)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    parser.add_argument("--policies", nargs="+", default=list(DEFAULT_POLICIES), metavar="SPEC",
                        help="policy specs, e.g. tome:r=16 pitome:ratio=0.9; with --report cost, '+' composes "
                             "policies of different sites in one configuration (visionzip:keep=192+transprune); "
                             "'none' (the unpatched model) is always timed as the reference")
    parser.add_argument("--overhead-runs", type=int, default=2,
                        help="instrumented forwards per policy for the overhead measurement (0: skip)")
    parser.add_argument("--official-tome", metavar="PATH", default=None,
                        help="local checkout of facebookresearch/ToMe to time as well (imported at run time)")
    parser.add_argument("--official-r", type=int, default=16, help="r for the official ToMe (default 16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", default=None, help="also write the results as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress messages on stderr")
    parser.add_argument("--report", choices=("speed", "cost"), default="speed",
                        help="speed (default): images/s, predicted vs measured speed-up, overhead; cost: tokens, "
                             "FLOPs (paper and full), latency, peak memory, KV cache, each vs unpruned "
                             "(vtprune.evals.cost)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="device of --report cost (the speed report is CPU only)")


def run_from_args(args: argparse.Namespace) -> int:
    try:
        from .cost import parse_configuration

        for spec in args.policies:
            if spec.strip().lower() not in ("none", "unpatched"):
                parse_configuration(spec)
    except (ValueError, TypeError) as error:
        raise SystemExit(f"vtprune bench: {error}") from None
    if getattr(args, "report", "speed") == "cost":
        from . import cost

        if args.official_tome:
            raise SystemExit("vtprune bench: --official-tome applies to --report speed only")
        if args.model.startswith("llava"):
            results = cost.run_llava(model_name=args.model, batch_size=args.batch_size, runs=args.runs,
                                     warmup=args.warmup, threads=args.threads, dtype=args.dtype,
                                     policies=args.policies, device=args.device, seed=args.seed,
                                     prompt_tokens=args.prompt_tokens, verbose=not args.quiet)
        else:
            results = cost.run(model_name=args.model, batch_size=args.batch_size, runs=args.runs,
                               warmup=args.warmup, threads=args.threads, dtype=args.dtype, policies=args.policies,
                               img_size=args.img_size, device=args.device, seed=args.seed, verbose=not args.quiet)
        print(cost.format_report(results))
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        return 0
    if getattr(args, "device", "cpu") != "cpu":
        raise SystemExit("vtprune bench: --device cuda applies to --report cost only")
    results = run(model_name=args.model, batch_size=args.batch_size, runs=args.runs, warmup=args.warmup,
                  threads=args.threads, dtype=args.dtype, policies=args.policies, img_size=args.img_size,
                  overhead_runs=args.overhead_runs, official_tome=args.official_tome,
                  official_r=args.official_r, seed=args.seed, verbose=not args.quiet)
    print(format_report(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vtprune.evals.bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
