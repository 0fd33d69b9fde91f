"""How recorun lays arrays out in ROOT files, so that every layout it writes reads back.

uproot 5.7 writes a TTree branch of type ``var * K * float32`` (a variable number of
fixed-size entries per event) but cannot read it back. recorun therefore stores such an array
in a TTree as one flat jagged branch of ``n * K`` values per event, and records the inner
shape in a ``TObjString`` named :data:`SHAPES_KEY` holding JSON ``{branch: [K, ...]}``.
Readers reshape with :func:`restore_inner`. RNTuple stores these shapes natively and needs no
such entry. Anything else (flat numbers, ``var * number``, records of jagged fields sharing one
counter) is written as is.
"""
from __future__ import annotations

import json
import math

import awkward as ak
import numpy as np

SHAPES_KEY = "recorun_shapes"


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
    None for other layouts."""
    layout = array.layout
    if not layout.is_list or not isinstance(layout.content, ak.contents.RecordArray):
        return None
    layout = layout.to_ListOffsetArray64(True)
    record = layout.content
    fields = {}
    for name in record.fields:
        content = record.content(name)
        if not isinstance(content, ak.contents.NumpyArray) or content.data.ndim != 1:
            return None
        fields[name] = np.asarray(content.data)[:record.length]
    return fields, np.asarray(layout.offsets)
