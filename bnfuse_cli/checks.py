"""The one judge of correctness: does a fused model compute what the original computes?

Two checks, and a fold is correct only when both pass:

* **At every fold site**, in float64, whatever precision the model runs in: the fused layer on the
  real activation that reached it (a small crop of it) against the original layer and BatchNorm
  on the same activation, computed from the original weights with ``F.batch_norm``, independent
  of bnfuse's fold arithmetic.  A wrong fold that the model's output hides (saturating
  activations, reduced-precision noise) fails here, by name.
* **End to end**, per output tensor: ``max|fused - ref| <= atol + rtol * max|ref| + k * max|orig - ref|``.
  ``ref`` is the exact output (the original model in float64) and the last term is the
  original's *own* error at the precision in use (TF32 convolutions, float16, autocast), so a
  fold is held to the precision the user deploys in, not to a fixed number that every GPU
  fails.  Where no float64 copy of the model can be afforded (``convert`` folds in place), the
  check runs with reduced-precision math switched off instead and ``ref`` is the original's
  output (``k`` then multiplies zero).

``rtol``/``atol`` have one meaning and one default table (:data:`TOLERANCES`) for ``convert``,
``verify`` and ``bench``.  Nothing here prints or exits.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

from .errors import UsageError

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "TOLERANCES",
    "NOISE_FACTOR",
    "Tolerance",
    "Comparison",
    "compare",
    "OutputCheck",
    "SiteCheck",
    "SiteProbe",
    "Verdict",
    "json_number",
]

#: dtype name -> (rtol, atol, site rtol).  rtol/atol: the floor of the end-to-end allowance, of
#: each output's largest magnitude; site rtol: the largest relative (norm) error of a fused layer
#: against its float64 reference, a few units of rounding of the weight's dtype.
TOLERANCES: dict[str, tuple[float, float, float]] = {
    "float64": (1e-9, 1e-12, 1e-10),
    "float32": (1e-4, 1e-6, 1e-5),
    "float16": (2e-2, 1e-3, 4e-3),
    "bfloat16": (5e-2, 1e-2, 3e-2),
}
#: how many times the original's own error (against float64) the fused model may add
NOISE_FACTOR = 4.0


def _dtype_name(dtype: Any) -> str:
    return str(dtype).replace("torch.", "")


@dataclass(frozen=True)
class Tolerance:
    """The end-to-end allowance ``atol + rtol * scale + noise_factor * noise`` and the site limit."""

    rtol: float
    atol: float
    site_rtol: float
    noise_factor: float = NOISE_FACTOR

    @classmethod
    def for_dtype(cls, dtype: Any, rtol: "float | None" = None, atol: "float | None" = None) -> "Tolerance":
        """The defaults for ``dtype`` (float32's for an unknown one), with ``rtol``/``atol`` overriding."""
        for name, value in (("--rtol", rtol), ("--atol", atol)):
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise UsageError(f"{name} {value}: give a finite number >= 0")
        d_rtol, d_atol, site = TOLERANCES.get(_dtype_name(dtype), TOLERANCES["float32"])
        return cls(d_rtol if rtol is None else float(rtol), d_atol if atol is None else float(atol), site)

    def to_dict(self) -> dict[str, float]:
        return {"rtol": self.rtol, "atol": self.atol, "site_rtol": self.site_rtol, "noise_factor": self.noise_factor}


# ----------------------------------------------------------------------------- comparing outputs


@dataclass(frozen=True)
class Comparison:
    """Max absolute error, relative error ``||a - b|| / ||a||`` and cosine similarity."""

    max_abs: float
    rel: float
    cosine: float
    #: the outputs differ in structure or shape (tensors could not be compared element-wise)
    mismatch: "str | None" = None

    def to_dict(self) -> dict[str, Any]:
        return {"max_abs": json_number(self.max_abs), "rel": json_number(self.rel), "cosine": json_number(self.cosine),
                "mismatch": self.mismatch}


def json_number(x: float) -> "float | None":
    """JSON has no inf/NaN: those become null (``mismatch`` or ``ok`` says why)."""
    return x if math.isfinite(x) else None


def _leaves(out: Any) -> list["torch.Tensor"]:
    import torch
    from torch.utils._pytree import tree_flatten

    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]


