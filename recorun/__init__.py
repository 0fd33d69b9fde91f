"""recorun: a CMSSW-like event-processing framework with SONIC inference as a service.

Everything recorun installs lives under this one name: the engine (:mod:`recorun.framework`),
the CPU modules (:mod:`recorun.modules`), the SONIC producers and clients
(:mod:`recorun.producers`, :mod:`recorun.sonic_clients`), the coprocessor side
(:mod:`recorun.server`), the Dask farm (:mod:`recorun.farm`), the Prometheus exporter
(:mod:`recorun.monitoring`), the synthetic detector (:mod:`recorun.data`), the workflows and
the benchmarks.

A module author imports from here::

    from recorun import Producer, Filter, InputTag, Param, Concurrency

The names below are loaded on first use, so that ``import recorun.server.models`` (a GPU
site, with torch only) does not load the engine.
"""
from __future__ import annotations

import importlib

__version__ = "0.2.0"

#: the module author's API: name -> the module that defines it
_API = {name: "recorun.framework" for name in (
    "Analyzer", "Collection", "Concurrency", "ConditionsProducer", "ConditionsService", "ConfigError", "EmptySource", "Event", "EventID",
    "ExternalWorkProducer", "Filter", "InputError", "InputTag", "InputTagList", "JobResult",
    "Module", "ModuleError", "OutputModule", "Param", "ProductNotFound", "Producer",
    "RecorunError", "Record", "Service", "Source", "SourceChunk", "TriggerResults", "WaitingTaskHolder",
    "hookimpl", "run_workflow")}

__all__ = sorted([*_API, "__version__"])


def __getattr__(name: str):
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'recorun' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
