"""The policy contract: a frozen dataclass of hyperparameters plus the algorithm as pure functions.

A policy never imports a host library. It declares the *site* it acts at (``vision``, ``projector`` or
``llm``), the signals it reads from a layer (``keys``, ``hidden``), and answers each reduction point
with a :class:`~vtprune.reduction.MergePlan` (or ``None`` for "leave this layer alone").

Policies serialise to and from plain dicts (``to_dict`` / ``from_dict``) and spec strings
(``"tome:r=16"``, ``"pitome:ratio=0.9"``); see :func:`parse_spec`.
"""
from __future__ import annotations

import ast
import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from .reduction import MergePlan
    from .view import LayerView

SITES = ("vision", "projector", "llm")


class Policy:
    """Base of every policy dataclass (subclasses are ``@dataclass(frozen=True)``).

    Subclasses set the class variables ``name`` (registry key), ``site`` and ``signals``, validate
    their fields in ``__post_init__`` (raising :class:`ValueError` that names the accepted range),
    and implement :meth:`reduce`.
    """

    name: ClassVar[str] = ""
    site: ClassVar[str] = "vision"
    signals: ClassVar[tuple[str, ...]] = ()
    spec_fields: ClassVar[tuple[str, ...]] = ()  # always written by to_spec, even at their defaults

    def reduce(self, view: "LayerView") -> "MergePlan | None":  # pragma: no cover - abstract
        raise NotImplementedError

    def proportional_attention(self) -> bool:
        """Whether attention should see ``log(size)`` added to the key logits (ToMe's prop-attn)."""
        return False

    def reduction_placement(self) -> str:
        """Where in a layer the policy reduces: ``"mid"`` (between attention and MLP, the default) or
        ``"post"`` (after the MLP, between layers). Adapters refuse a placement they do not offer."""
        return "mid"

    # --- cost accounting (used by vtprune.flops; no model is run) --------------------------------
    def token_schedule(self, num_tokens: int, num_layers: int,
                       num_protected: int = 0) -> list[tuple[int, int]]:
        """``(attention_tokens, mlp_tokens)`` per layer when ``num_tokens`` tokens (the first
        ``num_protected`` of them protected) enter a stack of ``num_layers`` layers.

        Policies whose counts follow from their hyperparameters alone implement this (ToMe, PiToMe);
        policies whose counts depend on the input cannot, and are costed from the trace of a real
        forward (``vtprune.flops.estimate(config, schedule=handle.trace, policy=policy)``).
        """
        raise NotImplementedError(
            f"policy {self.name!r} has no analytic token schedule (its token counts depend on the input); "
            "cost it from the trace of a real forward: vtprune.flops.estimate(config, schedule=handle.trace, "
            "policy=policy)")

    def handed_on(self, num_patches: int, num_prefix: int, drop_prefix: bool, anyres: bool = False) -> int | None:
        """Visual tokens of one image a VLM's language model receives, when the policy fixes that count
        regardless of the input (FlowCut's ``keep``, VisionZip's ``dominant + contextual``, ...):
        ``num_patches`` patch tokens and ``num_prefix`` prefix tokens leave the encoder unpruned, and the
        host drops the prefix if ``drop_prefix``; ``anyres``: per crop of a LLaVA-NeXT image. ``None`` (the
        default): not fixed; cost from a trace."""
        return None

    def image_budget(self) -> int | None:
        """Visual tokens per image when an image is encoded as several crops (LLaVA-NeXT) and the policy's
        own per-crop cut leaves more after packing; the adapter then keeps the packed tokens of highest
        per-token score (``LayerView.memory["score"]``). ``None`` (the default): no such budget."""
        return None

    def matching_macs(self, num_tokens: int, num_protected: int, dims: dict[str, int], *, layer: int | None = None,
                      num_layers: int | None = None) -> int:
        """Multiply-accumulates of the matrix products the policy itself computes at one layer that
        reduces ``num_tokens`` tokens (similarity matrices, scores); ``dims`` maps a signal name
        (``"keys"``, ``"hidden"``) to its width; ``layer`` of ``num_layers`` (when known) is for policies
        whose matching differs from layer to layer. Element-wise work (norms, sorting, gathers) is not
        counted, as in the layers' own count. Default: 0.
        """
        return 0

    # --- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """``{"policy": name, field: value, ...}`` with tuples written as lists (JSON/YAML-safe)."""
        out: dict[str, Any] = {"policy": self.name}
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            out[field.name] = _plain(getattr(self, field.name))
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Policy":
        """Inverse of :meth:`to_dict`. Called on the base class, dispatches on ``data["policy"]``."""
        from .registry import get_policy_class

        data = dict(data)
        name = data.pop("policy", None) or cls.name
        if not name:
            raise ValueError("a policy dict needs a 'policy' key naming a registered policy")
        target = get_policy_class(name)
        if cls is not Policy and target is not cls:
            raise ValueError(f"dict describes policy {name!r}, not {cls.name!r}")
        return target(**data)

    def to_spec(self) -> str:
        """A spec string that :func:`parse_spec` turns back into an equal policy.

        The main knobs (``spec_fields``) and fields that differ from their defaults are written:
        ``ToMe(r=16).to_spec() == "tome:r=16"``.
        """
        parts = []
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, field.name)
            default = field.default if field.default is not dataclasses.MISSING else _MISSING
            if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                default = field.default_factory()  # type: ignore[misc]
            if default is _MISSING or field.name in self.spec_fields or _plain(value) != _plain(default):
                parts.append(f"{field.name}={_format_value(value)}")
        return self.name + (":" + ",".join(parts) if parts else "")

    def __str__(self) -> str:
        return self.to_spec()


