"""The Prometheus exporter: a service that serves the job's counters over HTTP while it runs.

Off by default. Turn it on from the command line, ``recorun WORKFLOW --metrics-port 9400``
(port 0: a free port, logged), or in the workflow::

    services:
      prometheus: {type: PrometheusExporter, port: 9400, address: 127.0.0.1}

and scrape ``http://127.0.0.1:9400/metrics`` (Prometheus text format). The metrics and their
labels are listed in ``docs/METRICS.md`` ("Prometheus exporter").

How it reads them
-----------------
Nothing on the hot path is instrumented. The exporter has its own
:class:`prometheus_client.CollectorRegistry` (not the process-wide default one, so two jobs in
one process, or the tests, never mix their metrics) holding one custom collector,
:class:`JobCollector`. At each scrape, on the HTTP server's thread, it reads live objects:

* the scheduler's :class:`~recorun.framework.scheduler.JobStatus` (events read, accepted, rejected,
  failed), under the scheduler's lock so the counts agree with each other;
* each module's per-stream :class:`~recorun.framework.stats.ModuleStats` (calls, real and CPU time),
  added up over the streams; plain integers written by one thread each, read without a lock
  (a scrape may see a call half-counted: its time but not yet its run, never a torn value);
* each module's :meth:`~recorun.framework.module.Module.metrics` hook, e.g. a SONIC producer's client
  counters (requests, in flight, retries, failures, bytes sent), labelled ``module`` and
  ``model``.

The exporter gets the scheduler through the generic :meth:`Service.job_started` hook, so
``framework/`` knows nothing of SONIC; before it (during begin_job) a scrape sees only zeroed
event counters. The HTTP server starts in ``begin_job`` (a port already taken is a
configuration error, exit code 2, before any module begins) and is shut down, its socket
closed and its thread joined, in ``end_job``; it changes neither the job's exit code nor its
reports. After the job, :meth:`PrometheusExporter.text` still gives the final values.

Why 127.0.0.1 by default
------------------------
prometheus_client's own default is 0.0.0.0, every interface. The exporter serves without
authentication or TLS and tells whoever connects the workflow's module labels, the model names
and the job's progress; on a shared machine (a lxplus node, an HLT farm node, a laptop on a
conference network) anyone could read it. So it listens on the loopback interface unless the
workflow says otherwise; to let a Prometheus server on another machine scrape it, set
``address`` to the interface it should reach (``--set services.prometheus.address=0.0.0.0``),
behind a firewall.
"""
from __future__ import annotations

import logging
import re
import threading

from recorun.framework.errors import ConfigError
from recorun.framework.params import Param, ParamError
from recorun.framework.service import Service

LOG = logging.getLogger("recorun.prometheus")

NS = 1e-9
PREFIX = "recorun_"
_NOT_A_NAME = re.compile(r"[^a-zA-Z0-9_:]")

#: the families the collector itself makes; a module's metrics() may not reuse their names
BUILTIN = frozenset({"events_read", "events_processed", "events_accepted", "events_rejected",
                     "events_failed", "events_in_flight", "module_seconds",
                     "module_cpu_seconds", "module_calls", "module_errors",
                     "module_external_seconds"})


def _name(text: str) -> str:
    name = _NOT_A_NAME.sub("_", str(text))
    return name if name and not name[0].isdigit() else f"_{name}"


