"""How recorun lays arrays out in ROOT files, so that every layout it writes reads back.

uproot 5.7 writes a TTree branch of type ``var * K * float32`` (a variable number of
fixed-size entries per event) but cannot read it back. recorun therefore stores such an array
in a TTree as one flat jagged branch of ``n * K`` values per event, and records the inner
shape in a ``TObjString`` named :data:`SHAPES_KEY` holding JSON ``{branch: [K, ...]}``.
Readers reshape with :func:`restore_inner`. RNTuple stores these shapes natively and needs no
such entry. Anything else (flat numbers, ``var * number``, records of jagged fields sharing one
counter) is written as is.

A NanoAOD-style collection ``X`` (branches ``X_a``, ``X_b``... counted by ``nX``) whose field
``f`` has a fixed shape per entry (``var * K * float32``) cannot share the counter ``nX``: that
field is the flat jagged branch ``X_f`` with its own counter ``nX_f`` (``n * K`` values per
event), its shape recorded under ``X_f`` like any flattened branch.

Lists of strings per event: a TTree string branch (``char*``) holds one string per entry, and
uproot 5.7 cannot write ``var * string``; recorun writes each event's list as JSON text
(``["a", "b"]``, :func:`encode_string_list`) in a string branch and lists those branches in a
``TObjString`` named :data:`STRING_LISTS_KEY` (JSON ``[branch, ...]``); readers decode with
:func:`decode_string_list`. RNTuple stores ``var * string`` natively.

Branch names (:func:`safe_name`): letters, digits and ``_`` only, so that ROOT and uproot read
them back as plain names (``.``, ``/``, ``[`` and ``:`` mean something to both).
"""
from __future__ import annotations

import json
import math
import re

import awkward as ak
import numpy as np

SHAPES_KEY = "recorun_shapes"
STRING_LISTS_KEY = "recorun_string_lists"

_DIMENSIONS = re.compile(r"(\[\d*\])+$")
_UNSAFE = re.compile(r"[^A-Za-z0-9_]")


def safe_name(text: str) -> str:
    """The branch (or field) name recorun writes for ``text``: a trailing dimension suffix
    ``[N]`` (or ``[N][M]``...) is dropped, since the array's shape carries it; every other
    character that is not a letter, a digit or ``_`` becomes ``_``; a name that would start
    with a digit (or be empty) gets a leading ``_``. ``Jet.FracPt[5]`` -> ``Jet_FracPt``,
    ``a/b:c`` -> ``a_b_c``."""
    name = _UNSAFE.sub("_", _DIMENSIONS.sub("", text))
    return name if name and not name[0].isdigit() else f"_{name}"


def branch_name(tag: str) -> str:
    """The branch of product ``label:instance`` (``label`` alone for the default instance):
    :func:`safe_name` of ``label_instance``."""
    label, _, instance = tag.partition(":")
    return safe_name(f"{label}_{instance}" if instance else label)


def inner_shape(array: ak.Array) -> tuple[int, ...]:
    """The fixed inner dimensions of a ``var * K * M * number`` array (``()`` for others)."""
    shape: list[int] = []
    layout = array.layout
    if not layout.is_list:
        return ()
    layout = layout.content
    while isinstance(layout, ak.contents.RegularArray):
        shape.append(layout.size)
        layout = layout.content
    if not isinstance(layout, ak.contents.NumpyArray):
        return ()
    return tuple(shape) + tuple(layout.data.shape[1:])


def flatten_inner(array: ak.Array) -> tuple[ak.Array, tuple[int, ...]]:
    """``var * K * M * T`` -> (``var * T`` with K*M values per entry, ``(K, M)``)."""
    shape = inner_shape(array)
    if not shape:
        return array, ()
    counts = ak.num(array, axis=1)
    flat = ak.flatten(array, axis=None)
    return ak.unflatten(flat, counts * math.prod(shape)), shape


def restore_inner(array: ak.Array, shape) -> ak.Array:
    """Inverse of :func:`flatten_inner`."""
    if not shape:
        return array
    size = math.prod(shape)
    counts = ak.num(array, axis=1) // size
    values = ak.flatten(array, axis=None)
    for dim in reversed(shape):
        values = ak.to_regular(ak.unflatten(values, dim), axis=1)
    return ak.unflatten(values, counts)


