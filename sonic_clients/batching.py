"""Client-side event batching: the inputs of several events in one request.

A request through Triton costs about the same whatever its size (docs/PERFORMANCE.md), and a
SONIC producer sends one per event. :class:`EventBatcher` sits between a producer and its
client: ``submit(inputs, done)`` takes one event's inputs; the events gathered go out as ONE
``client.infer`` call (their inputs concatenated along the batch axis), and the answer is split
back, each event's ``done`` getting exactly its own rows, so the outputs are those of one
request per event. A batch goes out

* when it holds ``batch_events`` events, or when the next event's rows would take it past the
  model's ``max_batch_size`` (that event starts the next batch; ragged inputs have no such
  limit, as the client sends each shape of entries in requests of its own anyway);
* when the framework's threads run out of work (:func:`recorun.framework.pool.call_when_idle`):
  every event in flight then waits on something outside the CPU, so no other event can reach
  the producer before this batch is answered (every stream waits, or the source is done);
  except while the answer to an earlier batch is being handed to its events (they are on
  their way back to the threads);
* ``batch_wait`` after its first event joined it (the timer thread needs the GIL: a module
  holding it can make that later).

Inputs given as lists of entries (ragged inputs, see :mod:`recorun.sonic_clients.base`) are
batched as lists: the entries of the events joined, the outputs split back by entry counts. An
event with no rows does not wait: it goes to the client at once (which answers at once).

A batch is one ``infer`` call: the client retries it and fails it over as a whole. When it
fails, every event of the batch gets the error (each fails, named by the producer). The client
counts the batch's events as its ``calls`` (so figures per call stay per event); the batcher
counts ``batches``, ``batched_events`` and ``batch_wait_s``, the time events waited for their
batch to go out (:meth:`EventBatcher.stats`).
"""
from __future__ import annotations

import threading
import time
from collections.abc import Mapping

import numpy as np

from recorun.framework.pool import call_when_idle

from .base import LOG, Done, SonicClient, SonicError


class _Batch:
    """The events gathered so far: their inputs, done functions, rows and arrival times."""

    def __init__(self, ragged: bool):
        self.ragged = ragged
        self.inputs: list[dict] = []
        self.dones: list[Done] = []
        self.rows: list[int] = []
        self.arrived: list[float] = []
        self.total_rows = 0

    def add(self, inputs: dict, rows: int, done: Done, now: float) -> None:
        self.inputs.append(inputs)
        self.dones.append(done)
        self.rows.append(rows)
        self.arrived.append(now)
        self.total_rows += rows


