"""The server registry: which server serves which model, and the local fallback server.

:class:`ServerRegistry` is a framework service (CMSSW's ``TritonService``)::

    services:
      ServerRegistry:
        servers:
          - {name: gpu1, address: "gpu1.example:8001"}
          - {name: gpu2, address: "gpu2.example:8001", ssl: true, root_certificates: ca.pem}
        balance: round_robin           # or first (the default), least_outstanding
        fallback: true                 # serve models no server has with a local recorun-server
        fallback_options: ["--instances", "2"]

Producers ask it for a client in their ``begin_job``: ``registry.client_for(ClientConfig(...))``
(or :func:`sonic_clients.make_client`), and give it back in their ``end_job``:
``registry.release(client)`` (``client.end_job()`` does the same).

How a model is resolved (in ``client_for``):

1. At the registry's ``begin_job`` (before the modules'), each configured server is probed with
   ``is_server_live``; an unreachable one is skipped for the whole job with a warning.
2. For each model a client asks for, each live server is asked ``is_model_ready`` and, if so,
   for the model's metadata and config (pytriton keeps the model-repository index closed, so
   the registry asks per model, lazily, and caches the answers). The client gets every server
   that serves the model, the preferred one (``ClientConfig.server``) first. Servers that
   serve different tensors for one model are a configuration error naming them; the batch
   limit is the smallest (:func:`~recorun.sonic_clients.base.merge_descriptions`, the one
   rule wherever servers are combined).
3. The client spreads its requests over those servers by its ``balance`` (the producer's
   ``balance`` parameter, else the registry's; see :mod:`recorun.sonic_clients.triton`): ``first``
   (the preferred server, the others on failover), ``round_robin`` or ``least_outstanding``.
4. A model that no configured server provides goes to the local **fallback server**
   (:class:`~recorun.sonic_clients.fallback.FallbackServer`), unless ``fallback: false`` (then
   ``client_for`` raises :class:`~recorun.sonic_clients.base.ClientConfigError` saying which servers
   were asked and what each said).

The fallback server is started lazily, when the first request for one of its models goes out
(in the background: an ``async`` ``infer`` still returns at once; the requests wait for it,
outside their timeout), or earlier when asked: a SONIC producer asks for its client with
``client_for(config, start_fallback=True)`` in its ``begin_job``, which starts the server in
the background (its ~1 s start then overlaps the rest of the job's set-up), and waits for it in
its ``post_begin_job``. A model asked for while the server is still starting gets a server
started for it and the earlier models together, in place of the first (stopped at once), so
that one fallback server serves every model that needs it. Until
it runs, the fallback clients' ``describe()`` comes from the models' specs
(:data:`recorun.model_specs.SPECS`, with ``--max-batch-size`` of ``fallback_options``); once it runs,
the registry checks the server's metadata against that. A model first asked for after the
fallback server started gets a second one (logged). The registry stops its fallback server
at ``end_job``, or when its last client is released, and an ``atexit`` hook stops any left.

Without a ServerRegistry in the workflow, producers use :func:`default_registry`: no servers,
fallback on; its fallback server stops when the last client is released.
"""
from __future__ import annotations

import difflib
import threading
from pathlib import Path
from concurrent.futures import Future
from typing import Any

from recorun.framework.errors import ConfigError
from recorun.framework.params import Param, ParamError
from recorun.framework.service import Service

from .base import (
    BALANCES,
    LOG,
    ClientConfig,
    ClientConfigError,
    ModelDescription,
    SonicClient,
    description_from_spec,
    merge_descriptions,
    parse_duration,
)
from .triton import Endpoint, TritonClient, status_of

SERVER_KEYS = ("name", "address", "ssl", "root_certificates", "private_key",
               "certificate_chain")

#: recorun-server options the registry sets itself for its fallback server.
RESERVED_FALLBACK_OPTIONS = ("--models", "--grpc-port", "--http-port", "--metrics-port",
                             "--list", "export", "-h", "--help")


