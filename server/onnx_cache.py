"""recorun-server's cache of ONNX exports: a model exported and checked once is served from disk.

Exporting a model to ONNX (``torch.onnx.export(..., dynamo=True)``, :mod:`recorun.server.export`)
and checking the file against torch takes seconds (FACILE: ~3 s on 2 cores, torch's import
included), at every start of a server, the local fallback server of every SONIC job included.
The file depends only on what :func:`export_fingerprint` lists, so recorun-server keeps each
export that passed :func:`~recorun.server.export.check_onnx` here, and a later start with the
same fingerprint serves the cached file without importing torch.

Where
    ``$RECORUN_ONNX_CACHE`` if set (and not empty), else
    ``${XDG_CACHE_HOME:-~/.cache}/recorun/onnx``;
    ``recorun-server --onnx-cache DIR`` overrides both. ``off`` (or ``none``, ``0``, ``false``,
    ``no``) disables the cache: every start exports and checks again. The folder can be
    deleted at any time (``rm -rf ~/.cache/recorun/onnx``). A cache folder that is not this
    user's, or that others may write to, is not used (a warning says why): a file planted there
    would be served.

An entry
    ``DIR/<model>-<key>/model.onnx`` and ``DIR/<model>-<key>/entry.json``. ``key`` is the
    SHA-256 of :func:`export_fingerprint`: the model's tensors (its spec), its weights (the
    SHA-256 of the checkpoint file, or the seed of an untrained initialisation), the SHA-256 of
    ``server/models.py`` and ``server/export.py`` (architecture and export code), the versions
    of torch, onnx, onnxscript and onnxruntime, and :data:`CACHE_FORMAT`. ``entry.json`` holds
    the fingerprint, the SHA-256 and size of ``model.onnx``, the weights' origin, torch's answer
    on the check batch (``example_input(spec, 3, seed 1)``) and the check's largest difference.
    Anything that changes the export changes the key: a stale entry is never read, and the
    :data:`KEEP_PER_MODEL` most recently used entries of a model are kept.

Reading (:meth:`OnnxCache.lookup`)
    ``entry.json`` is parsed and its key compared; ``model.onnx`` is read once into memory and
    its SHA-256 compared; the server makes its onnxruntime sessions from those bytes and runs
    the check batch against torch's recorded answer (:meth:`CachedExport.verify`). An entry that
    fails any of these (truncated, edited, unreadable) is logged and treated as missing: the
    model is exported and checked against torch again, and the entry replaced.

Writing (:meth:`OnnxCache.store`)
    Only an export that passed the check against torch. It is written into a hidden temporary
    folder inside the cache folder, then renamed into place (atomic on POSIX file systems): a
    reader sees a whole entry or none. When two servers store the same entry at once, the first
    rename wins and the other's copy is dropped; a corrupt entry is moved aside, then removed,
    and replaced. Readers read the bytes once and check their hash, so a replacement under way
    never mixes two files. A cache that cannot be written (read-only, full) is a warning, never
    an error.

Needs only the standard library (and onnxruntime for :meth:`CachedExport.verify`): no torch.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import stat
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np

from recorun.model_specs import SPECS

LOG = logging.getLogger("recorun.server")

#: the environment variable that moves (a folder) or disables (``off``) the cache
CACHE_VARIABLE = "RECORUN_ONNX_CACHE"
DISABLED = frozenset({"off", "none", "0", "false", "no"})
#: bumped when the layout of an entry or the way exports are made changes
CACHE_FORMAT = 1
#: entries kept per model (the most recently used; others are removed when one is stored)
KEEP_PER_MODEL = 3
#: hidden leftovers (temporary or discarded folders of a process that died) older than this
#: are removed when an entry is stored
STALE_LEFTOVER_S = 3600.0
#: the files whose code decides what an export contains
CODE_FILES = ("models.py", "export.py")
#: the packages whose versions decide it
TOOL_PACKAGES = ("torch", "onnx", "onnxscript", "onnxruntime")

ONNX_FILE, ENTRY_FILE = "model.onnx", "entry.json"


def default_cache_dir() -> Path:
    """``${XDG_CACHE_HOME:-~/.cache}/recorun/onnx``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "recorun" / "onnx"


