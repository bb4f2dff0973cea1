"""Fold sites on tiny hand-made models: what folds, what stays and why, and that the fused
model computes the same function (in float64, where a correct fold agrees to ~1e-15).

Every case asserts the exact numbers of folds and skips, the words of each skip reason, and
the fused output against the unfused one; a wrongly folded layer is off by O(1).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import models_edge as me
from bnfuse_cli.errors import FoldError
from bnfuse_cli.workflows.fuse import fuse
from bnfuse_cli.checks import compare
from bnfuse_cli.engine.patterns import is_norm_like
from conftest import randomize_bn

TOL = 1e-10
#: the whole skip reasons that several cases share
#: what a BatchNorm on the model's input says, and what follows when it cannot fold forward either
INPUT = "reads a tensor not computed inside the model (the model input)"
NOR = "; nor can it fold into the layer after it: "
ZERO_PAD = (INPUT + NOR + "the conv after it, {}, pads with zeros, and zeros of the un-normalised signal are not "
            "zeros after the BatchNorm, so folding forward is not exact")


def clone(layer: str, params: int) -> str:
    return f"; --clone-shared would fold it into a copy of {layer} for its path (+{params} parameters)"


def goes(op: str, where: str = "the model forward") -> str:
    return f"{NOR}its output goes to {op} in {where}, not straight into a Conv/Linear"
PARAMETRIZED = ("conv has a re-parametrised weight (torch.nn.utils.parametrize, e.g. parametrizations.weight_norm): "
                "it is recomputed on every call, so a folded weight would be overwritten; remove the parametrisation first")
WEIGHT_NORM = ("conv uses weight_norm (torch.nn.utils.weight_norm): its weight is recomputed from weight_g and "
               "weight_v on every call, so a folded weight would be overwritten; call torch.nn.utils.remove_weight_norm first")


def _x(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def run(model: nn.Module, *args: torch.Tensor, folds: int, skipped: int, seed: int = 0):
    """Fuse a float64 copy of ``model`` with random BN statistics; check counts and outputs."""
    model = randomize_bn(model, seed).double().eval()
    with torch.no_grad():
        reference = model(*args)
    res = fuse(model, args)
    with torch.no_grad():
        fused_out = res.model(*args)
    err = compare(reference, fused_out)
    assert err.mismatch is None, err.mismatch
    assert err.rel < TOL, (err, res.plan)
    assert res.error.rel < TOL
    assert res.ok, res.verdict.reasons  # every fold site checked in float64, and the output
    assert len(res.plan.folds) == folds, res.plan
    assert len(res.plan.skipped) == skipped, res.plan
    # every BN not folded is still in the model, every folded one is gone
    left = [n for n, m in res.model.named_modules() if is_norm_like(m)]
    assert sorted(left) == sorted(s.norm for s in res.plan.skipped)
    return res


def reason(res, norm: str) -> str:
    (r,) = [s.reason for s in res.plan.skipped if s.norm == norm]
    return r


def pairs(res) -> set[tuple[str, str, str]]:
    return {(f.producer, f.norm, f.direction) for f in res.plan.folds}


# ------------------------------------------------------------------------------ backward folds


def test_conv_bn_folds():
    res = run(me.ConvBN(), _x(2, 3, 6, 6), folds=1, skipped=0)
    assert pairs(res) == {("conv", "bn", "backward")}
    assert isinstance(res.model.bn, nn.Identity)
    assert res.model.conv.bias is not None


def test_residual_reader_is_named():
    res = run(me.ResidualRead(), _x(2, 3, 6, 6), folds=0, skipped=1)
    assert reason(res, "layer1.0.bn1") == "output of layer1.0.conv1 is also read by add in layer1.0" + goes("add", "layer1.0") + \
        clone("layer1.0.conv1", 84)


def test_conv_output_returned():
    res = run(me.ConvReturned(), _x(2, 3, 6, 6), folds=0, skipped=1)
    assert reason(res, "bn") == "output of conv is also returned by the model"


def test_conv_called_twice_bn_after_one_call():
    res = run(me.ConvTwiceBNOnce(), _x(2, 3, 6, 6), folds=0, skipped=1)
    r = reason(res, "bn")
    assert "conv is called 2 times" in r and "not every output feeds this BatchNorm" in r


def test_conv_called_twice_each_followed_by_the_bn():
    res = run(me.ConvTwiceBNTwice(), _x(2, 3, 6, 6), folds=1, skipped=0)
    assert pairs(res) == {("conv", "bn", "backward")}


def test_one_bn_after_two_convs_folds_into_both():
    res = run(me.SharedBN(), _x(2, 3, 6, 6), folds=2, skipped=0)
    assert pairs(res) == {("c1", "bn", "backward"), ("c2", "bn", "backward")}
    assert res.plan.folded_norms == ["bn"]


def test_bn_applied_twice_to_one_output():
    res = run(me.BNReadTwice(), _x(2, 3, 6, 6), folds=1, skipped=0)
    assert pairs(res) == {("conv", "bn", "backward")}


def test_registration_order_does_not_matter():
    res = run(me.RegistrationOrder(), _x(2, 6, 5, 5), folds=2, skipped=0)
    assert pairs(res) == {("conv_a", "bn_a", "backward"), ("conv_b", "bn_b", "backward")}


def test_densenet_like_concat_then_bn_is_skipped():
    res = run(me.ConcatBN(), _x(2, 3, 6, 6), folds=0, skipped=1)
    assert reason(res, "norm") == "follows cat in the model forward, not a Conv/Linear output"


def test_cat_of_conv_outputs_folds_a_slice_into_each_conv():
    res = run(me.MixedConvBN(), _x(2, 4, 6, 6), folds=2, skipped=0)
    assert {(f.producer, f.channels) for f in res.plan.folds} == {("convs.0", (0, 3)), ("convs.1", (3, 8))}
    assert all(f.norm == "bn" and f.direction == "backward" for f in res.plan.folds)


def test_cat_along_another_axis_is_skipped():
    res = run(me.CatOnWrongAxis(), _x(2, 3, 6, 6), folds=0, skipped=1)
    assert reason(res, "bn") == ("follows cat in the model forward, not a Conv/Linear output "
                                 "(a cat along axis 3, not the channel axis)")


def test_linear_flattened_then_bn1d_folds():
    res = run(me.LinearFlattenBN(), _x(2, 3, 5), folds=1, skipped=0)
    assert pairs(res) == {("linear", "bn", "backward")}


def test_linear_transposed_and_reshaped_is_skipped():
    res = run(me.LinearViewWrongAxis(), _x(2, 6, 4), folds=0, skipped=1)
    assert reason(res, "bn") == "follows reshape in the model forward, not a Conv/Linear output"


def test_conv_flattened_then_bn1d_folds():
    res = run(me.ConvFlattenBN1d(), _x(2, 3, 6, 6), folds=1, skipped=0)
    assert pairs(res) == {("conv", "bn", "backward")}


def test_fold_rows_round_trip():
    from bnfuse_cli.engine.passes.fold import Fold

    for f in (Fold("bn", "conv"), Fold("bn", "convs.1", channels=(3, 8)), Fold("n", "c", "forward", "activation")):
        assert Fold.from_list(f.to_list()) == f


def test_bn_after_relu_before_conv_is_skipped():
    res = run(me.PreActivation(), _x(2, 3, 6, 6), folds=0, skipped=1)
    assert reason(res, "bn") == "follows relu in the model forward, not a Conv/Linear output" + goes("relu")


def test_inplace_relu_between_conv_and_bn():
    res = run(me.InplaceReluBetween(), _x(2, 3, 6, 6), folds=0, skipped=1)
    assert reason(res, "bn") == "output of conv is also read by relu in act"


# ------------------------------------------------------------------------------- forward folds


def test_input_bn_folds_into_unpadded_conv():
    res = run(me.InputBNConv(padding=0), _x(2, 4, 6, 6), folds=1, skipped=0)
    assert pairs(res) == {("conv", "bn", "forward")}


def test_input_bn_before_grouped_conv():
    res = run(me.InputBNConv(padding=0, groups=2), _x(2, 4, 6, 6), folds=1, skipped=0)
    assert pairs(res) == {("conv", "bn", "forward")}


def test_input_bn_not_folded_into_zero_padded_conv():
    res = run(me.InputBNConv(padding=1), _x(2, 4, 6, 6), folds=0, skipped=1)
    assert reason(res, "bn") == ZERO_PAD.format("conv")


ONE_SIDED = [  # (rank, F.pad before the conv, the conv's own arguments)
    (1, None, dict(kernel_size=3, padding=1)),  # one axis only: the only axis
    (1, None, dict(kernel_size=4, padding="same")),  # asymmetric: 1 left, 2 right
    (2, None, dict(kernel_size=3, padding=(0, 1))),
    (2, None, dict(kernel_size=3, padding=(1, 0))),
    (2, None, dict(kernel_size=(1, 2), padding="same")),  # one axis, one side
    (3, None, dict(kernel_size=3, padding=(0, 0, 1))),
    (3, None, dict(kernel_size=3, padding=(0, 1, 0))),
    (3, None, dict(kernel_size=3, padding=(1, 0, 0))),
    (3, None, dict(kernel_size=(1, 1, 2), padding="same")),
]
ONE_SIDED_IDS = ["1d-p1", "1d-same-even", "2d-p01", "2d-p10", "2d-same-1x2", "3d-p001", "3d-p010", "3d-p100",
                 "3d-same-1x1x2"]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("dim, pad, conv", ONE_SIDED, ids=ONE_SIDED_IDS)
def test_input_bn_not_folded_into_a_conv_padded_on_one_axis_or_one_side(dim, pad, conv):
    """Zero padding on a single axis, or on a single side, still pads the un-normalised signal: the
    forward fold is refused with its reason, and the fused model stays exact."""
    res = run(me.BNPadConv(dim, pad, **conv), _x(2, 3, *[5] * dim), folds=0, skipped=1)
    assert reason(res, "bn") == ZERO_PAD.format("conv")


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_input_bn_padded_by_f_pad_before_a_conv_is_not_folded(dim):
    """One-sided zero padding by ``F.pad`` between the BN and an unpadded conv: the conv does not read
    the BN's output itself, so there is nothing to fold into."""
    res = run(me.BNPadConv(dim, (0, 1) * dim, kernel_size=3), _x(2, 3, *[5] * dim), folds=0, skipped=1)
    assert reason(res, "bn") == INPUT + goes("pad")


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_input_bn_folds_forward_into_an_unpadded_conv_of_every_rank(dim):
    """The control for the cases above: without padding the same model folds forward."""
    res = run(me.BNPadConv(dim, kernel_size=3), _x(2, 3, *[5] * dim), folds=1, skipped=0)
    assert pairs(res) == {("conv", "bn", "forward")}


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_input_bn_folds_into_conv_with_non_zero_padding(mode):
    res = run(me.InputBNConv(padding=1, padding_mode=mode), _x(2, 4, 6, 6), folds=1, skipped=0)
    assert pairs(res) == {("conv", "bn", "forward")}


