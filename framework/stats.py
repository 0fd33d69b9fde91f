"""Counters and timers the scheduler fills while it runs.

Each (module, stream) and (path, stream) pair has its own record: a stream holds one event at
a time, a module runs at most once per event and a path walks its modules one after another,
so a record has one writer at a time and needs no lock. (How often paths reached a module is
therefore counted per path, not per module: a module on two paths is reached by both at once.)
:func:`merge` adds the streams up at the end. The records have slots: the scheduler updates
them on every module call.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields


@dataclass(slots=True)
class ModuleStats:
    runs: int = 0             # events on which the module was called
    passed: int = 0           # filter returned true
    rejected: int = 0         # filter returned false
    errors: int = 0
    real_ns: int = 0          # all calls (acquire + produce for ExternalWork)
    cpu_ns: int = 0
    acquire_real_ns: int = 0
    acquire_cpu_ns: int = 0
    external_ns: int = 0      # from acquire's return to holder.done()
    produce_real_ns: int = 0
    produce_cpu_ns: int = 0

    def add(self, other: "ModuleStats") -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@dataclass(slots=True)
class PathStats:
    size: int
    visited: int = 0          # events that started the path
    passed: int = 0           # events the path accepted
    rejected: int = 0
    errors: int = 0
    module_visited: list[int] = field(default_factory=list)
    module_passed: list[int] = field(default_factory=list)
    module_rejected: list[int] = field(default_factory=list)
    module_errors: list[int] = field(default_factory=list)

    def __post_init__(self):
        for name in ("module_visited", "module_passed", "module_rejected", "module_errors"):
            if not getattr(self, name):
                setattr(self, name, [0] * self.size)

    def add(self, other: "PathStats") -> None:
        for name in ("visited", "passed", "rejected", "errors"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name in ("module_visited", "module_passed", "module_rejected", "module_errors"):
            mine, theirs = getattr(self, name), getattr(other, name)
            for i, value in enumerate(theirs):
                mine[i] += value


def merge(records: list):
    total = type(records[0])(**({"size": records[0].size} if isinstance(records[0], PathStats)
                                  else {}))
    for record in records:
        total.add(record)
    return total
