"""Events and their products.

An event has an :class:`EventID` and a product store. A product is named by a tag
``label:instance`` (``label`` alone for the default, empty instance). It is put once, by the
module with that label, and is read-only afterwards. Modules see an event through
:class:`ModuleEvent`, a view that only lets them read what they declared they consume and put
what they declared they produce: this is what keeps the module graph honest.
"""
from __future__ import annotations

from typing import Any, NamedTuple

from .errors import ProductNotFound


class EventID(NamedTuple):
    run: int
    lumi: int
    event: int

    def __str__(self) -> str:
        return f"{self.run}:{self.lumi}:{self.event}"


def canonical_tag(tag: str) -> str:
    """``"label:"`` and ``"label"`` name the same product; return the short form."""
    label, _, instance = tag.partition(":")
    if not label or ":" in instance:
        raise ValueError(f"'{tag}' is not a product tag (expected 'label' or 'label:instance')")
    return f"{label}:{instance}" if instance else label


def tag_label(tag: str) -> str:
    return tag.partition(":")[0]


def make_tag(label: str, instance: str = "") -> str:
    return f"{label}:{instance}" if instance else label


class TriggerResults:
    """Which trigger paths accepted an event (put by the framework as ``TriggerResults``).

    Read-only, like every product. (A plain class: one is made per event, and a frozen
    dataclass costs twice as much to make.)"""

    __slots__ = ("_paths",)

    def __init__(self, paths: dict[str, bool]):
        self._paths = paths

    @property
    def paths(self) -> dict[str, bool]:
        """``{path name: accepted}``; do not change it."""
        return self._paths

    def __eq__(self, other) -> bool:
        return isinstance(other, TriggerResults) and self._paths == other._paths

    __hash__ = None    # as a dataclass's: it holds a dict

    def __repr__(self) -> str:
        return f"TriggerResults(paths={self._paths!r})"

    @property
    def accept(self) -> bool:
        """An event is accepted when any path accepts it (or when there are no paths)."""
        return not self.paths or any(self.paths.values())

    def __getitem__(self, path: str) -> bool:
        return self.paths[path]


class Event:
    """One event: its ID, its index in the job, and the product store. ``products`` (the
    source's products, ``{tag: value}``) is taken over, not copied: a source hands each event
    a dict of its own."""

    __slots__ = ("id", "index", "stream", "lumi", "_products")

    def __init__(self, event_id: EventID, index: int, products: dict[str, Any] | None = None):
        self.id = event_id
        self.index = index
        self.stream = -1
        self.lumi = None       # its LuminosityBlock, set by the scheduler before it starts
        self._products: dict[str, Any] = {} if products is None else products   # taken over

    def put(self, tag: str, value: Any) -> None:
        if tag in self._products:
            raise ValueError(f"product '{tag}' is already in event {self.id}; products are put once")
        self._products[tag] = value

    def get(self, tag: str) -> Any:
        try:
            return self._products[tag]
        except KeyError:
            raise ProductNotFound(f"event {self.id} has no product '{tag}'") from None

    def __contains__(self, tag: str) -> bool:
        return tag in self._products

    def tags(self) -> list[str]:
        return list(self._products)


class ModuleEvent:
    """The event as one module sees it during one call."""

    __slots__ = ("_event", "_worker")

    def __init__(self, event: Event, worker):
        self._event = event
        self._worker = worker

    @property
    def id(self) -> EventID:
        return self._event.id

    @property
    def index(self) -> int:
        """Position of the event in the job (0, 1, 2, ...), whatever the thread count."""
        return self._event.index

    @property
    def stream(self) -> int:
        return self._event.stream

    def get(self, tag: str) -> Any:
        """Read a product this module declared it consumes (an InputTag parameter)."""
        if tag not in self._worker.consumes:
            tag = canonical_tag(tag)
            if tag not in self._worker.consumes:
                raise ProductNotFound(
                    f"module '{self._worker.label}' reads '{tag}' without declaring it; "
                    f"declare it with an InputTag parameter (it consumes: "
                    f"{sorted(self._worker.consumes) or 'nothing'})")
        try:
            return self._event._products[tag]
        except KeyError:
            raise ProductNotFound(
                f"event {self._event.id} has no product '{tag}': its producer "
                f"'{tag_label(tag)}' ran but did not put it") from None

    def __getitem__(self, tag: str) -> Any:
        return self.get(tag)

    def record(self, name: str) -> Any:
        """The conditions record ``name`` valid for this event's luminosity block; the module
        must declare it with a Record parameter."""
        if name not in self._worker.records:
            raise ProductNotFound(
                f"module '{self._worker.label}' reads conditions record '{name}' without "
                f"declaring it; declare it with a Record parameter (it reads: "
                f"{sorted(self._worker.records) or 'no record'})")
        return self._event.lumi.record(name)

    def put(self, value: Any, instance: str = "") -> None:
        """Put a product under this module's label and the given instance name."""
        if instance not in self._worker.instances:
            raise ValueError(
                f"module '{self._worker.label}' puts instance '{instance}' that it does not "
                f"declare in produces ({sorted(self._worker.instances)})")
        self._event.put(make_tag(self._worker.label, instance), value)
