"""``bnfuse bench``: the report, its JSON and Markdown, exit codes, and the correctness check.

Timing values are never asserted (they depend on the machine); their structure is.  Models are
the tiny ones in ``bench_tiny.py`` with a few iterations, so the whole file runs in seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from bnfuse_cli import BenchSettings, FuseOptions, SourceOptions
from bnfuse_cli.workflows.bench import DEFAULT_MODELS, ModelBench, Stats, bench, resolve_device, verdict
from bnfuse_cli.inputs import randomize_bn
from bnfuse_cli.cli import app
from bnfuse_cli.checks import OutputCheck, Tolerance, Verdict
from bnfuse_cli.inputs import InputSpec

from bench_tiny import TinyCNN
from conftest import BNFUSE_CMD, ROOT, randomize_bn as randomize_bn_test, run_bnfuse

TINY = "bench_tiny:tiny_cnn"
RESIDUAL = "bench_tiny:tiny_residual"
#: the tiny models as bench loads them by default (random weights), on a small input
SMALL = SourceOptions(weights="none", input_shape="1,3,16,16")
FAST = ["--device", "cpu", "--iters", "3", "--warmup", "1", "--input-shape", "1,3,16,16"]

runner = CliRunner()


def _cli(*args: str):
    return runner.invoke(app, ["bench", *args])


# ----------------------------------------------------------------------------- statistics


def test_stats_quartiles_match_torch_quantile() -> None:
    xs = [3.0, 1.0, 4.0, 1.5, 5.0, 9.0, 2.0, 6.0]
    s = Stats.of(xs)
    t = torch.tensor(xs, dtype=torch.float64)
    assert s.median == pytest.approx(float(t.quantile(0.5)))
    assert s.q1 == pytest.approx(float(t.quantile(0.25)))
    assert s.q3 == pytest.approx(float(t.quantile(0.75)))
    assert s.iqr == pytest.approx(s.q3 - s.q1)
    assert (s.min, s.max, s.n) == (1.0, 9.0, 8)


def _result(orig: list[float], fused: list[float], rel: float = 0.0) -> ModelBench:
    tol = Tolerance.for_dtype(torch.float32)
    check = OutputCheck(tol, reference="float64")
    ref = torch.ones(4, dtype=torch.float64)
    check.add(ref, ref * (1 + rel), ref)
    return ModelBench(model="m", arch="m", weights="none", input=InputSpec((1, 3, 8, 8)), bn_found=1, bn_folded=1,
                      bn_left=[], check=Verdict(tol, {"benchmark run": check}), original_ms=orig, fused_ms=fused)


def test_within_noise_when_speedup_iqr_contains_one() -> None:
    noisy = _result([1.0, 1.0, 1.0, 1.0], [0.8, 1.2, 0.9, 1.1])
    assert noisy.speedup.q1 < 1.0 < noisy.speedup.q3
    assert noisy.within_noise and verdict(noisy) == "within noise"
    clear = _result([2.0, 2.1, 1.9, 2.0], [1.0, 1.0, 1.0, 1.0])
    assert not clear.within_noise and verdict(clear) == "faster"
    assert verdict(clear, 5.0).startswith("BELOW")
    assert verdict(_result([2.0], [1.0], rel=0.5)) == "WRONG OUTPUT"


# ----------------------------------------------------------------------------- library


def test_randomize_bn_measures_statistics_on_the_example() -> None:
    model = TinyCNN().eval()
    x = torch.randn(4, 3, 8, 8)
    n = randomize_bn(model, seed=3, example=(x,))
    assert n == 3
    assert not model.training and not model.bn1.training
    with torch.no_grad():
        y = model.conv1(x)
    assert torch.allclose(model.bn1.running_mean, y.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(model.bn1.running_var, y.var((0, 2, 3), unbiased=True), rtol=1e-4)
    assert model.bn1.momentum == 0.1  # restored
    assert not torch.allclose(model.bn1.weight, torch.ones(8))


def test_randomize_bn_without_example_moves_away_from_identity() -> None:
    model = TinyCNN()
    randomize_bn(model, seed=1)
    for bn in (model.bn1, model.bn2, model.bn3):
        assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))
        assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
        assert (bn.running_var > 0).all()


def test_bench_library_report() -> None:
    seen: list[tuple[str, int, int]] = []
    report = bench([TINY, RESIDUAL], BenchSettings(device="cpu", iters=3, warmup=1), SMALL,
                   progress=lambda d, a, b: seen.append((d, a, b)))
    assert [r.model for r in report.results] == [TINY, RESIDUAL]
    tiny, res = report.results
    assert (tiny.bn_found, tiny.bn_folded, tiny.bn_left) == (3, 3, [])
    assert res.bn_folded == 1 and [n for n, _ in res.bn_left] == ["bn_after_add"]
    for r in report.results:
        assert r.correct and r.error.rel <= r.tolerance
        assert len(r.original_ms) == len(r.fused_ms) == 3
        assert all(t > 0 for t in r.original_ms + r.fused_ms)
        assert r.calls_per_sample >= 1
        assert any("random weights" in n for n in r.notes)
    assert seen and seen[-1][1] == seen[-1][2]
    assert report.passed(0.0) and not report.passed(1e9)
    assert report.environment["device"] == "cpu" and report.environment["torch"] == torch.__version__


def test_bench_catches_a_wrong_fold(monkeypatch: pytest.MonkeyPatch) -> None:
    import bnfuse_cli.engine.passes.fold.rewrite as rewrite

    real = rewrite.apply_plan

    def broken(model, plan):  # noqa: ANN001, ANN202
        real(model, plan)
        with torch.no_grad():
            model.conv2.weight.mul_(1.1)

    import bnfuse_cli.engine.passes.fold as fusion

    monkeypatch.setattr(fusion, "apply_plan", broken)
    report = bench([TINY], BenchSettings(device="cpu", iters=2, warmup=0), SMALL)
    (r,) = report.results
    assert not r.correct and [s.layer for s in r.check.failed_sites] == ["conv2"]
    assert report.incorrect() == [r] and not report.passed()
    result = _cli(TINY, *FAST, "--min-speedup", "0")
    assert result.exit_code == 1, result.output
    assert "fold site conv2 (bn2)" in result.output


def _perturb_unfolded_conv(monkeypatch: pytest.MonkeyPatch, factor: float) -> None:
    """After folding, scale TinyResidual's conv2 (no fold site: its BN follows an add): only the
    end-to-end check can see this."""
    import bnfuse_cli.engine.passes.fold as fusion

    real = fusion.apply_plan

    def perturbed(model, plan):  # noqa: ANN001, ANN202
        real(model, plan)
        with torch.no_grad():
            model.conv2.weight.mul_(factor)

    monkeypatch.setattr(fusion, "apply_plan", perturbed)


def test_bench_float32_tolerance_catches_a_1e_3_output_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 1000x looser float32 tolerance would let this through."""
    _perturb_unfolded_conv(monkeypatch, 1.003)
    (r,) = bench([RESIDUAL], BenchSettings(device="cpu", iters=2, warmup=0), SMALL).results
    assert not r.check.failed_sites and not r.correct
    assert 1e-4 < r.error.rel < 1e-1 and r.tolerance == 1e-4
    assert any("benchmark run: output 0" in why for why in r.check.reasons)


