"""The public library API: ``fuse``, ``plan``, ``convert`` and ``load`` on real torchvision models.

BN statistics are always randomised.  Expected fold sites are written out from the model's own
structure (resnet18: ``bnN`` follows ``convN``, ``downsample.1`` follows ``downsample.0``), not
taken from bnfuse's analysis.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision import models

import bnfuse_cli
from bnfuse_cli import SourceOptions
from bnfuse_cli.workflows.convert import convert
from bnfuse_cli.workflows.fuse import fuse
from conftest import ROOT, randomize_bn, run_bnfuse

_BN = nn.modules.batchnorm._BatchNorm
SHAPE = (1, 3, 64, 64)
BN_SUFFIXES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _resnet18(seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_bn(models.resnet18(weights=None), seed=seed).eval()


def _x(seed: int = 2, shape: tuple[int, ...] = SHAPE) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _run(model: nn.Module, *args: object) -> torch.Tensor:
    with torch.no_grad():
        return model(*args)


def _rel(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def _resnet18_producer(bn: str) -> str:
    """The conv that feeds ``bn`` in torchvision's resnet18, from its source layout."""
    if bn.endswith("downsample.1"):
        return bn[: -len("1")] + "0"
    head, _, last = bn.rpartition(".")
    assert last.startswith("bn"), bn
    return (head + "." if head else "") + "conv" + last[2:]


def _bn_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, _BN)]


def _expected_fused_keys(original: nn.Module) -> set[str]:
    """Original keys, minus every BN key, plus ``.bias`` of each conv a BN folds into."""
    bns = _bn_names(original)
    bn_keys = {f"{b}.{s}" for b in bns for s in BN_SUFFIXES}
    keys = set(original.state_dict())
    assert bn_keys <= keys
    return (keys - bn_keys) | {_resnet18_producer(b) + ".bias" for b in bns}


# --------------------------------------------------------------------------- fuse


def test_fuse_resnet18_folds_every_bn_and_is_exact() -> None:
    model, x = _resnet18(), _x()
    ref = _run(model, x)
    result = fuse(model, x)

    bns = _bn_names(model)
    assert len(bns) == 20
    assert sorted(f.norm for f in result.folds) == sorted(bns)
    assert {f.norm: f.producer for f in result.folds} == {b: _resnet18_producer(b) for b in bns}
    assert all(f.direction == "backward" and f.replacement == "identity" for f in result.folds)
    assert result.skipped == []
    assert not any(isinstance(m, _BN) for m in result.model.modules())
    for b in bns:
        assert isinstance(result.model.get_submodule(b), nn.Identity)
        assert result.model.get_submodule(_resnet18_producer(b)).bias is not None

    out = _run(result.model, x)
    rel = _rel(ref, out)
    assert rel < 1e-5
    # the reported error is the error on the example input
    assert result.error.rel == pytest.approx(rel, rel=1e-3, abs=1e-12)
    assert result.error.max_abs == pytest.approx(float((out - ref).abs().max()), rel=1e-3, abs=1e-12)
    assert result.error.mismatch is None
    # and it holds on an input the analysis never saw
    x2 = _x(seed=7, shape=(2, 3, 48, 80))
    assert _rel(_run(model, x2), _run(result.model, x2)) < 1e-5


def test_fuse_reports_skipped_with_reasons_densenet() -> None:
    torch.manual_seed(3)
    model = randomize_bn(models.densenet121(weights=None), seed=3).eval()
    x = _x()
    ref = _run(model, x)
    result = fuse(model, x)

    bns = _bn_names(model)
    assert len(bns) == 121
    # every BN is either folded or skipped, never both, never neither
    folded = set(result.plan.folded_norms)
    skipped = {s.norm: s.reason for s in result.skipped}
    assert folded.isdisjoint(skipped) and folded | set(skipped) == set(bns)
    # norm0 follows conv0; each dense layer's norm2 follows its conv1
    assert "features.norm0" in folded
    assert all(b in folded for b in bns if b.endswith(".norm2"))
    # the norms that read a concatenation cannot fold backward, and say why
    cat_fed = [b for b in bns if b.endswith(".norm1") or b.endswith("transition1.norm") or b == "features.norm5"]
    assert cat_fed and all(b in skipped for b in cat_fed)
    # a dense layer's norm1 reads the cat in that layer; transition1.norm and norm5 the cat ending a dense block
    where = {"features.transition1.norm": "features.denseblock1", "features.norm5": "features.denseblock4"}
    want = {b: f"follows cat in {where.get(b, b.rsplit('.', 1)[0])}, not a Conv/Linear output" for b in cat_fed}
    # ... and what stops the fold into the layer after it: a ReLU (norm5's, in place, before the pooling too)
    nor = "; nor can it fold into the layer after it: its output "
    assert all(skipped[b].startswith(want[b] + nor) and "relu in " in skipped[b] for b in cat_fed), \
        {b: skipped[b] for b in cat_fed}
    left = [n for n, m in result.model.named_modules() if isinstance(m, _BN)]
    assert sorted(left) == sorted(skipped)
    assert _rel(ref, _run(result.model, x)) < 1e-5