class JobCollector:
    """Reads the job's counters at scrape time (see the module docstring); a
    prometheus_client collector (``collect()`` yields metric families)."""

    def __init__(self):
        self.scheduler = None          # set by PrometheusExporter.job_started

    def describe(self):
        return []                      # names vary with the workflow: no clash check

    def collect(self):
        scheduler = self.scheduler
        yield from self._events(scheduler)
        if scheduler is not None:
            workers = list(scheduler.workers.values())
            yield from self._modules(workers)
            yield from self._module_metrics(workers)

    @staticmethod
    def _events(scheduler):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        if scheduler is None:
            read = accepted = rejected = failed = 0
        else:
            status = scheduler.status
            with scheduler.lock:
                read, accepted = status.read, status.accepted
                rejected, failed = status.rejected, status.failed
        done = accepted + rejected + failed
        for name, doc, value in (
                ("events_read", "Events read from the source", read),
                ("events_processed", "Events finished: accepted, rejected or failed", done),
                ("events_accepted", "Events accepted by at least one trigger path", accepted),
                ("events_rejected", "Events no trigger path accepted", rejected),
                ("events_failed", "Events failed by a module error", failed)):
            yield CounterMetricFamily(PREFIX + name, doc, value=value)
        yield GaugeMetricFamily(PREFIX + "events_in_flight", "Events read and not finished yet",
                                value=max(read - done, 0))

    @staticmethod
    def _modules(workers):
        from prometheus_client.core import CounterMetricFamily

        families = {
            "real": CounterMetricFamily(PREFIX + "module_seconds", "Real time in the module's "
                                        "calls (acquire and produce for ExternalWork)",
                                        labels=["module"]),
            "cpu": CounterMetricFamily(PREFIX + "module_cpu_seconds", "CPU time (of the "
                                       "calling thread) in the module's calls",
                                       labels=["module"]),
            "runs": CounterMetricFamily(PREFIX + "module_calls", "Events on which the module "
                                        "was called", labels=["module"]),
            "errors": CounterMetricFamily(PREFIX + "module_errors", "Errors the module raised "
                                          "(or its external work reported)",
                                          labels=["module"]),
            "external": CounterMetricFamily(PREFIX + "module_external_seconds", "ExternalWork "
                                            "modules: time from acquire's return to "
                                            "holder.done()", labels=["module"]),
        }
        for worker in workers:
            real = cpu = runs = errors = external = 0
            for stats in list(worker.stats):
                real += stats.real_ns
                cpu += stats.cpu_ns
                runs += stats.runs
                errors += stats.errors
                external += stats.external_ns
            label = [worker.label]
            families["real"].add_metric(label, real * NS)
            families["cpu"].add_metric(label, cpu * NS)
            families["runs"].add_metric(label, runs)
            families["errors"].add_metric(label, errors)
            if worker.external:
                families["external"].add_metric(label, external * NS)
        yield from (family for family in families.values() if family.samples)

    @staticmethod
    def _module_metrics(workers):
        """The modules' own :meth:`~recorun.framework.module.Module.metrics`, one family per name."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        samples: dict[tuple[str, str], dict[tuple, float]] = {}   # (kind, name) -> values
        label_names: dict[tuple[str, str], set[str]] = {}
        for worker in workers:
            for module in list(worker.copies):
                try:
                    figures = module.metrics()
                except Exception:                   # a scrape never fails the job
                    LOG.debug("metrics() of module '%s' raised", worker.label, exc_info=True)
                    continue
                if not figures:
                    continue
                labels = {_name(k): str(v) for k, v in (figures.get("labels") or {}).items()
                          if _name(k) != "module"}
                labels["module"] = worker.label
                for kind in ("counters", "gauges"):
                    for name, value in (figures.get(kind) or {}).items():
                        name = _name(name)
                        if name in BUILTIN:
                            continue
                        key = (kind, name)
                        label_names.setdefault(key, set()).update(labels)
                        samples.setdefault(key, {}).setdefault(
                            tuple(sorted(labels.items())), [0.0])[0] += float(value or 0)
        for (kind, name), values in sorted(samples.items()):
            names = ["module", *sorted(label_names[(kind, name)] - {"module"})]
            cls = CounterMetricFamily if kind == "counters" else GaugeMetricFamily
            family = cls(PREFIX + name, f"{name.replace('_', ' ')} (from the modules' "
                         "metrics())", labels=names)
            for labels, (value,) in values.items():
                given = dict(labels)
                family.add_metric([given.get(n, "") for n in names], value)
            yield family


class PrometheusExporter(Service):
    """Serves the job's counters to Prometheus over HTTP while the job runs (off unless
    configured; ``recorun --metrics-port N`` adds it). See :mod:`recorun.monitoring.prometheus`."""

    requires = {"prometheus_client": "recorun[metrics]"}

    port = Param(int, 0, doc="TCP port of the /metrics endpoint; 0: a free port (logged)")
    address = Param(str, "127.0.0.1",
                    doc="interface to listen on; the loopback one by default, since the "
                        "endpoint has no authentication (0.0.0.0: every interface)")

    def __init__(self, **params):
        super().__init__(**params)
        if not 0 <= self.port <= 65535:
            raise ParamError("port", f"{self.port} is not a TCP port (0 to 65535; 0: any "
                                     "free port)")
        from prometheus_client import CollectorRegistry

        self.registry = CollectorRegistry(auto_describe=False)
        self.collector = JobCollector()
        self.registry.register(self.collector)
        self.server = None
        self.thread: threading.Thread | None = None
        self.server_address: tuple[str, int] | None = None   # (host, port) once listening
        self.url: str | None = None

    def begin_job(self) -> None:
        from prometheus_client import start_http_server

        try:
            self.server, self.thread = start_http_server(self.port, addr=self.address,
                                                         registry=self.registry)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"PrometheusExporter cannot listen on {self.address} port "
                              f"{self.port}: {exc}", parameter="port", what="service") from None
        host, port = self.server.server_address[:2]
        self.server_address = (host, port)
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{port}/metrics"
        LOG.info("recorun: Prometheus metrics at %s", self.url)

    def job_started(self, scheduler) -> None:
        self.collector.scheduler = scheduler

    def end_job(self) -> None:
        server, self.server = self.server, None
        if server is None:
            return
        server.shutdown()                 # serve_forever returns
        server.server_close()             # the port is free again
        if self.thread is not None:
            self.thread.join(10)

    def report(self) -> dict | None:
        """Where the metrics were served (the job report's ``services`` entry)."""
        return {"url": self.url} if self.url else None

    def text(self) -> str:
        """The metrics as a scrape would give them now (also after the job)."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode()
