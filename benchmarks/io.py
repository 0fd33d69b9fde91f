"""ROOT I/O throughput: RootSource against plain uproot, and RootOutput's write speed.

    .venv/bin/python benchmarks/io.py [--hlt-events N] [--hlt-channels C] [--hlt-step-size S]
                                      [--events M] [--step-size T] [--repeats R]

Two inputs are generated once into a temporary directory, and each is read two ways:

**HLT events** (the primary figure, ``source_vs_uproot``): ``recorun-gen hlt`` (``python -m
recorun.data.generate hlt PATH --events N --channels C``; defaults N = 300, C = 4500: HCAL digis and
ECAL electrons per event, TTree, ZSTD(1), one basket per branch per ~48 MB generated: every
142 events at 4500 channels). Only the HCAL digis are read: the NanoAOD-style collection
``HcalDigi`` (16 jagged branches ``HcalDigi_<field>``, fields ``ieta, iphi, depth, subdet,
gain, pedestal, noise, q0..q7, trueEnergy``, counted by ``nHcalDigi``), plus ``run``,
``luminosityBlock``, ``event``.

* (a) plain uproot: ``uproot.iterate`` over those 19 branches with ``step_size`` S (default
  100); for each chunk every field's values and offsets are taken once (awkward layout ->
  NumPy, no copy), then for every event a Python loop adds ``run + luminosityBlock + event``
  and, for each of the 16 fields, slices the field by the offsets and adds the slice length
  and its first value to a running checksum.
* (b) RootSource (threads 1, streams 1, the same ``step_size`` S, prefetch on, the default)
  feeding one analyzer that consumes ``source:HcalDigi`` (the collection: one structured
  NumPy array per event, a slice of the chunk's records) and adds the same terms per event:
  the event ID's three numbers and, for each of the 16 fields, ``len(digis[field])`` and
  ``digis[field][0]``. RootSource reads the same 19 branches (checked in the job report),
  zips the collection into one structured array per chunk, and pays the framework: an Event
  per entry, the scheduler, the module call.

**Small toy events** (``source_vs_uproot_small_events``; this case shows the framework's fixed
per-event cost, since there is little data per event): ``M`` events (default 5000) of the toy
calorimeter (``ToyCaloHitProducer``: ~500-600 hits per event; ``CaloTowerProducer``: the tower
grid) written by ``RootOutput`` (TTree, ZSTD(1)) through ``run_workflow`` on an
``EmptySource``. Branches: the hits as a NanoAOD-style collection (``nhits``; jagged
``hits_energy`` float32, ``hits_ieta``, ``hits_iphi`` int16) and flat ``sumet`` (float32),
``ntowers`` (int32), ``maxet`` (float32), plus ``run``, ``luminosityBlock``, ``event``.

* (a) plain uproot: ``uproot.iterate`` over ``run, luminosityBlock, event, hits_energy,
  hits_ieta, sumet, ntowers, maxet`` with ``step_size`` T (default 1000); for each chunk the
  jagged branches' values and offsets are taken once, then for every event a Python loop
  builds its ID tuple, slices ``hits_energy`` and ``hits_ieta`` by the offsets and reads the
  three scalars, and adds the slice length and the scalars to a running checksum.
* (b) RootSource (threads 1, streams 1, ``step_size`` T, prefetch on) feeding one trivial
  analyzer that consumes ``source:hits_energy``, ``source:hits_ieta``, ``source:sumet``,
  ``source:ntowers``, ``source:maxet`` and adds the same checksum terms per event.

On both inputs the two sides' checksums (and event counts) must agree.

**RootSource's own cost per event** (``source_own_us_per_event``), on the small input:
RootSource alone, outside any job (``select_products`` of the five products, ``open``, then
``next_event`` until the end, prefetch off so that everything runs on the timed thread), minus
plain ``uproot.iterate`` over the same eight branches with nothing done per event and the same
file handler (RootSource reads local files through a memory map, ``uproot.MemmapSource``),
over the number of events: what RootSource adds to reading (per-event products and the
Event). The plain uproot loops (a) use uproot's default handler, as a user's loop would.

**Writing** (RootOutput: TTree, ZSTD(1), ``flush_events`` 1000; the time is the whole job,
file close included): a job on an EmptySource whose only producer hands out products
prepared in memory before the timing, written by RootOutput.

* (c) small events: the hits as a structured NumPy array and the three scalars per event,
  taken from the small input file (``output_events_per_s``, ``output_mb_per_s``);
* (d) HLT events: the ``HcalDigi`` collection (one structured NumPy array of the 16 fields
  per event) taken from the HLT input file (``output_hlt_events_per_s``,
  ``output_hlt_mb_per_s``).

For scale, plain uproot writing the same columns (``mktree`` + ``extend`` 1000 events at a
time, ZSTD(1)) is timed too, for both (``output_vs_uproot_write``,
``output_hlt_vs_uproot_write``: plain uproot's time over the whole job's).

Those whole-job figures include the framework's per-event cost (source, scheduler, the Replay
producer, the output module's call). **RootOutput alone** (``output_own_vs_uproot_write``,
``output_hlt_own_vs_uproot_write``: plain uproot's time over RootOutput's; ``output_own_s``,
``output_hlt_own_s``) is RootOutput driven directly, outside a job: ``begin_job``, ``write``
of each event (Events made in memory before the timing, holding the same products), then
``end_job`` (file close and rename included): its own work of gathering per-event products
into columns and writing them.

Each measurement runs ``--repeats`` times (default 3), interleaved (HLT a, b, small a, b, then
c, d and the plain writes; again...), after one untimed warm-up read of each input by each
side; the best time of each is reported. MB/s is compressed bytes over the time: for the HLT
reads, the compressed size of the 19 branches read (the file also holds the electrons,
which are not read); for the small-event reads, the whole file's size (as before); for
writes, the size of the file written. The last line is one line of JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import awkward as ak  # noqa: E402
import numpy as np  # noqa: E402
import uproot  # noqa: E402

from recorun.modules.root_output import RootOutput  # noqa: E402
from recorun.modules.root_source import RootSource  # noqa: E402
from recorun import (Analyzer, Concurrency, Event, EventID, InputTag, Param,  # noqa: E402
                     Producer, run_workflow)

ID_BRANCHES = ["run", "luminosityBlock", "event"]
BRANCHES = [*ID_BRANCHES, "hits_energy", "hits_ieta", "sumet", "ntowers", "maxet"]
DIGI = "HcalDigi"
DIGI_FIELDS = ["ieta", "iphi", "depth", "subdet", "gain", "pedestal", "noise",
               *(f"q{i}" for i in range(8)), "trueEnergy"]
HLT_BRANCHES = [*ID_BRANCHES, *(f"{DIGI}_{f}" for f in DIGI_FIELDS)]


# ------------------------------------------------------------------------------ modules
class TowerSums(Producer):
    """Sum of tower ET, number of towers above threshold, highest tower ET."""

    concurrency = Concurrency.SHARED
    produces = ("sumet", "ntowers", "maxet")
    towers = InputTag("towers")

    def produce(self, event):
        towers = event.get(self.towers)
        et = towers["et"] if towers.dtype.names else towers      # towers list or ET grid
        event.put(np.float32(et.sum()), "sumet")
        event.put(np.int32(np.count_nonzero(et)), "ntowers")
        event.put(np.float32(et.max()), "maxet")


class Checksum(Analyzer):
    """Trivial per-event access: number of hits plus the three scalars."""

    concurrency = Concurrency.SHARED
    energy = InputTag("source:hits_energy")
    ieta = InputTag("source:hits_ieta")
    sumet = InputTag("source:sumet")
    ntowers = InputTag("source:ntowers")
    maxet = InputTag("source:maxet")
    box = Param(object, doc="a Box collecting the checksum")

    def analyze(self, event):
        energy, ieta = event.get(self.energy), event.get(self.ieta)
        self.box.add(len(energy) + len(ieta) + float(event.get(self.sumet))
                     + int(event.get(self.ntowers)) + float(event.get(self.maxet))
                     + event.id.event)


def _touch(values) -> float:
    """The checksum term of one field of one event: its length plus its first value."""
    return len(values) + (float(values[0]) if len(values) else 0.0)


class DigiChecksum(Analyzer):
    """Per-event access to every field of the HCAL digis: length and first value of each."""

    concurrency = Concurrency.SHARED
    digis = InputTag(f"source:{DIGI}")
    box = Param(object, doc="a Box collecting the checksum")

    def analyze(self, event):
        digis = event.get(self.digis)
        run, lumi, number = event.id
        total = float(run + lumi + number)
        for field in DIGI_FIELDS:
            total += _touch(digis[field])
        self.box.add(total)


class Box:
    """A running sum shared by every copy of a module (returned by deepcopy as itself)."""

    def __init__(self):
        self.total = 0.0

    def __deepcopy__(self, memo):
        return self

    def add(self, value):
        self.total += value


class Replay(Producer):
    """Hands out the products of event number ``event`` prepared in memory before the job."""

    concurrency = Concurrency.SHARED
    produces = ("hits", "sumet", "ntowers", "maxet")
    store = Param(object, doc="{event number: (hits, sumet, ntowers, maxet)}")

    def produce(self, event):
        hits, sumet, ntowers, maxet = self.store.data[event.id.event]
        event.put(hits, "hits")
        event.put(sumet, "sumet")
        event.put(ntowers, "ntowers")
        event.put(maxet, "maxet")


class ReplayDigis(Producer):
    """Hands out the HCAL digis of event number ``event`` prepared in memory before the job."""

    concurrency = Concurrency.SHARED
    produces = (DIGI,)
    store = Param(object, doc="{event number: structured array of digis}")

    def produce(self, event):
        event.put(self.store.data[event.id.event], DIGI)


class Store:
    def __init__(self, data):
        self.data = data

    def __deepcopy__(self, memo):
        return self


# ------------------------------------------------------------------------------ inputs
def generate(path: str, events: int) -> float:
    start = time.perf_counter()
    result = run_workflow({
        "process": {"threads": 2, "streams": 2, "report_every_s": 0},
        "source": {"type": "EmptySource", "count": events},
        "modules": {
            "hits": {"type": "ToyCaloHitProducer", "seed": 2024},
            "towers": {"type": "CaloTowerProducer", "hits": "hits"},
            "sums": {"type": TowerSums},
            "out": {"type": "RootOutput", "file": path, "compression": "zstd:1",
                    "products": ["hits", "sums:sumet", "sums:ntowers", "sums:maxet"],
                    "rename": {"sums:sumet": "sumet", "sums:ntowers": "ntowers",
                               "sums:maxet": "maxet"}}},
        "endpaths": {"e": ["out"]}})
    if result.exit_code != 0:
        raise SystemExit(f"generating the input failed: {result.error}")
    return time.perf_counter() - start


def generate_hlt(path: str, events: int, channels: int) -> float:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "recorun.data.generate", "hlt", path, "--events",
                           str(events), "--channels", str(channels), "-q"], check=False,
                          capture_output=True, text=True)
    if proc.returncode != 0 or not os.path.exists(path):
        raise SystemExit(f"recorun-gen hlt failed ({proc.returncode}): {proc.stderr.strip()}")
    return time.perf_counter() - start


def _values_offsets(array: ak.Array) -> tuple[np.ndarray, np.ndarray]:
    layout = array.layout.to_ListOffsetArray64(True)
    return np.asarray(layout.content.data), np.asarray(layout.offsets)


# ------------------------------------------------------------------------------ reading
def read_uproot(path: str, step_size: int) -> tuple[float, float, int]:
    start = time.perf_counter()
    total, n = 0.0, 0
    for chunk in uproot.iterate(f"{path}:Events", BRANCHES, step_size=step_size,
                                library="ak"):
        run, lumi, number = (ak.to_numpy(chunk[b]) for b in BRANCHES[:3])
        energy, energy_off = _values_offsets(chunk["hits_energy"])
        ieta, ieta_off = _values_offsets(chunk["hits_ieta"])
        sumet, ntowers, maxet = (ak.to_numpy(chunk[b]) for b in BRANCHES[5:])
        for i in range(len(run)):
            event_id = (int(run[i]), int(lumi[i]), int(number[i]))
            e = energy[energy_off[i]:energy_off[i + 1]]
            ie = ieta[ieta_off[i]:ieta_off[i + 1]]
            total += (len(e) + len(ie) + float(sumet[i]) + int(ntowers[i]) + float(maxet[i])
                      + event_id[2])
            n += 1
    return time.perf_counter() - start, total, n


def read_source(path: str, step_size: int) -> tuple[float, float, int]:
    box = Box()
    start = time.perf_counter()
    result = run_workflow({
        "process": {"threads": 1, "streams": 1, "report_every_s": 0},
        "source": {"type": "RootSource", "files": path, "step_size": step_size},
        "modules": {"check": {"type": Checksum, "box": box}},
        "paths": {"p": ["check"]}})
    elapsed = time.perf_counter() - start
    if result.exit_code != 0:
        raise SystemExit(f"RootSource job failed: {result.error}")
    branches = result.report["source"]["branches"]
    assert sorted(branches) == sorted(BRANCHES), branches        # only these were read
    return elapsed, box.total, result.report["events"]["read"]


SMALL_TAGS = {f"source:{b}" for b in BRANCHES[3:]}


def source_alone(path: str, step_size: int) -> float:
    """RootSource's ``next_event`` over the whole input (prefetch off), outside a job."""
    source = RootSource(files=path, step_size=step_size, prefetch=False)
    source.select_products(SMALL_TAGS)
    start = time.perf_counter()
    source.open(None)
    index = 0
    while source.next_event(index) is not None:
        index += 1
    elapsed = time.perf_counter() - start
    source.close()
    return elapsed


