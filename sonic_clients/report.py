"""The paper's GPU-to-CPU replacement ratio F_GPU^eq = (X - S - L) / Y for each SONIC module.

Krupa et al. 2021, section 3.3, eq. (1): one GPU can replace F_GPU^eq CPUs at no cost in event
throughput. For a module of a job report whose ``details`` carry a SONIC client's figures (a
``client`` key), recorun takes, all in milliseconds per call of the module (one call per event
on which the module ran):

* **S**, the SONIC packaging overhead: ``acquire_cpu_ms_mean``, the CPU time of ``acquire``
  on the framework thread: packing the event into model inputs and, for the Triton client in
  ``async`` and ``sync`` modes, building and sending the gRPC request (in ``pseudo-async``
  mode the request is built on a client-owned thread, which no module's time includes; in
  ``sync`` mode the blocking wait and the reading of the answer are in acquire too).
* **L**, the rescheduling time: ``produce_cpu_ms_mean``, the CPU time of ``produce`` (taking
  the outputs and unpacking them into products). The rescheduling itself (the framework
  picking the event up again when the answer is in) is not a module call and cannot be
  measured apart from the framework's own overhead; it is not included. Neither is the CPU
  time of gRPC's threads (in ``async`` mode they receive and decode the answer). S + L is the
  module's CPU time on the framework's threads, which is what the paper approximates by S + L.
* **Y**, the processing time on the server: ``details["server_compute_ms_per_call"]``, the
  server's compute time (input + infer + output) for the model during the job per call of
  this client, read from the Triton server's statistics. In-process clients have none; nor
  has a Triton client whose server's statistics could not be read.
* **X**, the CPU time of the algorithm the SONIC module replaces: ``cpu_ms_mean`` of the
  module with the same label in a *nominal* job's report (``recorun NOMINAL.yaml
  --report-json nominal.json``, then ``recorun SONIC.yaml --nominal nominal.json``).

F_GPU^eq is None, with a ``reason``, when X or Y is unknown or Y is 0. When the server also
served other clients during the job (``server_shared``), Y comes from statistics that include
their requests: F is still computed and a ``warning`` says it is approximate.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from recorun.framework.errors import ConfigError, InputError
from recorun.framework.reports import read_report


@dataclass(frozen=True)
class Nominal:
    """The modules of a nominal job's report (the source of X) and the file they came from."""

    file: str
    modules: dict

    @classmethod
    def load(cls, path: str | Path) -> Nominal:
        """Read a nominal report; a missing or invalid file is a ConfigError naming it."""
        try:
            report = read_report(path)
        except InputError as exc:
            raise ConfigError(f"--nominal: {exc}") from None
        return cls(str(path), report["modules"])


def f_gpu_eq(x_ms: float, s_ms: float, l_ms: float, y_ms: float
             ) -> tuple[float | None, str | None]:
    """``((X - S - L) / Y, None)``, or ``(None, reason)`` when Y is 0."""
    if y_ms == 0:
        return None, "Y is 0: the server counted no compute time for this client"
    return (x_ms - s_ms - l_ms) / y_ms, None


def is_sonic(module: dict) -> bool:
    """A module of a job report whose details are a SONIC client's figures."""
    details = module.get("details")
    return isinstance(details, dict) and "client" in details


def _x(label: str, nominal: Nominal | None) -> tuple[float | None, str | None]:
    if nominal is None:
        return None, "X unknown: no nominal report (--nominal NOMINAL.json)"
    module = nominal.modules.get(label)
    if module is None:
        return None, f"X unknown: no module '{label}' in the nominal report {nominal.file}"
    if is_sonic(module):
        return None, (f"X unknown: module '{label}' of the nominal report {nominal.file} is "
                      f"itself a SONIC module")
    if not module["runs"]:
        return None, f"X unknown: module '{label}' never ran in the nominal job {nominal.file}"
    return module["cpu_ms_mean"], None


def _y(details: dict) -> tuple[float | None, str | None]:
    y = details.get("server_compute_ms_per_call")
    if y is not None:
        return y, None
    if details["client"] == "inprocess":
        return None, "Y unknown: an in-process client has no server"
    return None, "Y unknown: the server's statistics could not be read"


