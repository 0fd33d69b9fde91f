"""A collection product: one event's entries stored as one NumPy array per field.

Readers hand out collections (NanoAOD's ``Jet_pt``, ``Jet_eta``... counted by ``nJet``) as
:class:`Collection` views into the chunk they read, so no event's data is copied::

    jets = event.get("source:Jet")
    len(jets)                 # entries
    jets["pt"]                # one field, a NumPy array
    jets[jets["pt"] > 30]     # a selection, another Collection
    jets.to_numpy()           # a structured NumPy array (a copy)

It reads like a structured NumPy array (``c["field"]``, ``len``, ``c.dtype.names``), so code
written for either works with both.
"""
from __future__ import annotations

import numpy as np


class Collection:
    __slots__ = ("_columns", "_size")

    def __init__(self, columns: dict[str, np.ndarray]):
        sizes = {len(v) for v in columns.values()}
        if len(sizes) > 1:
            raise ValueError(f"fields of different lengths: "
                             f"{ {k: len(v) for k, v in columns.items()} }")
        self._columns = columns
        self._size = sizes.pop() if sizes else 0

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(self._columns)

    @property
    def dtype(self) -> np.dtype:
        """The structured dtype the fields would have together."""
        return np.dtype([(name, values.dtype, values.shape[1:])
                         for name, values in self._columns.items()])

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, key):
        if isinstance(key, str):
            return self._columns[key]
        return Collection({name: values[key] for name, values in self._columns.items()})

    def to_numpy(self) -> np.ndarray:
        out = np.empty(self._size, self.dtype)
        for name, values in self._columns.items():
            out[name] = values
        return out

    def __repr__(self) -> str:
        return f"<Collection of {self._size} entries, fields {list(self._columns)}>"
