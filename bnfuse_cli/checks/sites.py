"""At every site of every pass, in float64: the fused layer on (a crop of) the activation that
really reached it, against what it replaces (layer and BatchNorm, branches) on the same activation."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator

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
    def badness(self) -> float:
        """How far past its limit the site is (a data-flow failure: without limit)."""
        if self.flow is not None:
            return math.inf
        return 0.0 if self.skipped is not None or math.isnan(self.rel_error) else \
            self.rel_error / max(self.tolerance, 1e-300)

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
#: float64 weights held at once by a site check: a Conv or Linear runs in blocks of output channels
BLOCK_BYTES = 2 * 2**20


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


def _params64(module: "nn.Module") -> dict[str, "torch.Tensor"]:
    import torch

    return {n: t.detach().to(device="cpu", dtype=torch.float64 if t.is_floating_point() else t.dtype)
            for n, t in (*module.named_parameters(recurse=False), *module.named_buffers(recurse=False))}


def _run_layer(layer: "nn.Module", x: "torch.Tensor") -> "torch.Tensor":
    """``layer``'s own forward in float64 on the CPU.  A plain Conv or Linear runs a few output
    channels at a time through one reused float64 buffer of :data:`BLOCK_BYTES` (as the fold
    itself does), so the check never holds a float64 copy of a large layer; any other layer runs
    with its own tensors copied to float64, one layer at a time."""
    import torch
    from torch import nn
    from torch.func import functional_call

    x = x.to(torch.float64)
    weight = getattr(layer, "weight", None)
    if isinstance(weight, torch.Tensor):
        if type(layer).forward is nn.Linear.forward:
            return _blocks(layer, x, weight, groups=1, run=lambda xs, w, b: torch.nn.functional.linear(xs, w, b))
        if type(layer).forward in (nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward):
            return _blocks(layer, x, weight, groups=layer.groups,
                           run=lambda xs, w, b, _l=layer: _l._conv_forward(xs, w, b))
    return functional_call(layer, _params64(layer), (x,))


def _blocks(layer: Any, x: "torch.Tensor", weight: "torch.Tensor", *, groups: int,
            run: Callable[..., "torch.Tensor"]) -> "torch.Tensor":
    """A linear or (grouped) conv layer in float64, a few output channels (whole groups) at a time."""
    import torch

    out_ch, in_ch = weight.shape[0], x.shape[1 if x.dim() > 1 else 0]
    per_group = out_ch // groups
    unit = per_group if groups > 1 else 1  # grouped: whole groups per block; else any rows
    row = max(1, weight[0].numel())
    step = max(1, BLOCK_BYTES // (8 * row * unit)) * unit
    workspace = torch.empty(min(out_ch, step) * row, dtype=torch.float64)
    bias = getattr(layer, "bias", None)
    parts = []
    for start in range(0, out_ch, step):
        stop = min(out_ch, start + step)
        w = workspace[: (stop - start) * row].view(stop - start, *weight.shape[1:])
        w.copy_(weight[start:stop].detach())
        b = None if bias is None else bias[start:stop].detach().to(device="cpu", dtype=torch.float64)
        if groups == 1:
            parts.append(run(x, w, b))
        else:  # these groups read their own input channels
            g0, g1 = start // per_group, stop // per_group
            xs = x.narrow(1, g0 * (in_ch // groups), (g1 - g0) * (in_ch // groups))
            parts.append(_grouped(layer, xs, w, b, g1 - g0))
    return torch.cat(parts, dim=-1 if weight.dim() == 2 else 1)  # Linear: features last; conv: channels


def _grouped(layer: Any, x: "torch.Tensor", w: "torch.Tensor", b: "torch.Tensor | None", groups: int) -> "torch.Tensor":
    """``layer``'s convolution with ``groups`` of its groups (padding mode and all)."""
    import torch.nn.functional as F

    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[w.dim() - 2]
    if layer.padding_mode != "zeros":
        x = F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
        return conv(x, w, b, layer.stride, 0, layer.dilation, groups)
    return conv(x, w, b, layer.stride, layer.padding, layer.dilation, groups)


def _bn(norm: "nn.Module", channels: "tuple[int, int] | None", y: "torch.Tensor", axis: int) -> "torch.Tensor":
    """The BatchNorm's eval-mode affine map on ``y``'s channel ``axis``, by ``F.batch_norm``
    from the norm's own statistics (sliced to the channels this site gives, for a concat)."""
    import torch
    import torch.nn.functional as F

    from ..engine.patterns import norm_rule

    rule, why = norm_rule(norm)
    if rule is None:
        raise ValueError(why or "not a BatchNorm bnfuse can read")
    mean, var, weight, bias, eps = rule.stats(norm)

    def part(t: "torch.Tensor | None") -> "torch.Tensor | None":
        if t is None:
            return None
        t = t.detach().to(device="cpu", dtype=torch.float64)
        return t[channels[0]:channels[1]] if channels is not None else t

    moved = y.movedim(axis, 1)
    z = F.batch_norm(moved, part(mean), part(var), part(weight), part(bias), False, 0.0, float(eps))
    return z.movedim(1, axis)


