"""The plugin registry: module, source and service types by name.

Types come from entry points (groups ``recorun.modules``, ``recorun.sources``,
``recorun.services``; recorun's own modules are registered the same way in its
``pyproject.toml``) or from a dotted path ``package.module:Class``. A type is imported only when
a workflow names it.
"""
from __future__ import annotations

import difflib
import importlib
from functools import lru_cache
from importlib.metadata import entry_points

GROUPS = {"module": "recorun.modules", "source": "recorun.sources", "service": "recorun.services",
          "conditions": "recorun.conditions"}


class PluginNotFound(LookupError):
    pass


@lru_cache(maxsize=None)
def _registrations(group: str) -> dict[str, list]:
    """``{name: [entry points]}``: one per distinct registration (the same object registered
    twice by one distribution, found on two paths, counts once)."""
    found: dict[str, list] = {}
    for ep in entry_points(group=group):
        same = found.setdefault(ep.name, [])
        if not any(other.value == ep.value for other in same):
            same.append(ep)
    return found


def _entry_points(group: str) -> dict:
    return {name: eps[0] for name, eps in _registrations(group).items()}


def _registered_by(ep) -> str:
    dist = getattr(ep, "dist", None)
    package = getattr(dist, "name", None) or "an unnamed package"
    return f"'{ep.value}' (package {package})"


def available(kind: str) -> list[str]:
    """Names of the registered plugins of one kind (``module``, ``source``, ``service``)."""
    return sorted(_entry_points(GROUPS[kind]))


def registered_twice(kind: str) -> list[str]:
    """Names of one kind registered by more than one package (a workflow cannot use them)."""
    return sorted(name for name, eps in _registrations(GROUPS[kind]).items() if len(eps) > 1)


def load(kind: str, name: str):
    """Return the class registered as ``name``, or named by ``package.module:Class``."""
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:
            hint = ""
            if isinstance(exc, ModuleNotFoundError) and exc.name == module_name.split(".")[0]:
                hint = (f" (a module of your own? its folder must be on PYTHONPATH, e.g. "
                        f"PYTHONPATH=. recorun ... from the folder that holds "
                        f"{module_name.split('.')[0]}.py)")
            raise PluginNotFound(f"cannot import '{module_name}' for {kind} type '{name}': "
                                 f"{type(exc).__name__}: {exc}{hint}")
        try:
            return getattr(module, attr)
        except AttributeError:
            raise PluginNotFound(f"'{module_name}' has no '{attr}' (from {kind} type '{name}')")
    eps = _entry_points(GROUPS[kind])
    twice = _registrations(GROUPS[kind]).get(name, [])
    if len(twice) > 1:
        raise PluginNotFound(
            f"{kind} type '{name}' is registered more than once in '{GROUPS[kind]}': by "
            f"{' and by '.join(_registered_by(ep) for ep in twice)}; one of the packages must "
            f"rename it (or name the class as 'package.module:Class')")
    if name not in eps:
        near = difflib.get_close_matches(name, list(eps), n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(repr(n) for n in near)}?" if near else ""
        raise PluginNotFound(
            f"unknown {kind} type '{name}'{hint} (registered in '{GROUPS[kind]}': "
            f"{', '.join(sorted(eps)) or 'none'}; or name a class as 'package.module:Class')")
    try:
        return eps[name].load()
    except Exception as exc:
        raise PluginNotFound(f"{kind} type '{name}' is registered as '{eps[name].value}' "
                             f"but does not load: {type(exc).__name__}: {exc}")