def test_fuse_inplace_false_leaves_the_original_untouched() -> None:
    model, x = _resnet18(), _x()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = {n: type(m) for n, m in model.named_modules()}

    result = fuse(model, x)

    assert result.model is not model
    assert result.switched_to_eval
    assert model.training, "the caller's model was switched to eval"
    assert not result.model.training
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "original weights or BN stats changed"
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert model.conv1.bias is None


def test_fuse_inplace_true_changes_and_returns_the_same_model() -> None:
    model, x = _resnet18(), _x()
    ref = _run(model, x)
    result = fuse(model, x, inplace=True)
    assert result.model is model
    assert isinstance(model.bn1, nn.Identity) and model.conv1.bias is not None
    assert _rel(ref, _run(model, x)) < 1e-5


def test_fused_state_dict_keys() -> None:
    model = _resnet18()
    fused = fuse(model, _x()).model
    keys = set(fused.state_dict())
    assert keys == _expected_fused_keys(model)
    assert not any(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in keys)


class _TwoInputs(nn.Module):
    """A model called with two positional arguments: ``model(x, gain)``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)
        self.bn1d = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.conv(x))) * gain
        return self.bn1d(self.fc(y.mean((2, 3))))


def test_fuse_tuple_example_input_is_positional_arguments() -> None:
    torch.manual_seed(4)
    model = randomize_bn(_TwoInputs(), seed=4).eval()
    x, gain = _x(shape=(2, 3, 16, 16)), torch.tensor(1.7)
    ref = _run(model, x, gain)
    result = fuse(model, (x, gain))
    assert {(f.norm, f.producer) for f in result.folds} == {("bn", "conv"), ("bn1d", "fc")}
    assert result.skipped == []
    assert _rel(ref, _run(result.model, x, gain)) < 1e-5
    assert result.error.rel < 1e-5


def test_fuse_without_example_input_infers_one() -> None:
    torch.manual_seed(5)
    model = randomize_bn(models.mobilenet_v3_small(weights=None), seed=5).eval()
    result = fuse(model)
    assert len(result.folds) == len(_bn_names(model)) and result.skipped == []
    assert result.error.rel < 1e-5
    x = _x(shape=(1, 3, 64, 64))
    assert _rel(_run(model, x), _run(result.model, x)) < 1e-5


def test_plan_changes_nothing_and_restores_training_mode() -> None:
    model, x = _resnet18(), _x()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    p = bnfuse_cli.plan(model, x)
    assert model.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "plan() updated BN running stats"
    assert sorted(p.norms) == sorted(_bn_names(model))
    assert {f.norm: f.producer for f in p.folds} == {b: _resnet18_producer(b) for b in _bn_names(model)}
    assert p.skipped == []
    assert isinstance(model.bn1, nn.BatchNorm2d)
    # the same plan as fuse() finds
    assert fuse(model, x).plan.folds == p.folds


# --------------------------------------------------------------------------- convert + load


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """An unfused resnet18 state_dict with random BN stats, converted to .pth and .safetensors."""
    d = tmp_path_factory.mktemp("api_convert")
    model = _resnet18(seed=6)
    src = d / "resnet18_unfused.pth"
    torch.save(model.state_dict(), src)
    outs = {}
    for suffix in (".pth", ".safetensors"):
        out = d / f"fused{suffix}"
        report = convert(src, out, source_options=SourceOptions(arch="resnet18", input_shape="1,3,64,64"))
        assert out.is_file() and report.output == str(out)
        outs[suffix] = (out, report)
    return {"model": model, "outs": outs}


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_load_round_trip_equals_fused_model(converted: dict, suffix: str) -> None:
    model: nn.Module = converted["model"]  # type: ignore[assignment]
    out, report = converted["outs"][suffix]  # type: ignore[index]
    assert report.arch == "resnet18"
    assert len(report.plan.folded_norms) == 20 and report.plan.skipped == []
    assert report.error.rel < 1e-5

    loaded = bnfuse_cli.load(out)
    fused = fuse(model, _x()).model
    assert not loaded.training
    assert not any(isinstance(m, _BN) for m in loaded.modules())
    # same structure and the same tensors as fusing in memory
    lsd, fsd = loaded.state_dict(), fused.state_dict()
    assert set(lsd) == set(fsd) == _expected_fused_keys(model)
    worst = max(float((lsd[k].double() - fsd[k].double()).abs().max()) for k in fsd if lsd[k].numel())
    assert worst <= 1e-6, f"loaded tensors differ from fuse() by up to {worst:.3g}"
    # the same outputs on an input neither conversion saw
    x = _x(seed=11, shape=(2, 3, 64, 64))
    out_loaded, out_fused, out_orig = _run(loaded, x), _run(fused, x), _run(model, x)
    assert float((out_loaded - out_fused).abs().max()) <= 1e-6
    assert _rel(out_orig, out_loaded) < 1e-5


def test_safetensors_output_holds_the_fused_keys(converted: dict) -> None:
    from safetensors.torch import load_file

    model: nn.Module = converted["model"]  # type: ignore[assignment]
    out, _ = converted["outs"][".safetensors"]  # type: ignore[index]
    assert set(load_file(str(out))) == _expected_fused_keys(model)


def test_convert_of_a_fused_file_folds_nothing_more(converted: dict, tmp_path: Path) -> None:
    out, _ = converted["outs"][".safetensors"]  # type: ignore[index]
    again = tmp_path / "again.pth"
    report = convert(out, again, source_options=SourceOptions(input_shape="1,3,64,64"))
    assert report.plan.norms == [] and report.plan.folds == []
    assert report.error.rel == 0.0
    x = _x(seed=12)
    assert torch.equal(_run(bnfuse_cli.load(out), x), _run(bnfuse_cli.load(again), x))


# --------------------------------------------------------------------------- public names


def test_public_names_are_the_functions() -> None:
    """Every name in ``__all__`` exists; the API names are the functions and classes, not modules."""
    import inspect

    for name in bnfuse_cli.__all__:
        assert hasattr(bnfuse_cli, name), name
    for name in ("fuse", "plan", "convert", "load", "verify", "bench", "FuseResult", "ConvertReport"):
        value = getattr(bnfuse_cli, name)
        assert inspect.isfunction(value) or inspect.isclass(value), (name, value)
    assert bnfuse_cli.fuse is fuse and bnfuse_cli.convert is convert
    with pytest.raises(AttributeError):
        bnfuse_cli.no_such_name  # noqa: B018


def test_public_names_survive_importing_the_submodules_first() -> None:
    code = textwrap.dedent(
        """
        import inspect
        import bnfuse_cli.workflows.fuse, bnfuse_cli.workflows.convert, bnfuse_cli.workflows.verify, bnfuse_cli.workflows.bench
        import bnfuse_cli
        for name in ("fuse", "plan", "convert", "verify", "bench", "load"):
            assert inspect.isfunction(getattr(bnfuse_cli, name)), (name, getattr(bnfuse_cli, name))
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr


