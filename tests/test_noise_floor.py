"""The judge's rounding floor: where the reference is no more precise than the model (a float64 model,
or ``fuse``'s own check against the original), the allowance grows with the largest magnitude the
model's activations reach, as the original's own error does in float32.  A correct fold of a model
whose activations pass through 1e8 is accepted; a wrong one is still refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import bnfuse_cli
from conftest import ROOT, corrupt_after_rewrite, run_bnfuse, run_in_process

pytestmark = pytest.mark.usefixtures("tests_on_path")

X = torch.randn(1, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


def _model() -> torch.nn.Module:
    from models_floor import cancel

    return cancel().eval()


def test_a_correct_fold_of_a_model_reaching_1e8_passes_on_its_rounding_floor() -> None:
    result = bnfuse_cli.fuse(_model(), X)
    check = result.verdict.outputs["example input"]
    assert result.ok, result.verdict.reasons
    assert len(result.folds) == 2 and check.floor > 1e-9  # the activations reached ~1e8
    # the fold's error is rounding at that magnitude: above rtol x the outputs, within the floor
    (err,), (scale,) = check.leaf_err, check.leaf_scale
    assert err > check.tol.rtol * scale and err <= check.allowed()[0]
    assert "floor" in check.to_dict() and check.to_dict()["floor"] == check.floor


def test_a_wrong_fold_of_it_is_still_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    def corrupt(m: torch.nn.Module) -> None:
        with torch.no_grad():
            m.a.weight.mul_(1 + 1e-7)

    corrupt_after_rewrite(monkeypatch, corrupt)
    result = bnfuse_cli.fuse(_model(), X)
    assert not result.ok and [s.layer for s in result.verdict.failed_sites] == ["a"]
    assert not result.verdict.outputs["example input"].ok  # end to end too, floor and all


def test_the_floor_is_the_rounding_of_the_peak_no_more(monkeypatch: pytest.MonkeyPatch) -> None:
    """The floor held from above: an output error of 20 units of float64 rounding at the activations' peak
    (about 1e8 here: eps x 1e8, some 4e-7 at outputs near 1, added to the head's bias, which no site checks
    against the outputs) is refused end to end; a floor ten times too generous would let it through."""
    peak = bnfuse_cli.fuse(_model(), X).verdict.outputs["example input"].floor / torch.finfo(torch.float64).eps
    assert 1e7 < peak < 1e9  # the model reaches ~1e8, as it is built to

    def corrupt(m: torch.nn.Module) -> None:
        with torch.no_grad():
            m.head.bias.add_(20 * torch.finfo(torch.float64).eps * 1e8)

    corrupt_after_rewrite(monkeypatch, corrupt)
    check = bnfuse_cli.fuse(_model(), X).verdict.outputs["example input"]
    assert not check.ok, (check.leaf_err, check.allowed())


def test_verify_of_a_float64_model_uses_the_same_floor(tmp_path: Path) -> None:
    torch.save(_model().state_dict(), tmp_path / "orig.pth")
    out = tmp_path / "fused.pth"
    args = ["--arch", "models_floor:cancel", "--input-shape", "1,3,8,8"]
    proc = run_bnfuse("convert", str(tmp_path / "orig.pth"), *args, "-o", str(out), cwd=ROOT / "tests")
    assert proc.returncode == 0, proc.stderr
    ok = run_in_process("verify", str(tmp_path / "orig.pth"), str(out), *args, "--json", str(tmp_path / "v.json"),
                        cwd=ROOT / "tests")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    import json

    assert json.loads((tmp_path / "v.json").read_text())["check"]["outputs"]["random inputs"]["floor"] > 1e-9
    from bnfuse_cli.files.table import read_checkpoint
    from bnfuse_cli.files.write import write_checkpoint

    ck = read_checkpoint(out)
    sd = dict(ck.state_dict)
    sd["head.weight"] = sd["head.weight"] * (1 + 1e-5)
    write_checkpoint(tmp_path / "bad.pth", state_dict=sd, metadata=ck.metadata)
    bad = run_in_process("verify", str(tmp_path / "orig.pth"), str(tmp_path / "bad.pth"), *args, cwd=ROOT / "tests")
    assert bad.returncode == 1, bad.stdout + bad.stderr


def test_a_merge_whose_branches_cancel_is_judged_at_the_scale_of_its_branches(monkeypatch: pytest.MonkeyPatch) -> None:
    """The site of a merged difference of two branches of 1e8: the float64 sum and the merged kernel both
    round at the branches' scale, so the site allows units of rounding of the branches, not of the sum;
    a merged kernel 1e-6 off (far below a relative 1e-3 of the sum, far above that rounding) still fails."""
    from models_floor import MergedCancel

    result = bnfuse_cli.fuse(MergedCancel().eval(), X)
    (site,) = [s for s in result.verdict.sites if s.kind == "merge"]
    assert result.ok and site.tolerance > 1e-9 and site.rel_error <= site.tolerance, result.verdict.reasons

    def corrupt(m: torch.nn.Module) -> None:
        with torch.no_grad():
            m.get_submodule(site.layer).weight.mul_(1 + 1e-6)

    corrupt_after_rewrite(monkeypatch, corrupt)
    bad = bnfuse_cli.fuse(MergedCancel().eval(), X)
    assert [s.layer for s in bad.verdict.failed_sites] == [site.layer] and not bad.ok