def test_bench_rtol_option_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    _perturb_unfolded_conv(monkeypatch, 1.003)
    (r,) = bench([RESIDUAL], BenchSettings(fuse=FuseOptions(rtol=0.1), device="cpu", iters=2, warmup=0), SMALL).results
    assert r.correct and r.tolerance == 0.1
    result = _cli(RESIDUAL, *FAST, "--rtol", "1e-5")
    assert result.exit_code == 1, result.output


@pytest.mark.parametrize("dtype, autocast", [("float16", None), ("bfloat16", None), ("float32", "bfloat16")])
def test_reduced_precision_is_judged_against_float64_and_its_own_noise(dtype: str, autocast: "str | None") -> None:
    report = bench([TINY], BenchSettings(device="cpu", dtype=dtype, autocast=autocast, iters=2, warmup=0), SMALL)
    (r,) = report.results
    assert r.noise.rel > 1e-4  # the original's own error at this precision
    assert r.correct, r.check.reasons
    d = r.to_dict()
    assert d["error"]["noise_rel"] == r.noise.rel and d["check"]["precision"]["autocast"] == autocast
    assert d["check"]["outputs"]["benchmark run"]["reference"] == "float64"


def test_checkpoint_source_is_not_rerandomised(tmp_path) -> None:  # noqa: ANN001
    model = randomize_bn_test(TinyCNN(), seed=5).eval()
    path = tmp_path / "tiny.pth"
    torch.save(model.state_dict(), path)
    report = bench([str(path)], BenchSettings(device="cpu", iters=2, warmup=0),
                   SourceOptions(weights="none", arch=TINY, input_shape="1,3,16,16"))
    (r,) = report.results
    assert r.weights == "file" and r.bn_folded == 3 and r.correct
    assert not any("random weights" in n for n in r.notes)


