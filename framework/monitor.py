"""What the job says while it runs: rate lines, a progress bar on a tty, and the watchdog.

A background thread wakes up a few times a second. Every ``report_every_s`` it prints
``N events processed at X Hz (Y Hz avg)``; on a terminal it also redraws a progress bar. The
watchdog warns once about every module call (or external work) that has been running for
longer than ``watchdog_s``, naming the module, the method and the event.
"""
from __future__ import annotations

import sys
import threading
import time


class InFlight:
    """Module calls and external work in progress, for the watchdog.

    The scheduler writes :attr:`calls` itself, one dict assignment when a call starts and one
    when it ends (all it can afford per call): the key is the calling thread's ident, whose
    entry is None between calls, or, for external work, the work's holder, removed when the
    work is done. An entry is ``(label, method, event_id, start_ns, where)``: ``start_ns`` from
    :func:`time.perf_counter_ns`, ``where`` None for a call on the thread of the key, else what
    is going on (e.g. ``waiting for holder.done()``).
    """

    def __init__(self):
        self.calls: dict = {}

    def older_than(self, seconds: float):
        """``(entry, label, method, event_id, age_s, where)`` of each call running for more
        than ``seconds``; ``where`` is the thread's name for a call on a thread."""
        now = time.perf_counter_ns()
        names = None
        for key, entry in list(self.calls.items()):
            if entry is None or now - entry[3] <= seconds * 1e9:
                continue
            label, method, event_id, start_ns, where = entry
            if where is None:
                if names is None:
                    names = {t.ident: t.name for t in threading.enumerate()}
                where = names.get(key, f"thread {key}")
            yield entry, label, method, event_id, (now - start_ns) / 1e9, where


class Monitor:
    def __init__(self, status, *, total: int | None, report_every_s: float, watchdog_s: float,
                 inflight: InFlight | None, stream=None, quiet: bool = False):
        self.status = status
        self.total = total
        self.report_every_s = report_every_s
        self.watchdog_s = watchdog_s
        self.inflight = inflight
        self.out = stream or sys.stderr
        self.quiet = quiet
        self.bar = (not quiet) and hasattr(self.out, "isatty") and self.out.isatty()
        self._stop = threading.Event()
        self._warned: set[tuple] = set()        # InFlight entries warned about
        self._thread = threading.Thread(target=self._loop, name="recorun-monitor", daemon=True)
        self.warnings: list[str] = []

    def start(self) -> None:
        self._t0 = time.monotonic()
        self._last = (self._t0, 0)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        if self.bar:
            self.out.write("\n")
            self.out.flush()

    def _loop(self) -> None:
        next_report = self._t0 + self.report_every_s
        while not self._stop.wait(0.25):
            now = time.monotonic()
            if self.report_every_s > 0 and now >= next_report and not self.quiet:
                self._rate_line(now)
                next_report = now + self.report_every_s
            elif self.bar:
                self._draw_bar(now)
            if self.watchdog_s > 0 and self.inflight is not None:
                self._watch()

    def rates(self, now: float) -> tuple[int, float, float]:
        done = self.status.done
        last_t, last_n = self._last
        self._last = (now, done)
        recent = (done - last_n) / (now - last_t) if now > last_t else 0.0
        avg = done / (now - self._t0) if now > self._t0 else 0.0
        return done, recent, avg

    def _rate_line(self, now: float) -> None:
        done, recent, avg = self.rates(now)
        prefix = "\r\033[K" if self.bar else ""
        self.out.write(f"{prefix}{done} events processed at {recent:.1f} Hz "
                       f"({avg:.1f} Hz avg)\n")
        self.out.flush()

    def _draw_bar(self, now: float) -> None:
        done = self.status.done
        avg = done / (now - self._t0) if now > self._t0 else 0.0
        if self.total:
            width = 30
            filled = int(width * min(done, self.total) / self.total)
            bar = "#" * filled + "." * (width - filled)
            text = f"[{bar}] {done}/{self.total} events, {avg:.1f} Hz"
        else:
            text = f"{done} events, {avg:.1f} Hz"
        self.out.write(f"\r\033[K{text}")
        self.out.flush()

    def _watch(self) -> None:
        for entry, label, method, event_id, age, thread in self.inflight.older_than(
                self.watchdog_s):
            if entry in self._warned:
                continue
            self._warned.add(entry)
            message = (f"watchdog: module '{label}' has been in {method} for {age:.1f} s "
                       f"on event {event_id} ({thread}), past the {self.watchdog_s:g} s limit")
            self.warnings.append(message)
            prefix = "\r\033[K" if self.bar else ""
            self.out.write(f"{prefix}{message}\n")
            self.out.flush()
