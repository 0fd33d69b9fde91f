"""recorun's gRPC load balancer: a real nginx in front of several recorun-server gRPC ports.

:class:`NginxBalancer` renders ``deploy/nginx/grpc_balancer.conf.template`` (an ``upstream`` of
the servers' gRPC ports, ``grpc_pass`` over HTTP/2, ``grpc_next_upstream error timeout
http_502 http_503 http_504 non_idempotent`` and finite timeouts) into a temporary prefix
directory of its own and runs::

    nginx -p PREFIX/ -c PREFIX/nginx.conf -e PREFIX/error.log -g 'daemon off;'

as a subprocess in its own session (process group = its PID). Everything nginx writes (pid
file, error and access logs, temporary files) is in PREFIX, so it needs no root and leaves
nothing behind: :meth:`NginxBalancer.stop` sends SIGTERM to nginx's PID (SIGKILL to its process
group if it hangs) and removes PREFIX, keeping the logs' text in ``error_log_text`` and
``access_log_text``. An ``atexit`` hook stops any balancer left running, and nginx gets
SIGTERM from the kernel should this process die without it (:class:`recorun.processes.ChildProcess`,
the same helper as the local fallback server's).

nginx balances *requests*: one gRPC call is one HTTP/2 stream, passed to one upstream server
(round robin, or ``least_conn``). A server that refuses or resets the connection is left out
for ``fail_timeout_s`` and the request goes to the next one; a request that was already
being answered when its server died fails back to the client (nginx streams request bodies to
gRPC upstreams, so it cannot resend them), and recorun's SONIC client retries it: through the
balancer, on another server.

``recorun-balancer`` (:func:`main`) is the command line::

    recorun-balancer --upstream HOST:PORT [--upstream HOST:PORT ...] [--port P]
                     [--address 127.0.0.1] [--method round_robin|least_conn]
                     [--timeout S] [--connect-timeout S] [--fail-timeout S]
                     [--nginx PATH] [--print-config]

It prints ``READY grpc=HOST:PORT prefix=PREFIX pid=NGINX_PID`` on stdout once nginx listens,
and stops cleanly (exit 0) on SIGTERM or SIGINT. nginx itself comes from the system (Debian:
``apt-get install nginx-light``; ``./setup.sh`` installs it where it can); without it,
:class:`NginxNotFoundError` says so. This module imports nothing of the framework.
"""
from __future__ import annotations

import argparse
import atexit
import functools
import ipaddress
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from recorun.processes import ChildProcess

#: the nginx configuration template (placeholders ``{{ name }}``)
TEMPLATE = Path(__file__).resolve().parent.parent / "deploy" / "nginx" / \
    "grpc_balancer.conf.template"

#: where nginx is looked for when it is not on PATH (a non-root PATH often lacks /usr/sbin)
NGINX_LOCATIONS = ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")

INSTALL_HINT = ("install it with 'apt-get install -y nginx-light' (Debian/Ubuntu, as root; "
                "./setup.sh does it where it can), or name the binary with --nginx PATH")

METHODS = ("round_robin", "least_conn")
READY_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0
PORT_ATTEMPTS = 3

_PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")

_RUNNING: set[NginxBalancer] = set()
_RUNNING_LOCK = threading.Lock()


class BalancerError(RuntimeError):
    """nginx could not be found, configured or started (the message says why)."""


class NginxNotFoundError(BalancerError):
    """There is no nginx binary to run."""


# --- nginx itself ----------------------------------------------------------------------------

def find_nginx(nginx: str | os.PathLike | None = None) -> str:
    """The nginx binary: ``nginx`` if given (a path or a name on PATH), else ``nginx`` on PATH
    or in :data:`NGINX_LOCATIONS`. Raises :class:`NginxNotFoundError` with the install hint."""
    if nginx is not None:
        found = shutil.which(str(nginx))
        if found is None:
            raise NginxNotFoundError(f"nginx binary '{nginx}' does not exist or is not "
                                     f"executable; {INSTALL_HINT}")
        return found
    found = shutil.which("nginx")
    if found:
        return found
    for path in NGINX_LOCATIONS:
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    raise NginxNotFoundError("nginx is not installed (no 'nginx' on PATH nor in "
                             f"{', '.join(NGINX_LOCATIONS)}): the gRPC load balancer runs a "
                             f"real nginx; {INSTALL_HINT}")