def sonic_entry(label: str, module: dict, nominal: Nominal | None) -> dict:
    """S, L, Y, X and F_GPU^eq of one SONIC module of a job report (see the module doc)."""
    details = module["details"]
    s_ms, l_ms = module["acquire_cpu_ms_mean"], module["produce_cpu_ms_mean"]
    x_ms, x_reason = _x(label, nominal)
    y_ms, y_reason = _y(details)
    reason = "; ".join(r for r in (x_reason, y_reason) if r) or None
    f = None
    if reason is None:
        f, reason = f_gpu_eq(x_ms, s_ms, l_ms, y_ms)
    calls = details["calls"]
    shared = details.get("server_shared")
    return {"client": details["client"], "mode": details["mode"], "model": details["model"],
            "calls": calls, "X_ms": x_ms, "S_ms": s_ms, "L_ms": l_ms, "Y_ms": y_ms,
            "server_queue_ms": details.get("server_queue_ms_per_call"),
            "server_shared": shared,
            "bytes_per_call": details["bytes_sent"] / calls if calls else None,
            "requests_per_call": details["requests"] / calls if calls else None,
            "batching": _batching(details),
            "nominal": nominal.file if nominal else None,
            "F_gpu_eq": f, "reason": reason,
            "warning": ("the server also served other clients during the job: Y comes from "
                        "statistics that include their requests, F_GPU^eq is approximate")
            if shared else None}


def _batching(details: dict) -> dict | None:
    """Client-side event batching (``batch_events`` > 1): the batch size asked, requests sent,
    events per request and the mean time an event waited for its batch to go out."""
    if details.get("batch_events", 1) <= 1:
        return None
    requests = details["requests"]
    return {"batch_events": details["batch_events"], "requests": requests,
            "events_per_request": details["calls"] / requests if requests else None,
            "mean_batch_wait_ms": details.get("mean_batch_wait_ms", 0.0)}


def sonic_section(modules: dict, nominal: Nominal | None = None) -> dict:
    """``{label: sonic_entry}`` for the SONIC modules of a report's ``modules`` (may be {})."""
    return {label: sonic_entry(label, m, nominal) for label, m in modules.items()
            if is_sonic(m)}


def _ms(value: float | None) -> str:
    return f"{value:>9.3f}" if value is not None else f"{'-':>9}"


def sonic_report(section: dict) -> str:
    """The SonicReport table of a report's ``sonic`` section, with the reasons and warnings."""
    lines = ["SonicReport ---------- F_GPU^eq = (X - S - L) / Y ---- [ms per call] ------------",
             f"SonicReport {'calls':>8} {'X':>9} {'S':>9} {'L':>9} {'Y':>9} {'queue':>9} "
             f"{'F_GPU^eq':>9}  Name"]
    notes = []
    for label, e in section.items():
        f = f"{e['F_gpu_eq']:>9.2f}" if e["F_gpu_eq"] is not None else f"{'-':>9}"
        lines.append(f"SonicReport {e['calls']:>8} {_ms(e['X_ms'])} {_ms(e['S_ms'])} "
                     f"{_ms(e['L_ms'])} {_ms(e['Y_ms'])} {_ms(e['server_queue_ms'])} {f}  "
                     f"{label} ({e['client']} {e['mode']}, model {e['model']})")
        notes += [f"SonicReport {label}: {text}" for text in (e["reason"], e["warning"]) if text]
        batching = e.get("batching")
        if batching:
            per = batching["events_per_request"]
            notes.append(f"SonicReport {label}: events batched by up to "
                         f"{batching['batch_events']}: {e['calls']} events in "
                         f"{batching['requests']} requests"
                         f"{f' ({per:.2f} events per request)' if per else ''}, "
                         f"{batching['mean_batch_wait_ms']:.2f} ms mean wait for the batch")
    lines += notes
    lines.append("SonicReport X: nominal algorithm's CPU, S: acquire CPU, L: produce CPU, "
                 "Y: server compute, queue: server queue (docs/METRICS.md)")
    return "\n".join(lines)
