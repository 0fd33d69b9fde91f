"""HLT prescales that change per luminosity block, as CMS's HLT has them (docs/PRESCALES.md).

A *prescale table* (YAML) gives every trigger path one prescale per *column*, and says which
column is in force from which luminosity block on::

    columns: [2e34, 1e34, emergency]
    default_column: 2e34              # before the first 'lumis' entry
    prescales:
      HLT_MinBias: [100, 50, 0]       # 0: the path is off in that column
      HLT_HT600:   [1, 1, 10]
    lumis:
      - {run: 1, lumi: 3, column: 1e34}
      - {run: 2, lumi: 1, column: emergency}

:class:`PrescaleService` reads and checks the table when it is made (before the first event;
``recorun --check`` too), picks the column of each luminosity block in its
``begin_luminosity_block`` (services are called before modules) and records which column
applied to which block (its report). :class:`HLTPrescaler`, a filter placed first on a trigger
path, reads its path's prescale from the service at each block's beginning and accepts the
events whose number is a multiple of N (N the prescale; 0: none).

Which events are accepted depends on the event alone, its event number, never on the order
events reach the prescaler: the same events whatever the threads, streams, processes or
chunks.
"""
from __future__ import annotations

import difflib
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from recorun import Concurrency, ConfigError, Filter, Param, Service

log = logging.getLogger(__name__)

TABLE_KEYS = ("columns", "default_column", "prescales", "lumis")
LUMI_KEYS = ("run", "lumi", "column")


# -- the table --------------------------------------------------------------------------------
@dataclass
class PrescaleTable:
    """A checked prescale table: ``columns`` (names), ``default_column``, ``prescales``
    (``{path: [one prescale per column]}``) and ``switches`` (``[((run, lumi), column)]``,
    increasing)."""

    file: str
    columns: list[str]
    default_column: str
    prescales: dict[str, list[int]]
    switches: list[tuple[tuple[int, int], str]] = field(default_factory=list)

    @classmethod
    def load(cls, file: str | Path) -> "PrescaleTable":
        """Read and check ``file``; a :class:`ConfigError` naming the file and the key for
        anything wrong."""
        file = str(file)
        try:
            text = Path(file).read_text()
        except FileNotFoundError:
            raise ConfigError("prescale table not found", file=file) from None
        except OSError as exc:
            raise ConfigError(f"prescale table cannot be read: {exc.strerror or exc}",
                              file=file) from None
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"not a valid YAML prescale table: {exc}", file=file) from None
        return cls.from_mapping(raw, file)

    @classmethod
    def from_mapping(cls, raw: Any, file: str = "<prescale table>") -> "PrescaleTable":
        def error(key: str, message: str) -> ConfigError:
            return ConfigError(f"key '{key}': {message}", file=file)

        if not isinstance(raw, dict):
            raise ConfigError(f"a prescale table is a mapping with the keys "
                              f"{', '.join(TABLE_KEYS)}; got {type(raw).__name__}", file=file)
        for key in raw:
            if key not in TABLE_KEYS:
                raise error(str(key), f"unknown key (a prescale table has: "
                                      f"{', '.join(TABLE_KEYS)})")
        for key in ("columns", "prescales"):
            if key not in raw:
                raise error(key, "missing")

        columns_raw = raw["columns"]
        if not isinstance(columns_raw, list) or not columns_raw:
            raise error("columns", f"expected a non-empty list of column names, got "
                                   f"{columns_raw!r}")
        columns: list[str] = []
        for i, name in enumerate(columns_raw):
            if not _is_name(name):
                hint = (" (YAML reads on, off, yes, no, true and false as booleans: quote "
                        "the name)" if isinstance(name, bool) else "")
                raise error(f"columns[{i}]", f"a column name is text or a number, got "
                                             f"{name!r}{hint}")
            name = str(name)
            if name in columns:
                raise error(f"columns[{i}]", f"column '{name}' is named twice")
            columns.append(name)

        def column(value: Any, key: str) -> str:
            if not _is_name(value) or str(value) not in columns:
                raise error(key, f"unknown column {value!r} (columns: {', '.join(columns)})")
            return str(value)

        default = column(raw["default_column"], "default_column") \
            if "default_column" in raw else columns[0]

        prescales_raw = raw["prescales"]
        if not isinstance(prescales_raw, dict):
            raise error("prescales", f"expected a mapping of trigger path to prescales, got "
                                     f"{type(prescales_raw).__name__}")
        prescales: dict[str, list[int]] = {}
        for path, row in prescales_raw.items():
            key = f"prescales.{path}"
            if not isinstance(path, str) or not path:
                raise error(key, "a trigger path name is text")
            if not isinstance(row, list):
                raise error(key, f"expected a list of {len(columns)} prescales (one per column: "
                                 f"{', '.join(columns)}), got {row!r}")
            if len(row) != len(columns):
                raise error(key, f"has {len(row)} prescales, expected {len(columns)} (one per "
                                 f"column: {', '.join(columns)})")
            for name, value in zip(columns, row):
                if not isinstance(value, int) or isinstance(value, bool):
                    raise error(key, f"prescale {value!r} of column '{name}' is not an integer")
                if value < 0:
                    raise error(key, f"prescale {value} of column '{name}' is negative "
                                     f"(0 turns the path off)")
            prescales[path] = list(row)

        lumis_raw = raw.get("lumis") or []
        if not isinstance(lumis_raw, list):
            raise error("lumis", f"expected a list of {{run, lumi, column}} entries, got "
                                 f"{type(lumis_raw).__name__}")
        switches: list[tuple[tuple[int, int], str]] = []
        for i, entry in enumerate(lumis_raw):
            key = f"lumis[{i}]"
            if not isinstance(entry, dict):
                raise error(key, f"expected a mapping {{run: R, lumi: L, column: C}}, got "
                                 f"{entry!r}")
            for name in entry:
                if name not in LUMI_KEYS:
                    raise error(f"{key}.{name}", f"unknown key (an entry has: "
                                                 f"{', '.join(LUMI_KEYS)})")
            for name in LUMI_KEYS:
                if name not in entry:
                    raise error(f"{key}.{name}", "missing")
            for name in ("run", "lumi"):
                value = entry[name]
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise error(f"{key}.{name}", f"expected a non-negative integer, got "
                                                 f"{value!r}")
            where = (entry["run"], entry["lumi"])
            name = column(entry["column"], f"{key}.column")
            if switches and where <= switches[-1][0]:
                before = switches[-1][0]
                raise error(key, f"lumis are not in increasing order: run {where[0]} lumi "
                                 f"{where[1]} comes after run {before[0]} lumi {before[1]}")
            switches.append((where, name))
        return cls(file, columns, default, prescales, switches)

    def column_for(self, run: int, lumi: int, default: str | None = None) -> str:
        """The column in force at ``run``:``lumi``: the last ``lumis`` entry at or before it,
        else ``default`` (else the table's default column)."""
        chosen = default or self.default_column
        for where, name in self.switches:
            if where > (run, lumi):
                break
            chosen = name
        return chosen

    def prescale(self, path: str, column: str) -> int:
        """``path``'s prescale in ``column``; 1 for a path the table does not list."""
        row = self.prescales.get(path)
        return 1 if row is None else row[self.columns.index(column)]


