"""What the job says while it runs: rate lines, a progress bar on a tty, and the watchdog.

A background thread wakes up a few times a second. Every ``report_every_s`` it prints
``N events processed at X Hz (Y Hz avg)``; on a terminal it also redraws a progress bar. The
watchdog warns once about every module call (or external work) that has been running for
longer than ``watchdog_s``, naming the module, the method and the event.
"""
from __future__ import annotations

import itertools
import sys
import threading
import time


class InFlight:
    """Module calls and external work in progress, for the watchdog."""

    def __init__(self):
        self._calls: dict[int, tuple] = {}
        self._keys = itertools.count()

    def enter(self, label: str, method: str, event_id, where: str | None = None) -> int:
        """Register a call on this thread (or work elsewhere, described by ``where``)."""
        key = next(self._keys)
        self._calls[key] = (label, method, event_id, time.monotonic(),
                            where or threading.current_thread().name)
        return key

    def leave(self, key: int) -> None:
        self._calls.pop(key, None)

    def older_than(self, seconds: float):
        now = time.monotonic()
        for key, (label, method, event_id, start, thread) in list(self._calls.items()):
            if now - start > seconds:
                yield key, label, method, event_id, now - start, thread


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
        self._warned: set[int] = set()
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
        for key, label, method, event_id, age, thread in self.inflight.older_than(
                self.watchdog_s):
            if key in self._warned:
                continue
            self._warned.add(key)
            message = (f"watchdog: module '{label}' has been in {method} for {age:.1f} s "
                       f"on event {event_id} ({thread}), past the {self.watchdog_s:g} s limit")
            self.warnings.append(message)
            prefix = "\r\033[K" if self.bar else ""
            self.out.write(f"{prefix}{message}\n")
            self.out.flush()