class _FallbackLaunch:
    """One fallback server being started or running, with its endpoint.

    A launch whose server is still starting can be replaced by one for more models
    (:meth:`retire`, then :meth:`hand_over`): its future then takes the new launch's outcome,
    so that whoever waits on it gets the server that serves them all, and its own server is
    stopped."""

    def __init__(self, models: list[str], options: list[str], ready_timeout_s: float,
                 expected: dict[str, ModelDescription], probe_timeout_s: float):
        from .fallback import FallbackServer

        self.models = list(models)
        self.server = FallbackServer(models, options, ready_timeout_s=ready_timeout_s)
        self.endpoint: Endpoint | None = None
        self.future: Future = Future()
        self.future.set_running_or_notify_cancel()
        self.replaced_by: _FallbackLaunch | None = None
        self._retired = False
        self._lock = threading.Lock()
        self._expected = expected
        self._probe_timeout_s = probe_timeout_s
        self._stopper: threading.Thread | None = None
        self.thread = threading.Thread(target=self._run, daemon=True,
                                       name=f"fallback-launch-{'+'.join(models)}")
        self.thread.start()

    def _run(self) -> None:
        try:
            self.server.start()
            endpoint = Endpoint("fallback", self.server.grpc)
            for model in self.models:          # the server must serve what clients expect
                found = endpoint.model_description(model, "", self._probe_timeout_s)
                want = self._expected[model]
                if not want.same_tensors(found) or found.max_batch_size < want.max_batch_size:
                    raise ClientConfigError(
                        f"the fallback server serves model '{model}' as {found.tensors_text()} "
                        f"with max_batch_size {found.max_batch_size}; its clients expected "
                        f"{want.tensors_text()} with max_batch_size {want.max_batch_size}")
            self.endpoint = endpoint
        except BaseException as exc:
            with self._lock:
                if not self._retired:
                    self.future.set_exception(exc)
            return
        with self._lock:
            if not self._retired:
                self.future.set_result(self.endpoint)

    def current(self) -> _FallbackLaunch:
        """This launch, or the one that replaced it (and so on)."""
        launch = self
        while launch.replaced_by is not None:
            launch = launch.replaced_by
        return launch

    def retire(self) -> bool:
        """Give up this launch for another one (:meth:`hand_over`), unless its outcome is known
        already (its server ready, or failed). True when retired."""
        with self._lock:
            if self.future.done():
                return False
            self._retired = True
            return True

    def hand_over(self, other: _FallbackLaunch) -> None:
        """After :meth:`retire`: this launch's future takes ``other``'s outcome, and its own
        server is stopped in the background (:meth:`stop` waits for that)."""
        self.replaced_by = other

        def take_over(done: Future) -> None:
            error = done.exception()
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(done.result())

        other.future.add_done_callback(take_over)
        self._stopper = threading.Thread(target=self._stop_server, daemon=True,
                                         name=f"fallback-retired-{'+'.join(self.models)}")
        self._stopper.start()

    def _stop_server(self) -> None:
        self.server.stop()                      # a server still starting is stopped too
        self.thread.join()                      # and its start then fails at once
        if self.endpoint is not None:
            self.endpoint.close()

    def stop(self) -> None:
        if self._stopper is not None:           # retired: its server is being stopped
            self._stopper.join()
            return
        if self.endpoint is not None:           # this job's connection first: the server
            self.endpoint.close()               # then has no client left when it stops
        self._stop_server()


#: a fallback server shared by the worker processes of a node, started by their driver:
#: ``host:port`` and the models it serves (comma-separated); see :meth:`ServerRegistry.share_fallback`
SHARED_FALLBACK_ADDRESS = "RECORUN_FALLBACK_SERVER"
SHARED_FALLBACK_MODELS = "RECORUN_FALLBACK_MODELS"