class _Norms:
    """Running sums for one pair of outputs: max error and the norms behind rel and cosine."""

    def __init__(self) -> None:
        self.max_abs = 0.0
        self.diff_sq = self.ref_sq = self.out_sq = self.dot = 0.0

    def add(self, x: "torch.Tensor", y: "torch.Tensor") -> float:
        d = x - y
        m = float(d.abs().max()) if d.numel() else 0.0
        self.max_abs = max(self.max_abs, m)
        self.diff_sq += float(d.dot(d))
        self.ref_sq += float(x.dot(x))
        self.out_sq += float(y.dot(y))
        self.dot += float(x.dot(y))
        return m

    def comparison(self, mismatch: "str | None" = None) -> Comparison:
        if mismatch:
            return Comparison(math.inf, math.inf, math.nan, mismatch=mismatch)
        na, nb = math.sqrt(self.ref_sq), math.sqrt(self.out_sq)
        if math.isinf(self.max_abs):
            rel = math.inf
        else:
            rel = math.sqrt(self.diff_sq) / na if na > 0 else (0.0 if self.max_abs == 0 else math.inf)
        cos = self.dot / (na * nb) if na > 0 and nb > 0 else (1.0 if na == nb else 0.0)
        return Comparison(self.max_abs, rel, cos)


class OutputCheck:
    """Accumulates, over one or more batches, the fused model's error against a reference and
    the original's own error against it, per output tensor, in float64."""

    def __init__(self, tol: Tolerance, *, reference: str = "original") -> None:
        self.tol = tol
        #: what the reference is: "float64" (the original in float64) or "original" (its own output)
        self.reference = reference
        self.fused = _Norms()
        self.orig = _Norms()
        self.leaf_err: list[float] = []
        self.leaf_noise: list[float] = []
        self.leaf_scale: list[float] = []
        self.mismatch: "str | None" = None
        self.nonfinite_both = 0
        self.batches = 0
        self.rows = self.agree = 0
        self.labelled = self.correct_orig = self.correct_fused = 0

    def _flat(self, t: "torch.Tensor") -> "torch.Tensor":
        import torch

        return t.detach().to(device="cpu", dtype=torch.float64).reshape(-1)

    def add(self, ref: Any, fused: Any, orig: Any = None, labels: "torch.Tensor | None" = None) -> None:
        """Compare one batch: ``ref`` the reference output, ``orig`` the original's output at the
        precision in use (None when ``ref`` is that output), ``labels`` class indices or None."""
        import torch

        r, f = _leaves(ref), _leaves(fused)
        o = r if orig is None else _leaves(orig)
        self.batches += 1
        shapes = [tuple(x.shape) for x in r]
        if [tuple(y.shape) for y in f] != shapes or [tuple(y.shape) for y in o] != shapes:
            self.mismatch = self.mismatch or (
                f"the outputs differ in structure: {shapes} (original) vs {[tuple(y.shape) for y in f]} (fused)"
            )
            return
        if not self.leaf_err:
            self.leaf_err, self.leaf_noise, self.leaf_scale = [0.0] * len(r), [0.0] * len(r), [0.0] * len(r)
        elif len(self.leaf_err) != len(r):
            self.mismatch = self.mismatch or "the models return a different number of outputs on different inputs"
            return
        for i, (a, b, c) in enumerate(zip(r, f, o)):
            a, b = self._flat(a), self._flat(b)
            c = a if orig is None else self._flat(c)
            finite = torch.isfinite(a) & torch.isfinite(b) & torch.isfinite(c)
            if not bool(finite.all()):
                same = ((a.isnan() & b.isnan()) | (a == b)) & ((c.isnan() & b.isnan()) | (c == b))
                if not bool((finite | same).all()):
                    self.leaf_err[i] = self.fused.max_abs = math.inf
                self.nonfinite_both += int((~finite & same).sum())
                a, b, c = a[finite], b[finite], c[finite]
            if a.numel() == 0:
                continue
            self.leaf_err[i] = max(self.leaf_err[i], self.fused.add(a, b))
            self.leaf_noise[i] = max(self.leaf_noise[i], self.orig.add(a, c))
            self.leaf_scale[i] = max(self.leaf_scale[i], float(a.abs().max()))
        self._classes(o, f, labels)

    def _classes(self, o: list["torch.Tensor"], f: list["torch.Tensor"], labels: "torch.Tensor | None") -> None:
        """Top-1 agreement (and accuracy with labels) for classifier logits (N, classes)."""
        if len(o) == 1 and o[0].dim() == 2 and o[0].shape[1] > 1:
            pa, pb = o[0].argmax(1).cpu(), f[0].argmax(1).cpu()
            self.rows += pa.numel()
            self.agree += int((pa == pb).sum())
            if labels is not None:
                self.labelled += labels.numel()
                self.correct_orig += int((pa == labels.cpu()).sum())
                self.correct_fused += int((pb == labels.cpu()).sum())

    @property
    def error(self) -> Comparison:
        """The fused model against the reference."""
        return self.fused.comparison(self.mismatch)

    @property
    def noise(self) -> Comparison:
        """The original at the precision in use against the reference (zero when it is the reference)."""
        return self.orig.comparison(self.mismatch)

    def allowed(self) -> list[float]:
        t = self.tol
        return [t.atol + t.rtol * s + t.noise_factor * n for s, n in zip(self.leaf_scale, self.leaf_noise)]

    @property
    def worst(self) -> float:
        """Largest share of its allowance that any output tensor used (at most 1 passes)."""
        if self.mismatch:
            return math.inf
        ratios = [e / a if a > 0 else (0.0 if e == 0 else math.inf) for e, a in zip(self.leaf_err, self.allowed())]
        return max(ratios, default=0.0)

    @property
    def ok(self) -> bool:
        return self.batches > 0 and self.mismatch is None and self.worst <= 1.0

    @property
    def agreement(self) -> "float | None":
        return self.agree / self.rows if self.rows else None

    def reason(self, label: str) -> "str | None":
        """Why this check failed, in one sentence (None when it passed)."""
        if self.batches == 0:
            return f"{label}: nothing was compared"
        if self.mismatch:
            return f"{label}: {self.mismatch}"
        if self.worst <= 1.0:
            return None
        i = max(range(len(self.leaf_err)), key=lambda j: self.leaf_err[j] / max(self.allowed()[j], 1e-300))
        return (f"{label}: output {i} is {self.leaf_err[i]:.3g} away from the {self.reference} reference, above "
                f"the {self.allowed()[i]:.3g} allowed ({self.tol.atol:g} + {self.tol.rtol:g} x {self.leaf_scale[i]:.3g}"
                f" + {self.tol.noise_factor:g} x the original's own error {self.leaf_noise[i]:.3g})")

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "reference": self.reference,
            "error": self.error.to_dict(),
            "noise": self.noise.to_dict(),
            "worst_ratio": json_number(self.worst),
            "allowed": [json_number(a) for a in self.allowed()],
            "top1_agreement": self.agreement,
            "nonfinite_both": self.nonfinite_both,
        }