def cache_dir(setting: str | os.PathLike | None = None) -> Path | None:
    """The cache folder: ``setting`` (recorun-server's ``--onnx-cache``) if given, else
    ``$RECORUN_ONNX_CACHE``, else :func:`default_cache_dir`; None when disabled (``off``)."""
    value = os.fspath(setting) if setting is not None else os.environ.get(CACHE_VARIABLE)
    if value is None or not value.strip():            # unset or empty: the default
        return default_cache_dir()
    if value.strip().lower() in DISABLED:
        return None
    return Path(value).expanduser()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def export_fingerprint(name: str, weights_dir: str | os.PathLike | None = None) -> dict:
    """What the ONNX export of model ``name`` depends on (see the module docstring), with the
    weights that :func:`recorun.server.serve.load_weights` would load: ``weights_dir/<name>.pt``
    (default ``server/trained``) when it exists, else the seeded initialisation. Needs no
    torch. Raises OSError when the checkpoint cannot be read."""
    from . import weights as weights_module

    spec = SPECS[name]
    directory = Path(weights_dir) if weights_dir is not None else weights_module.WEIGHTS_DIR
    checkpoint = directory / f"{name}.pt"
    weights = (f"sha256:{_file_sha256(checkpoint)}" if checkpoint.exists() else
               f"untrained: torch.manual_seed({weights_module.INIT_SEED})")
    here = Path(__file__).resolve().parent
    return {
        "format": CACHE_FORMAT,
        "model": name,
        "inputs": [[t.name, list(t.shape), t.dtype] for t in spec.inputs],
        "outputs": [[t.name, list(t.shape), t.dtype] for t in spec.outputs],
        "weights": weights,
        "code": {f: _file_sha256(here / f) for f in CODE_FILES},
        "versions": {p: _version(p) for p in TOOL_PACKAGES},
    }


def fingerprint_key(fingerprint: dict) -> str:
    return _sha256(json.dumps(fingerprint, sort_keys=True).encode())


@dataclass
class CachedExport:
    """An entry read from the cache: the ONNX file's bytes and what was recorded with it."""

    name: str
    path: Path                       # the entry's folder
    data: bytes                      # model.onnx, its SHA-256 checked
    origin: str                      # the weights' origin (the server publishes it)
    reference: np.ndarray            # torch's answer on the check batch
    entry: dict = field(repr=False)

    def verify(self, session) -> float:
        """Run ``session`` (made from :attr:`data`) on the check batch against torch's recorded
        answer; :class:`~recorun.server.export.ExportError` unless they agree. Returns the
        largest difference."""
        from .export import compare_session

        return compare_session(self.name, session, self.reference,
                               where=f"cached {self.path / ONNX_FILE}",
                               seed=int(self.entry["check"]["seed"]))


