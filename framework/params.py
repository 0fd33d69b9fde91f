"""Typed module parameters.

A module declares its parameters as class attributes::

    class HTFilter(Filter):
        jets = InputTag("jets", doc="jet four-vectors")
        min_ht = Param(float, 200.0, doc="threshold on the scalar sum of jet pT, GeV")

The workflow's values are checked against these declarations before the first event: unknown
names, missing required values and wrong types are configuration errors naming the parameter.
:class:`InputTag` parameters also say which products the module consumes: they build the graph.
"""
from __future__ import annotations

import copy
import re
import types
import typing
from typing import Any, ClassVar

from .event import canonical_tag

REQUIRED = object()
#: numbers in exponent notation without a dot, which PyYAML (YAML 1.1) leaves as strings
_YAML_1_1_MISSES_IT = re.compile(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+")


class ParamError(ValueError):
    """A parameter value does not fit its declaration (the caller adds file and label)."""

    def __init__(self, name: str, message: str):
        self.name = name
        super().__init__(message)


def _type_name(t) -> str:
    origin = typing.get_origin(t)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(t))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(t))
        return f"{origin.__name__}[{args}]"
    return getattr(t, "__name__", str(t))


def _at(where: str) -> str:
    return f"{where}: " if where else ""


def _check(value: Any, t, where: str = "") -> Any:
    """Return ``value`` converted to ``t`` (int -> float only), or raise TypeError."""
    origin = typing.get_origin(t)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(t):
            try:
                return _check(value, option, where)
            except TypeError:
                pass
        raise TypeError(f"{_at(where)}expected {_type_name(t)}, got {type(value).__name__} "
                        f"{value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{_at(where)}expected a list, got {type(value).__name__} {value!r}")
        (item_type,) = typing.get_args(t)[:1] or (Any,)
        return [_check(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise TypeError(f"{_at(where)}expected a mapping, got {type(value).__name__} {value!r}")
        key_type, value_type = typing.get_args(t)
        return {_check(k, key_type, f"{where}key {k!r}"): _check(v, value_type, f"{where}[{k!r}]")
                for k, v in value.items()}
    if t is Any:
        return value
    if t is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if t is float and isinstance(value, str) and _YAML_1_1_MISSES_IT.fullmatch(value.strip()):
        return float(value)                  # 5e2, 1E-3: YAML 1.1 reads these as strings
    if t is int and isinstance(value, bool):
        raise TypeError(f"{_at(where)}expected int, got bool {value!r}")
    if not isinstance(value, t):
        raise TypeError(f"{_at(where)}expected {_type_name(t)}, got {type(value).__name__} {value!r}")
    return value


class Param:
    """One declared parameter: a type, a default (or none: required), a docstring."""

    consumes = False
    records = False      # True for Record: the value names a conditions record

    def __init__(self, type=Any, default=REQUIRED, doc: str = "", choices=None):
        self.type = type
        self.default = default
        self.doc = doc
        self.choices = tuple(choices) if choices else None
        self.name = ""

    def __set_name__(self, owner, name):
        self.name = name

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def convert(self, value: Any) -> Any:
        try:
            value = _check(value, self.type)
        except TypeError as exc:
            raise ParamError(self.name, str(exc)) from None
        if self.choices and value not in self.choices:
            raise ParamError(self.name, f"{value!r} is not one of {list(self.choices)}")
        return value

    def tags(self, value) -> list[str]:
        """Product tags this value consumes (none for plain parameters)."""
        return []

    def describe(self) -> str:
        default = "required" if self.required else f"default {self.default!r}"
        kind = type(self).__name__ if self.consumes else _type_name(self.type)
        choices = f", one of {list(self.choices)}" if self.choices else ""
        return f"{self.name} ({kind}, {default}{choices}): {self.doc}"


class _Name(Param):
    """A name of something the module reads; ``None`` (the default None, or ``optional``)
    reads nothing. Subclasses check the name in :meth:`check_name`."""

    def __init__(self, default=REQUIRED, doc: str = "", optional: bool = False):
        super().__init__(str, default, doc)
        self.optional = optional

    def convert(self, value):
        if value is None and (self.optional or self.default is None):
            return None
        return self.check_name(super().convert(value))

    def check_name(self, value: str) -> str:
        return value


class InputTag(_Name):
    """A product this module reads: ``label`` or ``label:instance``. ``None`` reads nothing."""

    consumes = True

    def check_name(self, value):
        try:
            return canonical_tag(value)
        except ValueError as exc:
            raise ParamError(self.name, str(exc)) from None

    def tags(self, value):
        return [] if value is None else [value]


class Record(_Name):
    """A conditions record this module reads (:mod:`recorun.framework.conditions`), by name:
    ``gains = Record("HcalGains")``. The graph checks before the first event that the
    workflow's ConditionsService provides it; the module reads it with
    ``event.record(self.gains)`` (or ``lumi.record(...)`` in a transition hook). ``None``
    (with ``optional=True``): reads no record."""

    records = True

    def check_name(self, value):
        if not value.strip():
            raise ParamError(self.name, "a conditions record name may not be empty")
        return value

    def describe(self) -> str:
        default = "required" if self.required else f"default {self.default!r}"
        return f"{self.name} (Record, {default}): {self.doc}"


class InputTagList(Param):
    """Several products this module reads."""

    consumes = True

    def __init__(self, default=REQUIRED, doc: str = ""):
        super().__init__(list[str], default, doc)

    def convert(self, value):
        value = super().convert(value)
        try:
            return [canonical_tag(v) for v in value]
        except ValueError as exc:
            raise ParamError(self.name, str(exc)) from None

    def tags(self, value):
        return list(value)


def declared_params(cls) -> dict[str, Param]:
    """All parameters a class declares, its bases' first."""
    found: dict[str, Param] = {}
    for klass in reversed(cls.__mro__):
        for name, attr in vars(klass).items():
            if isinstance(attr, Param):
                found[name] = attr
    return found


def resolve_params(cls, given: dict[str, Any]) -> dict[str, Any]:
    """Check ``given`` against the declarations of ``cls``; return every value, defaults filled."""
    declared = declared_params(cls)
    unknown = [name for name in given if name not in declared]
    if unknown:
        import difflib
        name = unknown[0]
        near = difflib.get_close_matches(name, declared, n=3)
        hint = f"; did you mean {' or '.join(repr(n) for n in near)}?" if near else ""
        known = ", ".join(declared) or "none"
        raise ParamError(name, f"unknown parameter '{name}' for {cls.__name__}{hint} "
                               f"(its parameters: {known})")
    values = {}
    for name, param in declared.items():
        if name in given:
            values[name] = param.convert(given[name])
        elif param.required:
            raise ParamError(name, f"missing required parameter '{name}' of {cls.__name__}: "
                                   f"{param.doc or _type_name(param.type)}")
        elif param.consumes and param.default is not None:
            values[name] = param.convert(param.default)
        else:
            values[name] = copy.deepcopy(param.default)
    return values


class Configurable:
    """Base of everything a workflow configures: declared parameters become attributes.

    ``requires`` names the packages beyond recorun's core that the type needs, as
    ``{import name: what to install}`` (:mod:`recorun.framework.extras`): checked before the
    workflow's first event."""

    requires: ClassVar[dict[str, str]] = {}

    def requirements(self) -> dict[str, str]:
        """What this configured instance needs beyond the core (default: ``requires``); a
        type whose needs depend on its parameters or services overrides it."""
        return dict(self.requires)

    def __init__(self, **params: Any):
        for name, value in resolve_params(type(self), params).items():
            setattr(self, name, value)

    @classmethod
    def parameters(cls) -> dict[str, Param]:
        return declared_params(cls)
