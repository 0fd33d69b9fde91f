"""The SONIC producer: an ExternalWork producer whose external work is a model inference.

A concrete producer says what it sends and what it makes of the answer::

    class FacileProducer(SonicProducer):
        model = Param(str, "facile", doc="...")
        inputs = {"hcal_channels": ((15,), np.float32)}       # what pack() returns, per row
        digis = InputTag("source:HcalDigi")

        def pack(self, event):                    # in acquire: event data -> model inputs
            return {"hcal_channels": facile_inputs(event.get(self.digis))}

        def unpack(self, event, outputs):         # in produce: model outputs -> products
            event.put(...)

The client is chosen by configuration alone (``client: triton`` with ``mode: async | sync |
pseudo-async``, or ``client: inprocess`` with ``backend: onnxruntime | torch``); the producer's
code is the same for all of them.

Life cycle
----------
* construction: the client parameters become a :class:`~sonic_clients.ClientConfig`; a value it
  rejects (a bad timeout, ``tries: 0``...) is a configuration error naming the parameter.
* ``begin_job``: the client, from the workflow's ServerRegistry service if it has one, else
  from :func:`recorun.sonic_clients.registry.default_registry` (whose local fallback server serves a
  model that no server provides); then ``validate(self.input_shapes())``: a tensor name, shape
  or dtype that does not fit the model stops the job before its first event, with an error
  naming the producer, the model and the tensor.
* ``post_begin_job``: the registry's fallback server, if a model needs it (started in the
  background at ``begin_job``), is waited for.
* ``acquire``: ``pack(event)`` then ``client.infer(inputs, done)`` (with ``batch_events`` > 1,
  the producer's :class:`~recorun.sonic_clients.batching.EventBatcher` gathers the inputs of
  several events into one ``infer`` call and splits the answer back); the packing time is part
  of acquire in the framework's report (the paper's S). ``done`` (on whichever thread the
  client calls it) hands the outputs to ``holder.done(outputs)``; an error is wrapped in
  :class:`SonicInferenceError` naming the event and the model (``holder.fail``).
* ``produce(event, outputs)``: ``unpack(event, outputs)`` (the paper's L is acquire's and
  produce's CPU time).
* ``end_job``: the client is given back (``client.end_job()`` releases it to its registry).

Concurrency: SHARED
-------------------
One producer instance, hence one client, serves every stream. The SONIC clients are
thread-safe (their counters, batching and requests are), so one client per stream would only
multiply gRPC channels, in-process model sessions (memory: one ResNet-50 per stream) and
begin_job probes, and split the client's timing counters per stream. A shared instance also
lets the client see every request of the job, which is what its statistics and the server's
dynamic batching are about. The producer keeps no per-event state: the outputs travel from
``done`` to ``produce`` through the event's holder.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping

import numpy as np

from recorun import ConfigError, Concurrency, ExternalWorkProducer, Param, Record
from recorun.framework.params import ParamError
from recorun.sonic_clients import (ClientConfig, ClientConfigError, SonicError,
                                   parse_duration)
from recorun.sonic_clients.base import (BACKENDS, BALANCES, CLIENTS, COMPRESSIONS, MODES,
                                        TRANSPORTS)
from recorun.sonic_clients.batching import EventBatcher


class SonicInferenceError(RuntimeError):
    """An inference of one event failed; names the event and the model (the client's error,
    with its server and attempts, is the cause)."""

    def __init__(self, event_id, model: str, cause: BaseException):
        self.event_id, self.model, self.cause = event_id, model, cause
        self.__cause__ = cause
        super().__init__(f"event {event_id}: inference of model '{model}' failed: "
                         f"{type(cause).__name__}: {cause}")


class SonicProducer(ExternalWorkProducer):
    """Base of the SONIC producers (see the module docstring)."""

    concurrency = Concurrency.SHARED

    #: what :meth:`pack` returns: ``{input name: (shape per row, dtype)}``; subclasses set it
    inputs: ClassVar[dict[str, tuple[tuple[int, ...], Any]]] = {}

    model = Param(str, doc="model name on the server (or in-process)")
    version = Param(str, "", doc="model version; empty: the latest")
    server = Param(str, "", doc="preferred server of the ServerRegistry (empty: any)")
    mode = Param(str, "async", choices=MODES,
                 doc="async: non-blocking request; sync: blocking call in acquire; "
                     "pseudo-async: blocking call on a client-owned thread")
    client = Param(str, "triton", choices=CLIENTS,
                   doc="triton: a Triton server over gRPC; inprocess: the model in this process")
    backend = Param(str, "onnxruntime", choices=BACKENDS, doc="in-process backend")
    timeout = Param(str | float, "10 s", doc="per request (each try): '500 ms', '10 s', ...")
    tries = Param(int, 3, doc="attempts per server (1: no retry)")
    compression = Param(str, "none", choices=COMPRESSIONS, doc="gRPC compression")
    verbose = Param(bool, False, doc="log the model's description and the client's counters")
    backoff = Param(str | float, "50 ms", doc="the first pause between two tries on one "
                    "server; it doubles with each try (at most 2 s), with jitter")
    outage_budget = Param(str | float, "30 s", doc="while every server of the model is down, "
                          "how long a request waits for one to come back before its event "
                          "fails (0: fail at once); with the registry's 'fallback: true' the "
                          "local fallback server then takes over")
    balance = Param(str, "", choices=("", *BALANCES),
                    doc="how requests spread over the servers that serve the model: first, "
                        "round_robin, least_outstanding; empty: the ServerRegistry's")
    transport = Param(str, "grpc", choices=TRANSPORTS,
                      doc="how a Triton client moves the tensors: grpc (in the messages), shm "
                          "(Triton's system shared memory; a server that cannot use it gets "
                          "gRPC, with a warning), auto (shm when every server of the model is "
                          "on this host, else grpc)")
    batch_events = Param(int, 1, doc="client-side event batching: at most this many events' "
                         "inputs go in one request (1: one request per event); needs mode "
                         "async or pseudo-async (docs/METRICS.md, 'Event batching')")
    batch_wait = Param(str | float, "2 ms", doc="with batch_events > 1: how long the first "
                       "event of a batch may wait for others; the batch goes out earlier when "
                       "full or when the job's threads have nothing else to do")
    model_record = Record(None, optional=True,
                          doc="conditions record {model, version} read at each run's start: "
                              "when it differs from the current model and version the "
                              "producer changes client (None: model and version as configured)")

    def __init__(self, label: str = "", **params: Any):
        super().__init__(label, **params)
        try:
            parse_duration(self.timeout)
        except ValueError as exc:
            raise ParamError("timeout", str(exc)) from None
        try:
            self.client_config = ClientConfig(
                model=self.model, version=self.version, server=self.server, mode=self.mode,
                timeout_s=self.timeout, tries=self.tries, compression=self.compression,
                client=self.client, backend=self.backend, verbose=self.verbose,
                balance=self.balance, backoff_s=self.backoff, outage_s=self.outage_budget,
                transport=self.transport)
        except ClientConfigError as exc:
            text = str(exc)
            name = next((p for p in ("tries", "version", "server", "verbose", "transport")
                         if f": {p}:" in text),
                        "timeout" if "timeout" in text else "backoff" if "backoff_s" in text
                        else "outage_budget" if "outage_s" in text else "model")
            raise ParamError(name, text) from None
        if self.batch_events < 1:
            raise ParamError("batch_events", f"must be at least 1, not {self.batch_events}")
        try:
            self.batch_wait_s = parse_duration(self.batch_wait)
        except ValueError as exc:
            raise ParamError("batch_wait", str(exc)) from None
        if self.batch_events > 1 and self.batch_wait_s <= 0:
            raise ParamError("batch_wait", "must be positive when batch_events > 1")
        if self.batch_events > 1 and self.mode == "sync":
            raise ParamError("batch_events", "batching events needs mode async or "
                             "pseudo-async (in sync mode acquire waits for its own answer, "
                             "so no other event can join its request)")
        self.sonic = None                       # the SonicClient, from begin_job on
        self.batcher: EventBatcher | None = None    # with batch_events > 1, from begin_job on

    def requirements(self) -> dict[str, str]:
        """In-process inference runs the model here; a model that no configured server
        provides is served by a local fallback server: both need the ``server`` extra."""
        needs = super().requirements()
        server = {"torch": "recorun[server]"}
        if self.client == "inprocess":
            needs.update(server)
            if self.backend == "onnxruntime":
                needs.update({"onnxruntime": "recorun[server]", "onnx": "recorun[server]",
                              "onnxscript": "recorun[server]"})
        elif not any(getattr(s, "servers", None) for s in self.services.values()):
            needs.update({**server, "pytriton": "recorun[server]"})      # the fallback server
        return needs

    # hooks of the concrete producers ---------------------------------------------------------
    def input_shapes(self) -> dict[str, tuple[tuple[int, ...], Any]]:
        """``{input name: (shape per row, dtype)}`` that :meth:`pack` will send."""
        return dict(self.inputs)

    def pack(self, event) -> dict[str, np.ndarray]:
        """The model inputs of ``event``: arrays whose first axis is the batch."""
        raise NotImplementedError(f"{type(self).__name__} must define pack(event)")

    def unpack(self, event, outputs: dict[str, np.ndarray]) -> None:
        """Put the products made of the model's ``outputs`` for ``event``."""
        raise NotImplementedError(f"{type(self).__name__} must define unpack(event, outputs)")

    # the framework's calls --------------------------------------------------------------------
    def begin_job(self) -> None:
        from recorun.sonic_clients.registry import find_registry

        try:
            # a model that no server provides: the local fallback server starts now, in the
            # background (its start overlaps the rest of the set-up); post_begin_job waits
            self.sonic = find_registry(self.services).client_for(self.client_config,
                                                                 start_fallback=True)
            self.sonic.begin_job()               # idempotent: client_for begins it already
            self.sonic.validate(self.input_shapes())
            if self.batch_events > 1:
                self.batcher = EventBatcher(self.sonic, self.batch_events, self.batch_wait_s)
        except ClientConfigError as exc:
            self._give_back()
            raise ConfigError(f"SONIC producer '{self.label}' ({type(self).__name__}), "
                              f"model '{self.model}': {exc}", label=self.label) from exc
        except BaseException:
            self._give_back()
            raise

    def post_begin_job(self) -> None:
        """Wait for the local fallback server if a model needs it (started at begin_job, in
        the background; every producer has asked for its client by now, so one server serves
        them all): its start-up then counts in the job's set-up, not in the first event's
        time, and a server that cannot start stops the job before its first event."""
        registry = getattr(self.sonic, "registry", None)
        if registry is None:
            return
        try:
            registry.start_fallback(wait=True)
        except (SonicError, ClientConfigError) as exc:
            raise ConfigError(f"SONIC producer '{self.label}' ({type(self).__name__}), model "
                              f"'{self.model}': {exc}", label=self.label) from exc

    def begin_run(self, run) -> None:
        """With ``model_record``: the model and version of the conditions record for this run
        (``{model: name, version: ""}``); when they differ from the current client's, the
        client is given back and one for the new model made and validated (as in
        ``begin_job``). No event is in flight at a run's start."""
        if self.model_record is None:
            return
        payload = run.record(self.model_record)
        where = (f"SONIC producer '{self.label}' ({type(self).__name__}): conditions record "
                 f"'{self.model_record}' for run {run.run}")
        if not isinstance(payload, Mapping) or "model" not in payload:
            raise ConfigError(f"{where}: expected {{model: name, version: ''}}, got "
                              f"{payload!r:.100}", label=self.label)
        try:
            config = dataclasses.replace(self.client_config, model=payload["model"],
                                         version=payload.get("version", ""))
        except ClientConfigError as exc:
            raise ConfigError(f"{where}: {exc}", label=self.label) from exc
        current = self.client_config
        if self.sonic is not None and (config.model, config.version) == (current.model,
                                                                         current.version):
            return
        self._give_back()
        self.model, self.version, self.client_config = config.model, config.version, config
        self.begin_job()
        self.post_begin_job()

    def acquire(self, event, holder) -> None:
        event_id, model = event.id, self.model
        inputs = self.pack(event)

        def done(outputs, error):
            if error is None:
                holder.done(outputs)
            else:
                holder.fail(SonicInferenceError(event_id, model, error))

        if self.batcher is not None:
            self.batcher.submit(inputs, done)
        else:
            self.sonic.infer(inputs, done)

    def produce(self, event, outputs=None) -> None:
        self.unpack(event, outputs)

    def end_job(self) -> None:
        self._give_back()

    def _give_back(self) -> None:
        batcher, self.batcher = self.batcher, None
        client, self.sonic = self.sonic, None
        batching = {}
        if batcher is not None:
            batcher.close()                      # sends what it gathered
            batching = {"batch_events": self.batch_events, **batcher.stats()}
        if client is not None:
            try:
                client.end_job()                 # releases it to its registry
            finally:                             # with the server's time, read at end_job
                self._timing = {**client.timing(), **batching}

    #: client counters exported by :meth:`metrics` as ``recorun_sonic_<name>_total``
    METRIC_COUNTERS = ("calls", "requests", "retries", "failovers", "failures", "rows",
                       "bytes_sent")

    def metrics(self) -> dict | None:
        """The client's counters, live (the framework's :meth:`Module.metrics` hook):
        requests, retries, failovers, failures, calls, rows, bytes sent and round-trip
        seconds as counters, the requests in flight as a gauge; labelled with the model."""
        client = self.sonic
        if client is not None:
            values, in_flight = client.stats.snapshot(), client.stats.in_flight
        else:                                    # before begin_job, or after end_job
            values, in_flight = getattr(self, "_timing", None), 0
            if not values:
                return None
        counters = {f"sonic_{name}": values.get(name, 0) for name in self.METRIC_COUNTERS}
        counters["sonic_roundtrip_seconds"] = values.get("roundtrip_s", 0.0)
        return {"labels": {"model": self.model}, "counters": counters,
                "gauges": {"sonic_requests_in_flight": in_flight}}

    def report(self) -> dict | None:
        """The client's figures for the job report: calls, retries, failovers, bytes sent,
        mean packing and round-trip times and, for Triton clients, the server's queue and
        compute time per event (:mod:`recorun.sonic_clients.server_stats`)."""
        timing = getattr(self, "_timing", None)
        if not timing:
            return None
        return {"client": self.client_config.client, "mode": self.client_config.mode,
                "model": self.model, **timing}

    def provenance(self) -> dict | None:
        """The model behind this producer's products, for the provenance of the files they
        are written to (:mod:`recorun.framework.provenance`): the model, the version asked
        (empty: the latest), the client (type, mode, in-process backend) and the servers
        that answered, ``[{name, address, requests, version}]`` (answered requests; the
        model version the server answered with, when it says). After ``end_job`` the
        servers are known by name only."""
        config = self.client_config
        entry = {"model": self.model, "version": config.version, "client": config.client,
                 "mode": config.mode}
        if config.client == "inprocess":
            entry["backend"] = config.backend
        client = self.sonic
        if client is not None:
            entry["servers"] = client.answered_by()
            return entry
        timing = getattr(self, "_timing", None) or {}
        per_server = timing.get("per_server")
        if isinstance(per_server, dict):
            entry["servers"] = [{"name": name, "address": "", "requests": counts.get("answers", 0),
                                 "version": ""} for name, counts in per_server.items()
                                if counts.get("answers")]
        elif timing.get("requests"):
            entry["servers"] = [{"name": f"in-process {config.backend}", "address": "",
                                 "requests": int(timing["requests"]), "version": config.version}]
        return entry