def test_bn1d_then_linear_folds_forward():
    res = run(me.BN1dLinear(), _x(4, 5), folds=1, skipped=0)
    assert pairs(res) == {("fc", "bn", "forward")}


def test_linear_then_bn1d_on_2d():
    res = run(me.LinearBN1d(), _x(4, 5), folds=1, skipped=0)
    assert pairs(res) == {("fc", "bn", "backward")}


def test_linear_on_3d_then_bn1d_is_not_folded_on_the_wrong_axis():
    res = run(me.LinearBN1dWrongAxis(6), _x(3, 6, 4), folds=0, skipped=1)
    assert reason(res, "bn") == ("the output of fc is 3-D (3, 6, 6): BatchNorm1d normalises axis 1, not the Linear's "
                                 "feature axis (the last one)")


# ---------------------------------------------------------------------------- norm variants


def test_track_running_stats_false_is_skipped():
    res = run(me.ConvNorm(nn.BatchNorm2d(4, track_running_stats=False)), _x(2, 3, 6, 6), folds=0, skipped=1)
    assert reason(res, "bn") == ("track_running_stats=False: it has no running statistics and normalises with batch "
                                 "statistics even in eval mode, so it is not a fixed affine map")


def test_affine_false_folds():
    res = run(me.ConvNorm(nn.BatchNorm2d(4, affine=False)), _x(2, 3, 6, 6), folds=1, skipped=0)
    assert pairs(res) == {("conv", "bn", "backward")}


