"""Horizontal fusion (``--horizontal``): sibling Conv/Linear layers on one tensor become one wider
layer, exactly, judged at its site, saved, rebuilt and verified; off by default; layers that differ
(a stride) are not siblings, and a forward fx cannot follow keeps its siblings, with the reason."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

import models_horizontal as mh
from bnfuse_cli import FuseOptions, fuse
from conftest import ROOT, count_ops, randomize_bn, round_trip, run_bnfuse

X = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
XT = torch.randn(2, 4, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
#: the fuse options with horizontal fusion on (it is off by default)
HORIZONTAL = FuseOptions(passes={"horizontal": True})


def _calls(model: nn.Module, x: torch.Tensor, kind: type) -> int:
    n = [0]
    hooks = [m.register_forward_hook(lambda *_: n.__setitem__(0, n[0] + 1)) for m in model.modules() if isinstance(m, kind)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return n[0]


def _fused(model: nn.Module, x: torch.Tensor, options: "FuseOptions | None" = None):  # noqa: ANN202
    model = randomize_bn(model, seed=2).double().eval()
    with torch.no_grad():
        ref = model(x)
    result = fuse(copy.deepcopy(model), x, options)
    with torch.no_grad():
        rel = float((result.model(x) - ref).norm() / ref.norm())
    return model, result, rel


def test_an_inception_blocks_sibling_convs_become_one_wider_conv() -> None:
    model, result, rel = _fused(mh.Inception(), X, HORIZONTAL)
    assert rel < 1e-12 and result.ok, (rel, result.verdict.reasons)
    (wide,) = result.plan.of("horizontal")
    assert wide.layers == ("branch1.conv", "branch2.0.conv", "branch3.0.conv")  # not the strided one
    assert result.plan.rounds == [{"fold": 6}, {"horizontal": 1}]  # after their BatchNorms folded
    assert _calls(result.model, X, nn.Conv2d) == _calls(model, X, nn.Conv2d) - 2
    assert tuple(result.model.get_submodule("branch1.conv").weight.shape) == (4 + 3 + 2, 6, 1, 1)
    (site,) = [s for s in result.verdict.sites if s.kind == "horizontal"]
    assert site.skipped is None and site.rel_error < 1e-12 and site.norms == list(wide.layers)
    # the ReLU after each sibling runs once, on the wider output (stem's, the three siblings' in one,
    # the two 3x3 convs' and the pool branch's)
    assert count_ops(model, X, {"relu"}) == 7 and count_ops(result.model, X, {"relu"}) == 5


def test_siblings_concatenated_in_order_need_no_slice_and_their_activation_runs_once() -> None:
    model, result, rel = _fused(mh.Fire(), X, HORIZONTAL)
    assert rel < 1e-12 and result.ok, (rel, result.verdict.reasons)
    (wide,) = result.plan.of("horizontal")
    assert wide.layers == ("expand_a", "expand_b")
    assert count_ops(result.model, X, {"narrow", "cat"}) == 0
    assert _calls(result.model, X, nn.ReLU) == 1 and _calls(model, X, nn.ReLU) == 2
    code = result.model.code
    assert "expand_b" not in code and "act_b" not in code, code


def test_unlike_activations_and_an_unordered_concatenation_stay_per_slice() -> None:
    model, result, rel = _fused(mh.Mixed(), X, HORIZONTAL)
    assert rel < 1e-12 and result.ok, (rel, result.verdict.reasons)
    assert {w.layers for w in result.plan.of("horizontal")} == {("a", "b"), ("d", "c")}
    assert count_ops(result.model, X, {"relu"}) == 1 and count_ops(result.model, X, {"sigmoid"}) == 1
    assert count_ops(result.model, X, {"narrow"}) == 4 and count_ops(result.model, X, {"cat"}) == 1


def test_horizontal_fusion_is_off_by_default() -> None:
    _, result, rel = _fused(mh.Inception(), X)
    assert rel < 1e-12 and result.plan.of("horizontal") == [] and result.plan.rounds == [{"fold": 6}]


def test_query_key_and_value_become_one_linear() -> None:
    model, result, rel = _fused(mh.QKV(), XT, HORIZONTAL)
    assert rel < 1e-12 and result.ok
    assert [w.layers for w in result.plan.of("horizontal")] == [("query", "key", "value")]
    assert _calls(result.model, XT, nn.Linear) == 3  # embed, the wider one, out


def test_siblings_in_a_forward_fx_cannot_follow_stay_with_the_reason() -> None:
    _, result, rel = _fused(mh.Untraceable(), X, HORIZONTAL)
    assert rel < 1e-12 and result.ok and result.plan.of("horizontal") == []
    (left,) = result.plan.left_by("horizontal")
    assert left.layers == ("a", "b") and "cannot be traced" in left.reason


def test_a_horizontal_fusion_is_saved_rebuilt_and_verified(tmp_path: Path, tests_on_path: None) -> None:
    rt = round_trip(randomize_bn(mh.Inception(), seed=3).eval(), "models_horizontal:Inception", "1,3,6,6", tmp_path,
                    passes={"horizontal": True})
    assert rt.ok and rt.report.to_dict()["horizontal"][0]["layers"][0] == "branch1.conv"
    assert rt.rel(X) < 1e-6  # float32 weights
    # branch1.conv took a BatchNorm in round 1 and its siblings in round 2: end to end
    assert any("branch1.conv" in n and "end to end" in n for n in rt.verified.notes), rt.verified.notes


def test_cli_horizontal_flag(tmp_path: Path) -> None:
    args = ("convert", "models_horizontal:QKV", "--weights", "none", "--input-shape", "2,4,5", "--json", "-",
            "-o", str(tmp_path / "f.safetensors"))
    on = run_bnfuse(*args, "--horizontal", cwd=ROOT / "tests", columns=160)
    assert on.returncode == 0, on.stderr
    assert json.loads(on.stdout)["horizontal"] == [{"block": "", "layers": ["query", "key", "value"]}]
    assert "Fused side by side" not in on.stderr and "side by side" in on.stderr  # summary line; table with -v
    off = run_bnfuse(*args, "--force", cwd=ROOT / "tests", columns=160)
    assert off.returncode == 0 and json.loads(off.stdout)["horizontal"] == []


def test_bench_races_the_horizontal_model() -> None:
    proc = run_bnfuse("bench", "models_horizontal:Inception", "--input-shape", "1,3,16,16", "--horizontal",
                      "--iters", "5", "--json", "-", cwd=ROOT / "tests")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["settings"]["horizontal"] is True and data["models"][0]["check"]["ok"] is True
