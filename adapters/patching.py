"""Reversible per-instance patching: instance attributes that shadow methods, and forward hooks.

Nothing here touches a class: a method is overridden by an instance attribute of the same name, so
other instances and the library's classes are unaffected, and removing the attribute restores the
class's method exactly.
"""
from __future__ import annotations

from typing import Any, Callable

from torch import nn


class Patch:
    """A stack of undo actions; :meth:`undo` restores everything in reverse order (idempotent)."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []

    def override(self, module: nn.Module, name: str, function: Callable[..., Any]) -> None:
        """Shadow ``module.<name>`` with ``function`` for this instance only."""
        if name in module.__dict__:
            raise RuntimeError(f"{type(module).__name__}.{name} is already overridden on this instance "
                               "(patched by another tool?); vtprune will not stack on top of it")
        object.__setattr__(module, name, function)
        self._undo.append(lambda: object.__delattr__(module, name))

    def hook(self, handle: Any) -> None:
        """Take ownership of a ``torch.utils.hooks.RemovableHandle``."""
        self._undo.append(handle.remove)

    def undo(self) -> None:
        while self._undo:
            self._undo.pop()()
