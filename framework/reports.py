"""End-of-job reports: TrigReport, TimeReport, the report JSON and ``resources.json``.

``summarize`` turns the scheduler's counters into one dictionary (the ``--report-json``
content); the text reports and the FastTimerService-shaped ``resources.json`` are views of it.
Times are milliseconds, means are per call (per event on which the module ran).
``read_report`` reads such a file back (``recorun compare``, ``recorun --nominal``).
"""
from __future__ import annotations

import json
from pathlib import Path

from .errors import InputError
from .stats import merge

NS_PER_MS = 1e6
#: what ``read_report`` requires of each module of a report
MODULE_KEYS = ("runs", "real_ms_mean", "cpu_ms_mean", "real_ms_total", "cpu_ms_total")


def _mean(total_ns: int, count: int) -> float:
    return total_ns / NS_PER_MS / count if count else 0.0


def _module_entry(worker, visited: int, instances, details: bool = True) -> dict:
    s = merge(worker.stats)
    entry = {"type": worker.type_name, "kind": worker.kind, "runs": s.runs,
             "visited": visited, "passed": s.passed, "rejected": s.rejected,
             "errors": s.errors,
             "real_ms_mean": _mean(s.real_ns, s.runs), "cpu_ms_mean": _mean(s.cpu_ns, s.runs),
             "real_ms_total": s.real_ns / NS_PER_MS, "cpu_ms_total": s.cpu_ns / NS_PER_MS}
    if worker.external:
        entry.update(external_work=True,
                     acquire_ms_mean=_mean(s.acquire_real_ns, s.runs),
                     acquire_cpu_ms_mean=_mean(s.acquire_cpu_ns, s.runs),
                     external_ms_mean=_mean(s.external_ns, s.runs),
                     produce_ms_mean=_mean(s.produce_real_ns, s.runs),
                     produce_cpu_ms_mean=_mean(s.produce_cpu_ns, s.runs))
    details = [d for d in (module.report() for module in instances) if d] if details else []
    if details:
        entry["details"] = details[0] if len(details) == 1 else details
    return entry


def _path_entry(seq) -> dict:
    s = merge(seq.stats)
    return {"visited": s.visited, "passed": s.passed, "rejected": s.rejected,
            "failed": s.errors,
            "modules": [{"label": w.label, "visited": s.module_visited[i],
                         "passed": s.module_passed[i], "rejected": s.module_rejected[i],
                         "errors": s.module_errors[i]} for i, w in enumerate(seq.workers)]}


def cpu_efficiency(cpu_s: float, wall_s: float, threads: int) -> float:
    """The share of the job's threads that the process kept busy: CPU time over wall time x
    threads (1.0: every thread computing all the time)."""
    return cpu_s / (max(wall_s, 1e-9) * max(threads, 1))


def summarize(scheduler, *, workflow: str, exit_code: int, not_processed: str | None,
              details: bool = True) -> dict:
    """The job report of ``scheduler``'s run; ``details``: ask the modules for theirs (after
    their end_job)."""
    status = scheduler.status
    options = scheduler.options
    wall = max(status.finished - status.started, 1e-9)
    cpu = max(status.cpu_finished - status.cpu_started, 0.0)
    paths = {seq.name: _path_entry(seq) for seq in scheduler.paths}
    endpaths = {seq.name: _path_entry(seq) for seq in scheduler.endpaths}
    visited = dict.fromkeys(scheduler.workers, 0)     # times a path reached each module
    for entry in (*paths.values(), *endpaths.values()):
        for m in entry["modules"]:
            visited[m["label"]] += m["visited"]
    return {
        "process": options.name,
        "workflow": workflow,
        "events": {"read": status.read, "accepted": status.accepted,
                   "rejected": status.rejected, "failed": status.failed},
        "failed_events": status.failures,
        "abandoned_events": status.abandoned,
        "stop_reason": status.stop_reason,
        "stop_error": None if status.stop_error is None else str(status.stop_error),
        "not_processed": not_processed,
        "exit_code": exit_code,
        "source": scheduler.source.summary(),
        "paths": paths,
        "endpaths": endpaths,
        "luminosity_blocks": [lumi.summary() for lumi in scheduler.lumis],
        "modules": {label: _module_entry(w, visited[label], w.copies, details)
                    for label, w in scheduler.workers.items()},
        "services": {label: section for label, service in scheduler.built.services.items()
                     if (section := service.report())},
        "wall_s": wall,
        "throughput_hz": status.done / wall,
        "threads": options.threads,
        "streams": options.streams,
        "cpu_s": cpu,
        "cpu_efficiency": cpu_efficiency(cpu, wall, options.threads),
    }


