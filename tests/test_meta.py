"""The fused file's record of its conversion (``files/meta.py``): one class, one policy for every reader."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import models_merge as mm
from conftest import ROOT, randomize_bn

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bnfuse_cli import SourceOptions, convert, load, verify  # noqa: E402
from bnfuse_cli.engine.passes.fold import Fold  # noqa: E402
from bnfuse_cli.engine.passes.merge import Branch, Merge  # noqa: E402
from bnfuse_cli.errors import CheckpointError  # noqa: E402
from bnfuse_cli.files.meta import FusedMeta, Step  # noqa: E402
from bnfuse_cli.files.table import read_checkpoint  # noqa: E402
from bnfuse_cli.files.write import write_checkpoint  # noqa: E402

ARCH = "models_merge:RepVGG"


@pytest.fixture(autouse=True)
def _cwd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT / "tests")  # models_merge:NAME is found from the current directory


def test_round_trip_and_the_older_form() -> None:
    merge = Merge("block", "add_1", "block.kxk", (Branch("conv", "block.kxk"), Branch("norm", "block.id", "block.id")))
    meta = FusedMeta("x:y", [Step({"fold": (Fold("bn", "conv"),), "merge": (merge,)}),
                             Step({"fold": (Fold("post", "block.kxk"),)})],
                     input={"shape": [1, 3, 8, 8], "kind": "tensor"}, dtype="float32", version="0", seed=4)
    assert FusedMeta.parse(meta.to_dict(), "f") == meta
    assert meta.to_dict()["folds"] == [["conv", "bn", "backward", "identity"], ["block.kxk", "post", "backward",
                                                                                  "identity"]]
    # files written before rounds existed list their folds only: one round; and in the old words
    old = FusedMeta.parse({"format": "bnfuse", "arch": "resnet18", "folds": [["conv1", "bn1", "previous", "identity"],
                                                                             ["c2", "bn2", "next", "identity"]]},
                          "old.pth")
    assert old is not None and old.seed is None
    assert old.steps == [Step({"fold": (Fold("bn1", "conv1"), Fold("bn2", "c2", "forward"))})]
    assert FusedMeta.parse({}, "plain.pth") is None and FusedMeta.parse({"note": "x"}, "plain.pth") is None


@pytest.fixture
def fused(tmp_path: Path) -> Path:
    model = randomize_bn(mm.RepVGG(), seed=3).eval()
    torch.save(model.state_dict(), tmp_path / "orig.pth")
    convert(tmp_path / "orig.pth", tmp_path / "fused.safetensors",
            source_options=SourceOptions(arch=ARCH, input_shape="1,3,16,16"))
    return tmp_path / "fused.safetensors"


def test_a_malformed_record_is_refused_by_load_and_verify_alike(fused: Path) -> None:
    ck = read_checkpoint(fused)
    meta = dict(ck.metadata)
    meta["steps"] = [dict(s) for s in meta["steps"]]
    meta["steps"][0]["folds"] = [["only-two", "fields"]] + meta["steps"][0]["folds"]
    bad = fused.with_name("bad.safetensors")
    write_checkpoint(bad, state_dict=ck.state_dict, metadata=meta)
    expected = (rf"^{bad}: its bnfuse metadata is malformed \(ValueError: not enough values to unpack "
                r"\(expected at least 4, got 2\)\), so the fused structure cannot be rebuilt; convert the original "
                r"again$")
    with pytest.raises(CheckpointError, match=expected):
        load(bad)
    with pytest.raises(CheckpointError, match=expected):  # verify used to skip such rows and check the rest
        verify(fused.with_name("orig.pth"), bad, source_options=SourceOptions(arch=ARCH))


def test_converting_a_fused_file_again_keeps_its_merges(fused: Path) -> None:
    again = fused.with_name("again.safetensors")
    convert(fused, again)
    first, second = read_checkpoint(fused).metadata, read_checkpoint(again).metadata
    assert first["merges"] and second["merges"] == first["merges"]  # the merges used to be dropped here
    assert second["folds"] == first["folds"] and second["steps"][: len(first["steps"])] == first["steps"]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(load(again)(x), load(fused)(x), rtol=0, atol=0)
    assert verify(fused.with_name("orig.pth"), again, source_options=SourceOptions(arch=ARCH)).ok
