"""DeepCalo: electrons with their energy regressed by the DeepCalo network from their 4x56x11
ECAL images (a replacement for :class:`~recorun.modules.electrons.ElectronEnergyProducer`)."""
from __future__ import annotations

import numpy as np

from recorun import InputTag, Param
from recorun.modules.electrons import ELECTRON_DTYPE

from .base import SonicProducer


class DeepCaloProducer(SonicProducer):
    """Electrons (``recorun.modules.electrons.ELECTRON_DTYPE``): energy from DeepCalo (input
    ``electron_images`` [4, 56, 11], output ``energy`` [1], GeV), eta and phi from the
    candidates, et = energy / cosh(eta)."""

    model = Param(str, "deepcalo", doc="model name")
    images = InputTag("source:Electron_image", doc="(n, 4, 56, 11) images, GeV per cell")
    electrons = InputTag("source:Electron", doc="Electron collection with eta and phi")

    inputs = {"electron_images": ((4, 56, 11), np.float32)}

    def pack(self, event):
        images = event.get(self.images)
        candidates = event.get(self.electrons)
        if len(images) != len(candidates):
            raise ValueError(f"{len(images)} images for {len(candidates)} electrons")
        return {"electron_images": np.ascontiguousarray(images, dtype=np.float32)}

    def unpack(self, event, outputs):
        candidates = event.get(self.electrons)
        out = np.empty(len(candidates), ELECTRON_DTYPE)
        out["energy"] = outputs["energy"].reshape(-1)
        out["eta"], out["phi"] = candidates["eta"], candidates["phi"]
        out["et"] = out["energy"] / np.cosh(out["eta"])
        event.put(out)