def merge_lumis(entries) -> list[dict]:
    """Per-lumi entries of several runs over parts of one input (chunks) as one list: a
    luminosity block split between chunks is added up, in run and lumi order."""
    merged: dict[tuple[int, int], dict] = {}
    for entry in entries:
        key = (entry["run"], entry["luminosity_block"])
        mine = merged.get(key)
        if mine is None:
            merged[key] = {**entry, "accepted": dict(entry["accepted"])}
            continue
        mine["events"] += entry["events"]
        mine["failed"] += entry["failed"]
        for path, n in entry["accepted"].items():
            mine["accepted"][path] = mine["accepted"].get(path, 0) + n
    return [merged[key] for key in sorted(merged)]


def trig_report(report: dict) -> str:
    ev = report["events"]
    lines = ["TrigReport ---------- Event  Summary ------------",
             f"TrigReport Events total = {ev['read']} passed = {ev['accepted']} "
             f"rejected = {ev['rejected']} failed = {ev['failed']}", "",
             "TrigReport ---------- Path   Summary ------------",
             f"TrigReport {'Visited':>10} {'Passed':>10} {'Rejected':>10} {'Error':>8}  Name"]
    for kind in ("paths", "endpaths"):
        for name, p in report[kind].items():
            lines.append(f"TrigReport {p['visited']:>10} {p['passed']:>10} {p['rejected']:>10} "
                         f"{p['failed']:>8}  {name}{' (end path)' if kind == 'endpaths' else ''}")
    for kind in ("paths", "endpaths"):
        for name, p in report[kind].items():
            lines += ["", f"TrigReport ---------- Modules in {kind[:-1].replace('end', 'End')}: "
                          f"{name} ------------",
                      f"TrigReport {'Visited':>10} {'Passed':>10} {'Rejected':>10} "
                      f"{'Error':>8}  Name"]
            for m in p["modules"]:
                lines.append(f"TrigReport {m['visited']:>10} {m['passed']:>10} "
                             f"{m['rejected']:>10} {m['errors']:>8}  {m['label']}")
    lines += ["", "TrigReport ---------- Module Summary ------------",
              f"TrigReport {'Visited':>10} {'Run':>10} {'Passed':>10} {'Rejected':>10} "
              f"{'Error':>8}  Name"]
    for label, m in report["modules"].items():
        lines.append(f"TrigReport {m['visited']:>10} {m['runs']:>10} {m['passed']:>10} "
                     f"{m['rejected']:>10} {m['errors']:>8}  {label}")
    return "\n".join(lines)


def time_report(report: dict) -> str:
    lines = ["TimeReport ---------- Module Summary ---- [ms per call] ------------",
             f"TimeReport {'runs':>8} {'real':>10} {'cpu':>10} {'acquire':>10} "
             f"{'external':>10} {'produce':>10}  Name"]
    for label, m in report["modules"].items():
        ext = (f"{m['acquire_ms_mean']:>10.3f} {m['external_ms_mean']:>10.3f} "
               f"{m['produce_ms_mean']:>10.3f}" if m.get("external_work")
               else f"{'-':>10} {'-':>10} {'-':>10}")
        lines.append(f"TimeReport {m['runs']:>8} {m['real_ms_mean']:>10.3f} "
                     f"{m['cpu_ms_mean']:>10.3f} {ext}  {label}")
    processes = report.get("processes", 1)
    lines.append(f"TimeReport wall {report['wall_s']:.3f} s, "
                 f"{report['throughput_hz']:.1f} events/s, threads {report['threads']}, "
                 f"streams {report['streams']}"
                 + (f", processes {processes}" if processes > 1 else ""))
    if "cpu_efficiency" in report:
        lines.append(f"TimeReport CPU {report['cpu_s']:.2f} s, CPU efficiency "
                     f"{report['cpu_efficiency']:.2f} (CPU time / (wall x threads"
                     + (" x processes" if processes > 1 else "") + "))")
    return "\n".join(lines)


