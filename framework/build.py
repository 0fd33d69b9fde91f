"""From a parsed workflow to live objects: plugins loaded, parameters checked, graph built.

Nothing here reads an event. Errors are :class:`~recorun.framework.errors.ConfigError` naming the
workflow file, the label and the parameter.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from .config import PluginSpec, WorkflowConfig
from .errors import ConfigError
from .extras import installed, missing_message
from .graph import ModuleGraph
from .module import Module, OutputModule
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

    def consumed_tags(self) -> set[str]:
        """Every product some module reads."""
        return {tag for node in self.graph.nodes.values() for tag in node.consumes}

    def source_for(self, parameters: dict) -> Source:
        """A new source of the workflow's source type, its parameters updated by
        ``parameters`` (a chunk's), told which products the modules read; not opened."""
        spec = self.config.source
        source = _instantiate(self.config, PluginSpec(spec.label, spec.type_name,
                                                      {**spec.params, **parameters}),
                              "source", Source)
        source.select_products(self.consumed_tags())
        return source

    def new_instance(self, label: str) -> Module:
        """Another copy of module ``label`` with the same parameters (one per stream), set up
        as the first: services, shapes, ``check_workflow``."""
        spec = self.config.modules[label]
        module = type(self.graph.nodes[label].module)(label, **spec.params)
        module.services = self.services
        _tell_shapes(self.source, {label: module})
        module.check_workflow(self.config)
        return module


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
        if kind == "module":
            return cls(spec.label, **spec.params)
        return cls(**spec.params)
    except ParamError as exc:
        raise ConfigError(str(exc), parameter=exc.name, **where) from None
    except ConfigError as exc:
        raise _placed(exc, config, spec.label, kind) from None


def _placed(exc: ConfigError, config: WorkflowConfig, label: str, what: str) -> ConfigError:
    """``exc`` with the workflow file, and the label when it names none."""
    if exc.file is not None:
        return exc
    if exc.label is None:
        return ConfigError(str(exc), file=config.file, label=label, what=what)
    return ConfigError(str(exc), file=config.file)


def build_workflow(config: WorkflowConfig) -> BuiltWorkflow:
    source = _instantiate(config, config.source, "source", Source)
    services = {label: _instantiate(config, spec, "service", Service)
                for label, spec in config.services.items()}
    modules = {label: _instantiate(config, spec, "module", Module)
               for label, spec in config.modules.items()}
    # the source checks its own products first: a missing branch is an input data error
    source.select_products({tag for m in modules.values() for tag in m.consumed_tags()})
    graph = ModuleGraph(config, modules, source.product_tags())
    _tell_shapes(source, modules)
    _tell_provenance(config, source, graph)
    for module in modules.values():
        module.services = services
    _check_requirements(config, source, services, modules)
    _check_records(config, services, modules)
    _check_workflow(config, services, modules)
    _check_output_files(config, source, modules)
    return BuiltWorkflow(config, source, services, graph)


def _tell_shapes(source: Source, modules: dict) -> None:
    """Output modules learn which of the source's products are fixed-size arrays."""
    outputs = [m for m in modules.values() if isinstance(m, OutputModule)]
    shapes = source.product_shapes() if outputs else {}
    for module in outputs:
        module.product_shapes = dict(shapes)


def _tell_provenance(config: WorkflowConfig, source: Source, graph: ModuleGraph) -> None:
    """Output modules get the job's provenance (``job_provenance``): at their end_job they ask
    it what made the products they wrote (:mod:`recorun.framework.provenance`)."""
    outputs = [n.module for n in graph.nodes.values() if isinstance(n.module, OutputModule)]
    if outputs:
        from .provenance import JobProvenance
        provenance = JobProvenance(config, source, graph)
        for module in outputs:
            module.job_provenance = provenance


def conditions_service(services: dict):
    """The workflow's ConditionsService, or None."""
    from .conditions import ConditionsService
    found = [s for s in services.values() if isinstance(s, ConditionsService)]
    return found[0] if found else None


def _check_records(config: WorkflowConfig, services: dict, modules: dict) -> None:
    """A module that declares conditions records (Record parameters) needs the workflow's one
    ConditionsService (whose ``check_workflow`` checks that it provides them)."""
    from .conditions import ConditionsService
    labels = [label for label, s in services.items() if isinstance(s, ConditionsService)]
    if len(labels) > 1:
        raise ConfigError(f"services {', '.join(repr(x) for x in labels)} are all "
                          f"ConditionsServices: a workflow has one (give it every file)",
                          file=config.file)
    records = {label: m.consumed_records() for label, m in modules.items()}
    records = {label: names for label, names in records.items() if names}
    if records and not labels:
        label, names = next(iter(records.items()))
        raise ConfigError(f"reads conditions record '{names[0]}', but the workflow has no "
                          f"ConditionsService (services: {{conditions: {{type: "
                          f"ConditionsService, files: [conditions.yaml]}}}})", file=config.file,
                          label=label)


def _check_workflow(config: WorkflowConfig, services: dict, modules: dict) -> None:
    """Every module's, then every service's ``check_workflow``; their ConfigErrors get the
    workflow file (and the label) when they lack them."""
    users = [*((label, "module", m.check_workflow, (config,)) for label, m in modules.items()),
             *((label, "service", s.check_workflow, (config, modules))
               for label, s in services.items())]
    for label, what, check, args in users:
        try:
            check(*args)
        except ConfigError as exc:
            raise _placed(exc, config, label, what) from None


def _check_output_files(config: WorkflowConfig, source, modules: dict) -> None:
    """Two output modules may not write one file, and none may write onto an input file (the
    job would replace what it reads): configuration errors before the first event."""
    inputs = {os.path.realpath(path) for path in source.input_files()}
    written: dict[str, str] = {}
    for label, module in modules.items():
        param = getattr(type(module), "output_file_param", None)
        if not isinstance(module, OutputModule) or param is None:
            continue
        path = str(getattr(module, param))
        real = os.path.realpath(path)
        if real in written:
            raise ConfigError(f"writes {path}, as output module '{written[real]}' does: give "
                              f"each output a file of its own", file=config.file, label=label,
                              parameter=param)
        if real in inputs:
            raise ConfigError(f"writes {path}, which is one of the job's input files: it would "
                              f"be replaced while it is read", file=config.file, label=label,
                              parameter=param)
        written[real] = label


def _check_requirements(config: WorkflowConfig, source, services: dict, modules: dict) -> None:
    """Every package the workflow's types need that is not installed, in one configuration
    error (exit 2) with the line that installs them all."""
    users = [("source", source), *((f"service '{label}'", s) for label, s in services.items()),
             *((f"module '{label}'", m) for label, m in modules.items())]
    missing = [(f"{who} ({type(thing).__name__})", package, install)
               for who, thing in users
               for package, install in thing.requirements().items() if not installed(package)]
    if missing:
        raise ConfigError(missing_message(missing), file=config.file)
