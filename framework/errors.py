"""Exceptions of the framework and the exit codes the CLI maps them to.

Every error names what a physicist needs to find the problem: the YAML file, the module label,
the parameter, the input file or the event.
"""
from __future__ import annotations

EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_INPUT = 3
EXIT_MODULE = 4
EXIT_INTERRUPTED = 130


class RecorunError(Exception):
    """Base class of every error the framework raises on purpose."""

    exit_code = 1


class ConfigError(RecorunError):
    """The workflow is wrong: found before the first event is read (or, when only an event
    can show it, at that event: the job stops with this exit code all the same)."""

    exit_code = EXIT_CONFIG

    def __init__(self, message: str, *, file: str | None = None, label: str | None = None,
                 parameter: str | None = None, what: str = "module"):
        self.file, self.label, self.parameter = file, label, parameter
        where = []
        if file:
            where.append(str(file))
        if label:
            where.append(f"{what} '{label}'" if what != "source" else "source")
        if parameter:
            where.append(f"parameter '{parameter}'")
        super().__init__(f"{': '.join(where)}: {message}" if where else message)


class InputError(RecorunError):
    """Input data cannot be read (missing file, bad tree, corrupt basket...)."""

    exit_code = EXIT_INPUT


class ProductNotFound(RecorunError):
    """A module asked for a product that is not (or not yet) in the event."""


class ModuleError(RecorunError):
    """An exception raised by a module, with the context of the call that raised it."""

    exit_code = EXIT_MODULE

    def __init__(self, cause: BaseException, *, event_id, stream: int, module_type: str,
                 label: str, method: str, path: str | None = None, what: str = "module",
                 context: str | None = None):
        """``context`` replaces "on event E (stream S)" in the message (a run or lumi
        transition: "at the beginning of lumi 1:3"); ``what``: module or service."""
        self.cause = cause
        if isinstance(cause, ConfigError):   # a configuration error found with an event
            self.exit_code = EXIT_CONFIG
        self.event_id, self.stream, self.path = event_id, stream, path
        self.module_type, self.label, self.method = module_type, label, method
        self.what, self.context = what, context
        if context is None:
            on_path = f", path '{path}'" if path else ""
            context = f"on event {event_id} (stream {stream}{on_path})"
        super().__init__(f"{what} '{label}' ({module_type}) failed in {self.where} {context}: "
                         f"{type(cause).__name__}: {cause}")

    @property
    def where(self) -> str:
        return "its external work" if self.method == "external" else f"{self.method}()"

    def to_dict(self) -> dict:
        found = {"event": str(self.event_id), "stream": self.stream, "path": self.path,
                 "module_type": self.module_type, "label": self.label, "method": self.method,
                 "error": f"{type(self.cause).__name__}: {self.cause}"}
        if self.context is not None:        # a run or lumi transition, not the event's own
            found.update(stream=None, context=self.context, what=self.what)
        return found
