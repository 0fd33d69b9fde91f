"""FACILE: HCAL rechits with energies from the FACILE network (a drop-in replacement for
:class:`~recorun.modules.hcal_reco.HcalSimpleReco` / :class:`~recorun.modules.hcal_mahi.HcalMahiReco`: same input
tag, same ``threshold``, same rechit dtype, so CaloTowerProducer reads its product unchanged)."""
from __future__ import annotations

import numpy as np

from recorun.data.hcal import FACILE_INPUTS, facile_inputs
from recorun import InputTag, Param, Record
from recorun.modules.hcal_reco import CALIBRATIONS_DOC, calibrated, rechits

from .base import SonicProducer


class FacileProducer(SonicProducer):
    """HCAL rechits (``recorun.modules.hcal_reco.RECHIT_DTYPE``) from ``HcalDigi`` digis, the energy of
    each channel inferred by FACILE (input ``hcal_channels`` [15], output ``energy`` [1], GeV)."""

    model = Param(str, "facile", doc="model name")
    digis = InputTag("source:HcalDigi", doc="HcalDigi collection (fields of data/README.md)")
    threshold = Param(float, 0.5, doc="rechits below this energy (GeV) are dropped")
    calibrations = Record(None, optional=True, doc=CALIBRATIONS_DOC)

    inputs = {"hcal_channels": ((len(FACILE_INPUTS),), np.float32)}

    def pack(self, event):
        # one (n, 15) float32 matrix filled column by column from the digis' field views
        digis = calibrated(event, event.get(self.digis), self.calibrations)
        return {"hcal_channels": facile_inputs(digis)}

    def unpack(self, event, outputs):
        energy = outputs["energy"].reshape(-1)
        event.put(rechits(event.get(self.digis), energy, self.threshold))