def iterate_alone(path: str, step_size: int) -> float:
    """Plain ``uproot.iterate`` over the same branches, nothing done per event, through the
    same file handler as RootSource (a memory map)."""
    start = time.perf_counter()
    for _ in uproot.iterate(f"{path}:Events", BRANCHES, step_size=step_size, library="ak",
                            handler=uproot.MemmapSource):
        pass
    return time.perf_counter() - start


def read_uproot_hlt(path: str, step_size: int) -> tuple[float, float, int]:
    start = time.perf_counter()
    total, n = 0.0, 0
    for chunk in uproot.iterate(f"{path}:Events", HLT_BRANCHES, step_size=step_size,
                                library="ak"):
        run, lumi, number = (ak.to_numpy(chunk[b]) for b in ID_BRANCHES)
        columns = [_values_offsets(chunk[f"{DIGI}_{f}"]) for f in DIGI_FIELDS]
        for i in range(len(run)):
            event_total = float(int(run[i]) + int(lumi[i]) + int(number[i]))
            for values, offsets in columns:
                event_total += _touch(values[offsets[i]:offsets[i + 1]])
            total += event_total
            n += 1
    return time.perf_counter() - start, total, n


def source_hlt_config(path: str, step_size: int, box: Box) -> dict:
    return {"process": {"threads": 1, "streams": 1, "report_every_s": 0},
            "source": {"type": "RootSource", "files": path, "step_size": step_size},
            "modules": {"check": {"type": DigiChecksum, "box": box}},
            "paths": {"p": ["check"]}}


