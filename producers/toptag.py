"""Top tagging: P(top) of each jet from ResNet-50 on its jet image (as made by
:class:`~recorun.modules.jets.JetImageProducer`)."""
from __future__ import annotations

import numpy as np

from recorun import InputTag, Param

from .base import SonicProducer


class TopTagProducer(SonicProducer):
    """A float32 array of P(top) per jet image: ``scores[:, 1]`` of ResNet-50 (input
    ``jet_images`` [3, 224, 224], output ``scores`` [2] = (QCD, top) probabilities)."""

    model = Param(str, "resnet50", doc="model name")
    images = InputTag("jetImages", doc="(n, 3, 224, 224) float32 jet images")

    inputs = {"jet_images": ((3, 224, 224), np.float32)}

    def pack(self, event):
        return {"jet_images": np.ascontiguousarray(event.get(self.images), dtype=np.float32)}

    def unpack(self, event, outputs):
        event.put(np.ascontiguousarray(outputs["scores"][:, 1], dtype=np.float32))
