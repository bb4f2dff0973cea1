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


class TwoStageNet(nn.Module):
    """A two-stage model: the backbone's score map picks the top 4 positions, and a second stage (a
    Linear and its BatchNorm1d) runs on the features chosen there, as a detector's box head runs on
    its proposals."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.scores = nn.Conv2d(8, 1, 1)
        self.fc, self.bn = nn.Linear(8, 6, bias=False), nn.BatchNorm1d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.backbone(x)
        idx = self.scores(f).flatten(1).topk(4, dim=1).indices  # (N, 4)
        feats = f.flatten(2).transpose(1, 2)  # (N, H*W, 8)
        chosen = feats.gather(1, idx.unsqueeze(-1).expand(-1, -1, 8))
        return self.bn(self.fc(chosen.reshape(-1, 8)))


def TwoStage() -> nn.Module:  # noqa: N802
    return TwoStageNet()
