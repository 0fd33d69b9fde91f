"""Sources: where events come from.

A source is a serial resource: the scheduler calls :meth:`Source.next_event` from one thread at
a time. It returns the next :class:`~framework.event.Event` (with its source products already
put, tagged ``source:<name>``) or ``None`` at the end. Sources are plugins of the entry-point
group ``recorun.sources`` and declare typed parameters like modules do.
"""
from __future__ import annotations

from typing import ClassVar

from .event import Event, EventID
from .params import Configurable, Param

SOURCE_LABEL = "source"


class Source(Configurable):
    label: ClassVar[str] = SOURCE_LABEL

    def product_tags(self) -> list[str]:
        """Tags of the products every event from this source carries."""
        return []

    def select_products(self, tags: set[str]) -> None:
        """Told before the first event which of its products some module consumes."""

    def open(self, max_events: int | None) -> None:
        """Called once before the first event; ``max_events`` is the job's limit (or None)."""

    def next_event(self, index: int) -> Event | None:
        raise NotImplementedError

    def total_events(self) -> int | None:
        """How many events this job would read, when known."""
        return None

    def close(self) -> None:
        """Called once after the last event."""

    def summary(self) -> dict:
        """What the job report says about the source (files read, files skipped...)."""
        return {"type": type(self).__name__}


class EmptySource(Source):
    """``count`` numbered events with no products (for tests and generators)."""

    count = Param(int, 10, doc="number of events")
    run = Param(int, 1, doc="run number")
    lumi = Param(int, 1, doc="luminosity block")
    first_event = Param(int, 1, doc="event number of the first event")

    def open(self, max_events):
        self._n = self.count if max_events is None else min(self.count, max_events)

    def next_event(self, index):
        if index >= self._n:
            return None
        return Event(EventID(self.run, self.lumi, self.first_event + index), index)

    def total_events(self):
        return self._n
