"""The plugin manager: the hooks of :mod:`recorun.framework.hookspecs` and their plugins.

Plugins are found in the entry-point group ``recorun.plugins`` (recorun's own SONIC report, Dask
farm and Prometheus exporter are registered there like anyone's) and loaded once per process.
A plugin that does not import, or implements a hook that does not exist, is a configuration
error naming it.
"""
from __future__ import annotations

import logging
import threading
from importlib.metadata import entry_points

import pluggy

from . import hookspecs
from .errors import ConfigError

GROUP = "recorun.plugins"
LOG = logging.getLogger("recorun")

_manager: pluggy.PluginManager | None = None
_lock = threading.Lock()


def plugin_manager() -> pluggy.PluginManager:
    """The process's plugin manager, with every plugin of ``recorun.plugins`` registered."""
    global _manager
    with _lock:
        if _manager is None:
            manager = pluggy.PluginManager("recorun")
            manager.add_hookspecs(hookspecs)
            for ep in entry_points(group=GROUP):
                where = f"plugin '{ep.name}' ({ep.value}, entry point group '{GROUP}')"
                try:
                    plugin = ep.load()
                except Exception as exc:
                    raise ConfigError(f"{where} does not load: {type(exc).__name__}: {exc}"
                                      ) from None
                if manager.is_registered(plugin):
                    continue
                try:
                    manager.register(plugin, name=f"{ep.name}:{ep.value}")
                except (ValueError, pluggy.PluginValidationError) as exc:
                    raise ConfigError(f"{where}: {exc}") from None
            try:
                manager.check_pending()
            except pluggy.PluginValidationError as exc:
                raise ConfigError(f"a recorun plugin implements an unknown hook: {exc}"
                                  ) from None
            _manager = manager
        return _manager


def hook():
    """The hook caller: ``hook().recorun_report_sections(report=..., options=...)``."""
    return plugin_manager().hook


def merged(results) -> dict:
    """The ``{name: value}`` answers of several plugins as one mapping; a name given twice is a
    configuration error."""
    out: dict = {}
    for result in results:
        for name, value in (result or {}).items():
            if name in out and out[name] is not value:
                raise ConfigError(f"two recorun plugins provide '{name}'")
            out[name] = value
    return out


def _each(hook_name: str, **kwargs):
    """``(plugin name, answer)`` of every implementation of a report hook, called one by one:
    a plugin that raises is named in a warning and left out, so that the job's report (its
    events long processed) is still written."""
    caller = getattr(hook(), hook_name)
    for impl in reversed(caller.get_hookimpls()):
        try:
            yield impl.plugin_name, impl.function(**{k: kwargs[k] for k in impl.argnames})
        except Exception as exc:
            LOG.warning("recorun: warning: plugin %s failed in %s and is left out of the "
                        "report: %s: %s", impl.plugin_name, hook_name, type(exc).__name__, exc)


def report_sections(report: dict, options=None) -> dict:
    """Every plugin's sections for a finished job ``report`` (see the hookspec). A section
    may not replace what the report has (``events``, ``modules``...): such a one is left out
    with a warning, as is a plugin that raises."""
    sections: dict = {}
    for plugin, answer in _each("recorun_report_sections", report=report, options=options):
        for name, value in (answer or {}).items():
            if name in report or name in sections:
                LOG.warning("recorun: warning: plugin %s's report section '%s' is left out: "
                            "the report already has '%s'", plugin, name, name)
                continue
            sections[name] = value
    return sections


def text_reports(report: dict) -> list[str]:
    """Every plugin's text for the end of the job (``recorun_text_report``)."""
    return [text for _, text in _each("recorun_text_report", report=report) if text]
