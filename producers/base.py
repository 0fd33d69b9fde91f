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
* ``post_begin_job``: the registry's fallback server, if a model needs it, is started and
  waited for.
* ``acquire``: ``pack(event)`` then ``client.infer(inputs, done)``; the packing time is part
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
from recorun.sonic_clients import (ClientConfig, ClientConfigError, SonicError, make_client,
                                   parse_duration)
from recorun.sonic_clients.base import BACKENDS, BALANCES, CLIENTS, COMPRESSIONS, MODES


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
                balance=self.balance, backoff_s=self.backoff, outage_s=self.outage_budget)
        except ClientConfigError as exc:
            text = str(exc)
            name = next((p for p in ("tries", "version", "server", "verbose") if f": {p}:" in
                         text), "timeout" if "timeout" in text else "backoff" if "backoff_s" in
                        text else "outage_budget" if "outage_s" in text else "model")
            raise ParamError(name, text) from None
        self.sonic = None                       # the SonicClient, from begin_job on

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
        try:
            self.sonic = make_client(self.client_config, self.services)
            self.sonic.begin_job()               # idempotent: make_client begins it already
            self.sonic.validate(self.input_shapes())
        except ClientConfigError as exc:
            self._give_back()
            raise ConfigError(f"SONIC producer '{self.label}' ({type(self).__name__}), "
                              f"model '{self.model}': {exc}", label=self.label) from exc
        except BaseException:
            self._give_back()
            raise

    def post_begin_job(self) -> None:
        """Start the local fallback server now if a model needs it (every producer has asked
        for its client by now, so one server serves them all): its start-up then counts in
        the job's set-up, not in the first event's time, and a server that cannot start stops
        the job before its first event."""
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

        self.sonic.infer(inputs, done)

    def produce(self, event, outputs=None) -> None:
        self.unpack(event, outputs)

    def end_job(self) -> None:
        self._give_back()

    def _give_back(self) -> None:
        client, self.sonic = self.sonic, None
        if client is not None:
            try:
                client.end_job()                 # releases it to its registry
            finally:
                self._timing = client.timing()   # with the server's time, read at end_job

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
