"""The paper's three models (Krupa et al. 2021, section 4 and table 1), in torch.

This module needs only torch: a GPU site imports it with no framework, no Triton client and
no Triton server (Python 3.11 or 3.12, numpy 1 or 2).

=========  ====================  =================  =======  ======================
model      input per inference   output             params   batch per event
=========  ====================  =================  =======  ======================
FACILE     15 HCAL channel       energy (GeV)       ~1.6 k   16000 (4500 at HLT)
           inputs
DeepCalo   4x56x11 ECAL image    energy (GeV)       ~1.8 M   5
ResNet-50  3x224x224 jet image   (QCD, top) scores  ~23.5 M  10
=========  ====================  =================  =======  ======================

How each model is served (tensor names, shapes without the batch dimension, dtypes, the
largest batch a server accepts) is :data:`recorun.model_specs.SPECS`, which the clients share.
"""
from __future__ import annotations

import torch
from torch import nn


class Facile(nn.Module):
    """FACILE: batch normalisation of the 15 inputs, then dense layers of 30, 20, 10, 5 and 3
    neurons, each with batch normalisation and ReLU, and one linear output: the channel's
    energy."""

    def __init__(self, n_inputs: int = 15, widths=(30, 20, 10, 5, 3)):
        super().__init__()
        layers: list[nn.Module] = [nn.BatchNorm1d(n_inputs)]
        previous = n_inputs
        for width in widths:
            layers += [nn.Linear(previous, width), nn.BatchNorm1d(width), nn.ReLU()]
            previous = width
        layers.append(nn.Linear(previous, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _conv(cin: int, cout: int, kernel: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, padding=kernel // 2), nn.BatchNorm2d(cout),
            nn.LeakyReLU()]


class DeepCalo(nn.Module):
    """DeepCalo: a 5x5 convolution (+ batch norm + leaky ReLU), four blocks of 2x2 max-pooling
    and two 3x3 convolutions (+ batch norm + leaky ReLU), then three dense layers to the
    electron's energy. Pooling rounds up (``ceil_mode``) so the 11-cell axis does not vanish:
    56x11 -> 28x6 -> 14x3 -> 7x2 -> 4x1."""

    def __init__(self, channels=(32, 32, 64, 128, 256), dense=(512, 128)):
        super().__init__()
        layers = _conv(4, channels[0], 5)
        for cin, cout in zip(channels, channels[1:]):
            layers += [nn.MaxPool2d(2, ceil_mode=True), *_conv(cin, cout, 3),
                       *_conv(cout, cout, 3)]
        self.features = nn.Sequential(*layers)
        flat = channels[-1] * 4 * 1
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(flat, dense[0]), nn.LeakyReLU(),
                                  nn.Linear(dense[0], dense[1]), nn.LeakyReLU(),
                                  nn.Linear(dense[1], 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class Bottleneck(nn.Module):
    """ResNet's bottleneck block: 1x1, 3x3 (stride), 1x1 x4 convolutions and a shortcut."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1):
        super().__init__()
        cout = width * self.expansion
        self.body = nn.Sequential(
            nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.shortcut = (nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


class ResNet50(nn.Module):
    """ResNet-50 (bottleneck blocks [3, 4, 6, 3]) on 3x224x224 images. ``forward`` gives
    class probabilities (softmax); :meth:`logits` the scores before it, for training."""

    def __init__(self, n_classes: int = 2, blocks=(3, 4, 6, 3)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64),
                                  nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        stages, cin = [], 64
        for i, (n, width) in enumerate(zip(blocks, (64, 128, 256, 512))):
            for j in range(n):
                stages.append(Bottleneck(cin, width, 2 if (j == 0 and i > 0) else 1))
                cin = width * Bottleneck.expansion
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, n_classes)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.stages(self.stem(x))), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(x), dim=1)


#: the torch module of each model of :data:`recorun.model_specs.SPECS`
ARCHITECTURES: dict[str, type[nn.Module]] = {"facile": Facile, "deepcalo": DeepCalo,
                                             "resnet50": ResNet50}


def make_model(name: str) -> nn.Module:
    """A new, untrained instance of model ``name``."""
    return ARCHITECTURES[name]()


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
