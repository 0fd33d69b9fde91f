"""Runs and luminosity blocks: what the begin/end transition hooks receive.

The source's events carry ``EventID(run, lumi, event)``. The scheduler begins a run and a
luminosity block ("lumi") before their first event and ends them after their last one; the
hooks of every module and service (``begin_run(run)``, ``begin_luminosity_block(lumi)``,
``end_luminosity_block(lumi)``, ``end_run(run)``) are called once per transition and per
module instance, never beside an event (one luminosity block at a time: see
docs/TRANSITIONS.md).

:class:`Run` and :class:`LuminosityBlock` are handed to those hooks; a lumi is also what
events read their conditions through (:meth:`LuminosityBlock.record`).
"""
from __future__ import annotations

from typing import Any


class Run:
    """One run: ``run.run`` is its number. ``record(name)``: a conditions record valid for
    the run's first luminosity block (needs a ConditionsService)."""

    __slots__ = ("run", "_conditions")

    def __init__(self, run: int, conditions=None):
        self.run = run
        self._conditions = conditions

    def record(self, name: str) -> Any:
        return _record(self._conditions, name, f"run {self.run}")

    def __repr__(self) -> str:
        return f"Run({self.run})"


class LuminosityBlock:
    """One luminosity block: ``lumi.run`` and ``lumi.luminosity_block``. ``record(name)``: a
    conditions record valid for it. ``events`` and ``accepted`` (per trigger path) count its
    events so far (final in ``end_luminosity_block``)."""

    __slots__ = ("run", "luminosity_block", "_conditions", "events", "failed", "accepted")

    def __init__(self, run: int, luminosity_block: int, conditions=None):
        self.run = run
        self.luminosity_block = luminosity_block
        self._conditions = conditions
        self.events = 0
        self.failed = 0
        self.accepted: dict[str, int] = {}

    @property
    def key(self) -> tuple[int, int]:
        return self.run, self.luminosity_block

    def record(self, name: str) -> Any:
        return _record(self._conditions, name, f"run {self.run} lumi {self.luminosity_block}")

    def summary(self) -> dict:
        """The report's entry for this luminosity block."""
        return {"run": self.run, "luminosity_block": self.luminosity_block,
                "events": self.events, "failed": self.failed, "accepted": dict(self.accepted)}

    def __repr__(self) -> str:
        return f"LuminosityBlock({self.run}:{self.luminosity_block})"


def _record(conditions, name: str, where: str) -> Any:
    if conditions is None:
        from .errors import ConfigError
        raise ConfigError(f"conditions record '{name}' asked for {where}, but the workflow has "
                          f"no ConditionsService (services: {{conditions: {{type: "
                          f"ConditionsService, files: [...]}}}})")
    return conditions.get(name)