_MISSING = object()


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_format_value(v) for v in value) + "]"
    if isinstance(value, str):
        return value
    return repr(value)


def _split_top_level(text: str, sep: str = ",") -> list[str]:
    """Split on ``sep`` outside brackets, so ``r=(16,-1),prop_attn=false`` gives two items."""
    parts, depth, current = [], 0, []
    for char in text:
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        if char == sep and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def parse_value(text: str) -> Any:
    """Parse one spec value: Python literals (``None`` included), ``true``/``false`` in any case, else the string."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        return text.strip()


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """Split ``"name:key=value,key=value"`` into ``(name, kwargs)``.

    Values are Python literals (``16``, ``0.9``, ``(16, -1)``, ``[8, 8, 4]``) or ``true``/``false``;
    anything else is kept as a string. Raises :class:`ValueError` on a malformed spec.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a policy spec must be a non-empty string like 'tome:r=16', got {spec!r}")
    name, _, arg_text = spec.strip().partition(":")
    name = name.strip().lower()
    kwargs: dict[str, Any] = {}
    for item in _split_top_level(arg_text):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(
                f"malformed argument {item!r} in policy spec {spec!r}; expected key=value pairs "
                "separated by commas, e.g. 'tome:r=16,prop_attn=false'"
            )
        kwargs[key.strip()] = parse_value(value)
    return name, kwargs


# --- validation helpers used by the policy dataclasses -------------------------------------------

def check_int(name: str, value: Any, *, minimum: int = 0, policy: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{policy}: {name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{policy}: {name} must be an integer >= {minimum}, got {value}")
    return value


def check_float(name: str, value: Any, *, low: float, high: float, policy: str,
                low_open: bool = False, high_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{policy}: {name} must be a number in {_interval(low, high, low_open, high_open)}, "
                         f"got {value!r}")
    value = float(value)
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high or value != value:
        raise ValueError(f"{policy}: {name} must be in {_interval(low, high, low_open, high_open)}, got {value}")
    return value


def check_choice(name: str, value: Any, choices: tuple[str, ...], *, policy: str) -> str:
    if value not in choices:
        raise ValueError(f"{policy}: {name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def check_bool(name: str, value: Any, *, policy: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{policy}: {name} must be true or false, got {value!r}")
    return value


def _interval(low: float, high: float, low_open: bool, high_open: bool) -> str:
    return f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
