"""Sources: where events come from.

A source is a serial resource: the scheduler calls :meth:`Source.next_event` from one thread at
a time. It returns the next :class:`~recorun.framework.event.Event` (with its source products already
put, tagged ``source:<name>``) or ``None`` at the end. Sources are plugins of the entry-point
group ``recorun.sources`` and declare typed parameters like modules do.

A source that can be cut into pieces (:meth:`Source.chunks`) can be run by a chunked executor
(``recorun --executor dask``): each piece is a :class:`SourceChunk`, described by the parameters
that make a source of the same type read exactly that piece.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from .event import Event, EventID
from .params import Configurable, Param

SOURCE_LABEL = "source"


@dataclass(frozen=True)
class SourceChunk:
    """A piece of a job's input that a job of its own can process.

    A source of the same type with its parameters updated by ``parameters``, in a job limited
    to ``size`` events (``process.max_events``), reads exactly this piece: the events of job
    indices ``first_index`` to ``first_index + size - 1``, numbered as the whole job numbers
    them. ``file`` and ``first_entry`` say where they are (None for a source without files)."""

    id: int
    first_index: int
    size: int
    parameters: dict = field(default_factory=dict)
    file: str | None = None
    first_entry: int = 0

    @property
    def stop_entry(self) -> int:
        return self.first_entry + self.size

    def describe(self) -> str:
        if self.file is None:
            return f"events {self.first_index} to {self.first_index + self.size - 1}"
        return f"{self.file} entries {self.first_entry} to {self.stop_entry - 1}"


def split_entries(start: int, stop: int, edges, size: int) -> list[tuple[int, int]]:
    """``[start, stop)`` cut into pieces of about ``size`` entries: a cut goes on the edge (a
    file's cluster boundary) nearest to its target when one lies within half a piece of it;
    the last piece takes a remainder under half a piece."""
    inner = sorted(e for e in set(edges) if start < e < stop)
    pieces, a = [], start
    while a < stop:
        target = a + size
        if stop - target < size / 2:
            b = stop
        else:
            near = [e for e in inner if a + size / 2 <= e <= a + 1.5 * size]
            b = min(near, key=lambda e: (abs(e - target), e)) if near else target
        pieces.append((a, b))
        a = b
    return pieces


class Source(Configurable):
    label: ClassVar[str] = SOURCE_LABEL

    def product_tags(self) -> list[str]:
        """Tags of the products every event from this source carries."""
        return []

    def select_products(self, tags: set[str]) -> None:
        """Told before the first event which of its products some module consumes."""

    def product_shapes(self) -> dict[str, tuple[int, ...]]:
        """``{tag: shape}`` for products that are NumPy arrays of the same fixed shape in every
        event (a ROOT branch ``float x[5]``: ``(5,)``). Output modules are told them
        (:attr:`OutputModule.product_shapes`) and can write those products as fixed-size."""
        return {}

    def open(self, max_events: int | None) -> None:
        """Called once before the first event; ``max_events`` is the job's limit (or None)."""

    def next_event(self, index: int) -> Event | None:
        raise NotImplementedError

    def total_events(self) -> int | None:
        """How many events this job would read, when known."""
        return None

    def close(self) -> None:
        """Called once after the last event."""

    def planned_events(self, max_events: int | None) -> int | None:
        """How many events a job limited to ``max_events`` would read, when known before
        :meth:`open` (a chunked executor sizes its chunks by it)."""
        return None

    def chunks(self, max_events: int | None, size: int) -> list[SourceChunk]:
        """This job's input (at most ``max_events`` events) cut into pieces of about ``size``
        events, in job order (see :class:`SourceChunk`). Called on a source that was built,
        not opened. A source that cannot be cut raises NotImplementedError (the default)."""
        raise NotImplementedError(f"{type(self).__name__} cannot be cut into chunks")

    def input_files(self) -> list[str]:
        """The files this source reads (no job may write onto one of them)."""
        return []

    def summary(self) -> dict:
        """What the job report says about the source (files read, files skipped...)."""
        return {"type": type(self).__name__}


class EmptySource(Source):
    """``count`` numbered events with no products (for tests and generators)."""

    count = Param(int, 10, doc="number of events")
    run = Param(int, 1, doc="run number (of the first event)")
    lumi = Param(int, 1, doc="luminosity block (of the first event)")
    first_event = Param(int, 1, doc="event number of the first event")
    events_per_lumi = Param(int, 0, doc="events numbered n go to luminosity block "
                            "lumi + (n - 1) // events_per_lumi (0: all in one)")
    lumis_per_run = Param(int, 0, doc="with events_per_lumi: luminosity blocks per run, then "
                          "the run number goes up and the lumi starts again (0: one run)")

    def __init__(self, **params):
        super().__init__(**params)
        if self.events_per_lumi < 0 or self.lumis_per_run < 0:
            from .params import ParamError
            raise ParamError("events_per_lumi" if self.events_per_lumi < 0 else
                             "lumis_per_run", "must be 0 or more")

    def open(self, max_events):
        self._n = self.count if max_events is None else min(self.count, max_events)

    def event_id(self, number: int) -> EventID:
        """The ID of the event numbered ``number``."""
        if not self.events_per_lumi:
            return EventID(self.run, self.lumi, number)
        block = (number - 1) // self.events_per_lumi
        if not self.lumis_per_run:
            return EventID(self.run, self.lumi + block, number)
        return EventID(self.run + block // self.lumis_per_run,
                       self.lumi + block % self.lumis_per_run, number)

    def next_event(self, index):
        if index >= self._n:
            return None
        return Event(self.event_id(self.first_event + index), index)

    def total_events(self):
        return self._n

    def planned_events(self, max_events):
        return self.count if max_events is None else min(self.count, max_events)

    def chunks(self, max_events, size):
        total = self.planned_events(max_events)
        return [SourceChunk(i, a, b - a, {"count": b - a, "first_event": self.first_event + a})
                for i, (a, b) in enumerate(split_entries(0, total, (), size))]
