"""The re-parameterisable timm families, merged by bnfuse from the data flow alone, against timm's
own per-block ``reparameterize_model``: no more BatchNorm calls and no more conv calls than timm
leaves, and exact in float64.  Long (make zoo); ``scripts/compare_reparam.py`` adds latency."""

from __future__ import annotations

import copy

import pytest
import torch

from bnfuse_cli import fuse
from bnfuse_cli.inputs import randomize_bn
from conftest import count_calls

timm = pytest.importorskip("timm")

pytestmark = pytest.mark.zoo

MODELS = ["repvgg_a0", "repvgg_a2", "repvgg_b0", "mobileone_s0", "mobileone_s1", "fastvit_t8", "fastvit_sa12",
          "repghostnet_050", "repvit_m0_9", "ghostnetv3_050"]


@pytest.mark.parametrize("name", MODELS)
def test_timm_family_merges_as_far_as_timm_and_exactly(name: str) -> None:
    from timm.utils.model import reparameterize_model

    model = timm.create_model(name, pretrained=False).eval()
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))
    randomize_bn(model, seed=0, example=(torch.randn(4, *size, generator=torch.Generator().manual_seed(1)),))
    x = torch.randn(1, *size, generator=torch.Generator().manual_seed(2))
    ours = fuse(model, x).model
    theirs = reparameterize_model(copy.deepcopy(model))
    conv_ours, bn_ours = count_calls(ours, x)
    conv_theirs, bn_theirs = count_calls(theirs, x)
    assert bn_ours <= bn_theirs and conv_ours <= conv_theirs, (bn_ours, bn_theirs, conv_ours, conv_theirs)
    params = [sum(p.numel() for p in m.parameters()) for m in (ours, theirs)]
    assert params[0] <= params[1], params  # RepViT's two heads are one Linear in both
    if name.startswith("fastvit"):  # RepMixer merged, the ConvMlp BN folded, the attention BN folded forward
        assert bn_ours == 0
    m64 = copy.deepcopy(model).double()
    x64 = x.double()
    result = fuse(m64, x64)
    with torch.no_grad():
        ref, out = m64(x64), result.model(x64)
    assert result.ok, result.verdict.reasons
    assert float((out - ref).norm() / ref.norm()) < 1e-9
