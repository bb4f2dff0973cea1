"""Property tests of the branch-merge arithmetic (bnfuse_cli.engine.passes.merge.kernels) on real torch layers, in float64.

Structural re-parameterisation (RepVGG, ACNet, MobileOne): a sum of parallel branches that all
read the same ``x`` -- convs with smaller, centred kernels, an identity, a BatchNorm on ``x`` --
is one conv.  Every test compares ``conv(x, *merge_kernels(...))`` against the sum of torch's
own convolutions of the unmerged branches; in float64 a correct merge agrees to ~1e-15
relative, a kernel placed one tap off or a lost bias is off by O(1).  The must-not-merge tests
show why the alignment rule matters: merging a misaligned branch anyway gives a wrong answer.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import event, given, settings
from hypothesis import strategies as st
from torch import nn

from bnfuse_cli.engine.affine import affine_from_stats
from bnfuse_cli.engine.passes.merge.kernels import centre_padding, identity_kernel, merge_kernels, pad_kernel
from bnfuse_cli.errors import FoldError
from conftest import randomize_bn
from foldmath import fold_into_previous

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True)
RTOL = 1e-10


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape
    err = (got - want).abs().max().item()
    assert err <= RTOL * max(1.0, want.abs().max().item()), err


def _far(got: torch.Tensor, want: torch.Tensor) -> None:
    """The opposite of _close, by a wide margin: the merge is wrong, not merely rounded."""
    assert got.shape == want.shape
    assert (got - want).abs().max().item() > 1e-3


def _conv(dim: int, cin: int, cout: int, k, *, stride=1, padding=0, dilation=1, groups=1, bias=True,
          seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    conv = getattr(nn, f"Conv{dim}d")(cin, cout, k, stride=stride, padding=padding, dilation=dilation,
                                       groups=groups, bias=bias)
    return conv.double()


def _bn(dim: int, channels: int, *, affine: bool = True, eps: float = 1e-5, seed: int = 0) -> nn.Module:
    bn = getattr(nn, f"BatchNorm{dim}d")(channels, affine=affine, eps=eps)
    return randomize_bn(bn, seed).double().eval()


def _stats(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    return affine_from_stats(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps, name="bn")


def _bn_branch(bn: nn.Module, groups: int, kernel) -> tuple[torch.Tensor, torch.Tensor]:
    """A BatchNorm on the input as a conv: the identity kernel scaled per output channel, shift as bias."""
    scale, shift = _stats(bn)
    w = identity_kernel(scale.numel(), groups, kernel)
    return w * scale.reshape(-1, *[1] * (w.dim() - 1)), shift


def _merged(main: nn.Module, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """One conv with the merged kernel and the main conv's stride, padding, dilation, groups."""
    conv = getattr(F, f"conv{x.dim() - 2}d")
    assert w.dtype == torch.float64 and b.dtype == torch.float64
    return conv(x, w, b, main.stride, main.padding, main.dilation, main.groups)


def _branch(conv: nn.Module) -> tuple[torch.Tensor, "torch.Tensor | None"]:
    return conv.weight, conv.bias


# -- the property ---------------------------------------------------------------------------------


