"""A site's chain of steps (:mod:`bnfuse_cli.engine.steps`) computed in float64 on the CPU: the arithmetic
behind every site check (:mod:`.sites`), from the model's own tensors and code, sharing nothing with the
passes' fold arithmetic.  A Conv or Linear runs a few output channels at a time, so a check never holds a
float64 copy of a large layer."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["run_chain", "run_layer", "BLOCK_BYTES"]

#: float64 weights held at once by a site check: a Conv or Linear runs in blocks of output channels
BLOCK_BYTES = 2 * 2**20


def _params64(module: "nn.Module") -> dict[str, "torch.Tensor"]:
    import torch

    return {n: t.detach().to(device="cpu", dtype=torch.float64 if t.is_floating_point() else t.dtype)
            for n, t in (*module.named_parameters(recurse=False), *module.named_buffers(recurse=False))}


def run_layer(layer: "nn.Module", x: "torch.Tensor") -> "torch.Tensor":
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


def run_chain(model: "nn.Module", chain: "tuple[Any, ...]", x: "torch.Tensor",
               terms: "list[float] | None" = None) -> "torch.Tensor":
    """A site's chain of steps (:mod:`bnfuse_cli.engine.steps`) on ``x``, in float64: a layer
    block by block, a module as a float64 copy of its own, a BatchNorm's affine map, a sum (the norm of
    each of its terms appended to ``terms``)."""
    import copy

    import torch

    from ..engine.steps import Cat, Elementwise, Forward, Layout, Mean, Norm, RunLayer, RunModule, Sum

    for step in chain:
        if isinstance(step, RunLayer):
            x = run_layer(model.get_submodule(step.name), x)
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
                y = run_chain(model, sub, x, terms)
                if terms is not None:
                    terms.append(float(y.norm()))
                total = y if total is None else total + y
            x = total
        elif isinstance(step, Cat):
            x = torch.cat([run_chain(model, sub, x) for sub in step.chains], step.axis)
        elif isinstance(step, Layout):
            x = getattr(x, step.op)(*step.args)
        elif isinstance(step, Mean):
            x = x.mean(step.axes, keepdim=step.keepdim)
        elif isinstance(step, Forward):
            x = _replay(model, step, x)
        else:
            raise ValueError(f"unknown site step {step!r}")
    return x
