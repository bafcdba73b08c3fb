"""The public API: apply a policy to a model instance, inspect it, read its trace, remove it."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from .policy import SITES, Policy
from .registry import make_policies
from .state import Runtime
from .trace import Trace

_HANDLE_ATTRIBUTE = "_vtprune_handle"


class _Attached:
    """Holds a patched model's :class:`Handle` on the model instance itself (not in a global registry, which
    would keep every patched model alive: the handle refers to the model). A deepcopy of the model gets an
    empty holder, as the copy is unpatched."""

    def __init__(self, handle: "Handle | None") -> None:
        self.handle = handle

    def __deepcopy__(self, memo: dict) -> "_Attached":
        return _Attached(None)


def _handle(model: nn.Module) -> "Handle | None":
    attached = vars(model).get(_HANDLE_ATTRIBUTE) if hasattr(model, "__dict__") else None
    return attached.handle if isinstance(attached, _Attached) else None


def _attach(model: nn.Module, handle: "Handle") -> None:
    object.__setattr__(model, _HANDLE_ATTRIBUTE, _Attached(handle))


def _detach(model: nn.Module, handle: "Handle") -> None:
    if _handle(model) is handle:
        object.__delattr__(model, _HANDLE_ATTRIBUTE)


class AlreadyPatchedError(RuntimeError):
    """:func:`apply` was called on a model that vtprune already patched."""


@dataclass(eq=False)
class Handle:
    """What :func:`apply` returns: the link between a patched model and its policies.

    ``trace``: token counts of the last forward (``None`` before the first); ``source``: ToMe's dense
    source map ``[B, N, N0]`` of the last forward; ``size``: token sizes ``[B, N, 1]``;
    ``assignment``: ``[B, N0]`` index of the final token containing each original token.
    """

    model: nn.Module = field(repr=False)
    policies: tuple[Policy, ...]
    adapter: Any = field(repr=False)
    _runtime: Runtime = field(repr=False)
    _patch: Any = field(repr=False)
    removed: bool = False

    @property
    def trace(self) -> Trace | None:
        state = self._runtime.last_state
        return state.trace() if state is not None else None

    @property
    def source(self) -> torch.Tensor | None:
        state = self._runtime.last_state
        return state.source() if state is not None else None

    @property
    def size(self) -> torch.Tensor | None:
        state = self._runtime.last_state
        return state.size if state is not None else None

    @property
    def assignment(self) -> torch.Tensor | None:
        state = self._runtime.last_state
        return state.assignment if state is not None else None

    def remove(self) -> nn.Module:
        """Undo every patch; the model is exactly the original again. Returns the model. Idempotent."""
        if not self.removed:
            self._patch.undo()
            self.removed = True
            _detach(self.model, self)
        return self.model

    def __enter__(self) -> "Handle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def apply(model: nn.Module, policy_or_policies: Any, *, replace: bool = False, **kwargs: Any) -> Handle:
    """Patch ``model`` in place (this instance only) with one or more policies; returns a :class:`Handle`.

    ``policy_or_policies``: a policy object (``vtprune.ToMe(r=16)``), a registered name with keyword
    arguments (``apply(m, "tome", r=16)``), a spec string (``"tome:r=16"``), a dict from
    ``Policy.to_dict()``, or a list of these (at most one policy per site).

    A model that is already patched raises :class:`AlreadyPatchedError` unless ``replace=True``, which
    removes the previous policies first.
    """
    policies = make_policies(policy_or_policies, **kwargs)
    previous = _handle(model)
    if previous is not None:
        if not replace:
            raise AlreadyPatchedError(
                f"this {type(model).__name__} is already patched by vtprune with "
                f"{', '.join(map(str, previous.policies))}; call vtprune.remove(model) (or handle.remove()) "
                "first, or pass replace=True to swap the policies"
            )
        previous.remove()

    from vtprune.adapters import find_adapter

    adapter = find_adapter(model)
    by_site = _policies_by_site(policies, adapter)
    runtime = Runtime(by_site)
    patch = adapter.patch(model, runtime)
    handle = Handle(model=model, policies=tuple(policies), adapter=adapter, _runtime=runtime, _patch=patch)
    _attach(model, handle)
    return handle


def _policies_by_site(policies: list[Policy], adapter: Any) -> dict[str, Policy]:
    by_site: dict[str, Policy] = {}
    for policy in policies:
        if policy.site not in SITES:
            raise ValueError(f"policy {policy} declares unknown site {policy.site!r}; sites are {SITES}")
        if policy.site not in adapter.sites:
            raise ValueError(
                f"policy {policy} acts at site {policy.site!r}, but adapter {adapter.name!r} offers only "
                f"{', '.join(map(repr, adapter.sites))}"
            )
        if policy.site in by_site:
            raise ValueError(
                f"two policies for site {policy.site!r} ({by_site[policy.site]} and {policy}); "
                "vtprune runs at most one policy per site"
            )
        missing = [signal for signal in policy.signals if signal not in adapter.signals]
        if missing:
            raise ValueError(f"policy {policy} needs signals {missing} that adapter {adapter.name!r} does not "
                             f"offer (it offers {', '.join(adapter.signals)})")
        by_site[policy.site] = policy
    return by_site


def remove(model: nn.Module) -> nn.Module:
    """Remove vtprune's patches from ``model`` (no-op if it is not patched); returns the model."""
    handle = _handle(model)
    if handle is not None:
        handle.remove()
    return model


@contextmanager
def applied(model: nn.Module, policy_or_policies: Any, **kwargs: Any) -> Iterator[Handle]:
    """Context manager: ``with vtprune.applied(model, ToMe(r=16)) as handle: ...``; removes on exit,
    also when the body raises."""
    handle = apply(model, policy_or_policies, **kwargs)
    try:
        yield handle
    finally:
        handle.remove()


def handle_of(model: nn.Module) -> Handle | None:
    """The active :class:`Handle` of a patched model, else ``None``."""
    return _handle(model)


def last_trace(model: nn.Module) -> Trace | None:
    """Token trace of the last forward of a patched model (``None`` before its first forward).

    Raises :class:`ValueError` if the model is not patched by vtprune.
    """
    handle = _handle(model)
    if handle is None:
        raise ValueError(f"this {type(model).__name__} is not patched by vtprune; call vtprune.apply first")
    return handle.trace


def inspect(model: nn.Module):
    """Which adapter matches ``model``, and which sites, layers and signals it would patch.

    Raises :class:`vtprune.adapters.UnsupportedModelError` listing the supported families if none matches.
    """
    from vtprune.adapters import find_adapter

    return find_adapter(model).inspect(model)