def test_default_models_are_torchvision_names() -> None:
    from bnfuse_cli.files.models import torchvision_names

    assert len(DEFAULT_MODELS) >= 4 and set(DEFAULT_MODELS) <= set(torchvision_names())


# ----------------------------------------------------------------------------- CLI


JSON_MODEL_KEYS = {"model", "runtime", "graph_ops", "arch", "weights", "input", "bn_found", "bn_folded", "bn_left", "error", "original_ms",
                   "fused_ms", "speedup", "within_noise", "samples", "calls_per_sample", "warmup", "fold_seconds",
                   "notes"}
STATS_KEYS = {"median", "q1", "q3", "iqr", "min", "max", "n"}


def test_cli_json_and_markdown(tmp_path) -> None:  # noqa: ANN001
    jf, md = tmp_path / "bench.json", tmp_path / "bench.md"
    result = _cli(TINY, RESIDUAL, *FAST, "--json", str(jf), "--markdown", str(md), "--min-speedup", "0")
    assert result.exit_code == 0, result.output
    assert "bn_after_add" in result.output  # the BN left unfolded is listed
    data = json.loads(jf.read_text())
    assert {"bnfuse_version", "date", "environment", "settings", "min_speedup", "passed", "models"} <= set(data)
    assert data["passed"] is True and data["min_speedup"] == 0
    env = data["environment"]
    assert {"torch", "device", "device_name", "threads", "cpu", "cores", "backends"} <= set(env)
    assert {"cudnn_benchmark", "cudnn_allow_tf32", "cuda_matmul_allow_tf32"} <= set(env["backends"])
    st = data["settings"]
    assert st["device"] == "cpu" and st["dtype"] == "float32" and st["iters"] == 3 and st["warmup"] == 1
    assert [m["model"] for m in data["models"]] == [TINY, RESIDUAL]
    for m in data["models"]:
        assert JSON_MODEL_KEYS <= set(m)
        for key in ("original_ms", "fused_ms", "speedup"):
            assert STATS_KEYS <= set(m[key]) and m[key]["n"] == 3
        assert len(m["samples"]["original_ms"]) == 3
        assert m["error"]["ok"] is True and m["error"]["rel"] <= m["error"]["tolerance"]
        assert isinstance(m["within_noise"], bool)
    assert data["models"][1]["bn_left"][0]["norm"] == "bn_after_add"
    assert st["runtime"] == "eager" and all(m["runtime"] == "eager" and m["graph_ops"] is None for m in data["models"])
    text = md.read_text()
    assert text.count(f"| {TINY} |") == 1 and f"| {RESIDUAL} |" in text
    assert "| --- |" in text and "`bn_after_add`" in text


