"""At every site of every pass, in float64: the fused layer on (a crop of) the activation that
really reached it, against what it replaces (layer and BatchNorm, branches) on the same activation."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

from .chains import run_chain
from .flow import FlowWatch, flow_needs
from .outputs import Tolerance, json_number

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["SiteCheck", "SiteProbe"]


@dataclass
class SiteCheck:
    """One fused layer checked against its original layer and BatchNorm(s), in float64."""

    layer: str
    norms: list[str]
    rel_error: float = math.nan
    tolerance: float = 0.0
    #: why the site could not be checked (None when it was)
    skipped: "str | None" = None
    #: the pass (``fold``: ``norms`` are the BatchNorms folded; ``merge``: the branches summed; ...)
    kind: str = "fold"
    #: what the site assumed that the original's own run did not do (:mod:`.flow`); None when nothing
    flow: "str | None" = None

    @property
    def ok(self) -> bool:
        return self.flow is None and (self.skipped is not None or self.rel_error <= self.tolerance)

    @property
    def ratio(self) -> float:
        """Its float64 error over its limit (0 where it was not checked)."""
        return 0.0 if self.skipped is not None or math.isnan(self.rel_error) else \
            self.rel_error / max(self.tolerance, 1e-300)

    @property
    def badness(self) -> float:
        """How far past its limit the site is (a data-flow failure: without limit)."""
        return math.inf if self.flow is not None else self.ratio

    def why(self) -> str:
        """Why the site fails, in words."""
        if self.flow is not None:
            return self.flow
        return (f"the fused layer is {self.rel_error:.3g} (relative) away from what it replaces on the "
                f"activation that reaches it, above {self.tolerance:g}")

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "kind": self.kind, "norms": self.norms, "ok": self.ok, "skipped": self.skipped,
                "rel_error": json_number(self.rel_error), "tolerance": self.tolerance, "flow": self.flow}


@dataclass
class _Site:
    #: what a pass says the site is (:class:`bnfuse_cli.engine.steps.SiteSpec`)
    spec: Any
    reference: "torch.Tensor | None" = None
    crop: "torch.Tensor | None" = None
    #: the largest norm of a term the original's chain summed (its branches): where terms cancel, the
    #: site's rounding grows with them, not with their sum
    reach: float = 0.0


#: window kept of a BatchNorm's input per spatial axis (a fold into the layer after it: no zero padding)
NORM_WINDOW = 8
#: units of float64 rounding, at the scale of the terms a site sums, that the sum and the merged kernel
#: computed from the same terms may each carry (measured: about 5 where branches of 1e8 cancel to 1)
SUM_ROUNDING = 32


def _crop(x: "torch.Tensor", spatial: int, batched: bool, keep: "set[int] | None" = None) -> "torch.Tensor":
    """A small CPU copy of ``x`` in its own dtype (float64 only when computed with): the first
    sample (rows, for 2-D inputs) and a centred window of at most ``spatial`` along each axis
    after the channel axis (``keep``: along every axis after the first but these)."""
    if batched:
        x = x[:1] if x.dim() > 2 else x[:4]
    lead = 2 if batched and keep is None else 1
    for axis in range(lead, x.dim()):
        size = x.shape[axis]
        if size > spatial and axis not in (keep or ()):
            x = x.narrow(axis, (size - spatial) // 2, spatial)
    return x.detach().to(device="cpu", copy=True)


def _spatial(layer: Any) -> int:
    """Window of a conv's input kept for its site: its kernel's reach, at least 2 positions a side (the
    check compares the fused layer with the original layer and BatchNorm on the same window, so the
    window only needs every weight to meet the data; a 1x1 conv keeps 2x2 positions of every channel)."""
    k = getattr(layer, "kernel_size", None)
    if not k:
        return 4
    d = getattr(layer, "dilation", (1,) * len(k))
    return max(2, max(di * (ki - 1) + 1 for ki, di in zip(k, d)))


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run the float64 site arithmetic on one CPU thread (the setting is restored after).

    On more than one thread, MKL's float64 GEMM (what a conv on a crop comes down to) keeps a
    packing buffer of about 9 MiB per thread for the rest of the process: 18 MiB on two cores,
    live during the checking forward pass that follows.  On one thread it keeps none; the
    crops are too small for threads to gain anything.
    """
    import warnings

    import torch

    n = torch.get_num_threads()
    with warnings.catch_warnings():  # a native (non-OpenMP) thread pool only warns and keeps its size
        warnings.simplefilter("ignore")
        if n > 1:
            torch.set_num_threads(1)
        try:
            yield
        finally:
            if n > 1:
                torch.set_num_threads(n)