def test_bn_subclass_without_forward_folds():
    run(me.ConvNorm(me.PlainBNSubclass(4)), _x(2, 3, 6, 6), folds=1, skipped=0)


def test_bn_subclass_overriding_forward_is_skipped():
    res = run(me.ConvNorm(me.ClampedBN(4)), _x(2, 3, 6, 6), folds=0, skipped=1)
    assert reason(res, "bn") == "unknown BatchNorm2d subclass ClampedBN overrides forward (it may do more than normalise)"


def test_conv3d_subclass_folds():
    res = run(me.ConvNorm(nn.BatchNorm3d(5), me.MyConv3d(3, 5)), _x(1, 3, 4, 5, 5), folds=1, skipped=0)
    assert pairs(res) == {("conv", "bn", "backward")}


def test_conv_subclass_overriding_conv_forward_is_skipped():
    res = run(me.ConvNorm(nn.BatchNorm2d(4), me.StdConv2d(3, 4, 3)), _x(2, 3, 6, 6), folds=0, skipped=1)
    assert reason(res, "bn") == ("conv: unknown Conv2d subclass StdConv2d overrides _conv_forward (it may not compute "
                                 "with its stored weight)")


def test_sync_batchnorm_in_eval_on_cpu_folds():
    # SyncBatchNorm only synchronises in training; in eval it runs on CPU like BatchNorm2d
    res = run(me.ConvNorm(nn.SyncBatchNorm(4)), _x(2, 3, 6, 6), folds=1, skipped=0)
    assert pairs(res) == {("conv", "bn", "backward")}


