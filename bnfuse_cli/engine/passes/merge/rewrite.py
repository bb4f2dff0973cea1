"""Apply merges to the module tree: each merged sum becomes one conv and its branches are gone.

The block whose forward computes the sum is traced (every child a leaf), the sum's node is
replaced by one call of a new conv placed at the main branch's name, and the block becomes a
``torch.fx.GraphModule`` of that graph: the branches are not called at all, whatever the block's
own forward said.  The merged kernel is computed in float64 from the branches after their
BatchNorms were folded (:mod:`.merge_math`) and cast once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

from ....errors import BnfuseError
from ...affine import affine_from_stats
from ...forward import held, rewrite_forward
from ...patterns import is_producer_like, norm_rule
from .branches import Merge
from .kernels import identity_kernel, merge_kernels

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["apply_merges", "apply_merge_structure", "main_conv", "main_conv_name"]


def main_conv_name(model: "nn.Module", into: str) -> str:
    """The name of the conv inside the merge's main branch ``into`` (its input is the shared one)."""
    module = model.get_submodule(into)
    if is_producer_like(module):
        return into
    names = [n for n, m in module.named_modules() if n and is_producer_like(m)]
    return f"{into}.{names[0]}" if len(names) == 1 else into


def main_conv(module: "nn.Module") -> "nn.Module":
    """The conv of a branch: the module itself, or the one conv inside it."""
    if is_producer_like(module):
        return module
    convs = [m for m in module.modules() if is_producer_like(m)]
    if len(convs) != 1:
        raise BnfuseError(f"a merge's main branch {type(module).__name__} holds {len(convs)} convs, not one")
    return convs[0]


def _kernel(module: "nn.Module") -> "tuple[int, ...]":
    return tuple(getattr(module, "kernel_size", ()))


def _branch_kernel(model: "nn.Module", branch, conv: "nn.Module") -> "tuple[torch.Tensor, torch.Tensor | None]":  # noqa: ANN001
    """One branch as a float64 (weight, bias) in the main conv's geometry (unpadded), times its scale."""
    import torch

    if branch.kind == "conv":
        c = main_conv(model.get_submodule(branch.module))
        w, b = c.weight.detach().to(torch.float64), None if c.bias is None else c.bias.detach().to(torch.float64)
    else:
        channels = getattr(conv, "out_channels", getattr(conv, "out_features", 0))
        w, b = identity_kernel(channels, getattr(conv, "groups", 1), _kernel(conv)), None
        if branch.kind == "norm":
            norm = model.get_submodule(branch.norm)
            rule, why = norm_rule(norm)
            if rule is None:
                raise BnfuseError(f"cannot merge {branch.norm}: {why}")
            scale, b = affine_from_stats(*rule.stats(norm), name=branch.norm)
            w = w * scale.reshape(-1, *([1] * (w.dim() - 1)))
    g = branch_scale(model, branch.scale, w.shape[0], len(_kernel(conv)) + 2)
    if g is None:
        return w, b
    return w * g.reshape(-1, *([1] * (w.dim() - 1))), None if b is None else b * g


def branch_scale(model: "nn.Module", scale: "tuple[tuple[str, Any], ...]", channels: int, rank: int
                 ) -> "torch.Tensor | None":
    """The per-channel factor (float64) a branch's ``scale`` multiplies it by (on axis 1 of a rank-``rank``
    activation); None for none."""
    import torch

    from ...sums import channel_scale

    g = None
    for op, value in scale:
        if op == "module":
            module = model.get_submodule(value)
            c, why = channel_scale(module, (1, channels) + (2,) * (rank - 2))
            if c is None:
                raise BnfuseError(f"cannot merge with {value}: {why}")
        elif isinstance(value, str):
            c = held(model, value).detach().to(torch.float64).reshape(-1)
        else:
            c = torch.tensor([float(value)], dtype=torch.float64)
        if op == "div":
            c = 1.0 / c
        c = c.expand(channels) if c.numel() == 1 else c
        if c.numel() != channels:
            raise BnfuseError(f"a branch scale {value} has {c.numel()} values for {channels} channels")
        g = c if g is None else g * c
    return g


def _rewrite_block(model: "nn.Module", block_name: str, merges: "list[Merge]",
                   convs: "dict[str, nn.Module]") -> "nn.Module":
    """Replace each merge's sum in ``block_name`` by a call of its conv (the branches are then dropped
    with the nodes nothing reads); the model, a new root for a sum in the model's own forward."""
    from torch import nn

    whole = [m for m in merges if m.place == block_name and block_name]
    if whole:  # the block's forward was the sum alone: the merged conv is the block now
        if len(merges) != 1:
            raise BnfuseError(f"the fold plan merges {len(merges)} sums in {block_name}, one of them the whole block")
        convs[block_name].train(model.get_submodule(block_name).training)
        model.set_submodule(block_name, convs[block_name])
        return model

    def edit(block: "nn.Module", graph: Any) -> None:
        nodes = {n.name: n for n in graph.nodes}
        for m in merges:
            root = nodes.get(m.node)
            rel, at = (n[len(block_name) + 1:] if block_name else n for n in (m.into, m.place))
            x = next((n.args[0] for n in nodes.values() if n.op == "call_module" and str(n.target) == rel), None)
            while x is not None and x.op == "call_module" and isinstance(block.get_submodule(str(x.target)),
                                                                          nn.Identity):
                x = x.args[0]
            if root is None or x is None:
                raise BnfuseError(f"cannot find the merged sum {m.node} of {block_name or 'the model'} in its forward")
            with graph.inserting_before(root):
                new = graph.call_module(at, (x,))
            root.replace_all_uses_with(new)
            graph.erase_node(root)
            block.set_submodule(at, convs[m.place])

    return rewrite_forward(model, block_name, edit)


def apply_merges(model: "nn.Module", merges: "Iterable[Merge]") -> "nn.Module":
    """Merge each sum in place (after the plan's folds were applied to its branches); the model, a
    new root when a sum was in the model's own forward."""
    import torch

    from ...layers import new_layer

    merges = list(merges)
    convs = {}
    for m in merges:
        main = main_conv(model.get_submodule(m.into))
        weight, bias = merge_kernels([_branch_kernel(model, b, main) for b in m.branches], _kernel(main))
        new = new_layer(main)
        with torch.no_grad():
            new.weight.copy_(weight)
            new.bias.copy_(bias)
        new.weight.requires_grad_(main.weight.requires_grad)
        new.bias.requires_grad_(main.weight.requires_grad)
        convs[m.place] = new
    return _by_block(model, merges, convs)


def apply_merge_structure(model: "nn.Module", merges: "Iterable[Merge]") -> "nn.Module":
    """Give an unmerged model the merged structure (its values come from a state_dict loaded next);
    the model, a new root as for :func:`apply_merges`."""
    from ...layers import new_layer

    merges = list(merges)
    convs = {m.place: new_layer(main_conv(model.get_submodule(m.into))) for m in merges}
    return _by_block(model, merges, convs)


def _by_block(model: "nn.Module", merges: "list[Merge]", convs: "dict[str, nn.Module]") -> "nn.Module":
    blocks: dict[str, list[Merge]] = {}
    for m in merges:
        blocks.setdefault(m.block, []).append(m)
    # inner blocks first; the model's own forward ("") last
    for name in sorted(blocks, key=lambda n: (n == "", -n.count("."))):
        model = _rewrite_block(model, name, blocks[name], convs)
    return model