def read_source_hlt(path: str, step_size: int) -> tuple[float, float, int]:
    box = Box()
    start = time.perf_counter()
    result = run_workflow(source_hlt_config(path, step_size, box))
    elapsed = time.perf_counter() - start
    if result.exit_code != 0:
        raise SystemExit(f"RootSource job (HLT) failed: {result.error}")
    branches = result.report["source"]["branches"]
    assert sorted(branches) == sorted(HLT_BRANCHES), branches    # only these were read
    return elapsed, box.total, result.report["events"]["read"]


# ------------------------------------------------------------------------------ writing
def hit_fields(tree) -> list[str]:
    """Fields of the hits collection (branches hits_<field>)."""
    return [k[len("hits_"):] for k in tree.keys() if k.startswith("hits_")]


def _records(arrays, prefix: str, fields: list[str]) -> tuple[list[np.ndarray], np.ndarray]:
    """Per event, one structured array of the collection ``prefix`` (branches prefix_<f>)."""
    counts = ak.to_numpy(ak.num(arrays[f"{prefix}_{fields[0]}"]))
    cuts = np.cumsum(counts)[:-1]
    flat = {f: np.split(ak.to_numpy(ak.flatten(arrays[f"{prefix}_{f}"])), cuts)
            for f in fields}
    dtype = np.dtype([(f, flat[f][0].dtype) for f in fields])
    out = []
    for i in range(len(counts)):
        records = np.empty(counts[i], dtype)
        for field in fields:
            records[field] = flat[field][i]
        out.append(records)
    return out, counts


