"""``Collect``: the analyzer the ROOT I/O tests read products with."""
from __future__ import annotations

from recorun import Analyzer, Concurrency, InputTagList, Param


class Collect(Analyzer):
    """Records ``(event.index, event.id, {tag: product})`` of every event in the test's
    Recorder."""

    concurrency = Concurrency.SHARED
    products = InputTagList(doc="products to record")
    recorder = Param(object, doc="the test's Recorder")

    def analyze(self, event):
        self.recorder.record(event.index, tuple(event.id),
                             {tag: event.get(tag) for tag in self.products})
