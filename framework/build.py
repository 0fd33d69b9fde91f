"""From a parsed workflow to live objects: plugins loaded, parameters checked, graph built.

Nothing here reads an event. Errors are :class:`~recorun.framework.errors.ConfigError` naming the
workflow file, the label and the parameter.
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import PluginSpec, WorkflowConfig
from .errors import ConfigError
from .extras import MissingExtra, check
from .graph import ModuleGraph
from .module import Module
from .params import ParamError
from .registry import PluginNotFound, load
from .service import Service
from .source import Source


@dataclass
class BuiltWorkflow:
    config: WorkflowConfig
    source: Source
    services: dict[str, Service]
    graph: ModuleGraph

    def new_instance(self, label: str) -> Module:
        """Another copy of module ``label`` with the same parameters (one per stream)."""
        spec = self.config.modules[label]
        return type(self.graph.nodes[label].module)(label, **spec.params)


def _instantiate(config: WorkflowConfig, spec: PluginSpec, kind: str, base: type):
    """Load the type (a class may stand for the name in workflows built in Python)."""
    where = {"file": config.file, "label": spec.label, "what": kind}
    try:
        cls = spec.type_name if isinstance(spec.type_name, type) else load(kind, spec.type_name)
    except PluginNotFound as exc:
        raise ConfigError(str(exc), **where) from None
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ConfigError(f"'{spec.type_name}' is not a {base.__name__} subclass", **where)
    try:
        check(cls.requires, f"{cls.__name__}")
    except MissingExtra as exc:
        raise ConfigError(str(exc), **where) from None
    try:
        if kind == "module":
            return cls(spec.label, **spec.params)
        return cls(**spec.params)
    except ParamError as exc:
        raise ConfigError(str(exc), parameter=exc.name, **where) from None


def build_workflow(config: WorkflowConfig) -> BuiltWorkflow:
    source = _instantiate(config, config.source, "source", Source)
    services = {label: _instantiate(config, spec, "service", Service)
                for label, spec in config.services.items()}
    modules = {label: _instantiate(config, spec, "module", Module)
               for label, spec in config.modules.items()}
    # the source checks its own products first: a missing branch is an input data error
    source.select_products({tag for m in modules.values() for tag in m.consumed_tags()})
    graph = ModuleGraph(config, modules, source.product_tags())
    for module in modules.values():
        module.services = services
    return BuiltWorkflow(config, source, services, graph)
