"""Servers and client processes for the studies.

A *client* is one ``recorun WORKFLOW -j THREADS -s STREAMS -n EVENTS`` process, run in its own
directory (so that outputs written relative to the working directory do not collide) with a
copy of the workflow that points its SONIC producers at the study's server(s). Its job report
and trace give its throughput, its per-event times and the bytes its SONIC clients sent.
"""
from __future__ import annotations

import contextlib
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

WORKFLOW_DIR = "${WORKFLOW_DIR}"


class StudyError(RuntimeError):
    """A study could not run: a client or the server failed (exit code 1)."""

    exit_code = 1


class BadArgument(StudyError):
    """An argument that cannot be used: a malformed list, a missing file (exit code 2)."""

    exit_code = 2


def machine() -> dict:
    """What the figures were measured on."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"host": platform.node(), "cpu": model or platform.processor(),
            "cores": os.cpu_count(), "python": platform.python_version()}


def parse_list(text: str) -> list[int]:
    """``"1,2,4"`` -> ``[1, 2, 4]`` (positive integers)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise BadArgument(f"expected a comma-separated list of integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise BadArgument(f"expected positive integers, got {text!r}")
    return values


def sonic_models(workflow: Path) -> list[str]:
    """The models the workflow's SONIC producers ask a Triton server for."""
    from recorun.framework.registry import load
    from recorun.producers.base import SonicProducer

    raw = yaml.safe_load(workflow.read_text()) or {}
    models = []
    for spec in (raw.get("modules") or {}).values():
        cls = load("module", spec["type"]) if isinstance(spec, dict) and "type" in spec else None
        if not (isinstance(cls, type) and issubclass(cls, SonicProducer)):
            continue
        if spec.get("client", "triton") != "triton":
            continue
        model = spec.get("model") or cls.model.default
        if model not in models:
            models.append(model)
    return models


def _entries(source: dict) -> int:
    """Entries in a RootSource's files (its tree, or each file's only TTree/RNTuple)."""
    import glob

    import uproot

    patterns = source["files"] if isinstance(source["files"], list) else [source["files"]]
    total = 0
    for path in (p for pattern in patterns for p in sorted(glob.glob(pattern)) or [pattern]):
        with uproot.open(path) as file:
            name = source.get("tree") or next(
                key for key, kind in file.classnames().items()
                if kind == "TTree" or kind.endswith("RNTuple"))
            total += file[name].num_entries
    return total


def client_workflow(workflow: Path, servers: Sequence[str], directory: Path,
                    events: int | None = None) -> Path:
    """A copy of ``workflow`` in ``directory`` whose ``${WORKFLOW_DIR}`` is the original's,
    whose SONIC producers use ``servers`` (a ServerRegistry, no fallback) and, when a
    RootSource has fewer than ``events`` entries, whose input files are read several times
    over (event numbers then repeat)."""
    if not workflow.is_file():
        raise BadArgument(f"workflow file not found: {workflow}")
    text = workflow.read_text().replace(WORKFLOW_DIR, str(workflow.resolve().parent))
    raw = yaml.safe_load(text) or {}
    source = raw.get("source") or {}
    if events and source.get("type") == "RootSource":
        have = _entries(source)
        if 0 < have < events:
            files = source["files"] if isinstance(source["files"], list) else [source["files"]]
            source["files"] = files * -(-events // have)
    if servers:
        services = {k: v for k, v in (raw.get("services") or {}).items()
                    if not (isinstance(v, dict) and v.get("type") == "ServerRegistry")}
        services["sonic"] = {"type": "ServerRegistry", "fallback": False,
                             "servers": [{"name": f"server{i}", "address": a}
                                         for i, a in enumerate(servers)]}
        raw["services"] = services
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / workflow.name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@contextlib.contextmanager
def server(models: Sequence[str], addresses: Sequence[str], options: Sequence[str] = (),
           cpus: Sequence[int] | None = None) -> Iterator[list[str]]:
    """The servers to use: ``addresses`` if given, else one local recorun-server for
    ``models`` (with ``options``, pinned to ``cpus``) for the duration of the block."""
    if addresses or not models:
        yield list(addresses)
        return
    from recorun.sonic_clients.fallback import FallbackServer

    local = FallbackServer(models, options, cpus=cpus).start()
    try:
        yield [local.grpc]
    finally:
        local.stop()


def recorun_command() -> list[str]:
    script = Path(sys.executable).with_name("recorun")
    return [str(script)] if script.exists() else [sys.executable, "-m", "recorun.framework.cli"]


@dataclass
class ClientResult:
    """One client process: its report, its per-event times (ms, from its trace)."""

    directory: Path
    report: dict
    event_ms: list[float] = field(default_factory=list)

    @property
    def throughput_hz(self) -> float:
        return float(self.report["throughput_hz"])

    @property
    def bytes_sent(self) -> int:
        total = 0
        for module in self.report["modules"].values():
            details = module.get("details")
            for d in details if isinstance(details, list) else [details] if details else []:
                total += int(d.get("bytes_sent", 0))
        return total


def _event_spans_ms(trace: Path) -> list[float]:
    import json

    events = json.loads(trace.read_text()).get("traceEvents", [])
    return [e["dur"] * 1e-3 for e in events if e.get("ph") == "X" and e.get("cat") == "event"]


def run_clients(workflow: Path, servers: Sequence[str], clients: int, events: int,
                directory: Path, *, threads: int = 1, streams: int = 1,
                cpus: Sequence[int] | None = None, timeout_s: float = 1800,
                start_delay_s: float | None = None) -> list[ClientResult]:
    """Run ``clients`` recorun processes of ``workflow`` at once, their first events at one
    common time (``--start-at``, ``start_delay_s`` from now: by default enough for every
    client to set up); wait for all; raise :class:`StudyError` with the failing client's log
    tail if any fails."""
    import json

    directory = directory.resolve()              # the clients run in their own directories
    if directory.exists():
        shutil.rmtree(directory)
    procs = []
    affinity = set(cpus) if cpus else None
    delay = start_delay_s if start_delay_s is not None else 6.0 + 2.0 * clients
    start_at = time.time() + delay
    for k in range(clients):
        cwd = directory / f"client{k}"
        path = client_workflow(workflow, servers, cwd, events)
        command = [*recorun_command(), str(path), "-n", str(events), "-j", str(threads),
                   "-s", str(streams), "-q", "--report-json", "report.json",
                   "--trace", "trace.json", "--start-at", f"{start_at:.3f}"]
        log = open(cwd / "recorun.log", "w")
        procs.append((cwd, log, subprocess.Popen(
            command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            preexec_fn=(lambda: os.sched_setaffinity(0, affinity)) if affinity else None)))
    deadline = time.monotonic() + timeout_s
    results, failures = [], []
    for cwd, log, proc in procs:
        try:
            code = proc.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        log.close()
        if code != 0 or not (cwd / "report.json").exists():
            tail = (cwd / "recorun.log").read_text(errors="replace")[-3000:]
            failures.append(f"client {cwd.name} exited with {code}; its log ends:\n{tail}")
            continue
        report = json.loads((cwd / "report.json").read_text())
        results.append(ClientResult(cwd, report, _event_spans_ms(cwd / "trace.json")))
    if failures:
        raise StudyError(f"{len(failures)} of {clients} client(s) of {workflow} failed: "
                         + failures[0])
    return results


def summary(results: Sequence[ClientResult]) -> dict:
    """Throughput (total and per client: mean, spread), per-event time and input bandwidth of
    one scan point."""
    rates = [r.throughput_hz for r in results]
    times = sorted(t for r in results for t in r.event_ms)
    wall = max(r.report["wall_s"] for r in results)

    def quantile(q):
        return times[min(len(times) - 1, int(q * len(times)))] if times else 0.0
    return {
        "clients": len(results),
        "events": sum(r.report["events"]["read"] for r in results),
        "throughput_hz": sum(rates),
        "per_client_hz": rates,
        "per_client_mean_hz": statistics.fmean(rates),
        "per_client_std_hz": statistics.pstdev(rates) if len(rates) > 1 else 0.0,
        "event_ms": times,
        "event_ms_median": quantile(0.5), "event_ms_p10": quantile(0.1),
        "event_ms_p90": quantile(0.9),
        "input_bytes_per_event": (sum(r.bytes_sent for r in results)
                                  / max(1, sum(r.report["events"]["read"] for r in results))),
        "input_MBps": sum(r.bytes_sent for r in results) / wall / 1e6,
    }
