"""Property tests of the fold arithmetic (bnfuse_cli.engine.affine) on real torch layers, in float64.

``fold(conv, bn)(x) == bn(conv(x))`` across conv dimensions, groups, stride, dilation, padding
and padding modes, bias or not, affine or not, transposed convs (weight laid out
(in, out/groups, k...)) and Linear; and ``fold(bn, conv)(x) == conv(bn(x))`` for the forward
fold where it is exact.  In float64 a correct fold agrees to ~1e-15 relative; a fold on the
wrong axis or with the wrong bias is off by O(1).
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from bnfuse_cli.errors import FoldError
from bnfuse_cli.engine.affine import affine_from_stats
from foldmath import fold_into_next, fold_into_previous
from conftest import randomize_bn

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True)
RTOL = 1e-10


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _bn(dim: int, channels: int, *, affine: bool, eps: float, seed: int) -> nn.Module:
    bn = getattr(nn, f"BatchNorm{dim}d")(channels, affine=affine, eps=eps)
    return randomize_bn(bn, seed).double().eval()


def _stats(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    return affine_from_stats(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps, name="bn")


def _with(layer: nn.Module, w: torch.Tensor, b: torch.Tensor) -> nn.Module:
    new = copy.deepcopy(layer)
    with torch.no_grad():
        new.weight.copy_(w)
    new.bias = nn.Parameter(b)
    return new


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape
    err = (got - want).abs().max().item()
    assert err <= RTOL * max(1.0, want.abs().max().item()), err


@st.composite
def conv_cases(draw):
    dim = draw(st.sampled_from([1, 2, 3]))
    transposed = draw(st.booleans())
    groups = draw(st.integers(1, 3))
    case = dict(
        dim=dim,
        transposed=transposed,
        groups=groups,
        cin=groups * draw(st.integers(1, 2)),
        cout=groups * draw(st.integers(1, 3)),
        k=draw(st.integers(1, 3)),
        stride=draw(st.integers(1, 2)),
        dilation=draw(st.integers(1, 2)),
        padding=draw(st.integers(0, 2)),
        mode="zeros" if transposed else draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"])),
        bias=draw(st.booleans()),
        affine=draw(st.booleans()),
        eps=draw(st.sampled_from([1e-5, 1e-3, 0.1])),
        seed=draw(st.integers(0, 2**16)),
    )
    return case


def _conv(c: dict) -> nn.Module:
    torch.manual_seed(c["seed"])
    kind = f"Conv{'Transpose' if c['transposed'] else ''}{c['dim']}d"
    conv = getattr(nn, kind)(
        c["cin"], c["cout"], c["k"], stride=c["stride"], padding=c["padding"], dilation=c["dilation"],
        groups=c["groups"], bias=c["bias"], padding_mode=c["mode"],
    )
    return conv.double()


def _input(c: dict, channels: int) -> torch.Tensor:
    return torch.randn(2, channels, *([5] * c["dim"]), generator=_gen(c["seed"] + 1), dtype=torch.float64)


@SETTINGS
@given(conv_cases())
def test_fold_into_previous_conv_is_exact(c):
    conv = _conv(c)
    bn = _bn(c["dim"], c["cout"], affine=c["affine"], eps=c["eps"], seed=c["seed"])
    x = _input(c, c["cin"])
    scale, shift = _stats(bn)
    w, b = fold_into_previous(
        conv.weight, conv.bias, scale, shift, transposed=c["transposed"], groups=c["groups"], name="conv"
    )
    assert w.dtype == conv.weight.dtype and w.shape == conv.weight.shape and b.shape == (c["cout"],)
    with torch.no_grad():
        _close(_with(conv, w, b)(x), bn(conv(x)))


@SETTINGS
@given(
    st.integers(1, 6), st.integers(1, 6), st.booleans(), st.booleans(), st.integers(0, 2**16)
)
def test_fold_into_previous_linear_is_exact(fin, fout, bias, affine, seed):
    torch.manual_seed(seed)
    fc = nn.Linear(fin, fout, bias=bias).double()
    bn = _bn(1, fout, affine=affine, eps=1e-5, seed=seed)
    x = torch.randn(4, fin, generator=_gen(seed), dtype=torch.float64)
    w, b = fold_into_previous(fc.weight, fc.bias, *_stats(bn), name="fc")
    with torch.no_grad():
        _close(_with(fc, w, b)(x), bn(fc(x)))


@SETTINGS
@given(conv_cases())
def test_fold_into_next_conv_is_exact_without_zero_padding(c):
    c = dict(c, transposed=False, padding=c["padding"] if c["mode"] != "zeros" else 0)
    conv = _conv(c)
    bn = _bn(c["dim"], c["cin"], affine=c["affine"], eps=c["eps"], seed=c["seed"])
    x = _input(c, c["cin"])
    w, b = fold_into_next(conv.weight, conv.bias, *_stats(bn), groups=c["groups"], name="conv")
    with torch.no_grad():
        _close(_with(conv, w, b)(x), conv(bn(x)))


@SETTINGS
@given(st.integers(1, 6), st.integers(1, 6), st.booleans(), st.integers(0, 2**16))
def test_fold_into_next_linear_is_exact(fin, fout, bias, seed):
    torch.manual_seed(seed)
    fc = nn.Linear(fin, fout, bias=bias).double()
    bn = _bn(1, fin, affine=True, eps=1e-5, seed=seed)
    x = torch.randn(4, fin, generator=_gen(seed), dtype=torch.float64)
    w, b = fold_into_next(fc.weight, fc.bias, *_stats(bn), name="fc")
    with torch.no_grad():
        _close(_with(fc, w, b)(x), fc(bn(x)))


@pytest.mark.parametrize("groups", [1, 2])
def test_fold_into_next_with_zero_padding_is_not_exact(groups):
    """Why the engine refuses it: zero padding pads the un-shifted signal, so the border differs."""
    conv = nn.Conv2d(4, 4, 3, padding=1, groups=groups).double()
    bn = _bn(2, 4, affine=True, eps=1e-5, seed=3)
    x = torch.randn(2, 4, 6, 6, generator=_gen(0), dtype=torch.float64)
    w, b = fold_into_next(conv.weight, conv.bias, *_stats(bn), groups=groups, name="conv")
    with torch.no_grad():
        got, want = _with(conv, w, b)(x), conv(bn(x))
    _close(got[..., 1:-1, 1:-1], want[..., 1:-1, 1:-1])  # the interior is exact
    # ... the border is not, so the engine must refuse this fold and say why
    from bnfuse_cli import plan

    p = plan(nn.Sequential(bn.float(), conv.float()).eval(), x[:1].float())
    assert p.folds == [] and [s.norm for s in p.skipped] == ["0"]
    assert p.skipped[0].reason == (
        "reads a tensor not computed inside the model (the model input); nor can it fold into the layer after it: "
        "the conv after it, 1, pads with zeros, and zeros of the un-normalised signal are not zeros after the "
        "BatchNorm, so folding forward is not exact")


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("groups, cin, cout", [(2, 4, 6), (3, 3, 6), (2, 6, 2)])
def test_fold_into_transposed_conv_with_groups(dim, groups, cin, cout):
    """Explicit cases (the property test samples them too): weight (in, out/groups, k...)."""
    c = dict(dim=dim, transposed=True, groups=groups, cin=cin, cout=cout, k=3, stride=2, dilation=1,
             padding=1, mode="zeros", bias=True, affine=True, eps=1e-5, seed=groups * 10 + dim)
    conv = _conv(c)
    bn = _bn(dim, cout, affine=True, eps=1e-5, seed=c["seed"])
    x = _input(c, cin)
    w, b = fold_into_previous(conv.weight, conv.bias, *_stats(bn), transposed=True, groups=groups, name="up")
    with torch.no_grad():
        _close(_with(conv, w, b)(x), bn(conv(x)))


def test_transposed_groups_scale_the_output_axis():
    """A transposed fold on the wrong axis (weight dim 0) is far off: the test can tell."""
    conv = nn.ConvTranspose2d(4, 6, 3, groups=2).double()
    bn = _bn(2, 6, affine=True, eps=1e-5, seed=1)
    x = torch.randn(1, 4, 5, 5, generator=_gen(2), dtype=torch.float64)
    scale, shift = _stats(bn)
    w, b = fold_into_previous(conv.weight, conv.bias, scale, shift, transposed=True, groups=2, name="c")
    wrong = conv.weight.detach() * scale.reshape(2, 3)[:, :2].reshape(-1, 1, 1, 1)  # naive: dim 0
    with torch.no_grad():
        want = bn(conv(x))
        _close(_with(conv, w, b)(x), want)
    # bnfuse's weight is not the naive one (which scales input channels by output scales)
    assert (w - wrong).abs().max().item() > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fold_keeps_dtype_and_is_computed_in_float64(dtype):
    conv = nn.Conv2d(3, 4, 3).double()
    bn = _bn(2, 4, affine=True, eps=1e-5, seed=5)
    scale, shift = _stats(bn)
    w64, b64 = fold_into_previous(conv.weight, conv.bias, scale, shift, name="conv")
    w, b = fold_into_previous(conv.weight.to(dtype), conv.bias.to(dtype), scale, shift, name="conv")
    assert w.dtype == dtype and b.dtype == dtype
    # exactly one rounding: the folded low-precision weight is the float64 fold rounded
    assert torch.equal(w, (conv.weight.to(dtype).double() * scale.reshape(-1, 1, 1, 1)).to(dtype))
    assert torch.allclose(w.double(), w64, rtol=1e-2 if dtype != torch.float32 else 1e-6, atol=0)


# ------------------------------------------------------------------------------ bad statistics


def _conv_bn(var: float, *, eps: float = 1e-5, dtype=torch.float64):
    conv = nn.Conv2d(2, 3, 1).to(dtype)
    bn = randomize_bn(nn.BatchNorm2d(3, eps=eps)).to(dtype).eval()
    with torch.no_grad():
        bn.running_var[1] = var
    return conv, bn


@pytest.mark.parametrize("var", [float("nan"), -0.5, float("inf")])
def test_corrupt_running_var_raises_naming_the_layer(var):
    _, bn = _conv_bn(var)
    with pytest.raises(FoldError, match=r"layer3\.1\.bn2 .*running_var"):
        affine_from_stats(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps, name="layer3.1.bn2")


def test_zero_variance_and_zero_eps_is_non_finite():
    _, bn = _conv_bn(0.0, eps=0.0)
    with pytest.raises(FoldError, match="stem.bn.*non-finite"):
        affine_from_stats(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps, name="stem.bn")


def test_non_finite_gamma_or_mean_is_rejected():
    _, bn = _conv_bn(1.0)
    with torch.no_grad():
        bn.running_mean[0] = float("inf")
    with pytest.raises(FoldError, match="head.bn"):
        affine_from_stats(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps, name="head.bn")
    _, bn = _conv_bn(1.0)
    with torch.no_grad():
        bn.weight[2] = float("nan")
    with pytest.raises(FoldError, match="head.bn"):
        affine_from_stats(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps, name="head.bn")


def test_fp16_overflow_of_the_folded_weight_is_detected():
    """A tiny variance makes the scale ~1e6: the folded fp16 weight would be inf.  There is no conv bias
    and the BN's mean and beta are 0, so the folded bias is 0: only the weight check can refuse this."""
    conv, bn = _conv_bn(1e-12, eps=1e-12, dtype=torch.float16)
    with torch.no_grad():
        conv.weight.fill_(1.0)
        bn.weight.fill_(1.0)
        bn.bias.zero_()
        bn.running_mean.zero_()
    scale, shift = _stats(bn)
    with pytest.raises(FoldError) as info:
        fold_into_previous(conv.weight, None, scale, shift, name="features.0")
    assert str(info.value) == (
        "features.0: the folded weight overflows torch.float16 (a value reaches 1e+06, above the type's largest "
        "65504); convert the model to float32 before folding, or leave this layer unfolded")
    # the same fold in float32 is fine
    w, b = fold_into_previous(conv.weight.float(), None, scale, shift, name="features.0")
    assert torch.isfinite(w).all() and torch.equal(b, torch.zeros(3))