def test_frozen_batchnorm_folds():
    from torchvision.ops import FrozenBatchNorm2d

    run(me.ConvNorm(FrozenBatchNorm2d(4)), _x(2, 3, 6, 6), folds=1, skipped=0)


@pytest.mark.parametrize("act", ["relu", "silu"])
def test_timm_batchnormact_keeps_its_activation(act):
    timm_layers = pytest.importorskip("timm.layers")
    from bnfuse_cli.engine.layers import NormActivation

    norm = timm_layers.BatchNormAct2d(4, act_layer=act)
    res = run(me.ConvNorm(norm), _x(2, 3, 6, 6), folds=1, skipped=0)
    assert isinstance(res.model.bn, NormActivation)
    assert type(res.model.bn.act) is type(norm.act) and not isinstance(norm.act, nn.Identity)


def test_timm_batchnormact_without_activation_leaves_a_plain_identity():
    timm_layers = pytest.importorskip("timm.layers")

    res = run(me.ConvNorm(timm_layers.BatchNormAct2d(4, apply_act=False)), _x(2, 3, 6, 6), folds=1, skipped=0)
    assert type(res.model.bn) is nn.Identity  # no module call that calls two more that do nothing


def test_conv_transpose_groups_folds():
    conv = nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2, bias=False)
    res = run(me.ConvNorm(nn.BatchNorm2d(6), conv), _x(2, 4, 5, 5), folds=1, skipped=0)
    assert pairs(res) == {("conv", "bn", "backward")}