def compare(reference: Any, output: Any) -> Comparison:
    """Max abs error, relative error ``||a-b|| / ||a||`` and cosine similarity over all float outputs."""
    check = OutputCheck(Tolerance.for_dtype("float32"))
    check.add(reference, output)
    return check.error


# ----------------------------------------------------------------------------- fold sites


@dataclass
class SiteCheck:
    """One fused layer checked against its original layer and BatchNorm(s), in float64."""

    layer: str
    norms: list[str]
    rel_error: float = math.nan
    tolerance: float = 0.0
    #: why the site could not be checked (None when it was)
    skipped: "str | None" = None

    @property
    def ok(self) -> bool:
        return self.skipped is not None or self.rel_error <= self.tolerance

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "norms": self.norms, "rel_error": json_number(self.rel_error),
                "tolerance": self.tolerance, "ok": self.ok, "skipped": self.skipped}


@dataclass
class _Site:
    layer: str
    #: the BN whose output the layer absorbs (its fold row), and the BN before it
    after: Any = None
    before: Any = None
    reference: "torch.Tensor | None" = None
    crop: "torch.Tensor | None" = None


def _crop(x: "torch.Tensor", spatial: int, batched: bool) -> "torch.Tensor":
    """A small float64 CPU copy of ``x``: the first sample (rows, for 2-D inputs) and a
    centred window of at most ``spatial`` along each axis after the channel axis."""
    import torch

    if batched:
        x = x[:1] if x.dim() > 2 else x[:4]
    lead = 2 if batched else 1
    for axis in range(lead, x.dim()):
        size = x.shape[axis]
        if size > spatial:
            x = x.narrow(axis, (size - spatial) // 2, spatial)
    return x.detach().to(device="cpu", dtype=torch.float64, copy=True)


def _spatial(layer: Any) -> int:
    """Window wide enough for ``layer``'s kernel to produce output."""
    k = getattr(layer, "kernel_size", None)
    if not k:
        return 4
    d = getattr(layer, "dilation", (1,) * len(k))
    return max(4, max(di * (ki - 1) + 1 for ki, di in zip(k, d)))


def _params64(module: "nn.Module") -> dict[str, "torch.Tensor"]:
    import torch

    return {n: t.detach().to(device="cpu", dtype=torch.float64 if t.is_floating_point() else t.dtype)
            for n, t in (*module.named_parameters(recurse=False), *module.named_buffers(recurse=False))}


def _run_layer(layer: "nn.Module", x: "torch.Tensor") -> "torch.Tensor":
    """``layer``'s own forward in float64 on the CPU, its tensors copied (one layer at a time)."""
    from torch.func import functional_call

    return functional_call(layer, _params64(layer), (x,))


def _bn(norm: "nn.Module", row: Any, y: "torch.Tensor", axis: int) -> "torch.Tensor":
    """The BatchNorm's eval-mode affine map on ``y``'s channel ``axis``, by ``F.batch_norm``
    from the norm's own statistics (sliced to the channels this site gives, for a concat)."""
    import torch
    import torch.nn.functional as F

    from .engine.patterns import norm_rule

    rule, why = norm_rule(norm)
    if rule is None:
        raise ValueError(why or "not a BatchNorm bnfuse can read")
    mean, var, weight, bias, eps = rule.stats(norm)

    def part(t: "torch.Tensor | None") -> "torch.Tensor | None":
        if t is None:
            return None
        t = t.detach().to(device="cpu", dtype=torch.float64)
        return t[row.channels[0]:row.channels[1]] if row.channels is not None else t

    moved = y.movedim(axis, 1)
    z = F.batch_norm(moved, part(mean), part(var), part(weight), part(bias), False, 0.0, float(eps))
    return z.movedim(1, axis)


class SiteProbe:
    """Checks each fold site on the activation that really reached it.

    Usage: hand :meth:`capture` to the recording run (or call :meth:`hooks` around a plain run
    of the original), then :meth:`reference` with the *original* model, then, once the model is
    fused, :meth:`check` with the fused model.  Per site it keeps a crop of the layer's input
    (the first sample, a few positions of each spatial axis) and the float64 reference output on
    it, never an activation or a copy of the model.
    """

    def __init__(self, folds: "list[Any] | None" = None) -> None:
        self.crops: dict[str, "torch.Tensor"] = {}
        self.sites: dict[str, _Site] = {}
        self.wanted: "set[str] | None" = None
        if folds is not None:
            self.plan(folds)

    def plan(self, folds: list[Any]) -> None:
        """Group fold rows (``Fold`` objects) by layer: one site per fused layer."""
        self.sites = {}
        for f in folds:
            site = self.sites.setdefault(f.producer, _Site(f.producer))
            setattr(site, "after" if f.direction == "previous" else "before", f)
        self.wanted = {s.before.norm if s.before is not None else s.layer for s in self.sites.values()}

    def capture(self, name: str, module: "nn.Module", x: Any) -> None:
        """Keep a crop of ``x``, the first input seen by ``module`` (a producer or a norm)."""
        import torch

        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or name in self.crops:
            return
        if self.wanted is not None and name not in self.wanted:
            return
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() >= 3:  # a conv: keep its kernel's reach
            self.crops[name] = _crop(x, _spatial(module), batched=x.dim() == weight.dim())
        elif isinstance(weight, torch.Tensor) and weight.dim() == 2:  # a linear: a few rows of features
            self.crops[name] = _crop(x.reshape(-1, x.shape[-1]), 0, batched=True)
        else:
            self.crops[name] = _crop(x, 16, batched=x.dim() >= 2)

    @contextlib.contextmanager
    def hooks(self, model: "nn.Module") -> Iterator[None]:
        """Capture the inputs of the sites' modules during one plain run of ``model``."""
        import torch

        handles = []
        for name in sorted(self.wanted or ()):
            try:
                module = model.get_submodule(name)
            except AttributeError:
                continue

            def pre(mod: Any, args: Any, _name: str = name) -> None:
                if args:
                    with torch._C.DisableTorchFunction():
                        self.capture(_name, mod, args[0])

            handles.append(module.register_forward_pre_hook(pre))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _compute(self, model: "nn.Module", site: _Site, fused: bool) -> "torch.Tensor":
        from .engine.patterns import producer_rule

        layer = model.get_submodule(site.layer)
        x = site.crop
        if fused:
            return _run_layer(layer, x)
        rule, why = producer_rule(layer)
        if rule is None:
            raise ValueError(why or "not a layer bnfuse folds into")
        axis = 1 if rule.kind == "conv" else -1
        if site.before is not None:
            x = _bn(model.get_submodule(site.before.norm), site.before, x, 1 if x.dim() > 1 else 0)
        y = _run_layer(layer, x)
        if site.after is not None:
            y = _bn(model.get_submodule(site.after.norm), site.after, y, axis if y.dim() > 1 else 0)
        return y

    def reference(self, original: "nn.Module") -> None:
        """Compute each site's float64 reference from the original, unfused model."""
        for site in self.sites.values():
            key = site.before.norm if site.before is not None else site.layer
            site.crop = self.crops.pop(key, None) if site.before is None else self.crops.get(key)
            if site.crop is None:
                continue
            try:
                site.reference = self._compute(original, site, fused=False)
            except Exception:  # a layer that needs more than its first input: checked end to end only
                site.reference = None
        self.crops.clear()

    def check(self, fused: "nn.Module", site_rtol: "float | Callable[[Any], float]") -> list[SiteCheck]:
        """Each site of the fused model against its reference, one layer at a time."""
        results = []
        for site in self.sites.values():
            norms = [f.norm for f in (site.before, site.after) if f is not None]
            res = SiteCheck(site.layer, norms)
            if site.crop is None:
                res.skipped = "its input was not seen on the example input"
            elif site.reference is None:
                res.skipped = "its original output could not be recomputed on a crop of its input"
            else:
                try:
                    out = self._compute(fused, site, fused=True)
                except Exception as exc:  # pragma: no cover - the fused layer ran in the model
                    res.skipped = f"the fused layer could not run on its input crop ({type(exc).__name__})"
                else:
                    ref = site.reference
                    if out.shape != ref.shape:
                        res.rel_error = math.inf
                    elif ref.numel() == 0:
                        res.skipped = "its input crop is too small for its kernel"
                    else:
                        scale = max(float(ref.norm()), 1e-300)
                        res.rel_error = float((out - ref).norm()) / scale
                    weight = getattr(fused.get_submodule(site.layer), "weight", None)
                    res.tolerance = site_rtol(weight.dtype) if callable(site_rtol) else site_rtol
            results.append(res)
        return results


# ----------------------------------------------------------------------------- the verdict


@dataclass
class Verdict:
    """The judgement and what it rests on: errors, thresholds, the original's own error (the
    noise floor), every fold site, and the precision flags in effect."""

    tolerance: Tolerance
    outputs: dict[str, OutputCheck]
    sites: list[SiteCheck] = field(default_factory=list)
    precision: dict[str, Any] = field(default_factory=dict)
    #: what the runtime precision check was based on (for example "float64 reference on cuda")
    basis: str = ""

    @property
    def failed_sites(self) -> list[SiteCheck]:
        return [s for s in self.sites if not s.ok]

    @property
    def worst_site(self) -> "SiteCheck | None":
        checked = [s for s in self.sites if s.skipped is None]
        return max(checked, key=lambda s: s.rel_error / max(s.tolerance, 1e-300), default=None)

    @property
    def ok(self) -> bool:
        return bool(self.outputs) and all(c.ok for c in self.outputs.values()) and not self.failed_sites

    @property
    def reasons(self) -> list[str]:
        """Why the verdict is negative, one sentence each (empty when it passed)."""
        out = [r for label, c in self.outputs.items() if (r := c.reason(label)) is not None]
        if not self.outputs:
            out.append("nothing was compared")
        for s in self.failed_sites:
            out.append(
                f"fold site {s.layer} ({', '.join(s.norms)}): the fused layer is {s.rel_error:.3g} (relative) away "
                f"from the original layer and BatchNorm on the activation that reaches it, above {s.tolerance:g}"
            )
        return out

    @property
    def error(self) -> Comparison:
        """The first output check's error (the main one)."""
        return next(iter(self.outputs.values())).error

    def to_dict(self) -> dict[str, Any]:
        worst = self.worst_site
        return {
            "ok": self.ok,
            "basis": self.basis,
            "tolerance": self.tolerance.to_dict(),
            "outputs": {k: v.to_dict() for k, v in self.outputs.items()},
            "sites": {
                "checked": sum(s.skipped is None for s in self.sites),
                "unchecked": [s.to_dict() for s in self.sites if s.skipped is not None],
                "failed": [s.to_dict() for s in self.failed_sites],
                "worst": None if worst is None else worst.to_dict(),
            },
            "precision": self.precision,
            "reasons": self.reasons,
        }