class _SharedLaunch:
    """The node's fallback server, started by the job's driver: used, never started or stopped
    here."""

    server = None
    replaced_by = None

    def __init__(self, models: list[str], address: str):
        self.models = list(models)
        self.endpoint = Endpoint("fallback", address)
        self.future: Future = Future()
        self.future.set_running_or_notify_cancel()
        self.future.set_result(self.endpoint)

    def current(self) -> _SharedLaunch:
        return self

    def stop(self) -> None:
        self.endpoint.close()


def _shared_fallback() -> tuple[str, list[str]] | None:
    import os

    address = os.environ.get(SHARED_FALLBACK_ADDRESS)
    models = [m for m in os.environ.get(SHARED_FALLBACK_MODELS, "").split(",") if m]
    return (address, models) if address and models else None


class FallbackEndpoint(Endpoint):
    """The fallback server as one client's endpoint: it starts the server (for every model
    asked for so far) on the first request and makes requests wait for it."""

    def __init__(self, registry: ServerRegistry, model: str):
        super().__init__("fallback", "")
        self._registry = registry
        self._model = model
        self._launch: _FallbackLaunch | None = None

    @property
    def address(self) -> str:
        launch = self._launch.current() if self._launch is not None else None
        if launch is not None and launch.endpoint is not None:
            return launch.endpoint.address
        if launch is not None and launch.server is not None and launch.server.grpc:
            return launch.server.grpc
        return "local recorun-server, not started yet"

    def _get_launch(self) -> _FallbackLaunch:
        if self._launch is None:
            self._launch = self._registry._launch_for(self._model)
        self._launch = self._launch.current()
        return self._launch

    def when_ready(self, fn) -> None:
        launch = self._get_launch()
        launch.future.add_done_callback(lambda f: fn(f.exception()))

    def wait_ready(self) -> None:
        self._get_launch().future.result()

    def grpc(self):
        launch = self._get_launch()
        return launch.future.result().grpc()

    def model_description(self, model, version, timeout_s):
        return self._registry._fallback_description(model, version)

    def probe(self, timeout_s: float) -> bool:
        return True

    def close(self) -> None:
        """The registry closes the launch's own endpoint."""