class EventBatcher:
    """Gathers the events of one producer into requests (see the module docstring).

    ``batch_events`` >= 2; ``batch_wait_s`` > 0. Thread-safe: ``submit`` may be called from any
    number of threads at once. ``close()`` sends what is gathered and stops the timer."""

    def __init__(self, client: SonicClient, batch_events: int, batch_wait_s: float):
        if batch_events < 2:
            raise ValueError("an EventBatcher needs batch_events >= 2")
        self.client = client
        self.batch_events = int(batch_events)
        self.batch_wait_s = float(batch_wait_s)
        self.max_rows = client.description.max_batch_size
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._batch: _Batch | None = None
        self._deadline: float | None = None
        self._closed = False
        self._delivering = 0              # answers being handed to their events
        self._counts = {"batches": 0, "batched_events": 0, "batch_wait_s": 0.0}
        self._timer = threading.Thread(target=self._time_out, daemon=True,
                                       name=f"batch-{client.config.model}")
        self._timer.start()

    # the producer's calls ------------------------------------------------------------------
    def submit(self, inputs: Mapping[str, object], done: Done) -> None:
        """One event's inputs (arrays, batch first, or lists of entries); ``done(outputs,
        error)`` once, with this event's outputs only. Inputs that do not fit the model raise
        :class:`~recorun.sonic_clients.base.ClientConfigError` here, for this event alone."""
        inputs, rows = self.client.check_inputs(inputs)
        ragged = any(isinstance(v, list) for v in inputs.values())
        if rows == 0:
            self.client.infer(inputs, done)
            return
        now = time.perf_counter()
        ready: list[_Batch] = []
        with self._lock:
            if self._closed:
                raise SonicError(f"model '{self.client.config.model}': event submitted to a "
                                 "closed batcher")
            batch = self._batch
            if batch is not None and (batch.ragged != ragged or not ragged and
                                      batch.total_rows + rows > self.max_rows):
                ready.append(self._take())
                batch = None
            first = batch is None
            if first:
                batch = self._batch = _Batch(ragged)
                self._deadline = now + self.batch_wait_s
                self._wake.notify()
            batch.add(inputs, rows, done, now)
            if len(batch.dones) >= self.batch_events:
                ready.append(self._take())
        for full in ready:
            self._send(full)
        if first:
            call_when_idle(self._on_idle)

    def flush(self) -> None:
        """Send the events gathered so far, if any."""
        with self._lock:
            batch = self._take() if self._batch is not None else None
        if batch is not None:
            self._send(batch)

    def _on_idle(self) -> None:
        """The job's threads are out of work: send the batch, unless the answer to an earlier
        batch is being handed to its events right now (their produce calls are on their way
        to the threads, and the events they finish will bring new ones): then wait for the
        next time the threads run out of work (``batch_wait`` still bounds the wait)."""
        with self._lock:
            delivering = self._delivering
        if delivering:
            call_when_idle(self._on_idle)
        else:
            self.flush()

    def close(self) -> None:
        """Send what is gathered; no ``submit`` afterwards. Idempotent."""
        with self._lock:
            self._closed = True
            self._wake.notify()
        self.flush()
        self._timer.join(1.0)

    def stats(self) -> dict:
        """``batches``, ``batched_events``, ``batch_wait_s``, and ``mean_batch_wait_ms`` (per
        event) and ``events_per_batch``."""
        with self._lock:
            counts = dict(self._counts)
        events = counts["batched_events"]
        counts["mean_batch_wait_ms"] = 1e3 * counts["batch_wait_s"] / events if events else 0.0
        counts["events_per_batch"] = events / counts["batches"] if counts["batches"] else 0.0
        return counts

    # internals -----------------------------------------------------------------------------
    def _take(self) -> _Batch:
        """With the lock held: the current batch, counted, no longer current."""
        batch, self._batch, self._deadline = self._batch, None, None
        now = time.perf_counter()
        self._counts["batches"] += 1
        self._counts["batched_events"] += len(batch.dones)
        self._counts["batch_wait_s"] += sum(now - t for t in batch.arrived)
        return batch

    def _time_out(self) -> None:
        """The timer thread: sends a batch ``batch_wait`` after its first event."""
        with self._lock:
            while not self._closed:
                if self._deadline is None:
                    self._wake.wait()
                    continue
                left = self._deadline - time.perf_counter()
                if left > 0:
                    self._wake.wait(left)
                    continue
                batch = self._take()
                self._lock.release()
                try:
                    self._send(batch)
                finally:
                    self._lock.acquire()

    def _send(self, batch: _Batch) -> None:
        """One ``infer`` call for the batch; each event's ``done`` gets its own rows."""
        dones, rows = batch.dones, batch.rows
        if len(dones) == 1:
            self.client.infer(batch.inputs[0], dones[0])
            return
        if batch.ragged:
            joined = {n: [entry for event in batch.inputs for entry in event[n]]
                      for n in batch.inputs[0]}
        else:
            joined = {n: np.concatenate([event[n] for event in batch.inputs])
                      for n in batch.inputs[0]}

        def done(outputs, error):
            with self._lock:
                self._delivering += 1
            try:
                deliver(outputs, error)
            finally:
                with self._lock:
                    self._delivering -= 1

        def deliver(outputs, error):
            if error is None:
                try:
                    parts = _split(outputs, rows)
                except Exception as exc:       # an answer whose rows do not add up
                    error = SonicError(f"model '{self.client.config.model}': the answer to a "
                                       f"batch of {len(dones)} events cannot be split back "
                                       f"per event: {exc}")
            for k, event_done in enumerate(dones):
                try:
                    event_done(None if error is not None else parts[k], error)
                except Exception:
                    LOG.exception("model '%s': an event's done() raised",
                                  self.client.config.model)

        try:
            self.client.infer(joined, done, events=len(dones))
        except Exception as exc:               # every event of the batch hears of it
            done(None, exc)


def _split(outputs: dict, rows: list[int]) -> list[dict]:
    """``outputs`` of a batch (arrays, or lists of entries) cut into one dict per event."""
    bounds = np.cumsum([0, *rows])
    total = int(bounds[-1])
    for name, value in outputs.items():
        if len(value) != total:
            raise ValueError(f"output '{name}' has {len(value)} rows for {total} input rows")
    return [{name: value[bounds[k]:bounds[k + 1]] for name, value in outputs.items()}
            for k in range(len(rows))]
