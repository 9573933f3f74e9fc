"""torchvision's ``squeezenet1_1`` (same layers and parameter names) and its weights enum: pretrained weights are
fetched as torchvision does, ``load_state_dict_from_url`` of the enum's URL (the file of torch hub's cache)."""

from __future__ import annotations

import torch
from torch import nn
from torch.hub import load_state_dict_from_url


class _Weights:
    def __init__(self, url: str) -> None:
        self.url = url

    def get_state_dict(self, *args, **kwargs):
        return load_state_dict_from_url(self.url, *args, **kwargs)


class SqueezeNet1_1_Weights:  # noqa: N801 — torchvision's name
    IMAGENET1K_V1 = _Weights("https://download.pytorch.org/models/squeezenet1_1-b8a52dc0.pth")
    DEFAULT = IMAGENET1K_V1


class Fire(nn.Module):
    def __init__(self, cin: int, sq: int, e1: int, e3: int) -> None:
        super().__init__()
        self.squeeze, self.squeeze_activation = nn.Conv2d(cin, sq, 1), nn.ReLU(inplace=True)
        self.expand1x1, self.expand1x1_activation = nn.Conv2d(sq, e1, 1), nn.ReLU(inplace=True)
        self.expand3x3, self.expand3x3_activation = nn.Conv2d(sq, e3, 3, padding=1), nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.squeeze_activation(self.squeeze(x))
        e1, e3 = self.expand1x1_activation(self.expand1x1(x)), self.expand3x3_activation(self.expand3x3(x))
        return torch.cat([e1, e3], 1)


class SqueezeNet(nn.Module):
    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        pool = lambda: nn.MaxPool2d(3, 2, ceil_mode=True)  # noqa: E731
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 3, 2), nn.ReLU(inplace=True), pool(), Fire(64, 16, 64, 64), Fire(128, 16, 64, 64),
            pool(), Fire(128, 32, 128, 128), Fire(256, 32, 128, 128), pool(), Fire(256, 48, 192, 192),
            Fire(384, 48, 192, 192), Fire(384, 64, 256, 256), Fire(512, 64, 256, 256),
        )  # fmt: skip
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(512, num_classes, 1), nn.ReLU(inplace=True),
                                        nn.AdaptiveAvgPool2d((1, 1)))  # fmt: skip

    def forward(self, x):
        return torch.flatten(self.classifier(self.features(x)), 1)


def squeezenet1_1(*, weights=None, progress: bool = True) -> SqueezeNet:
    model = SqueezeNet()
    if weights is not None:
        model.load_state_dict(weights.get_state_dict(progress=progress, check_hash=True))
    return model


# ---- names torchmetrics imports at import time when torchvision is there (other metrics); never called here


def _absent(*args, **kwargs):
    raise NotImplementedError("not in the stand-in torchvision")


resnet50 = vgg16 = _absent


class VGG16_Weights:  # noqa: N801 — torchvision's name
    DEFAULT = None
