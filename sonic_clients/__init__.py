"""Clients behind the SONIC producers: Triton gRPC, in-process inference, server registry.

==========================  ======================================================================
module                      what it holds
==========================  ======================================================================
:mod:`.base`                the contract: :class:`ClientConfig`, :class:`SonicClient`
                            (``describe``/``validate``/``infer``/``timing``), errors, durations
:mod:`.triton`              :class:`TritonClient` (tritonclient gRPC: async, sync, pseudo-async;
                            retries and failover) and :class:`Endpoint` (one server)
:mod:`.shm`                 :class:`~.shm.ShmPool` (a Triton client's system shared-memory
                            regions: ``transport: shm``)
:mod:`.batching`            :class:`~.batching.EventBatcher` (several events' inputs in one
                            request: ``batch_events``)
:mod:`.inprocess`           :class:`InProcessClient` (onnxruntime or torch in this process)
:mod:`.registry`            :class:`ServerRegistry` (the framework service that maps models to
                            servers) and :func:`default_registry`
:mod:`.fallback`            :class:`FallbackServer` (a local ``recorun-server`` recorun starts
                            and stops itself)
==========================  ======================================================================

A producer's begin_job: ``self.client = make_client(config, self.services)`` then
``self.client.validate({...})``; its acquire: ``self.client.infer(inputs, done)``; its end_job:
``self.client.end_job()`` (which releases it to its registry).
"""
from __future__ import annotations

from .base import (
    Attempt,
    ClientConfig,
    ClientConfigError,
    InferenceError,
    ModelDescription,
    SonicClient,
    SonicError,
    TensorInfo,
    parse_duration,
)


def make_client(config: ClientConfig | dict, services: dict | None = None) -> SonicClient:
    """A begun client for ``config`` from the ServerRegistry among ``services`` (a module's
    ``self.services``), or from :func:`~recorun.sonic_clients.registry.default_registry` when there is
    none. Give it back with ``client.end_job()`` (or ``registry.release(client)``)."""
    from .registry import find_registry

    return find_registry(services).client_for(config)


def __getattr__(name: str):
    if name in ("TritonClient", "Endpoint"):
        from . import triton
        return getattr(triton, name)
    if name == "InProcessClient":
        from .inprocess import InProcessClient
        return InProcessClient
    if name in ("ServerRegistry", "default_registry"):
        from . import registry
        return getattr(registry, name)
    if name in ("FallbackServer", "FallbackServerError"):
        from . import fallback
        return getattr(fallback, name)
    raise AttributeError(f"module 'recorun.sonic_clients' has no attribute {name!r}")


__all__ = [
    "Attempt",
    "ClientConfig",
    "ClientConfigError",
    "Endpoint",
    "FallbackServer",
    "FallbackServerError",
    "InProcessClient",
    "InferenceError",
    "ModelDescription",
    "ServerRegistry",
    "SonicClient",
    "SonicError",
    "TensorInfo",
    "TritonClient",
    "default_registry",
    "make_client",
    "parse_duration",
]
