"""Tower energy calibration done as ExternalWork on a thread pool outside the framework's.

It stands for any offloaded computation: ``acquire`` hands the towers to the module's own
executor and returns at once, so the framework thread goes on with other modules and events;
the executor's callback hands the result to ``holder.done(result)``; ``produce`` puts it.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from recorun import Concurrency, ExternalWorkProducer, InputTag, Param


def calibrate(towers: np.ndarray, scale: float, offset: float) -> np.ndarray:
    """Response correction of a non-compensating calorimeter: low-ET towers are scaled up
    more, ``ET' = ET * (1 + scale / sqrt(ET + offset))``. Returns calibrated copies."""
    calibrated = towers.copy()
    et = towers["et"].astype(np.float64)
    calibrated["et"] = et * (1.0 + scale / np.sqrt(et + offset))
    return calibrated


class ThreadPoolEnergyCalibrator(ExternalWorkProducer):
    """Calibrated towers, computed on ``workers`` threads of the module's own pool."""

    concurrency = Concurrency.SHARED
    towers = InputTag("towers", doc="towers with an 'et' field")
    scale = Param(float, 0.5, doc="size of the low-ET response correction")
    offset = Param(float, 1.0, doc="softening of the correction near zero ET, GeV")
    workers = Param(int, 1, doc="threads of the external pool")

    def begin_job(self):
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix=f"{self.label}-ext")

    def end_job(self):
        self._pool.shutdown(wait=True)

    def acquire(self, event, holder):
        future = self._pool.submit(calibrate, event.get(self.towers), self.scale, self.offset)

        def finished(f):
            error = f.exception()
            if error is None:
                holder.done(f.result())
            else:
                holder.fail(error)

        future.add_done_callback(finished)

    def produce(self, event, calibrated=None):
        event.put(calibrated)
