"""A Chrome / Perfetto trace of every module call (``recorun --trace PATH``).

Open the JSON in https://ui.perfetto.dev or chrome://tracing: one lane per pool thread with
each acquire / produce / filter... call, one lane per ExternalWork module with its external
waits, and one lane per stream with whole events; so the overlap of external work with other
modules and events can be seen.
"""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path


class Tracer:
    def __init__(self):
        self._events: list[tuple] = []      # list.append is atomic: no lock needed
        self._origin_ns = time.perf_counter_ns()

    def complete(self, name: str, category: str, start_ns: int, duration_ns: int,
                 event: str | None = None, lane: str | None = None) -> None:
        self._events.append((name, category, start_ns, duration_ns, event,
                             lane or threading.current_thread().name))

    def to_json(self) -> dict:
        lanes: dict[str, int] = {}
        trace = []
        pid = os.getpid()
        for name, category, start, duration, event, lane in self._events:
            tid = lanes.setdefault(lane, len(lanes) + 1)
            entry = {"name": name, "cat": category, "ph": "X", "pid": pid, "tid": tid,
                     "ts": (start - self._origin_ns) / 1000.0, "dur": duration / 1000.0}
            if event is not None:
                entry["args"] = {"event": event}
            trace.append(entry)
        for lane, tid in lanes.items():
            trace.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid,
                          "args": {"name": lane}})
        return {"traceEvents": trace, "displayTimeUnit": "ms"}

    def write(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json()))
