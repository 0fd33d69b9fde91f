"""Services: job-wide helpers that modules share (a server registry, a metrics exporter...).

Configured under ``services:`` in the workflow, registered in the entry-point group
``recorun.services``; modules find them in ``self.services[label]``. A service is shared by
every thread: it must be thread-safe.
"""
from __future__ import annotations

from .params import Configurable


class Service(Configurable):

    def begin_job(self) -> None:
        """Called before the modules' begin_job."""

    def end_job(self) -> None:
        """Called after the modules' end_job."""
