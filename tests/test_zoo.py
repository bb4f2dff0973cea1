"""Model-zoo runs (``make zoo``; deselected by default): every torchvision classification,
segmentation, detection and video architecture that has a BatchNorm, and a varied set of timm
architectures, fused in float64 with randomised BN statistics and checked against the unfused
output.

For each model: random weights, random BN statistics, ``model.double().eval()``, a small
float64 input, the reference output, then ``fuse(model, x)``; the fused output must match to a
relative error below 1e-7, every BN that ran and is not in :data:`EXPECTED_LEFT` must be gone,
and ``plan.skipped`` must account for every BN left.  Detection models also compare their
backbone features (and fall back to them alone when the detections differ in number).

One row per model goes to ``out/zoo_report.json`` and ``out/zoo_report.md``, rewritten after
each test, so a partial run still leaves a report.
"""

from __future__ import annotations

import json
import platform
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import pytest
import torch
from torch import nn

from bnfuse_cli.workflows.fuse import fuse
from bnfuse_cli.checks import compare
from bnfuse_cli.engine.patterns import is_norm_like
from conftest import ROOT, randomize_bn

pytestmark = pytest.mark.zoo

TOL = 1e-7
OUT = ROOT / "out"

#: BatchNorms that may legitimately stay in a model (among those that ran), with why.
#: Anything not listed must fold; a BN that never runs on the example input is always allowed
#: to stay (the analysis only trusts recorded data flow).
_CAT = "BN after a concatenation of tensors that other layers also read, then ReLU, then conv"
_IDENTITY_BRANCH = "RepVGG-style identity-branch BN on a tensor other layers read (only a re-parametrisation removes it)"
EXPECTED_LEFT: dict[str, tuple[int, str]] = {
    "tv:densenet121": (62, _CAT),
    "tv:densenet161": (82, _CAT),
    "tv:densenet169": (86, _CAT),
    "tv:densenet201": (102, _CAT),
    "timm:densenet121": (62, _CAT),
    "timm:dpn68b": (27, "pre-activation blocks: BN after a cat/add, then activation, then conv"),
    "timm:repvgg_a0": (17, _IDENTITY_BRANCH),
    "timm:mobileone_s0": (35, _IDENTITY_BRANCH),
    "timm:repghostnet_050": (32, _IDENTITY_BRANCH),
    "timm:fastvit_t8": (24, _IDENTITY_BRANCH + "; BN after GELU"),
    "timm:convmixer_768_32": (65, "BN after GELU whose output also feeds the residual add"),
}

# --------------------------------------------------------------------------- model cases


@dataclass(frozen=True)
class Case:
    id: str
    family: str  # classification | segmentation | detection | video | timm
    build: Callable[[], nn.Module]
    #: input shape (N, C, ...) for tensor models; (C, H, W) for detection (one image)
    shape: tuple[int, ...]

    def param(self) -> Any:
        return pytest.param(self, id=self.id)


@contextmanager
def _default_dtype(dtype: torch.dtype):
    """Build in float64 directly: no float32 copy of a large model is ever made."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _has_bn_tv(name: str, kwargs: dict[str, Any]) -> bool:
    """Whether a torchvision architecture has a BN, from a cheap build on the meta device."""
    from torchvision import models

    try:
        with torch.device("meta"):
            model = models.get_model(name, **kwargs)
    except Exception:  # some builders compute on tensors (regnet): decide in the test itself
        return True
    return any(is_norm_like(m) for m in model.modules())


#: torchvision input overrides: models whose minimum input is larger than the default
_TV_SHAPES = {
    "inception_v3": (1, 3, 75, 75),
    "maxvit_t": (1, 3, 224, 224),  # 7x7 windows at every stage
    "s3d": (1, 3, 16, 224, 224),  # final AvgPool3d(2, 7, 7)
}

#: detection builders that use FrozenBatchNorm2d in the backbone when built from pretrained
#: weights (``is_trained``); offline we build without weights, so freeze them the same way
_FROZEN_WHEN_TRAINED = {
    "fasterrcnn_resnet50_fpn",
    "fasterrcnn_mobilenet_v3_large_fpn",
    "fasterrcnn_mobilenet_v3_large_320_fpn",
    "fcos_resnet50_fpn",
    "keypointrcnn_resnet50_fpn",
    "maskrcnn_resnet50_fpn",
    "retinanet_resnet50_fpn",
}


def _freeze_bn(module: nn.Module) -> nn.Module:
    """Replace every nn.BatchNorm2d under ``module`` by torchvision's FrozenBatchNorm2d."""
    from torchvision.ops import FrozenBatchNorm2d

    for name, child in list(module.named_children()):
        if type(child) is nn.BatchNorm2d:
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            frozen.weight.copy_(child.weight.detach())
            frozen.bias.copy_(child.bias.detach())
            frozen.running_mean.copy_(child.running_mean)
            frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            _freeze_bn(child)
    return module


