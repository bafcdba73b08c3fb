"""The cost object an estimate returns, and its tables."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable



UNITS = ("MACs", "FLOPs")
SITES = ("vision", "projector", "llm", "lm_head", "overhead")
SITE_TITLES = {"vision": "vision encoder", "projector": "projector", "llm": "language model",
               "lm_head": "LM head", "overhead": "method overhead"}



@dataclass(frozen=True)
class LayerCost:
    """One transformer layer of the prefill, in the convention's unit (per sample; summed over views).

    ``tokens_in``: tokens the attention ran on; ``tokens_out``: tokens the MLP ran on (both include the
    text prompt tokens where the convention counts them). ``overhead``: the policy's matching.
    """

    site: str
    layer: int
    tokens_in: int
    tokens_out: int
    projections: int
    attention: int
    mlp: int
    overhead: int = 0

    @property
    def total(self) -> int:
        return self.projections + self.attention + self.mlp + self.overhead


@dataclass(frozen=True)
class Cost:
    """The analytic cost of one forward of one sample (one image, or one image + prompt for a VLM).

    ``total``: prefill plus ``decode``, in ``unit`` (``"MACs"`` or ``"FLOPs"``) under ``convention``
    (``switches`` spells it out). ``by_site``: the prefill per site (``vision``, ``projector``,
    ``llm``, ``lm_head``, ``overhead``; ``None`` where the convention does not count the site);
    ``parts``: finer (``vision.patch_embed``, ``vision.blocks``, ``vision.head``, ...); ``layers``: per
    transformer layer; ``decode``: the decode steps' total and ``decode_per_token`` the first step's
    cost (``None`` when decode is not counted); ``schedule``: tokens per layer and site as
    ``(attention, mlp)`` pairs (visual tokens for the language model); ``visual_tokens``: visual tokens
    entering the language model; ``policies``: their spec strings; ``notes``: caveats of this count;
    ``present``: the sites the model has (a table shows the others as absent rather than not counted).
    """

    config: str
    convention: str
    unit: str
    prefill: int
    by_site: dict[str, int | None]
    parts: dict[str, int]
    layers: tuple[LayerCost, ...]
    schedule: dict[str, tuple[tuple[int, int], ...]]
    switches: dict[str, Any]
    description: str
    decode: int = 0
    decode_per_token: int | None = None
    visual_tokens: int | None = None
    policies: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    present: tuple[str, ...] = SITES

    @property
    def total(self) -> int:
        return self.prefill + self.decode

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["total"] = self.total
        data["schedule"] = {site: [list(pair) for pair in pairs] for site, pairs in self.schedule.items()}
        data["layers"] = [{**dataclasses.asdict(layer), "total": layer.total} for layer in self.layers]
        data["policies"] = list(self.policies)
        data["notes"] = list(self.notes)
        return data

    def format(self, value: int | None) -> str:
        """``value`` in this cost's unit, scaled: ``"3.817 TMACs"``."""
        return format_count(value, self.unit)

    def table(self, per_layer: bool = False) -> str:
        """A Markdown table of this cost (see :func:`table`)."""
        return table(self, per_layer=per_layer)

    def __str__(self) -> str:
        return (f"{self.config}: {self.format(self.total)} [{self.convention}: {self.description}]\n"
                + self.table())


def format_count(value: int | float | None, unit: str) -> str:
    """``3.817e12, "MACs"`` -> ``"3.817 TMACs"`` (4 significant digits, trailing zeros kept: ``"5.800"``)."""
    if value is None:
        return "not counted"
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:#.4g}".rstrip(".") + f" {prefix}{unit}"
    if value == int(value):
        return f"{int(value)} {unit}"
    return f"{value:#.4g}".rstrip(".") + f" {unit}"


def table(*costs: Cost, per_layer: bool = False) -> str:
    """A Markdown table with one column per cost (e.g. the same model under ``paper`` and ``full``).

    Every cell carries its unit; the header names each column's convention, and a line under the
    table says what each convention counts. ``per_layer`` adds one row per layer.
    """
    if not costs:
        raise ValueError("table() needs at least one Cost")
    header = "| part | " + " | ".join(f"{cost.config} [{cost.convention}]" for cost in costs) + " |"
    lines = [header, "|---|" + "---:|" * len(costs)]

    def row(label: str, values: Iterable[str]) -> None:
        lines.append(f"| {label} | " + " | ".join(values) + " |")

    first = costs[0]
    for site in SITES:
        label = SITE_TITLES[site]
        if site == "llm" and any(cost.schedule.get("llm") for cost in costs):
            label += f" ({len(first.schedule.get('llm', ()))} layers)"
        if site == "vision" and any(cost.schedule.get("vision") for cost in costs):
            label += f" ({len(first.schedule.get('vision', ()))} blocks)"
        if not any(site in cost.present for cost in costs):
            continue
        row(label, (cost.format(cost.by_site.get(site)) for cost in costs))
    has_decode = any(cost.decode_per_token is not None for cost in costs)
    if has_decode:
        row("**prefill**", (f"**{cost.format(cost.prefill)}**" for cost in costs))
        row("decode, per generated token", (cost.format(cost.decode_per_token) for cost in costs))
        row("decode, all steps", (f"{cost.format(cost.decode)} ({cost.switches['decode_steps']} steps)"
                                  if cost.decode_per_token is not None else "not counted" for cost in costs))
    row("**total**", (f"**{cost.format(cost.total)}**" for cost in costs))
    if per_layer:
        for site in ("vision", "llm"):
            count = max(len([layer for layer in cost.layers if layer.site == site]) for cost in costs)
            for index in range(count):
                values = []
                for cost in costs:
                    match = [layer for layer in cost.layers if layer.site == site and layer.layer == index]
                    values.append(f"{cost.format(match[0].total)} ({match[0].tokens_in}->{match[0].tokens_out} "
                                  "tokens)" if match else "not counted")
                row(f"{site} layer {index}", values)
    lines.append("")
    for cost in costs:
        lines.append(f"- {cost.config} [{cost.convention}]: {cost.description}.")
        lines.extend(f"  {note}" for note in cost.notes)
    return "\n".join(lines)