class SiteProbe:
    """Checks each fold site on the activation that really reached it.

    Usage: hand :meth:`capture` to the recording run (or call :meth:`hooks` around a plain run
    of the original), then :meth:`reference` with the *original* model, then, once the model is
    fused, :meth:`check` with the fused model.  Per site it keeps a crop of the layer's input
    (the first sample, a few positions of each spatial axis) and the float64 reference output on
    it, never an activation or a copy of the model; :meth:`release` drops them.
    """

    def __init__(self) -> None:
        self.crops: dict[str, "torch.Tensor"] = {}
        self.sites: dict[str, _Site] = {}
        self.wanted: "set[str] | None" = None
        self.flow = FlowWatch({})

    def plan(self, model: "nn.Module", plan: Any) -> None:
        """The sites of every pass's items in ``plan`` (a :class:`~bnfuse_cli.engine.plan.Plan`),
        described on ``model`` before they are applied."""
        from ..engine.passes import site_specs

        self.use(site_specs(model, plan.items)[0])

    def use(self, specs: "list[Any]") -> None:
        """Check these sites.  A site inside what another site covers (a fold inside a merged
        branch) is checked as part of that one."""
        self.sites = {}
        for spec in specs:
            if any(spec.layer == c or spec.layer.startswith(c + ".") for other in specs if other is not spec
                   for c in other.covers):
                continue
            self.sites[spec.key] = _Site(spec)
        self.flow = FlowWatch({key: flow_needs(site.spec) for key, site in self.sites.items()})
        self.wanted = {s.spec.capture for s in self.sites.values()}
        # crops kept while recording, before the sites were known: only the sites' own stay
        self.crops = {k: v for k, v in self.crops.items() if k in self.wanted}

    def capture(self, name: str, module: "nn.Module", x: Any) -> None:
        """Keep a crop of ``x``, the first input seen by ``module`` (a producer, a norm or a scale)."""
        import torch

        from ..engine.patterns import is_norm_like

        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or name in self.crops:
            return
        if self.wanted is not None and name not in self.wanted:
            return
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() >= 3:  # a conv: keep its kernel's reach
            self.crops[name] = _crop(x, _spatial(module), batched=x.dim() == weight.dim())
        elif isinstance(weight, torch.Tensor) and weight.dim() == 2:  # a linear: a few rows of features
            self.crops[name] = _crop(x.reshape(-1, x.shape[-1]), 0, batched=True)
        elif is_norm_like(module) or x.dim() < 3:
            self.crops[name] = _crop(x, NORM_WINDOW, batched=x.dim() >= 2)
        else:  # a per-channel scale, its channels perhaps last (tokens): every axis of a parameter's length
            sizes = {t.numel() for t in (*module.parameters(recurse=False), *module.buffers(recurse=False))
                     if t.numel() > 1}
            keep = {a for a in range(1, x.dim()) if x.shape[a] in sizes} or {1, x.dim() - 1}
            self.crops[name] = _crop(x, NORM_WINDOW, batched=True, keep=keep)

    def watch(self, model: "nn.Module", args: "tuple[Any, ...]") -> None:
        """One plain run of the original ``model`` on ``args``, for the sites' data flow (:mod:`.flow`:
        how often each site's modules run, what reads their outputs), seen by the judge's own hooks."""
        import torch

        if self.sites:
            with torch.no_grad(), self.flow.watch(model):
                model(*args)

    @contextlib.contextmanager
    def hooks(self, model: "nn.Module") -> Iterator[None]:
        """Capture the inputs of the sites' modules, and their data flow (:mod:`.flow`), during one
        plain run of ``model``."""
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
            with self.flow.watch(model):
                yield
        finally:
            for h in handles:
                h.remove()

    def _compute(self, model: "nn.Module", site: _Site, fused: bool) -> "torch.Tensor":
        terms: list[float] = []
        out = run_chain(model, site.spec.fused if fused else site.spec.original, site.crop.double(), terms)
        if not fused:
            site.reach = max(terms, default=0.0)
        return out

    def reference(self, original: "nn.Module") -> None:
        """Compute each site's float64 reference from the original, unfused model."""
        with _one_thread():
            self._reference(original)

    def _reference(self, original: "nn.Module") -> None:
        for site in self.sites.values():
            site.crop = self.crops.get(site.spec.capture)
            if site.crop is None:
                continue
            try:
                site.reference = self._compute(original, site, fused=False)
            except Exception:  # a layer that needs more than its first input: checked end to end only
                site.reference = None
        self.crops.clear()

    def release(self) -> None:
        """Drop every crop and reference, once :meth:`check` has run: the probe can outlive its
        use (the recorder that called :meth:`capture` is freed only by the garbage collector), and
        its tensors must not stay live through the checking forward pass."""
        self.crops.clear()
        for site in self.sites.values():
            site.crop = site.reference = None

    def check(self, fused: "nn.Module", site_rtol: "float | None" = None) -> list[SiteCheck]:
        """Each site of the fused model against its reference, one layer at a time."""
        with _one_thread():
            return self._check(fused, site_rtol)

    def _check(self, fused: "nn.Module", site_rtol: "float | None") -> list[SiteCheck]:
        results = []
        for site in self.sites.values():
            spec = site.spec
            res = SiteCheck(spec.layer, list(spec.parts), kind=spec.kind, flow=self.flow.problem(spec.key))
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
                    weight = getattr(fused.get_submodule(spec.layer), "weight", None)
                    res.tolerance = Tolerance.for_dtype(weight.dtype).site_rtol if site_rtol is None else site_rtol
                    # terms that cancel (a merge of branches in float64 whose sum is far smaller than
                    # they are): the float64 arithmetic rounds at the terms' scale, not at their sum's
                    res.tolerance += SUM_ROUNDING * 2.0 ** -52 * site.reach / max(float(ref.norm()), 1e-300)
            results.append(res)
        return results