def test_channels_last_weights_fold():
    model = me.ConvBN().to(memory_format=torch.channels_last)
    x = _x(2, 3, 6, 6).to(memory_format=torch.channels_last)
    res = run(model, x, folds=1, skipped=0)
    assert res.model.conv.weight.is_contiguous(memory_format=torch.channels_last)


# ------------------------------------------------------------------- re-parametrised weights


def test_old_weight_norm_is_skipped():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        conv = torch.nn.utils.weight_norm(nn.Conv2d(3, 4, 3, padding=1))
    res = run(me.ConvNorm(nn.BatchNorm2d(4), conv), _x(2, 3, 6, 6), folds=0, skipped=1)
    assert reason(res, "bn") == WEIGHT_NORM


def test_parametrizations_weight_norm_is_skipped():
    conv = torch.nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 4, 3, padding=1))
    res = run(me.ConvNorm(nn.BatchNorm2d(4), conv), _x(2, 3, 6, 6), folds=0, skipped=1)
    assert reason(res, "bn") == PARAMETRIZED


class _Symmetric(nn.Module):
    def forward(self, w):
        return (w + w.flip(-1)) / 2


def test_parametrize_is_skipped():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    torch.nn.utils.parametrize.register_parametrization(conv, "weight", _Symmetric())
    res = run(me.ConvNorm(nn.BatchNorm2d(4), conv), _x(2, 3, 6, 6), folds=0, skipped=1)
    assert reason(res, "bn") == PARAMETRIZED


def test_input_bn_before_parametrized_conv_is_skipped():
    model = me.InputBNConv(padding=0)
    torch.nn.utils.parametrize.register_parametrization(model.conv, "weight", _Symmetric())
    res = run(model, _x(2, 4, 6, 6), folds=0, skipped=1)
    assert reason(res, "bn") == INPUT + NOR + PARAMETRIZED


# ----------------------------------------------------------------- flow, I/O, shared params


def test_data_dependent_control_flow():
    model = me.DataDependent()
    with pytest.raises(Exception):
        torch.fx.symbolic_trace(model)
    x = _x(2, 3, 6, 6).abs()  # takes the first branch: bn2 never runs
    res = run(model, x, folds=1, skipped=1)
    assert pairs(res) == {("conv", "bn", "backward")}
    assert reason(res, "bn2") == "never called on the example input (unused, or in a branch not taken)"
    with torch.no_grad():  # the untaken branch is untouched and still correct
        ref = randomize_bn(me.DataDependent(), 0).double().eval()
        ref.load_state_dict(model.state_dict())
        assert torch.equal(ref(-x), res.model(-x))


def test_several_inputs_and_nested_outputs():
    res = run(me.MultiIO(), _x(2, 3, 6, 6), _x(4, 5, seed=2), folds=2, skipped=0)
    assert pairs(res) == {("ca", "bna", "backward"), ("fb", "bnb", "backward")}


def test_bn_parameters_read_elsewhere():
    res = run(me.BNParamsRead(), _x(2, 3, 6, 6), folds=0, skipped=1)
    assert reason(res, "bn") == "bn.weight is also read by abs in the model forward"


def test_tied_conv_weights():
    res = run(me.TiedConvWeights(), _x(2, 3, 6, 6), folds=0, skipped=1)
    assert reason(res, "bn") == (
        "conv_a.weight is shared with conv_b.weight (tied weights): folding would change the other layer too" + NOR +
        "conv_b.weight is shared with conv_a.weight (tied weights): folding would change the other layer too")