def write_shapes(file, shapes: dict[str, tuple[int, ...]]) -> None:
    """Record the inner shapes of flattened branches in an open, writable uproot file."""
    if shapes:
        file[SHAPES_KEY] = json.dumps({name: list(s) for name, s in shapes.items()})


def read_shapes(file) -> dict[str, tuple[int, ...]]:
    """The inner shapes recorded in an open uproot file (empty when there are none)."""
    if SHAPES_KEY not in file:
        return {}
    return {name: tuple(s) for name, s in json.loads(str(file[SHAPES_KEY])).items()}


def encode_string_list(strings) -> str:
    """One event's list of strings as the text of a TTree string branch (JSON)."""
    return json.dumps(list(strings), ensure_ascii=False)


def decode_string_list(text: str) -> list[str]:
    """Inverse of :func:`encode_string_list`."""
    return json.loads(text)


def write_string_lists(file, names) -> None:
    """Record which string branches hold JSON-encoded lists of strings (TTree only)."""
    if names:
        file[STRING_LISTS_KEY] = json.dumps(sorted(names))


def read_string_lists(file) -> set[str]:
    """The string branches of an open uproot file that hold lists of strings (empty: none)."""
    if STRING_LISTS_KEY not in file:
        return set()
    return set(json.loads(str(file[STRING_LISTS_KEY])))


def per_event_numpy(array: ak.Array, shape=()) -> tuple[np.ndarray, np.ndarray] | None:
    """For a ``var * number`` array (optionally with a flattened inner shape), the contiguous
    values and the offsets, so that entry i is ``values[offsets[i]:offsets[i+1]]`` reshaped to
    ``(-1, *shape)`` without copying. None for other layouts."""
    layout = array.layout
    if not layout.is_list:
        return None
    layout = layout.to_ListOffsetArray64(True)
    offsets = np.asarray(layout.offsets)
    content, inner = layout.content, []
    while isinstance(content, ak.contents.RegularArray):    # var * K * ... (RNTuple, awkward)
        inner.append(content.size)
        content = content.content
    if not isinstance(content, ak.contents.NumpyArray):
        return None
    values = np.asarray(content.data)
    if inner or values.ndim > 1:          # fixed inner dimensions already in the layout
        if shape:
            return None
        inner_shape_ = (*inner, *values.shape[1:])
        return values.reshape(-1)[:offsets[-1] * math.prod(inner_shape_)].reshape(
            -1, *inner_shape_), offsets
    if shape:
        size = math.prod(shape)
        return values.reshape(-1, *shape), offsets // size
    return values, offsets


def per_event_fields(array: ak.Array) -> tuple[dict[str, np.ndarray], np.ndarray] | None:
    """For a ``var * {field: number, ...}`` array, the contiguous values of each field and the
    offsets (entry i of field f is ``values[f][offsets[i]:offsets[i+1]]``), without copying.
    A field of fixed-size entries (``var * {f: 5 * float32}``) comes as an ``(n, 5)`` array.
    None for other layouts."""
    layout = array.layout
    if not layout.is_list or not isinstance(layout.content, ak.contents.RecordArray):
        return None
    layout = layout.to_ListOffsetArray64(True)
    record = layout.content
    fields = {}
    for name in record.fields:
        values = fixed_size_numpy(record.content(name))
        if values is None:
            return None
        fields[name] = values[:record.length]
    return fields, np.asarray(layout.offsets)


def fixed_size_numpy(layout) -> np.ndarray | None:
    """The NumPy array of a layout of numbers or of fixed-size arrays of numbers (``N * 5 *
    float32``: shape ``(N, 5)``), without copying; None for other layouts."""
    length, inner = layout.length, []
    while isinstance(layout, ak.contents.RegularArray):
        inner.append(layout.size)
        layout = layout.content
    if not isinstance(layout, ak.contents.NumpyArray) or layout.parameter("__array__"):
        return None
    values = np.asarray(layout.data)
    if not inner:
        return values
    shape = (*inner, *values.shape[1:])
    return values.reshape(-1)[:length * math.prod(shape)].reshape(length, *shape)
