"""``--unwrap``: a wrapper left calling one layer alone (a Sequential of a conv and its folded BatchNorm,
a merged block) is replaced by that layer in a round of its own; off by default, the names stay."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import bnfuse_cli
from bnfuse_cli import FuseOptions
from conftest import build, round_trip

pytestmark = pytest.mark.usefixtures("tests_on_path")

ARCH = "models_unwrap:Wrapped"
X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def _model() -> nn.Module:
    return build(ARCH, seed=5)


def _module_calls(model: nn.Module, x: torch.Tensor) -> int:
    calls: list[int] = []
    hooks = [m.register_forward_pre_hook(lambda *_: calls.append(1)) for m in model.modules()]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return len(calls)


def test_off_by_default_every_name_stays() -> None:
    result = bnfuse_cli.fuse(_model(), X)
    assert result.ok and not result.plan.of("unwrap") and not result.plan.left_by("unwrap")
    assert isinstance(result.model.stem, nn.Sequential) and "stem.c.weight" in result.model.state_dict()


def test_each_wrapper_of_one_call_becomes_its_layer_exactly() -> None:
    model = _model().double()
    with torch.no_grad():
        ref = model(X.double())
    plain = bnfuse_cli.fuse(model, X.double())
    result = bnfuse_cli.fuse(model, X.double(), FuseOptions(passes={"unwrap": True}))
    assert result.ok, result.verdict.reasons
    with torch.no_grad():
        assert float((result.model(X.double()) - ref).norm() / ref.norm()) < 1e-12
    done = {(u.wrapper, u.child) for u in result.plan.of("unwrap")}
    assert done == {("stem", "stem.c"), ("nested.0", "nested.0.c"), ("nested", "nested.0"),
                    ("mixer", "mixer.conv"), ("numbered", "numbered.0")}
    for name in ("stem", "nested", "mixer", "numbered"):
        assert type(result.model.get_submodule(name)) is nn.Conv2d, name
    assert {(w.wrapper, w.reason) for w in result.plan.left_by("unwrap")} == {
        ("reached", "the model calls reached.c without it"), ("twice", "it is held under more than one name")}
    # a Sequential and its Identity: two module calls less (stem, numbered); the nested pair three;
    # the merged block (whose rewritten forward already skips its Identity) one
    assert _module_calls(plain.model, X.double()) - _module_calls(result.model, X.double()) == 2 + 2 + 3 + 1
    sites = [s for s in result.verdict.sites if s.kind == "unwrap"]
    assert {s.layer for s in sites} == {"stem", "nested", "mixer", "numbered"}  # nested.0: inside nested's
    assert all(s.rel_error is not None and s.rel_error < 1e-12 for s in sites)


def test_convert_unwrap_is_saved_rebuilt_and_verified(tmp_path: Path) -> None:
    from bnfuse_cli.render import plan_summary

    rt = round_trip(_model(), ARCH, "2,3,8,8", tmp_path, passes={"unwrap": True})
    assert rt.ok and ("unwrapped", "5 wrappers of one call -> the layer they call") in plan_summary(rt.report.plan)
    assert {u.wrapper for u in rt.report.plan.of("unwrap")} == {"stem", "nested.0", "nested", "mixer", "numbered"}
    keys = set(rt.fused.state_dict())
    assert {"stem.weight", "nested.weight", "mixer.weight", "numbered.weight"} <= keys
    assert not any(k.startswith(("stem.c.", "numbered.0.")) for k in keys)
    assert rt.rel(X) < 1e-6


def test_an_exported_program_unwraps_by_default_and_a_state_dict_keeps_its_names(tmp_path: Path) -> None:
    """No name of a .pt2 program reaches the user: it unwraps unless --no-unwrap, and says so; a .safetensors
    keeps its keys unless --unwrap; bench's fused side unwraps."""
    from bnfuse_cli import BenchSettings, ConvertOptions, FuseOptions, SourceOptions, convert

    torch.save(_model().state_dict(), tmp_path / "orig.pth")
    src = SourceOptions(arch=ARCH, input_shape="2,3,8,8")
    pt2 = convert(tmp_path / "orig.pth", tmp_path / "f.pt2", source_options=src)
    kept = convert(tmp_path / "orig.pth", tmp_path / "k.pt2", ConvertOptions(FuseOptions(passes={"unwrap": False})), src)
    st = convert(tmp_path / "orig.pth", tmp_path / "f.safetensors", source_options=src)
    assert len(pt2.to_dict()["unwraps"]) == 5 and kept.to_dict()["unwraps"] == [] == st.to_dict()["unwraps"]
    note = next(n for n in pt2.notes if "on by default" in n)
    assert note.startswith("--unwrap is on by default for .pt2") and "--no-unwrap keeps its structure" in note
    assert not any("on by default" in n for n in st.notes + kept.notes)
    program = torch.export.load(str(tmp_path / "f.pt2"))
    assert "stem.weight" in program.state_dict and "stem.c.weight" not in program.state_dict
    assert "stem.c.weight" in bnfuse_cli.load(tmp_path / "f.safetensors").state_dict()
    assert bnfuse_cli.verify(tmp_path / "orig.pth", tmp_path / "f.pt2", source_options=src).ok
    bench = bnfuse_cli.bench([ARCH], BenchSettings(device="cpu", iters=2, warmup=0),
                             SourceOptions(weights="none", input_shape="2,3,8,8"))
    assert bench.settings["unwrap"] is True and bench.results[0].correct


def _single_layer_wrappers(keys: "list[str]") -> "list[str]":
    """Modules that, by a state_dict's names, hold nothing of their own and exactly one child, which holds
    tensors of its own (a layer): wrappers of one layer."""
    own: dict[str, set[str]] = {}
    children: dict[str, set[str]] = {}
    for key in keys:
        parts = key.split(".")
        own.setdefault(".".join(parts[:-1]), set()).add(parts[-1])
        for i in range(len(parts) - 1):
            parent, child = ".".join(parts[:i]), ".".join(parts[:i + 1])
            children.setdefault(parent, set()).add(child)
    return sorted(p for p, kids in children.items() if p and p not in own and len(kids) == 1 and next(iter(kids)) in own)


@pytest.mark.zoo
def test_repvit_exported_as_pt2_calls_no_wrapper_of_one_layer_as_timms_own_does_not(tmp_path: Path) -> None:
    """``bnfuse convert timm:repvit_m0_9 --weights none -o r.pt2`` unwraps by default: the program holds no
    wrapper of a single layer, like timm's re-parameterised RepViT, and the report says so."""
    timm = pytest.importorskip("timm")
    from conftest import ROOT, run_bnfuse

    out = tmp_path / "r.pt2"
    proc = run_bnfuse("convert", "timm:repvit_m0_9", "--weights", "none", "-o", str(out), cwd=ROOT, columns=200,
                      timeout=1200)
    assert proc.returncode == 0, proc.stderr
    assert "--unwrap is on by default for .pt2" in " ".join(proc.stderr.split()), proc.stderr
    ours = _single_layer_wrappers(list(torch.export.load(str(out)).state_dict))
    ref = timm.create_model("repvit_m0_9", pretrained=False).eval()
    timm.utils.model.reparameterize_model(ref)
    theirs = _single_layer_wrappers(list(ref.state_dict()))
    assert len(ours) <= len(theirs), (ours[:10], theirs[:10])
