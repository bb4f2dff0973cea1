"""Random initialisation that can be checked (``--seed``), and verdicts that fit on a screen."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_bnfuse

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bnfuse_cli.checks import OutputCheck, SiteCheck, Tolerance, Verdict  # noqa: E402
from bnfuse_cli.files.models import build  # noqa: E402
from bnfuse_cli.files.table import read_checkpoint  # noqa: E402
from bnfuse_cli.files.write import write_checkpoint  # noqa: E402


def test_build_draws_random_weights_from_the_seed_and_leaves_the_global_state() -> None:
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, b, c = build("resnet18", seed=0), build("resnet18", seed=0), build("resnet18", seed=1)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.conv1.weight, c.conv1.weight)


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """resnet18 with random weights converted twice: by the real entry point, and by the library."""
    from bnfuse_cli import SourceOptions, convert

    d = tmp_path_factory.mktemp("seed")
    r = run_bnfuse("convert", "resnet18", "--weights", "none", "-o", str(d / "a.safetensors"), cwd=d)
    assert r.returncode == 0, r.stderr
    convert("resnet18", d / "b.safetensors", source_options=SourceOptions(weights="none"))
    return d


def test_convert_with_random_weights_twice_gives_identical_files(converted: Path) -> None:
    assert (converted / "a.safetensors").read_bytes() == (converted / "b.safetensors").read_bytes()
    meta = read_checkpoint(converted / "a.safetensors").metadata
    assert (meta["weights"], meta["seed"]) == ("none", 0)


def test_verify_rebuilds_the_random_original_from_the_recorded_seed(converted: Path) -> None:
    # --seed 7 draws the inputs; the model is rebuilt from the seed the file records (0)
    r = run_bnfuse("verify", "resnet18", "a.safetensors", "--weights", "none", "--seed", "7", cwd=converted,
                   columns=200)
    assert r.returncode == 0, r.stdout + r.stderr
    assert ("note: original built with random weights (--weights none) from seed 0: the seed a.safetensors "
            "records for its conversion of resnet18") in r.stderr


def test_a_factory_without_pretrained_weights_converts_and_verifies_with_no_weights_flag(tmp_path: Path) -> None:
    """``--weights default`` of a package.module:factory is its own initialisation, drawn from --seed and
    recorded, so ``verify`` rebuilds the same original with no flags; a weights name it cannot have is exit 2."""
    factory = "bench_tiny:tiny_cnn_with_statistics"
    out = tmp_path / "t.pth"
    conv = run_bnfuse("convert", factory, "--input-shape", "1,3,16,16", "--seed", "3", "-o", str(out),
                      cwd=ROOT / "tests", columns=200)
    assert conv.returncode == 0, conv.stdout + conv.stderr
    assert f"random initialisation (its own: {factory} has no pretrained weights bnfuse can load" in conv.stderr
    meta = read_checkpoint(out).metadata
    assert (meta["weights"], meta["seed"], meta["arch"]) == ("none", 3, factory)
    ver = run_bnfuse("verify", factory, str(out), cwd=ROOT / "tests", columns=200)
    assert ver.returncode == 0, ver.stdout + ver.stderr
    assert "original built with random weights (its own initialisation) from seed 3" in ver.stderr
    named = run_bnfuse("convert", factory, "--weights", "IMAGENET1K_V1", cwd=ROOT / "tests", columns=200)
    assert named.returncode == 2 and "has no pretrained weights bnfuse can load" in named.stderr, named.stderr


def test_a_factory_is_rebuilt_from_its_seed_whatever_generator_it_draws_from() -> None:
    """Python's ``random`` is seeded as torch's is; a factory that seeds itself from entropy is said to be
    impossible to rebuild."""
    from bnfuse_cli.files.load import load_source

    a, b, c = (build("bench_tiny:python_random_tiny_cnn", seed=s) for s in (4, 4, 5))
    assert torch.equal(a.conv1.weight, b.conv1.weight) and not torch.equal(a.conv1.weight, c.conv1.weight)
    assert not load_source("bench_tiny:python_random_tiny_cnn", seed=4).notes
    src = load_source("bench_tiny:unseeded_tiny_cnn")
    assert src.seed == 0 and any("builds different weights from the same seed" in n for n in src.notes)


def test_a_wrong_conversion_fails_in_a_few_lines(converted: Path) -> None:
    ck = read_checkpoint(converted / "a.safetensors")
    sd = {k: v * 1.5 if k.endswith("conv1.weight") or k.endswith("conv2.weight") else v
          for k, v in ck.state_dict.items()}
    write_checkpoint(converted / "wrong.safetensors", state_dict=sd, metadata=ck.metadata)
    r = run_bnfuse("verify", "resnet18", "wrong.safetensors", "--weights", "none", cwd=converted, columns=100)
    assert r.returncode == 1, r.stdout + r.stderr
    verdict = r.stdout[r.stdout.index("DIFFERENT"):]
    assert "17 of 20 fold sites fail their float64 check: conv1, layer1.0.conv1, layer1.0.conv2 (+14 more; -v or " \
           "--json lists them all); the worst" in " ".join(verdict.split()), verdict
    assert len(verdict.splitlines()) <= 8, verdict
    from bnfuse_cli import JudgeOptions, SourceOptions, verify

    full = verify("resnet18", converted / "wrong.safetensors", JudgeOptions(samples=1), SourceOptions(weights="none"))
    assert len(full.verdict.failed_sites) == 17 and len(full.verdict.reasons) == 18  # -v and --json: every one


def _site(name: str, err: float) -> SiteCheck:
    return SiteCheck(name, [name + ".bn"], rel_error=err, tolerance=1e-6)


def test_summary_counts_names_the_first_and_the_worst() -> None:
    tol = Tolerance.for_dtype("float32")
    out = OutputCheck(tol, reference="float64")
    out.add(torch.ones(3, dtype=torch.float64), torch.ones(3), torch.ones(3))
    sites = [_site("a", 1e-3), _site("b", 1e-9), _site("c", 5e-2), _site("d", 1e-4), _site("e", 2e-4),
             _site("f", 3e-4)]
    v = Verdict(tol, {"random inputs": out}, sites)
    assert v.summary() == [
        "5 of 6 fold sites fail their float64 check: a, c, d (+2 more; -v or --json lists them all); the worst, c, "
        "is 0.05 (relative) away from the original layer and BatchNorm, above 1e-06"]
    assert len(v.reasons) == 5
    one = Verdict(tol, {"random inputs": out}, sites[:2])
    assert one.summary() == one.reasons and len(one.reasons) == 1 and not math.isnan(sites[0].rel_error)


_RANGE = "-9223372036854775808 to 9223372036854775807"


@pytest.mark.parametrize("command", [["convert", "resnet18", "--weights", "none"],
                                     ["verify", "resnet18", "resnet18", "--weights", "none"],
                                     ["bench", "resnet18", "--device", "cpu"]])
def test_a_seed_outside_torchs_range_is_exit_2_naming_the_range(command: list[str], tmp_path: Path) -> None:
    r = run_bnfuse(*command, "--seed", "99999999999999999999999", cwd=tmp_path, columns=300)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.strip() == (f"error: --seed: 99999999999999999999999 is outside the seeds bnfuse takes, {_RANGE} "
                                "(64-bit integers, the range torch's random generators accept with room for the seeds "
                                "drawn after it)"), r.stderr


def test_the_largest_seed_works_for_every_seed_drawn_after_it() -> None:
    from bnfuse_cli.inputs import InputSpec, make_input

    make_input(InputSpec((1, 3)), dtype=torch.float32, seed=2 ** 63 - 1 + 1000)  # verify's seed + i
    build("resnet18", seed=-(2 ** 63))


def test_a_seed_outside_the_range_in_a_files_record_is_exit_2(converted: Path) -> None:
    ck = read_checkpoint(converted / "a.safetensors")
    write_checkpoint(converted / "huge_seed.safetensors", state_dict=ck.state_dict,
                     metadata={**ck.metadata, "seed": 10 ** 30}, force=True)
    r = run_bnfuse("verify", "resnet18", "huge_seed.safetensors", "--weights", "none", cwd=converted, columns=400)
    assert r.returncode == 2, r.stdout + r.stderr
    msg = r.stderr.strip()
    assert msg.startswith("error: huge_seed.safetensors: its bnfuse metadata is malformed (ValueError: its seed "
                          f"1000000000000000000000000000000 is outside the seeds bnfuse takes, {_RANGE}") and \
        "Traceback" not in msg, msg
