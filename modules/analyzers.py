"""Analyzers: read products, accumulate, report at the end of the job."""
from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import numpy as np

from recorun import Analyzer, Concurrency, InputTag, Param

log = logging.getLogger(__name__)


class SummaryAnalyzer(Analyzer):
    """Jet multiplicity and leading-jet pT histograms, and mean missing ET, of the events it
    sees; printed at the end and written to ``output`` (JSON) when given."""

    concurrency = Concurrency.SHARED
    jets = InputTag("jets", doc="jets with a 'pt' field")
    met = InputTag(None, doc="missing ET (a scalar), optional")
    pt_bins = Param(list[float], [0, 25, 50, 75, 100, 150, 200, 300, 500, 1000],
                    doc="bin edges of the leading-jet pT histogram, GeV")
    output = Param(str, "", doc="JSON file for the summary (empty: print only)")

    def begin_job(self):
        self._lock = threading.Lock()
        self._events = 0
        self._multiplicity = np.zeros(11, dtype=np.int64)
        self._leading = np.zeros(len(self.pt_bins) - 1, dtype=np.int64)
        self._met_sum = 0.0

    def analyze(self, event):
        pt = event.get(self.jets)["pt"]
        met = float(event.get(self.met)) if self.met else 0.0
        leading_bin = np.searchsorted(self.pt_bins, pt.max(), side="right") - 1 if pt.size else -1
        with self._lock:
            self._events += 1
            self._multiplicity[min(pt.size, 10)] += 1
            if 0 <= leading_bin < self._leading.size:
                self._leading[leading_bin] += 1
            self._met_sum += met

    def summary(self) -> dict:
        return {"events": self._events,
                "jet_multiplicity": self._multiplicity.tolist(),
                "leading_jet_pt_bins": list(self.pt_bins),
                "leading_jet_pt_counts": self._leading.tolist(),
                "mean_met": self._met_sum / self._events if self._events else 0.0}

    def end_job(self):
        summary = self.summary()
        log.info("%s: %d events, jets per event %s, mean MET %.1f GeV", self.label,
                 summary["events"], summary["jet_multiplicity"], summary["mean_met"])
        if self.output:
            Path(self.output).parent.mkdir(parents=True, exist_ok=True)
            Path(self.output).write_text(json.dumps(summary, indent=1) + "\n")