def test_thread_choice_leaves_room_for_the_load() -> None:
    from bnfuse_cli.workflows.timing import Contention, choose_threads

    assert choose_threads(None, 8, 8, 0.3) == (8, None)
    threads, why = choose_threads(None, 8, 8, 5.6)
    assert threads == 2 and "2 threads instead of torch's 8" in why and "5.6 tasks" in why
    assert choose_threads(None, 2, 2, 12.0)[0] == 1  # never fewer than one
    assert choose_threads(3, 8, 8, 12.0) == (3, None)  # --threads says otherwise
    assert not Contention(8, 2, 5.6, 5.0).contended and Contention(8, 3, 5.6, 5.0).busy
    assert Contention(2, 4, 0.0, 0.0).oversubscribed and not Contention(2, 1, None, None).contended


def test_load_meter_does_not_count_its_own_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """A long bench raises the load average itself: its own CPU time is taken off, so it is not a busy machine."""
    import time

    import bnfuse_cli.workflows.timing as timing

    monkeypatch.setattr(timing, "load_average", lambda: 2.0)
    meter = timing.LoadMeter()
    end = time.process_time() + 0.3
    while time.process_time() < end:
        pass
    assert 1.5 < meter.others() < 2.0


@pytest.mark.parametrize("load", [0.0, 2.0])
def test_a_busy_machine_is_said_in_the_table_and_json_and_threads_leave_it_room(
        load: float, monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # noqa: ANN001
    """A stand-in load average of two CPU-bound processes per usable CPU (or none): bench warns in its
    table, JSON and verdicts, times with threads that fit beside the load unless --threads says
    otherwise, and a --min-speedup failure says the CPUs were contended."""
    import bnfuse_cli.workflows.timing as timing

    cpus = timing.usable_cpus()
    monkeypatch.setattr(timing, "load_average", lambda: load * cpus)
    jf = tmp_path / "b.json"
    result = _cli(TINY, *FAST, "--json", str(jf), "--min-speedup", "1000")
    assert result.exit_code == 1, result.output
    data = json.loads(jf.read_text())
    (m,) = data["models"]
    if not load:
        assert not data["contended"] and not m["contention"]["busy"] and "busy machine" not in result.output
        assert data["environment"]["threads"] == min(torch.get_num_threads(), cpus)
        return
    assert data["environment"]["threads"] == 1
    assert data["contended"] and m["contended"] and m["contention"]["busy"] and m["contention"]["threads"] == 1
    assert any(w.startswith(f"{TINY}: busy machine: other work ran {2.0 * cpus:.1f} tasks") for w in data["warnings"])
    assert "warning: " in result.output and "BELOW 1000x (busy machine)" in result.output
    assert "measured on contended CPUs (busy machine" in result.output
    chosen = _cli(TINY, *FAST, "--threads", "2", "--json", str(jf))
    assert chosen.exit_code == 0, chosen.output
    data = json.loads(jf.read_text())
    assert data["environment"]["threads"] == 2 and data["models"][0]["contention"]["busy"]
    assert "2 threads" in chosen.output and "2 threads instead" not in chosen.output


def test_cli_min_speedup_exit_codes() -> None:
    slow = _cli(TINY, *FAST, "--min-speedup", "1000")
    assert slow.exit_code == 1, slow.output
    assert "below --min-speedup 1000" in slow.output
    ok = _cli(TINY, *FAST, "--min-speedup", "0")
    assert ok.exit_code == 0, ok.output


@pytest.mark.parametrize("columns", [40, 200])
def test_messages_do_not_depend_on_the_terminal_width(columns: int) -> None:
    proc = run_bnfuse("bench", TINY, *FAST, "--min-speedup", "1000", cwd=ROOT / "tests", columns=columns)
    assert proc.returncode == 1, proc.stderr
    assert "is below --min-speedup 1000" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dtype", "float8"], "--dtype 'float8'"),
        (["--iters", "0"], "--iters 0"),
        (["--device", "tpu"], "--device 'tpu'"),
        (["--time-budget", "-1"], "--time-budget"),
        (["--autocast", "float8"], "--autocast 'float8'"),
        (["--rtol", "-1"], "--rtol -1"),
        (["--atol", "nan"], "--atol nan"),
    ],
)
def test_cli_usage_errors_exit_2(args: list[str], message: str) -> None:
    result = _cli(TINY, *FAST, *args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


# ----------------------------------------------------------------------------- --runtime export / onnxruntime


def _needs(runtime: str) -> None:
    if runtime == "onnxruntime":
        for name in ("onnx", "onnxscript", "onnxruntime"):
            pytest.importorskip(name)


@pytest.mark.parametrize("runtime", ["export", "onnxruntime"])
def test_runtime_runs_and_judges_the_programs(runtime: str, tmp_path) -> None:  # noqa: ANN001
    _needs(runtime)
    report = bench([TINY, RESIDUAL], BenchSettings(device="cpu", iters=3, warmup=1, runtime=runtime), SMALL)
    assert report.settings["runtime"] == runtime
    for r in report.results:
        assert r.runtime == runtime and r.correct, r.check.reasons
        assert 0 < r.error.rel <= r.tolerance  # the programs' output, not a copy of the reference
        assert len(r.original_ms) == len(r.fused_ms) == 3
        assert runtime in r.check.basis
    if runtime == "onnxruntime":
        assert report.environment["onnxruntime"]
        for r in report.results:
            assert set(r.graph_ops) == {"original", "fused"}
            for g in r.graph_ops.values():
                assert {"bn", "conv", "nodes", "conv_ops"} <= set(g) and g["conv"] >= 2
                assert g["conv"] == sum(g["conv_ops"].values())
            n = report.environment["threads"]  # bench's, which the sessions share
            assert any("ORT_ENABLE_ALL" in x and f"{n} intra-op thread{'' if n == 1 else 's'}," in x for x in r.notes)
    else:
        assert all(r.graph_ops is None for r in report.results)
    jf, md = tmp_path / "b.json", tmp_path / "b.md"
    result = _cli(TINY, *FAST, "--runtime", runtime, "--threads", "1", "--json", str(jf), "--markdown", str(md))
    assert result.exit_code == 0, result.output
    data = json.loads(jf.read_text())
    assert data["settings"]["runtime"] == runtime and data["models"][0]["runtime"] == runtime
    assert f"| {TINY} | {runtime} |" in md.read_text()
    if runtime == "onnxruntime":
        assert data["models"][0]["graph_ops"]["fused"]["bn"] == 0
        assert "ORT graph" in md.read_text() and "BN 0 -> 0" in md.read_text()
        assert any("1 intra-op thread," in n for n in data["models"][0]["notes"])


@pytest.mark.parametrize("runtime", ["export", "onnxruntime"])
def test_runtime_wrong_fold_fails(runtime: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A wrong conv with no fold site: only the end-to-end run in the runtime can see it."""
    _needs(runtime)
    _perturb_unfolded_conv(monkeypatch, 1.003)
    (r,) = bench([RESIDUAL], BenchSettings(device="cpu", iters=2, warmup=0, runtime=runtime), SMALL).results
    assert not r.check.failed_sites and not r.correct
    assert any("benchmark run: output 0" in why for why in r.check.reasons)
    result = _cli(RESIDUAL, *FAST, "--runtime", runtime)
    assert result.exit_code == 1, result.output
    assert "check failed" in result.output


@pytest.mark.parametrize("runtime", ["export", "onnxruntime"])
def test_runtime_judges_the_exported_program_not_the_module(runtime: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused module is right but its exported program is not: the judge must run the program."""
    import copy

    import bnfuse_cli.files.export as export
    import bnfuse_cli.files.onnxfile as onnxfile

    _needs(runtime)
    module, name = (export, "export_program") if runtime == "export" else (onnxfile, "export_onnx")
    real = getattr(module, name)

    def wrong_program(model, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):  # the fused one
            model = copy.deepcopy(model)
            with torch.no_grad():
                model.conv2.weight.mul_(1.01)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(module, name, wrong_program)
    (r,) = bench([TINY], BenchSettings(device="cpu", iters=2, warmup=0, runtime=runtime), SMALL).results
    assert not r.check.failed_sites and not r.correct
    assert any("benchmark run" in why for why in r.check.reasons)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--runtime", "tensorrt"], "--runtime 'tensorrt'"),
        (["--runtime", "export", "--compile"], "--compile applies to --runtime eager"),
        (["--runtime", "export", "--autocast", "bfloat16"], "--autocast applies to --runtime eager"),
        (["--runtime", "onnxruntime", "--dtype", "float16"], "runs float32 graphs"),
        (["--runtime", "onnxruntime", "--channels-last"], "--channels-last applies"),
    ],
)
def test_runtime_usage_errors_exit_2(args: list[str], message: str) -> None:
    if "onnxruntime" in args:
        _needs("onnxruntime")
    result = _cli(TINY, *FAST, *args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_runtime_onnxruntime_without_the_extra_exit_2(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime raises ImportError
    result = _cli(TINY, *FAST, "--runtime", "onnxruntime")
    assert result.exit_code == 2, result.output
    assert "pip install 'bnfuse[onnx]'" in result.output and "--runtime onnxruntime" in result.output
    assert "Traceback" not in result.output


def _not_torchs(folder: Path) -> list[str]:
    """What ``folder`` holds besides torch's own compile cache (``torchinductor_USER``, made by the exporter)."""
    return [p.name for p in folder.iterdir() if not p.name.startswith("torchinductor_")]


def test_onnxruntime_sessions_take_the_models_as_bytes_and_write_nothing(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """No temporary file at all: both sessions get the serialized model from memory, and the graph onnxruntime
    saves after optimising goes to memory too (Linux memfd)."""
    import tempfile

    import bnfuse_cli.files.onnxfile as onnxfile

    _needs("onnxruntime")
    sources = []
    real = onnxfile.open_onnx

    def spy(source, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        sources.append((type(source).__name__, str(kwargs.get("optimized_path"))))
        return real(source, *args, **kwargs)

    monkeypatch.setattr(onnxfile, "open_onnx", spy)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    (r,) = bench([TINY], BenchSettings(device="cpu", iters=2, warmup=0, runtime="onnxruntime"), SMALL).results
    assert r.correct and r.graph_ops["fused"]["bn"] == 0
    assert [kind for kind, _ in sources] == ["bytes", "bytes"]
    if sys.platform.startswith("linux"):
        assert all(path.startswith("/proc/self/fd/") for _, path in sources)
    assert _not_torchs(tmp_path) == []


def test_onnxruntime_above_2_gib_uses_a_private_folder_removed_at_the_end(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    import tempfile

    import bnfuse_cli.files.onnxfile as onnxfile

    _needs("onnxruntime")
    monkeypatch.setattr(onnxfile, "EXTERNAL_AT", 0)  # every model is "above 2 GiB"
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    seen = []
    real = onnxfile.open_onnx

    def spy(source, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        seen.append(Path(source))
        assert sorted(p.name for p in Path(source).parent.iterdir())[0].startswith("model.onnx")
        return real(source, *args, **kwargs)

    monkeypatch.setattr(onnxfile, "open_onnx", spy)
    (r,) = bench([TINY], BenchSettings(device="cpu", iters=2, warmup=0, runtime="onnxruntime"), SMALL).results
    assert r.correct and len(seen) == 2
    assert all(p.parent.parent == tmp_path and p.parent.name.startswith("bnfuse-bench.") for p in seen)
    assert _not_torchs(tmp_path) == []


def test_scratch_folders_of_killed_runs_are_swept(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    import tempfile

    from bnfuse_cli.files import temporaries

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = temporaries._host()
    stale = tmp_path / f"bnfuse-bench.{host}.{dead.pid}.abc123"
    running = tmp_path / f"bnfuse-bench.{host}.{os.getpid()}.def456"  # a run still going (this one)
    other_host = tmp_path / f"bnfuse-bench.elsewhere.{dead.pid}.ghi789"
    for folder in (stale, running, other_host):
        folder.mkdir()
        (folder / "original.onnx").write_bytes(b"partial")
    with temporaries.scratch_folder("bench") as mine:
        assert mine.parent == tmp_path and oct(mine.stat().st_mode & 0o777) == "0o700"
        assert not stale.exists() and running.exists() and other_host.exists()
    assert not mine.exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_FSIZE and a private TMPDIR")
def test_onnxruntime_under_a_file_size_limit_is_exit_2_and_leaves_nothing(tmp_path) -> None:  # noqa: ANN001
    import resource

    _needs("onnxruntime")
    tmp = tmp_path / "tmp"
    tmp.mkdir()

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, resource.RLIM_INFINITY))

    # no bytecode caches: under the limit Python would write them cut short (a partial write, then a rename)
    env = dict(os.environ, TMPDIR=str(tmp), COLUMNS="300", PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run([*BNFUSE_CMD, "bench", TINY, *FAST, "--runtime", "onnxruntime"], capture_output=True,
                          text=True, cwd=ROOT / "tests", env=env, preexec_fn=limit, timeout=600)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    msg = proc.stderr.strip()
    assert msg == (f"error: onnxruntime could not save its optimised graph of the original model of {TINY}: File too "
                   "large (the file size limit, ulimit -f, is below the graph's size: raise it); nothing was left "
                   "behind"), msg
    assert [p.name for p in tmp.rglob("*") if "bnfuse" in p.name or p.suffix in (".onnx", ".data")] == []


def test_ort_op_counts_counts_every_conv_like_op(tmp_path) -> None:  # noqa: ANN001
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    from bnfuse_cli.workflows.bench import ort_op_counts

    nodes = [helper.make_node("Conv", ["x", "w"], ["a"]),
             helper.make_node("FusedConv", ["a", "w"], ["b"], domain="com.microsoft"),
             helper.make_node("Conv", ["b", "w"], ["c"], domain="com.microsoft.nchwc"),
             helper.make_node("BatchNormalization", ["c", "s", "s", "s", "s"], ["d"]),
             helper.make_node("Relu", ["d"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph), str(path))
    counts = ort_op_counts(path)
    assert (counts["bn"], counts["conv"], counts["nodes"]) == (1, 3, 5)
    assert counts["conv_ops"] == {"Conv": 1, "FusedConv (com.microsoft)": 1, "Conv (com.microsoft.nchwc)": 1}


def test_cli_unknown_model_exit_2() -> None:
    result = _cli("resnet_does_not_exist", *FAST)
    assert result.exit_code == 2 and "unknown model" in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present: the no-CUDA error cannot happen")
def test_no_cuda_is_a_clear_error_from_the_real_entry_point() -> None:
    proc = run_bnfuse("bench", TINY, "--device", "cuda", "--iters", "1", cwd=ROOT / "tests")
    assert proc.returncode == 2, proc.stderr
    assert "CUDA is not available" in proc.stderr and "--device cpu" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_no_cuda_raises_device_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from bnfuse_cli.errors import DeviceError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="CUDA is not available"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"


@pytest.mark.gpu
def test_bench_on_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    report = bench([TINY],
                   BenchSettings(device="cuda", dtype="float16", channels_last=True, batch_size=4, iters=5, warmup=2),
                   SourceOptions(weights="none", input_shape="1,3,32,32"))
    (r,) = report.results
    assert report.environment["device_name"] == torch.cuda.get_device_name()
    assert report.settings["device"].startswith("cuda")
    assert r.correct and r.bn_folded == 3 and len(r.original_ms) == 5
    assert r.input.shape == (4, 3, 32, 32)
