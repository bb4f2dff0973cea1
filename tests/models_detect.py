"""A tiny detector (``models_detect:TinyDetector``): conv+BN backbone, a score head and a box head, then
post-processing that keeps the boxes whose score is above ``threshold`` (a buffer, saved with the
weights), as detection models do with score thresholds before NMS."""

from __future__ import annotations

import torch
from torch import nn


class TinyDetectorNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.scores = nn.Conv2d(8, 1, 1)
        self.boxes = nn.Conv2d(8, 4, 1)
        self.register_buffer("threshold", torch.tensor(0.0))

    def forward(self, x: torch.Tensor) -> "tuple[torch.Tensor, torch.Tensor]":
        f = self.backbone(x)
        scores = self.scores(f).flatten(1)  # (N, H*W)
        boxes = self.boxes(f).flatten(2).transpose(1, 2)  # (N, H*W, 4)
        keep = scores > self.threshold
        return boxes[keep], scores[keep]


def TinyDetector() -> nn.Module:  # noqa: N802
    return TinyDetectorNet()
