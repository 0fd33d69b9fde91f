"""recorun's engine: events, modules, workflows, the scheduler and the reports.

Module authors need only what this package exports.
"""
from .collection import Collection
from .errors import ConfigError, InputError, ModuleError, ProductNotFound, RecorunError
from .event import Event, EventID, TriggerResults
from .module import (Analyzer, Concurrency, ExternalWorkProducer, Filter, Module, OutputModule,
                     Producer, WaitingTaskHolder)
from .params import InputTag, InputTagList, Param
from .service import Service
from .source import EmptySource, Source
from .process import JobResult, run_workflow

__version__ = "0.1.0"

__all__ = ["Analyzer", "Collection", "Concurrency", "ConfigError", "EmptySource", "Event", "EventID",
           "ExternalWorkProducer", "Filter", "InputError", "InputTag", "InputTagList", "JobResult",
           "Module",
           "ModuleError", "OutputModule", "Param", "ProductNotFound", "Producer", "RecorunError",
           "Service", "Source", "TriggerResults", "WaitingTaskHolder", "__version__",
           "run_workflow"]
