"""The engine as a table of passes: a toy pass registered here, in the test, and nowhere else, is
found, applied, judged at its sites, recorded in the fused file, rebuilt by ``load``, checked by
``verify`` and shown in the report, with the reason for what it leaves.  If any of those places
still knew the passes by name, this pass would be missing there and a test below would fail."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import bnfuse_cli
from bnfuse_cli import SourceOptions
from bnfuse_cli.engine.passes import PASSES, Option, Pass
from bnfuse_cli.engine.steps import RunLayer, RunModule, SiteSpec
from conftest import build

ARCH = "models_passes:ToyNet"
SHAPE = (1, 3, 12, 12)


@dataclass(frozen=True)
class ScaleFold:
    scale: str
    conv: str


@dataclass(frozen=True)
class ScaleLeft:
    scale: str
    reason: str


class ScalePass(Pass):
    """Fold a per-channel ``Scale`` into the conv whose output it alone reads: a whole pass, on the
    defaults of :class:`~bnfuse_cli.engine.passes.Pass` (its items' JSON, rows and refusals)."""

    name, key, left_key, again = "scale", "scales", "scales_left", True  # a fold of bn1 follows
    item, rewrites, absorbs = ScaleFold, ("conv",), ()
    title, columns, left_title, left_what = "Scales folded", ("scale", "into"), "Scales left", "scale"

    def __init__(self, twice: bool = False) -> None:
        self.twice = twice  # a wrong fold, for the judge to catch

    def find(self, model: nn.Module, rec: Any, escapes: dict[int, str], plan: Any) -> None:
        from models_passes import Scale

        for name, m in model.named_modules():
            if not isinstance(m, Scale):
                continue
            (call,) = rec.module_calls[id(m)]
            prod = rec.produced.get(id(call.input))
            others = [op for r, op in rec.reads.get(id(call.input), []) if r is None or r.module is not m]
            if prod is None or not isinstance(prod.module, nn.Conv2d) or others or id(call.input) in escapes:
                why = f"{prod.name if prod else 'its input'}'s output is also read by {others[0]}" if others else \
                    "it does not follow a conv"
                plan.left_by(self.name).append(ScaleLeft(name, why))
            else:
                plan.of(self.name).append(ScaleFold(name, prod.name))

    def apply(self, model: nn.Module, items: list[ScaleFold]) -> None:
        self.rebuild(model, items, values=True)

    def rebuild(self, model: nn.Module, items: list[ScaleFold], values: bool = False) -> None:
        for it in items:
            conv = model.get_submodule(it.conv)
            s = model.get_submodule(it.scale).s.detach() ** (2 if self.twice else 1)
            if conv.bias is None:
                conv.bias = nn.Parameter(torch.zeros(conv.out_channels))
            if values:
                with torch.no_grad():
                    conv.weight.mul_(s.view(-1, 1, 1, 1))
                    conv.bias.mul_(s)
            model.set_submodule(it.scale, nn.Identity())

    def sites(self, model: nn.Module, items: list[ScaleFold]) -> list[SiteSpec]:
        return [SiteSpec(self.name, it.conv, it.conv, (it.scale,), (RunLayer(it.conv), RunModule(it.scale)),
                         (RunLayer(it.conv),)) for it in items]

    def row(self, it: ScaleFold) -> tuple[str, ...]:
        return it.scale, it.conv

    def summary(self, plan: Any) -> tuple[str, str]:
        return "scales", f"{len(plan.of(self.name))} folded"


class OptInScales(ScalePass):
    """The same pass, opt-in: its option is one declaration in its row."""

    name, key, left_key = "toy_scale", "toy_scales", "toy_scales_left"
    option = Option("toy_scales", "Fold the toy model's per-channel scales into their convs.")


@pytest.fixture
def scale_pass(tests_on_path: None):  # noqa: ANN201
    """The toy pass, registered as the last row of the table for this test only (bnfuse's own scale
    pass, which would fold the same scales first, leaves the table meanwhile)."""
    row = ScalePass()
    saved = list(PASSES)
    PASSES[:] = [p for p in PASSES if p.name != row.name] + [row]
    yield row
    PASSES[:] = saved


def _toy() -> nn.Module:
    return build(ARCH, seed=1)


def test_a_registered_pass_is_found_applied_and_judged(scale_pass: ScalePass) -> None:
    from bnfuse_cli.render import plan_summary, plan_tables

    model, x = _toy(), torch.randn(SHAPE)
    result = bnfuse_cli.fuse(model, x)
    assert result.ok and result.error.rel < 1e-6
    assert result.plan.of("scale") == [ScaleFold("scale1", "conv1"), ScaleFold("scale3", "conv3")]
    assert result.plan.left_by("scale") == [ScaleLeft("scale2", "conv2's output is also read by add")]
    assert [f.norm for f in result.folds] == ["bn1"]  # the fold pass, after the scale is gone next round
    sites = {(s.kind, s.layer): s for s in result.verdict.sites}
    assert sites[("scale", "conv1")].norms == ["scale1"] and sites[("scale", "conv1")].rel_error < 1e-6
    assert sites[("scale", "conv3")].rel_error < 1e-6 and not any(s.skipped for s in sites.values())
    assert isinstance(result.model.scale1, nn.Identity) and isinstance(result.model.scale2, type(model.scale2))
    data = result.plan.to_dict()
    assert data["scales"] == [{"scale": "scale1", "conv": "conv1"}, {"scale": "scale3", "conv": "conv3"}]
    assert data["scales_left"] == [{"scale": "scale2", "reason": "conv2's output is also read by add"}]
    titles = [t.title for t in plan_tables(result.plan, verbose=True)]
    assert "Scales folded" in titles and "Scales left" in titles
    assert ("scales", "2 folded") in plan_summary(result.plan)


def test_a_wrong_pass_is_caught_at_its_site(scale_pass: ScalePass) -> None:
    scale_pass.twice = True
    result = bnfuse_cli.fuse(_toy(), torch.randn(SHAPE))
    assert not result.ok
    assert sorted(s.layer for s in result.verdict.failed_sites if s.kind == "scale") == ["conv1", "conv3"]


def test_a_registered_pass_is_recorded_rebuilt_and_verified(scale_pass: ScalePass, tmp_path: Path) -> None:
    from bnfuse_cli.files.table import read_checkpoint

    torch.save(_toy().state_dict(), tmp_path / "orig.pth")
    out = tmp_path / "fused.safetensors"
    report = bnfuse_cli.convert(tmp_path / "orig.pth", out,
                                source_options=SourceOptions(arch=ARCH, input_shape="1,3,12,12"))
    assert report.verdict.ok
    steps = read_checkpoint(out).metadata["steps"]
    assert steps[0]["scales"] == [{"scale": "scale1", "conv": "conv1"}, {"scale": "scale3", "conv": "conv3"}]
    assert not steps[0]["folds"]
    assert steps[1]["folds"] == [["conv1", "bn1", "backward", "identity"]] and not steps[1]["scales"]
    fused = bnfuse_cli.load(out)
    assert isinstance(fused.scale1, nn.Identity) and isinstance(fused.scale3, nn.Identity)
    assert fused.conv3.bias is not None
    x = torch.randn(SHAPE)
    with torch.no_grad():
        assert torch.allclose(fused(x), report_model_out(tmp_path / "orig.pth", x), rtol=1e-5, atol=1e-6)
    checked = bnfuse_cli.verify(tmp_path / "orig.pth", out, source_options=SourceOptions(arch=ARCH))
    assert checked.ok
    # conv1 took scale1, then bn1 in the next round: no one site of the original to compare it with
    assert [(s.kind, s.layer) for s in checked.verdict.sites if s.skipped is None] == [("scale", "conv3")]
    assert "1 layer(s) changed in more than one round (conv1): checked end to end only" in checked.notes


def report_model_out(path: Path, x: torch.Tensor) -> torch.Tensor:
    model = _toy()
    model.load_state_dict(torch.load(path))
    with torch.no_grad():
        return model(x)


@pytest.fixture
def opt_in(tests_on_path: None):  # noqa: ANN201
    """The opt-in toy pass as the last row of the table, for this test only."""
    row = OptInScales()
    saved = list(PASSES)
    PASSES[:] = [p for p in PASSES if p.name != "scale"] + [row]
    yield row
    PASSES[:] = saved


def test_an_opt_in_pass_is_one_row_that_becomes_a_flag_an_option_a_record_and_a_report(opt_in: OptInScales,
                                                                                        tmp_path: Path) -> None:
    """One module and one row: the CLI's flags of convert, inspect and bench, the library's pass options,
    the plan, the fused file's record, ``load`` and the report all come from the row."""
    from typer.testing import CliRunner

    from bnfuse_cli import FuseOptions
    from bnfuse_cli.cli import app
    from bnfuse_cli.files.table import read_checkpoint

    runner = CliRunner()
    for command in ("convert", "bench", "inspect"):
        shown = runner.invoke(app, [command, "--help"], env={"COLUMNS": "100"})
        assert shown.exit_code == 0 and "--toy-scales" in shown.output, shown.output
        assert "per-channel scales into their convs" in " ".join(shown.output.split())
    off = bnfuse_cli.fuse(_toy(), torch.randn(SHAPE))
    assert off.plan.of("toy_scale") == [] and off.plan.options == {}
    on = bnfuse_cli.fuse(_toy(), torch.randn(SHAPE), FuseOptions(passes={"toy_scales": True}))
    assert on.ok and on.plan.options == {"toy_scales": True}
    assert on.plan.of("toy_scale") == [ScaleFold("scale1", "conv1"), ScaleFold("scale3", "conv3")]
    with pytest.raises(bnfuse_cli.UsageError, match="toy_scales"):
        FuseOptions(passes={"toy_scale": True})  # a pass name is not its option's name

    torch.save(_toy().state_dict(), tmp_path / "orig.pth")
    out = tmp_path / "fused.pth"
    args = ["convert", str(tmp_path / "orig.pth"), "--arch", ARCH, "--input-shape", "1,3,12,12", "-o", str(out),
            "--json", str(tmp_path / "r.json"), "-v"]
    plain = runner.invoke(app, [*args[:-3], "--json", str(tmp_path / "plain.json")])
    assert plain.exit_code == 0, plain.output
    import json

    assert json.loads((tmp_path / "plain.json").read_text())["toy_scales"] == []
    done = runner.invoke(app, [*args, "--toy-scales", "--force"], env={"COLUMNS": "120"})
    assert done.exit_code == 0, done.output
    assert "Scales folded" in done.output and "scales" in done.output  # its rows, in the report
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["toy_scales"] == [{"scale": "scale1", "conv": "conv1"}, {"scale": "scale3", "conv": "conv3"}]
    assert read_checkpoint(out).metadata["steps"][0]["toy_scales"] == report["toy_scales"]
    fused = bnfuse_cli.load(out)
    assert isinstance(fused.scale1, nn.Identity) and isinstance(fused.scale3, nn.Identity)
    assert bnfuse_cli.verify(tmp_path / "orig.pth", out, source_options=bnfuse_cli.SourceOptions(arch=ARCH)).ok
