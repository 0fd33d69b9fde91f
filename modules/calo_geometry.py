"""Calorimeter geometries: the (eta, phi) of a cell from its integer (ieta, iphi).

* ``toy``: the toy calorimeter of :mod:`modules.toy_calo`: ``ieta`` 0..55 in 0.1-wide rows
  over |eta| < 2.8, ``iphi`` 0..71.
* ``hcal``: CMS HCAL towers: ``ieta`` -29..-1 and 1..29 (0.087 wide up to |ieta| 20, wider
  in the endcap, up to |eta| 3.0), ``iphi`` 1..72 in 5-degree steps.
"""
from __future__ import annotations

import numpy as np

from .toy_calo import CELL_ETA, CELL_PHI, ETA_MAX

# |eta| edges of HCAL towers |ieta| = 1..29
HCAL_ETA_EDGES = np.array([0.087 * k for k in range(21)]
                          + [1.830, 1.930, 2.043, 2.172, 2.322, 2.500, 2.650, 2.868, 3.000])
HCAL_ETA_CENTERS = 0.5 * (HCAL_ETA_EDGES[:-1] + HCAL_ETA_EDGES[1:])


def toy_eta_phi(ieta: np.ndarray, iphi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return (-ETA_MAX + CELL_ETA * (ieta + 0.5), -np.pi + CELL_PHI * (iphi + 0.5))


def hcal_eta_phi(ieta: np.ndarray, iphi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ieta = np.asarray(ieta, dtype=np.int64)
    if ieta.size and (np.any(ieta == 0) or np.any(np.abs(ieta) > 29)):
        raise ValueError("HCAL ieta must be in -29..-1 or 1..29")
    eta = np.sign(ieta) * HCAL_ETA_CENTERS[np.abs(ieta) - 1]
    phi = np.deg2rad(5.0 * (np.asarray(iphi) - 0.5))
    return eta, np.mod(phi + np.pi, 2 * np.pi) - np.pi


GEOMETRIES = {"toy": toy_eta_phi, "hcal": hcal_eta_phi}