def test_conv_weight_read_by_another_module():
    res = run(me.ConvWeightReadFunctionally(), _x(2, 3, 6, 6), folds=0, skipped=1)
    assert reason(res, "bn") == "conv.weight is also read by conv2d in head" + goes("conv2d", "head")


# ------------------------------------------------------------------------- fuse() contract


def test_fuse_leaves_callers_model_untouched():
    model = randomize_bn(me.RegistrationOrder()).double().train()
    before = copy.deepcopy(model.state_dict())
    res = fuse(model, _x(2, 6, 5, 5))
    assert model.training and res.model is not model
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert isinstance(model.bn_a, nn.BatchNorm2d) and len(res.plan.folds) == 2


def test_fuse_switches_training_model_to_eval_and_reports_it():
    model = randomize_bn(me.ConvBN()).double().train()
    x = _x(2, 3, 6, 6)
    res = fuse(model, x, inplace=True)
    assert res.switched_to_eval and not res.model.training and res.model is model
    eval_res = fuse(randomize_bn(me.ConvBN()).double().eval(), x)
    assert not eval_res.switched_to_eval


def test_fuse_copies_a_fresh_old_weight_norm_model():
    """A weight_norm weight computed with autograd is not a leaf: deepcopy alone refuses it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        conv = torch.nn.utils.weight_norm(nn.Conv2d(3, 4, 3, padding=1).double())
    model = me.ConvNorm(randomize_bn(nn.BatchNorm2d(4)).double(), conv).eval()
    x = _x(2, 3, 6, 6)
    with torch.no_grad():
        reference = model(x)
    res = fuse(model, x)
    assert res.model is not model and len(res.plan.skipped) == 1 and not res.plan.folds
    assert reason(res, "bn") == WEIGHT_NORM
    with torch.no_grad():
        assert torch.equal(res.model(x), reference) and torch.equal(model(x), reference)


def test_fold_error_leaves_the_model_unchanged():
    model = randomize_bn(me.RegistrationOrder()).double().eval()
    with torch.no_grad():
        model.bn_a.running_var[2] = -1.0  # bn_b comes first in the plan: it must not be written
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(FoldError, match="bn_a"):
        fuse(model, _x(2, 6, 5, 5), inplace=True)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert isinstance(model.bn_b, nn.BatchNorm2d) and model.conv_b.bias is None


def test_overflow_found_before_anything_is_written():
    """float16: the second pair's fold would overflow; the first pair must not be folded either
    (weights are rescaled in place, so every fold is checked before the first write)."""
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(),
                                       nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))).eval()
    with torch.no_grad():
        model[4].running_var.fill_(1e-10)  # scale ~1e5 x weights ~0.5: above float16's 65504
        model[4].eps = 1e-12
        model[3].weight.fill_(0.5)
    model = model.half()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(FoldError, match=r"^3: the folded weight overflows torch\.float16"):
        fuse(model, torch.randn(1, 3, 4, 4).half(), inplace=True)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_passthrough_ops_do_not_block_a_fold():
    res = run(me.PassThroughOps(), _x(2, 3, 6, 6), folds=1, skipped=0)
    assert pairs(res) == {("conv", "bn", "backward")}


def test_inplace_leaky_relu_between_conv_and_bn():
    res = run(me.InplaceLeakyBetween(), _x(2, 3, 6, 6), folds=0, skipped=1)
    assert reason(res, "bn") == "output of conv is also read by leaky_relu in act"


def test_bn_used_functionally_is_skipped_with_the_reader():
    res = run(me.FunctionalBN(), _x(2, 3, 6, 6), folds=0, skipped=1)
    assert reason(res, "bn") == "bn.weight is also read by batch_norm in the model forward"
    # the call on bn's own statistics stays with it (folded, it would take bn out of the model)
    assert [x.reason for x in res.plan.left_by("functional")] == [
        "it reads the statistics of the BatchNorm bn, which stays in the model"]


def test_bn_without_bias_folds():
    res = run(me.ConvNorm(nn.BatchNorm2d(4, bias=False)), _x(2, 3, 6, 6), folds=1, skipped=0)
    assert pairs(res) == {("conv", "bn", "backward")}


def test_track_running_stats_switched_off_after_construction_still_uses_running_stats():
    """torch normalises with the running statistics in eval whenever the buffers exist."""
    bn = nn.BatchNorm2d(4)
    bn.track_running_stats = False
    res = run(me.ConvNorm(bn), _x(2, 3, 6, 6), folds=1, skipped=0)
    assert pairs(res) == {("conv", "bn", "backward")}


@pytest.mark.parametrize(
    "cls, why",
    [
        (me.AtenOpRead, "output of conv is also read by mul in the model forward" + goes("add") + clone("conv", 112)),
        (me.CustomFunctionRead, "output of conv is also read by mul in the model forward" + goes("add") + clone("conv", 112)),
        (me.ScriptedReader, "output of conv is also read by TorchScript forward in head" + goes("add") + clone("conv", 112)),
        (me.DataclassOutput, "output of conv is also returned by the model"),
        (me.StoredFeature, "output of conv is also kept in the attribute feat"),
        (me.SwitchesBNToTrain, "it runs in training mode during the forward (the model switches it with .train()), so it "
                                "normalises with batch statistics"),
    ],
)
def test_hidden_reads_keep_the_bn(cls, why):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script is deprecated
        model = cls()
    model = randomize_bn(model).double().eval()
    x = _x(2, 3, 6, 6)
    with torch.no_grad():
        reference = model(x)
        raw = getattr(reference, "raw", None)
    res = fuse(model, x)
    assert not res.plan.folds and reason(res, "bn") == why, res.plan
    with torch.no_grad():
        out = res.model(x)
    if raw is not None:
        assert torch.equal(out.raw, raw) and torch.equal(out.normalised, reference.normalised)
    elif not isinstance(model, me.SwitchesBNToTrain):  # batch statistics: compare as is
        assert torch.equal(out, reference)


def test_weight_sharing_memory_with_another_parameter_is_skipped():
    model = randomize_bn(me.StorageSharedWeight()).eval()
    other = model.other.detach().clone()
    res = fuse(model, _x(2, 3, 6, 6), inplace=True)
    assert not res.plan.folds
    assert reason(res, "bn") == (
        "conv.weight shares memory with other: folding writes the weight in place and would change them too"
        + goes("add"))
    assert torch.equal(model.other, other)


def test_torchscript_model_is_refused():
    from bnfuse_cli.errors import BnfuseError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(me.ConvBN().eval())
    with pytest.raises(BnfuseError, match="TorchScript"):
        fuse(scripted, _x(2, 3, 6, 6))


def test_linear_unsqueezed_then_bn1d_folds():
    res = run(me.LinearUnsqueezeBN1d(), _x(4, 5), folds=1, skipped=0)
    assert pairs(res) == {("fc", "bn", "backward")}


def test_concatenate_with_axis_keyword_folds():
    res = run(me.ConcatenateAxisKwarg(), _x(2, 3, 6, 6), folds=2, skipped=0)
    assert {(f.producer, f.channels) for f in res.plan.folds} == {("c1", (0, 2)), ("c2", (2, 5))}


def test_cat_part_also_read_elsewhere_is_skipped():
    res = run(me.CatPartReadTwice(), _x(2, 3, 6, 6), folds=0, skipped=1)
    assert reason(res, "bn") == "output of c1 is also read by add in the model forward" + goes("indexing")


def test_an_input_the_model_rejects_is_a_usage_error():
    from bnfuse_cli.errors import UsageError

    model = randomize_bn(me.ConvBN()).double().eval()
    with pytest.raises(UsageError, match=r"ConvBN fails on the example input \(\(2, 5, 6, 6\)\).*input-shape"):
        fuse(model, _x(2, 5, 6, 6))


def test_recording_keeps_no_activations_alive():
    """The recorded forward pass holds no more activations than a plain one: by the time the
    last layer runs, the first BN's output (a tensor the recorder tracks) has been freed."""
    import weakref

    from bnfuse_cli.engine.analyse import analyse

    model = randomize_bn(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 4, 1),
    )).eval()
    first: list[weakref.ref] = []
    alive_at_end: list[bool] = []
    model[2].register_forward_pre_hook(lambda m, i: first.append(weakref.ref(i[0])))  # the ReLU after bn 1
    model[6].register_forward_pre_hook(lambda m, i: alive_at_end.append(first[-1]() is not None))
    plan = analyse(model, (torch.randn(1, 3, 16, 16),)).plan
    assert len(plan.folds) == 2  # the recording itself worked
    assert alive_at_end == [False], "the analysis kept BN 1's output alive until the end"