#: below this CPU efficiency with several threads, a job is told about --processes
LOW_EFFICIENCY = 0.6


#: jobs shorter than this (event loop, seconds) get no advice: too little to judge by
SHORT_JOB_S = 2.0


def thread_advice(report: dict) -> list[str]:
    """What to change when the threads of a job wait more than they work: with several
    threads and a low CPU efficiency, the modules that took the most CPU time (Python code
    holds the GIL while it runs; FastJet's bindings do, numpy's heavy calls do not) and the
    suggestion to run processes instead."""
    threads, efficiency = report.get("threads", 1), report.get("cpu_efficiency")
    if threads < 2 or efficiency is None or efficiency >= LOW_EFFICIENCY:
        return []
    if report.get("wall_s", 0.0) < SHORT_JOB_S or report.get("stop_reason") == "interrupted":
        return []                    # too little, or cut short, to judge by
    if report.get("processes", 1) > 1:
        return []                    # processes already
    waiting = sum(m.get("external_ms_mean", 0.0) * m.get("runs", 0)
                  for m in report["modules"].values()) / 1000.0
    if waiting > 0.5 * report.get("wall_s", 0.0) * threads:
        return []                    # the threads wait for external work: that is their job
    modules = sorted(((m["cpu_ms_total"], label) for label, m in report["modules"].items()),
                     reverse=True)
    total = sum(cpu for cpu, _ in modules) or 1.0
    top = ", ".join(f"{label} {100 * cpu / total:.0f} %" for cpu, label in modules[:3] if cpu)
    return [f"CPU efficiency {efficiency:.2f} with {threads} threads: the threads mostly wait "
            f"for each other. The modules with the most CPU time ({top}) hold Python's GIL "
            f"while their Python code runs, so they take turns. Threads pay for ExternalWork "
            f"and GIL-releasing code; for CPU-bound Python run processes instead: "
            f"--processes {threads} -j 1 (docs/PERFORMANCE.md)"]


def resources_json(report: dict) -> dict:
    """The shape of CMSSW FastTimerService's ``resources.json`` (times in ms, summed)."""
    modules = [{"type": m["type"], "label": label, "events": m["runs"],
                "time_thread": m["cpu_ms_total"], "time_real": m["real_ms_total"]}
               for label, m in report["modules"].items()]
    total = {"type": "Job", "label": "total", "events": report["events"]["read"],
             "time_thread": sum(m["time_thread"] for m in modules),
             "time_real": report["wall_s"] * 1000.0}
    return {"resources": [{"time_real": "real time"}, {"time_thread": "cpu time"}],
            "total": total, "modules": modules}


def write_json(path: str | Path, data: dict) -> None:
    Path(path).write_text(json.dumps(data, indent=1, default=str) + "\n")


def _report_problem(report) -> str | None:
    """What makes ``report`` not a job report as ``summarize`` writes it, or None."""
    if not isinstance(report, dict):
        return f"a JSON {type(report).__name__}, not an object"
    for key in ("events", "modules"):
        if not isinstance(report.get(key), dict):
            return f"no '{key}' object"
    for key in ("wall_s", "throughput_hz"):
        if not isinstance(report.get(key), (int, float)):
            return f"no number '{key}'"
    if not isinstance(report["events"].get("read"), int):
        return "no integer 'events.read'"
    for label, module in report["modules"].items():
        if not isinstance(module, dict) or not isinstance(module.get("type"), str):
            return f"module '{label}' has no 'type'"
        missing = [k for k in MODULE_KEYS if not isinstance(module.get(k), (int, float))]
        if missing:
            return f"module '{label}' has no number '{missing[0]}'"
    return None


def read_report(path: str | Path) -> dict:
    """A job report written by ``--report-json``; InputError naming the file when it cannot
    be read, is not JSON or is not a job report."""
    try:
        report = json.loads(Path(path).read_text())
    except OSError as exc:
        raise InputError(f"{path}: cannot read the report: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not a JSON file: {exc}") from None
    problem = _report_problem(report)
    if problem:
        raise InputError(f"{path}: not a recorun job report (--report-json): {problem}")
    return report