def _is_name(value: Any) -> bool:
    return isinstance(value, (str, int, float)) and not isinstance(value, bool) and \
        str(value) != ""


# -- the service ------------------------------------------------------------------------------
class PrescaleService(Service):
    """The HLT's prescale table, its column chosen per luminosity block (docs/PRESCALES.md)."""

    table = Param(str, doc="the prescale table (YAML): columns, default_column, prescales, "
                           "lumis")
    column = Param(str | None, None,
                   doc="the column in force before the table's first 'lumis' entry, instead "
                       "of its default_column")

    def __init__(self, **params: Any):
        super().__init__(**params)
        self.prescale_table = PrescaleTable.load(self.table)
        if self.column is not None and self.column not in self.prescale_table.columns:
            raise ConfigError(f"unknown column '{self.column}' (the columns of "
                              f"{self.table}: {', '.join(self.prescale_table.columns)})",
                              parameter="column", what="service")
        self.default_column = self.column or self.prescale_table.default_column
        self.current_column = self.default_column
        self._lock = threading.Lock()
        self._lumis: list[dict] = []

    # -- the prescalers -----------------------------------------------------------------------
    def check_workflow(self, workflow, modules: dict) -> None:
        """Warn about table rows that name no trigger path of the workflow (a typo would
        leave the real path unprescaled) and prescaled paths the table lacks."""
        paths = list(workflow.paths)
        for row in self.prescale_table.prescales:
            if row not in workflow.paths:
                near = difflib.get_close_matches(row, paths, n=1)
                hint = f" (did you mean '{near[0]}'?)" if near else ""
                log.warning("recorun: warning: %s: prescale table %s has a row for '%s', "
                            "which is no trigger path of the workflow%s", workflow.file,
                            self.table, row, hint)
        rows = list(self.prescale_table.prescales)
        for label, module in modules.items():
            if isinstance(module, HLTPrescaler) and module.trigger_path not in rows:
                near = difflib.get_close_matches(module.trigger_path, rows, n=1)
                hint = f" (did you mean '{near[0]}'?)" if near else ""
                log.warning("recorun: warning: %s: module '%s' (HLTPrescaler): path '%s' is "
                            "not in the prescale table %s%s: prescale 1 in every column",
                            workflow.file, label, module.trigger_path, self.table, hint)

    @staticmethod
    def path_of(prescaler: "HLTPrescaler", workflow) -> str:
        """The trigger path whose prescale ``prescaler`` applies: its ``path``, else the one
        trigger path it is on."""
        if prescaler.path:
            return prescaler.path
        on = [name for name, labels in workflow.paths.items() if prescaler.label in labels]
        if len(on) == 1:
            return on[0]
        where = ("is on no trigger path" if not on else
                 f"is on {len(on)} trigger paths ({', '.join(on)})")
        raise ConfigError(f"{where}: give the path whose prescale applies with its 'path' "
                          f"parameter", file=workflow.file, label=prescaler.label,
                          parameter="path")

    # -- luminosity blocks --------------------------------------------------------------------
    def begin_luminosity_block(self, lumi) -> None:
        column = self.prescale_table.column_for(lumi.run, lumi.luminosity_block,
                                                self.default_column)
        self.current_column = column
        with self._lock:
            self._lumis.append({"run": lumi.run, "luminosity_block": lumi.luminosity_block,
                                "column": column})

    def prescale(self, path: str) -> int:
        """``path``'s prescale in the column in force (1 for a path the table lacks)."""
        return self.prescale_table.prescale(path, self.current_column)

    def report(self) -> dict:
        with self._lock:
            lumis = [dict(x) for x in self._lumis]
        table = self.prescale_table
        return {"table": self.table, "columns": list(table.columns),
                "default_column": self.default_column,
                "prescales": {path: dict(zip(table.columns, row))
                              for path, row in table.prescales.items()},
                "lumis": lumis}


