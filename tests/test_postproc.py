"""Models that post-process their output (score thresholds, top-k, NMS) are judged on the tensors that
feed post-processing: a rounding-level difference that keeps or drops a detection does not refuse a
correct fold, and a wrong fold still fails."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import models_detect as md
from conftest import ROOT, corrupt_after_rewrite, randomize_bn, run_bnfuse

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bnfuse_cli import fuse  # noqa: E402
from bnfuse_cli.checks import SelectionProbe  # noqa: E402
from bnfuse_cli.files.table import read_checkpoint  # noqa: E402
from bnfuse_cli.files.write import write_checkpoint  # noqa: E402
from bnfuse_cli.inputs import InputSpec, make_input  # noqa: E402

TESTS = ROOT / "tests"
ARCH = "models_detect:TinyDetector"


def _scores(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.scores(model.backbone(x)).flatten()


@pytest.fixture
def flipping() -> "tuple[nn.Module, torch.Tensor]":
    """A TinyDetector whose threshold sits exactly between its score and the fused model's score for
    one box, so that rounding alone keeps that box in one model and drops it in the other."""
    model = randomize_bn(md.TinyDetector(), seed=6).eval()
    x = make_input(InputSpec((1, 3, 8, 8)), dtype=torch.float32, seed=0)  # what convert and verify use
    fused = fuse(model, x).model
    a, b = _scores(model, x), _scores(fused, x)
    i = int(torch.nonzero(a != b)[0])
    with torch.no_grad():
        model.threshold.fill_(min(float(a[i]), float(b[i])))
    return model, x


def test_the_probe_keeps_what_feeds_post_processing(flipping: "tuple[nn.Module, torch.Tensor]") -> None:
    model, x = flipping
    with torch.no_grad(), SelectionProbe() as probe:
        model(x)
    # the boxes and the scores the threshold's mask picks from, in the order the model indexes them
    assert [tuple(t.shape) for t in probe.kept] == [(1, 64, 4), (1, 64)]
    with torch.no_grad():
        f = model.backbone(x)
    assert torch.equal(probe.kept[1], model.scores(f).flatten(1))


def test_a_flipped_detection_does_not_refuse_a_correct_fold(flipping: "tuple[nn.Module, torch.Tensor]") -> None:
    model, x = flipping
    result = fuse(model, x)
    final, pre = result.verdict.outputs["example input"], result.verdict.outputs["before post-processing"]
    assert final.mismatch is not None and final.mismatch.startswith("the outputs differ in structure")  # flipped
    assert final.waived is not None and "judged on the tensors that feed post-processing" in final.waived
    assert pre.ok and pre.mismatch is None and result.ok, result.verdict.reasons


def test_a_wrong_fold_still_fails_before_post_processing(flipping: "tuple[nn.Module, torch.Tensor]",
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    model, x = flipping

    def corrupt(m: nn.Module) -> None:
        with torch.no_grad():
            m.backbone[3].weight.mul_(1.5)

    corrupt_after_rewrite(monkeypatch, corrupt)
    result = fuse(copy.deepcopy(model), x)
    assert not result.ok
    assert not result.verdict.outputs["before post-processing"].ok
    assert [s.layer for s in result.verdict.failed_sites] == ["backbone.3"]


def test_convert_and_verify_a_detector_whose_post_processing_flips(flipping: "tuple[nn.Module, torch.Tensor]",
                                                                   tmp_path: Path) -> None:
    model, _ = flipping
    torch.save(model.state_dict(), tmp_path / "orig.pth")
    r = run_bnfuse("convert", str(tmp_path / "orig.pth"), "--arch", ARCH, "--input-shape", "1,3,8,8", "-o",
                   str(tmp_path / "fused.safetensors"), "--json", str(tmp_path / "c.json"), cwd=TESTS)
    assert r.returncode == 0, r.stderr
    import json

    check = json.loads((tmp_path / "c.json").read_text())["check"]["outputs"]
    assert check["example input"]["waived"] and check["before post-processing"]["ok"]
    ok = run_bnfuse("verify", str(tmp_path / "orig.pth"), str(tmp_path / "fused.safetensors"), "--arch", ARCH,
                    cwd=TESTS)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    ck = read_checkpoint(tmp_path / "fused.safetensors")
    sd = dict(ck.state_dict)
    sd["backbone.3.weight"] = sd["backbone.3.weight"] * 1.5
    write_checkpoint(tmp_path / "wrong.safetensors", state_dict=sd, metadata=ck.metadata)
    bad = run_bnfuse("verify", str(tmp_path / "orig.pth"), str(tmp_path / "wrong.safetensors"), "--arch", ARCH,
                     cwd=TESTS, columns=200)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "fold site backbone.3 (backbone.4)" in " ".join(bad.stdout.split()), bad.stdout


def test_a_second_stage_on_selected_values_is_judged_on_its_inputs_not_its_weights() -> None:
    """The second stage's Linear reads chosen features: the probe keeps what enters a selection, not the
    weights of a layer that reads chosen values (a fold changes those), so a correct fold passes."""
    model = randomize_bn(md.TwoStage(), seed=2).eval()
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    with SelectionProbe() as probe, torch.no_grad():
        model(x)
    assert [tuple(t.shape) for t in probe.kept] == [(2, 36), (2, 36, 8)]  # the scores, the features chosen from
    result = fuse(model, x)
    assert {(f.producer, f.norm) for f in result.plan.folds} == {("backbone.0", "backbone.1"), ("fc", "bn")}
    assert result.ok, result.verdict.reasons
    assert result.verdict.outputs["before post-processing"].ok