# ----------------------------------------------------------------------------- one prepared source


def test_source_options_are_checked_when_made() -> None:
    """A bad input shape is refused by the options object itself, before any source is touched."""
    with pytest.raises(bnfuse_cli.UsageError, match=r"--input-shape '1,0,8' is not a shape"):
        bnfuse_cli.SourceOptions(input_shape="1,0,8")
    # the keyword shorthand of bnfuse 0.1 (deprecated): both forms at once, or a misspelt keyword, is refused
    with pytest.warns(DeprecationWarning), \
            pytest.raises(bnfuse_cli.UsageError, match="either as options=SourceOptions"):
        convert("resnet18", None, options=bnfuse_cli.SourceOptions(), weights="none")
    with pytest.warns(DeprecationWarning), pytest.raises(TypeError, match="unexpected keyword argument.*weigths"):
        convert("resnet18", None, weigths="none")


def test_convert_of_a_prepared_source_loads_nothing_again_and_fuses_on_its_input(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``prepare`` loads once; ``convert(prepared)`` neither loads again nor makes another input: the
    folds are judged on exactly the prepared example input, and its counts are the report's."""
    import bnfuse_cli.workflows.fuse as fusion
    import bnfuse_cli.workflows.source as source

    prep = bnfuse_cli.prepare("resnet18", bnfuse_cli.SourceOptions(weights="none", input_shape="1,3,48,40", seed=5))
    assert prep.spec.shape == (1, 3, 48, 40) and prep.dtype == torch.float32
    assert prep.args[0].shape == (1, 3, 48, 40) and prep.arch == "resnet18" and prep.origin.seed == 5
    assert prep.params == sum(p.numel() for p in models.resnet18().parameters())
    randomize_bn(prep.model, seed=5)

    def no_load(*a: object, **k: object) -> None:
        raise AssertionError("loaded again")

    monkeypatch.setattr(source, "load_source", no_load)
    seen = []
    real = fusion._rounds
    monkeypatch.setattr(fusion, "_rounds", lambda model, args, *a: seen.append(args) or real(model, args, *a))
    report = convert(prep, tmp_path / "f.safetensors")
    assert seen and seen[0] is prep.args
    assert report.verdict.ok
    assert report.input.shape == (1, 3, 48, 40) and report.params_before == prep.params
    assert report.params_after < report.params_before and len(report.plan.folds) == 20
    fused = bnfuse_cli.load(tmp_path / "f.safetensors")
    assert sum(isinstance(m, _BN) for m in fused.modules()) == 0


def test_each_workflow_takes_a_few_arguments_and_one_options_object() -> None:
    import inspect

    import bnfuse_cli

    for name in ("fuse", "convert", "verify", "bench"):
        params = inspect.signature(getattr(bnfuse_cli, name)).parameters
        assert len(params) <= 6, (name, list(params))
    assert {"FuseOptions", "ConvertOptions", "JudgeOptions", "BenchSettings", "SourceOptions"} <= set(bnfuse_cli.__all__)


def test_the_keywords_of_0_1_still_work_with_a_deprecation_warning(tmp_path: Path) -> None:
    """``fuse(model, x, rtol=..., unwrap=True)`` and ``convert(src, out, arch=..., force=True)`` mean what the
    options objects say, for one release, and warn; both at once is refused."""
    from bnfuse_cli import ConvertOptions, FuseOptions, SourceOptions, UsageError, convert, fuse

    model = randomize_bn(models.resnet18()).eval()
    x = torch.randn(1, 3, 32, 32)
    with pytest.warns(DeprecationWarning, match=r"fuse\(merge=, rtol=, unwrap=\)"):
        old = fuse(model, x, rtol=1e-3, merge=False, unwrap=True)
    new = fuse(model, x, FuseOptions(rtol=1e-3, passes={"merge": False, "unwrap": True}))
    assert old.verdict.tolerance.rtol == new.verdict.tolerance.rtol == 1e-3
    assert old.plan.options == new.plan.options == {"merge": False, "unwrap": True}
    assert [u.wrapper for u in old.plan.of("unwrap")] == [u.wrapper for u in new.plan.of("unwrap")] != []
    with pytest.raises(UsageError, match="not both"):
        fuse(model, x, FuseOptions(), rtol=1e-3)
    with pytest.warns(DeprecationWarning), pytest.raises(TypeError, match="unexpected keyword"):
        fuse(model, x, unknown=1)
    torch.save(model.state_dict(), tmp_path / "r.pth")
    with pytest.warns(DeprecationWarning, match=r"convert\(force=\) is deprecated: pass ConvertOptions") as own, \
            pytest.warns(DeprecationWarning, match="source_options") as loading:
        r = convert(tmp_path / "r.pth", tmp_path / "f.pth", arch="resnet18", input_shape="1,3,32,32", force=True)
    assert r.verdict.ok and r.arch == "resnet18"
    # each warning names the caller's line, not a line of bnfuse
    assert {Path(w.filename).name for w in (*own, *loading) if w.category is DeprecationWarning} == {"test_api.py"}
    r2 = convert(tmp_path / "r.pth", tmp_path / "f.pth", ConvertOptions(force=True),
                 SourceOptions(arch="resnet18", input_shape="1,3,32,32"))
    assert r2.plan.to_dict() == r.plan.to_dict()


def test_the_help_names_every_output_format_and_fits_80_columns() -> None:
    """The suffixes come from the format table (.onnx included); flags show as flags, arguments as a person
    writes them, and no line passes the terminal's width."""
    from bnfuse_cli.files.table import FORMATS

    for command in ("convert", "inspect", "verify", "bench"):
        proc = run_bnfuse(command, "--help", columns=80)
        assert proc.returncode == 0, proc.stderr
        assert max(len(line) for line in proc.stdout.splitlines()) <= 80, proc.stdout
        assert "<bool>" not in proc.stdout and "{" not in proc.stdout.splitlines()[0], proc.stdout
        if command == "convert":
            text = " ".join(proc.stdout.split())
            assert all(s in text for f in FORMATS for s in f.written), text
            assert "Usage: python -m bnfuse_cli convert [OPTIONS] SOURCE..." in proc.stdout
            assert "timm:NAME" in text and "package.module:factory" in text and "--tolerance" not in text
        if command == "verify":
            assert "[OPTIONS] ORIG FUSED" in proc.stdout