def prepared_products(path: str) -> dict:
    tree = uproot.open(path)["Events"]
    fields = hit_fields(tree)
    arrays = tree.arrays(["event", "sumet", "ntowers", "maxet", *(f"hits_{f}" for f in fields)])
    hits, _ = _records(arrays, "hits", fields)
    data = {}
    for i, number in enumerate(ak.to_numpy(arrays["event"])):
        data[int(number)] = (hits[i], np.float32(arrays["sumet"][i]),
                             np.int32(arrays["ntowers"][i]), np.float32(arrays["maxet"][i]))
    return data


def prepared_digis(path: str) -> dict:
    arrays = uproot.open(path)["Events"].arrays(["event", *HLT_BRANCHES[3:]])
    digis, _ = _records(arrays, DIGI, DIGI_FIELDS)
    return {int(number): digis[i] for i, number in enumerate(ak.to_numpy(arrays["event"]))}


def _run_job(events: int, modules: dict, **sequences) -> float:
    start = time.perf_counter()
    result = run_workflow({
        "process": {"threads": 1, "streams": 1, "report_every_s": 0},
        "source": {"type": "EmptySource", "count": events},
        "modules": modules, **sequences})
    elapsed = time.perf_counter() - start
    if result.exit_code != 0:
        raise SystemExit(f"job {sorted(modules)} failed: {result.error}")
    return elapsed