@functools.lru_cache(maxsize=None)
def nginx_build(binary: str) -> dict:
    """``nginx -V`` of ``binary``: ``{"version": (1, 22, 1), "text": ..., "arguments": [...]}``.
    Raises :class:`BalancerError` when it lacks HTTP/2 or gRPC proxying."""
    try:
        out = subprocess.run([binary, "-V"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BalancerError(f"cannot run '{binary} -V': {exc}") from None
    text = (out.stderr or "") + (out.stdout or "")
    match = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", text)
    version = tuple(int(v) for v in match.groups()) if match else (0, 0, 0)
    arguments = next((line.split(":", 1)[1].split() for line in text.splitlines()
                      if line.startswith("configure arguments:")), [])
    missing = [what for what, ok in (
        ("HTTP/2 (--with-http_v2_module)", "--with-http_v2_module" in arguments),
        ("gRPC proxying (ngx_http_grpc_module)", "--without-http_grpc_module" not in arguments))
        if not ok]
    if missing:
        raise BalancerError(f"{binary} (nginx {'.'.join(map(str, version))}) was built without "
                            f"{' and '.join(missing)}, which the gRPC balancer needs; "
                            f"{INSTALL_HINT}")
    return {"version": version, "text": text, "arguments": arguments}


def _temp_paths(arguments: Sequence[str]) -> str:
    """``*_temp_path`` directives under PREFIX/temp for the modules this nginx has (an
    unknown directive is a configuration error, a missing one makes nginx create its
    compiled-in /var/lib/nginx/... directories)."""
    lines = ["    client_body_temp_path temp/client_body;"]
    for module in ("proxy", "fastcgi", "uwsgi", "scgi"):
        if f"--without-http_{module}_module" not in arguments:
            lines.append(f"    {module}_temp_path temp/{module};")
    return "\n".join(lines)


# --- configuration ---------------------------------------------------------------------------

_HOSTNAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*"
                       r"[A-Za-z0-9])?)*")


def check_host(text: str) -> str:
    """``text`` if it is an IP address or a host name, else BalancerError: it goes into
    nginx.conf, where a ``;`` or a space would add directives of its own."""
    candidate = str(text).strip()
    try:
        ipaddress.ip_address(candidate.strip("[]"))
        return candidate.strip("[]")
    except ValueError:
        pass
    if len(candidate) <= 253 and _HOSTNAME.fullmatch(candidate):
        return candidate
    raise BalancerError(f"{text!r} is not an IP address or a host name")


def parse_upstream(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) as (host, port); raises ValueError."""
    host, sep, port = str(text).strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"upstream must be 'HOST:PORT', not {text!r}")
    try:
        check_host(host)
    except BalancerError:
        raise ValueError(f"upstream must be 'HOST:PORT', not {text!r}") from None
    return host, int(port)


def _duration(seconds: float) -> str:
    """An nginx time value."""
    ms = max(1, int(round(float(seconds) * 1000)))
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def render(template: str, values: dict[str, object]) -> str:
    """``template`` with every ``{{ name }}`` replaced; raises :class:`BalancerError` naming
    a placeholder that has no value."""
    missing = sorted({m.group(1) for m in _PLACEHOLDER.finditer(template)} - set(values))
    if missing:
        raise BalancerError(f"the nginx template has placeholders without a value: {missing}")
    return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), template)


def free_port(address: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as sock:
        sock.bind((address, 0))
        return sock.getsockname()[1]


# --- the balancer ----------------------------------------------------------------------------

class NginxBalancer:
    """nginx balancing gRPC requests over ``upstreams`` (``HOST:PORT`` of recorun-server gRPC
    ports), listening on ``address:port`` (port 0: a free one).

    ``method``: ``round_robin`` (nginx's default) or ``least_conn``; ``timeout_s``: connect
    aside, how long nginx waits on a client or a server (send, read, next-upstream);
    ``connect_timeout_s``: connecting to a server; ``fail_timeout_s``: how long a server that
    failed is left out; ``nginx``: the binary (default: :func:`find_nginx`);
    ``template``: another template file. ``start()`` returns once nginx accepts connections;
    ``address`` is then ``HOST:PORT``. Also a context manager."""

    def __init__(self, upstreams: Sequence[str], port: int = 0, *, address: str = "127.0.0.1",
                 method: str = "round_robin", timeout_s: float = 60.0,
                 connect_timeout_s: float = 2.0, fail_timeout_s: float = 10.0,
                 nginx: str | os.PathLike | None = None,
                 template: str | os.PathLike | None = None, worker_processes: int = 1,
                 log_level: str = "warn", ready_timeout_s: float = READY_TIMEOUT_S):
        if isinstance(upstreams, str):
            upstreams = [upstreams]
        if not upstreams:
            raise BalancerError("the balancer needs at least one upstream 'HOST:PORT'")
        try:
            self.upstreams = [f"{h}:{p}" for h, p in map(parse_upstream, upstreams)]
        except ValueError as exc:
            raise BalancerError(str(exc)) from None
        if len(set(self.upstreams)) != len(self.upstreams):
            raise BalancerError(f"an upstream is given twice: {self.upstreams}")
        if method not in METHODS:
            raise BalancerError(f"method {method!r} is not one of {list(METHODS)}")
        if not 0 <= int(port) < 65536:
            raise BalancerError(f"port {port}: not a port (0 = a free one)")
        for name, value in (("timeout_s", timeout_s), ("connect_timeout_s", connect_timeout_s),
                            ("fail_timeout_s", fail_timeout_s)):
            if not float(value) > 0:
                raise BalancerError(f"{name} must be positive, not {value!r}")
        self.requested_port = int(port)
        self.host = check_host(address)
        self.port = 0
        self.method = method
        self.timeout_s = float(timeout_s)
        self.connect_timeout_s = float(connect_timeout_s)
        self.fail_timeout_s = float(fail_timeout_s)
        self.worker_processes = int(worker_processes)
        self.log_level = log_level
        self.ready_timeout_s = float(ready_timeout_s)
        self.template_path = Path(template) if template is not None else TEMPLATE
        self.nginx = find_nginx(nginx)
        self.build = nginx_build(self.nginx)
        self.prefix: Path | None = None
        self.child: ChildProcess | None = None
        self.pid: int | None = None
        self.exit_code: int | None = None
        self.error_log_text = ""
        self.access_log_text = ""
        self._lock = threading.Lock()
        self._stopped = False

    def __repr__(self) -> str:
        return (f"NginxBalancer({self.upstreams}, address={self.address or None!r}, "
                f"pid={self.pid})")

    @property
    def address(self) -> str:
        """``HOST:PORT`` where clients connect (empty before start)."""
        if not self.port:
            return ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def process(self) -> subprocess.Popen | None:
        return self.child.process if self.child is not None else None

    @property
    def running(self) -> bool:
        return self.child is not None and self.child.running

    # configuration -------------------------------------------------------------------------
    def config_text(self, port: int | None = None) -> str:
        """The nginx configuration for ``port`` (default: the port in use or asked for)."""
        try:
            template = self.template_path.read_text()
        except OSError as exc:
            raise BalancerError(f"cannot read the nginx template {self.template_path}: "
                                f"{exc}") from None
        if port is None:
            port = self.port or self.requested_port
        host = f"[{self.host}]" if ":" in self.host else self.host
        servers = "\n".join(f"        server {u} max_fails=1 "
                            f"fail_timeout={_duration(self.fail_timeout_s)};"
                            for u in self.upstreams)
        new_http2 = self.build["version"] >= (1, 25, 1)
        method = ("least_conn;" if self.method == "least_conn"
                  else "# round robin (nginx's default method)")
        return render(template, {
            "worker_processes": self.worker_processes,
            "error_log_level": self.log_level,
            "temp_paths": _temp_paths(self.build["arguments"]),
            "method": method,
            "upstream_servers": servers,
            "listen": f"{host}:{port}",
            "listen_http2": "" if new_http2 else " http2",
            "http2": "http2 on;" if new_http2 else "# (http2 is on: the listen parameter)",
            "timeout": _duration(self.timeout_s),
            "connect_timeout": _duration(self.connect_timeout_s),
            "next_upstream_tries": len(self.upstreams),
        })

    def _command(self, *extra: str) -> list[str]:
        prefix = str(self.prefix)
        command = [self.nginx, *extra, "-p", prefix + "/", "-c", f"{prefix}/nginx.conf"]
        if self.build["version"] >= (1, 19, 5):                  # -e appeared in 1.19.5
            command += ["-e", f"{prefix}/error.log"]
        return command + ["-g", "daemon off;"]

    # start ---------------------------------------------------------------------------------
    def start(self) -> NginxBalancer:
        """Write the configuration, check it (``nginx -t``), start nginx and wait until it
        accepts connections. Raises :class:`BalancerError` (with nginx's log) otherwise."""
        with self._lock:
            if self.prefix is not None or self._stopped:
                raise BalancerError(f"{self!r} was already started (make a new one)")
            self.prefix = Path(tempfile.mkdtemp(prefix="recorun-balancer-"))
        try:
            # started as root, nginx's workers run as an unprivileged user: they must be able
            # to reach PREFIX/temp (nginx makes those folders theirs)
            os.chmod(self.prefix, 0o755)
            (self.prefix / "temp").mkdir()
            for attempt in range(PORT_ATTEMPTS):
                self.port = self.requested_port or free_port(self.host)
                (self.prefix / "nginx.conf").write_text(self.config_text(self.port))
                if attempt == 0:
                    self._check_config()
                error = self._run()
                if error is None:
                    break
                if self.requested_port or "already in use" not in error \
                        or attempt + 1 == PORT_ATTEMPTS:
                    raise BalancerError(error)
        except BaseException:
            self._cleanup()
            raise
        with _RUNNING_LOCK:
            _RUNNING.add(self)
        return self

    def _check_config(self) -> None:
        out = subprocess.run(self._command("-t", "-q"), capture_output=True, text=True,
                             timeout=30, stdin=subprocess.DEVNULL)
        if out.returncode != 0:
            raise BalancerError(f"nginx ({self.nginx}) rejects the balancer's configuration "
                                f"{self.prefix}/nginx.conf: "
                                f"{(out.stderr or out.stdout).strip()[-2000:]}")

    def _run(self) -> str | None:
        """Start nginx and wait for it to listen; None, or what went wrong."""
        (self.prefix / "nginx.pid").unlink(missing_ok=True)     # of a failed attempt
        try:
            with open(self.prefix / "nginx.out", "w") as out:
                child = ChildProcess(self._command(), name="nginx-balancer", stdout=out,
                                     stderr=subprocess.STDOUT).start()
        except OSError as exc:
            return f"cannot start nginx ({self.nginx}): {exc}"
        self.child, self.pid = child, child.pid
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if not child.running:
                break
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    pass
                if (self.prefix / "nginx.pid").exists():   # written after the sockets open
                    return None
            except OSError:
                pass
            time.sleep(0.05)
        child.kill()
        code = child.exit_code
        log = self._read("error.log") + self._read("nginx.out")
        self.child = self.pid = None
        reason = (f"exited with code {code}" if code is not None
                  else f"did not listen on {self.address} within {self.ready_timeout_s:.0f} s")
        return (f"nginx ({self.nginx}) {reason}; command {' '.join(self._command())}; its log:\n"
                f"{log.strip()[-3000:]}")

    def _read(self, name: str) -> str:
        try:
            return (self.prefix / name).read_text(errors="replace")
        except (OSError, TypeError):
            return ""

    # while running -------------------------------------------------------------------------
    def logs(self) -> str:
        """nginx's error log so far (after stop: as it was)."""
        return self._read("error.log") if self.prefix is not None else self.error_log_text

    def upstream_counts(self, rpc: str | None = "ModelInfer") -> Counter:
        """Requests answered per upstream ``HOST:PORT``, from the access log: a request that
        nginx passed on to the next server counts for the server that answered it (HTTP 200);
        one that no server answered counts nowhere. ``rpc``: only calls of that gRPC method
        (default: inferences; None: every call, health and metadata queries included)."""
        text = self._read("access.log") if self.prefix is not None else self.access_log_text
        counts: Counter = Counter()
        for line in text.splitlines():
            match = re.search(r"upstream=(.+?) upstream_status=(.+?) request_time=", line)
            if not match or (rpc is not None and f"/{rpc} " not in line):
                continue
            servers = re.split(r"\s*(?:,|\s:)\s+", match.group(1).strip())
            statuses = re.split(r"\s*(?:,|\s:)\s+", match.group(2).strip())
            if servers[-1] != "-" and statuses[-1] == "200":
                counts[servers[-1]] += 1
        return counts

    # stop ----------------------------------------------------------------------------------
    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM to nginx (fast shutdown), SIGKILL to its process group if it hangs or leaves
        a worker behind; then remove PREFIX. Returns nginx's exit code. Idempotent."""
        with self._lock:
            if self._stopped:
                return self.exit_code
            self._stopped = True
        if self.child is not None:
            self.exit_code = self.child.stop(timeout_s)
        self._cleanup()
        return self.exit_code

    def _cleanup(self) -> None:
        with _RUNNING_LOCK:
            _RUNNING.discard(self)
        prefix, self.prefix = self.prefix, None
        if prefix is not None:
            for name, attr in (("error.log", "error_log_text"),
                               ("access.log", "access_log_text")):
                try:
                    setattr(self, attr, (prefix / name).read_text(errors="replace"))
                except OSError:
                    pass
            shutil.rmtree(prefix, ignore_errors=True)

    def __enter__(self) -> NginxBalancer:
        return self.start()

    def __exit__(self, *_) -> None:
        self.stop()


def running_balancers() -> list[NginxBalancer]:
    with _RUNNING_LOCK:
        return list(_RUNNING)


@atexit.register
def _stop_all_at_exit() -> None:
    for balancer in running_balancers():
        try:
            balancer.stop(timeout_s=5.0)
        except Exception:                               # pragma: no cover
            if balancer.child is not None:
                balancer.child.kill()


# --- recorun-balancer ------------------------------------------------------------------------

def _upstream(text: str) -> str:
    try:
        host, port = parse_upstream(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return f"{host}:{port}"


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text}: must be a positive number of seconds")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="recorun-balancer",
        description="A gRPC load balancer (a real nginx) in front of several recorun-server "
                    "gRPC ports: prints 'READY grpc=HOST:PORT prefix=DIR pid=PID' on stdout "
                    "when it listens; SIGTERM or Ctrl-C stops it and removes DIR.",
        epilog="exit codes: 0 stopped by SIGTERM/SIGINT; 1 nginx missing, rejected the "
               "configuration or died; 2 bad options")
    p.add_argument("--upstream", type=_upstream, action="append", required=True,
                   metavar="HOST:PORT", help="a recorun-server gRPC address (repeat for each)")
    p.add_argument("--port", type=int, default=0, help="port to listen on (default 0: a free "
                   "one, printed in the READY line)")
    p.add_argument("--address", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1)")
    p.add_argument("--method", choices=METHODS, default="round_robin",
                   help="nginx's balancing method (default round_robin)")
    p.add_argument("--timeout", type=_seconds, default=60.0, metavar="S",
                   help="send/read timeout towards clients and servers (default 60)")
    p.add_argument("--connect-timeout", type=_seconds, default=2.0, metavar="S",
                   help="timeout to connect to a server (default 2)")
    p.add_argument("--fail-timeout", type=_seconds, default=10.0, metavar="S",
                   help="how long a server that failed is left out (default 10)")
    p.add_argument("--nginx", default=None, metavar="PATH",
                   help="the nginx binary (default: nginx on PATH or in /usr/sbin)")
    p.add_argument("--print-config", action="store_true",
                   help="print the rendered nginx configuration (listening on --port, 8001 "
                        "when it is 0) and exit")
    return p


class _Stop(BaseException):
    pass


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not 0 <= args.port < 65536:
        print(f"recorun-balancer: --port {args.port}: not a port", file=sys.stderr)
        return 2
    try:                                          # bad options: exit 2 before nginx is looked for
        check_host(args.address)
        for upstream in args.upstream:
            parse_upstream(upstream)
    except (BalancerError, ValueError) as exc:
        print(f"recorun-balancer: {exc}", file=sys.stderr)
        return 2
    try:
        balancer = NginxBalancer(args.upstream, args.port, address=args.address,
                                 method=args.method, timeout_s=args.timeout,
                                 connect_timeout_s=args.connect_timeout,
                                 fail_timeout_s=args.fail_timeout, nginx=args.nginx)
        if args.print_config:                     # for an nginx run by hand: a fixed port
            sys.stdout.write(balancer.config_text(args.port or 8001))
            return 0
    except BalancerError as exc:
        print(f"recorun-balancer: {exc}", file=sys.stderr)
        return 1

    def on_signal(signum, _frame):
        raise _Stop()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    code = 1
    try:
        balancer.start()
        print(f"READY grpc={balancer.address} prefix={balancer.prefix} pid={balancer.pid}",
              flush=True)
        print(f"recorun-balancer: nginx (pid {balancer.pid}) balances {balancer.address} over "
              f"{', '.join(balancer.upstreams)} ({balancer.method})", file=sys.stderr)
        while balancer.running:
            time.sleep(0.2)
        print(f"recorun-balancer: nginx exited on its own ({balancer.process.poll()}); its "
              f"log:\n{balancer.logs()[-3000:]}", file=sys.stderr)
    except _Stop:
        code = 0
    except BalancerError as exc:
        print(f"recorun-balancer: {exc}", file=sys.stderr)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)            # stopping: no second interruption
        balancer.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code


if __name__ == "__main__":
    sys.exit(main())