def _detection_kwargs(name: str) -> dict[str, Any]:
    """Small, fast and deterministic: tiny images, no score threshold, few detections."""
    kw: dict[str, Any] = {"weights_backbone": None}
    if name.startswith("ssd"):
        return {**kw, "score_thresh": 0.0, "detections_per_img": 20, "topk_candidates": 50}
    kw.update(min_size=160, max_size=160)
    if name.startswith(("retinanet", "fcos")):
        return {**kw, "score_thresh": 0.0, "detections_per_img": 20, "topk_candidates": 50}
    # Faster/Mask/Keypoint R-CNN: few proposals and detections keep the ROI heads cheap
    kw.update(
        box_score_thresh=0.0,
        box_detections_per_img=5 if name.startswith(("mask", "keypoint")) else 20,
        rpn_pre_nms_top_n_test=100,
        rpn_post_nms_top_n_test=50,
    )
    return kw


def _tv_builder(name: str, kwargs: dict[str, Any], freeze: bool = False) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from torchvision import models

        with _default_dtype(torch.float64):
            model = models.get_model(name, weights=None, **kwargs)
        if freeze:
            _freeze_bn(model.backbone.body)
        return model

    return build


def _tv_cases() -> list[Case]:
    from torchvision import models
    from torchvision.models import detection, segmentation, video

    cases: list[Case] = []
    for family, module in (
        ("classification", models),
        ("segmentation", segmentation),
        ("detection", detection),
        ("video", video),
    ):
        for name in models.list_models(module=module):
            kwargs: dict[str, Any] = {}
            if family in ("segmentation", "detection"):
                kwargs["weights_backbone"] = None
            if name in ("googlenet", "inception_v3"):
                kwargs["init_weights"] = True
            if not _has_bn_tv(name, kwargs):
                continue
            if family == "detection":
                kwargs = _detection_kwargs(name)
                shape: tuple[int, ...] = (3, 160, 160)
            elif family == "video":
                shape = _TV_SHAPES.get(name, (1, 3, 4, 64, 64))
            else:
                shape = _TV_SHAPES.get(name, (1, 3, 64, 64))
            freeze = name in _FROZEN_WHEN_TRAINED
            cid = f"tv:{name}" + ("[frozen]" if freeze else "")
            cases.append(Case(cid, family, _tv_builder(name, kwargs, freeze), shape))
    return cases


#: timm architectures: (name, input size or None for 64x64, variant)
_TIMM = [
    ("efficientnet_b0", None, ""),  # BatchNormAct2d everywhere
    ("efficientnet_b0", None, "frozen"),  # FrozenBatchNormAct2d (timm freeze_batch_norm_2d)
    ("tf_efficientnet_b0", None, ""),  # Conv2dSame + BatchNormAct2d
    ("efficientnetv2_rw_t", None, ""),
    ("tinynet_a", None, ""),
    ("mixnet_s", None, ""),  # MixedConv2d
    ("tf_mixnet_s", None, ""),
    ("mobilenetv3_large_100", None, ""),
    ("mobilenetv4_conv_small", None, ""),
    ("fbnetv3_b", None, ""),
    ("lcnet_050", None, ""),
    ("spnasnet_100", None, ""),
    ("ghostnet_100", None, ""),
    ("ghostnetv2_100", None, ""),
    ("repghostnet_050", None, ""),
    ("rexnet_100", None, ""),
    ("resnet18", None, ""),
    ("resnet18", None, "frozen"),  # timm FrozenBatchNorm2d
    ("resnet50d", None, ""),
    ("resnet26t", None, ""),
    ("seresnext26d_32x4d", None, ""),
    ("ecaresnet26t", None, ""),
    ("skresnet18", None, ""),
    ("res2net50_14w_8s", None, ""),
    ("resnest14d", None, ""),
    ("regnetx_002", None, ""),
    ("regnety_002", None, ""),
    ("regnetz_b16", None, ""),
    ("dla34", None, ""),
    ("dla60x_c", None, ""),
    ("dpn68b", None, ""),
    ("hrnet_w18_small", None, ""),
    ("cspresnet50", None, ""),
    ("cspdarknet53", None, ""),
    ("cs3darknet_s", None, ""),
    ("darknet17", None, ""),
    ("repvgg_a0", None, ""),
    ("mobileone_s0", None, ""),
    ("convmixer_768_32", None, ""),
    ("densenet121", None, ""),
    ("selecsls42b", None, ""),
    ("ese_vovnet19b_dw", None, ""),
    ("vovnet39a", None, ""),
    ("tresnet_m", None, ""),
    ("inception_v3", 75, ""),
    ("xception41", None, ""),
    ("gernet_s", None, ""),
    ("hgnetv2_b0", None, ""),
    ("fastvit_t8", None, ""),
    ("repvit_m1", None, ""),
    ("efficientvit_b0", None, ""),
    ("levit_128s", 224, ""),  # Linear + BatchNorm1d on flattened tokens
    ("dm_nfnet_f0", None, ""),  # no BN at all: skipped
]