def _elementwise(model: "nn.Module", step: Any, y: "torch.Tensor") -> "torch.Tensor":
    """``y op value`` in float64, a per-channel value on the step's axis."""
    import torch

    from ..engine.forward import held

    if isinstance(step.value, str):
        c = held(model, step.value).detach().to(device="cpu", dtype=torch.float64).reshape(-1)
        view = [-1 if i == step.axis % y.dim() else 1 for i in range(y.dim())] if c.numel() > 1 else []
        c = c.reshape(view)
    else:
        c = torch.tensor(float(step.value), dtype=torch.float64)
    return {"mul": torch.mul, "add": torch.add, "sub": torch.sub, "div": torch.div}[step.op](y, c)


def _replay(model: "nn.Module", step: Any, y: "torch.Tensor") -> "torch.Tensor":
    """What ``step.block``'s own forward computes from node ``step.start``, given ``y`` as its value, to
    node ``step.end``, in float64: the operations of the model's own code (traced by torch.fx), each
    tensor they read from the block as a float64 copy, each child they call as a float64 copy of it.
    A part that reads anything else of the forward (its input) cannot be replayed on a crop."""
    import copy

    import torch
    from torch import fx

    from ..engine.forward import trace_block

    block = model.get_submodule(step.block) if step.block else model
    graph = trace_block(block)
    constants = getattr(graph, "_bnfuse_constants", {})
    nodes = {n.name: n for n in graph.nodes}
    start, end = nodes.get(step.start), nodes.get(step.end)
    if start is None or end is None:
        raise ValueError(f"the forward of {step.block or 'the model'} has no node {step.start} or {step.end}")
    need: set[Any] = set()
    todo = [end]
    while todo:
        n = todo.pop()
        if n is start or n in need:
            continue
        if n.op in ("placeholder", "output"):
            raise ValueError(f"{step.end} in the forward of {step.block or 'the model'} reads more than {step.start}")
        need.add(n)
        todo += n.all_input_nodes

    def f64(v: Any) -> Any:
        if not isinstance(v, torch.Tensor):
            return v
        v = v.detach().to(device="cpu", copy=True)
        return v.to(torch.float64) if v.is_floating_point() else v

    values: dict[Any, Any] = {start: y}
    with torch.no_grad():
        for n in graph.nodes:
            if n not in need:
                continue
            args, kwargs = fx.node.map_arg((n.args, n.kwargs), lambda a: values[a])
            if n.op == "get_attr":  # a tensor of the block, or one the tracer met as a constant (a global)
                owner, _, attr = str(n.target).rpartition(".")
                found = constants[n.target] if n.target in constants else getattr(block.get_submodule(owner), attr)
                values[n] = f64(found)
            elif n.op == "call_function":
                values[n] = n.target(*args, **kwargs)
            elif n.op == "call_method":
                values[n] = getattr(args[0], str(n.target))(*args[1:], **kwargs)
            else:  # a child: a float64 copy of it
                child = copy.deepcopy(block.get_submodule(str(n.target))).to(device="cpu", dtype=torch.float64)
                values[n] = child.eval()(*args, **kwargs)
                del child
    out = values[end]
    while out.dim() > y.dim() and out.shape[0] == 1:  # a constant's leading axes of size 1 (broadcast)
        out = out[0]
    return out


def _run_chain(model: "nn.Module", chain: "tuple[Any, ...]", x: "torch.Tensor",
               terms: "list[float] | None" = None) -> "torch.Tensor":
    """A site's chain of steps (:mod:`bnfuse_cli.engine.steps`) on ``x``, in float64: a layer
    block by block, a module as a float64 copy of its own, a BatchNorm's affine map, a sum (the norm of
    each of its terms appended to ``terms``)."""
    import copy

    import torch

    from ..engine.steps import Cat, Elementwise, Forward, Layout, Mean, Norm, RunLayer, RunModule, Sum

    for step in chain:
        if isinstance(step, RunLayer):
            x = _run_layer(model.get_submodule(step.name), x)
        elif isinstance(step, Norm):
            x = _bn(model.get_submodule(step.name), step.channels, x, step.axis if x.dim() > 1 else 0)
        elif isinstance(step, Elementwise):
            x = _elementwise(model, step, x)
        elif isinstance(step, RunModule):
            module = copy.deepcopy(model.get_submodule(step.name)).to(device="cpu", dtype=torch.float64).eval()
            with torch.no_grad():
                x = module(x)
            del module
        elif isinstance(step, Sum):
            total = None
            for sub in step.chains:
                y = _run_chain(model, sub, x, terms)
                if terms is not None:
                    terms.append(float(y.norm()))
                total = y if total is None else total + y
            x = total
        elif isinstance(step, Cat):
            x = torch.cat([_run_chain(model, sub, x) for sub in step.chains], step.axis)
        elif isinstance(step, Layout):
            x = getattr(x, step.op)(*step.args)
        elif isinstance(step, Mean):
            x = x.mean(step.axes, keepdim=step.keepdim)
        elif isinstance(step, Forward):
            x = _replay(model, step, x)
        else:
            raise ValueError(f"unknown site step {step!r}")
    return x


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
        out = _run_chain(model, site.spec.fused if fused else site.spec.original, site.crop.double(), terms)
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