def test_fp16_overflow_of_the_folded_bias_is_detected():
    """The same scale on a small weight (folded: ~1e3, fits) and a bias of 1 (folded: ~1e6, does not)."""
    conv, bn = _conv_bn(1e-12, eps=1e-12, dtype=torch.float16)
    with torch.no_grad():
        conv.weight.fill_(1e-3)
        conv.bias.fill_(1.0)
        bn.weight.fill_(1.0)
    with pytest.raises(FoldError) as info:
        fold_into_previous(conv.weight, conv.bias, *_stats(bn), name="features.0")
    assert str(info.value) == (
        "features.0: the folded bias overflows torch.float16 (a value exceeds its range); convert the model to "
        "float32 before folding, or leave this layer unfolded")


def test_shape_mismatch_raises_fold_error():
    conv = nn.Conv2d(2, 3, 1).double()
    bn = _bn(2, 4, affine=True, eps=1e-5, seed=0)
    with pytest.raises(FoldError, match=r"^conv1: 3 output channels but the BatchNorm has 4$"):
        fold_into_previous(conv.weight, conv.bias, *_stats(bn), name="conv1")
    with pytest.raises(FoldError, match=r"^conv1: 2 input channels but the BatchNorm has 4$"):
        fold_into_next(conv.weight, conv.bias, *_stats(bn), name="conv1")


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("groups", [1, 2, 3])
@pytest.mark.parametrize("channels_last", [False, True])
def test_blockwise_in_place_fold_matches_the_reference(monkeypatch, transposed, groups, channels_last):
    """The in-place fold works a few rows at a time (blocks may straddle groups); with one row per
    block it must give bit for bit what a whole-tensor float64 computation gives, BN before and
    after the layer at once included."""
    import bnfuse_cli.engine.affine as fold_mod

    g = _gen(7)
    cin, cout = 6, 12
    w_shape = (cin, cout // groups, 3, 3) if transposed else (cout, cin // groups, 3, 3)
    w = torch.randn(w_shape, generator=g)
    if channels_last:
        w = w.contiguous(memory_format=torch.channels_last)
    b = torch.randn(cout, generator=g)
    s_out, t_out = torch.rand(cout, generator=g, dtype=torch.float64) + 0.5, torch.randn(cout, generator=g, dtype=torch.float64)
    s_in, t_in = torch.rand(cin, generator=g, dtype=torch.float64) + 0.5, torch.randn(cin, generator=g, dtype=torch.float64)
    following = None if transposed else (s_in, t_in)

    # reference: W'[o, i, k] = s_out[o] * W[o, i, k] * s_in[i], computed on whole tensors in float64
    w64 = w.double()
    if transposed:
        ref = (w64.reshape(groups, cin // groups, cout // groups, 9) * s_out.reshape(groups, 1, cout // groups, 1))
        ref_b = b.double() * s_out + t_out
    else:
        wg = w64.reshape(groups, cout // groups, cin // groups, 9)
        ref = wg * s_out.reshape(groups, cout // groups, 1, 1) * s_in.reshape(groups, 1, cin // groups, 1)
        ref_b = (b.double() + (wg * t_in.reshape(groups, 1, cin // groups, 1)).sum(dim=(2, 3)).reshape(-1)) * s_out + t_out
    ref_w = ref.reshape(w_shape).float()

    results = []
    for block in (1, fold_mod._BLOCK):
        monkeypatch.setattr(fold_mod, "_BLOCK", block)
        weight = w.clone(memory_format=torch.preserve_format)
        lf = fold_mod.prepare_fold(weight, b, backward=(s_out, t_out), forward=following,
                                   transposed=transposed, groups=groups, name="layer")
        fold_mod.apply_fold_(weight, lf)
        assert weight.is_contiguous(memory_format=torch.channels_last) == channels_last
        results.append((weight, lf.bias))
    (w_small, b_small), (w_big, b_big) = results
    assert torch.equal(w_small, w_big) and torch.equal(b_small, b_big)
    # float64 products may round differently when the two scales are multiplied first: within 1 ulp
    assert torch.allclose(w_big, ref_w, rtol=2e-7, atol=0) and torch.allclose(b_big.double(), ref_b, rtol=1e-6)
    if following is None:
        assert torch.equal(w_big, ref_w)  # one scale: the very same float64 product, rounded once


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_weight_already_holding_nan_or_inf_is_refused(bad):
    conv = nn.Conv2d(3, 4, 3).double()
    bn = _bn(2, 4, affine=True, eps=1e-5, seed=3)
    with torch.no_grad():
        conv.weight[2, 1, 0, 2] = bad
    with pytest.raises(FoldError, match=r"stem\.conv: its weight already holds NaN or infinite values"):
        fold_into_previous(conv.weight, conv.bias, *_stats(bn), name="stem.conv")