@st.composite
def merge_cases(draw):
    dim = draw(st.sampled_from([1, 2, 3]))
    depthwise = draw(st.sampled_from([False, False, True]))
    groups = draw(st.integers(1, 4)) if depthwise else draw(st.integers(1, 3))
    cin = groups if depthwise else groups * draw(st.integers(1, 2))
    extra = draw(st.sampled_from(["none", "none", "identity", "bn", "both"]))  # decided early: common
    identity_able = extra != "none"
    cout = cin if identity_able else groups * draw(st.integers(1, 3))
    stride = 1 if identity_able else draw(st.integers(1, 2))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(dim))
    if identity_able:
        k = tuple(draw(st.sampled_from([1, 3])) for _ in range(dim))
        padding = tuple(d * (kk - 1) // 2 for d, kk in zip(dilation, k))
    else:
        k = tuple(draw(st.integers(1, 4 if dim < 3 else 3)) for _ in range(dim))  # 3-d kept small: speed
        padding = tuple(draw(st.integers(0, 3)) for _ in range(dim))
    branches = []
    half_taps = draw(st.sampled_from([False, False, False, True]))  # the refused case, now and then
    for _ in range(draw(st.integers(1, 3))):
        # per axis only the branch kernels that centre_padding accepts (the others are skipped)
        kb = tuple(
            draw(st.sampled_from([
                b for b in range(1, kk + 1)
                if centre_padding((p,), (d,), (kk,), (b,)) is not None and (half_taps or (kk - b) % 2 == 0)
            ]))
            for p, d, kk in zip(padding, dilation, k)
        )
        branches.append((kb, draw(st.booleans())))
    return dict(
        dim=dim, groups=groups, cin=cin, cout=cout, k=k, stride=stride, dilation=dilation, padding=padding,
        bias=draw(st.booleans()), branches=branches,
        identity=extra in ("identity", "both"),
        bn=extra in ("bn", "both"),
        affine=draw(st.booleans()),
        eps=draw(st.sampled_from([1e-5, 1e-3, 0.1])),
        size=tuple(d * (kk - 1) + draw(st.integers(1, 3)) for d, kk in zip(dilation, k)),
        seed=draw(st.integers(0, 2**16)),
    )


@SETTINGS
@given(merge_cases())
def test_merge_equals_the_sum_of_the_branches(c):
    dim, groups, seed = c["dim"], c["groups"], c["seed"]
    common = dict(stride=c["stride"], dilation=c["dilation"], groups=groups)
    main = _conv(dim, c["cin"], c["cout"], c["k"], padding=c["padding"], bias=c["bias"], seed=seed, **common)
    convs = [main]
    for i, (kb, bias) in enumerate(c["branches"]):
        pb = centre_padding(c["padding"], c["dilation"], c["k"], kb)
        assert pb is not None and all(p >= 0 for p in pb)
        convs.append(_conv(dim, c["cin"], c["cout"], kb, padding=pb, bias=bias, seed=seed + 1 + i, **common))
    x = torch.randn(2, c["cin"], *c["size"], generator=_gen(seed), dtype=torch.float64)
    parts = [_branch(conv) for conv in convs]
    with torch.no_grad():
        want = sum(conv(x) for conv in convs)
        if c["identity"]:
            want = want + x
            parts.append((identity_kernel(c["cin"], groups, c["k"]), None))
        if c["bn"]:
            bn = _bn(dim, c["cin"], affine=c["affine"], eps=c["eps"], seed=seed)
            want = want + bn(x)
            parts.append(_bn_branch(bn, groups, c["k"]))
    half_tap = any((kk - b) % 2 for kb, _ in c["branches"] for kk, b in zip(c["k"], kb))
    for name in ("identity", "bn"):
        event(f"{name} branch: {c[name]}")
    event(f"dim {dim}, depthwise {groups == c['cin'] and groups > 1}, half tap {half_tap}")
    if half_tap:
        # centre_padding accepted an odd k - k_b (only possible with an even dilation): the branch's
        # tap falls between the main kernel's dilated taps, no kernel placement can hold it (see
        # test_centre_padding_rejects_a_branch_between_dilated_taps).  Merging must refuse, not guess.
        with pytest.raises(FoldError, match="cannot be centred"):
            merge_kernels(parts, c["k"])
        return
    w, b = merge_kernels(parts, c["k"])
    assert w.shape == main.weight.shape and b.shape == (c["cout"],)
    with torch.no_grad():
        _close(_merged(main, x, w, b), want)


# -- explicit cases (the property samples them too) -----------------------------------------------


@pytest.mark.parametrize("stride", [1, 2])
def test_repvgg_3x3_plus_1x1_plus_bn_identity(stride):
    """RepVGG: BN(conv3x3(x)) + BN(conv1x1(x)) [+ BN(x) when stride 1]; the conv-BN pairs folded first."""
    c = 4
    conv3 = _conv(2, c, c, 3, stride=stride, padding=1, bias=False, seed=1)
    conv1 = _conv(2, c, c, 1, stride=stride, padding=centre_padding((1, 1), (1, 1), (3, 3), (1, 1)),
                  bias=False, seed=2)
    assert conv1.padding == (0, 0)
    bn3, bn1, bnid = (_bn(2, c, seed=s) for s in (3, 4, 5))
    x = torch.randn(2, c, 9, 9, generator=_gen(6), dtype=torch.float64)
    parts = [fold_into_previous(conv.weight, conv.bias, *_stats(bn), name="conv")
             for conv, bn in ((conv3, bn3), (conv1, bn1))]
    with torch.no_grad():
        want = bn3(conv3(x)) + bn1(conv1(x))
        if stride == 1:
            want = want + bnid(x)
            parts.append(_bn_branch(bnid, 1, (3, 3)))
        w, b = merge_kernels(parts, (3, 3))
        _close(_merged(conv3, x, w, b), want)
        # the identity's one sits at the centre: without the BN-identity branch the merge is far off
        if stride == 1:
            _far(_merged(conv3, x, *merge_kernels(parts[:2], (3, 3))), want)


def test_acnet_3x3_plus_1x3_plus_3x1():
    """ACNet: a square kernel plus horizontal and vertical ones, each padded (0, 1) / (1, 0)."""
    k, p, d = (3, 3), (1, 1), (1, 1)
    pads = {kb: centre_padding(p, d, k, kb) for kb in [(1, 3), (3, 1)]}
    assert pads == {(1, 3): (0, 1), (3, 1): (1, 0)}
    main = _conv(2, 3, 5, k, padding=p, seed=1)
    hor = _conv(2, 3, 5, (1, 3), padding=pads[(1, 3)], seed=2)
    ver = _conv(2, 3, 5, (3, 1), padding=pads[(3, 1)], bias=False, seed=3)
    x = torch.randn(2, 3, 7, 8, generator=_gen(4), dtype=torch.float64)
    with torch.no_grad():
        want = main(x) + hor(x) + ver(x)
        w, b = merge_kernels([_branch(m) for m in (main, hor, ver)], k)
        _close(_merged(main, x, w, b), want)
        # a 1x3 kernel in the 3x3's middle row, not its middle column: swapping the axes is far off
        wrong = main.weight + F.pad(hor.weight, (0, 0, 1, 1)).transpose(-1, -2).contiguous() \
            + pad_kernel(ver.weight, k)
        _far(_merged(main, x, wrong, b), want)


def test_depthwise_5x5_plus_3x3_plus_identity():
    c = 6
    main = _conv(2, c, c, 5, padding=2, groups=c, seed=1)
    small = _conv(2, c, c, 3, padding=centre_padding((2, 2), (1, 1), (5, 5), (3, 3)), groups=c, seed=2)
    assert small.padding == (1, 1)
    x = torch.randn(2, c, 8, 7, generator=_gen(3), dtype=torch.float64)
    ident = identity_kernel(c, c, (5, 5))
    assert ident.shape == (c, 1, 5, 5) and ident.sum().item() == c and (ident[:, 0, 2, 2] == 1).all()
    with torch.no_grad():
        want = main(x) + small(x) + x
        w, b = merge_kernels([_branch(main), _branch(small), (ident, None)], (5, 5))
        _close(_merged(main, x, w, b), want)


@pytest.mark.parametrize("padding, centred", [(2, 0), (3, 1), (4, 2)])
def test_dilation_2_with_a_1x1_branch(padding, centred):
    """A 1x1 branch sits at the centre tap of a dilated 3x3: padding_b = padding - 2."""
    assert centre_padding((padding,) * 2, (2, 2), (3, 3), (1, 1)) == (centred,) * 2
    main = _conv(2, 4, 6, 3, padding=padding, dilation=2, groups=2, seed=1)
    one = _conv(2, 4, 6, 1, padding=centred, dilation=2, groups=2, seed=2)
    x = torch.randn(2, 4, 9, 10, generator=_gen(3), dtype=torch.float64)
    with torch.no_grad():
        want = main(x) + one(x)
        w, b = merge_kernels([_branch(main), _branch(one)], (3, 3))
        _close(_merged(main, x, w, b), want)


# -- must not merge -------------------------------------------------------------------------------


def test_a_misaligned_branch_merged_anyway_is_wrong():
    """centre_padding says a 1x1 under a padding-1 3x3 needs padding 0.  With stride 3 on 10 pixels a
    padding-1 1x1 has the same output shape (4x4), so the sum is defined -- but it reads x one pixel
    up-left of the 3x3's centre, and the centred merge of it is far off; the padding-0 one is exact."""
    assert centre_padding((1, 1), (1, 1), (3, 3), (1, 1)) == (0, 0)
    main = _conv(2, 3, 4, 3, stride=3, padding=1, seed=1)
    x = torch.randn(2, 3, 10, 10, generator=_gen(2), dtype=torch.float64)
    with torch.no_grad():
        for pb, check in ((0, _close), (1, _far)):
            one = _conv(2, 3, 4, 1, stride=3, padding=pb, seed=2)
            want = main(x) + one(x)
            check(_merged(main, x, *merge_kernels([_branch(main), _branch(one)], (3, 3))), want)
        # with stride 1 the misaligned branch does not even have the main conv's output shape
        assert _conv(2, 3, 4, 1, padding=1)(x).shape[-2:] != _conv(2, 3, 4, 3, padding=1)(x).shape[-2:]


def test_centre_padding_refuses_a_larger_branch_kernel():
    assert centre_padding((1,), (1,), (3,), (5,)) is None
    assert centre_padding((3, 1), (1, 1), (3, 3), (5, 3)) is None  # one axis too large is enough
    with pytest.raises(FoldError, match="cannot be centred"):
        pad_kernel(torch.ones(2, 1, 5), (3,))
    with pytest.raises(FoldError, match="cannot be centred"):
        merge_kernels([(torch.ones(2, 1, 3), None), (torch.ones(2, 1, 5), None)], (3,))


@pytest.mark.parametrize("p", [0, 1, 2, 3])
def test_centre_padding_refuses_an_odd_difference(p):
    """k=4, k_b=1, dilation 1: 2p - (4 - 1) is odd for every p, the 1x1 has no centred place."""
    assert (2 * p - 1 * (4 - 1)) % 2 == 1
    assert centre_padding((p,), (1,), (4,), (1,)) is None
    assert centre_padding((p, 1), (1, 1), (4, 3), (1, 1)) is None  # per axis
    with pytest.raises(FoldError, match="cannot be centred"):
        pad_kernel(torch.ones(3, 2, 1), (4,))
    with pytest.raises(FoldError, match="cannot be centred"):
        pad_kernel(torch.ones(3, 2, 3, 2), (3, 3))


def test_centre_padding_even_cases_are_accepted():
    """The other side of the rule, so the refusals above are not a function that always says None."""
    assert centre_padding((2,), (1,), (4,), (2,)) == (1,)
    assert centre_padding((1,), (1,), (4,), (2,)) == (0,)
    assert centre_padding((0,), (1,), (4,), (2,)) is None  # would need padding -1
    assert centre_padding((3, 0), (1, 1), (5, 3), (3, 3)) == (2, 0)


def _dilated_half_tap_case():
    """k=4, dilation 2, padding 3: the main taps read x at offsets -3, -1, 1, 3; a 1x1 branch with
    centre_padding's padding 0 reads offset 0 -- between two taps."""
    main = _conv(1, 2, 3, 4, padding=3, dilation=2, seed=1)
    one = _conv(1, 2, 3, 1, padding=0, seed=2)
    x = torch.randn(2, 2, 11, generator=_gen(3), dtype=torch.float64)
    return main, one, x


def test_a_branch_between_dilated_taps_cannot_be_merged():
    """2p - d(k - k_b) = 6 - 6 = 0 is even, yet (k - k_b) = 3 is odd: no placement of the 1x1 in the
    dilated 4-tap kernel reproduces it, and merge_kernels refuses rather than place it wrongly."""
    main, one, x = _dilated_half_tap_case()
    with torch.no_grad():
        want = main(x) + one(x)
        for pos in range(4):
            w = main.weight.detach().clone()
            w[..., pos] += one.weight.detach()[..., 0]
            _far(_merged(main, x, w, main.bias + one.bias), want)
    with pytest.raises(FoldError, match="cannot be centred"):
        merge_kernels([_branch(main), _branch(one)], (4,))


def test_centre_padding_rejects_a_branch_between_dilated_taps():
    assert centre_padding((3,), (2,), (4,), (1,)) is None
    assert centre_padding((1,), (2,), (3,), (2,)) is None


@pytest.mark.parametrize("kernel", [(2,), (4,), (3, 2), (3, 3, 4)])
def test_identity_kernel_refuses_an_even_kernel(kernel):
    with pytest.raises(FoldError, match="even kernel"):
        identity_kernel(4, 1, kernel)


@pytest.mark.parametrize("channels, groups", [(6, 4), (5, 2), (3, 6)])
def test_identity_kernel_refuses_channels_not_divisible_by_groups(channels, groups):
    with pytest.raises(FoldError, match="cannot be split"):
        identity_kernel(channels, groups, (3, 3))


@pytest.mark.parametrize("groups", [1, 2, 6])
def test_identity_kernel_is_the_identity(groups):
    x = torch.randn(2, 6, 5, 4, generator=_gen(groups), dtype=torch.float64)
    for k, d in (((3, 3), (1, 1)), ((1, 5), (2, 1)), ((5, 3), (2, 2))):
        w = identity_kernel(6, groups, k)
        pad = tuple(dd * (kk - 1) // 2 for dd, kk in zip(d, k))
        _close(F.conv2d(x, w, None, 1, pad, d, groups), x)


@pytest.mark.parametrize("shapes", [
    ((4, 2, 3, 3), (6, 2, 1, 1)),  # out channels
    ((4, 2, 3, 3), (4, 4, 1, 1)),  # in/groups channels
    ((4, 2, 3), (4, 1, 3)),
])
def test_merge_kernels_refuses_mismatched_branches(shapes):
    branches = [(torch.ones(s, dtype=torch.float64), None) for s in shapes]
    with pytest.raises(FoldError, match="does not match"):
        merge_kernels(branches, shapes[0][2:])


def test_merge_kernels_refuses_no_branches():
    with pytest.raises(FoldError, match="no branches"):
        merge_kernels([], (3, 3))


@pytest.mark.parametrize("case", ["inf weight", "nan weight", "inf bias", "overflow"])
def test_merge_kernels_refuses_a_non_finite_result(case):
    w = torch.ones(2, 1, 3, dtype=torch.float64)
    b = torch.zeros(2, dtype=torch.float64)
    w2, b2 = torch.ones(2, 1, 1, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    if case == "inf weight":
        w2[1, 0, 0] = float("inf")
    elif case == "nan weight":
        w[0, 0, 2] = float("nan")
    elif case == "inf bias":
        b2[0] = float("-inf")
    else:  # each finite, their sum is not
        w = w * 1.5e308
        w2 = w2 * 1.5e308
    assert torch.isfinite(w2).all() or case != "overflow"
    with pytest.raises(FoldError, match="non-finite"):
        merge_kernels([(w, b), (w2, b2)], (3,))
    # the same branches made finite merge fine: the refusal is about the values, not the shapes
    merge_kernels([(torch.nan_to_num(w, 0.0, 1.0, -1.0), None), (torch.ones_like(w2), b)], (3,))


def test_merge_kernels_leaves_its_inputs_alone_and_works_in_float64():
    w32 = torch.randn(3, 2, 3, 3, generator=_gen(1)).float()
    w64 = torch.randn(3, 2, 1, 1, generator=_gen(2), dtype=torch.float64)
    before = (w32.clone(), w64.clone())
    w, b = merge_kernels([(w32, None), (w64, torch.ones(3, dtype=torch.float64))], (3, 3))
    assert w.dtype == torch.float64 and b.dtype == torch.float64
    assert torch.equal(w32, before[0]) and torch.equal(w64, before[1])
    assert torch.equal(w[..., 1, 1], w32.double()[..., 1, 1] + w64[..., 0, 0])


def test_merge_kernels_refuses_a_branch_of_another_rank():
    with pytest.raises(FoldError, match=r"^a branch kernel \(3, 3, 1\) does not match \(3, 3, 3, 3\)$"):
        merge_kernels([(torch.zeros(3, 3, 3, 3, dtype=torch.float64), None),
                       (torch.ones(3, 3, 1, dtype=torch.float64), None)], (3, 3))


def test_merge_kernels_refuses_a_bias_of_the_wrong_length():
    with pytest.raises(FoldError, match=r"^a branch bias of shape \(1,\) does not match 4 output channels$"):
        merge_kernels([(torch.zeros(4, 2, 3, dtype=torch.float64), torch.ones(1, dtype=torch.float64))], (3,))
