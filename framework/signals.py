"""SIGINT and SIGTERM in every phase of a job: what a batch system, ``timeout`` or Ctrl-C get.

One :class:`JobSignals` handles both signals for the whole command, from reading the workflow
to writing the reports. What the first signal does depends on the phase:

=============================  ================================================================
phase                          first SIGINT or SIGTERM
=============================  ================================================================
set-up (workflow, begin_job,   abandon it at once: :class:`JobInterrupted` is raised where the
a fallback server starting,    main thread is (a wait for a server included); what began is
workers starting)              ended (servers stopped), the report says no event was read
the event loop                 stop reading events, finish those in flight (a chunked job:
                               every worker does), then end as below
end-job, reports               noted; end_job and the reports finish (they stop the servers
                               and write what was done)
=============================  ================================================================

The exit code is 128 + the signal's number: 130 for SIGINT, 143 for SIGTERM. A second signal
aborts at once (``os._exit``): the servers recorun started get SIGTERM from the kernel as
their parent goes (Linux's parent-death signal), so none is left running; no report.

Outside the main thread (a job run from Python in a thread) nothing is installed.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class JobInterrupted(BaseException):
    """Raised in the main thread by the first signal during set-up: abandon it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    def __str__(self) -> str:
        return f"interrupted by {signal.Signals(self.signum).name}"


def exit_code(signum: int) -> int:
    return 128 + int(signum)


class JobSignals:
    """SIGINT and SIGTERM for one command (see the module docstring)."""

    def __init__(self, out=None):
        self.out = out or sys.stderr
        self.received: list[int] = []
        self._on_stop = None                 # the event loop's stop; None: set-up (raise)
        self._ending = False
        self._previous: dict = {}
        self._at_abort: list = []

    @property
    def first(self) -> int | None:
        return self.received[0] if self.received else None

    def install(self) -> JobSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _say(self, text: str) -> None:
        try:
            self.out.write(f"\nrecorun: {text}\n")
            self.out.flush()
        except (OSError, ValueError):
            pass

    def _handle(self, signum, _frame) -> None:
        self.received.append(signum)
        name = signal.Signals(signum).name
        if len(self.received) > 1:
            self._say(f"{name} again: aborting at once, without reports")
            for fn in reversed(self._at_abort):
                try:
                    fn()
                except Exception:              # nothing may keep it from exiting
                    pass
            os._exit(exit_code(self.received[0]))
        if self._ending:
            self._say(f"{name}: ending the job (interrupt again to abort)")
            return
        if self._on_stop is None:
            self._say(f"{name} during set-up: abandoning it (interrupt again to abort)")
            raise JobInterrupted(signum)
        self._on_stop(signum)

    @contextlib.contextmanager
    def at_abort(self, fn):
        """Within: an abort (a second signal) calls ``fn()`` first (kill workers, remove
        what only this job used)."""
        self._at_abort.append(fn)
        try:
            yield self
        finally:
            self._at_abort.remove(fn)

    @contextlib.contextmanager
    def stopping(self, on_stop):
        """Within: the first signal calls ``on_stop(signum)`` (stop reading, finish what is in
        flight) instead of abandoning; a signal already received calls it at once."""
        self._on_stop = on_stop
        try:
            if self.received:
                on_stop(self.received[0])
            yield self
        finally:
            self._on_stop = None

    @contextlib.contextmanager
    def ending(self):
        """Within: a first signal is only noted (end_job, the reports)."""
        self._ending = True
        try:
            yield self
        finally:
            self._ending = False


_current: JobSignals | None = None


@contextlib.contextmanager
def job_signals(out=None):
    """The command's :class:`JobSignals` (installed here if none is yet, in the main
    thread), for the duration."""
    global _current
    if _current is not None:
        yield _current
        return
    signals = JobSignals(out).install()
    _current = signals
    try:
        yield signals
    finally:
        _current = None
        signals.restore()
