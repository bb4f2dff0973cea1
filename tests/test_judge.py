"""The one judge (``bnfuse_cli.checks``): a correct fold passes under the noise of the precision in
use, a gross fold error fails, and a wrong fold that the model's output hides fails by its site.

GPU precision is emulated on the CPU: ``--autocast bfloat16`` (8 mantissa bits, coarser than
TF32's 10), float16/bfloat16 models, and ``bench_tiny:noisy_tiny_cnn``, whose layers add 1e-3
relative noise while ``torch.backends.cudnn.allow_tf32`` is on, as TF32 convolutions do.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision
from typer.testing import CliRunner

import bnfuse_cli.engine.passes.fold as fusion
from bnfuse_cli import BenchSettings, JudgeOptions, SourceOptions, fuse
from bnfuse_cli.workflows.bench import bench
from bnfuse_cli.inputs import randomize_bn
from bnfuse_cli.files.table import read_checkpoint
from bnfuse_cli.files.write import write_checkpoint
from bnfuse_cli.checks import OutputCheck, SiteProbe, Tolerance, Verdict
from bnfuse_cli.cli import app
from bnfuse_cli.workflows.convert import convert
from bnfuse_cli.errors import FoldError
from bnfuse_cli.workflows.verify import verify

from bench_tiny import NoisyTinyCNN, TinyCNN
from conftest import ROOT, build, corrupt_after_rewrite, run_bnfuse

TINY = "bench_tiny:tiny_cnn"
NOISY = "bench_tiny:noisy_tiny_cnn"
SHAPE = "1,3,16,16"
PRECISIONS = [  # (dtype, autocast): as deployed
    ("float32", None),
    ("float16", None),
    ("bfloat16", None),
    ("float32", "bfloat16"),
]
runner = CliRunner()


def _scale(bn: torch.nn.Module) -> torch.Tensor:
    return (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()


# ----------------------------------------------------------------------------- mutants of the fold


def _mutant(monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """Make the one pipeline fold conv2/bn2 wrongly: ``shift`` drops the BN's shift (beta),
    ``scale`` applies its scale twice."""
    real = fusion.apply_plan

    def wrong(model, plan):  # noqa: ANN001, ANN202
        bn = model.bn2
        beta, s = bn.bias.detach().clone(), _scale(bn)
        real(model, plan)
        with torch.no_grad():
            if kind == "shift":
                model.conv2.bias.sub_(beta)
            else:
                model.conv2.weight.mul_(s.reshape(-1, 1, 1, 1))

    monkeypatch.setattr(fusion, "apply_plan", wrong)


@pytest.mark.parametrize("dtype, autocast", PRECISIONS)
def test_bench_correct_fold_passes_at_every_precision(dtype: str, autocast: "str | None") -> None:
    (r,) = bench([TINY], BenchSettings(device="cpu", dtype=dtype, autocast=autocast, iters=2, warmup=0),
                 SourceOptions(input_shape=SHAPE, weights="none")).results
    assert r.correct, r.check.reasons
    assert len(r.check.sites) == 3 and all(s.skipped is None for s in r.check.sites)


@pytest.mark.parametrize("kind", ["shift", "scale"])
@pytest.mark.parametrize("dtype, autocast", PRECISIONS)
def test_bench_gross_fold_error_fails_at_every_precision(monkeypatch: pytest.MonkeyPatch, kind: str, dtype: str,
                                                         autocast: "str | None") -> None:
    _mutant(monkeypatch, kind)
    (r,) = bench([TINY], BenchSettings(device="cpu", dtype=dtype, autocast=autocast, iters=2, warmup=0),
                 SourceOptions(input_shape=SHAPE, weights="none")).results
    assert not r.correct
    assert [s.layer for s in r.check.failed_sites] == ["conv2"]


def test_bench_under_tf32_like_noise_passes_where_a_fixed_1e_4_would_fail() -> None:
    (r,) = bench([NOISY], BenchSettings(device="cpu", iters=2, warmup=0),
                 SourceOptions(input_shape=SHAPE, weights="none")).results
    assert r.noise.rel > 1e-4 and r.error.rel > 1e-4  # a fixed 1e-4 fails this correct fold
    assert r.correct, r.check.reasons
    assert r.check.precision["cudnn_allow_tf32"] is True


@pytest.mark.parametrize("kind", ["shift", "scale"])
def test_bench_under_tf32_like_noise_still_catches_a_gross_error(monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    _mutant(monkeypatch, kind)
    (r,) = bench([NOISY], BenchSettings(device="cpu", iters=2, warmup=0),
                 SourceOptions(input_shape=SHAPE, weights="none")).results
    assert not r.correct and [s.layer for s in r.check.failed_sites] == ["conv2"]


def test_bench_cli_exits_1_naming_the_site(monkeypatch: pytest.MonkeyPatch) -> None:
    _mutant(monkeypatch, "shift")
    res = runner.invoke(app, ["bench", TINY, "--device", "cpu", "--iters", "2", "--warmup", "0", "--input-shape",
                              SHAPE, "--autocast", "bfloat16"])
    assert res.exit_code == 1, res.output
    assert "fold site conv2 (bn2)" in res.output


# ----------------------------------------------------------------------------- verify


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A TinyCNN with random BN statistics, its correct fused file, and two wrong ones."""
    d = tmp_path_factory.mktemp("judge")
    model = TinyCNN().eval()
    randomize_bn(model, seed=3)
    torch.save(model.state_dict(), d / "orig.pth")
    convert(d / "orig.pth", d / "fused.safetensors", source_options=SourceOptions(arch=NOISY, input_shape=SHAPE))
    ck = read_checkpoint(d / "fused.safetensors")
    s = _scale(model.bn2)
    for kind in ("shift", "scale"):
        sd = dict(ck.state_dict)
        if kind == "shift":
            sd["conv2.bias"] = sd["conv2.bias"] - model.bn2.bias.detach()
        else:
            sd["conv2.weight"] = sd["conv2.weight"] * s.reshape(-1, 1, 1, 1)
        write_checkpoint(d / f"{kind}.safetensors", state_dict=sd, metadata=ck.metadata)
    return {"orig": d / "orig.pth", "fused": d / "fused.safetensors", "shift": d / "shift.safetensors",
            "scale": d / "scale.safetensors", "dir": d}


