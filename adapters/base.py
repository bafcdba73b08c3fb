"""The adapter contract and what :func:`vtprune.inspect` reports."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from torch import nn

from vtprune.state import Runtime

from .patching import Patch


@dataclass(frozen=True)
class Inspection:
    """Which adapter matches a model and what it would patch."""

    adapter: str
    family: str
    model_class: str
    sites: dict[str, tuple[str, ...]]
    signals: tuple[str, ...]
    protected: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default_factory=tuple)

    def __str__(self) -> str:
        lines = [f"{self.model_class}: adapter {self.adapter!r} ({self.family})"]
        for site, layers in self.sites.items():
            shown = ", ".join(layers[:3]) + (f", ... ({len(layers)} layers)" if len(layers) > 3 else "")
            lines.append(f"  site {site!r}: {shown}")
        lines.append(f"  signals: {', '.join(self.signals)}")
        if self.protected:
            lines.append(f"  protected prefix tokens: {', '.join(self.protected)}")
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)


class Adapter(Protocol):
    """One host-model family. Adapters know models, never algorithms."""

    name: str
    family: str

    def matches(self, model: nn.Module) -> bool:
        """Cheap structural check: is this model of my family?"""

    def inspect(self, model: nn.Module) -> Inspection:
        """Sites, layers and signals this adapter offers for ``model`` (raises if the layout is unknown)."""

    def patch(self, model: nn.Module, runtime: Runtime) -> Patch:
        """Patch this instance for ``runtime.policies``; the returned :class:`Patch` undoes it exactly."""
