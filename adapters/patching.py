"""Reversible per-instance patching: instance attributes that shadow methods.

Nothing here touches a class: a method is overridden by an instance attribute of the same name, so
other instances and the library's classes are unaffected, and removing the attribute restores the
class's method exactly.
"""
from __future__ import annotations

import weakref

from typing import Any, Callable

from torch import nn


class Patch:
    """A stack of undo actions; :meth:`undo` restores everything in reverse order (idempotent)."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []

    def override(self, module: nn.Module, name: str, function: Callable[..., Any]) -> None:
        """Shadow ``module.<name>`` with ``function`` for this instance only.

        A module dispatched by accelerate (``device_map``, offload) already has an instance ``forward`` that
        moves weights and inputs around ``module._old_forward``; there ``_old_forward`` is replaced instead
        (and restored on undo), so accelerate's hooks keep running around vtprune's forward. Build
        ``function`` around :func:`forward_of`, not ``module.forward``.
        """
        if name == "forward" and _hooked(module):
            previous = module.__dict__["_old_forward"]
            object.__setattr__(module, "_old_forward", _Override(function, "_old_forward", module))
            self._undo.append(lambda: object.__setattr__(module, "_old_forward", previous))
            return
        if isinstance(module.__dict__.get(name), _CopiedOverride):
            object.__delattr__(module, name)  # left by deepcopy of a patched model: behaves as the class
        if name in module.__dict__:
            raise RuntimeError(f"{type(module).__name__}.{name} is already overridden on this instance "
                               "(patched by another tool?); vtprune will not stack on top of it")
        object.__setattr__(module, name, _Override(function, name, module))
        self._undo.append(lambda: object.__delattr__(module, name))

    def undo(self) -> None:
        while self._undo:
            self._undo.pop()()


def _hooked(module: nn.Module) -> bool:
    """Whether accelerate's ``add_hook_to_module`` wrapped this instance's forward."""
    return "_hf_hook" in module.__dict__ and "_old_forward" in module.__dict__ and "forward" in module.__dict__


def forward_of(module: nn.Module) -> Callable[..., Any]:
    """The forward a patch should call as "the original": the module's own, under accelerate's hooks if any
    (calling the hooked ``forward`` from inside ``_old_forward`` would recurse)."""
    return module.__dict__["_old_forward"] if _hooked(module) else module.forward


PICKLE_ERROR = ("a model patched by vtprune cannot be pickled; call handle.remove() (or vtprune.remove(model)) "
                "first, or save model.state_dict()")


class _Override:
    """An instance-level method override.

    ``copy.deepcopy`` of a patched model yields an *unpatched* copy: each override becomes a
    :class:`_CopiedOverride` that calls the class's own method on the copy (apply vtprune to the copy
    again if wanted). Pickling a patched model raises a clear error instead of a closure error.
    """

    def __init__(self, function: Callable[..., Any], name: str, owner: nn.Module) -> None:
        self.function = function
        self.name = name
        self.owner = weakref.ref(owner)
        self.__wrapped__ = function  # inspect.signature sees the original's (generate validates kwargs by it)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.function(*args, **kwargs)

    def __deepcopy__(self, memo: dict) -> "_CopiedOverride":
        owner = self.owner()
        copied_owner = memo.get(id(owner)) if owner is not None else None
        return _CopiedOverride(self.name, copied_owner if copied_owner is not None else owner)

    def __reduce__(self) -> Any:
        raise TypeError(PICKLE_ERROR)


class _CopiedOverride:
    """What a deepcopy of a patched model holds instead of an override: the class's own method."""

    def __init__(self, name: str, owner: nn.Module) -> None:
        self.name = name
        self.owner = weakref.ref(owner)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        owner = self.owner()
        return getattr(type(owner), self.name)(owner, *args, **kwargs)

    def __reduce__(self) -> Any:
        raise TypeError("this model is a copy of a vtprune-patched model; apply vtprune to it again or "
                        "save model.state_dict()")
