"""Writes selected products of selected events to one NumPy ``.npz`` file.

For product ``label:instance`` the file holds ``<label>_<instance>`` (all events' values
concatenated along the first axis), ``<label>_<instance>__counts`` (entries per event) and
``event_id`` (run, lumi, event rows). Events are written in event order whatever the thread
count. The file is written under a temporary name and renamed only when the job processed
every event, so a file with the final name is always complete; a job that stopped early leaves
``<file>.partial`` with the events that were done.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from framework import InputTagList, OutputModule, Param

log = logging.getLogger(__name__)


def _column(tag: str) -> str:
    return tag.replace(":", "_")


class NpzOutput(OutputModule):
    products = InputTagList(doc="products to write")
    file = Param(str, doc="output file (.npz)")

    def begin_job(self):
        self._rows: dict[int, tuple] = {}

    def write(self, event):
        values = tuple(np.atleast_1d(np.asarray(event.get(tag))) for tag in self.products)
        self._rows[event.index] = (tuple(event.id), values)

    def end_job(self):
        order = sorted(self._rows)
        arrays = {"event_id": np.array([self._rows[i][0] for i in order],
                                       dtype=np.int64).reshape(-1, 3)}
        for k, tag in enumerate(self.products):
            parts = [self._rows[i][1][k] for i in order]
            arrays[_column(tag) + "__counts"] = np.array([len(p) for p in parts], np.int64)
            arrays[_column(tag)] = np.concatenate(parts) if parts else np.zeros(0)
        path = Path(self.file)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        with open(partial, "wb") as handle:
            np.savez(handle, **arrays)
        if self.job_complete:
            os.replace(partial, path)
            log.info("%s: wrote %d events to %s", self.label, len(order), path)
        else:
            log.warning("%s: job stopped early; %d events left in %s", self.label, len(order),
                        partial)