@pytest.mark.parametrize("dtype, autocast", PRECISIONS)
def test_verify_at_every_precision(files: dict[str, Path], dtype: str, autocast: "str | None") -> None:
    """TinyCNN's noisy variant (the arch in the files' metadata), so float32 carries 1e-3 noise too."""
    ok = verify(files["orig"], files["fused"], JudgeOptions(dtype=dtype, autocast=autocast), SourceOptions(arch=NOISY))
    assert ok.ok, ok.verdict.reasons
    assert ok.dtype == (autocast or dtype) and ok.verdict.precision["autocast"] == autocast
    assert len(ok.verdict.sites) == 3 and not ok.verdict.failed_sites
    for kind in ("shift", "scale"):
        bad = verify(files["orig"], files[kind], JudgeOptions(dtype=dtype, autocast=autocast),
                     SourceOptions(arch=NOISY))
        assert not bad.ok
        assert [s.layer for s in bad.verdict.failed_sites] == ["conv2"], kind


def test_verify_cli_device_dtype_autocast_and_json(files: dict[str, Path]) -> None:
    out = files["dir"] / "v.json"
    res = runner.invoke(app, ["verify", str(files["orig"]), str(files["fused"]), "--arch", NOISY, "--device", "cpu",
                              "--dtype", "float32", "--autocast", "bfloat16", "--json", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["ok"] and data["device"] == "cpu" and data["autocast"] == "bfloat16"
    check = data["check"]
    assert check["precision"]["autocast"] == "bfloat16" and check["sites"]["checked"] == 3
    assert check["outputs"]["random inputs"]["reference"] == "float64"
    assert check["outputs"]["random inputs"]["noise"]["rel"] > 1e-3  # bf16's own error, reported
    bad = runner.invoke(app, ["verify", str(files["orig"]), str(files["scale"]), "--arch", NOISY,
                              "--autocast", "bfloat16"])
    assert bad.exit_code == 1 and "fold site conv2 (bn2)" in bad.output


def _tampered(tmp_path: Path, arch: str, scale: "dict[str, float]") -> tuple[Path, Path]:
    """``arch`` (random BatchNorms) saved and converted exactly; then a copy of the fused file with the
    tensors named in ``scale`` scaled: a wrong file for the verdict to refuse."""
    from bnfuse_cli import ConvertOptions, SourceOptions

    torch.save(build(arch, seed=2).state_dict(), tmp_path / "orig.pth")
    convert(tmp_path / "orig.pth", tmp_path / "fused.pth", ConvertOptions(), SourceOptions(arch=arch, input_shape="1,3,8,8"))
    ck = read_checkpoint(tmp_path / "fused.pth")
    sd = {k: v * scale.get(k, 1.0) for k, v in ck.state_dict.items()}
    write_checkpoint(tmp_path / "bad.pth", state_dict=sd, metadata=ck.metadata)
    return tmp_path / "orig.pth", tmp_path / "bad.pth"


def _judged(orig: Path, bad: Path, arch: str, data: "Path | None" = None):  # noqa: ANN202
    from bnfuse_cli import JudgeOptions, SourceOptions

    return verify(orig, bad, JudgeOptions(data=data), SourceOptions(arch=arch)).verdict


def test_verify_counts_the_data_in_its_verdict(tmp_path: Path) -> None:
    """Random inputs pass; only the --data inputs reach the wrong weight (see GatedByMean), and the sites,
    checked on the first data input (below the gate), pass too: the verdict fails on the data alone."""
    orig, bad = _tampered(tmp_path, "models_edge:GatedByMean", {"conv.weight": 1.5})
    inputs = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    inputs[1:] += 5.0  # the first input keeps the gate shut; the batch's mean opens it
    torch.save({"inputs": inputs}, tmp_path / "data.pt")
    assert _judged(orig, bad, "models_edge:GatedByMean").ok  # the gate hides the wrong weight from random inputs
    v = _judged(orig, bad, "models_edge:GatedByMean", tmp_path / "data.pt")
    assert not v.ok and not v.failed_sites and v.outputs["random inputs"].ok and not v.outputs["data"].ok
    assert [r.split(":")[0] for r in v.reasons] == ["data"]


def test_a_wrong_layer_no_site_covers_fails_the_verdict_on_its_outputs(tmp_path: Path) -> None:
    orig, bad = _tampered(tmp_path, "models_guards:Judged", {"head.weight": 1.5})
    v = _judged(orig, bad, "models_guards:Judged")
    assert not v.ok and not v.failed_sites and v.sites and not v.outputs["random inputs"].ok
    assert [r.split(":")[0] for r in v.reasons] == ["random inputs"]


def test_a_wrong_fold_the_outputs_hide_fails_the_verdict_on_its_site(tmp_path: Path) -> None:
    orig, bad = _tampered(tmp_path, "models_guards:Saturated", {"conv.weight": 1.5})
    v = _judged(orig, bad, "models_guards:Saturated")
    assert all(c.ok for c in v.outputs.values())  # every output clamped to 100 in both
    assert not v.ok and [s.layer for s in v.failed_sites] == ["conv"] and len(v.reasons) == 1


def test_wrong_scores_ranked_alike_fail_the_verdict_before_post_processing(tmp_path: Path) -> None:
    """The head scaled by 2 ranks every position as before: the returned top-3 agree, the fold site is
    right, and only the scores that feed the selection tell."""
    orig, bad = _tampered(tmp_path, "models_guards:Ranked", {"head.weight": 2.0, "head.bias": 2.0})
    v = _judged(orig, bad, "models_guards:Ranked")
    assert v.outputs["random inputs"].ok and not v.failed_sites
    assert not v.ok and not v.outputs["before post-processing"].ok
    assert [r.split(":")[0] for r in v.reasons] == ["before post-processing"]


# ----------------------------------------------------------------------------- the judge itself


def test_a_wrong_fold_the_output_hides_fails_by_its_site(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """mobilenet_v3_small: one middle conv's folded weight x1.5 moves the output far less than 1e-4."""
    model = torchvision.models.mobilenet_v3_small().eval()
    randomize_bn(model, seed=0)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    good = fuse(model, x)
    assert good.ok and good.verdict.worst_site.rel_error < 1e-6
    target = good.folds[10].producer
    real = fusion.apply_plan

    def wrong(m, plan):  # noqa: ANN001, ANN202
        real(m, plan)
        with torch.no_grad():
            m.get_submodule(target).weight.mul_(1.5)

    monkeypatch.setattr(fusion, "apply_plan", wrong)
    bad = fuse(model, x)
    assert bad.error.rel < 1e-4  # the end-to-end check alone would pass it
    assert not bad.ok and [s.layer for s in bad.verdict.failed_sites] == [target]
    assert any(target in why for why in bad.verdict.reasons)
    out = tmp_path / "fused.pth"
    torch.save(model.state_dict(), tmp_path / "orig.pth")
    with pytest.raises(FoldError, match=f"fold site {target}"):
        convert(tmp_path / "orig.pth", out, source_options=SourceOptions(arch="mobilenet_v3_small"))
    assert not out.exists()  # nothing written when the check fails


def test_convert_cli_writes_nothing_when_the_judge_says_no(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _mutant(monkeypatch, "scale")
    model = TinyCNN().eval()
    randomize_bn(model, seed=1)
    torch.save(model.state_dict(), tmp_path / "orig.pth")
    out = tmp_path / "fused.safetensors"
    res = runner.invoke(app, ["convert", str(tmp_path / "orig.pth"), "--arch", TINY, "--input-shape", SHAPE,
                              "-o", str(out)])
    assert res.exit_code == 2 and "nothing was written" in res.output and "fold site conv2" in res.output
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["orig.pth"]


def test_judge_with_injected_1e_3_noise_per_layer() -> None:
    """The judge on its own: original and fused both carry 1e-3 relative noise per layer; the
    float64 reference does not.  A correct fold passes where a fixed 1e-4 would fail; a scale
    applied twice at one site fails by that site; a 5% output error fails end to end."""
    import copy

    from bnfuse_cli.engine.analyse import analyse
    from bnfuse_cli.engine.passes.fold.rewrite import apply_plan

    torch.manual_seed(0)
    model = NoisyTinyCNN().eval()
    randomize_bn(model, seed=4)
    exact = copy.deepcopy(model).double()
    tol = Tolerance.for_dtype(torch.float32)
    inputs = [torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    for scale_twice in (False, True):
        fused = copy.deepcopy(model)
        probe = SiteProbe()
        with torch.no_grad():
            analysis = analyse(fused, (inputs[0],), on_input=probe.capture)
            probe.plan(fused, analysis.plan)
            probe.reference(fused)
            s = _scale(fused.bn2)
            apply_plan(fused, analysis.plan)
            if scale_twice:
                fused.conv2.weight.mul_(s.reshape(-1, 1, 1, 1))
            check, blunt = OutputCheck(tol, reference="float64"), OutputCheck(tol, reference="float64")
            for x in inputs:
                ref, orig, out = exact(x.double()), model(x), fused(x)
                check.add(ref, out, orig)
                blunt.add(ref, out * 1.05, orig)
        verdict = Verdict(tol, {"noisy run": check}, probe.check(fused, tol.site_rtol))
        assert check.noise.rel > 1e-4 and check.error.rel > 1e-4  # the noise alone fails a fixed 1e-4
        assert not blunt.ok and "output 0 is" in (blunt.reason("5% off") or "")  # end to end alone
        if scale_twice:
            assert not verdict.ok and [s.layer for s in verdict.failed_sites] == ["conv2"]
        else:
            assert verdict.ok, verdict.reasons
            assert len(verdict.sites) == 3


@pytest.mark.parametrize("off, ok", [(1e-9, True), (1e-4, False)], ids=["1e-9", "1e-4"])
def test_site_check_tolerance_is_pinned_from_both_sides(monkeypatch: pytest.MonkeyPatch, off: float, ok: bool) -> None:
    """In float32 a fold whose weight and bias are ``1 + off`` times the right ones passes the site check for
    off = 1e-9 (below float32's rounding: the correct fold's own ~1e-7 error) and fails it, at that site, for
    off = 1e-4: the site tolerance sits between float32 rounding and a real slip of the fold."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8)).eval()
    randomize_bn(model, seed=5)
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(3))

    def slip(m: torch.nn.Module) -> None:
        with torch.no_grad():
            for t in (m[0].weight, m[0].bias):
                t.copy_(t.double() * (1 + off))

    corrupt_after_rewrite(monkeypatch, slip)
    result = fuse(model, x)
    (site,) = result.verdict.sites
    assert (site.layer, site.norms, site.skipped) == ("0", ["1"], None)
    if ok:
        assert site.ok and site.rel_error < 1e-6, site
    else:  # the check measured the slip itself (not rounding noise) and refused it
        assert not site.ok and 0.9e-4 < site.rel_error < 1.1e-4, site
        assert [s.layer for s in result.verdict.failed_sites] == ["0"] and not result.ok


def test_tolerances_are_validated_before_any_work() -> None:
    from bnfuse_cli.errors import UsageError

    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(UsageError, match="--rtol"):
            Tolerance.for_dtype(torch.float32, rtol=bad)
    proc = run_bnfuse("convert", "resnet18", "--weights", "none", "--rtol", "nan", cwd=ROOT)
    assert proc.returncode == 2 and "--rtol nan" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("layer, shape", [
    (torch.nn.Linear(37, 53), (4, 37)),
    (torch.nn.Conv2d(16, 24, 3, padding=1), (1, 16, 5, 5)),
    (torch.nn.Conv2d(16, 24, 3, padding=1, groups=4, padding_mode="reflect"), (1, 16, 5, 5)),
    (torch.nn.Conv1d(8, 8, 3, groups=8, bias=False), (1, 8, 9)),
    (torch.nn.Conv3d(4, 6, 1, groups=2), (1, 4, 3, 3, 3)),
], ids=["linear", "conv", "grouped-reflect", "depthwise", "conv3d"])
def test_site_layers_run_in_blocks_exactly(monkeypatch: pytest.MonkeyPatch, layer: torch.nn.Module,
                                           shape: tuple[int, ...]) -> None:
    """A large layer is checked a few output channels at a time (bounded float64 memory), with the
    same result as the whole layer."""
    import bnfuse_cli.checks.chains as chains
    from torch.func import functional_call

    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    whole = functional_call(layer, chains._params64(layer), (x.double(),))
    monkeypatch.setattr(chains, "BLOCK_BYTES", 64)  # below one output channel's weights: one block each
    calls = []
    real = chains._blocks
    monkeypatch.setattr(chains, "_blocks", lambda *a, **k: calls.append(1) or real(*a, **k))
    got = chains.run_layer(layer, x)
    assert calls and got.shape == whole.shape
    assert torch.allclose(got, whole, rtol=1e-13, atol=1e-13)
