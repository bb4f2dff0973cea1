"""How long does bnfuse's fold pass take, next to torch.fx's fuser, on the same model?

The fold pass is what a conversion adds on top of loading and saving:
``engine.analyse.analyse(model, args)`` (one recorded forward pass) plus the fold pass's ``apply_plan``.  Model
building, the deep copy each run starts from, and the output check are not timed.  The analysis
runs on a small input (default 1x3x64x64): a CNN's data flow does not depend on the resolution,
so the pass costs a 64x64 forward, not a 224x224 one.  torch.fx's fuser
(``torch.fx.experimental.optimization.fuse``) needs no input: it traces symbolically; it runs
with ``inplace=True`` on its own fresh copy, so its default deep copy is not timed either
(it is printed separately).  The two alternate, run after run, in one process; medians are
printed, at one torch thread and at torch's default thread count (both models use the same).
bnfuse's pass includes a real forward pass, which torch.fx does not run; in ``bnfuse convert``
that forward is also the reference output of the error check, so the pass beyond it (recording
overhead plus the fold) is printed too.  Then one bnfuse pass runs under cProfile to show
where its time goes.

    python scripts/bench_fold_vs_fx.py [--model resnet50] [--runs 15] [--threads 1,default]
        [--analysis-shape 1,3,64,64]
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import datetime
import gc
import io
import os
import pstats
import statistics
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50", help="torchvision model name (random weights)")
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--threads", default="1,default",
                        help="torch intra-op thread counts to measure, comma-separated ('default': torch's own choice)")
    parser.add_argument("--analysis-shape", default="1,3,64,64")
    parser.add_argument("--no-profile", action="store_true")
    opts = parser.parse_args()

    import torch
    import torchvision
    from torch.fx.experimental.optimization import fuse as fx_fuse

    from bnfuse_cli.workflows.bench import machine_info
    from bnfuse_cli.inputs import randomize_bn
    from bnfuse_cli.engine.analyse import analyse
    from bnfuse_cli.checks import compare
    from bnfuse_cli.inputs import parse_shape
    from bnfuse_cli.engine.passes.fold.rewrite import apply_plan

    info = machine_info()
    print(f"# bench_fold_vs_fx: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}")
    print(f"machine: {info['cpu']}, {info['cores']} cores, {info['os']}; python {info['python']}, "
          f"torch {torch.__version__}, torchvision {torchvision.__version__}")

    torch.manual_seed(0)
    model = torchvision.models.get_model(opts.model, weights=None).eval()
    randomize_bn(model, seed=0)
    n_params = sum(p.numel() for p in model.parameters())
    x_small = torch.randn(parse_shape(opts.analysis_shape))
    x_check = torch.randn(1, 3, 224, 224)
    print(f"model: {opts.model}, {n_params / 1e6:.1f}M parameters, random weights, randomised BN statistics; "
          f"bnfuse analysis input {tuple(x_small.shape)}; {opts.runs} alternating runs, median (min-max)\n")

    def measure(threads_label: str) -> None:
        def run_bnfuse() -> tuple[float, float, torch.nn.Module, int]:
            m = copy.deepcopy(model)
            gc.collect()
            t0 = time.perf_counter()
            analysis = analyse(m, (x_small,))
            t1 = time.perf_counter()
            apply_plan(m, analysis.plan)
            t2 = time.perf_counter()
            return t1 - t0, t2 - t1, m, len(analysis.plan.folded_norms)

        def run_fx() -> tuple[float, torch.nn.Module]:
            m = copy.deepcopy(model)
            gc.collect()
            t0 = time.perf_counter()
            fused = fx_fuse(m, inplace=True)
            return time.perf_counter() - t0, fused

        ana, rew, tot, fx, fwd, cp = [], [], [], [], [], []
        ours = theirs = None
        folded = 0
        with torch.no_grad():
            model(x_small)  # warm the allocator and kernels once for everyone
        for i in range(opts.runs):
            order = ("bnfuse", "fx") if i % 2 == 0 else ("fx", "bnfuse")
            for who in order:
                if who == "bnfuse":
                    a, r, ours, folded = run_bnfuse()
                    ana.append(a)
                    rew.append(r)
                    tot.append(a + r)
                else:
                    f, theirs = run_fx()
                    fx.append(f)
            with torch.no_grad():
                t0 = time.perf_counter()
                model(x_small)
                fwd.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            copy.deepcopy(model)
            cp.append(time.perf_counter() - t0)

        with torch.no_grad():
            ref = model(x_check)
            err_ours = compare(ref, ours(x_check))
            err_fx = compare(ref, theirs(x_check))
        bn_left_fx = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in theirs.modules())

        def fmt(xs: list[float]) -> str:
            return f"{statistics.median(xs) * 1e3:8.1f} ms  ({min(xs) * 1e3:.1f}-{max(xs) * 1e3:.1f})"

        print("| step | time |")
        print("| --- | --- |")
        print(f"| bnfuse analyse (recorded forward at {opts.analysis_shape}) | {fmt(ana)} |")
        print(f"| bnfuse apply_plan (fold arithmetic + module surgery) | {fmt(rew)} |")
        print(f"| **bnfuse fold pass total** | {fmt(tot)} |")
        print(f"| **torch.fx fuse (trace + fold + recompile, inplace)** | {fmt(fx)} |")
        print(f"| for reference: plain forward at {opts.analysis_shape} | {fmt(fwd)} |")
        print(f"| for reference: copy.deepcopy(model) (fx's default inplace=False adds this) | {fmt(cp)} |")
        extra = [t - f for t, f in zip(tot, fwd)]  # each round: the bnfuse pass minus that round's plain forward
        print(f"| bnfuse pass beyond its forward pass (recording overhead + fold; per-run difference) | {fmt(extra)} |")
        ratio = statistics.median(tot) / statistics.median(fx)
        verdict = "at least as fast" if ratio <= 1.0 else "slower"
        print(f"\nbnfuse / torch.fx (medians): {ratio:.2f}x ({verdict}); without the forward pass that "
              f"`bnfuse convert` reuses as the check's reference output: {statistics.median(extra) / statistics.median(fx):.2f}x")
        print(f"folded: bnfuse {folded} BN, rel error at 224x224 {err_ours.rel:.2e}; "
              f"torch.fx leaves {bn_left_fx} BN modules, rel error {err_fx.rel:.2e}")


    default_threads = torch.get_num_threads()
    for label in opts.threads.split(","):
        n = default_threads if label.strip() == "default" else int(label)
        torch.set_num_threads(n)
        print(f"\n## {n} torch thread{'s' if n != 1 else ''}{' (torch default)' if n == default_threads else ''}\n")
        measure(label)
    torch.set_num_threads(default_threads)

    if not opts.no_profile:
        prof = cProfile.Profile()
        m = copy.deepcopy(model)
        prof.enable()
        apply_plan(m, analyse(m, (x_small,)).plan)
        prof.disable()
        buf = io.StringIO()
        stats = pstats.Stats(prof, stream=buf)
        stats.sort_stats("tottime").print_stats(12)
        print("\ncProfile of one bnfuse fold pass, top 12 by own time:")
        lines = buf.getvalue().splitlines()
        start = next((i for i, ln in enumerate(lines) if ln.strip().startswith("ncalls")), 0)
        total_line = next((ln for ln in lines if "function calls" in ln), "")
        print(total_line.strip())
        for ln in lines[start:]:
            if ln.strip():
                print(ln.replace(os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + "/", "")
                      .replace(os.path.dirname(torch.__file__), "torch"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