def _run_output(path: str, events: int, modules: dict) -> float:
    if os.path.exists(path):
        os.remove(path)
    elapsed = _run_job(events, modules, endpaths={"e": ["out"]})
    if not os.path.exists(path):
        raise SystemExit(f"RootOutput did not write {path}")
    return elapsed


def output_alone(path: str, events: list, products: list[str]) -> float:
    """RootOutput driven directly over ``events`` (Events prepared in memory): its own cost."""
    if os.path.exists(path):
        os.remove(path)
    output = RootOutput("out", file=path, compression="zstd:1", flush_events=1000,
                        products=[f"replay:{p}" for p in products],
                        rename={f"replay:{p}": p for p in products})
    start = time.perf_counter()
    output.begin_job()
    for event in events:
        output.write(event)
    output.job_complete = True
    output.end_job()
    return time.perf_counter() - start


def replayed_events(store: Store, products: list[str]) -> list:
    """The Replay producers' products as Events, in event-number order."""
    events = []
    for index, number in enumerate(sorted(store.data)):
        values = store.data[number]
        values = values if isinstance(values, tuple) else (values,)
        events.append(Event(EventID(1, 1, number), index,
                            {f"replay:{p}": v for p, v in zip(products, values)}))
    return events


def write_output(path: str, store: Store, events: int) -> float:
    return _run_output(path, events, {
        "replay": {"type": Replay, "store": store},
        "out": {"type": "RootOutput", "file": path, "compression": "zstd:1",
                "flush_events": 1000,
                "products": ["replay:hits", "replay:sumet", "replay:ntowers", "replay:maxet"],
                "rename": {"replay:hits": "hits", "replay:sumet": "sumet",
                           "replay:ntowers": "ntowers", "replay:maxet": "maxet"}}})


def write_output_hlt(path: str, store: Store, events: int) -> float:
    return _run_output(path, events, {
        "replay": {"type": ReplayDigis, "store": store},
        "out": {"type": "RootOutput", "file": path, "compression": "zstd:1",
                "flush_events": 1000, "products": [f"replay:{DIGI}"],
                "rename": {f"replay:{DIGI}": DIGI}}})


