"""Conditions files of the synthetic detector (docs/CONDITIONS.md).

``hcal_hlt.yaml`` gives the HLT workflows the HCAL gains and pedestals (``HcalGains``,
``HcalPedestals``: ``hcal_gains.npz``, ``hcal_pedestals.npz``) and FACILE's model
(``SonicModel``), valid from run 1 on. The two NumPy files hold the values the generator puts
in the digis (:data:`recorun.data.hcal.CONDITIONS`, per channel of
:data:`~recorun.data.hcal.GEOMETRY`); regenerate them with::

    python -m recorun.data.conditions [FOLDER]      # default: this folder

The files are written byte for byte the same every time (fixed zip timestamps).
"""
from __future__ import annotations

import sys
import zipfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """``numpy.savez_compressed`` with fixed timestamps: the same arrays give the same bytes."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, values in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with archive.open(info, "w") as f:
                np.lib.format.write_array(f, np.ascontiguousarray(values), allow_pickle=False)


def hcal_payloads() -> dict[str, dict[str, np.ndarray]]:
    """``{file name: arrays}``: the gains (GeV/fC) and the pedestals and their noise widths
    (fC) of every channel, with its ``ieta``, ``iphi``, ``depth``."""
    from recorun.data.hcal import CONDITIONS, GEOMETRY

    where = {name: GEOMETRY[name] for name in ("ieta", "iphi", "depth")}
    return {"hcal_gains.npz": {**where, "gain": CONDITIONS["gain"]},
            "hcal_pedestals.npz": {**where, "pedestal": CONDITIONS["pedestal"],
                                   "noise": CONDITIONS["noise"]}}


def write_hcal(folder: str | Path = HERE) -> list[Path]:
    """Write the HCAL payload files into ``folder``; their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, arrays in hcal_payloads().items():
        write_npz(folder / name, arrays)
        written.append(folder / name)
    return written


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    for path in write_hcal(args[0] if args else HERE):
        print(path)
    return 0
