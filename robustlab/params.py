"""JSON parameters of attacks, training recipes and defenses: the one base they share
(:class:`Configurable`), its coercion rule, and the ``NAME:key=value,...`` spec parser."""

from __future__ import annotations

import math
from typing import Any, ClassVar

from robustlab.errors import RobustlabError


def coerce_param(owner: str, key: str, value: Any, default: Any, lower: bool = False) -> Any:
    """Give a parameter the type of its default: ints stay ints, "true" becomes True, a ``None``
    default takes a number or a string. ``owner`` names the thing in errors (``attack 'pgd'``);
    ``lower`` lower-cases a string (for parameters with a fixed set of choices)."""
    bad = RobustlabError(f"{owner}: {key}={value!r} should be like {default!r}")
    if value is None:
        return None
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        raise bad
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) != int(value):
            raise bad
        return int(value)
    if isinstance(default, float) or default is None:
        if default is None and isinstance(value, str):
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise bad
        return value.lower() if lower else value
    return value


class Configurable:
    """Base of everything built by name with JSON parameters: attacks, training recipes, defenses.

    Subclasses set ``name``, ``defaults`` (every parameter with its default, JSON values only;
    ``None`` means derived, e.g. from a threat model), optionally ``choices`` (parameter -> allowed
    values, matched lower-case) and ``component`` (the kind, as error messages name it: ``attack``,
    ``recipe``, ``defense``). Building one rejects unknown parameters (listing the known ones), gives
    every parameter the type of its default (:func:`coerce_param`), checks the choices, then calls
    :meth:`validate`. A subclass that takes more than parameters (a threat model, say) stores it
    before calling ``super().__init__(**params)`` and overrides :meth:`rebuild` (and
    :meth:`config`, :meth:`repr_prefix` if it belongs there).
    """

    name: ClassVar[str] = ""
    component: ClassVar[str] = "component"
    defaults: ClassVar[dict[str, Any]] = {}
    choices: ClassVar[dict[str, tuple]] = {}

    def __init__(self, **params: Any) -> None:
        owner = self.owner
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            known = ", ".join(sorted(self.defaults)) or "none"
            raise RobustlabError(f"{owner} has no parameter {', '.join(unknown)}; its parameters: {known}")
        self.params = {
            k: coerce_param(owner, k, params.get(k, d), d, lower=k in self.choices) for k, d in self.defaults.items()
        }
        for key, allowed in self.choices.items():
            if self.params[key] not in allowed:
                raise RobustlabError(f"{owner}: {key}={self.params[key]!r} is not one of {', '.join(map(str, allowed))}")
        self.validate()

    @property
    def owner(self) -> str:
        """How error messages name this object: ``attack 'pgd'``, ``recipe 'trades'``."""
        return f"{self.component} {self.name!r}"

    def validate(self) -> None:
        """Check parameter values; raise RobustlabError with a clear message. Override to add checks."""

    def config(self) -> dict[str, Any]:
        """Everything needed to rebuild this object: JSON-serializable. Subclasses add their keys."""
        return {"name": self.name, "params": dict(self.params)}

    def rebuild(self, **params: Any) -> "Configurable":
        """The same kind of object with these parameters (and whatever else this one was built with)."""
        return type(self)(**params)

    def with_params(self, **changes: Any) -> "Configurable":
        """A copy with some parameters changed."""
        return self.rebuild(**{**self.params, **changes})

    def repr_prefix(self) -> str:
        """What :meth:`__repr__` shows before the parameters (ends with ``", "`` when not empty)."""
        return ""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}({self.repr_prefix()}{args})"


def parse_spec(spec: str, what: str = "attack") -> tuple[str, dict[str, Any]]:
    """``"pgd:steps=40,alpha=0.01,loss=cw"`` -> ``("pgd", {"steps": 40, "alpha": 0.01, "loss": "cw"})``.

    Values are read by :func:`parse_value`. ``what`` names the kind of thing in errors (``attack``,
    ``recipe``, ``defense``).
    """
    name, _, rest = spec.strip().partition(":")
    if not name:
        raise RobustlabError(f"empty {what} name in {spec!r}; write NAME[:key=value,...]")
    params: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, raw = part.partition("=")
        if not eq or not key.strip():
            raise RobustlabError(f"{what} parameter {part!r} in {spec!r} must be written key=value")
        params[key.strip()] = parse_value(raw.strip())
    return name.strip().lower(), params


def parse_value(raw: str) -> Any:
    """Read a command-line value: int, float, fraction ``a/b``, bool, ``none``, or a string."""
    low = raw.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    num, slash, den = raw.partition("/")
    if slash:
        try:
            return float(num) / float(den)
        except (ValueError, ZeroDivisionError):
            pass
    return raw
