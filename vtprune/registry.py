"""The policy registry: names to policy classes, and turning user input into policy objects."""
from __future__ import annotations

from typing import Any, Iterable

from .policy import Policy, parse_spec

_REGISTRY: dict[str, type[Policy]] = {}


def register_policy(cls: type[Policy]) -> type[Policy]:
    """Class decorator: register a policy dataclass under ``cls.name`` (lower case, unique)."""
    name = cls.name
    if not name or name != name.lower():
        raise ValueError(f"policy class {cls.__name__} needs a lower-case ``name``; got {name!r}")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"a policy named {name!r} is already registered ({_REGISTRY[name].__name__})")
    _REGISTRY[name] = cls
    return cls


def policies() -> dict[str, type[Policy]]:
    """The registered policies, ``{name: class}`` sorted by name."""
    return dict(sorted(_REGISTRY.items()))


def get_policy_class(name: str) -> type[Policy]:
    key = name.strip().lower()
    if key not in _REGISTRY:
        raise ValueError(f"unknown policy {name!r}; registered policies: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[key]


def make_policy(policy: Policy | str | dict[str, Any], **kwargs: Any) -> Policy:
    """Build one policy from a policy object, a registered name (+ ``kwargs``), a spec string or a dict.

    ``make_policy("tome", r=16)``, ``make_policy("tome:r=16")`` and ``make_policy(ToMe(r=16))`` are equal.
    Keyword arguments are accepted with a name, a spec or a dict (they override its values), not with a policy
    object.
    """
    if isinstance(policy, Policy):
        if kwargs:
            raise ValueError(
                f"keyword arguments {sorted(kwargs)} were given with a policy object {policy}; "
                "set them on the object instead (dataclasses.replace(policy, ...))"
            )
        return policy
    if isinstance(policy, dict):
        return Policy.from_dict({**policy, **kwargs})
    if isinstance(policy, str):
        name, spec_kwargs = parse_spec(policy)
        cls = get_policy_class(name)
        try:
            return cls(**{**spec_kwargs, **kwargs})
        except TypeError as error:
            raise ValueError(f"bad arguments for policy {name!r}: {error}") from None
    raise TypeError(
        "a policy must be a Policy object, a registered name, a spec string like 'tome:r=16' or a dict; "
        f"got {type(policy).__name__}"
    )


def make_policies(policy_or_policies: Any, **kwargs: Any) -> list[Policy]:
    """Normalise what :func:`vtprune.apply` accepts into a non-empty list of policies."""
    if isinstance(policy_or_policies, (list, tuple)):
        if kwargs:
            raise ValueError("keyword arguments are only accepted with a single policy name or spec")
        items: Iterable[Any] = policy_or_policies
        result = [make_policy(item) for item in items]
    else:
        result = [make_policy(policy_or_policies, **kwargs)]
    if not result:
        raise ValueError("no policy given; pass a policy, a name, a spec string or a non-empty list of them")
    return result