class ServerRegistry(Service):
    """Maps models to Triton servers; starts a local fallback server for the others."""

    servers = Param(list[dict], [], doc="Triton servers: each {name, address 'host:port', ssl "
                    "(default false), root_certificates, private_key, certificate_chain}")
    balance = Param(str, "first", choices=BALANCES,
                    doc="how clients spread requests over the servers that serve their model: "
                        "first (the preferred server, the others on failover), round_robin, "
                        "least_outstanding (fewest requests in flight from this process); a "
                        "producer's own 'balance' parameter overrides it")
    fallback = Param(bool | None, None,
                     doc="serve models that no server provides with a local recorun-server "
                         "started and stopped by recorun. Default: on when no server is "
                         "configured, off when servers are (a server that cannot be reached "
                         "or lacks a model is then a configuration error, never replaced "
                         "quietly); true: also when configured servers cannot serve a model, "
                         "and in place of servers still down past a client's outage budget")
    fallback_options = Param(list[str], [], doc="extra recorun-server arguments for the "
                             "fallback server, e.g. ['--instances', '2']")
    fallback_timeout = Param(str | float, "180 s", doc="how long the fallback server may take "
                             "to be ready")
    probe_timeout = Param(str | float, "5 s", doc="timeout of the liveness and model queries")

    def __init__(self, **params: Any):
        super().__init__(**params)
        self._specs = self._check_servers(self.servers)
        if self.fallback is None:                # on only where nothing else can serve
            self.fallback = not self._specs
        for name in ("fallback_timeout", "probe_timeout"):
            try:
                setattr(self, f"{name}_s", parse_duration(getattr(self, name)))
            except ValueError as exc:
                raise ParamError(name, str(exc)) from None
        bad = [o for o in self.fallback_options if o.split("=", 1)[0] in RESERVED_FALLBACK_OPTIONS]
        if bad:
            raise ParamError("fallback_options", f"'{bad[0]}' is set by the registry itself "
                             f"(not allowed in fallback_options: "
                             f"{', '.join(RESERVED_FALLBACK_OPTIONS)})")
        self._lock = threading.RLock()
        self._begun = False
        self._endpoints: list[Endpoint] = []
        self._clients: list[SonicClient] = []
        self._fallback_models: list[str] = []
        self._launches: list[_FallbackLaunch] = []
        self._retired: list[_FallbackLaunch] = []          # replaced while they started
        self._fallback_max_batch: int | None = None
        self._fallback_parsed = False

    @staticmethod
    def _check_servers(servers: list[dict]) -> list[dict]:
        specs, names = [], set()
        for i, server in enumerate(servers):
            unknown = [k for k in server if k not in SERVER_KEYS]
            if unknown:
                near = difflib.get_close_matches(unknown[0], SERVER_KEYS, n=1)
                hint = f"; did you mean '{near[0]}'?" if near else ""
                raise ParamError("servers", f"servers[{i}]: unknown key '{unknown[0]}'{hint} "
                                 f"(keys: {', '.join(SERVER_KEYS)})")
            address = server.get("address")
            if not isinstance(address, str) or ":" not in address:
                raise ParamError("servers", f"servers[{i}]: address must be 'host:port', not "
                                 f"{address!r}")
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ParamError("servers", f"servers[{i}]: address must be 'host:port', not "
                                 f"{address!r}")
            name = str(server.get("name") or address)
            if name == "fallback" or name in names:
                raise ParamError("servers", f"servers[{i}]: name '{name}' is "
                                 f"{'reserved' if name == 'fallback' else 'used twice'}")
            names.add(name)
            ssl = server.get("ssl", False)
            if not isinstance(ssl, bool):
                raise ParamError("servers", f"servers[{i}] ({name}): ssl must be true or false")
            for key in SERVER_KEYS[3:]:
                path = server.get(key)
                if path is not None and not Path(str(path)).is_file():
                    raise ParamError("servers", f"servers[{i}] ({name}): {key} {path}: no such "
                                                f"file")
            specs.append({"name": name, "address": address, "ssl": ssl,
                          **{k: server.get(k) for k in SERVER_KEYS[3:]}})
        return specs

    # lifecycle -----------------------------------------------------------------------------
    def begin_job(self) -> None:
        """Probe the configured servers (idempotent; client_for calls it if nobody did)."""
        with self._lock:
            if self._begun:
                return
            self._endpoints = [Endpoint(s["name"], s["address"], ssl=s["ssl"],
                                        root_certificates=s["root_certificates"],
                                        private_key=s["private_key"],
                                        certificate_chain=s["certificate_chain"])
                               for s in self._specs]
            unreachable = [ep for ep in self._endpoints if not ep.probe(self.probe_timeout_s)]
            if unreachable and not self.fallback:
                for ep in self._endpoints:
                    ep.close()
                self._endpoints = []
                raise ConfigError(
                    "ServerRegistry: " + "; ".join(f"{ep.label()} is not reachable "
                                                   f"({ep.problem})" for ep in unreachable)
                    + ": check the address (and that the server runs), or set "
                      "'fallback: true' to go on without it", what="service")
            for ep in unreachable:
                LOG.warning("ServerRegistry: %s is not reachable (%s); skipped for this job "
                            "(fallback: true)", ep.label(), ep.problem)
            self._begun = True

    def end_job(self) -> None:
        """End every client still held, stop the fallback server(s), close connections."""
        self._final_status = self.status()
        with self._lock:
            clients, self._clients = self._clients, []
        for client in clients:
            client.registry = None
            try:
                client.end_job()
            except Exception:
                LOG.exception("ServerRegistry: ending %r failed", client)
        self._shutdown()

    def _shutdown(self) -> None:
        with self._lock:
            launches, self._launches = self._retired + self._launches, []
            self._retired = []
            endpoints, self._endpoints = self._endpoints, []
            self._fallback_models = []
            self._begun = False
        errors = []
        for launch in launches:
            try:
                launch.stop()
            except Exception as exc:                     # pragma: no cover
                errors.append(exc)
        for ep in endpoints:
            ep.close()
        if errors:
            raise errors[0]

    def release(self, client: SonicClient) -> None:
        """A producer is done with ``client`` (call it in end_job): ends the client; when it
        was the registry's last one, stops the fallback server and closes the connections."""
        with self._lock:
            held = client in self._clients
            if held:
                self._clients.remove(client)
            last = held and not self._clients
        client.registry = None
        client.end_job()
        if last:
            self._shutdown()

    # clients -------------------------------------------------------------------------------
    def client_for(self, config: ClientConfig | dict, *,
                   start_fallback: bool = False) -> SonicClient:
        """A client for ``config`` (begun: ``describe()`` works): in-process, or Triton with
        every server that serves the model, the preferred one first, or the fallback server.
        With ``start_fallback``, a client of the fallback server has it start now, in the
        background, rather than at its first request (:meth:`start_fallback`)."""
        if not isinstance(config, ClientConfig):
            config = ClientConfig.from_dict(config)
        if config.client == "inprocess":
            from .inprocess import InProcessClient

            client = InProcessClient(config)
        else:
            client = self._triton_client(config)
            if start_fallback and config.model in self._fallback_models:
                try:
                    self.start_fallback(wait=False)
                except BaseException:
                    client.end_job()
                    raise
        try:
            client.begin_job()
        except BaseException:
            client.end_job()
            raise
        client.registry = self
        with self._lock:
            self._clients.append(client)
        return client

    def _triton_client(self, config: ClientConfig) -> TritonClient:
        self.begin_job()
        with self._lock:
            endpoints = list(self._endpoints)
        names = [ep.name for ep in endpoints]
        if config.server and config.server not in names:
            near = difflib.get_close_matches(config.server, names, n=1)
            hint = f"; did you mean '{near[0]}'?" if near else ""
            raise ClientConfigError(f"model '{config.model}': preferred server "
                                    f"'{config.server}' is not configured{hint} (servers: "
                                    f"{', '.join(names) or 'none'})")
        endpoints.sort(key=lambda ep: ep.name != config.server)     # preferred first
        chosen: list[Endpoint] = []
        found: list[ModelDescription] = []
        problems: list[str] = []
        for ep in endpoints:
            if not ep.live:
                problems.append(f"{ep.label()} is not reachable ({ep.problem})")
                continue
            try:
                found.append(ep.model_description(config.model, config.version,
                                                  self.probe_timeout_s))
            except ClientConfigError as exc:
                problems.append(str(exc))
                continue
            chosen.append(ep)
        description = merge_descriptions(config.model, found) if found else None
        if config.server and (not chosen or chosen[0].name != config.server):
            LOG.warning("ServerRegistry: preferred server '%s' does not serve model '%s'; "
                        "using %s", config.server, config.model,
                        ", ".join(ep.label() for ep in chosen) or "the fallback server")
        if not chosen:
            where = "; ".join(problems) or "no servers are configured"
            if not self.fallback:
                advice = ("set 'fallback: true' to serve it with a local recorun-server"
                          if self._specs else "the fallback server is disabled")
                raise ClientConfigError(f"model '{config.model}': no configured server serves "
                                        f"it ({where}); {advice}")
            if self._specs and config.model not in self._fallback_models:
                LOG.warning("ServerRegistry: no configured server serves model '%s' (%s); the "
                            "local fallback server will", config.model, where)
            return TritonClient(config, [self._fallback_endpoint(config)],
                                probe_timeout_s=self.probe_timeout_s, balance=self.balance)
        replacement = ((lambda: self._fallback_endpoint(config))
                       if self.fallback and self._specs else None)
        return TritonClient(config, chosen, description=description,
                            probe_timeout_s=self.probe_timeout_s, balance=self.balance,
                            replacement=replacement)

    # fallback ------------------------------------------------------------------------------
    def _fallback_endpoint(self, config: ClientConfig) -> FallbackEndpoint:
        from .fallback import check_server_installed

        self._fallback_description(config.model, config.version)    # checks model + options
        check_server_installed()
        with self._lock:
            if config.model not in self._fallback_models:
                self._fallback_models.append(config.model)
        return FallbackEndpoint(self, config.model)

    def _fallback_description(self, model: str, version: str) -> ModelDescription:
        if not self._fallback_parsed:
            self._fallback_max_batch = self._parse_fallback_options()
            self._fallback_parsed = True
        return description_from_spec(model, version, max_batch_size=self._fallback_max_batch,
                                     source="the local fallback recorun-server")

    def _parse_fallback_options(self) -> int | None:
        """Check ``fallback_options`` with recorun-server itself (``--check-options``, a
        subprocess: recorun-server's parser is the server's business); their
        ``--max-batch-size``, or None (each model's own)."""
        if not self.fallback_options:
            return None
        import subprocess
        import sys

        check = subprocess.run([sys.executable, "-m", "recorun.server.cli", "--check-options",
                                *self.fallback_options], capture_output=True, text=True,
                               timeout=60, stdin=subprocess.DEVNULL)
        if check.returncode != 0:
            reason = (check.stderr.strip().splitlines() or ["(no message)"])[-1]
            raise ClientConfigError(f"ServerRegistry: fallback_options {self.fallback_options} "
                                    f"are not valid recorun-server options: {reason}")
        options, size = list(self.fallback_options), None
        for i, option in enumerate(options):
            name, eq, value = option.partition("=")
            if name == "--max-batch-size":
                size = int(value if eq else options[i + 1])
        return size

    def _launch_for(self, model: str) -> _FallbackLaunch:
        """The fallback server that serves ``model``, started (in the background) for every
        model asked for so far if none does yet."""
        with self._lock:
            for launch in self._launches:
                if model in launch.models:
                    return launch
            covered = {m for launch in self._launches for m in launch.models}
            models = [m for m in self._fallback_models if m not in covered]
            if model not in models:
                models.append(model)
            shared = _shared_fallback()
            if shared and model in shared[1]:
                launch = _SharedLaunch([m for m in models if m in shared[1]], shared[0])
                self._launches.append(launch)
                return launch
            # a server of ours still starting is replaced by one for its models and these,
            # so that one server serves every model (producers start it at their begin_job,
            # one after the other)
            retired = [launch for launch in self._launches
                       if isinstance(launch, _FallbackLaunch) and launch.retire()]
            if retired:
                LOG.info("ServerRegistry: model '%s' asked for while the fallback server for %s "
                         "was starting: starting one for all of them instead", model,
                         ", ".join(m for old in retired for m in old.models))
            elif self._launches:
                LOG.warning("ServerRegistry: model '%s' was asked for after the fallback server "
                            "started; starting another one for %s", model, ", ".join(models))
            models = [m for old in retired for m in old.models] + models
            expected = {m: self._fallback_description(m, "") for m in models}
            launch = _FallbackLaunch(models, list(self.fallback_options), self.fallback_timeout_s,
                                     expected, self.probe_timeout_s)
            for old in retired:
                old.hand_over(launch)
                self._launches.remove(old)
                self._retired.append(old)
            self._launches.append(launch)
            return launch

    def start_fallback(self, wait: bool = True) -> list:
        """Start the fallback server now for the models asked for so far (instead of at the
        first request); with ``wait``, until it is ready (raising what stopped it). Returns the
        FallbackServers. Called again after more models were asked for, while the server is
        still starting, it starts one for them all instead (a SONIC producer starts it at its
        begin_job without waiting, and waits at its post_begin_job: one server serves every
        producer's model, and its start overlaps the rest of the job's set-up)."""
        with self._lock:
            models = list(self._fallback_models)
        launches = [self._launch_for(m) for m in models]
        if wait:
            for launch in launches:
                launch.future.result()
        return [launch.server for launch in dict.fromkeys(l.current() for l in launches)]

    def fallback_servers(self) -> list:
        """The FallbackServers this registry started so far (started or starting)."""
        with self._lock:
            return [launch.server for launch in self._launches if launch.server is not None]

    def share_fallback(self, configs: list[ClientConfig]) -> dict[str, str]:
        """Start, in this process, the fallback server that the Triton clients ``configs``
        would need (the models no configured server provides, when ``fallback`` is on) and
        return the environment that makes the registries of worker processes use it instead
        of starting their own (``{}`` when no model needs it). Stop it with :meth:`end_job`."""
        self.begin_job()
        models = []
        for config in configs:
            if config.client != "triton" or config.model in models:
                continue
            with self._lock:
                endpoints = [ep for ep in self._endpoints if ep.live]
            if not any(self._serves(ep, config) for ep in endpoints) and self.fallback:
                models.append(config.model)
        if not models:
            return {}
        from .fallback import check_server_installed

        check_server_installed()
        for model in models:
            self._fallback_description(model, "")          # checks the model and options
        with self._lock:
            self._fallback_models.extend(m for m in models if m not in self._fallback_models)
        (server,) = self.start_fallback(wait=True)
        return {SHARED_FALLBACK_ADDRESS: server.grpc, SHARED_FALLBACK_MODELS: ",".join(models)}

    def _serves(self, endpoint: Endpoint, config: ClientConfig) -> bool:
        try:
            endpoint.model_description(config.model, config.version, self.probe_timeout_s)
        except ClientConfigError:
            return False
        return True

    def report(self) -> dict | None:
        """The job report's ``services`` entry: the servers, whether each was live, and the
        models the local fallback server served (as they were at end_job)."""
        status = getattr(self, "_final_status", None)
        if status is None:
            return None
        return {"servers": [{k: s[k] for k in ("name", "address", "live", "problem")}
                            for s in status["servers"]],
                "balance": status["balance"], "fallback_models": status["fallback_models"]}

    def status(self) -> dict:
        """Servers, their liveness, models sent to the fallback, clients held."""
        with self._lock:
            return {
                "servers": [{"name": ep.name, "address": ep.address, "live": ep.live,
                             "problem": ep.problem, "in_flight": ep.in_flight()}
                            for ep in self._endpoints],
                "balance": self.balance,
                "fallback_models": list(self._fallback_models),
                "fallback_servers": [repr(launch.server) for launch in self._launches],
                "clients": len(self._clients),
            }


_DEFAULT: ServerRegistry | None = None
_DEFAULT_LOCK = threading.Lock()


def default_registry() -> ServerRegistry:
    """The process-wide registry used when a workflow has no ServerRegistry: no servers,
    fallback on. Its fallback server stops when its last client is released (producers call
    ``release(client)`` or ``client.end_job()`` in end_job), and at exit."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            _DEFAULT = ServerRegistry()
        return _DEFAULT


def find_registry(services: dict | None) -> ServerRegistry:
    """The ServerRegistry among a module's services, else :func:`default_registry`."""
    found = [(label, s) for label, s in (services or {}).items()
             if isinstance(s, ServerRegistry)]
    if len(found) > 1:
        raise ClientConfigError("several ServerRegistry services are configured ("
                                + ", ".join(label for label, _ in found) + "); keep one")
    return found[0][1] if found else default_registry()


__all__ = [
    "FallbackEndpoint",
    "ServerRegistry",
    "default_registry",
    "find_registry",
    "status_of",
]