def _timm_builder(name: str, variant: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        timm = pytest.importorskip("timm")
        with _default_dtype(torch.float64):
            model = timm.create_model(name, pretrained=False)
        if variant == "frozen":
            from timm.layers import freeze_batch_norm_2d

            model = freeze_batch_norm_2d(model)
        return model

    return build


def _timm_cases() -> list[Case]:
    cases = []
    for name, size, variant in _TIMM:
        s = size or 64
        cid = f"timm:{name}" + (f"[{variant}]" if variant else "")
        cases.append(Case(cid, "timm", _timm_builder(name, variant), (1, 3, s, s)))
    return cases


def _all_cases() -> list[Any]:
    return [c.param() for c in _tv_cases() + _timm_cases()]


# --------------------------------------------------------------------------- report


@dataclass
class Row:
    id: str
    family: str
    shape: list[int]
    status: str = "error"
    bn_found: int = 0
    bn_folded: int = 0
    bn_left: int = 0
    bn_left_unused: int = 0
    rel_err: float | None = None
    backbone_rel_err: float | None = None
    compared: str = ""
    seconds: float = 0.0
    skipped: list[list[str]] = field(default_factory=list)
    note: str = ""


_ROWS: list[Row] = []


def _write_report() -> None:
    OUT.mkdir(exist_ok=True)
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "tolerance": TOL,
    }
    try:
        import torchvision

        meta["torchvision"] = torchvision.__version__
        import timm

        meta["timm"] = timm.__version__
    except ImportError:
        pass
    (OUT / "zoo_report.json").write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in _ROWS]}, indent=1))

    def fmt(x: float | None) -> str:
        return "-" if x is None else f"{x:.1e}"

    lines = [
        "# bnfuse zoo report",
        "",
        " | ".join(f"{k} {v}" for k, v in meta.items()),
        "",
        "| model | family | input | status | BN found | folded | left (ran) | left (unused) | rel err | backbone rel err | compared | s |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in _ROWS:
        lines.append(
            f"| {r.id} | {r.family} | {'x'.join(map(str, r.shape))} | {r.status} | {r.bn_found} | {r.bn_folded} "
            f"| {r.bn_left - r.bn_left_unused} | {r.bn_left_unused} | {fmt(r.rel_err)} | {fmt(r.backbone_rel_err)} "
            f"| {r.compared} | {r.seconds:.1f} |"
        )
    left = [(r.id, s) for r in _ROWS for s in r.skipped]
    if left:
        lines += ["", "## BatchNorms left, with the engine's reason", ""]
        lines += [f"- {cid}: `{norm}`: {reason}" for cid, (norm, reason) in left]
    notes = [(r.id, r.note) for r in _ROWS if r.note]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {cid}: {note}" for cid, note in notes]
    (OUT / "zoo_report.md").write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------- the test


def _calibrate_bn(model: nn.Module, x: Any, seed: int = 1) -> None:
    """Random BN statistics near the real ones: each BN's running mean and variance become its
    input's per-channel mean and variance, randomly perturbed, set layer by layer in one forward
    pass.  Detection models need this: with random weights and fully random statistics their
    backbone features reach 1e6, every score saturates at 1.0 (ties make the order of the
    detections arbitrary) and the R-CNN proposals degenerate to nothing, so there would be
    nothing to compare."""
    g = torch.Generator().manual_seed(seed)

    def pre(module: nn.Module, args: tuple[Any, ...]) -> None:
        inp = args[0]
        dims = [d for d in range(inp.dim()) if d != 1]
        mean, var = inp.mean(dims), inp.var(dims, unbiased=False)
        n = mean.numel()
        std = var.clamp_min(1e-12).sqrt()
        module.running_mean.copy_(mean + 0.2 * std * torch.randn(n, generator=g, dtype=mean.dtype))
        module.running_var.copy_(var.clamp_min(1e-6) * (0.5 + 1.5 * torch.rand(n, generator=g, dtype=var.dtype)))

    handles = [m.register_forward_pre_hook(pre) for m in model.modules() if is_norm_like(m)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()


def _make_input(case: Case) -> Any:
    g = torch.Generator().manual_seed(0)
    if case.family == "detection":
        return [torch.rand(case.shape, generator=g, dtype=torch.float64)]  # an image in [0, 1]
    return torch.randn(case.shape, generator=g, dtype=torch.float64)


def _backbone_features(model: nn.Module, images: list[torch.Tensor]) -> Any:
    with torch.no_grad():
        batch = model.transform(images)[0]
        return model.backbone(batch.tensors)


def _count_norms(model: nn.Module) -> int:
    return sum(1 for m in model.modules() if is_norm_like(m))


def _zoo_deselected(config: pytest.Config) -> bool:
    expr = " ".join((config.getoption("markexpr", "") or "").split())
    return "not zoo" in expr and " or " not in f" {expr} "


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """The zoo cases, built only when zoo tests are selected: listing them builds every
    torchvision model on the meta device, which the quick suite should not pay for."""
    if "case" not in metafunc.fixturenames:
        return
    if _zoo_deselected(metafunc.config):
        metafunc.parametrize("case", [pytest.param(None, id="deselected")])
    else:
        metafunc.parametrize("case", _all_cases())


def test_zoo_fuse(case: Case) -> None:
    row = Row(case.id, case.family, list(case.shape))
    _ROWS.append(row)
    t0 = time.perf_counter()
    try:
        _run(case, row)
        row.status = "ok"
    except pytest.skip.Exception as exc:
        row.status = "skip"
        row.note = str(exc)
        raise
    except AssertionError as exc:
        row.status = "FAIL"
        row.note = (str(exc).splitlines() or [""])[0][:300]
        raise
    except Exception as exc:
        row.status = "CRASH"
        row.note = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"
        raise
    finally:
        row.seconds = time.perf_counter() - t0
        _write_report()


def _run(case: Case, row: Row) -> None:
    model = case.build()
    found = _count_norms(model)
    if found == 0:
        pytest.skip(f"{case.id} has no BatchNorm")
    model = randomize_bn(model.double(), seed=0).eval()
    x = _make_input(case)
    detection = case.family == "detection"
    if detection:
        _calibrate_bn(model, x)
    with torch.no_grad():
        reference = model(x)
        ref_backbone = _backbone_features(model, x) if detection else None
    if detection:  # an empty result would make the output comparison vacuous
        assert len(reference[0]["boxes"]) > 0, f"{case.id}: no detections on the test image; nothing to compare"

    # in place: the reference output is already taken, and the largest models do not fit twice
    result = fuse(model, x, inplace=True)
    fused = result.model
    plan = result.plan
    left = _count_norms(fused)
    unused = [s for s in plan.skipped if s.reason.startswith("never called")]
    row.bn_found, row.bn_left, row.bn_left_unused = found, left, len(unused)
    row.bn_folded = len(plan.folded_norms)
    row.skipped = [[s.norm, s.reason] for s in plan.skipped]

    with torch.no_grad():
        output = fused(x)
    err = compare(reference, output)
    problems: list[str] = []
    if detection:
        bb = compare(ref_backbone, _backbone_features(fused, x))
        row.backbone_rel_err = bb.rel
        if bb.mismatch or not bb.rel < TOL:
            problems.append(f"backbone features rel err {bb.rel:.3e} {bb.mismatch or ''}")
    if err.mismatch and detection:
        # a different number of detections: thresholds on scores that moved by ~1e-16
        row.compared = "backbone only"
        row.note = f"detections differ: {err.mismatch}"
    else:
        row.rel_err = err.rel
        row.compared = "outputs" + (" + backbone" if detection else "")
        if err.mismatch or not err.rel < TOL:
            problems.append(f"output rel err {err.rel:.3e} (max abs {err.max_abs:.3e}) {err.mismatch or ''}")
        if detection and not all(torch.equal(a["labels"], b["labels"]) for a, b in zip(reference, output)):
            problems.append("the detected labels differ")

    failed_sites = result.verdict.failed_sites
    if failed_sites:  # the judge's float64 check of every fold site must hold on every model
        problems.append("fold sites failed: " + "; ".join(f"{f.layer} {f.rel_error:.2e}" for f in failed_sites[:3]))
    if not result.ok and not (detection and result.error.mismatch):
        problems.append("the judge rejected the fold: " + "; ".join(result.verdict.reasons)[:300])
    if len(plan.norms) != found:
        problems.append(f"plan lists {len(plan.norms)} BatchNorms, the model has {found}")
    if left != len(plan.skipped):
        problems.append(f"{left} BatchNorms left in the fused model but {len(plan.skipped)} reported as skipped")
    assert not problems, " | ".join(problems)

    allowed, _why = EXPECTED_LEFT.get(case.id, (0, ""))
    ran_left = [s for s in plan.skipped if s not in unused]
    if len(ran_left) > allowed:
        shown = "; ".join(f"{s.norm}: {s.reason}" for s in ran_left[:3])
        message = f"{len(ran_left)} BatchNorms that ran were left (expected at most {allowed}): {shown}"
        raise AssertionError(message)
