"""HCAL local reconstruction: rechits (ieta, iphi, depth, energy) from digis.

:class:`HcalSimpleReco` is the fast two-sample method: the pedestal-subtracted charge in the
sample of interest and the next one, over the pulse containment of those two samples, times
the channel's gain (see ``data/README.md`` for the pulse shape). It is blind to out-of-time
pileup, which the template fit of CMS's nominal reconstruction (MAHI) removes.

Gains and pedestals come from the digis' own ``gain`` and ``pedestal`` fields, or, with the
``calibrations`` parameter, from a conditions record (docs/CONDITIONS.md):
:class:`HcalChannelCalibrations` derives it from the ``HcalGains`` and ``HcalPedestals``
records, a :class:`HcalCalibrations` lookup by (ieta, iphi, depth) built once per IOV.
"""
from __future__ import annotations

import numpy as np

from recorun.data import hcal
from recorun import ConditionsProducer, Concurrency, InputTag, Param, Producer, Record

RECHIT_DTYPE = np.dtype([("ieta", "i2"), ("iphi", "i2"), ("depth", "i1"), ("energy", "f4")])


def rechits(digis: np.ndarray, energy: np.ndarray, threshold: float) -> np.ndarray:
    """Rechits of the channels whose energy (GeV) is at least ``threshold``."""
    keep = energy >= threshold
    hits = np.empty(int(np.count_nonzero(keep)), RECHIT_DTYPE)
    for field in ("ieta", "iphi", "depth"):
        hits[field] = np.compress(keep, digis[field])      # faster than digis[field][keep]
    hits["energy"] = np.compress(keep, energy)
    return hits


class HcalCalibrations:
    """Per-channel gain (GeV/fC) and pedestal (fC) by (ieta, iphi, depth): the payload of
    :class:`HcalChannelCalibrations`. Read-only, shared by every stream.

    ``lookup(ieta, iphi, depth)`` gives the channels' rows (vectorised: a dense index table
    over the coordinates' ranges); ``apply(digis)`` the digis with ``gain`` and ``pedestal``
    taken from here, for :func:`recorun.data.hcal.simple_energy` and the other algorithms."""

    FIELDS = ("ieta", "iphi", "depth")

    def __init__(self, ieta, iphi, depth, gain, pedestal):
        coords = [np.asarray(c, dtype=np.intp) for c in (ieta, iphi, depth)]
        self.gain = np.asarray(gain, dtype=np.float32)
        self.pedestal = np.asarray(pedestal, dtype=np.float32)
        n = len(self.gain)
        if any(len(c) != n for c in coords) or len(self.pedestal) != n or n == 0:
            raise ValueError(f"ieta, iphi, depth, gain and pedestal must have one value per "
                             f"channel, and at least one: lengths {[len(c) for c in coords]}, "
                             f"{n}, {len(self.pedestal)}")
        self._low = [int(c.min()) for c in coords]
        self._shape = [int(c.max()) - lo + 1 for c, lo in zip(coords, self._low)]
        # flat index (ieta * n_iphi + iphi) * n_depth + depth - offset into the dense table
        self._offset = (self._low[0] * self._shape[1] + self._low[1]) * self._shape[2] \
            + self._low[2]
        table = np.full(int(np.prod(self._shape)), -1, dtype=np.intp)
        table[self._flat(coords)] = np.arange(n)
        if np.count_nonzero(table >= 0) != n:
            raise ValueError("a channel (ieta, iphi, depth) appears twice")
        self._table = table
        for array in (self.gain, self.pedestal, self._table):
            array.flags.writeable = False

    def __len__(self) -> int:
        return len(self.gain)

    def _flat(self, coords) -> np.ndarray:
        flat = coords[0].astype(np.intp)             # in place from here: no temporaries
        flat *= self._shape[1]
        flat += coords[1]
        flat *= self._shape[2]
        flat += coords[2]
        flat -= self._offset
        return flat

    def lookup(self, ieta, iphi, depth) -> np.ndarray:
        """Rows of the channels ``(ieta, iphi, depth)`` (arrays); ValueError naming the first
        channel that has no calibration."""
        coords = [np.asarray(c) for c in (ieta, iphi, depth)]
        coords = [c if c.dtype.kind in "iu" else c.astype(np.intp) for c in coords]
        if not len(coords[0]):
            return np.empty(0, dtype=np.intp)
        for c, lo, size in zip(coords, self._low, self._shape):
            if c.min() < lo or c.max() >= lo + size:       # (the table would alias)
                self._missing(coords)
        rows = self._table[self._flat(coords)]
        if rows.min() < 0:
            self._missing(coords)
        return rows

    def _missing(self, coords) -> None:
        inside = np.ones(len(coords[0]), dtype=bool)
        for c, lo, size in zip(coords, self._low, self._shape):
            inside &= (c >= lo) & (c < lo + size)
        rows = np.full(len(inside), -1, dtype=np.intp)
        rows[inside] = self._table[self._flat([c[inside] for c in coords])]
        i = int(np.flatnonzero(rows < 0)[0])
        raise ValueError(f"no calibration for channel (ieta, iphi, depth) = "
                         f"{tuple(int(c[i]) for c in coords)} "
                         f"({np.count_nonzero(rows < 0)} channels without one)")

    def apply(self, digis) -> "CalibratedDigis":
        """``digis`` (a Collection, structured array or dict of per-channel arrays) with the
        ``gain`` and ``pedestal`` of this payload."""
        rows = self.lookup(*(digis[f] for f in self.FIELDS))
        return CalibratedDigis(digis, {"gain": self.gain[rows],
                                       "pedestal": self.pedestal[rows]})

    @classmethod
    def from_payloads(cls, gains, pedestals) -> "HcalCalibrations":
        """From an ``HcalGains`` payload (``ieta``, ``iphi``, ``depth``, ``gain``) and an
        ``HcalPedestals`` one (``ieta``, ``iphi``, ``depth``, ``pedestal``), whose channels may
        come in different orders but must be the same."""
        for what, payload, field in (("HcalGains", gains, "gain"),
                                     ("HcalPedestals", pedestals, "pedestal")):
            missing = [f for f in (*cls.FIELDS, field) if f not in payload]
            if missing:
                raise ValueError(f"the {what} payload has no {', '.join(missing)} (it has "
                                 f"{', '.join(payload) or 'nothing'})")
        gain = np.asarray(gains["gain"])
        calib = cls(*(gains[f] for f in cls.FIELDS), gain, np.zeros_like(gain))
        if len(pedestals["pedestal"]) != len(calib):
            raise ValueError(f"HcalGains has {len(calib)} channels, HcalPedestals "
                             f"{len(pedestals['pedestal'])}")
        rows = calib.lookup(*(pedestals[f] for f in cls.FIELDS))
        pedestal = np.empty(len(calib), dtype=np.float32)
        pedestal[rows] = pedestals["pedestal"]
        if len(np.unique(rows)) != len(rows):
            raise ValueError("HcalPedestals has a channel twice")
        return cls(*(gains[f] for f in cls.FIELDS), gain, pedestal)