def test_reshape_called_with_keywords_only_is_handled():
    """``torch.reshape(input=..., shape=...)`` gives the recorder no positional argument."""

    class KeywordReshape(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 6)
            self.bn = nn.BatchNorm1d(6)

        def forward(self, x):
            return self.bn(torch.reshape(input=self.fc(x), shape=(-1, 6)))

    res = run(KeywordReshape(), _x(3, 4), folds=0, skipped=1)
    assert reason(res, "bn") == "follows reshape in the model forward, not a Conv/Linear output"


def test_a_plan_folding_two_batchnorms_into_one_side_of_a_layer_is_refused():
    """Two BNs cannot both read (or both feed) one layer's single output (input): such a plan is a
    bug, refused before anything is written rather than folded into a wrong model."""
    from bnfuse_cli.errors import BnfuseError
    from bnfuse_cli.engine.plan import Plan
    from bnfuse_cli.engine.passes.fold import Fold
    from bnfuse_cli.engine.passes.fold.rewrite import apply_plan

    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.BatchNorm2d(8)).eval()
    randomize_bn(model)
    before = copy.deepcopy(model.state_dict())
    plan = Plan(norms=["1", "2"], items={"fold": [Fold("1", "0"), Fold("2", "0")]})
    with pytest.raises(BnfuseError, match="two BatchNorms into the output of 0"):
        apply_plan(model, plan)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_bn_between_relu_and_max_pool_names_both_blockers():
    """A pitch model's block (conv -> ReLU -> BN -> max-pool -> zero pad -> conv): the reason says what
    stops the fold into the layer before it and what stops the one into the layer after it."""
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.MaxPool2d(2), nn.ZeroPad2d(1),
                          nn.Conv2d(4, 4, 3))
    res = run(randomize_bn(model).eval(), _x(1, 1, 12, 12), folds=0, skipped=1)
    assert reason(res, "2") == ("follows relu in 1, not a Conv/Linear output; nor can it fold into the layer after it: "
                                "its output goes to max_pool2d in 3, not straight into a Conv/Linear")


def test_a_bn_after_a_merged_sum_leaves_the_rewritten_forward_and_a_sequential_keeps_its_indices():
    import models_merge as mm

    res = run(mm.PostSumBN(), torch.randn(2, 8, 8, 8, dtype=torch.float64), folds=2, skipped=0)
    block = res.model.block
    assert "bn" not in dict(block.named_children())  # the round-2 fold's Identity is not called, and gone
    res = run(me.WrappedConvs(), _x(2, 3, 6, 6), folds=2, skipped=0)
    assert [type(m) for m in res.model.cbr] == [nn.Conv2d, nn.Identity, nn.ReLU]  # every index stays
    assert type(res.model.cn.bn) is nn.Identity and {k for k in res.model.state_dict() if k.startswith("cn.")} == \
        {"cn.c.weight", "cn.c.bias"}
