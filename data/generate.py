"""``recorun-gen``: write synthetic events (HCAL digis, ECAL electrons, jets) to ROOT files.

    recorun-gen hlt OUT.root --events N [--seed S] [--channels 4500]
    recorun-gen hcal OUT.root --events N [--seed S] [--channels 16000]
    recorun-gen electrons OUT.root --events N [--seed S]
    recorun-gen jets OUT.root --events N [--seed S] [--top-fraction 0.5]

common options: ``--first-event K`` (events K, K+1, ...; default 1), ``--format
{ttree,rntuple}`` (default ttree), ``-q``. The tree is ``Events``; branches follow NanoAOD
(``run``, ``luminosityBlock``, ``event``, collections ``X_field`` counted by ``nX``); see
``data/README.md``. Event ``k`` is the same whatever ``--events`` and ``--first-event``: files
written in pieces hold the same events as one written at once.

The same events, without a file: :func:`generate_hlt_events`, :func:`generate_hcal_events`,
:func:`generate_electron_events`, :func:`generate_jet_events` return a dict of the arrays
that are written (images as ``var * 4 * 56 * 11``; the TTree writer flattens them, see
:mod:`recorun.data.layout`).

Exit codes: 0 written; 2 bad arguments (or OUT's directory missing); 1 failed while writing
(no partial file is left); 130 interrupted.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import awkward as ak
import numpy as np
import uproot

from recorun.data import ecal, hcal, jets
from recorun.data.layout import flatten_inner, write_shapes

TREE = "Events"
COMPRESSION = uproot.ZSTD(1)
CHUNK_BYTES = 48_000_000          # raw bytes generated (and written) per chunk
DEFAULT_CHANNELS = {"hlt": 4500, "hcal": 16000}


def event_ids(n: int, first_event: int = 1) -> dict[str, np.ndarray]:
    """NanoAOD event IDs: run 1, luminosity block ``event // 1000 + 1``."""
    event = np.arange(first_event, first_event + n, dtype=np.uint64)
    return {"run": np.ones(n, dtype=np.uint32),
            "luminosityBlock": (event // 1000 + 1).astype(np.uint32),
            "event": event}


def _check(n: int, seed: int, first_event: int) -> range:
    if n < 1 or seed < 0 or first_event < 0:
        raise ValueError(f"need n >= 1, seed >= 0 and first_event >= 0 (got n={n}, "
                         f"seed={seed}, first_event={first_event})")
    return range(first_event, first_event + n)


def generate_hcal_events(n: int, seed: int = 0, channels: int = 16000,
                         first_event: int = 1) -> dict:
    """``run``, ``luminosityBlock``, ``event`` and ``HcalDigi`` (``var * {ieta, iphi, depth,
    subdet, gain, pedestal, noise, q0..q7, trueEnergy}``) of events first_event..+n-1."""
    events = _check(n, seed, first_event)
    out = event_ids(n, first_event)
    out["HcalDigi"] = hcal.generate(events, seed, channels)
    return out


def generate_electron_events(n: int, seed: int = 0, first_event: int = 1) -> dict:
    """IDs, ``Electron`` (``var * {energy, eta, phi, trueEnergy}``) and ``Electron_image``
    (``var * 4 * 56 * 11 * float32``, one image per electron)."""
    events = _check(n, seed, first_event)
    out = event_ids(n, first_event)
    out["Electron"], out["Electron_image"] = ecal.generate(events, seed)
    return out


def generate_hlt_events(n: int, seed: int = 0, channels: int = 4500,
                        first_event: int = 1) -> dict:
    """HCAL digis and ECAL electrons of the same events (independent random streams: the
    digis equal :func:`generate_hcal_events`' and the electrons
    :func:`generate_electron_events`' for the same seed and events)."""
    events = _check(n, seed, first_event)
    out = event_ids(n, first_event)
    out["HcalDigi"] = hcal.generate(events, seed, channels)
    out["Electron"], out["Electron_image"] = ecal.generate(events, seed)
    return out


def generate_jet_events(n: int, seed: int = 0, top_fraction: float = 0.5,
                        first_event: int = 1) -> dict:
    """IDs, ``is_top`` (bool), ``Particle`` (``var * {px, py, pz, E, pt, eta, phi, charge,
    parton}``) and ``GenPart`` (``var * {px, py, pz, E, pt, eta, phi, mass, pdgId}``)."""
    events = _check(n, seed, first_event)
    if not 0.0 <= top_fraction <= 1.0:
        raise ValueError("top_fraction must be in [0, 1]")
    out = event_ids(n, first_event)
    out["is_top"], out["Particle"], out["GenPart"] = jets.generate(events, seed, top_fraction)
    return out


# ---------------------------------------------------------------------------- writing
def ttree_branches(events: dict) -> tuple[dict, dict]:
    """The arrays as a TTree stores them, and the inner shapes of the flattened ones."""
    out, shapes = {}, {}
    for name, array in events.items():
        if isinstance(array, ak.Array):
            flat, shape = flatten_inner(array)
            if shape:
                shapes[name] = shape
            array = flat
        out[name] = array
    return out, shapes


def _branch_type(array):
    return array.type if isinstance(array, ak.Array) else array.dtype


def write_events(path: str, chunks, fmt: str = "ttree", progress=None) -> int:
    """Write an iterable of event dicts (as the ``generate_*`` functions return) to ``path``
    as the TTree or RNTuple ``Events``; ``progress(n_written)`` after each chunk. The file
    appears only when complete (written to a temporary name, then renamed). Returns the
    number of events."""
    if fmt not in ("ttree", "rntuple"):
        raise ValueError(f"format must be 'ttree' or 'rntuple', not {fmt!r}")
    head, tail = os.path.split(os.path.abspath(path))
    tmp = os.path.join(head, f".{tail}.{os.getpid()}.tmp")
    written = 0
    try:
        with uproot.recreate(tmp, compression=COMPRESSION) as file:
            tree = None
            for chunk in chunks:
                if fmt == "ttree":
                    branches, shapes = ttree_branches(chunk)
                    if tree is None:
                        tree = file.mktree(TREE, {k: _branch_type(v)
                                                  for k, v in branches.items()})
                        write_shapes(file, shapes)
                    tree.extend(branches)
                else:
                    data = ak.Array(chunk)
                    if tree is None:
                        tree = file.mkrntuple(TREE, data)
                    else:
                        tree.extend(data)
                written += len(chunk["event"])
                if progress is not None:
                    progress(written)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return written


def _bytes_per_event(command: str, channels: int) -> int:
    electrons = int(ecal.ELECTRONS_MEAN * (np.prod(ecal.IMAGE_SHAPE) + 4) * 4)
    digis = channels * 4 * len(hcal.FIELDS)
    return {"hlt": digis + electrons, "hcal": digis, "electrons": electrons,
            "jets": int((jets.UE_MEAN + 60) * 4 * len(jets.PARTICLE_FIELDS))}[command]


def _chunks(args):
    per_chunk = max(1, min(5000, CHUNK_BYTES // _bytes_per_event(args.command, args.channels)))
    for start in range(0, args.events, per_chunk):
        n = min(per_chunk, args.events - start)
        first = args.first_event + start
        if args.command == "hlt":
            yield generate_hlt_events(n, args.seed, args.channels, first)
        elif args.command == "hcal":
            yield generate_hcal_events(n, args.seed, args.channels, first)
        elif args.command == "electrons":
            yield generate_electron_events(n, args.seed, first)
        else:
            yield generate_jet_events(n, args.seed, args.top_fraction, first)


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("out", metavar="OUT.root", help="the ROOT file to write")
    common.add_argument("-n", "--events", type=int, required=True,
                        help="number of events to generate")
    common.add_argument("-s", "--seed", type=int, default=0, help="random seed (>= 0)")
    common.add_argument("--first-event", type=int, default=1,
                        help="number of the first event (default 1)")
    common.add_argument("--format", choices=("ttree", "rntuple"), default="ttree",
                        help="write a TTree (default) or an RNTuple")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    parser = argparse.ArgumentParser(
        prog="recorun-gen",
        description="Write synthetic detector events (HCAL digis, ECAL electrons, jets) to "
                    "a ROOT file, tree 'Events'. Physics model and layout: data/README.md.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parser.commands = {}
    for name, help_ in (("hlt", "HCAL digis and ECAL electrons per event (HLT-style)"),
                        ("hcal", "HCAL digis only (full detector by default)")):
        p = parser.commands[name] = sub.add_parser(name, parents=[common], help=help_,
                                                   description=help_)
        p.add_argument("--channels", type=int, default=DEFAULT_CHANNELS[name],
                       help=f"HCAL channels read out per event (default "
                            f"{DEFAULT_CHANNELS[name]}, at most {hcal.N_CHANNELS})")
    p = parser.commands["electrons"] = sub.add_parser(
        "electrons", parents=[common], help="ECAL electrons with images",
        description="ECAL electrons with 4x56x11 images")
    p.set_defaults(channels=0)
    p = parser.commands["jets"] = sub.add_parser(
        "jets", parents=[common], help="particles of a top or a QCD jet",
        description="particles of one boosted top or QCD jet per event")
    p.add_argument("--top-fraction", type=float, default=0.5,
                   help="fraction of top-jet events (default 0.5)")
    p.set_defaults(channels=0)
    return parser


def main(argv=None) -> int:
    top = _parser()
    args = top.parse_args(argv)
    parser = top.commands[args.command]        # errors show the command's usage
    if args.events < 1:
        parser.error(f"--events must be >= 1, not {args.events}")
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, not {args.seed}")
    if args.first_event < 0:
        parser.error(f"--first-event must be >= 0, not {args.first_event}")
    if args.command in DEFAULT_CHANNELS and not 1 <= args.channels <= hcal.N_CHANNELS:
        parser.error(f"--channels must be in 1..{hcal.N_CHANNELS}, not {args.channels}")
    if args.command == "jets" and not 0.0 <= args.top_fraction <= 1.0:
        parser.error(f"--top-fraction must be in [0, 1], not {args.top_fraction}")
    directory = os.path.dirname(os.path.abspath(args.out))
    if os.path.isdir(args.out):
        parser.error(f"{args.out} is a directory")
    if not os.path.isdir(directory):
        parser.error(f"cannot write {args.out}: directory {directory} does not exist")
    if not os.access(directory, os.W_OK):
        parser.error(f"cannot write {args.out}: directory {directory} is not writable")

    start = time.perf_counter()
    prog = f"recorun-gen {args.command}"

    def progress(done):
        if not args.quiet and done < args.events:
            elapsed = time.perf_counter() - start
            print(f"{prog}: {done}/{args.events} events, {elapsed:.1f} s "
                  f"({done / elapsed:.0f} events/s)", file=sys.stderr, flush=True)

    try:
        written = write_events(args.out, _chunks(args), args.format, progress)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; {args.out} not written", file=sys.stderr)
        return 130
    except Exception as exc:
        print(f"{prog}: error writing {args.out}: {type(exc).__name__}: {exc}",
              file=sys.stderr)
        return 1
    if not args.quiet:
        elapsed = time.perf_counter() - start
        size = os.path.getsize(args.out) / 1e6
        print(f"{prog}: wrote {written} events to {args.out} ({args.format}, {size:.1f} MB) "
              f"in {elapsed:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