class CalibratedDigis:
    """Digis whose ``gain`` and ``pedestal`` fields are replaced (``digis[field]`` reads
    either); what :meth:`HcalCalibrations.apply` returns."""

    __slots__ = ("_digis", "_fields")

    def __init__(self, digis, fields: dict[str, np.ndarray]):
        self._digis, self._fields = digis, fields

    def __getitem__(self, name: str):
        found = self._fields.get(name)
        return self._digis[name] if found is None else found

    def __len__(self) -> int:
        return len(self._digis)


class HcalChannelCalibrations(ConditionsProducer):
    """Derived conditions record: an :class:`HcalCalibrations` lookup from the gains and
    pedestals records, built once per IOV (of the two records' intersection)."""

    gains = Record("HcalGains", doc="per-channel 'gain' (GeV/fC) with 'ieta', 'iphi', 'depth'")
    pedestals = Record("HcalPedestals",
                       doc="per-channel 'pedestal' (fC) with 'ieta', 'iphi', 'depth'")

    def produce(self, records):
        return HcalCalibrations.from_payloads(records[self.gains], records[self.pedestals])


#: the ``calibrations`` parameter of the HCAL reconstructions
CALIBRATIONS_DOC = ("conditions record of per-channel gains and pedestals (an HcalCalibrations, "
                    "e.g. the derived record HcalChannelCalibrations); None: the digis' own "
                    "'gain' and 'pedestal' fields")


def calibrated(event, digis, record: str | None):
    """``digis`` with gains and pedestals from conditions record ``record`` (None: as they
    are)."""
    if record is None:
        return digis
    calibrations = event.record(record)
    if not isinstance(calibrations, HcalCalibrations):
        raise TypeError(f"conditions record '{record}' is a {type(calibrations).__name__}, "
                        f"not HcalCalibrations (derive it with HcalChannelCalibrations)")
    return calibrations.apply(digis)


class HcalSimpleReco(Producer):
    """HCAL rechits from ``HcalDigi`` digis with the two-sample method."""

    concurrency = Concurrency.SHARED
    digis = InputTag("source:HcalDigi", doc="HcalDigi collection (fields of data/README.md)")
    threshold = Param(float, 0.5, doc="rechits below this energy (GeV) are dropped")
    calibrations = Record(None, optional=True, doc=CALIBRATIONS_DOC)

    def produce(self, event):
        digis = event.get(self.digis)
        energy = hcal.simple_energy(calibrated(event, digis, self.calibrations))
        event.put(rechits(digis, energy, self.threshold))
