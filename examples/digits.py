"""A small Conv-BN-ReLU network for scikit-learn's 8x8 digits, the model of ``make demo``.

It has the shapes bnfuse folds in practice: three Conv2d+BatchNorm2d pairs (two convolutions
without bias, one with), and a Linear+BatchNorm1d pair in the classifier.  The weights and
BatchNorm statistics in ``examples/digits_cnn.pth`` come from real training by
``scripts/train_digits.py``; ``examples/digits_val.pt`` holds the held-out images and labels.

    bnfuse convert examples/digits_cnn.pth --arch examples.digits:DigitsCNN -o out/digits_fused.safetensors
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DigitsCNN"]


class DigitsCNN(nn.Module):
    """Input: (N, 1, 8, 8) images scaled to [0, 1]; output: (N, 10) logits."""

    #: the input bnfuse uses for its checks when no --input-shape is given
    example_input_shape = (1, 1, 8, 8)

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(inplace=True),
            nn.Conv2d(16, 32, 3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
            nn.Conv2d(32, 32, 3, padding=1, bias=True),
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 64, bias=False),
            nn.BatchNorm1d(64),
            nn.ReLU(inplace=True),
            nn.Dropout(0.2),
            nn.Linear(64, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