# -- the filter -------------------------------------------------------------------------------
class HLTPrescaler(Filter):
    """Accepts one event in N of each luminosity block, N the prescale of its trigger path in
    the column in force (a :class:`PrescaleService`); 0 accepts none. The events accepted are
    those whose event number plus ``offset`` is a multiple of N: one in N of a block of
    consecutively numbered events, the same events whatever the threads, streams and chunks.
    Put it first on its path."""

    concurrency = Concurrency.SHARED
    path = Param(str, "", doc="the trigger path whose prescale applies (\"\": the one trigger "
                              "path this module is on)")
    offset = Param(int, 0, doc="accept the events whose number n has "
                               "(n + offset) % prescale == 0")

    def __init__(self, label: str = "", **params: Any):
        super().__init__(label, **params)
        self.service: PrescaleService | None = None
        self.trigger_path: str | None = self.path or None    # else set by the service
        self._lock = threading.Lock()
        self._prescale = 1
        self._seen = self._accepted = 0
        self._lumis: list[dict] = []
        self._current: dict | None = None

    def check_workflow(self, workflow):
        """A PrescaleService, one trigger path, an offset of 0 or more: before the first
        event (and with ``recorun --check``)."""
        found = {label: s for label, s in self.services.items()
                 if isinstance(s, PrescaleService)}
        if not found:
            raise ConfigError("HLTPrescaler needs a PrescaleService in the workflow "
                              "(services: {prescales: {type: PrescaleService, table: "
                              "prescales.yaml}})", label=self.label)
        if len(found) > 1:
            raise ConfigError(f"the workflow has {len(found)} PrescaleServices "
                              f"({', '.join(found)}); HLTPrescaler needs exactly one",
                              label=self.label)
        if self.offset < 0:
            raise ConfigError(f"must be 0 or more, got {self.offset}", label=self.label,
                              parameter="offset")
        self.service = next(iter(found.values()))
        self.trigger_path = PrescaleService.path_of(self, workflow)

    def begin_luminosity_block(self, lumi):
        self._prescale = self.service.prescale(self.trigger_path)
        self._seen = self._accepted = 0
        self._current = {"run": lumi.run, "luminosity_block": lumi.luminosity_block,
                         "column": self.service.current_column, "prescale": self._prescale}

    def end_luminosity_block(self, lumi):
        if self._current is not None:
            self._lumis.append({**self._current, "seen": self._seen,
                                "accepted": self._accepted})
            self._current = None

    def filter(self, event) -> bool:
        n = self._prescale
        accept = n > 0 and (event.id.event + self.offset) % n == 0
        with self._lock:
            self._seen += 1
            if accept:
                self._accepted += 1
        return accept

    def report(self) -> dict | None:
        if self.service is None:             # never begun
            return None
        return {"path": self.trigger_path, "lumis": [dict(x) for x in self._lumis]}
