"""recorun's engine: events, modules, workflows, the scheduler, the reports and the hooks that
plugins extend it by (:mod:`recorun.framework.hookspecs`).

It imports nothing else of recorun. Module authors import what they need from ``recorun``
itself (``from recorun import Producer, InputTag, Param``), which is this package's API.
"""
from .. import __version__
from .collection import Collection
from .conditions import ConditionsProducer, ConditionsService
from .errors import ConfigError, InputError, ModuleError, ProductNotFound, RecorunError
from .event import Event, EventID, TriggerResults
from .hookspecs import hookimpl
from .module import (Analyzer, Concurrency, ExternalWorkProducer, Filter, Module, OutputModule,
                     Producer, WaitingTaskHolder)
from .params import InputTag, InputTagList, Param, Record
from .process import JobResult, run_workflow
from .service import Service
from .source import EmptySource, Source, SourceChunk

__all__ = ["Analyzer", "Collection", "Concurrency", "ConditionsProducer", "ConditionsService",
           "ConfigError", "EmptySource", "Event", "EventID",
           "ExternalWorkProducer", "Filter", "InputError", "InputTag", "InputTagList", "JobResult",
           "Module", "ModuleError", "OutputModule", "Param", "ProductNotFound", "Producer",
           "Record", "RecorunError", "Service", "Source", "SourceChunk", "TriggerResults",
           "WaitingTaskHolder", "__version__", "hookimpl", "run_workflow"]
