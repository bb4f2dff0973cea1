"""How many BatchNorms does bnfuse leave, compared with onnxruntime's own BN folding?

For each model (random weights, random BN affine parameters with statistics measured on random
input, eval mode, float32, a small input):

1. export the *unfused* model with the legacy TorchScript exporter, ``training=EVAL`` and
   ``do_constant_folding=False`` so the exporter itself folds nothing; check that the graph has
   one ``BatchNormalization`` node per BN call that ran;
2. let onnxruntime optimise it at ``ORT_ENABLE_BASIC`` (where its Conv+BN fusion lives), save
   the optimised graph and count the ``BatchNormalization`` nodes left;
3. fuse the model with bnfuse and count the BN calls left in the fused model (BNs that never
   run are not in the ONNX graph either, so they are not counted on either side).

Prints a markdown table and exits 1 if bnfuse leaves more BNs than onnxruntime on any model
(2 if a model could not be exported or counted).

    python scripts/compare_onnxruntime.py [--models resnet18,timm:mixnet_s] [--keep DIR]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

#: (name, input shape); torchvision names, or timm:NAME
MODELS: list[tuple[str, tuple[int, ...]]] = [
    ("resnet18", (1, 3, 64, 64)),
    ("resnet50", (1, 3, 64, 64)),
    ("mobilenet_v2", (1, 3, 64, 64)),
    ("mobilenet_v3_large", (1, 3, 64, 64)),
    ("efficientnet_b0", (1, 3, 64, 64)),
    ("densenet121", (1, 3, 64, 64)),
    ("regnet_y_400mf", (1, 3, 64, 64)),
    ("shufflenet_v2_x1_0", (1, 3, 64, 64)),
    ("googlenet", (1, 3, 64, 64)),
    ("mnasnet1_0", (1, 3, 64, 64)),
    ("inception_v3", (1, 3, 75, 75)),
    ("r3d_18", (1, 3, 4, 64, 64)),
    ("fcn_resnet50", (1, 3, 64, 64)),
    ("deeplabv3_mobilenet_v3_large", (1, 3, 64, 64)),
    ("timm:efficientnet_b0", (1, 3, 64, 64)),
    ("timm:tf_efficientnet_b0", (1, 3, 64, 64)),
    ("timm:mixnet_s", (1, 3, 64, 64)),
    ("timm:dla34", (1, 3, 64, 64)),
    ("timm:cspresnet50", (1, 3, 64, 64)),
    ("timm:resnest14d", (1, 3, 64, 64)),
    ("timm:ghostnet_100", (1, 3, 64, 64)),
    ("timm:hrnet_w18_small", (1, 3, 64, 64)),
    ("timm:levit_128s", (1, 3, 224, 224)),
]


@dataclass
class Row:
    model: str
    bn_modules: int = 0
    bn_calls: int = 0
    exported: int = 0
    bnfuse_left: int = 0
    ort_left: int = 0
    #: the unfused float32 model against its own float64 run: the rounding noise of the model itself
    noise32: float = float("nan")
    #: the fused float32 model against the unfused float64 run
    fused32_vs_64: float = float("nan")
    #: exactness of the fold itself: fused against unfused, both in float64
    exact64: float = float("nan")
    seconds: float = 0.0
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and self.bnfuse_left <= self.ort_left


def _build(name: str, shape: tuple[int, ...]) -> Any:
    import torch

    from bnfuse_cli.inputs import randomize_bn
    from bnfuse_cli.files.models import build

    torch.manual_seed(0)  # the same random weights on every run
    kwargs: dict[str, Any] = {}
    if name in ("fcn_resnet50", "deeplabv3_mobilenet_v3_large"):
        kwargs["weights_backbone"] = None
    model = build(name, **kwargs).eval().to(torch.float32)
    # random affine parameters, then running statistics measured on random input (as training
    # would): activations stay of order 1, so the float32 error column measures the fold rather
    # than a random network's own amplification of rounding noise
    calib = torch.randn((2, *shape[1:]), generator=torch.Generator().manual_seed(1))
    randomize_bn(model, seed=0, example=(calib,))
    return model.eval()


def _bn_calls(model: Any, x: Any) -> tuple[int, int]:
    """(BN-like modules, BN-like module calls) on one forward pass."""
    import torch

    from bnfuse_cli.engine.patterns import is_norm_like

    norms = [m for m in model.modules() if is_norm_like(m)]
    calls = 0

    def hook(*_: Any) -> None:
        nonlocal calls
        calls += 1

    handles = [m.register_forward_hook(hook) for m in norms]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return len(norms), calls


def _count_bn_nodes(path: Path) -> int:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return sum(1 for n in graph.node if n.op_type == "BatchNormalization")


def _export(model: Any, x: Any, path: Path) -> None:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (x,),
            str(path),
            dynamo=False,
            training=torch.onnx.TrainingMode.EVAL,
            do_constant_folding=False,
            opset_version=17,
        )


def _ort_optimise(src: Path, dst: Path) -> None:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(dst)
    so.intra_op_num_threads = 1
    ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])


def run_one(name: str, shape: tuple[int, ...], workdir: Path) -> Row:
    import torch

    from bnfuse_cli.workflows.fuse import fuse
    from bnfuse_cli.checks import compare

    row = Row(name)
    t0 = time.perf_counter()
    try:
        model = _build(name, shape)
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        row.bn_modules, row.bn_calls = _bn_calls(model, x)
        stem = name.replace(":", "_")
        onnx_path, opt_path = workdir / f"{stem}.onnx", workdir / f"{stem}.basic.onnx"
        _export(model, x, onnx_path)
        row.exported = _count_bn_nodes(onnx_path)
        if row.exported != row.bn_calls:
            row.error = (
                f"the export has {row.exported} BatchNormalization nodes for {row.bn_calls} BN calls: "
                "the exporter folded or split some, so the counts are not comparable"
            )
        _ort_optimise(onnx_path, opt_path)
        row.ort_left = _count_bn_nodes(opt_path)
        model64 = copy.deepcopy(model).double()
        with torch.no_grad():
            ref32, ref64 = model(x), model64(x.double())
        result = fuse(model, x)
        _, row.bnfuse_left = _bn_calls(result.model, x)
        fused64 = fuse(model64, x.double(), inplace=True).model
        with torch.no_grad():
            row.noise32 = compare(ref64, ref32).rel
            row.fused32_vs_64 = compare(ref64, result.model(x)).rel
            row.exact64 = compare(ref64, fused64(x.double())).rel
    except Exception as exc:  # report and go on: one model must not hide the others
        row.error = row.error or f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
    row.seconds = time.perf_counter() - t0
    return row


def main(argv: "list[str] | None" = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated subset (torchvision names or timm:NAME)")
    parser.add_argument("--keep", type=Path, help="keep the ONNX files in this folder")
    args = parser.parse_args(argv)

    import onnxruntime
    import torch

    torch.set_num_threads(1)
    models = MODELS
    if args.models:
        wanted = args.models.split(",")
        known = dict(MODELS)
        models = [(m, known.get(m, (1, 3, 64, 64))) for m in wanted]

    print(f"# bnfuse vs onnxruntime BN folding ({datetime.date.today().isoformat()})")
    print()
    print(f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, "
          f"legacy exporter (dynamo=False, TrainingMode.EVAL, do_constant_folding=False, opset 17), "
          "ORT_ENABLE_BASIC, float32, BN affine parameters randomised, statistics measured on random input")
    print()
    print("Errors are relative (||a - b|| / ||a||): 'fold, f64' is the fused model against the unfused one, both in "
          "float64 (a correct fold: ~1e-13 or less; a wrong one: 1e-2 or more); 'model noise f32' is the unfused "
          "float32 model against its own float64 run, 'fused f32' the fused float32 model against that float64 run.")
    print()
    print("| model | input | BN modules | BN calls | exported BN nodes | bnfuse left | onnxruntime left "
          "| ok (bnfuse <= ort) | fold, f64 | model noise f32 | fused f32 | s |")
    print("|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.keep or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for name, shape in models:
            row = run_one(name, shape, workdir)
            rows.append(row)
            ok = "yes" if row.ok else ("ERROR" if row.error else "NO")
            print(f"| {name} | {'x'.join(map(str, shape))} | {row.bn_modules} | {row.bn_calls} | {row.exported} "
                  f"| {row.bnfuse_left} | {row.ort_left} | {ok} | {row.exact64:.1e} | {row.noise32:.1e} "
                  f"| {row.fused32_vs_64:.1e} | {row.seconds:.1f} |",
                  flush=True)
    for row in rows:
        if row.error:
            print(f"\n{row.model}: {row.error}", file=sys.stderr)
    worse = [r.model for r in rows if not r.error and r.bnfuse_left > r.ort_left]
    print()
    print(f"bnfuse leaves {sum(r.bnfuse_left for r in rows)} BN calls in total, "
          f"onnxruntime {sum(r.ort_left for r in rows)}; "
          f"bnfuse leaves more on {len(worse)} model(s){': ' + ', '.join(worse) if worse else ''}.")
    if worse:
        return 1
    if any(r.error for r in rows):
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