class OnnxCache:
    """The cache folder ``root`` (see the module docstring)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"OnnxCache({str(self.root)!r})"

    @classmethod
    def open(cls, setting: str | os.PathLike | None = None) -> OnnxCache | None:
        """The cache :func:`cache_dir` names, or None when it is disabled or not safe to use
        (not this user's folder, or writable by others: logged)."""
        root = cache_dir(setting)
        if root is None:
            return None
        problem = _unsafe(root)
        if problem:
            LOG.warning("ONNX cache %s not used: %s (every start exports again; set %s to a "
                        "folder of your own, or 'off')", root, problem, CACHE_VARIABLE)
            return None
        return cls(root)

    def entry_path(self, name: str, key: str) -> Path:
        return self.root / f"{name}-{key[:32]}"

    # reading ---------------------------------------------------------------------------------
    def lookup(self, name: str, fingerprint: dict) -> CachedExport | None:
        """The entry of ``fingerprint``, its file read and its hash checked; None when there is
        none or it is unusable (logged, and replaced by the next :meth:`store`)."""
        key = fingerprint_key(fingerprint)
        path = self.entry_path(name, key)
        try:
            entry = json.loads((path / ENTRY_FILE).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            LOG.warning("ONNX cache: unreadable entry %s (%s): exporting %s again", path,
                        exc, name)
            return None
        try:
            data = (path / ONNX_FILE).read_bytes()
            problem = _entry_problem(entry, key, data)
            reference = np.asarray(entry["check"]["reference"], dtype=np.float32)
            origin = str(entry["origin"])
        except (OSError, KeyError, TypeError, ValueError) as exc:
            problem = f"{type(exc).__name__}: {exc}"
        if problem:
            LOG.warning("ONNX cache: corrupt entry %s (%s): exporting %s again", path, problem,
                        name)
            return None
        try:
            os.utime(path)                         # most recently used (see _prune)
        except OSError:
            pass
        return CachedExport(name, path, data, origin, reference, entry)

    # writing ---------------------------------------------------------------------------------
    def store(self, name: str, fingerprint: dict, onnx_path: str | os.PathLike, *, origin: str,
              reference: np.ndarray, max_diff: float, check_seed: int,
              replace: bool = False) -> Path | None:
        """Store the export ``onnx_path`` of ``fingerprint`` (it passed the check against
        torch, whose answer on the check batch is ``reference``); ``replace``: the entry there
        failed its check, replace it even though its file is whole. Returns the entry's folder,
        or None when the cache cannot be written (logged)."""
        key = fingerprint_key(fingerprint)
        final = self.entry_path(name, key)
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            data = Path(onnx_path).read_bytes()
            entry = {
                "key": key,
                "fingerprint": fingerprint,
                "onnx": {"sha256": _sha256(data), "bytes": len(data)},
                "origin": origin,
                "check": {"seed": int(check_seed), "max_abs_diff": float(max_diff),
                          "reference": np.asarray(reference, dtype=np.float32).tolist()},
                "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "written_by": f"recorun-server, pid {os.getpid()}",
            }
            staging = Path(tempfile.mkdtemp(prefix=f".{name}-", suffix=".tmp", dir=self.root))
            try:
                _write(staging / ONNX_FILE, data)
                _write(staging / ENTRY_FILE, json.dumps(entry, indent=1).encode())
                stored = self._publish(staging, final, key, replace)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            self._prune(name, keep=final)
        except OSError as exc:
            LOG.warning("ONNX cache %s: cannot store the export of %s: %s", self.root, name, exc)
            return None
        if stored:
            LOG.info("%s: ONNX export stored in the cache: %s", name, final)
        return final

    def _publish(self, staging: Path, final: Path, key: str, replace: bool) -> bool:
        """Rename ``staging`` to ``final``; an entry there already stays if it is sound (another
        server stored it first) unless ``replace``, else it is moved aside and replaced. True
        when ours is in."""
        for _ in range(3):
            try:
                os.rename(staging, final)
                return True
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
            if not replace and self._sound(final, key):
                return False
            replace = False                       # the one we found bad: once
            _discard(final)
        return False

    def _sound(self, path: Path, key: str) -> bool:
        try:
            entry = json.loads((path / ENTRY_FILE).read_text())
            return not _entry_problem(entry, key, (path / ONNX_FILE).read_bytes())
        except (OSError, ValueError):
            return False

    def _prune(self, name: str, keep: Path) -> None:
        """Keep the :data:`KEEP_PER_MODEL` most recently used entries of ``name``; remove
        leftovers of processes that died while writing."""
        entries = []
        for path in self.root.iterdir():
            try:
                modified = path.stat().st_mtime
            except OSError:
                continue
            if path.name.startswith(".") and time.time() - modified > STALE_LEFTOVER_S:
                shutil.rmtree(path, ignore_errors=True)
            elif path.name.startswith(f"{name}-") and path != keep:
                entries.append((modified, path))
        entries.sort(reverse=True)
        for _, path in entries[KEEP_PER_MODEL - 1:]:
            _discard(path)


def _entry_problem(entry: dict, key: str, data: bytes) -> str | None:
    """What is wrong with an entry (its ``entry.json`` and ``model.onnx`` bytes), or None."""
    if entry.get("key") != key:
        return "its key differs from its folder's"
    onnx = entry.get("onnx") or {}
    if onnx.get("bytes") != len(data) or onnx.get("sha256") != _sha256(data):
        return (f"{ONNX_FILE} has {len(data)} bytes and a SHA-256 other than the "
                f"{onnx.get('bytes')} bytes recorded")
    return None


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _unsafe(root: Path) -> str | None:
    """Why the folder ``root`` (or, while it does not exist, its nearest existing parent) must
    not hold a cache whose files the server runs; None when it may."""
    path = root
    while not path.exists():
        if path.parent == path:
            return None
        path = path.parent
    info = path.stat()
    if path == root:
        if not stat.S_ISDIR(info.st_mode):
            return "it is not a folder"
        if info.st_uid != os.getuid():
            return f"it belongs to uid {info.st_uid}, not to this user ({os.getuid()})"
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return f"others may write to it (mode {stat.S_IMODE(info.st_mode):o})"
    elif info.st_mode & stat.S_IWOTH and not info.st_mode & stat.S_ISVTX:
        return f"{path} is writable by everyone"
    return None


def _discard(entry: Path) -> None:
    """Remove a cache entry: renamed aside first (atomically, so that no reader sees it half
    removed), then deleted; gone already is fine."""
    aside = entry.with_name(f".{entry.name}.{uuid.uuid4().hex[:8]}.discarded")
    try:
        os.rename(entry, aside)
    except OSError:
        return
    shutil.rmtree(aside, ignore_errors=True)
