"""Shared test helpers.  BN statistics are always randomised: fresh BN layers are an identity
(mean 0, var 1, weight 1, bias 0) and would hide a wrong fold."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
BNFUSE = Path(sys.executable).parent / "bnfuse"


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm-like layer random running stats and affine parameters, in place."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            rm = getattr(m, "running_mean", None)
            rv = getattr(m, "running_var", None)
            if not isinstance(rm, torch.Tensor) or not isinstance(rv, torch.Tensor):
                continue
            n = rm.numel()
            rm.copy_((torch.randn(n, generator=g) * 0.5).to(rm.dtype))
            rv.copy_((torch.rand(n, generator=g) * 1.5 + 0.25).to(rv.dtype))
            w, b = getattr(m, "weight", None), getattr(m, "bias", None)
            if isinstance(w, torch.Tensor) and w.numel() == n:
                w.copy_((torch.randn(n, generator=g) * 0.4 + 1.0).to(w.dtype))
            if isinstance(b, torch.Tensor) and b.numel() == n:
                b.copy_((torch.randn(n, generator=g) * 0.4).to(b.dtype))
    return model


def run_bnfuse(*args: str, cwd: "Path | str | None" = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the real ``bnfuse`` entry point as a subprocess."""
    env = dict(os.environ, COLUMNS="200")
    return subprocess.run([str(BNFUSE), *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
