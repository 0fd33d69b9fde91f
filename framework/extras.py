"""Optional dependencies: what a plugin needs beyond recorun's core install, said clearly.

recorun's core install carries the engine, ROOT input and output and the Triton gRPC client;
FastJet, the server stack, Dask, Prometheus and plotting are extras. A type declares what it
needs as ``requires = {import name: what to install}``::

    class AntiKtJetProducer(Producer):
        requires = {"fastjet": "recorun[jets]"}

and a workflow that names it without that package stops before the first event with exit code
2 and ``pip install 'recorun[jets]'`` in the message. Code whose needs depend on its parameters
(an in-process client needs torch) calls :func:`require` itself.
"""
from __future__ import annotations

import importlib
import importlib.util

from .errors import ConfigError


class MissingExtra(ConfigError):
    """A package an optional part of recorun needs is not installed (exit code 2)."""

    def __init__(self, package: str, install: str, user: str):
        self.package, self.install, self.user = package, install, user
        super().__init__(f"{user} needs the Python package '{package}', which is not "
                         f"installed: pip install '{install}'")


def installed(package: str) -> bool:
    """Can ``package`` (an import name) be imported here?"""
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def check(requires: dict[str, str], user: str) -> None:
    """Raise :class:`MissingExtra` for the first package of ``requires`` that is missing."""
    for package, install in requires.items():
        if not installed(package):
            raise MissingExtra(package, install, user)


def require(package: str, install: str, user: str):
    """Import and return ``package``; :class:`MissingExtra` naming ``install`` when it is not
    installed. ``user`` says who needs it ("module 'jets' (AntiKtJetProducer)")."""
    check({package: install}, user)
    return importlib.import_module(package)


def missing_message(missing: list[tuple[str, str, str]]) -> str:
    """One message for every ``(user, package, install)`` that is missing, with one
    ``pip install`` line for all of recorun's extras among them."""
    lines = [f"{user} needs the Python package '{package}', which is not installed"
             for user, package, install in missing]
    extras = sorted({install[len("recorun["):-1] for _, _, install in missing
                     if install.startswith("recorun[") and install.endswith("]")})
    others = sorted({install for _, _, install in missing if not install.startswith("recorun[")})
    installs = ([f"'recorun[{','.join(extras)}]'"] if extras else []) + [f"'{o}'" for o in others]
    return "; ".join(lines) + ": pip install " + " ".join(installs)