def write_uproot(path: str, columns: dict, events: int) -> float:
    if os.path.exists(path):
        os.remove(path)
    start = time.perf_counter()
    with uproot.recreate(path, compression=uproot.ZSTD(1)) as f:
        tree = f.mktree("Events", {k: (v.type.content if isinstance(v, ak.Array) else v.dtype)
                                   for k, v in columns.items()})
        for s in range(0, events, 1000):
            tree.extend({k: v[s:s + 1000] for k, v in columns.items()})
    return time.perf_counter() - start


# ------------------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hlt-events", type=int, default=300,
                        help="HLT events (recorun-gen hlt; default 300)")
    parser.add_argument("--hlt-channels", type=int, default=4500,
                        help="HCAL channels per HLT event (default 4500)")
    parser.add_argument("--hlt-step-size", type=int, default=100,
                        help="step_size of both readers on the HLT input (default 100)")
    parser.add_argument("--events", type=int, default=5000, help="small toy events")
    parser.add_argument("--step-size", type=int, default=1000,
                        help="step_size of both readers on the small-event input")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="recorun-io-") as tmp:
        # -- HLT input
        hlt_path = os.path.join(tmp, "hlt.root")
        hlt_gen_s = generate_hlt(hlt_path, args.hlt_events, args.hlt_channels)
        hlt_tree = uproot.open(hlt_path)["Events"]
        hlt_n = hlt_tree.num_entries
        hlt_read_bytes = sum(hlt_tree[b].compressed_bytes for b in HLT_BRANCHES)
        hlt_raw_bytes = sum(hlt_tree[b].uncompressed_bytes for b in HLT_BRANCHES)
        hlt_size = os.path.getsize(hlt_path)
        channels = ak.to_numpy(hlt_tree[f"n{DIGI}"].array())
        print(f"HLT input: {hlt_n} events, {channels.mean():.0f} HCAL channels per event, "
              f"{hlt_size / 1e6:.2f} MB file (TTree, ZSTD(1)); the {len(HLT_BRANCHES)} branches "
              f"read: {hlt_read_bytes / 1e6:.2f} MB compressed, {hlt_raw_bytes / 1e6:.2f} MB "
              f"uncompressed; generated in {hlt_gen_s:.1f} s")

        # -- small-event input
        path = os.path.join(tmp, "toy_calo.root")
        gen_s = generate(path, args.events)
        size = os.path.getsize(path)
        n_entries = uproot.open(path)["Events"].num_entries
        hits = ak.to_numpy(uproot.open(path)["Events"]["nhits"].array())
        print(f"small input: {n_entries} events, {hits.mean():.0f} hits per event on average, "
              f"{size / 1e6:.2f} MB (TTree, ZSTD(1)), generated in {gen_s:.1f} s")

        # -- products to write, prepared in memory
        store = Store(prepared_products(path))
        digi_store = Store(prepared_digis(hlt_path))
        out_path = os.path.join(tmp, "written.root")
        ref_path = os.path.join(tmp, "uproot_written.root")
        hlt_out_path = os.path.join(tmp, "written_hlt.root")
        hlt_ref_path = os.path.join(tmp, "uproot_written_hlt.root")
        alone_path = os.path.join(tmp, "alone.root")
        small_events = replayed_events(store, list(Replay.produces))
        hlt_events = replayed_events(digi_store, [DIGI])
        src = uproot.open(path)["Events"].arrays()
        columns = {"run": ak.to_numpy(src["run"]), "luminosityBlock":
                   ak.to_numpy(src["luminosityBlock"]), "event": ak.to_numpy(src["event"]),
                   "hits": ak.zip({f: src[f"hits_{f}"]
                                   for f in hit_fields(uproot.open(path)["Events"])}),
                   "sumet": ak.to_numpy(src["sumet"]), "ntowers": ak.to_numpy(src["ntowers"]),
                   "maxet": ak.to_numpy(src["maxet"])}
        hsrc = hlt_tree.arrays(HLT_BRANCHES)
        hlt_columns = {**{b: ak.to_numpy(hsrc[b]) for b in ID_BRANCHES},
                       DIGI: ak.zip({f: hsrc[f"{DIGI}_{f}"] for f in DIGI_FIELDS})}
        del hsrc, src

        # -- warm-up: page cache, imports
        read_uproot_hlt(hlt_path, args.hlt_step_size)
        read_source_hlt(hlt_path, args.hlt_step_size)
        read_uproot(path, args.step_size)
        read_source(path, args.step_size)

        names = ["uproot", "source", "uproot_small", "source_small", "source_alone",
                 "iterate_alone", "output", "output_alone", "uproot_write", "output_hlt",
                 "output_alone_hlt",
                 "uproot_write_hlt"]
        times: dict[str, list[float]] = {k: [] for k in names}
        checksums: dict[str, set] = {"hlt": set(), "small": set()}
        for _ in range(args.repeats):
            for key, reader, case, p, step in (
                    ("uproot", read_uproot_hlt, "hlt", hlt_path, args.hlt_step_size),
                    ("source", read_source_hlt, "hlt", hlt_path, args.hlt_step_size),
                    ("uproot_small", read_uproot, "small", path, args.step_size),
                    ("source_small", read_source, "small", path, args.step_size)):
                t, total, n = reader(p, step)
                times[key].append(t)
                checksums[case].add((round(total, 3), n))
            times["source_alone"].append(source_alone(path, args.step_size))
            times["iterate_alone"].append(iterate_alone(path, args.step_size))
            times["output"].append(write_output(out_path, store, n_entries))
            times["output_alone"].append(output_alone(alone_path, small_events,
                                                      list(Replay.produces)))
            times["uproot_write"].append(write_uproot(ref_path, columns, n_entries))
            times["output_hlt"].append(write_output_hlt(hlt_out_path, digi_store, hlt_n))
            times["output_alone_hlt"].append(output_alone(alone_path, hlt_events, [DIGI]))
            times["uproot_write_hlt"].append(write_uproot(hlt_ref_path, hlt_columns, hlt_n))
        for case, found in checksums.items():
            if len(found) != 1:
                raise SystemExit(f"the two readers disagree on the {case} input: {found}")
        written = uproot.open(out_path)["Events"]
        assert written.num_entries == n_entries and "hits_energy" in written.keys()
        written = uproot.open(hlt_out_path)["Events"]
        assert written.num_entries == hlt_n and all(
            f"{DIGI}_{f}" in written.keys() for f in DIGI_FIELDS)
        out_size, ref_size = os.path.getsize(out_path), os.path.getsize(ref_path)
        hlt_out_size = os.path.getsize(hlt_out_path)
        hlt_ref_size = os.path.getsize(hlt_ref_path)

    best = {k: min(v) for k, v in times.items()}
    own, own_hlt = best["output_alone"], best["output_alone_hlt"]
    every = ", ".join(f"{k} " + "/".join(f"{x:.3f}" for x in v) for k, v in times.items())
    print(f"best of {args.repeats} (interleaved); every time (s): {every}")
    header = f"{'':34} {'best s':>8} {'events/s':>10} {'MB/s':>8} {'MB':>8}"

    def table(title, rows, n):
        print(title)
        print(header)
        for name, t, nbytes in rows:
            print(f"{name:34} {t:8.3f} {n / t:10.0f} {nbytes / 1e6 / t:8.1f} "
                  f"{nbytes / 1e6:8.2f}")

    ratio = best["uproot"] / best["source"]
    ratio_small = best["uproot_small"] / best["source_small"]
    table(f"HLT events: {hlt_n} events x {channels.mean():.0f} HCAL channels, step_size "
          f"{args.hlt_step_size} (MB: compressed bytes of the branches read / of the file "
          f"written)",
          [("(a) plain uproot.iterate", best["uproot"], hlt_read_bytes),
           ("(b) RootSource -> HcalDigi analyzer", best["source"], hlt_read_bytes),
           ("(d) RootOutput write HcalDigi", best["output_hlt"], hlt_out_size),
           ("    RootOutput alone, no job", own_hlt, hlt_out_size),
           ("    plain uproot write", best["uproot_write_hlt"], hlt_ref_size)], hlt_n)
    table(f"small toy events: {n_entries} events x {hits.mean():.0f} hits, step_size "
          f"{args.step_size} (shows the framework's fixed per-event cost; MB: the file)",
          [("(a) plain uproot.iterate", best["uproot_small"], size),
           ("(b) RootSource -> analyzer", best["source_small"], size),
           ("(c) RootOutput write", best["output"], out_size),
           ("    RootOutput alone, no job", own, out_size),
           ("    plain uproot write", best["uproot_write"], ref_size)], n_entries)
    fixed_us = (best["source_small"] - best["uproot_small"]) / n_entries * 1e6
    own_us = (best["source_alone"] - best["iterate_alone"]) / n_entries * 1e6
    print(f"RootSource's own cost per event (small events, outside a job): {own_us:.2f} us "
          f"(next_event {best['source_alone'] / n_entries * 1e6:.2f} us, plain uproot.iterate "
          f"{best['iterate_alone'] / n_entries * 1e6:.2f} us)")
    print(f"RootSource / plain uproot (events/s): HLT events {ratio:.2f}; small events "
          f"{ratio_small:.2f} (RootSource's extra cost there: {fixed_us:.1f} us per event, the "
          f"framework's fixed per-event cost)")
    print(f"RootOutput / plain uproot write (events/s), whole job: HLT events "
          f"{best['uproot_write_hlt'] / best['output_hlt']:.2f}; small events "
          f"{best['uproot_write'] / best['output']:.2f}. RootOutput alone: HLT events "
          f"{best['uproot_write_hlt'] / own_hlt:.2f}; small events "
          f"{best['uproot_write'] / own:.2f}")
    print(json.dumps({
        "source_vs_uproot": round(ratio, 3),
        "source_events_per_s": round(hlt_n / best["source"], 1),
        "uproot_events_per_s": round(hlt_n / best["uproot"], 1),
        "source_mb_per_s": round(hlt_read_bytes / 1e6 / best["source"], 2),
        "uproot_mb_per_s": round(hlt_read_bytes / 1e6 / best["uproot"], 2),
        "source_vs_uproot_small_events": round(ratio_small, 3),
        "source_small_events_per_s": round(n_entries / best["source_small"], 1),
        "uproot_small_events_per_s": round(n_entries / best["uproot_small"], 1),
        "source_small_mb_per_s": round(size / 1e6 / best["source_small"], 2),
        "uproot_small_mb_per_s": round(size / 1e6 / best["uproot_small"], 2),
        "source_fixed_us_per_event": round(fixed_us, 2),
        "source_own_us_per_event": round(own_us, 2),
        "output_events_per_s": round(n_entries / best["output"], 1),
        "output_mb_per_s": round(out_size / 1e6 / best["output"], 2),
        "uproot_write_events_per_s": round(n_entries / best["uproot_write"], 1),
        "output_vs_uproot_write": round(best["uproot_write"] / best["output"], 3),
        "output_hlt_events_per_s": round(hlt_n / best["output_hlt"], 1),
        "output_hlt_mb_per_s": round(hlt_out_size / 1e6 / best["output_hlt"], 2),
        "uproot_write_hlt_events_per_s": round(hlt_n / best["uproot_write_hlt"], 1),
        "output_hlt_vs_uproot_write": round(best["uproot_write_hlt"] / best["output_hlt"], 3),
        "output_own_s": round(own, 4), "output_hlt_own_s": round(own_hlt, 4),
        "output_own_vs_uproot_write": round(best["uproot_write"] / own, 3),
        "output_hlt_own_vs_uproot_write": round(best["uproot_write_hlt"] / own_hlt, 3),
        "hlt_events": hlt_n, "hlt_channels": round(float(channels.mean()), 1),
        "hlt_step_size": args.hlt_step_size, "hlt_read_mb": round(hlt_read_bytes / 1e6, 3),
        "events": n_entries, "step_size": args.step_size, "input_mb": round(size / 1e6, 3),
        "repeats": args.repeats}))


if __name__ == "__main__":
    main()
